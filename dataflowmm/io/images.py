"""Reading, writing and naming images; base64 transport."""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from dataflowmm.io.carried_files import provided_bytes, written_file
from dataflowmm.io.remote import as_location, is_url, read_url_bytes

MAX_IMAGE_BYTES = 256 << 20  # an image object read from a URL larger than this is refused


class ImageReadError(ValueError):
    """An image that could not be read, with the path and the reason."""


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB mode (itself when it already is)."""
    return image if image.mode == "RGB" else image.convert("RGB")


# -- the one safe opener: every image dataflowmm reads goes through `open_image` ---------------

# Pillow's names of the formats read. MPO is how Pillow opens many phone JPEGs (JPEG's
# plugin hands them over). Every other format Pillow knows is refused before its plugin
# runs: some shell out (EPS runs Ghostscript), others parse rarely used containers.
ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF")
_OPEN_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # the plugins Image.open may try
_NOT_IMAGES = ((b"%PDF", "PDF"), (b"%!PS", "PostScript"), (b"<?xml", "XML/SVG"), (b"<svg", "SVG"),
               (b"PK\x03\x04", "ZIP"), (b"\x7fELF", "ELF executable"))


def _format_name(header: bytes) -> str | None:
    """Pillow's name of the format `header` starts with (its plugins' own header checks,
    which look at bytes only), else a few well-known non-image formats, else None."""
    Image.init()
    for name in ALLOWED_IMAGE_FORMATS + tuple(Image.ID):
        accept = Image.OPEN[name][1] if name in Image.OPEN else None
        try:
            accepted = accept is not None and accept(header[:16])
        except Exception:  # noqa: BLE001 - a header check that trips on odd bytes is a "no"
            accepted = False
        if accepted and not isinstance(accepted, str):  # a str is Pillow's "maybe, with a warning"
            return name
    stripped = header.lstrip()
    for magic, name in _NOT_IMAGES:
        if stripped.startswith(magic):
            return name
    return None


def _fail(name: str, reason: str):
    raise ImageReadError(f"cannot read {name}: {reason}")


def check_image_bytes(header: bytes, name: str = "image") -> str:
    """The allowed format `header` (a file's first bytes) starts with; ImageReadError naming
    what it is otherwise. A header check only: nothing is decoded."""
    found = _format_name(header)
    if found in ALLOWED_IMAGE_FORMATS:
        return found
    allowed = f"allowed formats: {', '.join(ALLOWED_IMAGE_FORMATS)}"
    if found is None:
        text = header.isascii() and all(32 <= byte < 127 or byte in b"\t\r\n" for byte in header)
        return _fail(name, f"not an image ({'text' if header and text else 'unknown bytes'}); {allowed}")
    return _fail(name, f"format {found} is not read; {allowed}")


def check_image_file(path: str | os.PathLike) -> str:
    """`check_image_bytes` on a regular file's first bytes; ImageReadError otherwise."""
    return _checked_file_bytes(as_location(path), whole=False)[0]


def _checked_file_bytes(path: Path | str, whole: bool) -> tuple[str, bytes]:
    """A regular file's allowed format and its first 64 bytes (all of them when `whole`: the
    rest of a file whose header is not an allowed image is never read); ImageReadError otherwise.
    A URL's object is read whole (through `io.remote`: an object store, or http(s) guarded)."""
    # A URL's object, or an input image the Ray driver sent with the chunk.
    data = _url_bytes(path) if isinstance(path, str) else provided_bytes(path)
    if data is not None:
        return check_image_bytes(data[:64], f"image {path}"), data if whole else data[:64]
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    try:
        with open(path, "rb") as file:
            head = file.read(64)
            found = check_image_bytes(head, f"image {path}")
            return found, head + file.read() if whole else head
    except OSError as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from None


def _url_bytes(url: str) -> bytes:
    try:
        return read_url_bytes(url, max_bytes=MAX_IMAGE_BYTES)
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {url}") from None
    except OSError as error:  # already one line without secrets (io.remote)
        raise ImageReadError(f"cannot read image {error}") from None


def open_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """An image file (or its bytes) as RGB, fully decoded; ImageReadError (a ValueError) otherwise.

    The one way dataflowmm reads an image. Only `ALLOWED_IMAGE_FORMATS` are read (another
    format is an error naming it, raised before any plugin of it runs); an image over
    Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS` pixels) and a truncated
    or corrupt file are errors too.
    """
    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else None
    if is_url(source):
        data, name = _url_bytes(source), name or f"image {source}"
    elif data is None and provided_bytes(source) is not None:
        data, name = provided_bytes(source), name or f"image {source}"
    if data is not None:
        name = name or "image bytes"
        check_image_bytes(data[:64], name)
        fp = io.BytesIO(data)
    else:
        name = name or f"image {source}"
        check_image_file(source)
        fp = source
    with _reading(name), _checked_open(fp, name) as image:
        image.load()
        return to_rgb(image)


class ImageFile(NamedTuple):
    """An image file's bytes and what its header says (`Image.format`, `Image.mode`, size)."""

    data: bytes
    format: str
    mode: str
    size: tuple[int, int]


def read_image_file(path: str | os.PathLike) -> ImageFile:
    """An image file's bytes and header, checked as `open_image` checks them (format,
    decompression-bomb limit) but with no pixel decoded: for passing a file on unchanged
    (decode it with `open_image(data)`). ImageReadError otherwise; the rest of a file whose
    first bytes are not an allowed image is never read."""
    path = as_location(path)
    name = f"image {path}"
    data = _checked_file_bytes(path, whole=True)[1]
    size = _png_rgb8_size(data)  # the common case, read from the PNG header itself
    if size is not None:
        _check_pixels(name, size)
        return ImageFile(data, "PNG", "RGB", size)
    with _reading(name), _checked_open(io.BytesIO(data), name) as image:
        return ImageFile(data, image.format, image.mode, image.size)


def _png_rgb8_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an 8-bit RGB PNG (Pillow's mode "RGB"), from its IHDR chunk, which
    the format puts first; None for anything else."""
    if len(data) < 26 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    if (data[24], data[25]) != (8, 2):  # bit depth 8, colour type 2 (truecolour)
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _check_pixels(name: str, size: tuple[int, int]) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > limit:
        _fail(name, f"{size[0]}x{size[1]} pixels is over the decompression-bomb limit "
                    f"of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS)")


@contextlib.contextmanager
def _checked_open(fp, name: str) -> Iterator[Image.Image]:
    """`Image.open` of an allowed format within the decompression-bomb limit (pixels not decoded)."""
    with Image.open(fp, formats=_OPEN_FORMATS) as image:
        if image.format not in ALLOWED_IMAGE_FORMATS:
            _fail(name, f"format {image.format} is not read")
        _check_pixels(name, image.size)
        yield image


@contextlib.contextmanager
def _reading(name: str) -> Iterator[None]:
    """Whatever reading an image raises, as an ImageReadError naming it."""
    try:
        yield
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        _fail(name, f"over the decompression-bomb limit: {error}")
    except MemoryError:
        _fail(name, "out of memory decoding it")
    except Exception as error:  # noqa: BLE001 - a hostile file may make a plugin raise anything
        _fail(name, str(error) or type(error).__name__)


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB, fully decoded (so a truncated file fails here), through `open_image`.

    `path` is a file, or an image carried inline in a row (a base64 string or a
    `data:image/...;base64,` URI, as `images_in_rows=True` writes them).
    """
    if looks_like_base64_image(path):
        return decode_base64(path)
    if is_url(path):
        return open_image(path)
    path = Path(path)
    if not path.is_file() and provided_bytes(path) is None:
        raise ImageReadError(f"image not found: {path}")
    return open_image(path)


def image_file_name(row_id: str, *indices: int) -> str:
    """File name for a generated image: the row identity and candidate indices.

    Never derived from prompt text, so non-ASCII, long or duplicate prompts never collide.
    """
    return "_".join([row_id, *(str(index) for index in indices)]) + ".png"


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write `image` as PNG atomically (temp file in the same folder, then rename).

    No fsync: images are cheap to regenerate, and per-file fsyncs cost throughput.
    """
    with written_file(path) as file:
        image.save(file, format="PNG")
    return Path(path)


def encode_base64(image: Image.Image, image_format: str = "PNG") -> str:
    """An image as a base64 string (distilabel's way of carrying images inside rows)."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_base64(text: str) -> Image.Image:
    """Inverse of `encode_base64`; also accepts `data:image/...;base64,` URIs."""
    return open_image(_base64_bytes(text), name="base64 image")


def _base64_bytes(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageReadError(f"cannot decode base64 image: {error}") from error


class ImageHeader(NamedTuple):
    """What an image's first bytes say: `Image.format`, (width, height), and its size in bytes."""

    format: str
    size: tuple[int, int]
    nbytes: int


def read_image_header(source: str | os.PathLike, *, pixels: bool = True) -> ImageHeader:
    """An image file's (or inline base64 image's) format and size, no pixel decoded; ImageReadError
    otherwise. `nbytes` is the file's size (an inline image's decoded bytes). `pixels=False` reads
    only the first bytes (allowed format checked; `size` is (0, 0)): enough to size a file."""
    if looks_like_base64_image(source):
        data, name = _base64_bytes(source), "base64 image"
        found = check_image_bytes(data[:64], name)
        fp, nbytes = io.BytesIO(data), len(data)
    elif is_url(source):
        data, name = _checked_file_bytes(source, whole=True)[1], f"image {source}"
        found, fp, nbytes = check_image_bytes(data[:64], name), io.BytesIO(data), len(data)
    else:
        path = Path(source)
        found, name = check_image_file(path), f"image {path}"
        data = provided_bytes(path)
        fp, nbytes = (io.BytesIO(data), len(data)) if data is not None else (path, path.stat().st_size)
    if not pixels:
        return ImageHeader(found, (0, 0), nbytes)
    with _reading(name), _checked_open(fp, name) as image:
        return ImageHeader(image.format, image.size, nbytes)


def base64_to_files(values: list[str | None], save_dir: str | os.PathLike, stem: str = "image") -> list[str | None]:
    """Decode a base64 column into PNG files named `{stem}_{index}.png`; returns their paths."""
    paths: list[str | None] = []
    for index, value in enumerate(values):
        if not value:
            paths.append(None)
            continue
        paths.append(str(save_png(decode_base64(value), Path(save_dir) / f"{stem}_{index}.png")))
    return paths


# -- images inside rows (distilabel's form) and image files of a chosen format ---------------

IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "JPG": "jpeg"}


def check_image_format(image_format: str) -> str:
    """`image_format` lower-cased ("png" or "jpeg"; "jpg" is "jpeg"), else ValueError."""
    name = str(image_format).lower()
    name = "jpeg" if name == "jpg" else name
    if name not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    return name


def image_to_str(image: Image.Image, image_format: str = "png") -> str:
    """An image as a base64 string, as distilabel's `image_to_str` (PNG by default, lossless)."""
    return encode_base64(to_rgb(image), IMAGE_FORMATS[check_image_format(image_format)])


def image_from_str(text: str) -> Image.Image:
    """A base64 string (or `data:image/...;base64,` URI) as an RGB PIL image."""
    if not isinstance(text, str):
        raise ImageReadError(f"expected a base64 string, got {type(text).__name__}")
    return decode_base64(text)


def save_image(image: Image.Image, path: str | os.PathLike, image_format: str = "png") -> Path:
    """Write `image` atomically in `image_format` ("png" or "jpeg")."""
    pil_format = IMAGE_FORMATS[check_image_format(image_format)]
    with written_file(path) as file:
        to_rgb(image).save(file, format=pil_format)
    return Path(path)


def looks_like_base64_image(value: object) -> bool:
    """A string that carries an image inline: a data URI or base64 PNG/JPEG/GIF/WebP bytes."""
    return isinstance(value, str) and (
        value.startswith("data:image/") or value.startswith(("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR"))
    )


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def looks_like_image_path(value: object) -> bool:
    """A string that names an image file by its extension (not a URL, not inline data)."""
    return (isinstance(value, str) and not looks_like_base64_image(value) and "\n" not in value
            and value.lower().endswith(_IMAGE_SUFFIXES))


_SUFFIXES = {"png": ".png", "jpeg": ".jpg"}


class ImageOutput:
    """How an operator writes the images it generates: files (default) or base64 in the row.

    Args:
        image_format: `"png"` (lossless, default) or `"jpeg"`.
        images_in_rows: put each image into its row as a base64 string (distilabel's form)
            instead of writing a file and putting its path there.
    """

    def __init__(self, image_format: str = "png", images_in_rows: bool = False):
        self.image_format = check_image_format(image_format)
        self.images_in_rows = bool(images_in_rows)

    def store(self, image: Image.Image, save_dir: str | os.PathLike, row_id: str, *indices: int) -> str:
        """The row value for `image`: its base64 string, or the path of its file, named by
        row identity and candidate indices, in `save_dir`."""
        if self.images_in_rows:
            return image_to_str(image, self.image_format)
        name = Path(image_file_name(row_id, *indices)).with_suffix(_SUFFIXES[self.image_format])
        return str(save_image(image, Path(save_dir) / name, self.image_format))

    def __repr__(self) -> str:
        return f"ImageOutput(image_format={self.image_format!r}, images_in_rows={self.images_in_rows})"
