"""Retrying the failed rows of a finished step: only those rows are recomputed.

A finished step's manifest lists the input rows it failed (`failed_rows`: input row, its
output rows' span, transient or not). The next run of the step recomputes the input rows
that failed transiently (or every failed one with `run(..., retry_errors=True)`), in
batches of the step's batch size, in the driver, whichever runner the storage has: every
other output row is copied byte for byte, and the output rows of each retried input row are
replaced by its new ones. Rows are read and written streamed.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator

import orjson
from tqdm.auto import tqdm

from dataflowmm.execution.batch import (
    OutputCounts,
    apply_batch,
    fitted_batch_sizes,
    merged_fitted_sizes,
)
from dataflowmm.execution.protocol import (
    DROP_MARK,
    DROPPED_KEY,
    ERROR_KEY,
    ROW_MARK,
    TRANSIENT_MARK,
)
from dataflowmm.execution.step import PreparedStep, StepSummary
from dataflowmm.io.atomic import atomic_file
from dataflowmm.io.records import dumps_row, iter_records
from dataflowmm.seeds import row_identity


def retry_rows(step: PreparedStep) -> StepSummary:
    """Recompute `step.retry`'s input rows of the finished step and publish the patched output."""
    storage, operator = step.storage, step.operator
    manifest = storage.manifest() or {}
    plan = sorted(step.retry, key=lambda record: record[1])
    new_rows = _recomputed(step, sorted({record[0] for record in plan}))
    folder = storage.checkpoint_dir
    folder.mkdir(parents=True, exist_ok=True)
    patched = folder / "retried.jsonl"
    counts = OutputCounts(operator.image_output_keys(), step.context.output_dir, step.context.save_dir)
    failed: list[list[int]] = []
    retried_at = {record[1]: record for record in plan}
    kept_failures = {record[1]: record for record in manifest.get("failed_rows", ())
                     if record[1] not in retried_at}
    dropped: list[dict] = []
    try:
        with open(patched, "wb") as out:
            written, skip_to = 0, -1
            for index, line in enumerate(_output_lines(storage.output_path)):
                if index < skip_to:
                    continue
                record = retried_at.get(index)
                if record is not None:
                    skip_to = record[2]
                    written = _write_new(out, new_rows[record[0]], record[0], written, failed, counts, dropped)
                    continue
                old = kept_failures.get(index)
                if old is not None:
                    failed.append([old[0], written, written + old[2] - old[1], old[3]])
                out.write(line)
                counts.add((_parse(line),))
                written += 1
        if dropped and operator.keep_dropped_rows():
            _append_dropped(storage.dropped_path, dropped)
        output_path = storage.publish(patched)
        upstream = manifest.get("failed_upstream", 0)
        storage.write_manifest(
            operator=operator.name, params=step.params, input_fingerprint=step.input_fingerprint,
            step_fingerprint=step.fingerprint, rows=written,
            extra={"rows_in": manifest.get("rows_in", written), "errors": counts.errors - upstream,
                   "images_written": counts.images, "rows_dropped": manifest.get("rows_dropped", 0) + len(dropped),
                   "failed_upstream": upstream, "failed_rows": failed,
                   "transient_rows": sum(record[3] for record in failed),
                   **merged_fitted_sizes([manifest, fitted_batch_sizes(operator)])})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    summary = StepSummary(storage.operator_step, operator.name, manifest.get("rows_in", written), written,
                          counts.images, counts.errors - upstream, time.perf_counter() - step.started,
                          output_path, rows_dropped=manifest.get("rows_dropped", 0) + len(dropped),
                          failed_upstream=upstream, rows_retried=len(new_rows))
    tqdm.write(summary.line(), file=sys.stderr)
    return summary


def _recomputed(step: PreparedStep, positions: list[int]) -> dict[int, list[dict]]:
    """New output rows (markers kept) of the input rows at `positions`, by position."""
    wanted = set(positions)
    inputs = {index: row for index, row in enumerate(iter_records(step.source)) if index in wanted}
    new_rows: dict[int, list[dict]] = {position: [] for position in positions}
    for start in range(0, len(positions), step.batch_size):
        group = positions[start:start + step.batch_size]
        rows = [inputs[position] for position in group]
        ids = [row_identity(row, position) for row, position in zip(rows, group, strict=True)]
        out = apply_batch(step.operator, rows, ids, step.context, first_row=0, source=step.source)
        owner = group[0]
        for row in out:
            mark = row.pop(ROW_MARK, None)
            owner = group[mark] if isinstance(mark, int) and 0 <= mark < len(group) else owner
            new_rows[owner].append(row)
    return new_rows


def _write_new(out, rows: list[dict], position: int, written: int, failed: list[list[int]],
               counts: OutputCounts, dropped: list[dict]) -> int:
    """Write one retried input row's new output rows; returns the rows written so far."""
    start, transient, any_failed = written, False, False
    for row in rows:
        transient = bool(row.pop(TRANSIENT_MARK, False)) or transient
        if row.get(DROP_MARK) is not None:
            row[DROPPED_KEY] = row.pop(DROP_MARK)
            dropped.append(row)
            continue
        row.pop(DROP_MARK, None)
        any_failed = any_failed or row.get(ERROR_KEY) is not None
        out.write(dumps_row(row))
        counts.add((row,))
        written += 1
    if any_failed:
        failed.append([position, start, written, int(transient)])
    return written


def _output_lines(path) -> Iterator[bytes]:
    """The finished output's rows as JSON Lines bytes (a jsonl cache file's own lines)."""
    if path.suffix.lower() == ".jsonl":
        with open(path, "rb") as rows:
            for line in rows:
                yield line if line.endswith(b"\n") else line + b"\n"
    else:
        for row in iter_records(path):
            yield dumps_row(row)


def _parse(line: bytes) -> dict:
    return orjson.loads(line)


def _append_dropped(path, rows: list[dict]) -> None:
    with atomic_file(path) as side:
        if path.is_file():
            with open(path, "rb") as old:
                shutil.copyfileobj(old, side)
        for row in rows:
            side.write(dumps_row(row))
