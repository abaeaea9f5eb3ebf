"""FileStorage: a pipeline's data as numbered steps of cache files.

The first `step()` reads the entry file and writes `{prefix}_step1.{cache_type}`, the next
`step()` reads that and writes step 2, and so on (DataFlow-MM's numbering). Every write
is atomic and leaves a manifest beside the cache file recording the operator, its
parameters, the input's fingerprint, the row count and the cache file's SHA-256, size and
modification time, so a re-run reuses a finished step only when all of those match.

The old manifest is removed before a new cache file is published and the new one written
after, so a manifest never describes other data: a run that dies in between leaves a cache
file without a manifest, which the next run recomputes. On reuse the digest is recomputed
only when the file's size or modification time differ from the recorded ones (a file
rewritten with the same size within the same nanosecond is not looked for).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from dataflowmm.io.atomic import atomic_file, atomic_write_text
from dataflowmm.io.dataset_entry import dataset_entry_rows, dataset_kind
from dataflowmm.io.records import (
    CACHE_TYPES,
    Records,
    StorageError,
    count_records,
    iter_chunks,
    plain_value,
    publish_jsonl,
    read_records,
    serialize_records,
    to_records,
)
from dataflowmm.io.remote import as_location, fetch_entry, url_parent, use_storage_options
from dataflowmm.seeds import canonical_json
from dataflowmm.store import StoreMirror, default_work_dir

__all__ = ["CACHE_TYPES", "FileStorage", "Records", "StorageError", "fingerprint", "plain_value",
           "read_records", "to_records"]


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
        first_entry_file_name: the pipeline's input: a row file (jsonl, json, csv or
            parquet; relative image paths in it resolve against its folder), or a dataset: a
            Hugging Face `save_to_disk` folder, a parquet file with image bytes, WebDataset
            shards (a `.tar` or a folder of them). A dataset is streamed once into
            `{prefix}_entry.jsonl` in `cache_path`, its images into `{prefix}_entry_images/`
            (see `dataflowmm.io.dataset_entry`), and converted again only when it changes.
        cache_path: folder for the step cache files, manifests, checkpoints and images.
        file_name_prefix: cache files are `{prefix}_step{N}.{cache_type}`.
        cache_type: jsonl, json, csv or parquet.
        runner: where operators run their batches: `None` or `"local"` for this process
            (`LocalRunner`), or any runner object (e.g. `RayRunner` from `dataflowmm[ray]`).
            Every `step()` of this storage uses it; outputs do not depend on the runner.
            `runner` is then `None` or that object: the storage only keeps it for execution.
        storage_options: for URLs (`s3://`, `gs://`, `az://`, `memory://`, ...) in
            `first_entry_file_name`, `cache_path` and the rows' image references: passed to
            the fsspec file system (credentials, `client_kwargs={"endpoint_url": ...}`); never
            written to a manifest or a message. Without it, the backend's standard sources
            (for S3 the `AWS_*` environment) are used.
        work_dir: with a URL `cache_path`, the local folder the steps are worked on in
            (default `~/.cache/dataflowmm/stores/{digest of the URL}`); see `dataflowmm.store`.
    """

    def __init__(
        self,
        first_entry_file_name: str | os.PathLike,
        cache_path: str | os.PathLike = "./cache",
        file_name_prefix: str = "dataflow_cache_step",
        cache_type: Literal["jsonl", "json", "csv", "parquet"] = "jsonl",
        runner: Any = None,
        *,
        storage_options: dict | None = None,
        work_dir: str | os.PathLike | None = None,
    ):
        if cache_type not in CACHE_TYPES:
            raise ValueError(f"cache_type must be one of {', '.join(CACHE_TYPES)}, got {cache_type!r}")
        entry = as_location(first_entry_file_name)
        self.entry_url = entry if isinstance(entry, str) else None
        if isinstance(entry, Path) and not entry.exists():
            raise FileNotFoundError(f"first_entry_file_name not found: {entry}")
        cache = as_location(cache_path)
        self.storage_options = storage_options  # for the steps' actors (never written anywhere)
        for url in (self.entry_url, cache if isinstance(cache, str) else None):
            if url is not None:  # images the rows name in these buckets are read with the same options
                use_storage_options(url, storage_options)
        self.store: StoreMirror | None = None
        if isinstance(cache, str):  # the store is reached (bucket checked) before anything is written
            self.store = StoreMirror(cache, storage_options, Path(work_dir or default_work_dir(cache)))
            cache = self.store.local
        self.cache_path = cache
        try:
            self.cache_path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OSError(f"cannot create cache_path {self.cache_path}: {error}") from error
        if not os.access(self.cache_path, os.W_OK):
            raise PermissionError(f"cache_path is not writable: {self.cache_path}")
        self.first_entry_file_name = entry if self.entry_url is None else fetch_entry(
            self.entry_url, storage_options, self.cache_path / f"{file_name_prefix}_entry_source")
        self.entry_kind = dataset_kind(self.first_entry_file_name)
        self.file_name_prefix = file_name_prefix
        self.cache_type = cache_type
        self.runner = _resolve_runner(runner)
        self.operator_step = 0
        self._entry_rows: dict[str, Path] = {}  # shared by the step views: a dataset converts once

    def step(self) -> FileStorage:
        """Advance to the next step and return a view of the storage bound to it."""
        self.operator_step += 1
        return copy.copy(self)

    # -- paths of the current step ------------------------------------------------------

    def _step_file(self, step: int, suffix: str) -> Path:
        return self.cache_path / f"{self.file_name_prefix}_step{step}{suffix}"

    @property
    def input_path(self) -> Path:
        """The file this step reads: the entry file for step 1 (a dataset's rows, converted
        at first use), else the previous step's cache."""
        if self.operator_step > 1:
            return self._step_file(self.operator_step - 1, f".{self.cache_type}")
        if self.entry_kind is None:
            return self.first_entry_file_name
        if "rows" not in self._entry_rows:
            self._entry_rows["rows"] = dataset_entry_rows(
                self.first_entry_file_name, self.entry_kind, self.cache_path / f"{self.file_name_prefix}_entry.jsonl",
                self.cache_path / f"{self.file_name_prefix}_entry_images")
            if self.store is not None:  # the converted rows point to images the store must hold
                self.store.push_step(self.cache_path / f"{self.file_name_prefix}_entry.jsonl",
                                     self._entry_rows["rows"], (), None,
                                     self.cache_path / f"{self.file_name_prefix}_entry_images")
        return self._entry_rows["rows"]

    @property
    def input_folder(self) -> Path | str:
        """Where relative image paths of this step's input resolve: the input's folder, or
        its URL when the input is on a store (images are then read from the store)."""
        if self.operator_step <= 1 and self.entry_kind is None:
            return url_parent(self.entry_url) if self.entry_url is not None else self.input_path.resolve().parent
        if self.store is not None:
            return self.store.url
        return self.input_path.resolve().parent

    @property
    def output_url(self) -> str | None:
        """The URL this step's folder is published to (None for a local cache)."""
        return self.store.url if self.store is not None else None

    def location(self, path: Path) -> str:
        """A cache file's path, or its URL on the store: what messages name."""
        return self.store.url_of(path) if self.store is not None else str(path)

    @property
    def output_path(self) -> Path:
        self._require_step()
        return self._step_file(self.operator_step, f".{self.cache_type}")

    @property
    def manifest_path(self) -> Path:
        self._require_step()
        return self._step_file(self.operator_step, ".manifest.json")

    @property
    def dropped_path(self) -> Path:
        """Side file of the rows this step's filter dropped, when it keeps them (JSON Lines)."""
        self._require_step()
        return self._step_file(self.operator_step, ".dropped.jsonl")

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
        self.remove_manifest()  # never left describing other data
        with atomic_file(self.output_path) as file:
            file.write(payload)
        self.write_manifest(operator=operator, params=params, input_fingerprint=input_fingerprint,
                            step_fingerprint=step_fingerprint or hashlib.sha256(payload).hexdigest(),
                            rows=len(records))
        return self.location(self.output_path)

    def iter_input_chunks(self, rows_per_chunk: int, skip: int = 0) -> Iterator[Records]:
        """This step's input rows in lists of `rows_per_chunk`, streamed, after `skip` rows."""
        return iter_chunks(self.input_path, rows_per_chunk, skip)

    def count_input_rows(self) -> int:
        """Rows in this step's input (jsonl lines are counted, not parsed)."""
        return count_records(self.input_path)

    def publish(self, jsonl_part: Path) -> str:
        """Make a finished JSON Lines file this step's cache file (converted to `cache_type`).

        The step's manifest is removed first: `write_manifest` writes the new one after."""
        self.remove_manifest()
        publish_jsonl(jsonl_part, self.output_path, self.cache_type)
        return self.location(self.output_path)

    def remove_manifest(self) -> None:
        """Before new files of this step are published (here and on the store)."""
        self.manifest_path.unlink(missing_ok=True)
        if self.store is not None:
            self.store.remove_manifest(self.manifest_path)

    def write_manifest(self, *, operator: str | None, params: dict | None, input_fingerprint: str | None,
                       step_fingerprint: str, rows: int, extra: dict | None = None,
                       sha256: str | None = None, images: Iterable[str] | None = None) -> None:
        """The manifest beside this step's cache file: what made it and from what, and the
        file's digest, size and modification time (the file must be written already).
        `sha256`: the file's digest when the caller computed it while writing the file.
        On a store the step is then published there (`images`: the local paths of every
        image the output points to; see `StoreMirror.push_step`)."""
        stat = self.output_path.stat()
        manifest = {
            "step": self.operator_step,
            "file": self.output_path.name,
            "operator": operator,
            "params": params or {},
            "input_fingerprint": input_fingerprint,
            "fingerprint": step_fingerprint,
            "rows": rows,
            "sha256": sha256 or file_digest(self.output_path),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            **(extra or {}),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(self.manifest_path, json.dumps(manifest, ensure_ascii=False, indent=1))
        if self.store is not None:
            self.store.push_step(self.manifest_path, self.output_path, [self.dropped_path], images, self.images_dir)

    # -- fingerprints and reuse ---------------------------------------------------------

    def input_fingerprint(self) -> str:
        """Identity of this step's input: its content, where it lives, and how it was made.

        The previous step's manifest fingerprint is part of it, so a changed parameter
        upstream invalidates this step even when the upstream file's bytes did not change
        (regenerated images keep their names).
        """
        path = self.input_path
        manifest = self._load_manifest(self.operator_step - 1) if self.operator_step > 1 else None
        digest = _recorded_digest(manifest, path) if manifest else None
        return fingerprint(self.input_origin(), digest or file_digest(path))

    def input_origin(self) -> str:
        """Where this step's input lives and how it was made, without its content: what a
        checkpoint's chunks share (each chunk also records the digest of its own input rows)."""
        manifest = self._load_manifest(self.operator_step - 1) if self.operator_step > 1 else None
        upstream = manifest.get("fingerprint") if manifest else None
        return fingerprint(self._input_location(), upstream)

    def _input_location(self) -> str:
        if self.operator_step <= 1 and self.entry_url is not None:
            return self.entry_url
        if self.store is not None:
            return self.store.url_of(self.input_path)
        return str(self.input_path.resolve())

    def _load_manifest(self, step: int) -> dict | None:
        path = self._step_file(step, ".manifest.json")
        if self.store is not None and step >= 1:  # the store's finished step, copied here when it differs
            self.store.pull_step(path, self._step_file(step, f".{self.cache_type}"),
                                 [self._step_file(step, ".dropped.jsonl")])
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
            and self.output_matches_manifest(manifest)
        )

    def output_matches_manifest(self, manifest: dict) -> bool:
        """The cache file beside the manifest is the one it describes (its recorded SHA-256)."""
        path = self.output_path
        recorded = manifest.get("sha256")
        if not recorded or not path.is_file():
            return False
        return (_recorded_digest(manifest, path) or file_digest(path)) == recorded


def _recorded_digest(manifest: dict, path: Path) -> str | None:
    """The manifest's digest of `path` when the file's size and mtime are the recorded ones."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    if (manifest.get("file") == path.name and manifest.get("size") == stat.st_size
            and manifest.get("mtime_ns") == stat.st_mtime_ns):
        return manifest.get("sha256")
    return None


def _resolve_runner(runner: Any) -> Any:
    """`None` for the local runner (execution's default), else a runner object, checked."""
    if runner is None or runner == "local":
        return None
    if isinstance(runner, str):
        raise ValueError(f"runner must be 'local' or a runner object (e.g. RayRunner()), got {runner!r}")
    if not callable(getattr(runner, "run", None)):
        raise TypeError(f"runner must have a run(storage, operator) method, got {runner!r}")
    return runner
