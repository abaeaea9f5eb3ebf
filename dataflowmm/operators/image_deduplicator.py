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
published file.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from dataflowmm.contract import Input, Operator, StepContext
from dataflowmm.io.images import to_rgb
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
HASH_BITS = 64  # imagehash's default hash_size 8: 8x8 bits
# Measured on shapes-world scenes (tests/test_image_dedup_figure.py): phash distances of
# resized, JPEG re-encoded and slightly cropped copies to their original are <= 10 (99.8%),
# those of distinct scenes >= 8, almost all >= 14. imagededup's default threshold is 10 too.
DEFAULT_HAMMING_DISTANCE = 10
DEFAULT_SIMILARITY_THRESHOLD = 0.95
# whash's scale otherwise follows the image's size, so a resized copy would be hashed at
# another scale; a fixed one keeps a resize a near duplicate.
WHASH_SCALE = 64
# Set bits of each byte value: Hamming distances of packed hashes without numpy 2's bitwise_count.
_POPCOUNT = np.array([bin(value).count("1") for value in range(256)], dtype=np.uint8)


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
        """Rows in order; each repeating an earlier kept row is marked dropped, naming it."""
        first_with_hash: dict[tuple[str, ...], int] = {}
        kept = _KeptVectors()
        for position, row in enumerate(rows):
            fingerprint = row.pop(FINGERPRINT_KEY, None)
            if fingerprint is None:
                yield row
                continue
            hashes = tuple(fingerprint["hash"])
            if hashes in first_with_hash:
                yield self.drop_row(row, f"exact duplicate of row {first_with_hash[hashes]}")
                continue
            near = self._near_duplicate(fingerprint, len(hashes), position, kept)
            if near is not None:
                yield self.drop_row(row, near)
                continue
            first_with_hash[hashes] = position
            yield row

    def _near_duplicate(self, fingerprint: dict, count: int, position: int, kept: _KeptVectors) -> str | None:
        """Why the row is a near duplicate of a kept row (naming it), or None: then it is kept."""
        if "embedding" in fingerprint and self.similarity_threshold is not None:
            vectors = np.frombuffer(base64.b64decode(fingerprint["embedding"]), dtype="<f4").reshape(count, -1)
            match = kept.closest(vectors, _lowest_cosine, best=np.argmax)
            if match is not None and match[1] >= self.similarity_threshold:
                return f"near duplicate of row {match[0]} (cosine {match[1]:.4f})"
        elif "perceptual" in fingerprint and self.hamming_distance is not None:
            vectors = np.frombuffer(bytes.fromhex("".join(fingerprint["perceptual"])), dtype=np.uint8)
            vectors = vectors.reshape(count, -1)
            match = kept.closest(vectors, _largest_hamming, best=np.argmin)
            if match is not None and match[1] <= self.hamming_distance:
                return f"near duplicate of row {match[0]} ({self.method} distance {int(match[1])})"
        else:
            return None
        kept.add(position, vectors)
        return None


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


def _lowest_cosine(kept: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Per kept row (K, count, D), the lowest cosine of its images with `vectors` (count, D)."""
    return np.einsum("kcd,cd->kc", kept, vectors).min(axis=1)


def _largest_hamming(kept: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Per kept row (K, count, bytes), the largest Hamming distance of its images' packed
    hashes to `vectors` (count, bytes)."""
    return _POPCOUNT[kept ^ vectors].sum(axis=-1, dtype=np.int64).max(axis=1)


class _KeptVectors:
    """Per-image vectors (embeddings or packed hashes) of the kept rows, grouped by image
    count, in growing arrays."""

    def __init__(self) -> None:
        self.arrays: dict[int, np.ndarray] = {}
        self.positions: dict[int, list[int]] = {}

    def closest(self, vectors: np.ndarray, score: Callable[[np.ndarray, np.ndarray], np.ndarray],
                best: Callable[[np.ndarray], Any]) -> tuple[int, float] | None:
        """(row position, score) of the kept row with as many images whose `score` against
        `vectors` is `best` (the earliest such row on a tie), or None."""
        count = len(vectors)
        positions = self.positions.get(count)
        if not positions:
            return None
        scores = score(self.arrays[count][:len(positions)], vectors)
        index = int(best(scores))
        return positions[index], float(scores[index])

    def add(self, position: int, vectors: np.ndarray) -> None:
        count = len(vectors)
        positions = self.positions.setdefault(count, [])
        array = self.arrays.get(count)
        if array is None or len(positions) == len(array):
            grown = np.empty((max(16, 2 * len(positions)), *vectors.shape), dtype=vectors.dtype)
            if array is not None:
                grown[:len(positions)] = array
            self.arrays[count] = array = grown
        array[len(positions)] = vectors
        positions.append(position)
