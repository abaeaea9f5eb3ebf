"""ImageDeduplicator: drop rows whose images repeat an earlier row's, exactly or nearly.

Exact duplicates are found by a hash of the decoded pixels (so a lossless re-encode is
exact); near duplicates (a JPEG re-encode, a resize by a few pixels) by the cosine
similarity of CLIP image embeddings. The first row of each group is kept, the later ones
are dropped and counted, so the result depends only on the rows' order.

Embeddings are computed batch by batch on any runner and travel in the checkpointed rows;
the comparison needs every row, so it runs in the operator's final pass over the step's
output (in the driver), and the temporary column never reaches the published file.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

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


def pixel_hash(image: Image.Image) -> str:
    """SHA-256 of an image's size and RGB pixels (the same for any lossless encoding)."""
    rgb = to_rgb(image)
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


class ImageDeduplicator(Operator):
    """Keep the first row of each group of rows with the same or nearly the same images.

    A row is an exact duplicate of an earlier kept row when all its images have the same
    pixels, in order; a near duplicate when it has as many images and each has a CLIP
    image-embedding cosine of at least `similarity_threshold` with its counterpart. Rows
    without images are kept; a row whose images cannot be read is kept with its `error`.

    Args:
        clip_serving: a `ClipServing`, or a model id/folder to build one from.
        hf_clip: model id/folder used when `clip_serving` is not given.
        similarity_threshold: cosine at or above which two images are near duplicates;
            `None` finds exact duplicates only (no model is loaded).
        keep_dropped: write dropped rows, naming the row they repeat, to `{output}.dropped.jsonl`.
        batch_size: images per forward pass of the serving built here (default 32), and rows
            per batch.
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
        hf_clip: str | os.PathLike = "openai/clip-vit-base-patch32",
        similarity_threshold: float | None = 0.95,
        keep_dropped: bool = False,
        batch_size: int | None = None,
        save_interval: int = 50,
        torch_dtype: str | None = None,
        trust_remote_code: bool | None = None,
        strict: bool = False,
    ):
        if similarity_threshold is not None and not -1.0 <= similarity_threshold <= 1.0:
            raise ValueError(f"similarity_threshold must be a cosine in [-1, 1] or None, got {similarity_threshold}")
        self.similarity_threshold = similarity_threshold
        self.serving = (None if similarity_threshold is None else
                        _clip_serving(clip_serving or hf_clip, batch_size, torch_dtype, trust_remote_code))

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
        kept = _KeptEmbeddings()
        for position, row in enumerate(rows):
            fingerprint = row.pop(FINGERPRINT_KEY, None)
            if fingerprint is None:
                yield row
                continue
            hashes = tuple(fingerprint["hash"])
            if hashes in first_with_hash:
                yield self.drop_row(row, f"exact duplicate of row {first_with_hash[hashes]}")
                continue
            if "embedding" in fingerprint and self.similarity_threshold is not None:
                vectors = np.frombuffer(base64.b64decode(fingerprint["embedding"]), dtype="<f4")
                vectors = vectors.reshape(len(hashes), -1)
                match = kept.most_similar(vectors)
                if match is not None and match[1] >= self.similarity_threshold:
                    yield self.drop_row(row, f"near duplicate of row {match[0]} (cosine {match[1]:.4f})")
                    continue
                kept.add(position, vectors)
            first_with_hash[hashes] = position
            yield row


class _KeptEmbeddings:
    """Embeddings of the kept rows, grouped by image count, in growing arrays."""

    def __init__(self) -> None:
        self.arrays: dict[int, np.ndarray] = {}
        self.positions: dict[int, list[int]] = {}

    def most_similar(self, vectors: np.ndarray) -> tuple[int, float] | None:
        """(row position, cosine) of the kept row most similar to `vectors`: for rows of
        several images, the lowest of their images' cosines decides."""
        count = len(vectors)
        positions = self.positions.get(count)
        if not positions:
            return None
        kept = self.arrays[count][:len(positions)]  # (K, count, D)
        similarity = np.einsum("kcd,cd->kc", kept, vectors).min(axis=1)
        best = int(similarity.argmax())
        return positions[best], float(similarity[best])

    def add(self, position: int, vectors: np.ndarray) -> None:
        count = len(vectors)
        positions = self.positions.setdefault(count, [])
        array = self.arrays.get(count)
        if array is None or len(positions) == len(array):
            grown = np.empty((max(16, 2 * len(positions)), *vectors.shape), dtype=np.float32)
            if array is not None:
                grown[:len(positions)] = array
            self.arrays[count] = array = grown
        array[len(positions)] = vectors
        positions.append(position)
