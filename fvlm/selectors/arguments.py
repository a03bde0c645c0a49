"""Argument checks for selector constructors (built-in selectors and plugins).

A selector checks its arguments in ``__init__``, so a bad value fails when the selector is built:
from Python, and in ``fvlm run`` while the recipe is parsed, before any model is loaded. Every
check raises [`SelectorArgumentError`][fvlm.errors.SelectorArgumentError] naming the selector, the parameter, what it
allows and the value given.

Budgets follow the spelling of [`fvlm.budget`][fvlm.budget]: an ``int`` is a count of visual tokens (>= 1),
a ``float`` a fraction in (0, 1] of each sample's original visual tokens. So ``keep: 1`` keeps one
token and ``keep: 1.0`` keeps every token (``fvlm run`` points out a recipe's ``keep: 1``, an easy slip).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from fvlm.budget import KEEP_RULE
from fvlm.errors import SelectorArgumentError

WHERE_RULE = "'vision', 'input' or an int >= 1 (the number of decoder layers that run before pruning)"


def _owner(owner: Any) -> str:
    return owner if isinstance(owner, str) else type(owner).__name__


def fail(owner: Any, name: str, rule: str, value: Any) -> SelectorArgumentError:
    """The error for parameter ``name`` of ``owner`` (a selector or its name) that must be ``rule``."""
    error = SelectorArgumentError(f"{_owner(owner)}: `{name}` must be {rule}; got {value!r}")
    error.parameter = name.split()[0]
    return error


def check_keep(owner: Any, value: Any, name: str = "keep") -> int | float:
    """A budget: an int count >= 1 or a float fraction in (0, 1]; returns it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(owner, name, KEEP_RULE, value)
    if isinstance(value, int) and value < 1 or isinstance(value, float) and not 0.0 < value <= 1.0:
        raise fail(owner, name, KEEP_RULE, value)
    return value


def check_int(owner: Any, value: Any, name: str, minimum: int | None = None) -> int:
    """An int (not a bool), at least ``minimum`` when given; returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise fail(owner, name, "an int" + ("" if minimum is None else f" >= {minimum}"), value)
    return value


def check_number(owner: Any, value: Any, name: str, low: float, high: float) -> float:
    """A finite number in ``[low, high]``; returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and low <= value <= high):
        raise fail(owner, name, f"a number in [{low:g}, {high:g}]", value)
    return float(value)


def check_where(owner: Any, value: Any, name: str = "layer") -> int | str:
    """Where a stage prunes: ``"vision"``, ``"input"`` or an int >= 1; returns it."""
    if value in ("vision", "input") and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(owner, name, WHERE_RULE, value)
    return value


def check_choice(owner: Any, value: Any, name: str, choices: Sequence) -> Any:
    """One of ``choices``; returns it."""
    if isinstance(value, bool) or value not in choices:
        raise fail(owner, name, "one of " + ", ".join(repr(c) for c in choices), value)
    return value
