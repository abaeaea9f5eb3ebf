"""The Ray actors that run a pipeline's chunks: started once, reused by every step.

Starting an actor costs a process, a torch import and a model load (seconds each on a CPU,
more for a large model on a GPU). A pipeline of several steps on Ray pays that once: the
pool lives as long as the driver process (or until `close_actor_pool()`), every step's
chunks go to the same actors, and an actor keeps each serving it has loaded, keyed by the
serving's whole configuration, so a later step whose operator has an identical serving
uses the copy already in memory (as a local pipeline reuses its serving objects).

Two chunks are queued per actor, so it starts the next while the driver writes the last
one's rows; a slow chunk holds at most one other behind it, and the driver receives chunks
close to input order, checkpointing each as soon as those before it are in.

The driver is the only writer of its cache. A chunk travels with its input (jsonl lines as
bytes, input images read by the driver) and comes back with its output rows and the bytes
of every file it wrote (`carried_files`), which the driver writes before it checkpoints the
chunk. Only an actor that reads back the random token the driver wrote into the cache
folder (a shared file system) writes its files there directly. With the cache on an object
store, an actor writes the chunk's images straight to the store (no round trip through the
driver) before returning the chunk's rows.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
import uuid
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from dataflowmm.execution.batch import apply_chunk, finish_chunk, fitted_batch_sizes
from dataflowmm.execution.checkpoints import chunk_digest
from dataflowmm.execution.protocol import RowError, StepContext
from dataflowmm.io.carried_files import capturing_writes, providing_files
from dataflowmm.io.records import JsonlSpan, StorageError, read_jsonl_span
from dataflowmm.io.remote import is_url, use_storage_options
from dataflowmm.store import send_files

# Errors about the data (not the cluster): an actor returns them and the driver raises them
# as the local runner would, instead of Ray's wrapper that keeps only their text.
_DATA_ERRORS = (RowError, StorageError, OSError)
# How many chunks past the oldest unfinished one may be handed out, per actor: bounds what
# the driver holds while one slow chunk keeps the checkpoint from moving on.
_AHEAD_PER_ACTOR = 4
# Chunks sent to an actor before its first one returns.
_QUEUED_PER_ACTOR = 2


@dataclass(frozen=True)
class Placement:
    """How many actors, and what each reserves: GPUs, CPUs, and torch threads (CPU only)."""

    actors: int
    gpus: float
    cpus: float
    torch_threads: int | None


@dataclass(frozen=True)
class ChunkResult:
    """What an actor sends back for one chunk: its output as JSON Lines bytes, its record, and
    the files it wrote (absolute path -> bytes; empty when it wrote to a shared disk)."""

    chunk: int
    rows_in: int
    payload: bytes
    meta: dict
    files: dict[str, bytes]


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

    def run_chunks(self, step: tuple[Any, StepContext, str, int, list], first_chunk: int, count: int,
                   chunks: Iterator[dict]) -> Iterator[ChunkResult]:
        """Every chunk of a step, run on the pool, yielded in input order.

        `step` is (bound operator, context, input file, batch size, the node check's token
        files); `chunks` yields the `count` descriptors the runner makes, numbered
        consecutively from `first_chunk`, each made only when an actor has room for it (its
        input bytes are held for the chunks in flight only).
        """
        import ray

        step_id, step_ref = uuid.uuid4().hex, ray.put(step)
        actors = self._started(min(self.placement.actors, count))
        # Two chunks queued per actor: it starts the next while the driver writes the last one's
        # rows and files (with one, every chunk paid that round trip idle).
        idle, in_flight = [actor for _ in range(_QUEUED_PER_ACTOR) for actor in actors], {}
        finished: dict[int, ChunkResult] = {}
        due, position = first_chunk, first_chunk
        while True:
            while idle and position < first_chunk + count and position < due + _AHEAD_PER_ACTOR * len(actors):
                actor = idle.pop(0)
                # The step travels inside a list so Ray leaves it unresolved: an actor fetches
                # it once per step, not once per chunk.
                in_flight[actor.run_chunk.remote(step_id, [step_ref], next(chunks))] = actor
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


def _received(result: tuple[int, int, bytes, bytes, bytes, dict]) -> ChunkResult:
    chunk, rows_in, payload, meta, failure, files = result
    if failure:
        raise pickle.loads(failure)
    return ChunkResult(chunk, rows_in, payload, json.loads(meta or b"{}"), files)


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
        self.step: tuple[Any, StepContext, str, int, list] | None = None
        self.shares_cache = False

    def run_chunk(self, step_id: str, step_ref: list, chunk: dict) -> tuple[int, int, bytes, bytes, bytes, dict]:
        """(chunk, rows read, output bytes, chunk record as JSON, pickled data error or b"",
        files written: path -> bytes)."""
        self._set_torch_threads()
        rows_in, payload, meta, failure, files = 0, b"", b"", b"", {}
        try:
            if step_id != self.step_id:
                self._start_step(step_id, step_ref)
            operator, context, source, batch_size, _ = self.step
            rows = _chunk_rows(chunk, source)
            input_digest = chunk_digest(rows)
            to_store = context.output_url is not None  # a cache on an object store: write there directly
            with capturing_writes() if to_store or not self.shares_cache else nullcontext({}) as files, \
                    providing_files(chunk["files"]):
                out = apply_chunk(operator, rows, context, first_row=chunk["first"], batch_size=batch_size,
                                  source=source)
            if to_store and files:  # before the chunk returns: a chunk on the store has its images
                files = send_files(files, context.output_dir, context.output_url, context.storage_options)
            payload, record = finish_chunk(out)
            # The servings live here, in the actor: what fit in its memory travels with the chunk.
            record = {**record, "input": input_digest, **fitted_batch_sizes(operator)}
            rows_in, meta = len(rows), json.dumps(record).encode()
        except _DATA_ERRORS as error:
            failure, files = pickle.dumps(error), {}
        return chunk["chunk"], rows_in, payload, meta, failure, files

    def _start_step(self, step_id: str, step_ref: list) -> None:
        import ray

        step = ray.get(step_ref[0])
        context = step[1]
        for url in (context.input_dir, context.output_url):  # images in these buckets: the storage's options
            if is_url(url):
                use_storage_options(url, context.storage_options)
        self._share_servings(step[0])
        self.step_id, self.step = step_id, step
        self.shares_cache = reads_back(step[4])

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
    """The chunk's input rows, from the bytes that travelled with it: jsonl lines (parsed as
    the local runner parses them, errors naming the driver's file and line) or rows."""
    import orjson

    if chunk["span"] is not None:
        return read_jsonl_span(source, JsonlSpan(*chunk["span"]), chunk["payload"])
    return [orjson.loads(line) for line in chunk["payload"].splitlines()]


def reads_back(tokens: list[tuple[str, str]]) -> bool:
    """Whether this node sees every (file, token) the driver wrote: then it shares its disk."""
    for path, token in tokens:
        try:
            with open(path, encoding="ascii") as file:
                if file.read() != token:
                    return False
        except (OSError, UnicodeDecodeError):
            return False
    return bool(tokens)
