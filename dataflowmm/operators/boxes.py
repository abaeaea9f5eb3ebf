"""Region boxes of image pairs in Data-Juicer's format, and the arithmetic on them.

A box is `[centre x, centre y, width, height]` in pixels of the pair's first image (Data-Juicer's
`bbox_tag`, one box per row of an array). Crops and drawings use pixel corners clamped to the
image; prompts use normalised corners `[x1, y1, x2, y2]`.
"""

from __future__ import annotations

import math
from typing import Any

Box = list[float]  # [cx, cy, w, h] in pixels
Corners = tuple[int, int, int, int]  # (x1, y1, x2, y2), x2/y2 exclusive


def parse_boxes(value: Any, key: str) -> list[Box]:
    """The boxes of a row as lists of 4 floats; ValueError naming `key` and the box when malformed.

    `None` and `[]` are no boxes. Each box must be 4 finite numbers with width and height >= 0.
    """
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"key {key!r}: boxes must be a list of [cx, cy, w, h], got {type(value).__name__}")
    boxes = []
    for index, box in enumerate(value):
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise ValueError(f"key {key!r}: box {index} must be [cx, cy, w, h], got {box!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
            raise ValueError(f"key {key!r}: box {index} must hold 4 finite numbers, got {box!r}")
        if box[2] < 0 or box[3] < 0:
            raise ValueError(f"key {key!r}: box {index} has a negative width or height: {box!r}")
        boxes.append([float(v) for v in box])
    return boxes


def is_zero_box_list(boxes: list[Box]) -> bool:
    """Data-Juicer's "no box" marker: exactly one all-zero box."""
    return len(boxes) == 1 and not any(boxes[0])


def box_area(box: Box) -> float:
    return box[2] * box[3]


def clamped_corners(box: Box, size: tuple[int, int], grow: float = 0.0) -> Corners:
    """Pixel corners of `box` grown by `grow` on every side, clamped to an image of `size` (w, h)."""
    cx, cy, w, h = box
    width, height = size
    x1 = max(0, math.floor(cx - w / 2 - grow))
    y1 = max(0, math.floor(cy - h / 2 - grow))
    x2 = min(width, math.ceil(cx + w / 2 + grow))
    y2 = min(height, math.ceil(cy + h / 2 + grow))
    return x1, y1, max(x1, x2), max(y1, y2)


def is_empty(corners: Corners) -> bool:
    return corners[2] <= corners[0] or corners[3] <= corners[1]


def normalised_corners(box: Box, size: tuple[int, int]) -> list[float]:
    """`[x1, y1, x2, y2]` in [0, 1] of the image, rounded to 2 decimals (Data-Juicer's prompt form)."""
    cx, cy, w, h = box
    width, height = size
    values = [(cx - w / 2) / width, (cy - h / 2) / height, (cx + w / 2) / width, (cy + h / 2) / height]
    return [round(min(1.0, max(0.0, v)), 2) for v in values]


def corners_to_box(x1: float, y1: float, x2: float, y2: float) -> Box:
    """`[cx, cy, w, h]` of pixel corners (x2/y2 exclusive)."""
    return [(x1 + x2) / 2, (y1 + y2) / 2, float(x2 - x1), float(y2 - y1)]


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two `[cx, cy, w, h]` boxes."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0
