"""Filters on what an image's header says: `ImageSizeFilter`, `ImageShapeFilter`,
`ImageAspectRatioFilter`.

Data-Juicer's `image_size_filter`, `image_shape_filter` and `image_aspect_ratio_filter`:
their parameter names, defaults and inclusive bounds, and the `any`/`all` strategy over a
row's images. No pixel is decoded: a file's size comes from the file system (an inline base64
image's from its decoded bytes) and width and height from the image's header, read through
the project's one safe opener (allowed formats only, decompression-bomb limit).

Rows without images are kept, as in Data-Juicer; a row whose image cannot be read is kept with
its `error` set, never dropped. Dropped rows are counted, and written with the measured value
and the bound it broke to `{output}.dropped.jsonl` with `keep_dropped=True`. With
`output_stats_key=` on `run`, kept and dropped rows also get the value measured for each image
(Data-Juicer's stats: `image_sizes`, `image_width`/`image_height`, `aspect_ratios`).
"""

from __future__ import annotations

import re
import sys
from abc import abstractmethod
from typing import Any

from dataflowmm.contract import Input, Operator, Output, StepContext
from dataflowmm.io.images import ImageHeader, ImageReadError, read_image_header
from dataflowmm.operators.sample_format import row_image_paths

STRATEGIES = ("any", "all")
# Data-Juicer's units (`size_to_bytes`): powers of 1024 whether written KB or KiB, any case.
_UNITS = {"": 0, "b": 0, **{f"{p}{s}": 10 * (i + 1) for i, p in enumerate("kmgtpezy") for s in ("b", "ib")}}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*([a-z]*)\s*", re.IGNORECASE)
RATIO_DECIMALS = 4  # aspect ratios written into rows and reasons


def size_to_bytes(size: str | int, name: str = "size") -> int:
    """Bytes in a size such as `"10KB"`, `"1.5MiB"` or `"4096"`, as Data-Juicer reads it (units
    K, M, G, T, P, E, Z, Y with B or iB, any case, all powers of 1024; no unit: bytes).

    Raises:
        ValueError: naming the parameter `name`, for a negative size or an unknown unit.
    """
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return size
    match = _SIZE.fullmatch(size) if isinstance(size, str) else None
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{name} must be a size like '4096', '10KB' or '1MiB' (units "
                         f"{', '.join(u.upper() for u in _UNITS if u.endswith('b') and len(u) == 2)}, "
                         f"or the same with iB), got {size!r}")
    # Data-Juicer drops a decimal point ("1.5MB" becomes 15 MB); the number is read as written here.
    return int(float(match.group(1)) * (1 << _UNITS[match.group(2).lower()]))


class _ImageHeaderFilter(Operator):
    """Keeps rows whose images' measured values are within bounds for any/all images.

    Subclasses say whether an image's header is within bounds (`_why_outside`: None when it
    is, else the value and the bound it breaks) and what goes into the stats column (`_stat`).
    """

    columns = [
        Input("image", "input_image_key", "images", "column with each row's image path or list of paths",
              images=True),
        Output("stats", "output_stats_key", None, "if set, kept (and dropped) rows also get the value "
               "measured for each image here", empty=None),
    ]
    default_input_batch_size = 256  # rows per batch: header reads are cheap
    reads_pixels = True  # the verdict needs width and height (else the file's first bytes do)

    def __init__(self, *, any_or_all: str, input_batch_size: int | None):
        # keep_dropped, save_interval and strict are read from the recorded arguments.
        if any_or_all not in STRATEGIES:
            raise ValueError(f"any_or_all must be 'any' or 'all', got {any_or_all!r}")
        if input_batch_size is not None and input_batch_size < 1:
            raise ValueError(f"input_batch_size must be a positive number of rows, got {input_batch_size}")
        self.any_or_all = any_or_all

    @abstractmethod
    def _why_outside(self, header: ImageHeader) -> str | None:
        """What puts an image outside the kept range (value and bound), or None."""

    @abstractmethod
    def _stat(self, header: ImageHeader) -> Any:
        """The image's measured value as written into the stats column."""

    def _headers(self, row: dict) -> list[ImageHeader]:
        key = self.keys.image
        headers = []
        for index, path in enumerate(row_image_paths(row.get(key), key)):
            try:
                header = read_image_header(path, pixels=self.reads_pixels)
            except (ImageReadError, OSError) as error:
                raise ValueError(f"key {key!r}: {error}") from None
            if self.reads_pixels and min(header.size) < 1:  # a crafted header; no ratio to take
                raise ValueError(f"key {key!r}: image {index} has no pixels ({header.size[0]}x{header.size[1]})")
            headers.append(header)
        return headers

    def process_batch(self, rows: list[dict], row_ids: list[str], context: StepContext) -> list[dict]:
        out = []
        for offset, row in enumerate(rows):
            try:
                headers = self._headers(row)
            except ValueError as error:
                out.append(self.row_failed(row, str(error), offset))
                continue
            out.append(self._judged(row, headers))
        return out

    def _judged(self, row: dict, headers: list[ImageHeader]) -> dict:
        if self.keys.stats:
            row = {**row, self.keys.stats: [self._stat(header) for header in headers]}
        if not headers:
            return row
        reasons = [self._why_outside(header) for header in headers]
        inside = [reason is None for reason in reasons]
        if any(inside) if self.any_or_all == "any" else all(inside):
            return row
        several = len(headers) > 1
        shown = "; ".join(f"image {index}: {reason}" if several else reason
                          for index, reason in enumerate(reasons) if reason is not None)
        return self.drop_row(row, f"{shown} ({self.any_or_all})")


def _outside(label: str, value: Any, low: Any, high: Any, low_name: str, high_name: str) -> str | None:
    """`"{label} {value} < {low_name} {low}"` (or `>` the high bound), None within (inclusive)."""
    if value < low:
        return f"{label} {value} < {low_name} {low}"
    if value > high:
        return f"{label} {value} > {high_name} {high}"
    return None


class ImageSizeFilter(_ImageHeaderFilter):
    """Keep rows whose image files' sizes in bytes lie in `[min_size, max_size]` (Data-Juicer's
    `image_size_filter`).

    Reads no pixel: a file's size comes from the file system (its first bytes are checked to be
    an allowed image format), an inline base64 image's from its decoded bytes.

    Args:
        min_size, max_size: the kept range, inclusive, as `"4096"`, `"10KB"` or `"1MiB"` (units
            K, M, G, T, P, E, Z, Y with B or iB, any case, all powers of 1024, as Data-Juicer)
            or an int of bytes; default `"0"` to `"1TB"`.
        any_or_all: `"any"`: one image in range keeps the row; `"all"`: every image must be.
        keep_dropped: write dropped rows, with the reason, to `{output}.dropped.jsonl`.
        input_batch_size: rows per batch (default 256).
        save_interval: rows between checkpoints; a killed run resumes from the last one.
        strict: raise on the first row whose images cannot be read.

    `run(output_stats_key=...)` also writes each image's size in bytes (a list per row).
    """

    reads_pixels = False

    def __init__(self, min_size: str | int = "0", max_size: str | int = "1TB", any_or_all: str = "any", *,
                 keep_dropped: bool = False, input_batch_size: int | None = None, save_interval: int = 50,
                 strict: bool = False):
        super().__init__(any_or_all=any_or_all, input_batch_size=input_batch_size)
        self.min_bytes = size_to_bytes(min_size, "min_size")
        self.max_bytes = size_to_bytes(max_size, "max_size")
        if self.min_bytes > self.max_bytes:
            raise ValueError(f"min_size ({min_size!r}: {self.min_bytes} bytes) must not exceed "
                             f"max_size ({max_size!r}: {self.max_bytes} bytes)")
        # The bounds as the user wrote them, with their bytes when a unit was used.
        self.shown = [str(size) if str(size).strip().isdigit() else f"{size} ({count} bytes)"
                      for size, count in ((min_size, self.min_bytes), (max_size, self.max_bytes))]

    def _why_outside(self, header: ImageHeader) -> str | None:
        if header.nbytes < self.min_bytes:
            return f"size {header.nbytes} bytes < min_size {self.shown[0]}"
        if header.nbytes > self.max_bytes:
            return f"size {header.nbytes} bytes > max_size {self.shown[1]}"
        return None

    def _stat(self, header: ImageHeader) -> int:
        return header.nbytes


class ImageShapeFilter(_ImageHeaderFilter):
    """Keep rows whose images' width and height lie in `[min_width, max_width]` and
    `[min_height, max_height]` (Data-Juicer's `image_shape_filter`).

    Width and height come from the image's header; no pixel is decoded.

    Args:
        min_width, max_width, min_height, max_height: the kept ranges in pixels, inclusive
            (default 1 to `sys.maxsize`).
        any_or_all: `"any"`: one image in range keeps the row; `"all"`: every image must be.
        keep_dropped, input_batch_size, save_interval, strict: as for `ImageSizeFilter`.

    `run(output_stats_key=...)` also writes each image's `[width, height]` (a list per row).
    """

    def __init__(self, min_width: int = 1, max_width: int = sys.maxsize, min_height: int = 1,
                 max_height: int = sys.maxsize, any_or_all: str = "any", *, keep_dropped: bool = False,
                 input_batch_size: int | None = None, save_interval: int = 50, strict: bool = False):
        super().__init__(any_or_all=any_or_all, input_batch_size=input_batch_size)
        _check_range(min_width, max_width, "min_width", "max_width", integer=True)
        _check_range(min_height, max_height, "min_height", "max_height", integer=True)
        self.widths = (min_width, max_width)
        self.heights = (min_height, max_height)

    def _why_outside(self, header: ImageHeader) -> str | None:
        width, height = header.size
        return (_outside("width", width, *self.widths, "min_width", "max_width")
                or _outside("height", height, *self.heights, "min_height", "max_height"))

    def _stat(self, header: ImageHeader) -> list[int]:
        return list(header.size)


class ImageAspectRatioFilter(_ImageHeaderFilter):
    """Keep rows whose images' aspect ratio, width / height, lies in `[min_ratio, max_ratio]`
    (Data-Juicer's `image_aspect_ratio_filter`).

    Width and height come from the image's header; no pixel is decoded.

    Args:
        min_ratio, max_ratio: the kept range of width / height, inclusive (default 0.333 to 3.0).
        any_or_all: `"any"`: one image in range keeps the row; `"all"`: every image must be.
        keep_dropped, input_batch_size, save_interval, strict: as for `ImageSizeFilter`.

    `run(output_stats_key=...)` also writes each image's ratio, rounded to 4 decimals (a list per
    row); the bounds are compared with the exact ratio.
    """

    def __init__(self, min_ratio: float = 0.333, max_ratio: float = 3.0, any_or_all: str = "any", *,
                 keep_dropped: bool = False, input_batch_size: int | None = None, save_interval: int = 50,
                 strict: bool = False):
        super().__init__(any_or_all=any_or_all, input_batch_size=input_batch_size)
        _check_range(min_ratio, max_ratio, "min_ratio", "max_ratio", integer=False)
        self.min_ratio, self.max_ratio = min_ratio, max_ratio

    def _why_outside(self, header: ImageHeader) -> str | None:
        width, height = header.size
        ratio = width / height
        # Compared exactly, shown rounded with the size it comes from.
        shown = f"{ratio:.{RATIO_DECIMALS}f} ({width}x{height})"
        if ratio < self.min_ratio:
            return f"aspect ratio {shown} < min_ratio {self.min_ratio}"
        if ratio > self.max_ratio:
            return f"aspect ratio {shown} > max_ratio {self.max_ratio}"
        return None

    def _stat(self, header: ImageHeader) -> float:
        width, height = header.size
        return round(width / height, RATIO_DECIMALS)


def _check_range(low: Any, high: Any, low_name: str, high_name: str, *, integer: bool) -> None:
    """ValueError naming the parameter for a bound of the wrong type, a negative one, or low > high."""
    kinds = (int,) if integer else (int, float)
    for value, name in ((low, low_name), (high, high_name)):
        if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
            kind = "an int" if integer else "a number"
            raise ValueError(f"{name} must be {kind} >= 0, got {value!r}")
    if low > high:
        raise ValueError(f"{low_name} ({low}) must not exceed {high_name} ({high})")
