"""A step's cache file as a Hugging Face `datasets.Dataset` with real `Image()` columns.

Image columns (file paths or base64 strings, or lists of them) become `Image()` /
`List(Image())` features holding the image bytes, so the saved dataset needs none of the
step's files; every other column keeps the type Arrow infers for it.

Only image bytes are exported: a value whose bytes do not start with an allowed image
format's header (`dataflowmm.io.images.ALLOWED_IMAGE_FORMATS`) stops the export with an
error naming the row, column and what was found, and nothing is written, so a row pointing
at `/proc/self/environ` or `~/.aws/credentials` never puts those bytes into a dataset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataflowmm.export.training_rows import detect_image_columns, image_ref
from dataflowmm.io.records import read_records

if TYPE_CHECKING:
    import datasets


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("exporting needs Hugging Face datasets: pip install 'dataflowmm[hf]'") from None
    return datasets


def _image_cell(value: Any, base_dir: Path, where: str) -> Any:
    """An image value as the {"bytes", "path"} dict `datasets.Image` stores."""
    if value is None:
        return None
    if isinstance(value, list):
        return [_image_cell(item, base_dir, f"{where}[{index}]") for index, item in enumerate(value)]
    image = image_ref(value, base_dir, where)
    return {"bytes": image.read(), "path": image.file.name if image.file else None}


def to_hf_dataset(step_file: str | os.PathLike, image_columns: list[str] | None = None) -> datasets.Dataset:
    """The rows of `step_file` as a `datasets.Dataset`; image columns as `Image()` features.

    Args:
        step_file: a step's cache file (jsonl, json, csv or parquet).
        image_columns: columns to turn into images; detected from the values when `None`.

    Raises:
        FileNotFoundError / ValueError: an image cannot be read, or a value's bytes are not an
            allowed image format (names the file, row and column; nothing is exported).
    """
    datasets = _import_datasets()
    import pyarrow as pa

    step_file = Path(step_file)
    rows = read_records(step_file)
    columns = detect_image_columns(rows) if image_columns is None else list(image_columns)
    missing = [name for name in columns if rows and not any(name in row for row in rows)]
    if missing:
        raise KeyError(f"{step_file}: no row has column {missing[0]!r}")
    base_dir = step_file.resolve().parent
    others = [{key: value for key, value in row.items() if key not in columns} for row in rows]
    try:
        features = datasets.Features.from_arrow_schema(pa.Table.from_pylist(others).schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ValueError(f"{step_file}: a column mixes types Arrow cannot hold together: {error}") from None
    for name in columns:
        is_list = any(isinstance(row.get(name), list) for row in rows)
        features[name] = datasets.List(datasets.Image()) if is_list else datasets.Image()
    records = []
    for index, row in enumerate(rows):
        record = {key: row.get(key) for key in features}
        for name in columns:
            record[name] = _image_cell(row.get(name), base_dir, f"{step_file}: row {index}, column {name!r}")
        records.append(record)
    return datasets.Dataset.from_list(records, features=features)


def write_hf(step_file: str | os.PathLike, to: str, out: str | os.PathLike,
             image_columns: list[str] | None = None) -> Path:
    """Write `step_file` as a saved dataset folder (`to="hf"`, read back with
    `datasets.load_from_disk`) or one Parquet file (`to="parquet"`); returns `out`."""
    dataset = to_hf_dataset(step_file, image_columns)
    out = Path(out)
    if to == "hf":
        dataset.save_to_disk(str(out))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(out))
    return out
