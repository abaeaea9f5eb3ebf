"""A step's rows on their way into a training set, streamed: which columns hold images,
where each image's bytes are, and which rows are left out and why.

Every exporter reads a step through `TrainingRows`, so they agree on what is exported:
rows with an `error` are left out, and so are rows without any image when the format
needs one; both are counted, beside the rows the step's filter dropped (from the step's
manifest). Images are passed on as their bytes (never decoded or re-encoded); a value
whose bytes are not an allowed image format stops the export naming the row and column.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataflowmm.io.dataset_entry import IMAGE_EXTENSIONS
from dataflowmm.io.images import (
    ImageReadError,
    check_image_bytes,
    check_image_file,
    looks_like_base64_image,
    looks_like_image_path,
)
from dataflowmm.io.records import iter_records

# Rows read to detect the image columns when none are given.
DETECTION_ROWS = 1000


def _is_image_value(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(item is None or _is_image_value(item) for item in value)
    return looks_like_base64_image(value) or looks_like_image_path(value)


def detect_image_columns(rows: list[dict]) -> list[str]:
    """Columns whose every non-empty value is an image (a path with an image extension, a
    base64 image, or a list of them). `*_path(s)` columns stay text: they name files."""
    columns: dict[str, bool] = {}
    for row in rows:
        for name, value in row.items():
            if value is None or value == []:
                columns.setdefault(name, False)
            else:
                columns[name] = columns.get(name, True) and _is_image_value(value)
    return [name for name, is_image in columns.items()
            if is_image and not name.endswith(("_path", "_paths"))]


@dataclass(frozen=True)
class ImageRef:
    """One image of a row: a file, or the bytes of a base64 value; `extension` from its header."""

    extension: str
    file: Path | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        return self.data if self.data is not None else self.file.read_bytes()


def image_ref(value: str, base_dir: Path, where: str) -> ImageRef:
    """The image a row's value names (a path relative to `base_dir`, or base64), its header
    checked; `where` names the row and column in errors."""
    if looks_like_base64_image(value):
        text = value.partition(",")[2] if value.startswith("data:") else value
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"{where}: malformed base64 image: {error}") from None
        try:
            found = check_image_bytes(data[:64], "base64 image")
        except ImageReadError as error:
            raise ValueError(f"{where}: {error}; nothing exported") from None
        return ImageRef(IMAGE_EXTENSIONS[found], data=data)
    path = base_dir / os.path.expanduser(value)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: image file {path} not found")
    try:
        found = check_image_file(path)  # the header only: the bytes are exported as they are
    except ImageReadError as error:
        raise ValueError(f"{where}: {error}; nothing exported") from None
    return ImageRef(IMAGE_EXTENSIONS[found], file=path)


def sample_key(row_index: int) -> str:
    """A row's name in every export (file and sample names): its index in the step file,
    zero-padded to nine digits, with no dots (webdataset splits keys at the first one)."""
    return f"{row_index:09d}"


@dataclass
class TrainingRow:
    """Row `index` of the step file and its images by column (a single value as a list of one);
    `images` is None for a row whose images were not read (`TrainingRows.iter_rows(skip_images=...)`)."""

    index: int
    row: dict
    images: dict[str, list[ImageRef]] | None = field(default_factory=dict)

    def image_list(self) -> list[ImageRef]:
        """Every image of the row, column by column."""
        return [image for images in self.images.values() for image in images]


class TrainingRows:
    """The exportable rows of `step_file`, streamed in file order.

    Args:
        step_file: a step's cache file (jsonl, json, csv or parquet).
        image_columns: columns holding images; detected from the first rows when `None`.
        require_image: leave out (and count) rows with no image in any image column.

    After iterating, `left_out` counts the rows not yielded by reason (`error`, `no_image`)
    and `dropped` is the number of rows the step's filter dropped before the file was written.
    """

    def __init__(self, step_file: str | os.PathLike, image_columns: list[str] | None = None,
                 require_image: bool = True):
        self.step_file = Path(step_file)
        self.base_dir = self.step_file.resolve().parent
        self.require_image = require_image
        if image_columns is None:
            image_columns = detect_image_columns(list(itertools.islice(iter_records(self.step_file),
                                                                       DETECTION_ROWS)))
        self.image_columns = list(image_columns)
        self.left_out: Counter[str] = Counter()
        self.dropped = _dropped_rows(self.step_file)
        self.rows_read = 0

    def __iter__(self) -> Iterator[TrainingRow]:
        return self.iter_rows()

    def iter_rows(self, skip_images: int = 0) -> Iterator[TrainingRow]:
        """The exportable rows in file order; the first `skip_images` of them come with `images`
        None, their images neither read nor checked (the rows a resumed export wrote before),
        but left-out rows are counted all the same."""
        self.left_out.clear()
        self.rows_read = 0
        seen_columns: set[str] = set()
        exported = 0
        for index, row in enumerate(iter_records(self.step_file)):
            self.rows_read += 1
            seen_columns.update(row)
            if row.get("error"):
                self.left_out["error"] += 1
                continue
            if exported < skip_images:
                if self.require_image and not any(_names_image(row.get(name)) for name in self.image_columns):
                    self.left_out["no_image"] += 1
                    continue
                exported += 1
                yield TrainingRow(index, row, None)
                continue
            images = {name: self._images(row.get(name), f"{self.step_file}: row {index}, column {name!r}")
                      for name in self.image_columns}
            if self.require_image and not any(images.values()):
                self.left_out["no_image"] += 1
                continue
            exported += 1
            yield TrainingRow(index, row, images)
        missing = [name for name in self.image_columns if self.rows_read and name not in seen_columns]
        if missing:
            raise KeyError(f"{self.step_file}: no row has column {missing[0]!r}")

    def _images(self, value: Any, where: str) -> list[ImageRef]:
        if value is None:
            return []
        if isinstance(value, list):
            return [image_ref(item, self.base_dir, f"{where}[{position}]")
                    for position, item in enumerate(value) if item is not None]
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected an image path or base64 image, got {value!r}")
        return [image_ref(value, self.base_dir, where)]

    def counts(self) -> dict[str, int]:
        """What the export took and left (after iterating): for the CLI's line and stats files."""
        exported = self.rows_read - sum(self.left_out.values())
        return {"rows": self.rows_read, "exported": exported, "left_out_error": self.left_out["error"],
                "left_out_no_image": self.left_out["no_image"], "dropped_by_filter": self.dropped}


def _names_image(value: Any) -> bool:
    """Whether a row's value names an image (what `TrainingRows._images` would find, unread)."""
    return value is not None and (not isinstance(value, list) or any(item is not None for item in value))


def _dropped_rows(step_file: Path) -> int:
    """Rows the step's filter dropped, from the manifest beside the cache file (0 if none)."""
    manifest = step_file.with_name(f"{step_file.stem}.manifest.json")
    try:
        return int(json.loads(manifest.read_text(encoding="utf-8")).get("rows_dropped", 0))
    except (OSError, ValueError, TypeError):
        return 0


# Where a row's text is looked for when no column is named: the first of these the rows have.
TEXT_COLUMNS = ("caption", "text", "prompt", "answer", "instruction", "question")


def text_column_of(rows: list[dict]) -> str | None:
    """The first of `TEXT_COLUMNS` holding a non-empty string in any of `rows`."""
    for name in TEXT_COLUMNS:
        if any(isinstance(row.get(name), str) and row[name].strip() for row in rows):
            return name
    return None
