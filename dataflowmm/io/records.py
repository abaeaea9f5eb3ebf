"""Rows on disk: jsonl/json/csv/parquet read in chunks, rows serialised once.

jsonl is read line by line and parquet by record batch, so a step never holds its whole
input; json and csv are read whole (their formats are not line-oriented). Rows are
written as JSON Lines first, in their final form, and converted only when the cache type
is another format. JSON cells are used as parsed: only values that are not JSON-native
(numpy, NaN, pandas' NA) are normalised, on the slow path that needs it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
import pandas as pd

from dataflowmm.io.atomic import atomic_file

CACHE_TYPES = ("jsonl", "json", "csv", "parquet")
Records = list[dict[str, Any]]


class StorageError(ValueError):
    """A dataset file that cannot be read or written, naming the file (and line)."""


# -- values ----------------------------------------------------------------------------

def plain_value(value: Any) -> Any:
    """A JSON-native copy of a cell: numpy arrays and scalars to Python, NaN and ±inf to None."""
    if isinstance(value, dict):
        return {str(key): plain_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain_value(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def to_records(data: pd.DataFrame | Records) -> Records:
    """Rows as a list of plain dicts, from a DataFrame or a list of dicts."""
    if isinstance(data, pd.DataFrame):
        data = data.to_dict(orient="records")
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise TypeError("write() takes a pandas DataFrame or a list of dicts")
    return [{str(key): plain_value(value) for key, value in row.items()} for row in data]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)):
        return plain_value(value)
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# orjson's one output form: compact, UTF-8, keys in row order, NaN and ±inf as null,
# numpy values as numbers. It has no formatting options that could drift between versions.
_ROW_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE


def dumps_row(row: dict) -> bytes:
    """One row as a JSON Lines line, newline included."""
    return orjson.dumps(row, default=_json_default, option=_ROW_OPTIONS)


def dumps_rows(rows: Records) -> bytes:
    """Rows as JSON Lines bytes."""
    dumps, default = orjson.dumps, _json_default
    return b"".join([dumps(row, default=default, option=_ROW_OPTIONS) for row in rows])


# -- reading ---------------------------------------------------------------------------

def _jsonl_row(line: bytes, path: Path, line_number: int) -> dict | None:
    """The object on a jsonl line orjson refused; None for a blank line; else StorageError."""
    if not line.strip():
        return None
    row = _stdlib_jsonl_row(line, path, line_number)  # NaN tokens, huge ints, or the error text
    _check_object(row, path, line_number)
    return row


def _check_object(row: Any, path: Path, line_number: int) -> None:
    if type(row) is not dict:
        raise StorageError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")


def _stdlib_jsonl_row(line: bytes, path: Path, line_number: int) -> Any:
    try:
        return plain_value(json.loads(line.decode("utf-8")))
    except UnicodeDecodeError as error:
        raise StorageError(f"{path}:{line_number}: not UTF-8 text: {error.reason}") from None
    except json.JSONDecodeError as error:
        raise StorageError(f"{path}:{line_number}: malformed JSON line: {error.msg}") from None


class RowChunk(list):
    """Rows read together from a dataset file. `source_digest` names the exact file lines they
    were parsed from (jsonl; None for other formats, whose rows have no lines of their own)."""

    def __init__(self, rows: Iterable[dict] = (), lines: list[bytes] | None = None):
        super().__init__(rows)
        self._lines = lines

    @property
    def source_digest(self) -> str | None:
        if self._lines is None:
            return None
        return hashlib.sha256(b"".join(self._lines)).hexdigest()[:32]


def _parse_lines(lines: list[bytes], path: Path, first_line: int) -> tuple[list[dict], list[bytes]]:
    """The rows on consecutive jsonl lines (numbered from `first_line`) and the lines they are on.

    Clean lines are parsed in one call, as one JSON array; anything else (a blank line, a
    value orjson refuses, a line that is not one object) line by line, naming the line."""
    try:
        rows = orjson.loads(b"[" + b",".join(lines) + b"]")
        if len(rows) == len(lines) and all(type(row) is dict for row in rows):
            return rows, lines
    except orjson.JSONDecodeError:
        pass
    rows, kept = [], []
    for line_number, line in enumerate(lines, start=first_line):
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            row = _jsonl_row(line, path, line_number)
            if row is None:
                continue
        _check_object(row, path, line_number)
        rows.append(row)
        kept.append(line)
    return rows, kept


def _jsonl_chunks(path: Path, sizes: Iterator[int], skip: int) -> Iterator[RowChunk]:
    """`RowChunk`s after the first `skip` rows, each of exactly as many rows as `sizes` says
    next (the last may be shorter)."""
    with open(path, "rb") as file:
        line_number = _skip_rows(file, skip)
        for size in sizes:
            lines = list(itertools.islice(file, size))
            if not lines:
                return
            rows, kept = _parse_lines(lines, path, line_number + 1)
            line_number += len(lines)
            while len(rows) < size and (more := list(itertools.islice(file, size - len(rows)))):
                more_rows, more_kept = _parse_lines(more, path, line_number + 1)  # after blank lines
                line_number += len(more)
                rows, kept = rows + more_rows, kept + more_kept
            if rows:
                yield RowChunk(rows, kept)


def _skip_rows(file: IO[bytes], rows: int) -> int:
    """Read past the first `rows` rows (non-blank lines, counted, not parsed); lines read."""
    lines = 0
    if rows:
        for line in file:
            lines += 1
            if line.strip():
                rows -= 1
                if not rows:
                    break
    return lines


def _iter_jsonl(path: Path, skip: int) -> Iterator[dict]:
    # Parsed in growing blocks: a reader that stops after the first row parses only that one.
    sizes = itertools.chain((1, 32), itertools.repeat(1024))
    return itertools.chain.from_iterable(_jsonl_chunks(path, sizes, skip))


@dataclass(frozen=True)
class JsonlSpan:
    """Where a chunk of rows lies in a jsonl file: rows [first_row, first_row + rows), bytes
    [start, end), its first line's number (for error messages)."""

    first_row: int
    rows: int
    start: int
    end: int
    first_line: int


def jsonl_spans(path: str | os.PathLike, rows_per_chunk: int, skip: int = 0) -> Iterator[JsonlSpan]:
    """The spans of consecutive chunks of `rows_per_chunk` rows, after the first `skip` rows.

    Lines are counted, not parsed, so the spans of a large file cost one read of its bytes.
    """
    with open(path, "rb") as file:
        offset, rows, first_row, start, first_line = 0, 0, 0, 0, 1
        for line_number, line in enumerate(file, start=1):
            if rows == 0:
                start, first_line = offset, line_number
            offset += len(line)
            if not line.strip():
                continue
            rows += 1
            if rows == rows_per_chunk or first_row + rows == skip:
                if first_row >= skip:
                    yield JsonlSpan(first_row, rows, start, offset, first_line)
                first_row, rows = first_row + rows, 0
        if rows and first_row >= skip:
            yield JsonlSpan(first_row, rows, start, offset, first_line)


def read_jsonl_span(path: str | os.PathLike, span: JsonlSpan, data: bytes | None = None) -> RowChunk:
    """The rows of one span of a jsonl file (with the `source_digest` of their lines), parsed
    from `data`, the span's bytes, when given (a Ray actor gets them from the driver)."""
    if data is None:
        with open(path, "rb") as file:
            file.seek(span.start)
            data = file.read(span.end - span.start)
    return RowChunk(*_parse_lines(data.splitlines(keepends=True), Path(path), span.first_line))


def _read_json(path: Path) -> Records:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise StorageError(f"{path}:{error.lineno}: malformed JSON: {error.msg}") from None
    if not isinstance(data, list):
        raise StorageError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise StorageError(f"{path}: item {index} is not a JSON object")
    return [plain_value(row) for row in data]


def _decode_csv_cell(value: Any) -> Any:
    # Lists and dicts are written to CSV as JSON text; read them back as such.
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _read_csv(path: Path) -> Records:
    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError:
        return []
    except pd.errors.ParserError as error:
        raise StorageError(f"{path}: malformed CSV: {error}") from None
    return [{str(key): _decode_csv_cell(plain_value(value)) for key, value in row.items()}
            for row in frame.to_dict(orient="records")]


def _iter_parquet(path: Path, skip: int) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        batches = parquet.iter_batches(batch_size=4096)
        for batch in batches:
            frame = batch.to_pandas()  # pandas' types, as `read("dataframe")` gives them
            for row in frame.to_dict(orient="records"):
                if skip:
                    skip -= 1
                    continue
                yield {str(key): plain_value(value) for key, value in row.items()}
    except StorageError:
        raise
    except Exception as error:  # pyarrow raises several unrelated types for bad files
        raise StorageError(f"{path}: cannot read parquet: {error}") from None


def _check_readable(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in CACHE_TYPES:
        raise StorageError(f"{path}: unsupported file type; use one of "
                           f"{', '.join('.' + kind for kind in CACHE_TYPES)}")
    if not path.is_file():
        raise StorageError(f"{path}: file not found")
    return suffix


def iter_records(path: str | os.PathLike, skip: int = 0) -> Iterator[dict]:
    """Rows of a jsonl/json/csv/parquet file, by its extension, after the first `skip` rows.

    jsonl and parquet stream; json and csv are parsed whole, then yielded.
    """
    path = Path(path)
    kind = _check_readable(path)
    if kind == "jsonl":
        return _iter_jsonl(path, skip)
    if kind == "parquet":
        return _iter_parquet(path, skip)
    records = _read_json(path) if kind == "json" else _read_csv(path)
    return iter(records[skip:])


def iter_chunks(path: str | os.PathLike, rows_per_chunk: int, skip: int = 0) -> Iterator[RowChunk]:
    """`RowChunk`s of up to `rows_per_chunk` rows, in file order, after the first `skip` rows."""
    path = Path(path)
    if _check_readable(path) == "jsonl":
        return _jsonl_chunks(path, itertools.repeat(rows_per_chunk), skip)
    rows = iter_records(path, skip)
    return iter(lambda: RowChunk(itertools.islice(rows, rows_per_chunk)), RowChunk())


def read_records(path: str | os.PathLike) -> Records:
    """All rows of a jsonl/json/csv/parquet file, by its extension."""
    return list(iter_records(path))


def count_records(path: str | os.PathLike) -> int:
    """The number of rows of a file (jsonl: its non-blank lines, counted without parsing)."""
    path = Path(path)
    kind = _check_readable(path)
    if kind == "jsonl":
        return _count_lines(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return len(read_records(path))


def _count_lines(path: Path) -> int:
    """Lines of a text file, counted in blocks (blank lines included: an estimate for progress)."""
    lines, last = 0, b"\n"
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")


# -- writing ---------------------------------------------------------------------------

def _encode_csv_cell(value: Any) -> Any:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value


def serialize_records(records: Records, cache_type: str) -> bytes:
    """The bytes of a cache file of `cache_type` holding `records`."""
    if cache_type == "jsonl":
        return dumps_rows(records)
    if cache_type == "json":
        return json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8")
    if cache_type == "csv":
        rows = [{key: _encode_csv_cell(value) for key, value in row.items()} for row in records]
        return pd.DataFrame(rows).to_csv(index=False).encode("utf-8")
    if cache_type == "parquet":
        buffer = io.BytesIO()
        pd.DataFrame(records).to_parquet(buffer, index=False)
        return buffer.getvalue()
    raise ValueError(f"cache_type must be one of {', '.join(CACHE_TYPES)}, got {cache_type!r}")


def _write_json_list(rows: Iterator[dict], file: IO[bytes]) -> None:
    """`json.dumps(rows, indent=1)`'s bytes, one row at a time."""
    first = True
    for row in rows:
        text = json.dumps(row, ensure_ascii=False, indent=1, default=_json_default)
        file.write((("[\n " if first else ",\n ") + text.replace("\n", "\n ")).encode("utf-8"))
        first = False
    file.write(b"[]" if first else b"\n]")


def publish_jsonl(part: Path, target: Path, cache_type: str) -> None:
    """Move a finished JSON Lines file to `target` as `cache_type`, atomically.

    jsonl is renamed into place (no copy, no re-serialisation); json is converted row by
    row; csv and parquet are tabular and are built from all rows at once.
    """
    if cache_type == "jsonl":
        with open(part, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(part, target)
        return
    with atomic_file(target) as file:
        if cache_type == "json":
            _write_json_list(_iter_jsonl(part, 0), file)
        else:
            file.write(serialize_records(list(_iter_jsonl(part, 0)), cache_type))
    part.unlink()
