"""FileStorage: a pipeline's data as numbered steps of cache files.

The first `step()` reads the entry file and writes `{prefix}_step1.{cache_type}`, the next
`step()` reads that and writes step 2, and so on (DataFlow-MM's numbering). Every write
is atomic and leaves a manifest beside the cache file recording the operator, its
parameters, the input's fingerprint and the row count, so a re-run reuses a finished
step only when all of those match.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from dataflowmm.io.atomic import atomic_file, atomic_write_text
from dataflowmm.seeds import canonical_json

CACHE_TYPES = ("jsonl", "json", "csv", "parquet")
Records = list[dict[str, Any]]


class StorageError(ValueError):
    """A dataset file that cannot be read or written, naming the file (and line)."""


def plain_value(value: Any) -> Any:
    """A JSON-native copy of a cell: numpy arrays and scalars to Python, NaN to None."""
    if isinstance(value, dict):
        return {str(key): plain_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain_value(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
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


# -- reading ---------------------------------------------------------------------------

def _read_jsonl(path: Path) -> Records:
    records = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise StorageError(f"{path}:{line_number}: malformed JSON line: {error.msg}") from None
            if not isinstance(row, dict):
                raise StorageError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            records.append(row)
    return records


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
    return data


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
    return [{key: _decode_csv_cell(plain_value(value)) for key, value in row.items()}
            for row in frame.to_dict(orient="records")]


def _read_parquet(path: Path) -> Records:
    try:
        frame = pd.read_parquet(path)
    except Exception as error:  # pyarrow raises several unrelated types for bad files
        raise StorageError(f"{path}: cannot read parquet: {error}") from None
    return to_records(frame)


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def read_records(path: str | os.PathLike) -> Records:
    """Rows of a jsonl/json/csv/parquet file, by its extension."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise StorageError(f"{path}: unsupported file type; use one of {', '.join(_READERS)}")
    if not path.is_file():
        raise StorageError(f"{path}: file not found")
    return [{str(key): plain_value(value) for key, value in row.items()} for row in reader(path)]


# -- writing ---------------------------------------------------------------------------

def _encode_csv_cell(value: Any) -> Any:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value


def serialize_records(records: Records, cache_type: str) -> bytes:
    """The bytes of a cache file of `cache_type` holding `records`."""
    if cache_type == "jsonl":
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in records).encode("utf-8")
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


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(canonical_json(parts).encode("utf-8")).hexdigest()


class FileStorage:
    """Numbered cache files of one pipeline.

    Args:
        first_entry_file_name: the pipeline's input (jsonl, json, csv or parquet). Relative
            image paths in it resolve against its folder.
        cache_path: folder for the step cache files, manifests, checkpoints and images.
        file_name_prefix: cache files are `{prefix}_step{N}.{cache_type}`.
        cache_type: jsonl, json, csv or parquet.
    """

    def __init__(
        self,
        first_entry_file_name: str | os.PathLike,
        cache_path: str | os.PathLike = "./cache",
        file_name_prefix: str = "dataflow_cache_step",
        cache_type: Literal["jsonl", "json", "csv", "parquet"] = "jsonl",
    ):
        if cache_type not in CACHE_TYPES:
            raise ValueError(f"cache_type must be one of {', '.join(CACHE_TYPES)}, got {cache_type!r}")
        self.first_entry_file_name = Path(first_entry_file_name)
        if not self.first_entry_file_name.is_file():
            raise FileNotFoundError(f"first_entry_file_name not found: {self.first_entry_file_name}")
        self.cache_path = Path(cache_path)
        try:
            self.cache_path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OSError(f"cannot create cache_path {self.cache_path}: {error}") from error
        if not os.access(self.cache_path, os.W_OK):
            raise PermissionError(f"cache_path is not writable: {self.cache_path}")
        self.file_name_prefix = file_name_prefix
        self.cache_type = cache_type
        self.operator_step = 0

    def step(self) -> FileStorage:
        """Advance to the next step and return a view of the storage bound to it."""
        self.operator_step += 1
        return copy.copy(self)

    # -- paths of the current step ------------------------------------------------------

    def _step_file(self, step: int, suffix: str) -> Path:
        return self.cache_path / f"{self.file_name_prefix}_step{step}{suffix}"

    @property
    def input_path(self) -> Path:
        """The file this step reads: the entry file for step 1, else the previous step's cache."""
        if self.operator_step <= 1:
            return self.first_entry_file_name
        return self._step_file(self.operator_step - 1, f".{self.cache_type}")

    @property
    def output_path(self) -> Path:
        self._require_step()
        return self._step_file(self.operator_step, f".{self.cache_type}")

    @property
    def manifest_path(self) -> Path:
        self._require_step()
        return self._step_file(self.operator_step, ".manifest.json")

    @property
    def checkpoint_dir(self) -> Path:
        """Finished chunks of an unfinished step are kept here until the step completes."""
        self._require_step()
        return self._step_file(self.operator_step, ".partial")

    @property
    def images_dir(self) -> Path:
        """Default folder for the images this step generates."""
        self._require_step()
        return self._step_file(self.operator_step, "_images")

    def _require_step(self) -> None:
        if self.operator_step < 1:
            raise RuntimeError("call storage.step() before writing: step 0 has no output")

    # -- data -----------------------------------------------------------------------------

    def read(self, output_type: Literal["dataframe", "dict"] = "dataframe") -> pd.DataFrame | Records:
        """This step's input rows as a DataFrame or a list of dicts."""
        if output_type not in ("dataframe", "dict"):
            raise ValueError(f"output_type must be 'dataframe' or 'dict', got {output_type!r}")
        records = read_records(self.input_path)
        return pd.DataFrame(records) if output_type == "dataframe" else records

    def write(
        self,
        data: pd.DataFrame | Records,
        *,
        operator: str | None = None,
        params: dict | None = None,
        input_fingerprint: str | None = None,
        step_fingerprint: str | None = None,
    ) -> str:
        """Write this step's rows atomically, then its manifest; returns the file's path.

        Operators pass their name, parameters and fingerprints; a plain `write(df)`
        records the content's own digest as the fingerprint.
        """
        records = to_records(data)
        payload = serialize_records(records, self.cache_type)
        with atomic_file(self.output_path) as file:
            file.write(payload)
        manifest = {
            "step": self.operator_step,
            "file": self.output_path.name,
            "operator": operator,
            "params": params or {},
            "input_fingerprint": input_fingerprint,
            "fingerprint": step_fingerprint or hashlib.sha256(payload).hexdigest(),
            "rows": len(records),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(self.manifest_path, json.dumps(manifest, ensure_ascii=False, indent=1))
        return str(self.output_path)

    # -- fingerprints and reuse ---------------------------------------------------------

    def input_fingerprint(self) -> str:
        """Identity of this step's input: its content, where it lives, and how it was made.

        The previous step's manifest fingerprint is part of it, so a changed parameter
        upstream invalidates this step even when the upstream file's bytes did not change
        (regenerated images keep their names).
        """
        path = self.input_path
        upstream = None
        if self.operator_step > 1:
            manifest = self._load_manifest(self.operator_step - 1)
            upstream = manifest.get("fingerprint") if manifest else None
        return fingerprint(str(path.resolve()), file_digest(path), upstream)

    def _load_manifest(self, step: int) -> dict | None:
        path = self._step_file(step, ".manifest.json")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def manifest(self) -> dict | None:
        """This step's manifest, if the step has been written."""
        return self._load_manifest(self.operator_step)

    def is_finished(self, step_fingerprint: str) -> bool:
        """True when this step's output exists and was made from the same inputs and parameters."""
        manifest = self.manifest()
        return (
            manifest is not None
            and manifest.get("fingerprint") == step_fingerprint
            and self.output_path.is_file()
        )
