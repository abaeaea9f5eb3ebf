"""A step's cache file as a training set: Hugging Face datasets and parquet with `Image()`
columns (`hf`, `parquet`), LLaVA / ShareGPT conversation JSON (`llava`, `sharegpt`).
`dataflowmm export STEP --to FORMAT OUT` calls `export_step`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataflowmm.export.hf import to_hf_dataset, write_hf
from dataflowmm.export.training_rows import TrainingRows, detect_image_columns

EXPORT_FORMATS = ("hf", "parquet", "llava", "sharegpt")

__all__ = ["EXPORT_FORMATS", "ExportReport", "TrainingRows", "detect_image_columns", "export_step",
           "to_hf_dataset"]


@dataclass(frozen=True)
class ExportReport:
    """Where an export went and, for the training formats, what it took and left out."""

    path: Path
    counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        counts = self.counts
        if not counts:
            return f"exported -> {self.path}"
        left = [f"{counts[key]} {label}" for key, label in (("left_out_error", "with errors"),
                ("left_out_no_image", "without an image"), ("dropped_by_filter", "dropped by the step's filter"))
                if counts.get(key)]
        return (f"exported {counts['exported']} of {counts['rows']} rows -> {self.path}"
                + (f"; left out: {', '.join(left)}" if left else ""))


def export_step(step_file: str | os.PathLike, to: str, out: str | os.PathLike,
                image_columns: list[str] | None = None, **options: Any) -> ExportReport:
    """Write `step_file` in format `to` (one of `EXPORT_FORMATS`) at `out`.

    Args:
        step_file: a step's cache file (jsonl, json, csv or parquet).
        to: `hf` (a `save_to_disk` folder), `parquet` (one file), `llava` / `sharegpt` (a JSON
            file and its images folder; see `dataflowmm.export.conversations`).
        out: the folder or file to write.
        image_columns: columns holding images; detected from the values when `None`.
        options: the format's own: `conversation_column`, `text_column`, `prompt`, `link`
            for llava / sharegpt.
    """
    if to not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {to!r}")
    if to in ("hf", "parquet"):
        if options:
            raise TypeError(f"--to {to} takes no options, got {', '.join(sorted(options))}")
        return ExportReport(write_hf(step_file, to, out, image_columns))
    from dataflowmm.export.conversations import ConversationExport

    counts = ConversationExport(step_file, out, to, image_columns=image_columns, **options).write()
    return ExportReport(Path(out), counts)
