"""Run one operator over one storage step in this process: streamed, checkpointed, resumable."""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING

from dataflowmm.execution.batch import apply_chunk
from dataflowmm.execution.cache_lock import cache_lock
from dataflowmm.execution.checkpoints import chunk_digest
from dataflowmm.execution.progress import progress_bar
from dataflowmm.execution.retry import retry_rows
from dataflowmm.execution.step import (
    StepOutput,
    StepSummary,
    prepare_step,
)
from dataflowmm.execution.store_lock import store_lock

if TYPE_CHECKING:
    from dataflowmm.execution.protocol import StepOperator
    from dataflowmm.storage import FileStorage


class LocalRunner:
    """Runs batches in this process, one after another (the default runner of `FileStorage`).

    The input is read in chunks of `save_interval` rows (rounded up to whole batches);
    each finished chunk is appended to the step's checkpoint, so memory does not grow with
    the row count and a killed run resumes after the last finished chunk.
    """

    def run(self, storage: FileStorage, operator: StepOperator) -> StepSummary:
        """Run `operator` (keys bound) on `storage`'s current step, reusing or resuming what is done.

        The cache's lock is held throughout: another process running on it fails at once
        (on an object store, also the store's lock: `execution.store_lock`)."""
        with cache_lock(storage.cache_path, storage.file_name_prefix), \
                store_lock(storage.store, storage.file_name_prefix) if storage.store else nullcontext():
            return self._run(storage, operator)

    def _run(self, storage: FileStorage, operator: StepOperator) -> StepSummary:
        step = prepare_step(storage, operator)
        if isinstance(step, StepSummary):
            return step
        if step.retry:  # a finished step with failed rows to recompute, in this process
            return retry_rows(step)
        output = StepOutput(step)
        with output.running(), progress_bar(step, output.rows_done) as progress:
            for first, rows in output.pending_chunks():
                output.add_chunk(len(rows), chunk_digest(rows), apply_chunk(
                    step.operator, rows, step.context, first_row=first, batch_size=step.batch_size,
                    source=step.source, on_batch=progress.update))
        return output.publish()

    def __repr__(self) -> str:
        return "LocalRunner()"


def run_step(storage: FileStorage, operator: StepOperator) -> StepSummary:
    """Run a bound operator on `storage`'s step with the storage's runner (`LocalRunner` when
    the storage names none): where every operator's `run()` ends."""
    runner = storage.runner if storage.runner is not None else LocalRunner()
    return runner.run(storage, operator)
