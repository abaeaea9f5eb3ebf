"""A step's cache file as a training set: Hugging Face datasets and parquet with `Image()`
columns (`hf`, `parquet`), LLaVA / ShareGPT conversation JSON (`llava`, `sharegpt`).
`dataflowmm export STEP --to FORMAT OUT` calls `export_step`."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataflowmm.export.hf import to_hf_dataset, write_hf
from dataflowmm.export.training_rows import TrainingRows, detect_image_columns
from dataflowmm.export.webdataset import STATS_FILE, write_webdataset
from dataflowmm.io.remote import is_url, url_parent
from dataflowmm.store import fetch_step_copy, publish_folder

EXPORT_FORMATS = ("hf", "parquet", "llava", "sharegpt", "webdataset")

__all__ = ["EXPORT_FORMATS", "ExportReport", "TrainingRows", "detect_image_columns", "export_step",
           "to_hf_dataset"]


@dataclass(frozen=True)
class ExportReport:
    """Where an export went and, for the training formats, what it took and left out."""

    path: Path | str  # a URL when exported to a store
    counts: dict[str, int] = field(default_factory=dict)
    note: str = ""  # how it was written, e.g. "3 shards, resumed: 2 finished shard(s) kept"

    def summary(self) -> str:
        counts = self.counts
        if not counts:
            return f"exported -> {self.path}"
        left = [f"{counts[key]} {label}" for key, label in (("left_out_error", "with errors"),
                ("left_out_no_image", "without an image"), ("dropped_by_filter", "dropped by the step's filter"))
                if counts.get(key)]
        return (f"exported {counts['exported']} of {counts['rows']} rows -> {self.path}"
                + (f" ({self.note})" if self.note else "") + (f"; left out: {', '.join(left)}" if left else ""))


def export_step(step_file: str | os.PathLike, to: str, out: str | os.PathLike,
                image_columns: list[str] | None = None, **options: Any) -> ExportReport:
    """Write `step_file` in format `to` (one of `EXPORT_FORMATS`) at `out`.

    Args:
        step_file: a step's cache file (jsonl, json, csv or parquet).
        to: `hf` (a `save_to_disk` folder), `parquet` (one file), `llava` / `sharegpt` (a JSON
            file and its images folder; `dataflowmm.export.conversations`), `webdataset` (a
            folder of tar shards; `dataflowmm.export.webdataset`).
        out: the folder or file to write.
        image_columns: columns holding images; detected from the values when `None`.
        options: `storage_options` for URLs in `step_file` and `out` (a step on a store is
            read through a local copy; an export to a store is written locally, then sent);
            the format's own: `conversation_column`, `text_column`, `prompt`, `link` for
            llava / sharegpt; `shard_size`, `text_column` for webdataset.
    """
    if to not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {to!r}")
    storage_options = options.pop("storage_options", None)  # for URLs in step_file and out
    if is_url(os.fspath(step_file)):  # read from a local copy of the step and its images
        step_file = fetch_step_copy(os.fspath(step_file), storage_options)
    if is_url(os.fspath(out)):  # written locally, then sent to the store object by object
        target = os.fspath(out)
        with tempfile.TemporaryDirectory(prefix="dataflowmm-export-") as staging:
            local = Path(staging) / target.rstrip("/").rsplit("/", 1)[-1]
            report = export_step(step_file, to, local, image_columns, **options)
            publish_folder(local.parent if to in ("llava", "sharegpt") else local,
                           url_parent(target) if to in ("llava", "sharegpt") else target, storage_options)
        return ExportReport(target, report.counts, report.note)  # type: ignore[arg-type]
    if to in ("hf", "parquet"):
        if options:
            raise TypeError(f"--to {to} takes no options, got {', '.join(sorted(options))}")
        return ExportReport(write_hf(step_file, to, out, image_columns))
    if to == "webdataset":
        return _webdataset_report(write_webdataset(step_file, out, image_columns, **options))
    from dataflowmm.export.conversations import ConversationExport

    counts = ConversationExport(step_file, out, to, image_columns=image_columns, **options).write()
    return ExportReport(Path(out), counts)


def _webdataset_report(out: Path) -> ExportReport:
    stats = json.loads((out / STATS_FILE).read_text(encoding="utf-8"))
    resumed = stats["resumed_shards"]
    how = f"resumed: {resumed} finished shard(s) kept" if resumed else "written from the start"
    counts = {key: stats[key] for key in ("rows", "exported", "left_out_error", "left_out_no_image",
                                          "dropped_by_filter")}
    return ExportReport(out, counts, f"{stats['shards']} shards, {how}")
