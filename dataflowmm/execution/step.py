"""What every runner does around the batches of a step: plan, reuse, checkpoint, publish.

`prepare_step` decides everything before any model loads (keys checked, fingerprint,
reuse of a finished step, chunk size); `StepOutput` grows the step's output chunk by
chunk through its checkpoint and publishes it with its manifest. A runner only chooses
where `apply_batch` runs on each batch of each chunk.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from tqdm.auto import tqdm

from dataflowmm.execution.batch import (
    OutputCounts,
    finish_chunk,
    fitted_batch_sizes,
    merged_fitted_sizes,
)
from dataflowmm.execution.checkpoints import StepCheckpoint
from dataflowmm.execution.cleanup import remove_empty_folders, remove_stale_temp_files
from dataflowmm.execution.protocol import DROP_MARK, DROPPED_KEY, StepContext, StepOperator
from dataflowmm.execution.reuse import why_not_reusable
from dataflowmm.io.atomic import atomic_file
from dataflowmm.io.records import dumps_row, iter_records
from dataflowmm.storage import fingerprint

if TYPE_CHECKING:
    from dataflowmm.storage import FileStorage


@dataclass
class StepSummary:
    """What a step did; `line()` is the one line printed at its end."""

    step: int
    operator: str
    rows_in: int
    rows_out: int
    images_written: int
    errors: int
    seconds: float
    output_path: str
    reused: bool = False
    chunks_resumed: int = 0
    rows_dropped: int = 0
    dropped_path: str | None = None
    failed_upstream: int = 0
    rows_retried: int = 0

    def line(self) -> str:
        if self.reused:
            return (f"[dataflowmm] step {self.step} {self.operator}: reused finished output "
                    f"({self.rows_out} rows) -> {self.output_path}")
        resumed = f", {self.chunks_resumed} chunks resumed" if self.chunks_resumed else ""
        dropped = ""
        if self.rows_dropped or self.dropped_path:
            dropped = f", {self.rows_dropped} rows dropped"
            if self.dropped_path:
                dropped += f" (kept in {self.dropped_path})"
        upstream = f", {self.failed_upstream} failed upstream" if self.failed_upstream else ""
        retried = f", {self.rows_retried} rows retried" if self.rows_retried else ""
        return (f"[dataflowmm] step {self.step} {self.operator}: {self.rows_in} rows in, "
                f"{self.rows_out} rows out{dropped}, {self.images_written} images written, "
                f"{self.errors} errors{upstream}{retried}, {self.seconds:.1f} s{resumed} -> {self.output_path}")


class StepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a step, with what was saved and how to go on."""

    def __init__(self, step: int, operator: str, rows_saved: int, rows_total: int, chunks_saved: int,
                 chunk_rows: int):
        self.rows_saved, self.rows_total, self.chunks_saved = rows_saved, rows_total, chunks_saved
        chunks = f"{chunks_saved} finished chunk" + ("s" if chunks_saved != 1 else "")
        saved = (f"{rows_saved} of {rows_total} rows saved in {chunks}; run the "
                 "same command to resume" if chunks_saved else
                 f"0 of {rows_total} rows saved (a chunk of {chunk_rows} rows is saved when it finishes)")
        super().__init__(f"interrupted in step {step} {operator}: {saved}")


def chunk_size(save_interval: int, batch_size: int) -> int:
    """save_interval rounded up to whole batches, so chunking never changes batch composition."""
    return -(-save_interval // batch_size) * batch_size


def check_required_keys(source: Path, keys: list[str]) -> None:
    """Fail fast, before any model loads, when no row has a key the operator needs.

    Reads only until every key has been seen (the first row, usually).
    """
    missing = set(keys)
    found: set[str] = set()
    rows = 0
    for row in iter_records(source):
        rows += 1
        missing.difference_update(row.keys())
        if not missing:
            return
        found.update(row.keys())
    if rows:
        key = next(key for key in keys if key in missing)
        raise KeyError(f"{source}: no row has key {key!r}; keys found: {sorted(found)}")


@dataclass
class PreparedStep:
    """A step about to compute: its operator, fingerprints, folders and chunking."""

    storage: FileStorage
    operator: StepOperator
    params: dict[str, Any]
    input_fingerprint: str
    fingerprint: str
    checkpoint_fingerprint: str  # the fingerprint without the input's content (chunks check theirs)
    context: StepContext
    batch_size: int
    chunk_rows: int
    started: float
    retry: list[list[int]] | None = None  # failed rows of the finished output to recompute

    @property
    def source(self) -> Path:
        return self.storage.input_path


def prepare_step(storage: FileStorage, operator: StepOperator) -> PreparedStep | StepSummary:
    """Check the step before any model loads; a `StepSummary` when a finished output is reused."""
    started = time.perf_counter()
    check_required_keys(storage.input_path, operator.required_keys())
    params = operator.params()
    input_fp = storage.input_fingerprint()
    step_fp = fingerprint(input_fp, operator.name, params)
    if storage.is_finished(step_fp):
        stale = why_not_reusable(storage, operator)
        manifest = storage.manifest() or {}
        every = bool(getattr(operator, "retry_errors", False))
        retry = [list(record) for record in manifest.get("failed_rows", ()) if every or record[3]]
        if stale is None and retry and operator.has_final_pass:
            stale = f"retrying {len(retry)} failed rows (the operator's final pass needs every row)"
        elif stale is None and retry:
            return _prepared(storage, operator, params, input_fp, step_fp, started, retry)
        if stale is None:
            summary = StepSummary(storage.operator_step, operator.name, manifest.get("rows_in", manifest["rows"]),
                                  manifest["rows"], 0, 0, time.perf_counter() - started,
                                  storage.location(storage.output_path), reused=True,
                                  rows_dropped=manifest.get("rows_dropped", 0))
            tqdm.write(summary.line(), file=sys.stderr)
            return summary
        tqdm.write(f"[dataflowmm] step {storage.operator_step} {operator.name}: recomputing the "
                   f"finished output: {stale}", file=sys.stderr)
    return _prepared(storage, operator, params, input_fp, step_fp, started)


def _prepared(storage: FileStorage, operator: StepOperator, params: dict, input_fp: str, step_fp: str,
              started: float, retry: list[list[int]] | None = None) -> PreparedStep:
    context = StepContext(
        step=storage.operator_step,
        input_dir=storage.input_folder,
        output_dir=storage.output_path.resolve().parent,
        save_dir=operator.resolve_save_dir(storage.images_dir).resolve(),
        output_url=storage.output_url,
        storage_options=storage.storage_options,
    )
    if operator.image_output_keys():  # a captioning step gets no empty images folder
        context.save_dir.mkdir(parents=True, exist_ok=True)
    batch_size = max(1, int(operator.input_batch_size))
    checkpoint_fp = fingerprint(storage.input_origin(), operator.name, params)
    return PreparedStep(storage, operator, params, input_fp, step_fp, checkpoint_fp, context, batch_size,
                        chunk_size(int(operator.settings.save_interval), batch_size), started, retry)


class StepOutput:
    """The growing output of a prepared step: checkpointed chunk by chunk, then published."""

    def __init__(self, step: PreparedStep):
        self.step = step
        self.store = step.storage.store
        if self.store is not None:  # the store's chunks are the checkpoint (any machine resumes)
            self.store.pull_checkpoint(step.storage.checkpoint_dir)
        self.checkpoint = StepCheckpoint(step.storage.checkpoint_dir, step.checkpoint_fingerprint, step.chunk_rows)
        if self.checkpoint.finished:
            self.checkpoint.keep_chunks_matching(step.storage.iter_input_chunks(step.chunk_rows))
        self.chunks_resumed = self.checkpoint.finished
        self.counts = OutputCounts(step.operator.image_output_keys(), step.context.output_dir,
                                   step.context.save_dir)
        remove_stale_temp_files(step.context.save_dir, step.storage.images_dir)
        self.rows_out = 0
        self.rows_retried = 0
        self.dropped_in_chunks = False
        for chunk in self.checkpoint.chunks:
            self.rows_out += chunk["rows_out"]
        if self.chunks_resumed:  # counted streaming: memory does not grow with the finished rows
            for row in self.checkpoint.finished_rows():
                self.counts.add((row,))
                self.dropped_in_chunks = self.dropped_in_chunks or DROP_MARK in row

    @property
    def rows_done(self) -> int:
        """Input rows already covered by finished chunks (skipped when reading the input)."""
        return self.checkpoint.rows_read

    @property
    def next_chunk(self) -> int:
        return self.checkpoint.finished

    def pending_chunks(self) -> Iterator[tuple[int, list[dict]]]:
        """(position of the first row, rows) of every chunk not finished yet, streamed."""
        first = self.rows_done
        for rows in self.step.storage.iter_input_chunks(self.step.chunk_rows, skip=first):
            yield first, rows
            first += len(rows)

    @property
    def failed_upstream(self) -> int:
        """Rows that arrived failed and were passed through (not this step's failures)."""
        return sum(chunk.get("failed_upstream", 0) for chunk in self.checkpoint.chunks)

    def add_chunk(self, rows_in: int, input_digest: str, rows: list[dict]) -> None:
        """One more finished chunk (its input's size and `chunk_digest`, its output rows in
        order), checkpointed at once."""
        payload, meta = finish_chunk(rows)
        record = self.checkpoint.append(rows_in, payload, len(rows),
                                        {**meta, "input": input_digest, **fitted_batch_sizes(self.step.operator)})
        self._count(rows)
        self._push_chunk(record, payload, rows)

    def add_serialized_chunk(self, rows_in: int, payload: bytes, meta: dict | None = None) -> None:
        """One more finished chunk given as JSON Lines bytes and its `finish_chunk` record
        (from another process)."""
        rows = [orjson.loads(line) for line in payload.splitlines()]
        record = self.checkpoint.append(rows_in, payload, len(rows), meta)
        self._count(rows)
        self._push_chunk(record, payload, rows)

    def _push_chunk(self, record: dict, payload: bytes, rows: list[dict]) -> None:
        if self.store is not None:
            self.store.push_chunk(self.step.storage.checkpoint_dir, record, payload, self.counts.generated_in(rows))

    def _count(self, rows: list[dict]) -> None:
        self.counts.add(rows)
        self.rows_out += len(rows)
        self.dropped_in_chunks = self.dropped_in_chunks or any(DROP_MARK in row for row in rows)

    def failed_rows(self) -> list[list[int]]:
        """`[input row, first output row, end, transient]` of every row this step failed, output
        rows counted in the checkpoint's rows (before the final pass)."""
        records, first = [], 0
        for chunk in self.checkpoint.chunks:
            records += [[position, first + start, first + end, transient]
                        for position, start, end, transient in chunk.get("failed", ())]
            first += chunk["rows_out"]
        return records

    def publish(self) -> StepSummary:
        """Make the checkpointed rows the step's cache file, write the manifest, report."""
        step, storage = self.step, self.step.storage
        rows_in = self.checkpoint.rows_read
        self.checkpoint.close()
        storage.remove_manifest()  # the old one must never describe new files
        failed = self.failed_rows()
        rows_path, dropped = self._split_dropped_rows(failed)
        published_as_written = rows_path == self.checkpoint.rows_path and storage.cache_type == "jsonl"
        sha256 = self.checkpoint.rows_sha256() if published_as_written else None
        output_path = storage.publish(rows_path)
        upstream = self.failed_upstream
        storage.write_manifest(operator=step.operator.name, params=step.params, sha256=sha256,
                               input_fingerprint=step.input_fingerprint, step_fingerprint=step.fingerprint,
                               rows=self.rows_out, extra={"rows_in": rows_in, "errors": self.counts.errors - upstream,
                                                         "images_written": self.counts.images,
                                                         "rows_dropped": dropped, "failed_upstream": upstream,
                                                         "failed_rows": failed,
                                                         "transient_rows": sum(r[3] for r in failed),
                                                         **merged_fitted_sizes(self.checkpoint.chunks)},
                               images=self.counts.referenced)
        self.checkpoint.remove()
        if self.store is not None:
            self.store.remove_checkpoint(storage.checkpoint_dir)
        self._remove_unreferenced_images()
        kept_in = str(storage.dropped_path) if step.operator.keep_dropped_rows() else None
        summary = StepSummary(storage.operator_step, step.operator.name, rows_in, self.rows_out,
                              self.counts.images, self.counts.errors - upstream,
                              time.perf_counter() - step.started, output_path,
                              chunks_resumed=self.chunks_resumed, rows_dropped=dropped,
                              dropped_path=kept_in, failed_upstream=upstream, rows_retried=self.rows_retried)
        tqdm.write(summary.line(), file=sys.stderr)
        return summary

    def close(self) -> None:
        self.checkpoint.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around the computing of chunks: on any failure, `abandon`; Ctrl-C says what was saved."""
        try:
            yield
        except KeyboardInterrupt as interrupt:
            self.abandon()
            step = self.step
            raise StepInterrupted(step.context.step, step.operator.name, self.rows_done,
                                  step.storage.count_input_rows(), self.checkpoint.finished,
                                  step.chunk_rows) from interrupt
        except BaseException:
            self.abandon()
            raise
        finally:
            self.checkpoint.close()

    def abandon(self) -> None:
        """After a failure: keep finished chunks for the rerun, leave no empty folders behind."""
        self.checkpoint.close()
        if not self.checkpoint.finished:
            self.checkpoint.remove()
        if self._owns_images_folder():
            remove_empty_folders(self.step.context.save_dir)

    def _owns_images_folder(self) -> bool:
        """The step's default images folder is its own; a user's `save_dir` may be shared."""
        return self.step.context.save_dir == self.step.storage.images_dir.resolve()

    def _remove_unreferenced_images(self) -> None:
        """Files in the step's own images folder that its output does not point to.

        Left by an earlier run with other parameters (e.g. more images per row): nothing
        references them any more, and they would be mistaken for part of the dataset.
        """
        folder = self.step.context.save_dir
        if not self._owns_images_folder() or not folder.is_dir():
            return
        for path in folder.rglob("*"):
            if path.is_file() and str(path) not in self.counts.referenced:
                path.unlink()
        remove_empty_folders(folder)

    def _split_dropped_rows(self, failed: list[list[int]]) -> tuple[Path, int]:
        """The checkpointed rows without the dropped ones (after the operator's final pass),
        and how many were dropped; those go to the side file (with the reason as `dropped_by`)
        when the operator keeps them. The output spans in `failed` are moved to match.

        Rows are rewritten only when something may be dropped, so other steps publish the
        checkpoint file as it is.
        """
        operator, storage = self.step.operator, self.step.storage
        side_path = storage.dropped_path
        keep = operator.keep_dropped_rows()
        if not keep:
            side_path.unlink(missing_ok=True)  # a stale side file from a run with other settings
        if not (operator.has_final_pass or self.dropped_in_chunks or keep):
            return self.checkpoint.rows_path, 0
        kept_path = self.checkpoint.folder / "kept.jsonl"
        dropped = 0
        bounds = {index for record in failed for index in record[1:3]}
        moved: dict[int, int] = {}
        rows = operator.final_pass(iter_records(self.checkpoint.rows_path))
        with open(kept_path, "wb") as kept, atomic_file(side_path) if keep else nullcontext() as side:
            for index, row in enumerate(rows):
                if index in bounds:
                    moved[index] = index - dropped
                if row.get(DROP_MARK) is None:
                    row.pop(DROP_MARK, None)
                    kept.write(dumps_row(row))
                    continue
                dropped += 1
                if side is not None:
                    row[DROPPED_KEY] = row.pop(DROP_MARK)
                    side.write(dumps_row(row))
        end = self.rows_out
        for record in failed:
            record[1], record[2] = (moved.get(record[1], end - dropped), moved.get(record[2], end - dropped))
        self.rows_out -= dropped
        return kept_path, dropped
