"""Run one operator over one storage step on a Ray cluster: the same bytes as the local runner.

The driver plans the step exactly as the local runner does (fingerprint, reuse, resume)
and sends the unfinished part of the input to its pool of Ray actors (`ray_actors`: one per
GPU, or the CPU cores split between actors), which lives across the steps of a pipeline:
start-up and model loads are paid once. A chunk carries its input: for jsonl the chunk's
lines as bytes, for other formats its rows, and always the input images its rows name
(read here: a worker on another machine sees none of this disk). An actor runs the chunk
batch by batch through `apply_batch` and returns its output rows as JSON Lines bytes with
the bytes of the files it wrote. The driver receives the chunks in input order, writes
their files, then appends the rows to the step's checkpoint, so a killed Ray run resumes
with either runner, and publishes the same cache file, images and manifest.

The driver is the only writer of the cache unless an actor's node shares its disk: the
driver writes a random token into the step's checkpoint folder (and into `save_dir` when
that lies elsewhere), and an actor that reads the same token back writes its images there
directly, as the local runner does.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataflowmm.checks import check_positive_int
from dataflowmm.execution.cache_lock import cache_lock
from dataflowmm.execution.progress import progress_bar
from dataflowmm.execution.ray_actors import Placement, actor_pool, close_actor_pool
from dataflowmm.execution.ray_connect import connect, import_ray
from dataflowmm.execution.retry import retry_rows
from dataflowmm.execution.step import (
    PreparedStep,
    StepOutput,
    StepSummary,
    prepare_step,
)
from dataflowmm.execution.store_lock import store_lock
from dataflowmm.io.atomic import atomic_write_text
from dataflowmm.io.carried_files import write_files_atomically
from dataflowmm.io.paths import is_local_path, resolve_paths
from dataflowmm.io.records import dumps_rows, jsonl_spans, read_jsonl_span
from dataflowmm.io.remote import protocol

if TYPE_CHECKING:
    from dataflowmm.execution.protocol import StepOperator
    from dataflowmm.storage import FileStorage

__all__ = ["RayRunner", "connect"]


class RayRunner:
    """Runs a step's batches on a pool of Ray actors (`pip install 'dataflowmm[ray]'`).

    Outputs are byte-identical to `LocalRunner`'s: every chunk of `save_interval` rows is
    processed by one actor, batch by batch as locally, and checkpointed by the driver in
    input order. A finished step is reused and an unfinished one resumed by either runner.

    The actors live across steps: every step of a pipeline run (and every `RayRunner` with
    the same placement in this process) uses the same actors, and a serving an actor has
    loaded is reused by a later step whose serving has the same configuration, so start-up
    and model loads are paid once. `close()` (or leaving a `with RayRunner(...)` block)
    ends them; so does the end of the process.

    Args:
        address: `None` starts a local cluster; `"auto"` joins the cluster started on this
            machine with `ray start --head`; `"ray://host:10001"` a remote one.
        replicas: actors, each with its own copy of the serving; default one per GPU of the
            cluster, else one per CPU.
        num_cpus: CPUs of a local cluster started here (default: all); never passed to a
            cluster this process joins.
        gpus_per_replica: GPUs each actor reserves; default 1 when the cluster has GPUs, else 0.
        runtime_env: Ray's `runtime_env` for the job, instead of the pipeline's own folder as
            `working_dir` (credentials and offline settings are added to its `env_vars`).
    """

    def __init__(self, address: str | None = None, replicas: int | None = None, *,
                 num_cpus: int | None = None, gpus_per_replica: float | None = None,
                 runtime_env: dict | None = None):
        import_ray()
        if replicas is not None:
            check_positive_int("replicas", replicas)
        self.address = address
        self.replicas = replicas
        self.num_cpus = num_cpus
        self.gpus_per_replica = gpus_per_replica
        self.runtime_env = runtime_env

    def __repr__(self) -> str:
        return f"RayRunner(address={self.address!r}, replicas={self.replicas!r})"

    # -- a step ---------------------------------------------------------------------------

    def run(self, storage: FileStorage, operator: StepOperator) -> StepSummary:
        """Run `operator` (keys bound) on `storage`'s current step, reusing or resuming what is done.

        The driver holds the cache's lock throughout: another process running on it fails at
        once (on an object store, also the store's lock: `execution.store_lock`)."""
        if storage.store is not None and protocol(storage.store.url) == "memory":
            raise ValueError(f"cache_path {storage.store.url} lives in this process's memory: Ray actors on "
                             "other processes cannot write to it (use the local runner, or an object store)")
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
        with output.running():
            count, chunks = self._pending_chunks(step, output)
            if count:
                connect(self.address, self.num_cpus, runtime_env=self.runtime_env,
                        module_name=type(step.operator).__module__)
                pool = actor_pool(self._placement())
                with _node_check(step) as tokens, progress_bar(step, output.rows_done) as progress:
                    task = (step.operator, step.context, str(step.source), step.batch_size, tokens)
                    for result in pool.run_chunks(task, output.next_chunk, count, chunks):
                        if result.chunk != output.next_chunk:
                            raise RuntimeError(f"Ray returned chunk {result.chunk} where {output.next_chunk} was due")
                        write_files_atomically(result.files)  # before the checkpoint says they exist
                        output.add_serialized_chunk(result.rows_in, result.payload, result.meta)
                        progress.update(result.rows_in)
        return output.publish()

    @staticmethod
    def _pending_chunks(step: PreparedStep, output: StepOutput) -> tuple[int, Iterator[dict]]:
        """How many chunks are unfinished, and their descriptors, each made when it is sent."""
        first_chunk = output.next_chunk
        if step.source.suffix.lower() == ".jsonl":
            spans = list(jsonl_spans(step.source, step.chunk_rows, skip=output.rows_done))
            return len(spans), (_jsonl_descriptor(step, first_chunk + index, span)
                                for index, span in enumerate(spans))
        rows_left = step.storage.count_input_rows() - output.rows_done
        descriptors = ({"chunk": first_chunk + index, "first": first, "rows": len(rows), "span": None,
                        "payload": dumps_rows(rows), "files": _input_images(step, rows)}
                       for index, (first, rows) in enumerate(output.pending_chunks()))
        return -(-max(rows_left, 0) // step.chunk_rows), descriptors

    def _placement(self) -> Placement:
        """Actors, GPUs and CPUs per actor, and torch threads per actor (CPU only)."""
        import ray

        resources = ray.cluster_resources()
        cluster_gpus = int(resources.get("GPU", 0))
        cluster_cpus = max(1, int(resources.get("CPU", 1)))
        gpus = self.gpus_per_replica if self.gpus_per_replica is not None else (1 if cluster_gpus else 0)
        actors = self.replicas or (max(1, int(cluster_gpus // gpus)) if gpus else cluster_cpus)
        if gpus:
            return Placement(actors, gpus, 1, None)
        # CPU only: the cores are split between the actors, so N actors do not oversubscribe
        # them, and the split (which float results depend on) does not change with the number
        # of chunks. Ray accounts half a CPU each, leaving room for other work on the cluster.
        return Placement(actors, 0, min(1.0, cluster_cpus / actors) / 2, max(1, cluster_cpus // actors))

    def close(self) -> None:
        """End this process's Ray actors and free the models they hold; the next Ray step starts
        new ones. (They also end with the process.)"""
        close_actor_pool()

    def __enter__(self) -> RayRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _jsonl_descriptor(step: PreparedStep, chunk: int, span: Any) -> dict:
    """A jsonl chunk as it travels: its lines' bytes (parsed on the actor, as the local runner
    parses them) and the input images its rows name."""
    with open(step.source, "rb") as file:
        file.seek(span.start)
        data = file.read(span.end - span.start)
    try:
        rows = read_jsonl_span(step.source, span, data) if step.operator.path_keys() else []
    except ValueError:  # a malformed line: the actor raises it in its turn, as the local runner
        rows = []
    return {"chunk": chunk, "first": span.first_row, "rows": span.rows, "payload": data,
            "span": (span.first_row, span.rows, span.start, span.end, span.first_line),
            "files": _input_images(step, rows)}


def _input_images(step: PreparedStep, rows: list[dict]) -> dict[str, bytes]:
    """The bytes of every file the rows' path columns name that exists here, by absolute path.

    Sent with every chunk, whatever the actor's node sees: no question to each node first,
    and still right when Ray restarts an actor elsewhere (what it costs where the actors could
    read them themselves: `ratio_images_sent_vs_read` in benchmarks/ray_runner.py)."""
    keys = step.operator.path_keys()
    files: dict[str, bytes] = {}
    for row in rows:
        for key in keys:
            for path in _local_paths(resolve_paths(row.get(key), step.context.input_dir)):
                if path not in files and os.path.isfile(path):
                    files[path] = Path(path).read_bytes()
    return files


def _local_paths(value: Any) -> Iterator[str]:
    if isinstance(value, list):
        for item in value:
            yield from _local_paths(item)
    elif is_local_path(value):
        yield value


@contextlib.contextmanager
def _node_check(step: PreparedStep) -> Iterator[list[tuple[str, str]]]:
    """(file, random token) pairs written into the step's checkpoint folder and, when it lies
    outside the cache folder, `save_dir`: an actor that reads them all back shares this disk."""
    token = secrets.token_hex(16)
    folders = [step.storage.checkpoint_dir]
    save_dir = step.context.save_dir
    if save_dir.is_dir() and step.context.output_dir not in (save_dir, *save_dir.parents):
        folders.append(save_dir)
    pairs = [(str(folder / ".dataflowmm-node-check"), token) for folder in folders]
    for path, _ in pairs:
        atomic_write_text(path, token, fsync=False)
    try:
        yield pairs
    finally:
        for path, _ in pairs[1:]:  # the checkpoint folder's goes with it
            Path(path).unlink(missing_ok=True)
