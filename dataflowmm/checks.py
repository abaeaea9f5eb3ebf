"""Argument checks shared by servings and operators."""

from __future__ import annotations

from typing import Any


def check_positive_int(name: str, value: Any) -> None:
    """ValueError naming `name` unless `value` is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
