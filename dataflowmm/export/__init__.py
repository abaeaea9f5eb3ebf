"""A step's cache file as a training set: Hugging Face datasets and parquet with `Image()`
columns (`hf`), LLaVA / ShareGPT conversation JSON (`llava`), WebDataset tar shards
(`webdataset`). `dataflowmm export STEP --to FORMAT OUT` calls `export_step`."""

from __future__ import annotations

import os
from pathlib import Path

from dataflowmm.export.hf import to_hf_dataset, write_hf
from dataflowmm.export.training_rows import TrainingRows, detect_image_columns
from dataflowmm.export.webdataset import DEFAULT_SHARD_SIZE, write_webdataset

EXPORT_FORMATS = ("hf", "parquet", "webdataset")

__all__ = ["EXPORT_FORMATS", "TrainingRows", "detect_image_columns", "export_step", "to_hf_dataset"]


def export_step(step_file: str | os.PathLike, to: str, out: str | os.PathLike,
                image_columns: list[str] | None = None, *, shard_size: int = DEFAULT_SHARD_SIZE,
                text_column: str | None = None) -> Path:
    """Write `step_file` in format `to` (one of `EXPORT_FORMATS`) at `out`; returns `out`.

    `shard_size` (samples per tar) and `text_column` (each sample's `.txt`) apply to
    `webdataset` only (`dataflowmm.export.webdataset`)."""
    if to not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {to!r}")
    if to == "webdataset":
        return write_webdataset(step_file, out, image_columns, shard_size=shard_size, text_column=text_column)
    return write_hf(step_file, to, out, image_columns)
