"""ImageDeduplicator: drop rows whose images repeat an earlier row's, exactly or nearly.

Exact duplicates are found by a hash of the decoded pixels (so a lossless re-encode is
exact); near duplicates (a JPEG re-encode, a resize, a slight crop) by the cosine similarity
of CLIP image embeddings (`method="clip"`, the default) or, with no model at all, by the
Hamming distance of perceptual hashes from the `imagehash` library (`method="phash"`, or
Data-Juicer's other names `"dhash"`, `"whash"`, `"ahash"`). The first row of each group is
kept, the later ones are dropped and counted, so the result depends only on the rows' order.

Embeddings and hashes are computed batch by batch on any runner and travel in the
checkpointed rows; the comparison needs every row, so it runs in the operator's final pass
over the step's output (in the driver), and the temporary column never reaches the
published file. The final pass searches an index (`dedup_index`), not every kept row.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import orjson
from PIL import Image

from dataflowmm.contract import Input, Operator, StepContext
from dataflowmm.io.images import to_rgb
from dataflowmm.io.records import dumps_row
from dataflowmm.operators.dedup_index import (
    EXACT_MAX_VECTORS,
    HASH_BITS,
    Measure,
    NearIndex,
    cosine_measure,
    default_index,
    hamming_measure,
    resolve_near,
    scan_near,
)
from dataflowmm.operators.image_captioner import load_row_images
from dataflowmm.operators.image_text_filters import _clip_serving
from dataflowmm.operators.sample_format import row_image_paths

if TYPE_CHECKING:
    from dataflowmm.serving.clip import ClipServing

# Checkpointed rows carry their images' hash and embeddings here until the final pass.
FINGERPRINT_KEY = "__image_dedup__"
# Data-Juicer's hash method names, and the `imagehash` function each one is.
HASH_METHODS = {"phash": "phash", "dhash": "dhash", "whash": "whash", "ahash": "average_hash"}
METHODS = ("clip", "exact", *HASH_METHODS)
# Measured on shapes-world scenes (tests/test_image_dedup_figure.py): phash distances of
# resized, JPEG re-encoded and slightly cropped copies to their original are <= 10 (99.8%),
# those of distinct scenes >= 8, almost all >= 14. imagededup's default threshold is 10 too.
DEFAULT_HAMMING_DISTANCE = 10
DEFAULT_SIMILARITY_THRESHOLD = 0.95
# whash's scale otherwise follows the image's size, so a resized copy would be hashed at
# another scale; a fixed one keeps a resize a near duplicate.
WHASH_SCALE = 64


def pixel_hash(image: Image.Image) -> str:
    """SHA-256 of an image's size and RGB pixels (the same for any lossless encoding)."""
    rgb = to_rgb(image)
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def perceptual_hash(image: Image.Image, method: str = "phash") -> str:
    """An image's 64-bit perceptual hash from `imagehash`, as 16 hex digits.

    Args:
        image: the image (hashed in greyscale, as imagehash does).
        method: `"phash"` (DCT), `"dhash"` (gradients), `"whash"` (Haar wavelets) or
            `"ahash"` (the mean): Data-Juicer's names.
    """
    import imagehash  # only the hash methods need it (and scipy, pywt behind it)

    if method == "whash":
        return str(imagehash.whash(image, image_scale=WHASH_SCALE))
    return str(getattr(imagehash, HASH_METHODS[method])(image))


class ImageDeduplicator(Operator):
    """Keep the first row of each group of rows with the same or nearly the same images.

    A row is an exact duplicate of an earlier kept row when all its images have the same
    pixels, in order; a near duplicate when it has as many images and each is near its
    counterpart: by `method="clip"`, a CLIP image-embedding cosine of at least
    `similarity_threshold`; by a hash method, a perceptual-hash Hamming distance of at most
    `hamming_distance`. Rows without images are kept; a row whose images cannot be read is
    kept with its `error`.

    Args:
        clip_serving: a `ClipServing`, or a model id/folder to build one from (`method="clip"`).
        method: `"clip"` (default: near duplicates by CLIP embeddings), `"exact"` (same pixels
            only; no model), or a perceptual hash from `imagehash`, no model loaded, with
            Data-Juicer's names: `"phash"` (the one to use: DCT of the greyscale image),
            `"dhash"`, `"whash"`, `"ahash"`.
        hf_clip: model id/folder used when `clip_serving` is not given (`method="clip"`).
        similarity_threshold: (`method="clip"`) cosine at or above which two images are near
            duplicates (default 0.95); `None` finds exact duplicates only (no model is loaded).
            Another value with another method is an error.
        hamming_distance: (hash methods) differing bits, of 64, at or below which two images are
            near duplicates; default 10 (measured: see `DEFAULT_HAMMING_DISTANCE`). Given with
            another method, an error.
        keep_dropped: write dropped rows, naming the row they repeat, to `{output}.dropped.jsonl`.
        batch_size: images per forward pass of the serving built here (default 32), and rows
            per batch (also without a model).
        save_interval: rows between checkpoints; a killed run resumes from the last one.
        torch_dtype, trust_remote_code: for the serving built here.
        strict: raise on the first row whose images cannot be read.
    """

    columns = [Input("image", "input_image_key", "images", "column with each row's list of image paths",
                     images=True)]
    has_final_pass = True
    default_input_batch_size = 32  # rows per batch when no model is used

    def __init__(
        self,
        clip_serving: ClipServing | str | os.PathLike | None = None,
        *,
        method: str = "clip",
        hf_clip: str | os.PathLike = "openai/clip-vit-base-patch32",
        similarity_threshold: float | None = DEFAULT_SIMILARITY_THRESHOLD,
        hamming_distance: int | None = None,
        keep_dropped: bool = False,
        batch_size: int | None = None,
        save_interval: int = 50,
        torch_dtype: str | None = None,
        trust_remote_code: bool | None = None,
        strict: bool = False,
    ):
        _check_method(method, clip_serving, similarity_threshold, hamming_distance)
        self.method = method
        self.similarity_threshold = similarity_threshold if method == "clip" else None
        self.hamming_distance = None
        if method in HASH_METHODS:
            self.hamming_distance = DEFAULT_HAMMING_DISTANCE if hamming_distance is None else hamming_distance
        self.serving = (None if self.similarity_threshold is None else
                        _clip_serving(clip_serving or hf_clip, batch_size, torch_dtype, trust_remote_code))

    @property
    def input_batch_size(self) -> int:
        """Rows per batch: the serving's `batch_size`; without a model, the `batch_size` given
        (else 32)."""
        given = self.arguments.get("batch_size")
        return int(given) if self.serving is None and given else super().input_batch_size

    # -- a batch: hashes and embeddings ----------------------------------------------------

    def process_batch(self, rows: list[dict], row_ids: list[str], context: StepContext) -> list[dict]:
        images: dict[int, list[Image.Image]] = {}
        out: list[dict | None] = [None] * len(rows)
        for offset, row in enumerate(rows):
            try:
                paths = row_image_paths(row.get(self.keys.image), self.keys.image)
                loaded = load_row_images(paths, self.keys.image)
            except ValueError as error:
                out[offset] = self.row_failed(row, str(error), offset)
                continue
            if paths:
                images[offset] = [loaded[path] for path in paths]
            else:
                out[offset] = row
        embeddings = self._embed([image for offset in images for image in images[offset]])
        start = 0
        for offset, row_images in images.items():
            fingerprint = {"hash": [pixel_hash(image) for image in row_images]}
            if embeddings is not None:
                chunk = embeddings[start:start + len(row_images)]
                fingerprint["embedding"] = base64.b64encode(chunk.astype("<f4").tobytes()).decode()
            if self.hamming_distance is not None:
                fingerprint["perceptual"] = [perceptual_hash(image, self.method) for image in row_images]
            start += len(row_images)
            out[offset] = {**rows[offset], FINGERPRINT_KEY: fingerprint}
        return out

    def _embed(self, images: list[Image.Image]) -> np.ndarray | None:
        if self.serving is None or not images:
            return None
        return self.serving.embed_images(images).numpy()

    # -- the whole step: groups ----------------------------------------------------------

    def final_pass(self, rows: Iterator[dict]) -> Iterator[dict]:
        """Rows in order; each repeating an earlier kept row is marked dropped, naming it.

        The rows are read once: their fingerprints are collected (compactly: see
        `_Fingerprints`) and the rows, without them, spill to a temporary file; the verdicts
        come from `find_repeats`, then the rows are read back in order.
        """
        fingerprints = _Fingerprints(self.measure())
        with tempfile.TemporaryFile() as spill:
            for position, row in enumerate(rows):
                fingerprint = row.pop(FINGERPRINT_KEY, None)
                if fingerprint is not None:
                    fingerprints.add(position, fingerprint)
                spill.write(dumps_row(row))
            reasons = self.find_repeats(fingerprints)
            spill.seek(0)
            for position, line in enumerate(spill):
                row = orjson.loads(line)
                yield row if position not in reasons else self.drop_row(row, reasons[position])

    def measure(self) -> Measure | None:
        """How near duplicates are compared: CLIP cosines, hash distances, or None (exact only)."""
        if self.similarity_threshold is not None:
            return cosine_measure(self.similarity_threshold)
        if self.hamming_distance is not None:
            return hamming_measure(self.hamming_distance)
        return None

    # The search for near kept rows, one object per image count: replace it (a partitioned
    # search, another library) here; `resolve_near` keeps the order rule whatever it is.
    near_index: Callable[[Measure, np.ndarray], NearIndex] = staticmethod(default_index)

    def find_repeats(self, fingerprints: _Fingerprints, scan: bool = False) -> dict[int, str]:
        """Per dropped row position, why: the exact or near duplicate it is of a kept row.
        `scan=True` compares each row with every kept row instead (the reference: slow)."""
        reasons: dict[int, str] = {}
        first_with_hash: dict[bytes, int] = {}
        for group in fingerprints.groups():
            for row, verdict in enumerate(self._group_verdicts(group, first_with_hash, scan)):
                if verdict is not None:
                    reasons[group.positions[row]] = self._reason(verdict, first_with_hash.get(group.keys[row]),
                                                                 group.positions)
        return reasons

    def _group_verdicts(self, group: _Group, first_with_hash: dict[bytes, int], scan: bool) -> list:
        positions, keys = group.positions, group.keys

        def exact_first(row: int) -> bool:
            return keys[row] in first_with_hash

        def on_kept(row: int) -> None:
            first_with_hash[keys[row]] = positions[row]

        vectors, measure = group.vectors(), group.measure
        if vectors is None:
            return [(-1, 0.0) if exact_first(row) else on_kept(row) for row in range(len(keys))]
        if scan:
            return scan_near(vectors, measure, exact_first, on_kept)
        return resolve_near(vectors, measure, self.near_index(measure, vectors), exact_first, on_kept)

    def _reason(self, verdict: tuple[int, float], same_pixels: int | None, positions) -> str:
        match, score = verdict
        if match < 0:
            return f"exact duplicate of row {same_pixels}"
        if self.similarity_threshold is not None:
            return f"near duplicate of row {positions[match]} (cosine {score:.4f})"
        return f"near duplicate of row {positions[match]} ({self.method} distance {int(score)})"


class _Fingerprints:
    """The step's fingerprints, held compactly and grouped by image count (only rows with as
    many images are compared): positions, the pixel hashes as bytes (32 per image), and the
    vectors: 8 bytes per perceptual hash; CLIP embeddings as float32 while a group has at
    most `EXACT_MAX_VECTORS` of them, then float16 (half the memory, for the index)."""

    def __init__(self, measure: Measure | None):
        self.measure = measure
        self._groups: dict[tuple[int, bool], _Group] = {}

    def add(self, position: int, fingerprint: dict) -> None:
        hashes = fingerprint["hash"]
        if isinstance(self.measure, Measure) and self.measure.higher_is_nearer:
            raw = fingerprint.get("embedding")
            vector = None if raw is None else base64.b64decode(raw)
        elif self.measure is not None:
            vector = None if "perceptual" not in fingerprint else bytes.fromhex("".join(fingerprint["perceptual"]))
        else:
            vector = None
        group = self._groups.get((len(hashes), vector is None))
        if group is None:
            group = self._groups[len(hashes), vector is None] = _Group(len(hashes), self.measure)
        group.add(position, bytes.fromhex("".join(hashes)), vector)

    def groups(self) -> list[_Group]:
        return list(self._groups.values())


class _Group:
    def __init__(self, count: int, measure: Measure | None):
        self.count, self.measure = count, measure
        self.positions: list[int] = []
        self.keys: list[bytes] = []
        self._data = bytearray()
        self._half = False  # float16 instead of float32 (embeddings past EXACT_MAX_VECTORS)

    def add(self, position: int, key: bytes, vector: bytes | None) -> None:
        self.positions.append(position)
        self.keys.append(key)
        if vector is None:
            return
        if self.measure.higher_is_nearer:
            if not self._half and len(self.positions) * self.count > EXACT_MAX_VECTORS:
                self._data = bytearray(np.frombuffer(self._data, dtype="<f4").astype("<f2").tobytes())
                self._half = True
            if self._half:
                vector = np.frombuffer(vector, dtype="<f4").astype("<f2").tobytes()
        self._data += vector

    def vectors(self) -> np.ndarray | None:
        """(rows, count, dim) float32/float16 embeddings or uint8 packed hashes; None without."""
        if not self._data:
            return None
        dtype = np.uint8 if not self.measure.higher_is_nearer else ("<f2" if self._half else "<f4")
        return np.frombuffer(self._data, dtype=dtype).reshape(len(self.positions), self.count, -1)


def _check_method(method: str, clip_serving: object, similarity_threshold: float | None,
                  hamming_distance: int | None) -> None:
    """ValueError naming the argument that does not fit `method`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if method != "clip":
        if clip_serving is not None:
            raise ValueError(f"clip_serving is for method='clip'; method={method!r} loads no model")
        if similarity_threshold != DEFAULT_SIMILARITY_THRESHOLD:
            raise ValueError(f"similarity_threshold (a CLIP cosine) is for method='clip'; method={method!r} "
                             + ("takes hamming_distance" if method in HASH_METHODS else "finds same pixels only"))
    elif similarity_threshold is not None and not -1.0 <= similarity_threshold <= 1.0:
        raise ValueError(f"similarity_threshold must be a cosine in [-1, 1] or None, got {similarity_threshold}")
    if hamming_distance is None:
        return
    if method not in HASH_METHODS:
        raise ValueError(f"hamming_distance is for the hash methods ({', '.join(HASH_METHODS)}), "
                         f"not method={method!r}")
    if isinstance(hamming_distance, bool) or not isinstance(hamming_distance, int) \
            or not 0 <= hamming_distance <= HASH_BITS:
        raise ValueError(f"hamming_distance must be an int in [0, {HASH_BITS}] (differing bits of a "
                         f"{HASH_BITS}-bit hash), got {hamming_distance!r}")
