"""Run one operator over one storage step on a Ray cluster: the same bytes as the local runner.

The driver plans the step exactly as the local runner does (fingerprint, reuse, resume)
and turns the unfinished part of the input into chunk descriptors: for jsonl, where each
chunk's lines lie in the file, so no row passes through the driver; for other formats,
the chunk's rows. The chunks go to the driver's pool of Ray actors (`ray_actors`: one per
GPU, or the CPU cores split between actors), which lives across the steps of a pipeline:
start-up and model loads are paid once. An actor reads its chunk, runs it batch by batch
through `apply_batch` and returns the chunk's output as JSON Lines bytes. The driver
receives the chunks in order and appends each to the step's checkpoint, so a killed Ray run
resumes with either runner, and publishes the same cache file and manifest.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from dataflowmm.checks import check_positive_int
from dataflowmm.execution.cache_lock import cache_lock
from dataflowmm.execution.progress import progress_bar
from dataflowmm.execution.ray_actors import (  # noqa: F401 (StorageNotShared: part of this API)
    Placement,
    StorageNotShared,
    actor_pool,
    close_actor_pool,
    storage_problem,
)
from dataflowmm.execution.retry import retry_rows
from dataflowmm.execution.step import (
    PreparedStep,
    StepOutput,
    StepSummary,
    prepare_step,
)
from dataflowmm.io.records import dumps_rows, jsonl_spans

if TYPE_CHECKING:
    from dataflowmm.execution.protocol import StepOperator
    from dataflowmm.storage import FileStorage

# Passed to the cluster's workers so they find the same models, offline, as the driver.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE",
                 "DATAFLOWMM_MODELS_DIR", "DATAFLOWMM_PRODUCED_DATA_DIR", "DJ_PRODUCED_DATA_DIR")


def _import_ray():
    try:
        import ray
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
        if getattr(storage, "store", None) is not None:
            raise NotImplementedError(f"cache_path {storage.store.url}: an object-store cache runs with the "
                                      "local runner for now; the Ray runner gets it with the cluster work")
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
        pool = actor_pool(self._placement())
        for result in pool.run_chunks((step.operator, step.context, str(step.source), step.batch_size), chunks):
            yield result.chunk, result.rows_in, result.payload, result.meta

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
