"""The search behind `ImageDeduplicator`'s final pass: which earlier kept row a row repeats.

Rows of one image count are resolved in order, in blocks (`resolve_near`): a `NearIndex`
(the replaceable part) gives each row its candidates, earlier kept rows that include every
kept row within the threshold; one pass over the block, in order, re-scores the candidates
with the scan's own formulas and keeps a row only when none lies within the threshold,
naming the nearest (the earliest on a tie), as a scan of every kept row would. So an index
only has to return a superset: the Hamming index (`HammingJoinIndex`, pigeonhole buckets)
is exact and its verdicts are the scan's; the float16 inverted file (`KeptFlatIndex` past
`EXACT_MAX_VECTORS`) may miss a neighbour (its recall is measured in benchmarks/dedup.py).

A partitioned search (hash slice or embedding cluster per Ray task) would be another
`NearIndex`: see the README's "Quality operators".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Rows searched at once: bounds the within-block comparisons (block x block) and the
# candidates held, while keeping each index call large enough to batch.
BLOCK_ROWS = 2048
# Up to this many embedding vectors, float32 and an exact (flat) index: verdicts and printed
# cosines are the scan's. Above, float16 and an inverted-file index: half the memory, and a
# search that does not grow with the square of the rows.
EXACT_MAX_VECTORS = 20_000
# float16 rounds each coordinate of a unit vector by at most 2**-11 relative: a cosine moves
# by well under 1e-3, so candidates are taken this far below the threshold and re-scored.
COSINE_MARGIN = 2e-3
# The inverted file: 2 sqrt(n) lists (at most 2048), k-means on 30 vectors per list for 10
# iterations (training is a few percent of the pass), 8 lists probed per query, one more per
# 128 lists past 1024: recall of dropped rows >= 0.995 measured up to 100,000 rows
# (tests/test_dedup_index.py, benchmarks/dedup.py).
IVF_NPROBE = 8
IVF_TRAIN_PER_LIST = 30
IVF_TRAIN_ITERATIONS = 10
# Below this many hashes, a bucket is searched on one thread: starting OpenMP's threads costs
# more than they save (4x slower with two on a busy 2-core machine, measured).
SMALL_BUCKET = 8192
HASH_BITS = 64
# Set bits of each byte value: Hamming distances of packed hashes (the scan's formula).
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


def lowest_cosine(kept: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Per kept row (K, count, D), the lowest cosine of its images with `vectors` (count, D)."""
    return np.einsum("kcd,cd->kc", kept, vectors).min(axis=1)


def largest_hamming(kept: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Per kept row (K, count, bytes), the largest Hamming distance of its images' packed
    hashes to `vectors` (count, bytes)."""
    return _POPCOUNT[kept ^ vectors].sum(axis=-1, dtype=np.int64).max(axis=1)


@dataclass(frozen=True)
class Measure:
    """How rows are compared: the scan's score, which way is nearer, and the threshold."""

    score: Callable[[np.ndarray, np.ndarray], np.ndarray]
    higher_is_nearer: bool
    threshold: float
    dtype: type = np.float32  # vectors are scored in this type (float16 ones are widened)

    def near(self, score: float) -> bool:
        return score >= self.threshold if self.higher_is_nearer else score <= self.threshold

    def best(self, scores: np.ndarray) -> int:
        return int(np.argmax(scores) if self.higher_is_nearer else np.argmin(scores))

    def loose_pairs(self, block: np.ndarray) -> np.ndarray:
        """(B, B) bool: first images possibly near (a superset of the near pairs)."""
        first = block[:, 0]
        if self.higher_is_nearer:
            first = first.astype(np.float32)
            return first @ first.T >= self.threshold - COSINE_MARGIN
        words = np.ascontiguousarray(first).view(np.uint64).reshape(-1)
        return np.bitwise_count(words[:, None] ^ words[None, :]) <= self.threshold


def cosine_measure(threshold: float) -> Measure:
    return Measure(lowest_cosine, True, threshold)


def hamming_measure(distance: int) -> Measure:
    return Measure(largest_hamming, False, distance, np.uint8)


def resolve_near(vectors: np.ndarray, measure: Measure, index: NearIndex,
                 exact_first: Callable[[int], bool], on_kept: Callable[[int], None],
                 block_rows: int = BLOCK_ROWS) -> list[tuple[int, float] | None]:
    """In order, for each row of one image count (`vectors`: (n, count, dim)), None when it is
    kept, else (the row of `vectors` it repeats, score): the nearest kept row, the earliest
    on a tie, as `scan_near` finds.

    `exact_first(i)`: whether row i has the same pixels as a kept row, checked first as the
    scan does (then its verdict is (-1, 0.0)). `on_kept(i)` is called for each kept row.
    """
    verdicts: list[tuple[int, float] | None] = [None] * len(vectors)
    for start in range(0, len(vectors), block_rows):
        rows = range(start, min(start + block_rows, len(vectors)))
        index.prepare(rows)
        for row in rows:
            if exact_first(row):
                verdicts[row] = (-1, 0.0)
                continue
            earlier = index.candidates(row)
            if earlier:
                scores = measure.score(vectors[earlier].astype(measure.dtype, copy=False),
                                       vectors[row].astype(measure.dtype, copy=False))
                best = measure.best(scores)
                if measure.near(float(scores[best])):
                    verdicts[row] = (earlier[best], float(scores[best]))
                    continue
            index.keep(row)
            on_kept(row)
    return verdicts


def scan_near(vectors: np.ndarray, measure: Measure, exact_first: Callable[[int], bool],
              on_kept: Callable[[int], None]) -> list[tuple[int, float] | None]:
    """`resolve_near` by comparing each row with every kept row: the final pass as it was
    before the index (its cost grows with the square of the rows), kept as the reference the
    index is tested and benchmarked against."""
    verdicts: list[tuple[int, float] | None] = [None] * len(vectors)
    kept: list[int] = []
    kept_vectors = np.empty((16, *vectors.shape[1:]), dtype=measure.dtype)
    for row in range(len(vectors)):
        if exact_first(row):
            verdicts[row] = (-1, 0.0)
            continue
        query = vectors[row].astype(measure.dtype, copy=False)
        if kept:
            scores = measure.score(kept_vectors[:len(kept)], query)
            best = measure.best(scores)
            if measure.near(float(scores[best])):
                verdicts[row] = (kept[best], float(scores[best]))
                continue
        if len(kept) == len(kept_vectors):
            kept_vectors = np.concatenate([kept_vectors, np.empty_like(kept_vectors)])
        kept_vectors[len(kept)] = query
        kept.append(row)
        on_kept(row)
    return verdicts


def default_index(measure: Measure, vectors: np.ndarray) -> NearIndex:
    """The index for one image count's `vectors`: exact Hamming search for hashes (pigeonhole
    buckets, or flat at large radii); for embeddings, flat when they are float32 (a small
    group), else an inverted file."""
    if not measure.higher_is_nearer and slices_narrow(int(measure.threshold)):
        return HammingJoinIndex(vectors, int(measure.threshold))
    return KeptFlatIndex(vectors, measure)


class NearIndex(Protocol):
    """The search for kept rows near a row, within one image count's rows (the replaceable
    part of the final pass: a partitioned search on Ray would be another one).

    `resolve_near` calls `prepare(rows)` once per block of rows (batched work), then, for each
    row of the block in order, `candidates(row)`: earlier kept rows, ascending, that include
    every kept row within the threshold (more is allowed: they are re-scored exactly); and
    `keep(row)` when the row is kept.
    """

    def prepare(self, rows: range) -> None: ...

    def candidates(self, row: int) -> list[int]: ...

    def keep(self, row: int) -> None: ...


class HammingJoinIndex:
    """Exact Hamming-radius search of 64-bit hashes by the pigeonhole principle.

    Two hashes within `radius` bits agree exactly on at least one of `radius + 1` disjoint
    slices of their bits, so the distinct hashes are bucketed by each slice's value and
    compared (faiss's binary flat range search) only within buckets: about
    (radius + 1) / 2**(64 / (radius + 1)) of all pairs (a fifth at radius 10), in one call per
    bucket, before the rows are resolved. Rows are searched by their first image's hash (a
    multi-image row is near only if its first images are). Only for radii where slices would
    not narrow the search (`slices_narrow`) is `KeptFlatIndex` used instead.
    """

    def __init__(self, vectors: np.ndarray, radius: int):
        import faiss

        codes = np.ascontiguousarray(vectors[:, 0]).view(np.uint64).reshape(-1)
        distinct, self.code_of_row = np.unique(codes, return_inverse=True)
        self.kept_by_code: dict[int, list[int]] = {}
        near = [[np.arange(len(distinct))], [np.arange(len(distinct))]]  # each hash is near itself
        for values in _slices(distinct, radius).T:
            order = np.argsort(values, kind="stable")
            bounds = np.flatnonzero(np.diff(values[order])) + 1
            for bucket in np.split(order, bounds):
                if len(bucket) < 2:
                    continue
                found, earlier = _pairs_within(distinct[bucket].view(np.uint8).reshape(-1, 8), radius, faiss)
                near[0] += [bucket[found], bucket[earlier]]
                near[1] += [bucket[earlier], bucket[found]]
        pairs = np.unique(np.stack([np.concatenate(near[0]), np.concatenate(near[1])], axis=1), axis=0)
        self.lims = np.searchsorted(pairs[:, 0], np.arange(len(distinct) + 1))
        self.near = pairs[:, 1]

    def prepare(self, rows: range) -> None:
        pass  # every pair was found at once

    def candidates(self, row: int) -> list[int]:
        code = self.code_of_row[row]
        found = [kept for near in self.near[self.lims[code]:self.lims[code + 1]].tolist()
                 for kept in self.kept_by_code.get(near, ())]
        return sorted(found) if len(found) > 1 else found

    def keep(self, row: int) -> None:
        self.kept_by_code.setdefault(int(self.code_of_row[row]), []).append(row)


def _pairs_within(packed: np.ndarray, radius: int, faiss) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), j < i, of `packed` hashes within `radius`: each part of the bucket is
    searched against the parts up to it, so about half of all pairs are compared."""
    index = faiss.IndexBinaryFlat(HASH_BITS)
    found, earlier = [], []
    step = max(SMALL_BUCKET // 4, -(-len(packed) // 8))
    for start in range(0, len(packed), step):
        part = packed[start:start + step]
        index.add(part)
        with _threads(faiss, 1 if len(packed) < SMALL_BUCKET else None):
            lims, _, ids = index.range_search(part, radius + 1)  # strictly below
        queries = start + np.repeat(np.arange(len(part)), np.diff(lims.astype(np.int64)))
        below = ids < queries
        found.append(queries[below])
        earlier.append(ids[below])
    return np.concatenate(found), np.concatenate(earlier)


@contextmanager
def _threads(faiss, count: int | None) -> Iterator[None]:
    """faiss's OpenMP threads set to `count` (None: unchanged) for the block."""
    before = faiss.omp_get_max_threads()
    if count is not None:
        faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _slices(codes: np.ndarray, radius: int) -> np.ndarray:
    """(n, radius + 1) values of the disjoint bit slices of 64-bit `codes`."""
    widths = _widths(radius)
    shifts = np.cumsum([0, *widths[:-1]]).astype(np.uint64)
    masks = np.array([(1 << width) - 1 for width in widths], dtype=np.uint64)
    return (codes[:, None] >> shifts) & masks


def slices_narrow(radius: int) -> bool:
    """Whether bucketing by `radius + 1` slices compares fewer pairs than the kept-row flat
    search (each bucket is joined with itself in full: about half of all pairs or less)."""
    return radius + 1 <= HASH_BITS and sum(2.0 ** -width for width in _widths(radius)) < 0.5


def _widths(radius: int) -> list[int]:
    count = radius + 1
    return [HASH_BITS // count + (k < HASH_BITS % count) for k in range(count)]


class KeptFlatIndex:
    """A faiss index of the kept rows' first images, range-searched a block at a time; the
    block's own earlier rows are compared directly (`Measure.loose_pairs`).

    Embeddings: exact (`IndexFlatIP`) for float32 vectors (a group of at most
    `EXACT_MAX_VECTORS`), else an inverted file of float16 codes (`IndexIVFScalarQuantizer`,
    trained on a sample of the group, `nprobe` lists probed per query). Hashes at large radii:
    `IndexBinaryFlat`.
    """

    def __init__(self, vectors: np.ndarray, measure: Measure, nprobe: int = IVF_NPROBE):
        import faiss

        self.vectors, self.measure = vectors, measure
        self.pending: list[int] = []  # kept rows of the block, added to the index after it
        self.block_start, self.found = 0, {}
        dim = vectors.shape[-1]
        if not measure.higher_is_nearer:
            self.index, self.radius = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(dim * 8)), measure.threshold + 1
        elif vectors.dtype == np.float32:
            self.index, self.radius = faiss.IndexIDMap(faiss.IndexFlatIP(dim)), measure.threshold - COSINE_MARGIN
        else:
            lists = int(np.clip(2 * np.sqrt(len(vectors)), 16, 2048))
            self.index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, lists,
                                                       faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            self.index.cp.niter = IVF_TRAIN_ITERATIONS
            picks = np.sort(np.random.default_rng(0).choice(len(vectors), min(len(vectors), IVF_TRAIN_PER_LIST * lists),
                                                            replace=False))
            self.index.train(self._first(picks))
            self.index.nprobe = max(nprobe, lists // 128)
            self.radius = measure.threshold - COSINE_MARGIN

    def _first(self, rows) -> np.ndarray:
        first = self.vectors[rows, 0]
        return np.ascontiguousarray(first if first.dtype == np.uint8 else first.astype(np.float32))

    def prepare(self, rows: range) -> None:
        if self.pending:  # ids are rows: the index answers in rows
            self.index.add_with_ids(self._first(self.pending), np.asarray(self.pending, dtype=np.int64))
            self.pending = []
        self.block_start, self.found = rows.start, {}
        if self.index.ntotal:
            lims, _, ids = self.index.range_search(self._first(rows), self.radius)
            for offset in np.flatnonzero(np.diff(lims.astype(np.int64))).tolist():
                self.found[offset] = np.sort(ids[lims[offset]:lims[offset + 1]]).tolist()
        # The block's earlier rows possibly near each of its rows, by row (CSR).
        later, self.block_earlier = np.nonzero(np.tril(self.measure.loose_pairs(self.vectors[rows.start:rows.stop]), -1))
        self.block_lims = np.searchsorted(later, np.arange(len(rows) + 1))
        self.kept_here = np.zeros(len(rows), dtype=bool)

    def candidates(self, row: int) -> list[int]:
        offset = row - self.block_start
        inside = self.block_earlier[self.block_lims[offset]:self.block_lims[offset + 1]]
        return self.found.get(offset, []) + (self.block_start + inside[self.kept_here[inside]]).tolist()

    def keep(self, row: int) -> None:
        self.pending.append(row)
        self.kept_here[row - self.block_start] = True
