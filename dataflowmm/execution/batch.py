"""One batch through one operator: the per-batch work every runner shares.

Image paths are made absolute for the operator and relative to the dataset file again
afterwards, every output row gets the `error` key, and a strict failure names the input
file and the row. A row that arrives failed (`error` set upstream) is never given to the
operator: it is passed through once, unchanged, in its place. Output rows carry execution's
markers (`ROW_MARK`: the input row they come from) until `finish_chunk` strips them and
records what they said. Runners only decide where these functions are called.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from dataflowmm.checks import ItemOutOfMemory
from dataflowmm.execution.protocol import (
    ERROR_KEY,
    FITTED_KEY,
    ROW_MARK,
    TRANSIENT_MARK,
    UPSTREAM_MARK,
    RowError,
    StepContext,
    StepOperator,
)
from dataflowmm.io.paths import relative_paths, resolve_paths
from dataflowmm.io.records import dumps_rows
from dataflowmm.seeds import RowIdentities


def apply_batch(
    operator: StepOperator,
    rows: list[dict],
    row_ids: Sequence[str],
    context: StepContext,
    *,
    first_row: int,
    source: str | os.PathLike,
) -> list[dict]:
    """Output rows of `operator` for one batch, in the form they are written to the cache file.

    Args:
        operator: a bound operator (keys set).
        rows: the batch's input rows as read from the step's input.
        row_ids: their identities (position and content in the step's input).
        context: the step's folders.
        first_row: position of `rows[0]` in the step's input, for error messages.
        source: the step's input file, for error messages.
    """
    path_keys = operator.path_keys()
    if path_keys:
        rows = [_with_paths(row, path_keys, lambda value: resolve_paths(value, context.input_dir))
                for row in rows]
    errors = [row.get(ERROR_KEY) for row in rows]
    todo = range(len(rows)) if errors.count(None) == len(rows) else \
        [offset for offset, error in enumerate(errors) if error is None]  # not failed upstream
    given = rows if len(todo) == len(rows) else [rows[offset] for offset in todo]
    for offset, row in zip(todo, given, strict=True):
        # Rows are execution's own (parsed for this batch), so marked in place: no copy per
        # row. The mark is not part of a row's identity (seeds.ROW_POSITION_KEY).
        row[ROW_MARK] = first_row + offset
    ids = row_ids if len(todo) == len(rows) else _Subset(row_ids, todo)
    try:
        out = _process(operator, given, ids, context) if given else []
    except RowError as error:
        offset = todo[error.row_offset] if 0 <= error.row_offset < len(todo) else error.row_offset
        raise RowError(f"{source}: row {first_row + offset}: {error}", first_row + offset) from error
    if not isinstance(out, list):
        raise TypeError(f"{operator.name}.process_batch must return a list of rows, got {type(out).__name__}")
    if len(todo) < len(rows):
        out = _with_upstream_failures(out, rows, set(todo), first_row)
    relative_to = None if operator.settings.absolute_paths else context.output_dir
    if path_keys and relative_to is not None:
        out = [_with_paths(row, path_keys, lambda value: relative_paths(value, relative_to, context.output_url))
               for row in out]
    for row in out:
        if ERROR_KEY not in row:
            row[ERROR_KEY] = None
    return out


def _process(operator: StepOperator, rows: list[dict], row_ids: Sequence[str], context: StepContext) -> list[dict]:
    """`operator.process_batch`, or, when a serving found an item that does not fit in memory
    even alone (`ItemOutOfMemory`), the same row by row: only the rows that do not fit fail,
    transiently (retried by the step's next run), and the step goes on."""
    try:
        return operator.process_batch(rows, row_ids, context)
    except ItemOutOfMemory as error:
        reason = str(error)
    # Out of the except block: the failed batch's tensors, held by its traceback, are freed.
    if len(rows) == 1:
        return [operator.row_failed(rows[0], reason, 0, transient=True)]
    out: list[dict] = []
    for offset, row in enumerate(rows):
        try:
            out.extend(_process(operator, [row], [row_ids[offset]], context))
        except RowError as error:  # strict: name the row by its place in the batch
            raise RowError(str(error), offset) from error
    return out


def _with_upstream_failures(out: list[dict], rows: list[dict], given: set[int], first_row: int) -> list[dict]:
    """The operator's output with the rows it was not given (failed upstream) put back, each
    before the first output row of a later input row."""
    passed = [{**rows[offset], UPSTREAM_MARK: True, ROW_MARK: first_row + offset}
              for offset in range(len(rows)) if offset not in given]
    merged: list[dict] = []
    for row in out:
        offset = row.get(ROW_MARK)
        while passed and isinstance(offset, int) and passed[0][ROW_MARK] < offset:
            merged.append(passed.pop(0))
        merged.append(row)
    return merged + passed


class _Subset(Sequence):
    """The identities of some rows of a batch (those given to the operator), still lazy."""

    def __init__(self, ids: Sequence[str], offsets: list[int]):
        self._ids, self._offsets = ids, offsets

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._ids[self._offsets[index]]


def finish_chunk(rows: list[dict]) -> tuple[bytes, dict]:
    """A chunk's output rows as written (execution's markers stripped, except the drop mark
    the final pass reads), and what the markers said, for the checkpoint's chunk log:
    `failed_upstream` (rows passed through) and `failed`, one `[input row, first output row,
    end, transient]` per input row whose own processing failed (output rows counted from the
    chunk's first; an input row whose output rows cannot be told apart is left out)."""
    positions = [row.pop(ROW_MARK, None) for row in rows]
    failed: dict[int, bool] = {}
    upstream = 0
    # Only failed rows carry the other markers (row_failed, or arrived failed): look at those.
    errors = [row.get(ERROR_KEY) for row in rows]
    for index in [] if errors.count(None) == len(rows) else \
            [index for index, error in enumerate(errors) if error is not None]:
        row, position = rows[index], positions[index]
        transient = bool(row.pop(TRANSIENT_MARK, False))
        if row.pop(UPSTREAM_MARK, False):
            upstream += 1
            positions[index] = None
        elif position is not None:
            failed[position] = failed.get(position, False) or transient
    spans: dict[int, list[int]] = {}  # only for failed input rows: [first, end, count] of their output rows
    if failed:
        for index, position in enumerate(positions):
            if position in failed:
                span = spans.setdefault(position, [index, index, 0])
                span[1], span[2] = index + 1, span[2] + 1
    meta: dict[str, Any] = {}
    if upstream:
        meta["failed_upstream"] = upstream
    records = [[position, spans[position][0], spans[position][1], int(transient)]
               for position, transient in failed.items()
               if spans[position][1] - spans[position][0] == spans[position][2]]  # contiguous only
    if records:
        meta["failed"] = records
    return dumps_rows(rows), meta


def fitted_batch_sizes(operator: StepOperator) -> dict[str, Any]:
    """`{FITTED_KEY: {serving attribute: size}}` for the operator's servings whose batches had
    to shrink to fit in memory (its optional `fitted_batch_sizes()`), else `{}`: recorded
    with each chunk, so a step run by actors elsewhere reports them too."""
    hook = getattr(operator, "fitted_batch_sizes", None)
    sizes = hook() if callable(hook) else {}
    return {FITTED_KEY: dict(sorted(sizes.items()))} if sizes else {}


def merged_fitted_sizes(records: Iterable[dict]) -> dict[str, Any]:
    """`{FITTED_KEY: ...}` with each serving's smallest fitted size over the chunk records (or
    manifests), else `{}`: the manifest's record of the sizes a step ran at."""
    merged: dict[str, int] = {}
    for record in records:
        for name, size in (record.get(FITTED_KEY) or {}).items():
            merged[name] = min(size, merged.get(name, size))
    return {FITTED_KEY: dict(sorted(merged.items()))} if merged else {}


def apply_chunk(
    operator: StepOperator,
    rows: list[dict],
    context: StepContext,
    *,
    first_row: int,
    batch_size: int,
    source: str | os.PathLike,
    on_batch: Callable[[int], Any] | None = None,
) -> list[dict]:
    """Output rows of a chunk of the step's input, batch by batch through `apply_batch`.

    `first_row` (the chunk's position in the step's input) is a multiple of `batch_size`, so
    batches are the same whatever the chunking; `on_batch(rows_done)` follows progress.
    """
    out: list[dict] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        out.extend(apply_batch(operator, batch, RowIdentities(batch, first_row + start), context,
                               first_row=first_row + start, source=source))
        if on_batch is not None:
            on_batch(len(batch))
    return out


def _with_paths(row: dict, keys: list[str], convert: Callable[[Any], Any]) -> dict:
    return {key: convert(value) if key in keys else value for key, value in row.items()}


class OutputCounts:
    """Failed rows and generated images of a step, counted from its output rows.

    Derived from the rows themselves (the `error` key, and paths under the step's images
    folder in the operator's image output keys), so the counts are the same whichever
    runner produced the rows and however they travelled. `referenced` keeps every such
    path, so files the output does not point to can be told apart.
    """

    def __init__(self, image_keys: list[str], output_dir: Path, save_dir: Path):
        self.image_keys = image_keys
        self.output_dir = str(output_dir)
        self.save_prefix = str(save_dir).rstrip(os.sep) + os.sep
        self.errors = 0
        self.images = 0
        self.referenced: set[str] = set()

    def add(self, rows: list[dict]) -> None:
        if not self.image_keys:
            self.errors += len(rows) - [row.get(ERROR_KEY) for row in rows].count(None)
            return
        for row in rows:
            failed = row.get(ERROR_KEY) is not None
            self.errors += failed
            for key in self.image_keys:
                generated = self._generated(row.get(key))
                self.referenced.update(generated)
                if not failed:
                    self.images += len(generated)

    def generated_in(self, rows: list[dict]) -> list[str]:
        """Absolute paths of the images under the images folder that `rows` point to."""
        return [path for row in rows for key in self.image_keys for path in self._generated(row.get(key))]

    def _generated(self, value: Any) -> list[str]:
        """Absolute paths under the images folder in one cell (a path or nested lists of them)."""
        if isinstance(value, list):
            return [path for item in value for path in self._generated(item)]
        if not isinstance(value, str):
            return []
        path = os.path.normpath(os.path.join(self.output_dir, value))
        return [path] if path.startswith(self.save_prefix) else []
