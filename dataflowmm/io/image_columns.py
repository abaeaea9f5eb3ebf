"""Image columns of a whole table as PIL images (distilabel's `transform_columns_to_image`)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from dataflowmm.io.images import (
    ImageReadError,
    image_from_str,
    load_image,
    looks_like_base64_image,
    looks_like_image_path,
)


def transform_columns_to_image(data, columns: str | list[str], base_dir: str | os.PathLike | None = None):
    """Turn image columns (base64 strings or file paths, or lists of them) into PIL images.

    distilabel's `Distiset.transform_columns_to_image`, for rows (a list of dicts, returned as
    new dicts) or a pandas DataFrame (returned as a copy). Relative paths are resolved against
    `base_dir` (default: the working directory); `None` stays `None`.

    Args:
        data: rows or a DataFrame.
        columns: one column name or several.
        base_dir: folder relative image paths are relative to (the dataset file's folder).

    Raises:
        KeyError: a column is missing everywhere (named).
        ImageReadError: a value cannot be decoded (names the row and column).
    """
    import pandas as pd

    columns = [columns] if isinstance(columns, str) else list(columns)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    is_frame = isinstance(data, pd.DataFrame)
    rows = data.to_dict("records") if is_frame else [dict(row) for row in data]
    for column in columns:
        if rows and not any(column in row for row in rows):
            raise KeyError(f"no row has column {column!r}")
    for index, row in enumerate(rows):
        for column in columns:
            if column in row:
                try:
                    row[column] = _to_image(row[column], base)
                except ImageReadError as error:
                    raise ImageReadError(f"row {index}, column {column!r}: {error}") from error
    return pd.DataFrame(rows, columns=list(data.columns)) if is_frame else rows


def _to_image(value, base: Path):
    if value is None or isinstance(value, Image.Image):
        return value
    if isinstance(value, float) and value != value:  # a DataFrame's missing value (NaN)
        return None
    if isinstance(value, (list, tuple)):
        return [_to_image(item, base) for item in value]
    if not isinstance(value, str):
        raise ImageReadError(f"expected a path or base64 string, got {type(value).__name__}")
    if looks_like_base64_image(value) or not looks_like_image_path(value):
        return image_from_str(value)
    return load_image(base / os.path.expanduser(value))
