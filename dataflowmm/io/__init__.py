"""Image I/O: reading, writing, naming, base64."""

from dataflowmm.io.images import (
    ALLOWED_IMAGE_FORMATS,
    ImageReadError,
    base64_to_files,
    decode_base64,
    encode_base64,
    image_file_name,
    load_image,
    open_image,
    save_png,
)

__all__ = [
    "ALLOWED_IMAGE_FORMATS",
    "ImageReadError",
    "base64_to_files",
    "decode_base64",
    "encode_base64",
    "image_file_name",
    "load_image",
    "open_image",
    "save_png",
]
