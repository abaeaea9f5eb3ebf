"""Image-text agreement: `ClipScoreEvaluator`, `ClipScoreFilter`, `ImageTextMatchingFilter`.

Data-Juicer's `image_text_similarity_filter` and `image_text_matching_filter` semantics
(parameter names and defaults, flips, `reduce_mode`, the `any`/`all` strategy over a
row's chunks), batched: every image-text pair of a batch of rows goes to the serving in one
call. A plain row (no special tokens in its text) pairs each of its images with the whole
text, so each image is judged on its own; a row in Data-Juicer's format pairs each chunk's
images with that chunk's text and reduces them to one score per chunk.

Filters drop rows outside `[min_score, max_score]` (counted in the step summary; written to
`{output}.dropped.jsonl` with `keep_dropped=True`). Rows without images are kept, as in
Data-Juicer; a row whose images cannot be read is kept with its `error` set, never dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from PIL import Image, ImageOps

from dataflowmm.contract import Input, Operator, Output, StepContext
from dataflowmm.operators.image_captioner import load_row_images
from dataflowmm.operators.sample_format import (
    EOC_TOKEN,
    IMAGE_TOKEN,
    SpecialTokens,
    row_image_paths,
)
from dataflowmm.serving.common import build_serving

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from dataflowmm.serving.clip import ClipServing
    from dataflowmm.serving.itm import ImageTextMatchingServing

REDUCE_MODES = ("avg", "max", "min")
STRATEGIES = ("any", "all")
# Scores written into rows are rounded: enough to rank and threshold, stable to read.
SCORE_DECIMALS = 4


class ScoringOptions(TypedDict, total=False):
    """Options every image-text scoring operator takes (defaults in `_ImageTextScoring`).

    horizontal_flip, vertical_flip: flip each image before scoring it.
    batch_size: images per forward pass of the serving built here (default 32), and rows per
        batch. With a serving passed in, its own `batch_size` applies.
    save_interval: rows between checkpoints; a killed run resumes from the last one.
    image_token, eoc_token: Data-Juicer's special tokens in the text field.
    torch_dtype, trust_remote_code: for the serving built here.
    strict: raise on the first row that cannot be scored.
    """

    horizontal_flip: bool
    vertical_flip: bool
    batch_size: int | None
    save_interval: int
    image_token: str
    eoc_token: str
    torch_dtype: str | None
    trust_remote_code: bool | None
    strict: bool


class FilterOptions(ScoringOptions, total=False):
    """`ScoringOptions`, and how a filter reads and keeps scores (defaults in `_ScoreFilter`).

    any_or_all: `"any"` or `"all"` of a row's images (chunks) must be in range.
    reduce_mode: `"avg"`, `"max"` or `"min"` over the images of one Data-Juicer chunk.
    keep_dropped: write dropped rows, with the reason, to `{output}.dropped.jsonl`.
    """

    any_or_all: str
    reduce_mode: str
    keep_dropped: bool


@dataclass
class _RowPairs:
    """A row's image-text pairs, and which pairs form each chunk (scored together)."""

    images: list[Image.Image] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    chunks: list[list[int]] = field(default_factory=list)


def _reduce(scores: list[float], mode: str) -> float:
    if mode == "max":
        return max(scores)
    if mode == "min":
        return min(scores)
    return sum(scores) / len(scores)


class _ImageTextScoring(Operator):
    """Pairs a row's images with its text and scores every pair of a batch in one call.

    Subclasses say how their serving is built (`_build_serving`), how a list of pairs is
    scored (`_score_pairs`) and what a scored row becomes (`_scored_row`).
    """

    columns = [
        Input("image", "input_image_key", "images", "column with each row's list of image paths", images=True),
        Input("text", "input_text_key", "text", "column with the text the images should show"),
        Output("score", "output_score_key", "clip_score", "column receiving the list of per-image scores",
               empty=None),
    ]

    def __init__(self, model: Any, *, horizontal_flip: bool = False, vertical_flip: bool = False,
                 reduce_mode: str = "avg", batch_size: int | None = None, save_interval: int = 50,
                 image_token: str = IMAGE_TOKEN, eoc_token: str = EOC_TOKEN, torch_dtype: str | None = None,
                 trust_remote_code: bool | None = None, strict: bool = False):
        if reduce_mode not in REDUCE_MODES:
            raise ValueError(f"reduce_mode must be one of {', '.join(REDUCE_MODES)}, got {reduce_mode!r}")
        self.horizontal_flip = horizontal_flip
        self.vertical_flip = vertical_flip
        self.reduce_mode = reduce_mode
        self.tokens = SpecialTokens(image_token, eoc_token)
        self.serving = self._build_serving(model, {"batch_size": batch_size, "torch_dtype": torch_dtype,
                                                   "trust_remote_code": trust_remote_code})

    def _build_serving(self, model: Any, settings: dict[str, Any]) -> Any:
        return build_serving(model, _clip_class(), argument="clip_serving", settings=settings,
                             methods=("image_text_similarity", "config"))

    def _score_pairs(self, images: list[Image.Image], texts: list[str]) -> list[float]:
        return self.serving.image_text_similarity(images, texts).tolist()

    def _scored_row(self, row: dict, scores: list[float], chunk_scores: list[float]) -> dict:
        raise NotImplementedError

    # -- one row -------------------------------------------------------------------------

    def _oriented(self, image: Image.Image) -> Image.Image:
        if self.horizontal_flip:
            image = ImageOps.mirror(image)
        if self.vertical_flip:
            image = ImageOps.flip(image)
        return image

    def _pairs(self, row: dict) -> _RowPairs:
        paths = row_image_paths(row.get(self.keys.image), self.keys.image)
        pairs = _RowPairs()
        if not paths:
            return pairs
        text = row.get(self.keys.text)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"key {self.keys.text!r}: no text to score the images against, got {text!r}")
        if not self.tokens.has_tokens(text):
            loaded = load_row_images(paths, self.keys.image)
            for path in paths:
                pairs.chunks.append([len(pairs.images)])
                pairs.images.append(self._oriented(loaded[path]))
                pairs.texts.append(text)
            return pairs
        offset = 0
        for chunk in text.split(self.tokens.eoc):
            count = chunk.count(self.tokens.image)
            if count == 0 or not chunk:
                continue
            chunk_paths = paths[offset:offset + count]
            if len(chunk_paths) < count:
                raise ValueError(f"key {self.keys.text!r}: more image tokens than the "
                                 f"{len(paths)} images of key {self.keys.image!r}")
            loaded = load_row_images(chunk_paths, self.keys.image)
            pairs.chunks.append(list(range(len(pairs.images), len(pairs.images) + count)))
            pairs.images += [self._oriented(loaded[path]) for path in chunk_paths]
            pairs.texts += [self.tokens.remove(chunk)] * count
            offset += count
        return pairs

    # -- a batch -------------------------------------------------------------------------

    def process_batch(self, rows: list[dict], row_ids: list[str], context: StepContext) -> list[dict]:
        planned: dict[int, _RowPairs] = {}
        failed: dict[int, str] = {}
        for offset, row in enumerate(rows):
            try:
                planned[offset] = self._pairs(row)
            except ValueError as error:
                failed[offset] = str(error)
        jobs = [(offset, index) for offset, pairs in planned.items() for index in range(len(pairs.images))]
        scores = self._score_pairs([planned[o].images[i] for o, i in jobs],
                                   [planned[o].texts[i] for o, i in jobs]) if jobs else []
        per_row: dict[int, list[float]] = {offset: [] for offset in planned}
        for (offset, _), score in zip(jobs, scores, strict=True):
            per_row[offset].append(round(float(score), SCORE_DECIMALS))
        out = []
        for offset, row in enumerate(rows):
            if offset in failed:
                out.append(self.row_failed(row, failed[offset], offset))
                continue
            row_scores = per_row[offset]
            chunk_scores = [_reduce([row_scores[i] for i in chunk], self.reduce_mode)
                            for chunk in planned[offset].chunks]
            out.append(self._scored_row(row, row_scores, chunk_scores))
        return out


class ClipScoreEvaluator(_ImageTextScoring):
    """Add the CLIP image-text score (cosine similarity) of every image of every row.

    Writes a list with one score per image under `output_score_key` (an empty list for a row
    without images), each image paired with the row's text, or, for Data-Juicer formatted
    text, with its chunk's text. Rows are never dropped.

    Args:
        clip_serving: a `ClipServing`, or a model id/folder to build one from.
        hf_clip: model id/folder used when `clip_serving` is not given.
        **options: `ScoringOptions` (flips, batch_size, save_interval, special tokens,
            torch_dtype, trust_remote_code, strict).
    """

    def __init__(self, clip_serving: ClipServing | str | os.PathLike | None = None, *,
                 hf_clip: str | os.PathLike = "openai/clip-vit-base-patch32", **options: Unpack[ScoringOptions]):
        super().__init__(clip_serving or hf_clip, **options)

    def _scored_row(self, row: dict, scores: list[float], chunk_scores: list[float]) -> dict:
        return {**row, self.keys.score: scores}


class _ScoreFilter(_ImageTextScoring):
    """Keeps rows whose chunk scores lie in [min_score, max_score] for any/all chunks."""

    columns = [*_ImageTextScoring.columns[:2],
               Output("score", "output_score_key", None, "if set, kept (and dropped) rows also get their "
                      "per-image scores here", empty=None)]

    def __init__(self, model: Any, *, min_score: float, max_score: float, any_or_all: str = "any",
                 keep_dropped: bool = False, **options: Unpack[ScoringOptions]):
        super().__init__(model, **options)
        if any_or_all not in STRATEGIES:
            raise ValueError(f"any_or_all must be 'any' or 'all', got {any_or_all!r}")
        if min_score > max_score:
            raise ValueError(f"min_score ({min_score}) must not exceed max_score ({max_score})")
        self.min_score = float(min_score)
        self.max_score = float(max_score)
        self.any_or_all = any_or_all

    def _scored_row(self, row: dict, scores: list[float], chunk_scores: list[float]) -> dict:
        if self.keys.score:
            row = {**row, self.keys.score: scores}
        if not chunk_scores:
            return row
        inside = [self.min_score <= score <= self.max_score for score in chunk_scores]
        if any(inside) if self.any_or_all == "any" else all(inside):
            return row
        shown = ", ".join(f"{score:.4f}" for score in chunk_scores)
        return self.drop_row(row, f"score {shown} outside [{self.min_score}, {self.max_score}] "
                                  f"({self.any_or_all})")


class ClipScoreFilter(_ScoreFilter):
    """Keep rows whose images agree with their text by CLIP cosine similarity
    (Data-Juicer's `image_text_similarity_filter`).

    A row is kept when the score of any (`any_or_all="any"`) or every (`"all"`) image, or
    chunk of images, lies in `[min_score, max_score]`; other rows are dropped and counted.

    Args:
        clip_serving: a `ClipServing`, or a model id/folder to build one from.
        hf_clip: model id/folder used when `clip_serving` is not given.
        min_score, max_score: the kept range of cosine similarities.
        **options: `FilterOptions` (any_or_all, reduce_mode, keep_dropped, flips, batch_size,
            save_interval, special tokens, torch_dtype, trust_remote_code, strict).
    """

    def __init__(self, clip_serving: ClipServing | str | os.PathLike | None = None, *,
                 hf_clip: str | os.PathLike = "openai/clip-vit-base-patch32", min_score: float = 0.1,
                 max_score: float = 1.0, **options: Unpack[FilterOptions]):
        super().__init__(clip_serving or hf_clip, min_score=min_score, max_score=max_score, **options)


class ImageTextMatchingFilter(_ScoreFilter):
    """Keep rows whose images match their text by BLIP's image-text matching probability
    (Data-Juicer's `image_text_matching_filter`).

    Same row semantics as `ClipScoreFilter`; the score is the ITM head's probability that
    the text describes the image.

    Args:
        itm_serving: an `ImageTextMatchingServing` (or any serving with `score(images, texts)`,
            `batch_size` and `config()`), or a model id/folder to build one from.
        hf_blip: model id/folder used when `itm_serving` is not given.
        min_score, max_score: the kept range of matching probabilities.
        **options: `FilterOptions`, as for `ClipScoreFilter`.
    """

    def __init__(self, itm_serving: ImageTextMatchingServing | str | os.PathLike | None = None, *,
                 hf_blip: str | os.PathLike = "Salesforce/blip-itm-base-coco", min_score: float = 0.003,
                 max_score: float = 1.0, **options: Unpack[FilterOptions]):
        super().__init__(itm_serving or hf_blip, min_score=min_score, max_score=max_score, **options)

    def _build_serving(self, model: Any, settings: dict[str, Any]) -> Any:
        from dataflowmm.serving.itm import ImageTextMatchingServing

        return build_serving(model, ImageTextMatchingServing, argument="itm_serving", settings=settings,
                             methods=("score", "config"))

    def _score_pairs(self, images: list[Image.Image], texts: list[str]) -> list[float]:
        return list(self.serving.score(images, texts))


def _clip_class() -> type[ClipServing]:
    from dataflowmm.serving.clip import ClipServing

    return ClipServing


def _clip_serving(model: Any, batch_size: int | None, torch_dtype: str | None,
                  trust_remote_code: bool | None) -> ClipServing:
    return build_serving(model, _clip_class(), argument="clip_serving",
                         settings={"batch_size": batch_size, "torch_dtype": torch_dtype,
                                   "trust_remote_code": trust_remote_code},
                         methods=("image_text_similarity", "config"))
