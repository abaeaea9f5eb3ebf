"""Finished chunks of an unfinished step, kept on disk so a killed run resumes.

The checkpoint folder holds the step's output as it grows: `rows.jsonl` gets each finished
chunk's rows appended in their final form, then `chunks.jsonl` gets one line recording
that chunk (rows read, rows written, where its rows end). A run killed at any moment
leaves at most an unrecorded tail, which the next run cuts off before continuing. When the
step completes, `rows.jsonl` becomes the cache file: every row is serialised once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

from dataflowmm.io.atomic import atomic_write_text


def chunk_digest(rows: list[dict]) -> str:
    """A digest of a chunk's input rows, recorded with the chunk: a resumed step keeps the
    finished chunks whose input is unchanged (a fixed late line keeps those before it).

    Rows read from jsonl carry the digest of their lines (`RowChunk.source_digest`), which
    costs no second serialisation; other rows are digested as JSON."""
    return getattr(rows, "source_digest", None) or hashlib.sha256(orjson.dumps(rows)).hexdigest()[:32]


class StepCheckpoint:
    """The finished chunks of one step, valid for one operator fingerprint, input origin and
    chunk size; each chunk is valid only while its own input rows are unchanged
    (`keep_chunks_matching`).

    Chunks left by a run with another fingerprint or chunk size are discarded, never mixed in.
    """

    def __init__(self, folder: Path, fingerprint: str, chunk_rows: int):
        self.folder = folder
        self.rows_path = folder / "rows.jsonl"
        self.log_path = folder / "chunks.jsonl"
        identity = {"fingerprint": fingerprint, "chunk_rows": chunk_rows}
        meta_path = folder / "meta.json"
        if folder.exists() and not _meta_matches(meta_path, identity):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if not meta_path.exists():
            atomic_write_text(meta_path, json.dumps(identity))
        self.chunks = self._recorded_chunks()
        self._cut_unrecorded_tail()
        self._rows_file = None
        self._log_file = None
        # The rows file's digest, kept as this run writes it (a resumed file is digested when
        # published), so publishing never reads the rows back.
        self._rows_sha256 = hashlib.sha256() if not self.chunks else None

    # -- state ----------------------------------------------------------------------------

    @property
    def finished(self) -> int:
        """Chunks finished so far."""
        return len(self.chunks)

    @property
    def rows_read(self) -> int:
        """Input rows covered by the finished chunks."""
        return sum(chunk["rows_in"] for chunk in self.chunks)

    def _recorded_chunks(self) -> list[dict]:
        chunks: list[dict] = []
        try:
            lines = self.log_path.read_bytes().splitlines()
        except FileNotFoundError:
            return chunks
        for line in lines:
            try:
                chunk = orjson.loads(line)
            except orjson.JSONDecodeError:
                break  # a line cut short by a kill: that chunk was not recorded
            if chunk.get("chunk") != len(chunks):
                break
            chunks.append(chunk)
        return chunks

    def _cut_unrecorded_tail(self) -> None:
        end = self.chunks[-1]["end"] if self.chunks else 0
        size = self.rows_path.stat().st_size if self.rows_path.exists() else 0
        if size < end:  # rows of recorded chunks are missing: nothing can be trusted
            self.chunks = []
            end = 0
        with open(self.rows_path, "ab") as rows:
            rows.truncate(end)
        with open(self.log_path, "wb") as log:
            log.writelines(orjson.dumps(chunk) + b"\n" for chunk in self.chunks)

    def keep_chunks_matching(self, input_chunks: Iterable[list[dict]]) -> None:
        """Keep the finished chunks, in order, while each one's recorded input digest matches
        the input's chunk at its place; drop the rest (the input changed there)."""
        kept = 0
        for chunk, rows in zip(self.chunks, input_chunks, strict=False):
            if chunk.get("input") != chunk_digest(rows) or chunk["rows_in"] != len(rows):
                break
            kept += 1
        if kept < len(self.chunks):
            self.chunks = self.chunks[:kept]
            self._cut_unrecorded_tail()

    # -- growing --------------------------------------------------------------------------

    def append(self, rows_in: int, payload: bytes, rows_out: int, meta: dict | None = None) -> dict:
        """Record one more finished chunk: its rows' bytes, then its log line (with `meta`:
        rows failed upstream, failed rows and their output spans); returns that record."""
        if self._rows_file is None:
            self._rows_file = open(self.rows_path, "ab")  # noqa: SIM115 (kept open across chunks)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115
        self._rows_file.write(payload)
        if self._rows_sha256 is not None:
            self._rows_sha256.update(payload)
        self._rows_file.flush()  # the rows reach the OS before the log says they exist
        record = {"chunk": len(self.chunks), "rows_in": rows_in, "rows_out": rows_out,
                  "end": self._rows_file.tell(), **(meta or {})}
        self._log_file.write(orjson.dumps(record) + b"\n")
        self._log_file.flush()
        self.chunks.append(record)
        return record

    def rows_sha256(self) -> str | None:
        """SHA-256 of the rows file when this run wrote all of it (None after a resume)."""
        return None if self._rows_sha256 is None else self._rows_sha256.hexdigest()

    def finished_rows(self) -> Iterator[dict]:
        """The output rows of the finished chunks, in order, streamed."""
        self.close()
        with open(self.rows_path, "rb") as rows:
            for line in rows:
                yield orjson.loads(line)

    def close(self) -> None:
        for file in (self._rows_file, self._log_file):
            if file is not None:
                file.close()
        self._rows_file = self._log_file = None

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def finished_chunks(folder: str | os.PathLike) -> int:
    """Chunks recorded in a step's checkpoint folder (0 when there is none)."""
    try:
        lines = (Path(folder) / "chunks.jsonl").read_bytes().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith(b"}"))


def _meta_matches(meta_path: Path, identity: dict) -> bool:
    try:
        return json.loads(meta_path.read_text()) == identity
    except (FileNotFoundError, json.JSONDecodeError):
        return False
