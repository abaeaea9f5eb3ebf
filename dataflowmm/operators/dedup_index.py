"""The search behind `ImageDeduplicator`'s final pass: which earlier kept row a row repeats.

Rows are resolved in order, in blocks: a block's rows are searched in an index of the rows
kept before the block (`NearIndex`, the replaceable part), and against each other; then one
pass over the block, in order, keeps a row only when none of its candidates that is kept lies
within the threshold, naming the nearest kept one as a scan of every kept row would (the
earliest on a tie). Candidates are re-scored exactly with the scan's own formulas, so an
index only has to return a superset of the kept rows within the threshold: the Hamming
index is exact, so its verdicts are the scan's; the approximate inner-product index may miss
a neighbour (its recall is measured in benchmarks/dedup.py).

A partitioned search (hash prefix or embedding cluster per Ray task) replaces `NearIndex`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Rows searched at once: bounds the within-block comparisons (block x block) and the
# candidates held, while keeping each index call large enough to batch.
BLOCK_ROWS = 2048
# Up to this many embedding vectors, float32 and an exact (flat) index: verdicts and printed
# cosines are the scan's. Above, float16 and an inverted-file index: half the memory, and a
# search that does not grow with the square of the rows.
EXACT_MAX_VECTORS = 50_000
# float16 rounds each coordinate of a unit vector by at most 2**-11 relative: a cosine moves
# by well under 1e-3, so candidates are taken this far below the threshold and re-scored.
COSINE_MARGIN = 2e-3
IVF_NPROBE = 16
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


class NearIndex(Protocol):
    """The kept rows' first-image vectors, searched for those possibly near a query.

    `search` returns, as faiss's range search does, `(lims, ids)`: the ids (the order in which
    rows were added) of query i are `ids[lims[i]:lims[i + 1]]`. They must include every added
    row within the threshold; more is allowed (candidates are re-scored exactly).
    """

    def add(self, vectors: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class HammingIndex:
    """Exact Hamming-radius search of 64-bit hashes by the pigeonhole principle.

    Two hashes within `radius` bits agree exactly on at least one of `radius + 1` disjoint
    slices of their bits, so each kept hash is filed under each slice's value and a query is
    compared (faiss's binary flat range search) only with the hashes sharing a slice value:
    about (radius + 1) / 2**(64 / (radius + 1)) of the kept rows (a fifth at radius 10).
    When that would be all of them (large radii), one flat index is searched.
    """

    def __init__(self, radius: int):
        import faiss

        self.faiss, self.radius = faiss, radius
        slices = radius + 1
        widths = [HASH_BITS // slices + (k < HASH_BITS % slices) for k in range(slices)]
        if slices * 2.0 ** -min(widths) >= 1:
            widths = [0]  # no slice narrows the search: one bucket with every hash
        self.shifts = np.cumsum([0, *widths[:-1]]).astype(np.uint64)
        self.masks = np.array([(1 << width) - 1 for width in widths], dtype=np.uint64)
        self.buckets: dict[tuple[int, int], object] = {}  # (slice, value) -> faiss index of kept hashes
        self.count = 0

    def _slices(self, codes: np.ndarray) -> np.ndarray:
        words = np.ascontiguousarray(codes).view(np.uint64).reshape(-1)
        return (words[:, None] >> self.shifts) & self.masks  # (n, slices)

    def add(self, vectors: np.ndarray) -> None:
        codes = np.ascontiguousarray(vectors[:, 0])
        ids = np.arange(self.count, self.count + len(codes), dtype=np.int64)
        for slice_index, values in enumerate(self._slices(codes).T):
            for value in np.unique(values).tolist():
                bucket = self.buckets.get((slice_index, value))
                if bucket is None:
                    bucket = self.buckets[slice_index, value] = self.faiss.IndexBinaryIDMap(
                        self.faiss.IndexBinaryFlat(HASH_BITS))
                rows = values == value
                bucket.add_with_ids(codes[rows], ids[rows])
        self.count += len(codes)

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes = np.ascontiguousarray(queries[:, 0])
        pairs_rows, pairs_ids = [], []
        for slice_index, values in enumerate(self._slices(codes).T):
            for value in np.unique(values).tolist():
                bucket = self.buckets.get((slice_index, value))
                if bucket is None:
                    continue
                rows = np.flatnonzero(values == value)
                lims, _, ids = bucket.range_search(codes[rows], self.radius + 1)  # strictly below
                pairs_rows.append(np.repeat(rows, np.diff(lims)))
                pairs_ids.append(ids)
        return _as_lims(len(codes), pairs_rows, pairs_ids)


class InnerProductIndex:
    """Inner-product range search of unit vectors: exact (faiss `IndexFlatIP`) for a group
    of at most `EXACT_MAX_VECTORS`, else an inverted file of float16 codes (`IndexIVFScalarQuantizer`,
    trained on a sample of the group, `IVF_NPROBE` lists probed per query)."""

    def __init__(self, threshold: float, sample: np.ndarray, exact: bool, nprobe: int = IVF_NPROBE):
        import faiss

        dim = sample.shape[-1]
        self.radius = threshold - COSINE_MARGIN
        self.count = 0
        if exact:
            self.index = faiss.IndexFlatIP(dim)
            return
        lists = int(np.clip(4 * np.sqrt(len(sample)), 16, 4096))
        self.index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, lists,
                                                   faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        picks = np.random.default_rng(0).choice(len(sample), min(len(sample), 40 * lists), replace=False)
        self.index.train(np.ascontiguousarray(sample[np.sort(picks), 0], dtype=np.float32))
        self.index.nprobe = nprobe

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(vectors[:, 0], dtype=np.float32))

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.index.ntotal == 0:
            return np.zeros(len(queries) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
        lims, _, ids = self.index.range_search(np.ascontiguousarray(queries[:, 0], dtype=np.float32), self.radius)
        return lims, ids


def _as_lims(queries: int, rows: list[np.ndarray], ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (query row, id), found once or more, as sorted, distinct (lims, ids)."""
    if not rows:
        return np.zeros(queries + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    pairs = np.unique(np.stack([np.concatenate(rows), np.concatenate(ids)], axis=1).astype(np.int64), axis=0)
    lims = np.searchsorted(pairs[:, 0], np.arange(queries + 1)).astype(np.int64)
    return lims, pairs[:, 1]


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
    kept, else (its row in `vectors` of the kept row it repeats, score).

    `exact_first(i)`: whether row i has the same pixels as a kept row, checked first as the
    scan does (then its verdict is (-1, 0.0)). `on_kept(i)` is called for each kept row.
    """
    verdicts: list[tuple[int, float] | None] = [None] * len(vectors)
    kept_rows: list[int] = []  # index id -> row
    for start in range(0, len(vectors), block_rows):
        block = vectors[start:start + block_rows]
        lims, ids = index.search(block)
        # Earlier rows of the same block possibly near each row (CSR by row, ascending).
        later, earlier_in_block = np.nonzero(np.tril(measure.loose_pairs(block), -1))
        block_lims = np.searchsorted(later, np.arange(len(block) + 1))
        kept_here = np.zeros(len(block), dtype=bool)
        for offset in range(len(block)):
            row = start + offset
            if exact_first(row):
                verdicts[row] = (-1, 0.0)
                continue
            # Kept rows before the block, then kept rows of the block: in row order, so the
            # first best score is the earliest row's, as in the scan.
            earlier = [kept_rows[i] for i in np.sort(ids[lims[offset]:lims[offset + 1]]).tolist()]
            inside = earlier_in_block[block_lims[offset]:block_lims[offset + 1]]
            earlier += (start + inside[kept_here[inside]]).tolist()
            if earlier:
                scores = measure.score(vectors[earlier].astype(measure.dtype, copy=False),
                                       vectors[row].astype(measure.dtype, copy=False))
                best = measure.best(scores)
                if measure.near(float(scores[best])):
                    verdicts[row] = (earlier[best], float(scores[best]))
                    continue
            kept_here[offset] = True
            on_kept(row)
        kept_in_block = (start + np.flatnonzero(kept_here)).tolist()
        if kept_in_block:
            index.add(vectors[kept_in_block])
            kept_rows += kept_in_block
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
    """The index for one image count's `vectors`: exact Hamming search for hashes; for
    embeddings, flat when they are float32 (a small group), else an inverted file."""
    if not measure.higher_is_nearer:
        return HammingIndex(int(measure.threshold))
    return InnerProductIndex(measure.threshold, vectors, exact=vectors.dtype == np.float32)
