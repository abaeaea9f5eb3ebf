"""The shapes world: a deterministic toy dataset of one coloured shape on a plain background.

Every image is 32x32 RGB: one circle, square or triangle in one of six colours on a plain
background of another colour, at a random size and position, drawn at 4x and box-filtered
down so edges are anti-aliased. Its caption names all three attributes ("a red circle on a
blue background"): 3 shapes x 6 colours x 5 backgrounds = 90 captions. Sample `i` of seed
`s` is the same on every machine, so tests, benchmarks, the demo and the trained
`shapes-*` tiny models all draw from one reproducible world.

The world is small enough that a model trained on it for a minute or two on a CPU gets
its answers right, which makes it checkable: `judge_image` reads the shape and colours
back from pixels, with no model at all.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from dataflowmm.io.atomic import atomic_write_text
from dataflowmm.io.images import save_png
from dataflowmm.seeds import derive_seed

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "white": (240, 240, 240),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
IMAGE_SIZE = 32
# Seeds of the standard splits; the trained models hold the held-out split back.
TRAIN_SEED = 0
HELD_OUT_SEED = 1

# Fill ratio of each shape within its own extent (area / (width x height)); the pixel
# judge tells shapes apart by it.
_FILL_RATIOS = {"triangle": 0.5, "circle": np.pi / 4, "square": 1.0}
# RGB distance from the background-to-shape colour line beyond which a pixel is a third colour.
_OFF_LINE_DISTANCE = 60.0


def caption_for(shape: str, colour: str, background: str) -> str:
    """The caption of an image: "a {colour} {shape} on a {background} background"."""
    return f"a {colour} {shape} on a {background} background"


def all_captions() -> list[str]:
    """The 90 captions of the world, in a fixed order (shape, colour, background)."""
    return [
        caption_for(shape, colour, background)
        for shape in SHAPES
        for colour in COLOUR_NAMES
        for background in COLOUR_NAMES
        if background != colour
    ]


class ShapesSample(NamedTuple):
    """One sample of the world; unpacks as `image, caption, attributes`."""

    image: Image.Image
    caption: str
    attributes: dict


@dataclass(frozen=True)
class ShapesWorld:
    r"""
    Deterministic generator of shapes-world samples.

    Args:
        image_size (`int`, *optional*, defaults to 32):
            Width and height of the images in pixels.
        min_extent (`float`, *optional*, defaults to 0.375):
            Smallest shape width (and height), as a fraction of the image size.
        max_extent (`float`, *optional*, defaults to 0.75):
            Largest shape width (and height), as a fraction of the image size.
        jitter (`int`, *optional*, defaults to 12):
            Each colour channel of the shape and of the background is moved by up to this
            much, so colours are not exactly the palette's.
        supersampling (`int`, *optional*, defaults to 4):
            Shapes are drawn at this multiple of the size and box-filtered down.
    """

    image_size: int = IMAGE_SIZE
    min_extent: float = 0.375
    max_extent: float = 0.75
    jitter: int = 12
    supersampling: int = 4

    def sample(self, index: int, seed: int = TRAIN_SEED) -> ShapesSample:
        """Sample `index` of the split `seed`: the same image, caption and attributes every time.

        The attributes are `shape`, `colour`, `background` (names), `shape_rgb` and
        `background_rgb` (the jittered colours drawn), `extent` (shape width in pixels) and
        `center` (x, y in pixels).
        """
        rng = random.Random(derive_seed("shapes-world", seed, index))
        shape = rng.choice(SHAPES)
        colour = rng.choice(COLOUR_NAMES)
        background = rng.choice([name for name in COLOUR_NAMES if name != colour])
        scale = self.supersampling
        canvas = self.image_size * scale
        extent = rng.randint(round(self.min_extent * canvas), round(self.max_extent * canvas))
        # One clear pixel around the shape keeps the image border background only.
        margin = scale
        left = rng.randint(margin, canvas - margin - extent)
        top = rng.randint(margin, canvas - margin - extent)
        shape_rgb = self._jittered(COLOURS[colour], rng)
        background_rgb = self._jittered(COLOURS[background], rng)

        image = Image.new("RGB", (canvas, canvas), background_rgb)
        _draw_shape(ImageDraw.Draw(image), shape, (left, top, left + extent, top + extent), shape_rgb)
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BOX)
        attributes = {
            "shape": shape,
            "colour": colour,
            "background": background,
            "shape_rgb": list(shape_rgb),
            "background_rgb": list(background_rgb),
            "extent": extent / scale,
            "center": [(left + extent / 2) / scale, (top + extent / 2) / scale],
        }
        return ShapesSample(image, caption_for(shape, colour, background), attributes)

    def samples(self, count: int, seed: int = TRAIN_SEED, start: int = 0) -> list[ShapesSample]:
        """Samples `start` .. `start + count - 1` of the split `seed`."""
        return [self.sample(index, seed) for index in range(start, start + count)]

    def arrays(self, count: int, seed: int = TRAIN_SEED) -> tuple[np.ndarray, list[dict]]:
        """The first `count` samples of split `seed` as one (count, H, W, 3) uint8 array,
        with their attributes (for training loops)."""
        pixels = np.empty((count, self.image_size, self.image_size, 3), dtype=np.uint8)
        attributes = []
        for index in range(count):
            image, _, attrs = self.sample(index, seed)
            pixels[index] = np.asarray(image)
            attributes.append(attrs)
        return pixels, attributes

    def scene(self, index: int, seed: int = TRAIN_SEED, shapes: tuple[int, int] = (3, 5)) -> Image.Image:
        """Scene `index` of split `seed`: between `shapes[0]` and `shapes[1]` shapes (random kinds,
        colours, sizes and places, overlapping freely) on a plain background; no caption.

        One shape on a plain background leaves most of an image flat, so distinct samples can
        look alike to a perceptual hash; a few shapes make scenes that are really distinct
        (deduplication figures). The same image on every machine, as `sample`.
        """
        rng = random.Random(derive_seed("shapes-scene", seed, index))
        background = rng.choice(COLOUR_NAMES)
        scale = self.supersampling
        canvas = self.image_size * scale
        image = Image.new("RGB", (canvas, canvas), self._jittered(COLOURS[background], rng))
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(*shapes)):
            colour = rng.choice([name for name in COLOUR_NAMES if name != background])
            extent = rng.randint(round(self.min_extent * canvas), round(self.max_extent * canvas))
            left, top = rng.randint(0, canvas - extent), rng.randint(0, canvas - extent)
            _draw_shape(draw, rng.choice(SHAPES), (left, top, left + extent, top + extent),
                        self._jittered(COLOURS[colour], rng))
        return image.resize((self.image_size, self.image_size), Image.Resampling.BOX)

    def _jittered(self, rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
        return tuple(min(255, max(0, c + rng.randint(-self.jitter, self.jitter))) for c in rgb)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int],
                rgb: tuple[int, int, int]) -> None:
    # PIL boxes include their last pixel: one less on the right and bottom keeps the
    # shape exactly `extent` supersampled pixels wide.
    left, top, right, bottom = box[0], box[1], box[2] - 1, box[3] - 1
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=rgb)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=rgb)
    elif shape == "triangle":
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def write_shapes_dataset(
    folder: str | os.PathLike,
    count: int,
    seed: int = TRAIN_SEED,
    world: ShapesWorld | None = None,
    file_name: str = "shapes.jsonl",
    image_prefix: str = "",
    extra_columns: Callable[[int, dict], dict] | None = None,
) -> Path:
    r"""
    Write a toy image-text dataset: `count` PNG images and one jsonl row per image.

    Each row has `images` (a one-element list, relative to the jsonl file), `text` (the
    caption) and the sample's attributes (`shape`, `colour`, `background`, ...), so it
    feeds `FileStorage` and the operators directly.

    Args:
        folder (`str` or `os.PathLike`):
            Where to write `file_name` and the `images/` folder (created if missing).
        count (`int`):
            Number of samples.
        seed (`int`, *optional*, defaults to 0):
            The split to draw from (`TRAIN_SEED` 0, `HELD_OUT_SEED` 1, or any other).
        world (`ShapesWorld`, *optional*):
            The generator; the default world when `None`.
        file_name (`str`, *optional*, defaults to `"shapes.jsonl"`):
            Name of the jsonl file inside `folder`.
        image_prefix (`str`, *optional*, defaults to `""`):
            Start of each image's file name (`images/{image_prefix}{seed}_{index:06d}.png`).
        extra_columns (`Callable`, *optional*):
            `extra_columns(index, attributes)` returns more columns for sample `index`'s row.

    Returns:
        `Path`: the jsonl file.
    """
    world = world or ShapesWorld()
    folder = Path(folder)
    rows = []
    for index in range(count):
        image, caption, attributes = world.sample(index, seed)
        relative = f"images/{image_prefix}{seed}_{index:06d}.png"
        save_png(image, folder / relative)
        rows.append({"images": [relative], "text": caption, **attributes,
                     **(extra_columns(index, attributes) if extra_columns else {})})
    path = folder / file_name
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


# --------------------------------------------------------------------------- pixel judge


def nearest_colour(rgb) -> str:
    """Name of the palette colour nearest to `rgb` (Euclidean distance in RGB)."""
    return COLOUR_NAMES[int(_palette_distances(np.asarray(rgb, dtype=np.float32)).argmin())]


def _palette_distances(pixels: np.ndarray) -> np.ndarray:
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    return np.linalg.norm(pixels[..., None, :] - palette, axis=-1)


def judge_image(image: Image.Image) -> dict:
    r"""
    Read the shape, its colour and the background colour back from an image's pixels.

    The background is the palette colour most of the border pixels are nearest to; the
    shape colour is the palette colour most other pixels are nearest to, background
    excluded. Each pixel's share of shape colour (its position between the background and
    shape colours) gives the shape's area and its width and height, and the shape is the one
    whose fill ratio (area / (width x height): triangle 0.5, circle 0.79, square 1) is nearest.
    Exact on shapes-world images; a fair, model-free judge of generated ones.

    Returns:
        `dict`: `colour`, `background` and `shape` (each `None` when no shape is found),
        and the `fill_ratio` measured.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    nearest = _palette_distances(pixels).argmin(axis=-1)
    border = np.concatenate([nearest[0], nearest[-1], nearest[1:-1, 0], nearest[1:-1, -1]])
    background = int(np.bincount(border, minlength=len(COLOURS)).argmax())
    inner = np.bincount(nearest.ravel(), minlength=len(COLOURS))
    inner[background] = 0
    found = {"colour": None, "background": COLOUR_NAMES[background], "shape": None, "fill_ratio": None}
    if inner.max() == 0:
        return found
    colour = int(inner.argmax())
    found["colour"] = COLOUR_NAMES[colour]
    share = _colour_share(pixels, nearest, background, colour)
    width, height = share.max(axis=0).sum(), share.max(axis=1).sum()
    if width * height > 0:
        fill = float(share.sum() / (width * height))
        found["fill_ratio"] = fill
        found["shape"] = min(_FILL_RATIOS, key=lambda name: abs(_FILL_RATIOS[name] - fill))
    return found


def _colour_share(pixels: np.ndarray, nearest: np.ndarray, background: int, colour: int) -> np.ndarray:
    """Per pixel, how far it lies from the background colour towards the shape colour, in [0, 1].

    The two colours are the image's own (medians of the pixels nearest to each palette
    colour), so jittered colours give exact 0s and 1s; anti-aliased edges get fractions.
    Pixels far from the line between the two colours (a third colour) count as background,
    and shares within 0.1 of 0 or 1 are snapped, so faint noise adds no area.
    """
    start = np.median(pixels[nearest == background], axis=0)
    direction = np.median(pixels[nearest == colour], axis=0) - start
    norm = float(direction @ direction)
    if norm < 1.0:
        return np.zeros(pixels.shape[:2], dtype=np.float32)
    offset = pixels - start
    share = (offset @ direction) / norm
    off_line = np.linalg.norm(offset - share[..., None] * direction, axis=-1)
    share[off_line > _OFF_LINE_DISTANCE] = 0.0
    return np.clip((share - 0.1) / 0.8, 0.0, 1.0)
