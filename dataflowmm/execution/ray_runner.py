"""Run one operator over one storage step on Ray Data: the same bytes as the local runner.

The driver plans the step exactly as the local runner does (fingerprint, reuse, resume)
and turns the unfinished part of the input into chunk descriptors: for jsonl, where each
chunk's lines lie in the file, so no row passes through the driver; for other formats,
the chunk's rows. Ray Data maps the descriptors on a pool of actors (`map_batches` with
`ActorPoolStrategy`), each holding one copy of the operator and its serving (one actor
per GPU, or the CPU cores split between actors). An actor reads its chunk, runs it
batch by batch through `apply_batch` and returns the chunk's output as JSON Lines bytes.
The driver receives the chunks in order and appends each to the step's checkpoint, so a
killed Ray run resumes with either runner, and publishes the same cache file and manifest.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataflowmm.checks import check_positive_int
from dataflowmm.execution.batch import apply_chunk, finish_chunk, fitted_batch_sizes
from dataflowmm.execution.cache_lock import cache_lock
from dataflowmm.execution.checkpoints import chunk_digest
from dataflowmm.execution.progress import progress_bar
from dataflowmm.execution.protocol import RowError, StepContext
from dataflowmm.execution.retry import retry_rows
from dataflowmm.execution.step import (
    PreparedStep,
    StepOutput,
    StepSummary,
    prepare_step,
)
from dataflowmm.io.records import JsonlSpan, StorageError, dumps_rows, jsonl_spans, read_jsonl_span

if TYPE_CHECKING:
    from dataflowmm.execution.protocol import StepOperator
    from dataflowmm.storage import FileStorage

# Passed to the cluster's workers so they find the same models, offline, as the driver.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                 "DATAFLOWMM_MODELS_DIR", "DATAFLOWMM_PRODUCED_DATA_DIR", "DJ_PRODUCED_DATA_DIR")
# Errors about the data (not the cluster): an actor returns them and the driver raises them
# as the local runner would, instead of Ray's wrapper that keeps only their text.
_DATA_ERRORS = (RowError, StorageError, OSError)


class StorageNotShared(OSError):
    """A Ray worker cannot see the step's files: cache_path and save_dir must be shared."""


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError("the Ray runner needs Ray: pip install 'dataflowmm[ray]'") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address` (`"auto"`: the one `ray start --head` started here, or
    `ray://host:10001`), or start a local one when `address` is None. Does nothing when
    Ray is already initialised in this process."""
    ray = _import_ray()
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    # Operators defined next to the pipeline script must import on the workers too.
    env_vars["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path and os.path.isdir(path))
    options: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}, "logging_level": "WARNING",
                               "log_to_driver": False}
    if address is None:
        options.update(include_dashboard=False, num_cpus=num_cpus)
    try:
        ray.init(address=address, **options)
    except (ConnectionError, TimeoutError, RuntimeError) as error:
        raise ConnectionError(
            f"cannot reach the Ray cluster at {address!r} ({' '.join(str(error).split())[:300]}); "
            "start one with `ray start --head` on this machine, or run without --ray-address to "
            "start a local cluster") from None


class RayRunner:
    """Runs a step's batches on a Ray cluster with Ray Data (`pip install 'dataflowmm[ray]'`).

    Outputs are byte-identical to `LocalRunner`'s: every chunk of `save_interval` rows is
    processed by one actor, batch by batch as locally, and checkpointed by the driver in
    input order. A finished step is reused and an unfinished one resumed by either runner.

    Args:
        address: `None` starts a local cluster; `"auto"` joins the cluster started on this
            machine with `ray start --head`; `"ray://host:10001"` a remote one.
        replicas: actors, each with its own copy of the serving; default one per GPU of the
            cluster, else one per CPU.
        num_cpus: CPUs of a local cluster started here (default: all).
        gpus_per_replica: GPUs each actor reserves; default 1 when the cluster has GPUs, else 0.
    """

    def __init__(self, address: str | None = None, replicas: int | None = None, *,
                 num_cpus: int | None = None, gpus_per_replica: float | None = None):
        _import_ray()
        if replicas is not None:
            check_positive_int("replicas", replicas)
        self.address = address
        self.replicas = replicas
        self.num_cpus = num_cpus
        self.gpus_per_replica = gpus_per_replica

    def __repr__(self) -> str:
        return f"RayRunner(address={self.address!r}, replicas={self.replicas!r})"

    # -- a step ---------------------------------------------------------------------------

    def run(self, storage: FileStorage, operator: StepOperator) -> StepSummary:
        """Run `operator` (keys bound) on `storage`'s current step, reusing or resuming what is done.

        The driver holds the cache's lock throughout: another process running on it fails at once."""
        with cache_lock(storage.cache_path, storage.file_name_prefix):
            return self._run(storage, operator)

    def _run(self, storage: FileStorage, operator: StepOperator) -> StepSummary:
        step = prepare_step(storage, operator)
        if isinstance(step, StepSummary):
            return step
        if step.retry:  # a finished step with failed rows to recompute, in this process
            return retry_rows(step)
        output = StepOutput(step)
        with output.running():
            chunks = self._pending_chunks(step, output)
            if chunks:
                connect(self.address, self.num_cpus)
                with progress_bar(step, output.rows_done) as progress:
                    for chunk, rows_in, payload, meta in self._results(step, chunks):
                        if chunk != output.next_chunk:
                            raise RuntimeError(f"Ray returned chunk {chunk} where {output.next_chunk} was due")
                        output.add_serialized_chunk(rows_in, payload, meta)
                        progress.update(rows_in)
        return output.publish()

    @staticmethod
    def _pending_chunks(step: PreparedStep, output: StepOutput) -> list[dict]:
        """One descriptor per unfinished chunk: where its rows are (jsonl) or the rows themselves."""
        first_chunk = output.next_chunk
        if step.source.suffix.lower() == ".jsonl":
            spans = jsonl_spans(step.source, step.chunk_rows, skip=output.rows_done)
            return [{"chunk": first_chunk + index, "first": span.first_row, "rows": span.rows,
                     "start": span.start, "end": span.end, "line": span.first_line, "payload": b""}
                    for index, span in enumerate(spans)]
        descriptors = []
        for index, (first, rows) in enumerate(output.pending_chunks()):
            descriptors.append({"chunk": first_chunk + index, "first": first, "rows": len(rows),
                                "start": 0, "end": 0, "line": 0, "payload": dumps_rows(rows)})
        return descriptors

    def _results(self, step: PreparedStep, chunks: list[dict]):
        """(chunk, rows read, output bytes, chunk record) of every chunk, in input order, as actors
        finish them."""
        import ray

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        replicas, gpus, cpus, threads = self._placement(len(chunks))
        # One chunk in flight per actor: a slow chunk never holds others queued behind it, so
        # chunks finish (and are checkpointed) close to input order.
        dataset = ray.data.from_items(chunks, override_num_blocks=len(chunks))
        mapped = dataset.map_batches(
            _ChunkWorker,
            fn_constructor_kwargs={"operator": step.operator, "context": step.context,
                                   "source": str(step.source), "batch_size": step.batch_size,
                                   "torch_threads": threads},
            batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=1),
            num_gpus=gpus, num_cpus=cpus, max_restarts=3, max_task_retries=3)
        # No prefetching: each chunk is checkpointed as soon as it (and those before it) are done.
        for batch in mapped.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            for chunk, rows_in, payload, meta, failure in zip(batch["chunk"], batch["rows_in"], batch["payload"],
                                                              batch["meta"], batch["failure"], strict=True):
                if bytes(failure):
                    raise pickle.loads(bytes(failure))
                yield int(chunk), int(rows_in), bytes(payload), json.loads(bytes(meta) or b"{}")

    def _placement(self, chunks: int) -> tuple[int, float, float, int | None]:
        """Actors, GPUs and CPUs per actor, and torch threads per actor (CPU only)."""
        import ray

        resources = ray.cluster_resources()
        cluster_gpus = int(resources.get("GPU", 0))
        cluster_cpus = max(1, int(resources.get("CPU", 1)))
        gpus = self.gpus_per_replica if self.gpus_per_replica is not None else (1 if cluster_gpus else 0)
        wanted = self.replicas or (max(1, int(cluster_gpus // gpus)) if gpus else cluster_cpus)
        replicas = max(1, min(wanted, chunks))  # no idle actors for a short step
        if gpus:
            return replicas, gpus, 1, None
        # CPU only: the cores are split between the actors asked for, so N actors do not
        # oversubscribe them, and the split (which float results depend on) does not change
        # with the number of chunks. Ray accounts half a CPU each, leaving Ray Data room to work.
        return replicas, 0, min(1.0, cluster_cpus / wanted) / 2, max(1, cluster_cpus // wanted)


class _ChunkWorker:
    """A Ray Data actor: one copy of the operator and its serving, processing whole chunks."""

    def __init__(self, operator: StepOperator, context: StepContext, source: str, batch_size: int,
                 torch_threads: int | None):
        self.torch_threads = torch_threads
        self.problem = _storage_problem(context, source)
        self.operator = operator
        self.context = context
        self.source = source
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        self._set_torch_threads()
        results: dict[str, list] = {"chunk": [], "rows_in": [], "payload": [], "meta": [], "failure": []}
        for index in range(len(batch["chunk"])):
            rows_in, payload, meta, failure = 0, b"", b"", b""
            try:
                if self.problem is not None:
                    raise self.problem
                rows = self._rows(batch, index)
                input_digest = chunk_digest(rows)
                out = apply_chunk(self.operator, rows, self.context, first_row=int(batch["first"][index]),
                                  batch_size=self.batch_size, source=self.source)
                payload, record = finish_chunk(out)
                # The servings live here, in the actor: what fit in its memory travels with the chunk.
                record = {**record, "input": input_digest, **fitted_batch_sizes(self.operator)}
                rows_in, meta = len(rows), json.dumps(record).encode()
            except _DATA_ERRORS as error:
                failure = pickle.dumps(error)
            results["chunk"].append(int(batch["chunk"][index]))
            results["rows_in"].append(rows_in)
            results["payload"].append(payload)
            results["meta"].append(meta)
            results["failure"].append(failure)
        return {"chunk": np.array(results["chunk"]), "rows_in": np.array(results["rows_in"]),
                "payload": np.array(results["payload"], dtype=object),
                "meta": np.array(results["meta"], dtype=object),
                "failure": np.array(results["failure"], dtype=object)}

    def _set_torch_threads(self) -> None:
        # Here, not in __init__: Ray Data calls the actor from another thread, and OpenMP's
        # thread count is per calling thread. Float results depend on it, so it must hold.
        if self.torch_threads and "torch" in sys.modules:
            import torch

            if torch.get_num_threads() != self.torch_threads:
                torch.set_num_threads(self.torch_threads)

    def _rows(self, batch: dict, index: int) -> list[dict]:
        import orjson

        payload = bytes(batch["payload"][index])
        if payload:
            return [orjson.loads(line) for line in payload.splitlines()]
        span = JsonlSpan(int(batch["first"][index]), int(batch["rows"][index]), int(batch["start"][index]),
                         int(batch["end"][index]), int(batch["line"][index]))
        return read_jsonl_span(self.source, span)


def _storage_problem(context: StepContext, source: str) -> StorageNotShared | None:
    """What to fix when this worker cannot see the step's input or folders, else None."""
    # save_dir exists only for steps that write images; its parent must be visible in any case.
    save_dir = context.save_dir if context.save_dir.exists() else context.save_dir.parent
    for what, path in (("the step's input", Path(source)), ("cache_path", context.output_dir),
                       ("save_dir", save_dir)):
        if not path.exists():
            return StorageNotShared(
                f"{what} {path} is not visible on Ray node {socket.gethostname()}: cache_path and "
                "save_dir (and the pipeline's input) must be on storage every node sees, e.g. a "
                "shared file system mounted at the same path")
    return None
