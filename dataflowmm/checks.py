"""Checks shared by servings, operators and execution: arguments, and what an error means."""

from __future__ import annotations

from typing import Any


def check_positive_int(name: str, value: Any) -> None:
    """ValueError naming `name` unless `value` is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an accelerator running out of memory (torch's `OutOfMemoryError`,
    or a backend's "... out of memory" RuntimeError)."""
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error)


class ItemOutOfMemory(RuntimeError):
    """One item does not fit in accelerator memory even alone: a serving split its batch down
    to that item (`dataflowmm.serving.fitting`). Execution fails the item's row, transiently
    (its next run retries it), and the step goes on."""

    transient = True
