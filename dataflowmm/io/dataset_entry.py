"""Datasets as a pipeline's entry: a Hugging Face `save_to_disk` folder, a parquet file with
image bytes (`datasets.Image` features), or WebDataset tar shards, turned into the rows
every step reads.

Such an entry is streamed once into `{cache}/{prefix}_entry.jsonl` (batch by batch, sample
by sample: memory stays flat), with the image bytes written once, as they are, to
`{cache}/{prefix}_entry_images/` (not a step's images folder, which its step cleans) and
named by row position and column: `000000012_image.png`, `000000012_images_0.jpg`. An
image column then holds a path (or a list of paths) relative to the entry file, under its
own name, as operators expect. The conversion is redone only when the source's files
change (names, sizes, modification times), so row identities stay stable across runs.

How each source maps to rows:
- HF folder / parquet: every column as it is; a column of `Image` values (a struct of
  `bytes` and `path`, or a list of them) becomes image paths. A value with a `path` but no
  bytes keeps that file (absolute, or resolved against the dataset's folder).
- WebDataset (a `.tar` file or a folder of them, read in name order): samples are the
  members sharing a key (the name up to its first dot, as webdataset groups them). The
  sample's `.json` is the row; a json value naming one of the sample's image members
  (`"image": "000000012.png"`, as `dataflowmm export --to webdataset` writes it) becomes
  that image's path. Image members no json value names go to `image` (one) or `images`
  (several); without a json, the row is `key`, those images, and the `.txt` as `text`
  (img2dataset's shards). Other members are not read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from dataflowmm.io.atomic import atomic_file, atomic_write_text
from dataflowmm.io.images import ImageReadError, check_image_bytes, looks_like_image_path
from dataflowmm.io.records import StorageError, plain_value

# File extension of each allowed image format (webdataset's and img2dataset's names).
IMAGE_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
                    "TIFF": "tiff"}
_CONVERTER_VERSION = 1  # bump when the rows a source converts to change
_BATCH_ROWS = 512


def dataset_kind(path: Path) -> str | None:
    """`hf`, `parquet` (with image bytes), `webdataset`, or `None` for a plain row file."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(child.name for child in path.iterdir() if (child / "state.json").is_file())
            raise StorageError(f"{path}: a DatasetDict folder holds splits {', '.join(splits)}; "
                               f"give one split's folder, e.g. {path / (splits[0] if splits else 'train')}")
        if (path / "state.json").is_file():
            return "hf"
        if any(child.suffix == ".tar" for child in path.iterdir()):
            return "webdataset"
        raise StorageError(f"{path}: a folder that is neither a datasets save_to_disk folder (state.json) "
                           f"nor WebDataset shards (*.tar)")
    if path.suffix == ".tar":
        return "webdataset"
    if path.suffix == ".parquet" and _parquet_has_images(path):
        return "parquet"
    return None


def _is_image_struct(arrow_type: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return _is_image_struct(arrow_type.value_type)
    return (pa.types.is_struct(arrow_type)
            and {arrow_type.field(i).name for i in range(arrow_type.num_fields)} == {"bytes", "path"})


def _parquet_has_images(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception:  # noqa: BLE001 (a broken file is reported by the row reader, naming it)
        return False
    return any(_is_image_struct(field.type) for field in schema)


def source_files(path: Path) -> list[Path]:
    """The files a dataset entry is read from (their names, sizes and times say when it changed)."""
    if not path.is_dir():
        return [path]
    return sorted(child for child in path.rglob("*") if child.is_file())


def source_signature(path: Path) -> list:
    return [[str(file.relative_to(path) if path.is_dir() else file.name), file.stat().st_size,
             file.stat().st_mtime_ns] for file in source_files(path)]


# -- the conversion ------------------------------------------------------------------------

class _ImageWriter:
    """Writes a row's image bytes into the entry-images folder and returns their paths
    relative to the entry file; `where` names the source, row and column in errors."""

    def __init__(self, images_dir: Path, entry_dir: Path, source_dir: Path):
        self.images_dir = images_dir
        self.prefix = os.path.relpath(images_dir, entry_dir)
        self.source_dir = source_dir
        images_dir.mkdir(parents=True, exist_ok=True)

    def write(self, data: bytes, stem: str, where: str) -> str:
        try:
            extension = IMAGE_EXTENSIONS[check_image_bytes(data[:64], where)]
        except ImageReadError as error:
            raise StorageError(str(error)) from None
        name = f"{stem}.{extension}"
        with open(self.images_dir / name, "wb") as file:
            file.write(data)
        return f"{self.prefix}/{name}"

    def value(self, value: Any, stem: str, where: str) -> Any:
        """An `Image` struct ({bytes, path}) or a list of them, as path(s)."""
        if value is None:
            return None
        if isinstance(value, list):
            return [self.value(item, f"{stem}_{index}", f"{where}[{index}]") for index, item in enumerate(value)]
        if value.get("bytes") is not None:
            return self.write(value["bytes"], stem, where)
        if value.get("path"):
            path = Path(os.path.expanduser(value["path"]))
            path = path if path.is_absolute() else self.source_dir / path
            if not path.is_file():
                raise StorageError(f"{where}: image without bytes and its file {path} not found")
            return str(path.resolve())
        return None


def _stem(row_index: int, column: str) -> str:
    return f"{row_index:09d}_{re.sub(r'[^A-Za-z0-9_-]', '_', column)}"


def _arrow_rows(batches: Iterator[Any], images: _ImageWriter, source: Path) -> Iterator[dict]:
    """Rows of arrow record batches, image structs written as files."""
    index = 0
    for batch in batches:
        image_columns = [field.name for field in batch.schema if _is_image_struct(field.type)]
        for row in batch.to_pylist():
            for column in image_columns:
                row[column] = images.value(row[column], _stem(index, column),
                                           f"{source}: row {index}, column {column!r}")
            yield {str(key): plain_value(value) for key, value in row.items()}
            index += 1


def _hf_rows(folder: Path, images: _ImageWriter) -> Iterator[dict]:
    try:
        import datasets
    except ImportError:
        raise StorageError(f"{folder}: reading a datasets folder needs Hugging Face datasets: "
                           f"pip install 'dataflowmm[hf]'") from None
    dataset = datasets.load_from_disk(str(folder))  # memory-mapped: nothing is read yet
    tables = dataset.with_format("arrow").iter(batch_size=_BATCH_ROWS)
    yield from _arrow_rows((batch for table in tables for batch in table.to_batches()), images, folder)


def _parquet_rows(path: Path, images: _ImageWriter) -> Iterator[dict]:
    import pyarrow.parquet as pq

    yield from _arrow_rows(pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS), images, path)


def _tar_samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of each sample of a shard, streamed, in member order."""
    key, members = None, {}
    with tarfile.open(shard, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            stem, dot, extension = name.partition(".")
            if not dot:
                continue
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key and key is not None:
                yield key, members
                members = {}
            key = member_key
            members[extension] = tar.extractfile(member).read()
    if key is not None:
        yield key, members


def _webdataset_rows(source: Path, images: _ImageWriter) -> Iterator[dict]:
    shards = sorted(source.glob("*.tar")) if source.is_dir() else [source]
    index = 0
    for shard in shards:
        try:
            for key, members in _tar_samples(shard):
                yield _sample_row(key, members, index, images, f"{shard}: sample {key!r}")
                index += 1
        except tarfile.TarError as error:
            raise StorageError(f"{shard}: not a readable tar shard: {error}") from None


def _sample_row(key: str, members: dict[str, bytes], index: int, images: _ImageWriter, where: str) -> dict:
    image_members = {extension for extension in members if looks_like_image_path(f"x.{extension}")}
    names = {f"{key.rpartition('/')[2]}.{extension}": extension for extension in image_members}
    if "json" in members:
        try:
            row = json.loads(members["json"])
        except ValueError as error:
            raise StorageError(f"{where}: malformed {key}.json: {error}") from None
        if not isinstance(row, dict):
            raise StorageError(f"{where}: {key}.json holds {type(row).__name__}, expected an object")
    else:
        row = {"key": key}
        if "txt" in members:
            row["text"] = members["txt"].decode("utf-8", errors="replace")
    named = set()

    def image_path(name: str, column: str, position: int | None) -> str:
        named.add(names[name])
        stem = _stem(index, column) + ("" if position is None else f"_{position}")
        return images.write(members[names[name]], stem, f"{where}, member {name}")

    for column, value in list(row.items()):
        if isinstance(value, str) and value in names:
            row[column] = image_path(value, column, None)
        elif isinstance(value, list) and any(item is not None for item in value) and all(
                item is None or (isinstance(item, str) and item in names) for item in value):
            row[column] = [None if item is None else image_path(item, column, position)
                           for position, item in enumerate(value)]
    rest = sorted(image_members - named)
    if len(rest) == 1 and "image" not in row:
        row["image"] = images.write(members[rest[0]], _stem(index, "image"), f"{where}, member {rest[0]}")
    elif rest and "images" not in row:
        row["images"] = [images.write(members[extension], f"{_stem(index, 'images')}_{position}",
                                      f"{where}, member {extension}") for position, extension in enumerate(rest)]
    return row


_READERS = {"hf": _hf_rows, "parquet": _parquet_rows, "webdataset": _webdataset_rows}


def convert_dataset(source: Path, kind: str, rows_file: Path, images_dir: Path) -> int:
    """Stream `source` into the JSON Lines `rows_file` (atomically), its images into
    `images_dir`; returns the number of rows."""
    images = _ImageWriter(images_dir, rows_file.parent, source if source.is_dir() else source.parent)
    count = 0
    with atomic_file(rows_file, fsync=False) as file:
        for row in _READERS[kind](source, images):
            file.write(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
            count += 1
    return count


def dataset_entry_rows(source: Path, kind: str, rows_file: Path, images_dir: Path) -> Path:
    """`rows_file`, converted from `source` unless an earlier conversion of the same source
    files is there (recorded in `{rows_file}.source.json`)."""
    record_file = rows_file.with_name(f"{rows_file.name}.source.json")
    record = {"source": str(source.resolve()), "kind": kind, "files": source_signature(source),
              "converter": _CONVERTER_VERSION}
    try:
        previous = json.loads(record_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = {}
    same_source = all(previous.get(key) == value for key, value in record.items())
    if same_source and rows_file.is_file() and previous.get("size") == rows_file.stat().st_size:
        return rows_file
    record_file.unlink(missing_ok=True)
    shutil.rmtree(images_dir, ignore_errors=True)  # images of an earlier source go with it
    rows = convert_dataset(source, kind, rows_file, images_dir)
    atomic_write_text(record_file, json.dumps({**record, "rows": rows, "size": rows_file.stat().st_size}))
    return rows_file
