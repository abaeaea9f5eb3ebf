"""Model calls in batches that fit in accelerator memory, shared by every local serving.

A batch whose call runs out of memory is split in halves and each half tried again (memory
freed in between), down to one item. The size that fit becomes the serving's
`fitted_batch_size`, which caps its batches for the rest of the step and later ones, until
`cleanup()` or until the serving is placed anew (another process). Every item keeps its own
seed, so a smaller batch changes results only by float rounding (the README's batch-size rule).

A single item that does not fit on its own raises `ItemOutOfMemory` (a transient error: the
operator's step fails that row and goes on, and its next run retries the row), or, for a
serving whose results may hold per-item failures (the VLM protocol), gets a
`GenerationFailed(transient=True)` in its place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from dataflowmm.checks import ItemOutOfMemory, is_out_of_memory
from dataflowmm.serving.common import GenerationFailed, on_replicas

Item = TypeVar("Item")

# The replicas of a serving run in threads: they lower its fitted size one at a time.
_LOWERING = threading.Lock()


def batch_limit(serving: Any) -> int:
    """Items per model call now: the serving's `batch_size`, or the smaller size that fit."""
    fitted = getattr(serving, "fitted_batch_size", None)
    return min(serving.batch_size, fitted) if fitted else serving.batch_size


def run_fitting(
    serving: Any,
    items: Sequence[Item],
    call: Callable[[list[Item]], Sequence[Any]],
    *,
    failures_in_place: bool = False,
    item_errors: tuple[type[BaseException], ...] = (),
) -> list[Any]:
    """`call` over `items` in pieces of at most `batch_limit(serving)` items; one result per
    item, in order.

    Args:
        serving (`Any`):
            A serving with `batch_size`, `model` and `fitted_batch_size` (lowered here when a
            piece runs out of memory).
        items (`Sequence`):
            One batch's items, as the serving planned it.
        call (`Callable[[list], Sequence]`):
            The model call on a piece of items; returns one result per item, in order.
        failures_in_place (`bool`, *optional*, defaults to `False`):
            An item that fails on its own gets a `GenerationFailed` in its place (transient
            for out of memory) instead of raising: for servings whose results may hold
            per-item failures.
        item_errors (`tuple[type[BaseException], ...]`, *optional*):
            Errors besides out of memory that one item can cause (an image the processor
            rejects): a piece that raises one is split until the failing items are alone.
            Only with `failures_in_place`.
    """
    results: list[Any] = []
    start = 0
    while start < len(items):
        piece = list(items[start:start + batch_limit(serving)])
        results += _fit(serving, piece, call, failures_in_place, item_errors)
        start += len(piece)
    return results


def run_on_replicas(
    serving: Any,
    replicas: Sequence[Any],
    jobs: Sequence[Sequence[Item]],
    call: Callable[[Any, list[Item]], Sequence[Any]],
    **options: Any,
) -> list[list[Any]]:
    """The results of every job (one batch of items as the serving planned it), in job order:
    replica r runs jobs r, r + R, ... (`on_replicas`, threads), each job in pieces that fit
    (`run_fitting`, whose keyword `options` it takes), calling `call(replica, piece)`."""

    def run(replica: Any, own: list[Sequence[Item]]) -> list[list[Any]]:
        return [run_fitting(serving, job, lambda piece: call(replica, piece), **options) for job in own]

    per_replica = on_replicas(list(replicas), list(jobs), run)
    count = len(replicas)
    return [per_replica[index % count][index // count] for index in range(len(jobs))]


@dataclass
class _Failure:
    """Why a piece's call failed, its traceback dropped (it holds the piece's tensors)."""

    error: BaseException
    out_of_memory: bool


def _fit(serving: Any, piece: list, call: Callable[[list], Sequence[Any]], failures_in_place: bool,
         item_errors: tuple[type[BaseException], ...]) -> list[Any]:
    results, failure = _attempt(piece, call, item_errors)
    if failure is None:
        return results
    if failure.out_of_memory:
        from dataflowmm.serving.device import free_memory

        free_memory()  # outside the except block: the failed call's tensors are gone by now
    if len(piece) > 1 and failure.out_of_memory:
        _lower_fitted_size(serving, (len(piece) + 1) // 2)
        return run_fitting(serving, piece, call, failures_in_place=failures_in_place, item_errors=item_errors)
    if len(piece) > 1:  # an item's own error: halve until it is alone, the others answered
        half = (len(piece) + 1) // 2
        return (_fit(serving, piece[:half], call, failures_in_place, item_errors)
                + _fit(serving, piece[half:], call, failures_in_place, item_errors))
    if failures_in_place:
        return [GenerationFailed(_item_message(serving, failure), transient=failure.out_of_memory)]
    if failure.out_of_memory:
        raise ItemOutOfMemory(_item_message(serving, failure)) from failure.error
    raise failure.error


def _attempt(piece: list, call: Callable[[list], Sequence[Any]],
             item_errors: tuple[type[BaseException], ...]) -> tuple[list[Any], _Failure | None]:
    try:
        results = list(call(piece))
    except Exception as error:
        out_of_memory = is_out_of_memory(error)
        if not out_of_memory and not isinstance(error, item_errors):
            raise
        return [], _Failure(_without_tracebacks(error), out_of_memory)
    if len(results) != len(piece):
        raise RuntimeError(f"a model call returned {len(results)} results for {len(piece)} items")
    return results, None


def _lower_fitted_size(serving: Any, size: int) -> None:
    with _LOWERING:
        if size < batch_limit(serving):
            serving.fitted_batch_size = size


def _item_message(serving: Any, failure: _Failure) -> str:
    error = failure.error
    detail = f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"
    if failure.out_of_memory:
        return f"{serving.model}: out of memory for one item alone ({detail})"
    return f"{serving.model}: {detail}"


def _without_tracebacks(error: BaseException) -> BaseException:
    """`error` and the errors chained to it without their tracebacks, whose frames would
    keep the failed call's tensors alive while the next try needs the memory."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += [current.__cause__, current.__context__]
    return error
