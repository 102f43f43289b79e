"""Argument checks shared by every constructor: real booleans, integers that are not booleans,
finite numbers in a range, one of a fixed set of strings.

Each check returns the value converted to a plain Python type, or raises ``TypeError`` (wrong
kind of value, e.g. the string ``"false"`` for a boolean) or ``ValueError`` (right kind, out of
range). Messages name the argument, what it must be, what was given, and a hint when one helps.
Configs parsed by jsonargparse are checked against the type annotations first (``bool``,
``int``, ``Literal[...]``); these checks cover Python callers and values that types cannot
express (ranges).
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Collection
from typing import Any, NoReturn

import torch

__all__ = ["check_bool", "check_choice", "check_folder", "check_int", "check_number", "is_integer_tensor"]


def _fail(error: type[Exception], name: str, requirement: str, value: Any, hint: str) -> NoReturn:
    kind = f" ({type(value).__name__})" if error is TypeError else ""
    message = f"{name} must be {requirement}, got {value!r}{kind}"
    raise error(f"{message}; {hint}." if hint else f"{message}.")


def check_bool(value: Any, name: str, hint: str = "") -> bool:
    """``True`` or ``False`` only: strings such as ``"false"`` and numbers are refused."""
    if not isinstance(value, bool):
        _fail(TypeError, name, "true or false (a boolean)", value, hint)
    return value


def check_int(value: Any, name: str, *, minimum: int | None = None, hint: str = "") -> int:
    """An integer (Python or numpy, not a bool, not a float) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(TypeError, name, "an integer", value, hint)
    if minimum is not None and value < minimum:
        _fail(ValueError, name, f"an integer of at least {minimum}", value, hint)
    return int(value)


def check_number(
    value: Any,
    name: str,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    hint: str = "",
) -> float:
    """A finite real number (not a bool), optionally ``> above``, ``>= at_least``, ``<= at_most``, ``< below``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(TypeError, name, "a number", value, hint)
    value = float(value)
    ok = math.isfinite(value)
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (at_most is None or value <= at_most) and (below is None or value < below)
    if not ok:
        _fail(ValueError, name, _range_text(above, at_least, at_most, below), value, hint)
    return value


def _range_text(above: float | None, at_least: float | None, at_most: float | None, below: float | None = None) -> str:
    """'a positive number', 'a number in [0.5, 1]', 'a number in (0, 1]', '[0, 1)', ... (finite in every case)."""
    low = above if above is not None else at_least
    high = below if below is not None else at_most
    if low is not None and high is not None:
        return f"a number in {'(' if above is not None else '['}{low:g}, {high:g}{')' if below is not None else ']'}"
    if above == 0:
        return "a positive number"
    if at_least == 0:
        return "a non-negative number"
    if low is not None:
        return f"a finite number {'>' if above is not None else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if below is not None else '<='} {high:g}"
    return "a finite number"


def is_integer_tensor(value: Any) -> bool:
    """A tensor of an integer dtype: time steps and class labels (floating, complex and bool tensors are not)."""
    return isinstance(value, torch.Tensor) and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)


def check_choice(value: Any, name: str, choices: Collection[str]) -> str:
    """One of ``choices`` (the values of a ``Literal[...]`` annotation)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}.")
    return value


def check_folder(path: Any, name: str) -> Any:
    """``path`` unless it names an existing file where a folder (created if missing) is wanted."""
    if isinstance(path, (str, os.PathLike)) and os.path.exists(os.path.expanduser(path)) and not os.path.isdir(
        os.path.expanduser(path)
    ):
        raise ValueError(f"{name} is {path}, which is a file, not a folder: give a folder's path (it is created if missing).")
    return path
