"""A step's cache file as WebDataset tar shards, laid out as img2dataset writes them.

`OUT_DIR/{index:05d}.tar` holds `shard_size` samples (the last may hold fewer). A sample's
key is the row's index in the step file, `f"{row_index:09d}"`, and its members are:

- `{key}.{ext}`: the row's first image (first image column with an image, its first image);
- `{key}.{column}.{position}.{ext}`: every other image (`position` in the column's list, 0 for
  a single value; characters other than letters, digits, `_` and `-` in `column` become `_`);
- `{key}.json`: the row (orjson), each image column's value replaced by the member name(s)
  holding it (a string for a single value, a list for a list; None stays None);
- `{key}.txt`: the row's text: `text_column` when given (a non-string value as JSON), else
  the first non-empty string among `TEXT_COLUMNS`; no `.txt` when there is none.

Image bytes are copied as they are (never decoded or re-encoded); `ext` comes from their
header (`TrainingRows`), which must be an allowed image format. Members have mtime 0, owner
0 and mode 0644, so the same step gives byte-identical shards. Beside each tar,
`{index:05d}.parquet` holds its samples' json rows with a leading `key` column (the sample's
key: a row's own `key` column is in its json only); at the end `stats.json` holds the counts.

Shards are written one at a time (temp file, rename; the parquet after its tar), streaming
rows and holding one sample's image at a time. `.export.json`, written first, records the
options and the step file's fingerprint: a rerun with the same ones resumes at the first
unfinished shard (finished shards, whose parquet lists the expected keys, are kept and
their rows' images are not read again); with other ones it starts over.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import time
from collections import Counter
from pathlib import Path

from dataflowmm.export.training_rows import (
    DETECTION_ROWS,
    TEXT_COLUMNS,
    TrainingRow,
    TrainingRows,
    sample_key,
)
from dataflowmm.io.atomic import atomic_file, atomic_write_text
from dataflowmm.io.records import dumps_row, iter_records

DEFAULT_SHARD_SIZE = 10_000
STATE_FILE = ".export.json"
STATS_FILE = "stats.json"
FORMAT_VERSION = 1
_SHARD_FILE = re.compile(r"\d{5}\.(tar|parquet)")
_TEMP_FILE = re.compile(r"\.(\d{5}\.(tar|parquet)|stats\.json|\.export\.json)\..*\.tmp")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class _Mismatch(Exception):
    """A finished shard does not hold the rows the step gives it now: start over."""


def write_webdataset(step_file: str | os.PathLike, out: str | os.PathLike, image_columns: list[str] | None = None,
                     shard_size: int = DEFAULT_SHARD_SIZE, text_column: str | None = None) -> Path:
    """Write `step_file`'s exportable rows as WebDataset shards in folder `out`; returns `out`.

    Rows with an `error` and rows without an image are left out and counted (`stats.json`).

    Raises:
        FileNotFoundError / ValueError: an image cannot be read or its bytes are not an allowed
            image format (names the row and column; finished shards stay, the current one is
            not written).
        KeyError: a named column is in no row.
        FileExistsError: `out` holds shards that no `dataflowmm export` wrote.
    """
    started = time.perf_counter()
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    step_file, out = Path(step_file), Path(out)
    rows = TrainingRows(step_file, image_columns)
    if not rows.image_columns:
        raise ValueError(f"{step_file}: no column holds images; name one with --image-column")
    if text_column is not None:
        _check_column(step_file, text_column)
    options = {"format": "webdataset", "version": FORMAT_VERSION, "step_file": str(step_file.resolve()),
               "step": _step_fingerprint(step_file), "shard_size": shard_size,
               "image_columns": rows.image_columns, "text_column": text_column}
    writer = _ShardWriter(out, rows.image_columns, text_column)
    finished = _prepare(out, options)
    try:
        shards = _export(rows, writer, finished, shard_size)
    except _Mismatch:
        _remove_shards(out, keep=0)
        finished, writer.text_from = [], Counter()
        shards = _export(rows, writer, finished, shard_size)
    _remove_shards(out, keep=shards)  # shards a previous export of more rows left after ours
    counts = rows.counts()
    stats = {**counts, "shards": shards, "shard_size": shard_size, "resumed_shards": len(finished),
             "image_columns": rows.image_columns, "text_column": text_column,
             "text_from": dict(sorted(writer.text_from.items())),
             "without_text": counts["exported"] - sum(writer.text_from.values()),
             "seconds": round(time.perf_counter() - started, 3)}
    atomic_write_text(out / STATS_FILE, json.dumps(stats, indent=1) + "\n")
    return out


def _export(rows: TrainingRows, writer: _ShardWriter, finished: list[int], shard_size: int) -> int:
    """Write the shards after the `finished` ones (each its number of samples), whose rows are
    checked against the keys they hold, one shard at a time; returns the number of shards."""
    iterator = rows.iter_rows(skip_images=sum(finished))
    for shard in range(len(finished)):
        for key in _shard_keys(writer.out / f"{shard:05d}.parquet"):
            item = next(iterator, None)
            if item is None or sample_key(item.index) != key:
                raise _Mismatch
            writer.text(item.row)  # counted as if written
    shard = len(finished)
    while (first := next(iterator, None)) is not None:
        if finished and finished[-1] < shard_size:
            raise _Mismatch  # a short shard must be the last
        writer.write(shard, first, iterator, shard_size)
        shard += 1
    return shard


class _ShardWriter:
    """Writes one shard at a time: its tar, then its parquet."""

    def __init__(self, out: Path, image_columns: list[str], text_column: str | None):
        self.out = out
        self.image_columns = image_columns
        self.member_columns = {name: _UNSAFE.sub("_", name) for name in image_columns}
        if len(set(self.member_columns.values())) < len(image_columns):
            raise ValueError(f"image columns {image_columns} would share member names "
                             f"({list(self.member_columns.values())}); rename one")
        self.text_column = text_column
        self.text_from: Counter[str] = Counter()

    def write(self, shard: int, first: TrainingRow, rows, shard_size: int) -> None:
        """Shard `shard`: `first`, then rows from `rows` until it holds `shard_size` samples."""
        records = []
        with atomic_file(self.out / f"{shard:05d}.tar") as file:
            tar = _TarWriter(file)
            item = first
            while True:
                records.append(self._add_sample(tar, item))
                if len(records) == shard_size or (item := next(rows, None)) is None:
                    break
            tar.close()
        with atomic_file(self.out / f"{shard:05d}.parquet") as file:
            _write_parquet(file, records)

    def _add_sample(self, tar: _TarWriter, item: TrainingRow) -> dict:
        key = sample_key(item.index)
        record = dict(item.row)
        first = True
        for column in self.image_columns:
            value, images = item.row.get(column), iter(item.images[column])
            if value is None:
                continue
            names = []
            for position, part in enumerate(value if isinstance(value, list) else [value]):
                if part is None:
                    names.append(None)
                    continue
                image = next(images)
                if first:
                    name, first = f"{key}.{image.extension}", False
                else:
                    name = f"{key}.{self.member_columns[column]}.{position}.{image.extension}"
                tar.add(name, image.read())
                names.append(name)
            record[column] = names if isinstance(value, list) else names[0]
        tar.add(f"{key}.json", dumps_row(record))
        text = self.text(item.row)
        if text is not None:
            tar.add(f"{key}.txt", text.encode("utf-8"))
        record.pop("key", None)  # the parquet's `key` is the sample's (a row's own is in its json)
        return {"key": key, **record}

    def text(self, row: dict) -> str | None:
        """The row's `.txt`, counted by the column it comes from."""
        if self.text_column is not None:
            value = row.get(self.text_column)
            if value is None or value == "":
                return None
            self.text_from[self.text_column] += 1
            return value if isinstance(value, str) else _json_text(value)
        for name in TEXT_COLUMNS:
            value = row.get(name)
            if isinstance(value, str) and value:
                self.text_from[name] += 1
                return value
        return None


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0  # mtime fixed: the same rows give the same bytes
    return info


# A member's ustar header with its name and size blank; `_TarWriter` fills them in. The
# bytes are tarfile's own (`TarInfo.tobuf`), built without its per-member work.
_HEADER = _member_info("", 0).tobuf(tarfile.USTAR_FORMAT)
_HEADER_SUM = 256 + sum(_HEADER[100:124]) + sum(_HEADER[136:148]) + sum(_HEADER[156:])  # checksum field as spaces
_NUL = bytes(tarfile.RECORDSIZE)


class _TarWriter:
    """Writes a tar archive as `tarfile` writes one (PAX format, `_member_info`'s fields),
    member by member from bytes."""

    def __init__(self, file):
        self.file = file
        self.offset = 0

    def add(self, name: str, data: bytes) -> None:
        size = len(data)
        if len(name) <= 100 and name.isascii() and size < 8 ** 11:
            encoded, size_field = name.encode("ascii"), b"%011o\0" % size
            checksum = _HEADER_SUM + sum(encoded) + sum(size_field)
            header = b"".join((encoded.ljust(100, b"\0"), _HEADER[100:124], size_field, _HEADER[136:148],
                               b"%06o\0 " % checksum, _HEADER[156:]))
        else:  # a long name: tarfile's PAX extended header
            header = _member_info(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        padding = -size % tarfile.BLOCKSIZE
        self.file.write(header)
        self.file.write(data)
        self.file.write(_NUL[:padding])
        self.offset += len(header) + size + padding

    def close(self) -> None:
        """The end-of-archive blocks, padded to a whole record (as `TarFile.close`)."""
        end = self.offset + 2 * tarfile.BLOCKSIZE
        self.file.write(_NUL[:2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE])


def _write_parquet(file, records: list[dict]) -> None:
    """The shard's rows as one parquet table, columns in first-seen order (None where a row
    lacks one); a column whose values Arrow cannot hold in one type, or Parquet cannot
    store (an empty object), is stored as JSON text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(dict.fromkeys(name for record in records for name in record))
    arrays = []
    for name in names:
        values = [record.get(name) for record in records]
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            array = None
        if array is None or not _parquet_type(array.type):
            array = pa.array([None if value is None else _json_text(value) for value in values], pa.string())
        arrays.append(array)
    pq.write_table(pa.Table.from_arrays(arrays, names=names), file)


def _parquet_type(kind) -> bool:
    """Whether Parquet can store an Arrow type (it cannot store a struct without fields)."""
    import pyarrow as pa

    if pa.types.is_struct(kind):
        return kind.num_fields > 0 and all(_parquet_type(kind.field(index).type) for index in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _parquet_type(kind.value_type)
    return True


def _json_text(value) -> str:
    return dumps_row(value)[:-1].decode("utf-8")


# -- resuming ------------------------------------------------------------------------

def _prepare(out: Path, options: dict) -> list[int]:
    """Make `out` ready for an export with `options`; returns the number of samples of each
    finished shard it keeps (none unless the last export there had the same options and step
    file). A shard is finished when its tar and its parquet are there (the parquet is written
    after the tar)."""
    out.mkdir(parents=True, exist_ok=True)
    state = out / STATE_FILE
    try:
        previous = json.loads(state.read_text(encoding="utf-8"))
    except FileNotFoundError:
        previous = None
        if any(_SHARD_FILE.fullmatch(path.name) for path in out.iterdir()):
            raise FileExistsError(f"{out} holds shards that dataflowmm export did not write "
                                  f"(no {STATE_FILE}); export into an empty folder") from None
    except (OSError, ValueError):
        previous = {}
    (out / STATS_FILE).unlink(missing_ok=True)
    for path in out.iterdir():
        if _TEMP_FILE.fullmatch(path.name):
            path.unlink()  # left by a killed export
    if previous != options:
        _remove_shards(out, keep=0)
        atomic_write_text(state, json.dumps(options, indent=1) + "\n")
        return []
    import pyarrow.parquet as pq

    finished = []
    while (out / f"{len(finished):05d}.tar").is_file():
        try:
            samples = pq.read_metadata(out / f"{len(finished):05d}.parquet").num_rows
        except (OSError, ValueError):
            break
        finished.append(samples)
        if samples != options["shard_size"]:
            break  # only the last shard is short
    _remove_shards(out, keep=len(finished))
    return finished


def _shard_keys(path: Path) -> list[str]:
    """The keys a finished shard's parquet lists; `_Mismatch` when they cannot be read."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=["key"]).column("key").to_pylist()
    except (OSError, ValueError, KeyError):
        raise _Mismatch from None


def _remove_shards(out: Path, keep: int) -> None:
    """Remove the shard files numbered `keep` and above."""
    for path in out.iterdir():
        if _SHARD_FILE.fullmatch(path.name) and int(path.name[:5]) >= keep:
            path.unlink()


def _step_fingerprint(step_file: Path) -> str:
    """The step manifest's sha256 and fingerprint when the manifest describes the file as it
    is now (same size and mtime); else the file's path, size and mtime."""
    stat = step_file.stat()
    try:
        manifest = json.loads(step_file.with_name(f"{step_file.stem}.manifest.json").read_text(encoding="utf-8"))
        if (manifest.get("file") == step_file.name and manifest.get("size") == stat.st_size
                and manifest.get("mtime_ns") == stat.st_mtime_ns and manifest.get("sha256")):
            return f"sha256:{manifest['sha256']} fingerprint:{manifest.get('fingerprint')}"
    except (OSError, ValueError, AttributeError):
        pass
    return f"{step_file.resolve()} size:{stat.st_size} mtime_ns:{stat.st_mtime_ns}"


def _check_column(step_file: Path, column: str) -> None:
    """KeyError unless one of the first rows has `column` (checked before anything is written)."""
    seen = 0
    for row in iter_records(step_file):
        if column in row:
            return
        seen += 1
        if seen == DETECTION_ROWS:
            raise KeyError(f"{step_file}: none of the first {seen} rows has column {column!r}")
    if seen:
        raise KeyError(f"{step_file}: no row has column {column!r}")
