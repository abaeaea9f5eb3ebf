"""The Ray actors that run a pipeline's chunks: started once, reused by every step.

Starting an actor costs a process, a torch import and a model load (seconds each on a CPU,
more for a large model on a GPU). A pipeline of several steps on Ray pays that once: the
pool lives as long as the driver process (or until `close_actor_pool()`), every step's
chunks go to the same actors, and an actor keeps each serving it has loaded, keyed by the
serving's whole configuration, so a later step whose operator has an identical serving
uses the copy already in memory (as a local pipeline reuses its serving objects).

One chunk is in flight per actor: a slow chunk never holds others queued behind it, and the
driver receives chunks close to input order, checkpointing each as soon as those before it
are in.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import socket
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dataflowmm.execution.batch import apply_chunk, finish_chunk, fitted_batch_sizes
from dataflowmm.execution.checkpoints import chunk_digest
from dataflowmm.execution.protocol import RowError, StepContext
from dataflowmm.io.records import JsonlSpan, StorageError, read_jsonl_span

# Errors about the data (not the cluster): an actor returns them and the driver raises them
# as the local runner would, instead of Ray's wrapper that keeps only their text.
_DATA_ERRORS = (RowError, StorageError, OSError)
# How many chunks past the oldest unfinished one may be handed out, per actor: bounds what
# the driver holds while one slow chunk keeps the checkpoint from moving on.
_AHEAD_PER_ACTOR = 4


class StorageNotShared(OSError):
    """A Ray worker cannot see the step's files: cache_path and save_dir must be shared."""


@dataclass(frozen=True)
class Placement:
    """How many actors, and what each reserves: GPUs, CPUs, and torch threads (CPU only)."""

    actors: int
    gpus: float
    cpus: float
    torch_threads: int | None


@dataclass(frozen=True)
class ChunkResult:
    """What an actor sends back for one chunk: its output as JSON Lines bytes and its record."""

    chunk: int
    rows_in: int
    payload: bytes
    meta: dict


class ActorPool:
    """Actors of one `Placement` on the connected cluster, started as steps first need them."""

    def __init__(self, placement: Placement):
        import ray

        self.placement = placement
        self.job_id = ray.get_runtime_context().get_job_id()
        self._actor_class = ray.remote(_PipelineActor).options(
            num_cpus=placement.cpus, num_gpus=placement.gpus, max_restarts=3, max_task_retries=3)
        self.actors: list[Any] = []

    @property
    def usable(self) -> bool:
        """Whether the pool's actors belong to the Ray session this process is connected to."""
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_job_id() == self.job_id

    def run_chunks(self, step: tuple[Any, StepContext, str, int], chunks: list[dict]) -> Iterator[ChunkResult]:
        """Every chunk of a step, run on the pool, yielded in input order.

        `step` is (bound operator, context, input file, batch size); `chunks` the descriptors
        the runner made, numbered consecutively from `chunks[0]["chunk"]`.
        """
        import ray

        step_id, step_ref = uuid.uuid4().hex, ray.put(step)
        actors = self._started(min(self.placement.actors, len(chunks)))
        idle, in_flight = list(actors), {}
        finished: dict[int, ChunkResult] = {}
        due, position = chunks[0]["chunk"], 0
        while True:
            while idle and position < len(chunks) and \
                    chunks[position]["chunk"] < due + _AHEAD_PER_ACTOR * len(actors):
                actor = idle.pop(0)
                # The step travels inside a list so Ray leaves it unresolved: an actor fetches
                # it once per step, not once per chunk.
                in_flight[actor.run_chunk.remote(step_id, [step_ref], chunks[position])] = actor
                position += 1
            if not in_flight:
                return
            [ready], _ = ray.wait(list(in_flight), num_returns=1)
            idle.append(in_flight.pop(ready))
            try:
                result = _received(ray.get(ready))
            except ray.exceptions.RayActorError:
                self.close()  # an actor past its restarts: the next step starts a new pool
                raise
            finished[result.chunk] = result
            while due in finished:
                yield finished.pop(due)
                due += 1

    def _started(self, count: int) -> list[Any]:
        while len(self.actors) < count:
            self.actors.append(self._actor_class.remote(self.placement.torch_threads))
        return self.actors[:count]

    def close(self) -> None:
        """End the actors (and free what they hold)."""
        import ray

        if ray.is_initialized():
            for actor in self.actors:
                ray.kill(actor)
        self.actors = []


def _received(result: tuple[int, int, bytes, bytes, bytes]) -> ChunkResult:
    chunk, rows_in, payload, meta, failure = result
    if failure:
        raise pickle.loads(failure)
    return ChunkResult(chunk, rows_in, payload, json.loads(meta or b"{}"))


_POOL: ActorPool | None = None


def actor_pool(placement: Placement) -> ActorPool:
    """The driver's actor pool for `placement`: the running one when it has that placement
    and belongs to the current Ray session, else a new one (the old one's actors ended, so
    two pools never hold the cluster's resources at once)."""
    global _POOL
    if _POOL is not None and (_POOL.placement != placement or not _POOL.usable):
        close_actor_pool()
    if _POOL is None:
        _POOL = ActorPool(placement)
    return _POOL


def close_actor_pool() -> None:
    """End the driver's actors: the next Ray step starts new ones."""
    global _POOL
    if _POOL is not None:
        _POOL.close()
        _POOL = None


class _PipelineActor:
    """One Ray actor: runs whole chunks of any step, keeping the servings it has loaded."""

    def __init__(self, torch_threads: int | None):
        self.torch_threads = torch_threads
        self.servings: dict[str, Any] = {}
        self.step_id: str | None = None
        self.step: tuple[Any, StepContext, str, int] | None = None
        self.problem: Exception | None = None

    def run_chunk(self, step_id: str, step_ref: list, chunk: dict) -> tuple[int, int, bytes, bytes, bytes]:
        """(chunk, rows read, output bytes, chunk record as JSON, pickled data error or b"")."""
        self._set_torch_threads()
        rows_in, payload, meta, failure = 0, b"", b"", b""
        try:
            if step_id != self.step_id:
                self._start_step(step_id, step_ref)
            if self.problem is not None:
                raise self.problem
            operator, context, source, batch_size = self.step
            rows = _chunk_rows(chunk, source)
            input_digest = chunk_digest(rows)
            out = apply_chunk(operator, rows, context, first_row=chunk["first"], batch_size=batch_size,
                              source=source)
            payload, record = finish_chunk(out)
            # The servings live here, in the actor: what fit in its memory travels with the chunk.
            record = {**record, "input": input_digest, **fitted_batch_sizes(operator)}
            rows_in, meta = len(rows), json.dumps(record).encode()
        except _DATA_ERRORS as error:
            failure = pickle.dumps(error)
        return chunk["chunk"], rows_in, payload, meta, failure

    def _start_step(self, step_id: str, step_ref: list) -> None:
        import ray

        operator, context, source, batch_size = ray.get(step_ref[0])
        self._share_servings(operator)
        self.step_id, self.step = step_id, (operator, context, source, batch_size)
        self.problem = storage_problem(context, source)

    def _share_servings(self, operator: Any) -> None:
        """Give `operator` the servings this actor already holds with the same configuration."""
        for name, serving in list(vars(operator).items()):
            if not _is_serving(serving):
                continue
            kept = self.servings.setdefault(_serving_key(serving), serving)
            if kept is not serving:
                setattr(operator, name, kept)

    def _set_torch_threads(self) -> None:
        # Per call: OpenMP's thread count is per calling thread, and float results depend on it.
        if self.torch_threads and "torch" in sys.modules:
            import torch

            if torch.get_num_threads() != self.torch_threads:
                torch.set_num_threads(self.torch_threads)


def _is_serving(value: Any) -> bool:
    return not isinstance(value, type) and all(
        callable(getattr(value, name, None)) for name in ("config", "load", "cleanup"))


def _serving_key(serving: Any) -> str:
    """A serving's whole configuration as it travelled (models are never part of it): two
    servings with equal keys compute the same outputs."""
    return hashlib.sha256(pickle.dumps(serving)).hexdigest()


def _chunk_rows(chunk: dict, source: str) -> list[dict]:
    import orjson

    if chunk["payload"]:
        return [orjson.loads(line) for line in chunk["payload"].splitlines()]
    span = JsonlSpan(chunk["first"], chunk["rows"], chunk["start"], chunk["end"], chunk["line"])
    return read_jsonl_span(source, span)


def storage_problem(context: StepContext, source: str) -> StorageNotShared | None:
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
