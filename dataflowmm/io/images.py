"""Reading, writing and naming images; base64 transport."""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from dataflowmm.io.atomic import atomic_file


class ImageReadError(ValueError):
    """An image that could not be read, with the path and the reason."""


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB mode (itself when it already is)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB, fully decoded (so a truncated file fails here)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from error


def image_file_name(row_id: str, *indices: int) -> str:
    """File name for a generated image: the row identity and candidate indices.

    Never derived from prompt text, so non-ASCII, long or duplicate prompts never collide.
    """
    return "_".join([row_id, *(str(index) for index in indices)]) + ".png"


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write `image` as PNG atomically (temp file in the same folder, then rename).

    No fsync: images are cheap to regenerate, and per-file fsyncs cost throughput.
    """
    with atomic_file(path, fsync=False) as file:
        image.save(file, format="PNG")
    return Path(path)


def encode_base64(image: Image.Image, image_format: str = "PNG") -> str:
    """An image as a base64 string (distilabel's way of carrying images inside rows)."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_base64(text: str) -> Image.Image:
    """Inverse of `encode_base64`; also accepts `data:image/...;base64,` URIs."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image)
    except (binascii.Error, UnidentifiedImageError, OSError) as error:
        raise ImageReadError(f"cannot decode base64 image: {error}") from error


def base64_to_files(values: list[str | None], save_dir: str | os.PathLike, stem: str = "image") -> list[str | None]:
    """Decode a base64 column into PNG files named `{stem}_{index}.png`; returns their paths."""
    paths: list[str | None] = []
    for index, value in enumerate(values):
        if not value:
            paths.append(None)
            continue
        paths.append(str(save_png(decode_base64(value), Path(save_dir) / f"{stem}_{index}.png")))
    return paths
