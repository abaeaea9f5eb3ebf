"""What every operator is: a batch function over rows, plus what execution needs to know."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataflowmm.execution.batch import ERROR_KEY, BatchResult, RowError, StepContext

__all__ = ["ERROR_KEY", "BatchResult", "Operator", "OperatorSettings", "RowError", "StepContext"]


@dataclass
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
        if int(self.save_interval) < 1:
            raise ValueError(f"save_interval must be >= 1, got {self.save_interval}")

    def output_params(self) -> dict[str, Any]:
        """The settings that change what a step writes (save_interval and strict do not)."""
        save_dir = str(Path(self.save_dir).resolve()) if self.save_dir else None
        return {"seed": self.seed, "save_dir": save_dir, "absolute_paths": self.absolute_paths}


class Operator(ABC):
    """Base of all operators: subclasses say what they read and write and how a batch is made."""

    settings: OperatorSettings

    @property
    def name(self) -> str:
        return type(self).__name__

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Everything that affects the output, JSON-able: it fingerprints the cached step."""

    @abstractmethod
    def batch_rows(self) -> int:
        """Rows per batch call; batches start at multiples of it, whatever the chunking."""

    @abstractmethod
    def required_keys(self) -> list[str]:
        """Keys at least one input row must have; checked before any model loads."""

    @abstractmethod
    def path_keys(self) -> list[str]:
        """Keys whose values are image paths (or lists of them), read or written."""

    @abstractmethod
    def process_batch(
        self, rows: list[dict], row_ids: list[str], context: StepContext
    ) -> BatchResult:
        """Compute output rows for a batch of input rows (may emit more rows than it got)."""

    def resolve_save_dir(self, default: Path) -> Path:
        """Folder for this step's generated images."""
        return Path(self.settings.save_dir) if self.settings.save_dir else default

    def row_failed(self, row: dict, message: str, row_offset: int, empty_outputs: dict) -> dict:
        """The row kept with empty outputs and its error recorded; raises when strict."""
        if self.settings.strict:
            raise RowError(message, row_offset)
        return {**row, **empty_outputs, ERROR_KEY: f"{self.name}: {message}"}
