"""The contract between operators and the runners that execute them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

ERROR_KEY = "error"


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


@dataclass
class BatchResult:
    """Rows produced from one batch, with the counts the step summary reports."""

    rows: list[dict[str, Any]]
    errors: int = 0
    images_written: int = 0


class RowError(ValueError):
    """A row that cannot be processed; `row_offset` is its position in the batch."""

    def __init__(self, message: str, row_offset: int):
        super().__init__(message)
        self.row_offset = row_offset
