"""speedups.md: a report's speed-ups (speedups.json) as Markdown tables in BENCHMARKS.md's wording, with the
wall-clock speed-ups when a ``benchmarks.strategy_cost`` measurement of the runs' step cost is given.

A speed-up is "mean (min–max)" over seeds (one seed: its value); a seed that never reached the baseline's FID
by the budget reads "< 1 (reverse)", reverse being the steps the baseline needs to reach that seed's FID, over
the budget. A run whose steps/s is ``ratio`` times uniform's reaches a FID ``ratio`` times sooner or later in
wall-clock time than in steps, so its wall-clock speed-up is its speed-up in steps times ``ratio``, every figure
of the cell (the bound "< 1" included) scaled alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COST_TOOL = "python -m benchmarks.strategy_cost"


def load_cost(path: str | Path) -> dict[str, Any]:
    """A ``benchmarks.strategy_cost`` JSON (``runs.<run>.ratio``: steps/s over uniform's); refused with its cause
    when missing or not such a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--cost {path}: no such file; pass the JSON that {COST_TOOL} --out writes")
    try:
        cost = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--cost {path} is not JSON ({error}); pass the JSON that {COST_TOOL} --out writes") from None
    runs = cost.get("runs") if isinstance(cost, dict) else None
    if not isinstance(runs, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("ratio"), (int, float, type(None))) for entry in runs.values()
    ):
        raise ValueError(f'--cost {path} has no "runs" with a numeric "ratio" per run; pass the JSON that {COST_TOOL} '
                         "--out writes")
    return cost


def check_cost_matches(cost: dict[str, Any], results: list[dict[str, Any]], path: str | Path) -> None:
    """A step cost is a property of the base config and the batch: one measured on others does not apply."""
    runs = {(r["configs"][0], r["batch_size"]) for r in results if r.get("configs") and "batch_size" in r}
    measured = (cost.get("base"), cost.get("batch_size"))
    if runs and runs != {measured}:
        base, batch = sorted(runs, key=str)[0]
        found = ", ".join(f"{b} at batch {n}" for b, n in sorted(runs, key=str))
        raise ValueError(f"--cost {path} was measured on {measured[0]} at batch {measured[1]}, but the runs train "
                         f"{found}: measure it with {COST_TOOL} --base {base} --batch-size {batch}")


def _compile_mode(cost: dict[str, Any]) -> str:
    """The compile mode the step costs were measured at (``--set model.compile_mode=...``; else the base's): CUDA
    graphs change a small model's step cost more than a strategy does, so the wall-clock figures hold at that mode."""
    modes = [item.split("=", 1)[1] for item in cost.get("set") or [] if item.startswith("model.compile_mode=")]
    return f"compile mode {modes[-1]}" if modes else "the base's compile mode"


def _num(value: float) -> str:
    return f"{value:.2f}"


def _steps(steps: int) -> str:
    """10000 as BENCHMARKS.md writes it: 10k (2.5k, 7.5k); other counts in full."""
    return f"{steps / 1000:g}k" if steps >= 1000 and steps % 100 == 0 else str(steps)


def _speedup(entry: dict[str, Any], order: list[int], factor: float = 1.0) -> str:
    """The speed-up cell of one strategy's entry, every figure times ``factor`` (the step-cost ratio: wall-clock).

    A run that never reached the baseline's FID reads "< 1" with the reverse view (the baseline's steps to the run's
    FID, over the budget) in brackets; one below it already at its first evaluation reads "≥ x", with the reverse
    views in brackets when every seed's figure is such a bound. Bounded reverse views read "≤ y".
    """
    per_seed, reverse = entry["per_seed"], entry["equivalent_per_seed"]

    def reverse_of(i: int) -> str:
        return ("≤ " if entry["equivalent_at_most_per_seed"][i] else "") + _num(reverse[i] * factor)

    if entry["mean"] is not None:
        at_least = "≥ " if entry["at_least"] else ""
        if len(per_seed) == 1:
            known = at_least and reverse[0] is not None
            return f"{at_least}{_num(entry['mean'] * factor)}" + (f" ({reverse_of(0)})" if known else "")
        if all(entry["at_least_per_seed"]) and None not in reverse:  # every figure a bound: the reverse views
            return f"{at_least}{_num(entry['mean'] * factor)} ({' / '.join(reverse_of(i) for i in order)})"
        return f"{at_least}{_num(entry['mean'] * factor)} ({_num(entry['min'] * factor)}–{_num(entry['max'] * factor)})"
    below = f"< {_num(factor)}" if factor != 1.0 else "< 1"
    if all(per_seed[i] is None for i in order) and all(reverse[i] is not None for i in order):
        return f"{below} ({' / '.join(reverse_of(i) for i in order)})"
    return " / ".join(("≥ " if entry["at_least_per_seed"][i] else "") + _num(per_seed[i] * factor)
                      if per_seed[i] is not None else below + (f" ({reverse_of(i)})" if reverse[i] is not None else "")
                      for i in order)


def _seeds(speedups: dict[str, Any], strategy: str, count: int) -> tuple[str, list[int]]:
    """The seeds cell and the per-seed lists' order by seed. Per-seed lists follow the report's "runs" order; when
    some of a strategy's runs did not reach the budget, which seeds count is not recorded: their number, in order."""
    seeds = [r["seed"] for r in speedups.get("runs", []) if r["strategy"] == strategy]
    if len(seeds) != count:
        return str(count), list(range(count))
    order = sorted(range(count), key=seeds.__getitem__)
    return ", ".join(str(seeds[i]) for i in order), order


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = "|" + "|".join("---" if h in ("run", "reaches 2×") else "---:" for h in header) + "|"
    return ["| " + " | ".join(header) + " |", align, *("| " + " | ".join(row) + " |" for row in rows)]


def markdown(speedups: dict[str, Any], cost: dict[str, Any] | None = None) -> str:
    """The Markdown of a report: one table per budget (N, N/2) with every candidate, and one of the screened runs.

    ``cost``: a ``benchmarks.strategy_cost`` JSON; a candidate it measured gets its step-cost ratio and wall-clock
    speed-up, one it did not gets "—".
    """
    runs = (cost or {}).get("runs", {})
    lines: list[str] = []
    for key, title in (("N", "N"), ("N_half", "N/2")):
        entries = speedups.get(key) or {}
        if not entries:
            continue
        header = ["run", "seeds", "steps", "baseline FID", "FID per seed", "speed-up"]
        if cost is not None:
            header += ["steps/s over uniform", "wall-clock speed-up"]
        rows = []
        for strategy, entry in sorted(entries.items()):
            seeds, order = _seeds(speedups, strategy, entry["seeds"])
            baseline = _num(entry["baseline_fid"]) + ("" if entry["baseline"] == "uniform" else f" ({entry['baseline']})")
            row = [strategy, seeds, _steps(entry["steps"]), baseline,
                   " / ".join(_num(entry["fid_at_steps"][i]) for i in order), _speedup(entry, order)]
            if cost is not None:
                ratio = runs.get(strategy, {}).get("ratio")
                row += ["—", "—"] if ratio is None else [_num(ratio), _speedup(entry, order, ratio)]
            rows.append(row)
        lines += [f"**Speed-up at {title}** (steps to the baseline's mean FID at the budget)", "", *_table(header, rows), ""]
    if cost is not None and lines:
        lines += [f"Step cost: {COST_TOOL} on {cost.get('card')}, {cost.get('date')}, batch {cost.get('batch_size')}, "
                  f"{_compile_mode(cost)}: wall-clock speed-up = speed-up × steps/s over uniform.", ""]
    screened = speedups.get("screen") or {}
    if screened:
        rows = []
        for strategy, entry in sorted(screened.items()):
            seeds, order = _seeds(speedups, strategy, len(entry["fid_per_seed"]))
            reached = " / ".join("never" if entry["equivalent_per_seed"][i] is None else
                                 ("≤ " if entry["equivalent_at_most_per_seed"][i] else "")
                                 + _num(entry["equivalent_per_seed"][i]) + "×" for i in order)
            steps = _steps(entry["step"]) + (" (its N)" if entry.get("budget") else "")  # trained to the end
            rows.append([strategy, seeds, steps, _num(entry["baseline_fid_at_double"]),
                         " / ".join(_num(entry["fid_per_seed"][i]) for i in order), reached,
                         "yes" if entry["reaches_2x"] else "no"])
        lines += ["**Screen** (FID at the stop step against the baseline's mean FID at twice it; how far each got: the "
                  "baseline's steps to that FID, over the stop step" + ("; \"its N\": a run trained to the end of a "
                  "schedule of that many steps, against plain uniform" if any(e.get("budget") for e in screened.values())
                  else "") + ")", "",
                  *_table(["run", "seeds", "steps", "baseline FID at 2× steps", "FID per seed", "how far",
                           "reaches 2×"], rows), ""]
    return "\n".join(lines) if lines else "no candidate reached a budget\n"
