"""The contract between operators and the runners that execute them.

An operator is a batch function over rows plus what execution needs to know about it
(its parameters, batch size, the keys it reads and the keys holding image paths). A runner
decides where batches run. This module imports neither side: operators import it, runners
import it, and execution never imports `dataflowmm.operators`.

Writing an operator: subclass `Operator`, set `self.settings` and `self.keys` in
`__init__`, implement `params`, `batch_size`, `required_keys` and `process_batch`, and give
it a `run(storage, ...keys)` that calls `self.run_bound(storage, keys)`.
"""

from __future__ import annotations

import copy
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from dataflowmm.storage import FileStorage

ERROR_KEY = "error"
# A row returned with this key set is dropped from the step's output (a filter's verdict);
# its value says why. Dropped rows are counted in the step summary and, when the operator's
# `keep_dropped_rows()` says so, written to a side file beside the output instead.
DROPPED_KEY = "dropped_by"


@dataclass(frozen=True)
class StepContext:
    """Where a step reads and writes; handed to every batch call.

    Image paths in the rows an operator receives are absolute; paths it returns may be
    absolute too: execution writes them relative to `output_dir`.
    """

    step: int
    input_dir: Path
    output_dir: Path
    save_dir: Path


class RowError(ValueError):
    """A row that cannot be processed; `row_offset` is its position in the batch."""

    def __init__(self, message: str, row_offset: int):
        super().__init__(message)
        self.row_offset = row_offset

    def __reduce__(self):  # picklable with its offset (errors cross process boundaries)
        return (type(self), (str(self), self.row_offset))


@dataclass(frozen=True)
class OperatorSettings:
    """Settings every operator shares.

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

    def output_params(self) -> dict[str, Any]:
        """The settings that change what a step writes (save_interval and strict do not)."""
        save_dir = str(Path(self.save_dir).resolve()) if self.save_dir else None
        return {"seed": self.seed, "save_dir": save_dir, "absolute_paths": self.absolute_paths}


class Runner(Protocol):
    """Runs one bound operator over one storage step; `LocalRunner` and `RayRunner` are runners."""

    def run(self, storage: FileStorage, operator: Operator) -> Any:
        ...


class Operator(ABC):
    """Base of all operators: what they read and write, and how a batch is made.

    `self.keys` holds the column names of one `run()`; `run()` binds them on a copy
    (`bind`), so one operator object can run in several steps with different keys.
    """

    settings: OperatorSettings
    keys: Any = None

    @property
    def name(self) -> str:
        return type(self).__name__

    # -- what execution asks ------------------------------------------------------------

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Everything that affects the output, JSON-able: it fingerprints the cached step."""

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """Rows per batch call; batches start at multiples of it, whatever the chunking."""

    @abstractmethod
    def required_keys(self) -> list[str]:
        """Keys at least one input row must have; checked before any model loads."""

    def path_keys(self) -> list[str]:
        """Keys whose values are image paths (or lists of them), read or written."""
        return []

    def image_output_keys(self) -> list[str]:
        """Keys where this operator writes paths of the images it generates (counted per step)."""
        return []

    def keep_dropped_rows(self) -> bool:
        """Whether rows this operator drops go to `{output}.dropped.jsonl` beside the step's
        output (with `dropped_by` saying why) instead of vanishing."""
        return False

    # Operators whose verdict needs every row of the step (deduplication) set this and
    # implement `final_pass`; others are purely per batch.
    has_final_pass: bool = False

    def final_pass(self, rows: Iterator[dict]) -> Iterator[dict]:
        """The step's output rows, in order, once all batches are done: rows may be marked
        dropped (`drop_row`) or changed. Runs in the driver, on rows read back from the
        checkpoint, so a resumed or distributed step gets the same result."""
        return rows

    @abstractmethod
    def process_batch(self, rows: list[dict], row_ids: Sequence[str], context: StepContext) -> list[dict]:
        """Output rows for a batch of input rows (may emit more or fewer rows than it got).

        `row_ids[i]` is row i's identity (its position and content in the step's input,
        computed when first read): name files and derive seeds from it. Input rows are
        read-only: build new dicts (`{**row, key: value}`). A row that cannot be processed
        is returned through `row_failed`, which raises `RowError` when `settings.strict`.
        """

    # -- helpers for subclasses ---------------------------------------------------------

    def resolve_save_dir(self, default: Path) -> Path:
        """Folder for this step's generated images."""
        return Path(self.settings.save_dir) if self.settings.save_dir else default

    def row_failed(self, row: dict, message: str, row_offset: int, empty_outputs: dict) -> dict:
        """The row kept with empty outputs and its error recorded; raises when strict."""
        if self.settings.strict:
            raise RowError(message, row_offset)
        return {**row, **empty_outputs, ERROR_KEY: f"{self.name}: {message}"}

    def drop_row(self, row: dict, reason: str) -> dict:
        """The row marked to be dropped from the step's output, with the reason."""
        return {**row, DROPPED_KEY: f"{self.name}: {reason}"}

    def bind(self, keys: Any) -> Operator:
        """A copy of this operator reading and writing `keys`; servings are shared, not copied."""
        bound = copy.copy(self)
        bound.keys = keys
        return bound

    def run_bound(self, storage: FileStorage, keys: Any) -> Any:
        """Run a copy bound to `keys` on `storage`'s step with the storage's runner."""
        return storage.runner.run(storage, self.bind(keys))
