"""What a runner gets: the operator protocol execution relies on, and the values it shares.

Execution runs anything that satisfies `StepOperator`; it never imports the `Operator`
base class (`dataflowmm.contract`) or the built-in operators, which import this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dataflowmm.checks import is_out_of_memory
from dataflowmm.seeds import ROW_POSITION_KEY

ERROR_KEY = "error"
# The column of the side file of dropped rows (`{output}.dropped.jsonl`) saying why each was
# dropped. An input column of this name is plain data: it never drops a row.
DROPPED_KEY = "dropped_by"

# Keys starting with NUL are execution's own markers on rows; they never reach a cache file.
# A row returned with DROP_MARK set is dropped from the step's output (a filter's verdict);
# its value says why. Dropped rows are counted in the step summary and, when the operator's
# `keep_dropped_rows()` says so, written to the side file under DROPPED_KEY instead.
DROP_MARK = "\x00dropped_by"
# A failed row whose failure may pass (rate limit, server error, time-out, out of memory):
# recorded in the checkpoint and manifest, and recomputed by the next run of the step.
TRANSIENT_MARK = "\x00transient"
# Set by execution on the rows an operator gets: the input row an output row comes from.
ROW_MARK = ROW_POSITION_KEY
# Set by execution on an input row that arrived failed and was passed through unprocessed.
UPSTREAM_MARK = "\x00upstream"
# The chunk record and manifest key of the batch sizes that fit in memory, by serving
# attribute, for the servings whose batches had to shrink (absent when none did).
FITTED_KEY = "fitted_batch_size"


class TransientError(Exception):
    """A failure that may pass on its own if tried again later (a rate limit, a server error,
    a time-out, a dropped connection). Servings return or raise instances (or set an
    exception's `transient` attribute) so a row failed by it is retried on the next run."""

    transient = True


def is_transient(error: BaseException | None) -> bool:
    """Whether `error` may pass if tried again: a `TransientError`, an exception with a true
    `transient` attribute, or an accelerator out-of-memory error."""
    if error is None:
        return False
    if getattr(error, "transient", False) is True:
        return True
    return is_out_of_memory(error)


@dataclass(frozen=True)
class StepContext:
    """Where a step reads and writes; handed to every batch call.

    Image paths in the rows an operator receives are absolute; paths it returns may be
    absolute too: execution writes them relative to `output_dir`. On an object store
    `input_dir` is the URL of the input's folder (images are read from the store) and
    `output_url` the URL `output_dir` is published to, `storage_options` the store's
    (credentials: never shown, in a repr or anywhere else).
    """

    step: int
    input_dir: Path | str
    output_dir: Path
    save_dir: Path
    output_url: str | None = None
    storage_options: dict | None = field(default=None, repr=False, compare=False)


class RowError(ValueError):
    """A row that cannot be processed; `row_offset` is its position in the batch."""

    def __init__(self, message: str, row_offset: int):
        super().__init__(message)
        self.row_offset = row_offset

    def __reduce__(self):  # picklable with its offset (errors cross process boundaries)
        return (type(self), (str(self), self.row_offset))


@dataclass(frozen=True)
class OperatorSettings:
    """Settings every operator shares, taken from its constructor arguments of these names.

    Args:
        save_interval: rows between checkpoints (rounded up to whole batches).
        seed: global seed; each row's randomness derives from it and the row's identity.
        save_dir: folder for generated images; default inside the step's cache folder.
        absolute_paths: write absolute image paths instead of paths relative to the dataset file.
        strict: raise on the first row that cannot be processed instead of recording its error.
    """

    save_interval: int = 50
    seed: int = 0
    save_dir: str | os.PathLike | None = None
    absolute_paths: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.save_interval, bool) or int(self.save_interval) < 1:
            raise ValueError(f"save_interval must be >= 1, got {self.save_interval}")


# Constructor arguments that decide how a step runs, not what it writes: never fingerprinted.
EXECUTION_ARGUMENTS = frozenset({"save_interval", "strict"})


class StepOperator(Protocol):
    """An operator with its columns bound, as a runner sees it (`dataflowmm.contract.Operator`)."""

    name: str
    settings: OperatorSettings
    has_final_pass: bool
    # (optional attribute) `run(..., retry_errors=True)`: recompute every failed row of a
    # finished step, not only those that failed transiently. Read with getattr(..., False).
    # (optional method) `fitted_batch_sizes() -> dict[str, int]`: the batch sizes its servings
    # shrank to, to fit in memory, by attribute; recorded in the step's manifest.

    def params(self) -> dict[str, Any]:
        """Everything that changes the output, JSON-able: it fingerprints the cached step."""

    @property
    def input_batch_size(self) -> int:
        """Rows per `process_batch` call."""

    def required_keys(self) -> list[str]: ...

    def path_keys(self) -> list[str]: ...

    def image_output_keys(self) -> list[str]: ...

    def keep_dropped_rows(self) -> bool: ...

    def resolve_save_dir(self, default: Path) -> Path: ...

    def final_pass(self, rows: Iterator[dict]) -> Iterator[dict]: ...

    def process_batch(self, rows: list[dict], row_ids: Sequence[str], context: StepContext) -> list[dict]: ...

    def row_failed(self, row: dict, message: str, row_offset: int, empty_outputs: dict | None = None, *,
                   transient: bool = False) -> dict:
        """The row kept with its error (execution fails a row that does not fit in memory
        alone); raises `RowError` when strict."""


class Runner(Protocol):
    """Runs one bound operator over one storage step; `LocalRunner` and `RayRunner` are runners."""

    def run(self, storage: Any, operator: StepOperator) -> Any:
        ...
