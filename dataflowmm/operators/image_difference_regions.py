"""ImageDifferenceRegions: boxes around what changed between two images, with no model.

Data-Juicer's difference captioner needs boxes from a detector run in another op (FastSAM).
For pairs that differ by edits (a shape moved, recoloured or added, an inpainted patch) the
pixels already say where: this operator proposes those boxes, in the captioner's format, so
`ImageDifferenceRegions -> DifferenceCaptioner` works on bare image pairs.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from dataflowmm.checks import check_positive_int
from dataflowmm.contract import Input, Operator, Output, StepContext
from dataflowmm.io.images import ImageReadError, load_image
from dataflowmm.operators.boxes import Box, corners_to_box


def load_pair(row: dict, key1: str, key2: str) -> tuple[Image.Image, Image.Image]:
    """Both images of a row as RGB, the second resized to the first's size.

    ValueError naming the key when a path is missing or an image cannot be read.
    """
    images = []
    for key in (key1, key2):
        path = row.get(key)
        if not isinstance(path, str) or not path:
            raise ValueError(f"key {key!r}: expected an image path, got {path!r}")
        try:
            images.append(load_image(path))
        except ImageReadError as error:
            raise ValueError(f"key {key!r}: {error}") from None
    first, second = images
    if second.size != first.size:
        second = second.resize(first.size, Image.Resampling.BILINEAR)
    return first, second


def difference_mask(first: Image.Image, second: Image.Image, threshold: float, blur_size: int) -> np.ndarray:
    """Changed pixels: areas whose difference `max(|dY|, |dCb| / 2, |dCr| / 2)` (0-255) exceeds
    `threshold` somewhere, taken where it exceeds `threshold / 2`.

    Both images are averaged first, luma over `blur_size` x `blur_size` windows and chroma over
    windows twice as wide: JPEG keeps chroma at half resolution, so its noise is colour bleeding
    along edges and ringing, which local averages cancel while real edits, areas, stay.
    """
    from scipy import ndimage

    a = np.asarray(first.convert("YCbCr"), dtype=np.float32)
    b = np.asarray(second.convert("YCbCr"), dtype=np.float32)
    raw = np.maximum.reduce([weight * np.abs(a[..., c] - b[..., c]) for c, weight in ((0, 1.0), (1, 0.5), (2, 0.5))])
    diffs = []
    for channel, window, weight in ((0, blur_size, 1.0), (1, 2 * blur_size, 0.5), (2, 2 * blur_size, 0.5)):
        pa, pb = a[..., channel], b[..., channel]
        if window > 1:
            pa = ndimage.uniform_filter(pa, size=window, mode="nearest")
            pb = ndimage.uniform_filter(pb, size=window, mode="nearest")
        diffs.append(weight * np.abs(pa - pb))
    difference = np.maximum.reduce(diffs)
    # Hysteresis (as in Canny): an area counts when it reaches `threshold` somewhere; its
    # extent is where it exceeds half of it, so low-contrast edits are not cut short.
    labels, _ = ndimage.label(difference > threshold / 2)
    strong = np.unique(labels[difference > threshold])
    # Averaging widens an area by half a window: its pixels are those that differ themselves.
    return np.isin(labels, strong[strong > 0]) & (raw > threshold / 2)


def mask_boxes(mask: np.ndarray, merge_distance: int) -> list[tuple[int, int, int, int]]:
    """Corners (x1, y1, x2, y2) of the connected changed areas, fragments closer than
    `merge_distance` pixels joined, overlapping boxes merged."""
    from scipy import ndimage

    joined = ndimage.binary_dilation(mask, iterations=merge_distance) if merge_distance > 0 else mask
    labels, _ = ndimage.label(joined)
    # Boxes of the changed pixels themselves, grouped by the dilated components.
    slices = ndimage.find_objects(labels * mask)
    corners = [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in slices if s is not None]
    return merge_overlapping(corners)


def merge_overlapping(corners: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Boxes replaced by their union wherever two overlap, until none do."""
    boxes = list(corners)
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    boxes[i] = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return boxes


class ImageDifferenceRegions(Operator):
    r"""
    Propose region boxes for image pairs from their pixel differences.

    The second image is resized to the first's size; the largest per-channel absolute
    difference is averaged over a small window and thresholded; connected areas (joined
    across gaps of `merge_distance` pixels) become boxes, overlapping boxes are merged and
    boxes smaller than `min_area_ratio` of the image are dropped. Boxes are written as
    Data-Juicer's `bbox_tag`: `[cx, cy, w, h]` in pixels of the first image, largest first.
    Identical pairs get `[]`. A row with a missing or unreadable image is kept with its `error`.

    Args:
        threshold (`float`, *optional*, defaults to 30):
            Smallest averaged channel difference (0-255) that counts as a change. JPEG noise at
            quality 75 stays well below 30; lower it for subtle edits.
        blur_size (`int`, *optional*, defaults to 3):
            Side of the averaging window (1 = none).
        merge_distance (`int`, *optional*, defaults to 2):
            Changed areas closer than this many pixels form one region.
        min_area_ratio (`float`, *optional*, defaults to 0.0005):
            Boxes covering less than this fraction of the image are dropped.
        max_regions (`int`, *optional*):
            Keep only the largest this many boxes.
        input_batch_size (`int`, *optional*, defaults to 16):
            Rows per batch (no model: it only sets how often progress is reported).
        save_interval (`int`, *optional*, defaults to 50):
            Rows between checkpoints.
        strict (`bool`, *optional*, defaults to `False`):
            Raise on the first row that cannot be processed.
    """

    columns = [
        Input("image1", "input_image1_key", "image_path1", "column with the first image path of a pair",
              images=True),
        Input("image2", "input_image2_key", "image_path2", "column with the second image path of a pair",
              images=True),
        Output("output", "output_bbox_key", "bbox_tag", "column receiving the boxes (`[[cx, cy, w, h], ...]`, "
               "pixels of image 1)", empty=[]),
    ]

    def __init__(
        self,
        *,
        threshold: float = 16.0,
        blur_size: int = 4,
        merge_distance: int = 2,
        min_area_ratio: float = 0.0005,
        max_regions: int | None = None,
        input_batch_size: int = 16,
        save_interval: int = 50,
        strict: bool = False,
    ):
        if not 0 <= threshold < 255:
            raise ValueError(f"threshold must be in [0, 255), got {threshold!r}")
        check_positive_int("blur_size", blur_size)
        if isinstance(merge_distance, bool) or not isinstance(merge_distance, int) or merge_distance < 0:
            raise ValueError(f"merge_distance must be an int >= 0, got {merge_distance!r}")
        if not 0 <= min_area_ratio < 1:
            raise ValueError(f"min_area_ratio must be in [0, 1), got {min_area_ratio!r}")
        if max_regions is not None:
            check_positive_int("max_regions", max_regions)
        check_positive_int("input_batch_size", input_batch_size)
        self.threshold = float(threshold)
        self.blur_size = blur_size
        self.merge_distance = merge_distance
        self.min_area_ratio = float(min_area_ratio)
        self.max_regions = max_regions

    def regions(self, first: Image.Image, second: Image.Image) -> list[Box]:
        """The difference boxes of one pair (`second` already at `first`'s size), largest first."""
        mask = difference_mask(first, second, self.threshold, self.blur_size)
        corners = mask_boxes(mask, self.merge_distance)
        smallest = self.min_area_ratio * mask.size
        boxes = [corners_to_box(*c) for c in corners if (c[2] - c[0]) * (c[3] - c[1]) >= smallest]
        boxes.sort(key=lambda box: (-box[2] * box[3], box[1], box[0]))
        return boxes[: self.max_regions] if self.max_regions else boxes

    def process_batch(self, rows: list[dict], row_ids: list[str], context: StepContext) -> list[dict]:
        out = []
        for offset, row in enumerate(rows):
            try:
                first, second = load_pair(row, self.keys.image1, self.keys.image2)
            except ValueError as error:
                out.append(self.row_failed(row, str(error), offset))
                continue
            out.append({**row, self.keys.output: self.regions(first, second)})
        return out


__all__ = ["ImageDifferenceRegions", "load_pair"]
