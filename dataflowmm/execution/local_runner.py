"""Run one operator over one storage step locally: chunked, checkpointed, resumable."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from dataflowmm.execution.batch import ERROR_KEY, RowError, StepContext
from dataflowmm.execution.checkpoints import ChunkCheckpoints
from dataflowmm.io.paths import relative_paths, resolve_paths
from dataflowmm.seeds import row_identity
from dataflowmm.storage import fingerprint

if TYPE_CHECKING:
    from dataflowmm.operators.base import Operator
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

    def line(self) -> str:
        if self.reused:
            return (f"[dataflowmm] step {self.step} {self.operator}: reused finished output "
                    f"({self.rows_out} rows) -> {self.output_path}")
        resumed = f", {self.chunks_resumed} chunks resumed" if self.chunks_resumed else ""
        return (f"[dataflowmm] step {self.step} {self.operator}: {self.rows_in} rows in, "
                f"{self.rows_out} rows out, {self.images_written} images written, "
                f"{self.errors} errors, {self.seconds:.1f} s{resumed} -> {self.output_path}")


def chunk_size(save_interval: int, batch_rows: int) -> int:
    """save_interval rounded up to whole batches, so chunking never changes batch composition."""
    return -(-save_interval // batch_rows) * batch_rows


def check_required_keys(records: list[dict], keys: list[str], source: Path) -> None:
    """Fail fast, before any model loads, when no row has a key the operator needs."""
    if not records:
        return
    present = set().union(*(row.keys() for row in records))
    for key in keys:
        if key not in present:
            raise KeyError(f"{source}: no row has key {key!r}; keys found: {sorted(present)}")


def run_step(storage: FileStorage, operator: Operator) -> StepSummary:
    """Run `operator` on `storage`'s current step, reusing or resuming what is already done."""
    started = time.perf_counter()
    records = storage.read("dict")
    check_required_keys(records, operator.required_keys(), storage.input_path)
    params = operator.params()
    input_fp = storage.input_fingerprint()
    step_fp = fingerprint(input_fp, operator.name, params)
    if storage.is_finished(step_fp):
        summary = StepSummary(storage.operator_step, operator.name, len(records), storage.manifest()["rows"],
                              0, 0, time.perf_counter() - started, str(storage.output_path), reused=True)
        tqdm.write(summary.line(), file=sys.stderr)
        return summary

    context = StepContext(
        step=storage.operator_step,
        input_dir=storage.input_path.resolve().parent,
        output_dir=storage.output_path.resolve().parent,
        save_dir=operator.resolve_save_dir(storage.images_dir).resolve(),
    )
    context.save_dir.mkdir(parents=True, exist_ok=True)
    batch_rows = max(1, int(operator.batch_rows()))
    rows_per_chunk = chunk_size(int(operator.settings.save_interval), batch_rows)
    checkpoints = ChunkCheckpoints(storage.checkpoint_dir, step_fp, rows_per_chunk)
    rows_out, counts, resumed = _run_chunks(operator, records, context, checkpoints,
                                            rows_per_chunk, batch_rows, storage.input_path)
    for row in rows_out:
        row.setdefault(ERROR_KEY, None)
    output_path = storage.write(rows_out, operator=operator.name, params=params,
                                input_fingerprint=input_fp, step_fingerprint=step_fp)
    checkpoints.remove()
    summary = StepSummary(storage.operator_step, operator.name, len(records), len(rows_out),
                          counts["images_written"], counts["errors"], time.perf_counter() - started,
                          output_path, chunks_resumed=resumed)
    tqdm.write(summary.line(), file=sys.stderr)
    return summary


def _run_chunks(operator, records, context, checkpoints, rows_per_chunk, batch_rows, source):
    """Process rows chunk by chunk, loading finished chunks instead of recomputing them."""
    row_ids = [row_identity(row, index) for index, row in enumerate(records)]
    rows_out: list[dict] = []
    counts = {"errors": 0, "images_written": 0}
    resumed = 0
    progress = tqdm(total=len(records), unit="row", desc=f"step {context.step} {operator.name}",
                    disable=None, file=sys.stderr)
    with progress:
        for chunk_index, start in enumerate(range(0, len(records), rows_per_chunk)):
            stop = min(start + rows_per_chunk, len(records))
            chunk = checkpoints.load(chunk_index)
            if chunk is None:
                chunk = _compute_chunk(operator, records, row_ids, start, stop, batch_rows,
                                       context, source, progress)
                checkpoints.save(chunk_index, chunk)
                # Continue from the saved copy so a fresh run and a resumed run assemble
                # their output from identical (JSON round-tripped) rows.
                chunk = checkpoints.load(chunk_index)
            else:
                resumed += 1
                progress.update(stop - start)
            rows_out.extend(chunk["rows"])
            counts["errors"] += chunk["errors"]
            counts["images_written"] += chunk["images_written"]
    return rows_out, counts, resumed


def _compute_chunk(operator, records, row_ids, start, stop, batch_rows, context, source, progress):
    path_keys = operator.path_keys()
    output_dir = None if operator.settings.absolute_paths else context.output_dir
    chunk = {"rows": [], "errors": 0, "images_written": 0}
    for batch_start in range(start, stop, batch_rows):
        batch_stop = min(batch_start + batch_rows, stop)
        rows = [_with_paths(records[index], path_keys, lambda v: resolve_paths(v, context.input_dir))
                for index in range(batch_start, batch_stop)]
        try:
            result = operator.process_batch(rows, row_ids[batch_start:batch_stop], context)
        except RowError as error:
            raise RowError(f"{source}: row {batch_start + error.row_offset}: {error}",
                           batch_start + error.row_offset) from error
        if output_dir is not None:
            result.rows = [_with_paths(row, path_keys, lambda v: relative_paths(v, output_dir))
                           for row in result.rows]
        chunk["rows"].extend(result.rows)
        chunk["errors"] += result.errors
        chunk["images_written"] += result.images_written
        progress.update(batch_stop - batch_start)
    return chunk


def _with_paths(row: dict, keys: list[str], convert) -> dict:
    return {key: convert(value) if key in keys else value for key, value in row.items()}
