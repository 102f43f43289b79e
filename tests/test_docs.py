"""docs/callbacks.md's option tables state the defaults of the real signatures."""

from __future__ import annotations

import inspect
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

import lightning_speed.callbacks as callbacks
import lightning_speed.timesteps as timesteps

DOC = Path(__file__).resolve().parents[1] / "docs" / "callbacks.md"
NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")
UNSET = object()


def value(text: str) -> Any:
    """A default as the table writes it: None / null, true / false, a number (2/3, −1.2), or a `string`; UNSET for
    prose that names no single value."""
    text = text.strip().replace("−", "-").split(" (")[0].split(":")[0].strip()
    if text in ("None", "null"):
        return None
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"`[^`]*`", text):
        return text.strip("`")
    try:
        return float(Fraction(text))
    except ValueError:
        return UNSET


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def documented() -> list[tuple[str, str, Any]]:
    """(owner, option, default) of every option row: the per-class tables (option | default | meaning) under a heading
    named after the class, the per-callback table (callback | option | default | meaning) and the baselines'
    (strategy | `option` default, ... | what)."""
    rows, section, header, owner = [], "", [], ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section, header = line[3:].strip(), []
            continue
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        if not header:
            header = cells(line)
            continue
        row = cells(line)
        if header == ["option", "default", "meaning"]:
            names, defaults = NAME.findall(row[0]), row[1].split(", ")
            for name, default in zip(names, defaults if len(defaults) == len(names) else [row[1]] * len(names)):
                rows.append((section, name, value(default)))
        elif header == ["callback", "option", "default", "meaning"]:
            owner = NAME.findall(row[0])[0] if row[0] else owner
            rows.append((owner, NAME.findall(row[1])[0], value(row[2])))
        elif header[:2] == ["strategy", "options (defaults)"]:
            for part in row[1].split(", "):
                found = re.fullmatch(r"`(\w+)`(?: (.+))?", part.strip())
                if found and found.group(2):
                    rows.append((NAME.findall(row[0])[0], found.group(1), value(found.group(2))))
    return [r for r in rows if r[2] is not UNSET]


def signature_default(owner: str, option: str) -> Any:
    target = getattr(callbacks, owner, None) or getattr(timesteps, owner)
    parameters = inspect.signature(target).parameters
    assert option in parameters, f"docs/callbacks.md documents {owner}({option}=...), which it does not take"
    return parameters[option].default


ROWS = documented()


def test_the_tables_are_read() -> None:
    owners = {owner for owner, _, _ in ROWS}
    assert {"SpeeD", "EMAWeightAveraging", "FIDCallback", "SampleGridCallback", "TimestepMonitor", "DivergenceGuard",
            "CheckpointOnSignal", "LossDecreaseSampling", "EDMLogNormalSampling"} <= owners
    assert len(ROWS) >= 50


@pytest.mark.parametrize(("owner", "option", "default"), ROWS, ids=[f"{o}.{n}" for o, n, _ in ROWS])
def test_a_documented_default_is_the_signatures(owner: str, option: str, default: Any) -> None:
    actual = signature_default(owner, option)
    if isinstance(default, float) and not isinstance(actual, bool):
        assert actual == pytest.approx(default, rel=1e-12), f"{owner}({option}=...)"
    else:
        assert actual == default, f"{owner}({option}=...)"
