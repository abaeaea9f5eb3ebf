"""EditVerifier: keep the image edits that did what their captions say, drop the others with why.

An instruction-editing pipeline makes many bad pairs: the edit changed nothing, changed the
whole picture, or changed the wrong thing. InstructPix2Pix filters its generated pairs with
CLIP (directional similarity and image-caption similarity; their code's defaults 0.2 and 0.2,
image-image similarity 0.7). This filter checks each (source, edited) pair of a row by:

- pixels (no model): the edit changed something (the changed area, `difference_mask` of
  `ImageDifferenceRegions`, covers at least `min_changed_ratio` of the image) and not
  everything (at most `max_changed_ratio`);
- CLIP: the change of the image points where the change of the caption does (directional
  similarity: edited-minus-source image embedding vs target-minus-source caption embedding,
  at least `min_directional`), and the edited image matches the target caption better than
  the source does (`target_gain`, above `min_target_gain`); optionally the edited image
  matches the target caption well (`min_target_score`) and still looks like the source
  (`min_image_similarity`).

All images and captions of a batch of rows are embedded in one call each.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from dataflowmm.checks import check_positive_int
from dataflowmm.contract import Input, Operator, Output, StepContext
from dataflowmm.operators.image_captioner import load_row_images
from dataflowmm.operators.image_difference_regions import difference_mask
from dataflowmm.operators.sample_format import row_image_paths
from dataflowmm.serving.common import build_serving

if TYPE_CHECKING:
    from dataflowmm.serving.clip import ClipServing

SCORE_DECIMALS = 4  # as the image-text filters: enough to rank and threshold, stable to read
STRATEGIES = ("any", "all")


class EditVerifier(Operator):
    r"""
    Keep rows whose edited images did what the target caption says, and drop the others,
    each with its reason.

    Per edited image, with `s`/`e` the CLIP embeddings of the source and the edited image and
    `S`/`T` those of the source and target captions (all L2-normalised), the scores written
    to the row (`output_scores_key`, 4 decimals) are:

    - `changed_ratio`: share of the image's pixels that changed (`difference_mask`, the
      edited image resized to the source's size);
    - `directional`: cosine of `e - s` and `T - S` (0 when either difference is zero);
    - `target_score`: cosine of `e` and `T`;
    - `target_gain`: `target_score` minus the cosine of `s` and `T`;
    - `image_similarity`: cosine of `s` and `e`.

    An edited image passes when `min_changed_ratio <= changed_ratio <= max_changed_ratio`,
    `directional >= min_directional`, `target_gain > min_target_gain`, and, when set,
    `target_score >= min_target_score` and `image_similarity >= min_image_similarity`.

    The edited column holds one path (scores: one dict) or a list of paths (scores: a list of
    dicts, in order): with `any_or_all="all"` every edited image must pass, with `"any"` one
    must. For one training pair per edited image, split the rows first (`EditTriples`).
    A dropped row's reason names every check that failed (`"directional 0.1203 < 0.2, target
    gain -0.0312 <= 0.0"`; with a list, per image: `"image 2: ..."`). The source column holds
    one path or a list of one. A row whose images cannot be read, without an edited image, or
    without both captions is kept with its `error` and null scores.

    Args:
        clip_serving (`ClipServing`, `str` or `os.PathLike`, *optional*):
            A `ClipServing`, or a model id/folder (`"trained:shapes-clip"`) to build one from.
        hf_clip (`str` or `os.PathLike`, *optional*, defaults to `"openai/clip-vit-base-patch32"`):
            Model id/folder used when `clip_serving` is not given.
        min_changed_ratio (`float`, *optional*, defaults to 0.001):
            Smallest changed share of the image: below it, the edit changed nothing.
        max_changed_ratio (`float`, *optional*, defaults to 0.9):
            Largest changed share: above it, the edit replaced the picture. Use 1.0 to keep global
            edits (a style, a season), which change every pixel.
        min_directional (`float`, *optional*, defaults to 0.2):
            Smallest directional similarity (InstructPix2Pix's threshold for OpenAI CLIP).
        min_target_gain (`float`, *optional*, defaults to 0.0):
            The edited image must match the target caption better than the source by more than this.
        min_target_score (`float`, *optional*):
            Smallest cosine of the edited image and the target caption (InstructPix2Pix: 0.2 with
            OpenAI CLIP; a model's own scale decides: the trained shapes CLIP puts a true caption
            near 0.95 and one of another colour near 0.48). `None`: not checked.
        min_image_similarity (`float`, *optional*):
            Smallest cosine of the source and edited images (InstructPix2Pix: 0.7-0.75).
            `None`: not checked.
        any_or_all (`str`, *optional*, defaults to `"all"`):
            With several edited images in a row: `"all"` must pass, or `"any"` one.
        difference_threshold (`float`, *optional*, defaults to 24):
            Smallest averaged channel difference (0-255) that counts as changed (`difference_mask`);
            JPEG re-encoding at quality 50-90 stays below it.
        blur_size (`int`, *optional*, defaults to 3):
            Side of the averaging window of `difference_mask`.
        keep_dropped (`bool`, *optional*, defaults to `True`):
            Write dropped rows, with the reason, to `{output}.dropped.jsonl`.
        batch_size (`int`, *optional*):
            Images or texts per forward pass of the serving built here (default 32), and rows per
            batch. With a serving passed in, its own `batch_size` applies.
        torch_dtype, trust_remote_code: for the serving built here.
        save_interval (`int`, *optional*, defaults to 50):
            Rows between checkpoints.
        strict (`bool`, *optional*, defaults to `False`):
            Raise on the first row that cannot be verified.
    """

    columns = [
        Input("source", "input_source_image_key", "images", "column with the source image path (or a list of one)",
              images=True),
        Input("edited", "input_edited_image_key", "edited_images", "column with the edited image path, or a list "
              "of them", images=True),
        Input("source_caption", "input_source_caption_key", "source_caption", "column with the source's caption"),
        Input("target_caption", "input_target_caption_key", "target_caption",
              "column with the caption the edited image should match"),
        Output("scores", "output_scores_key", "edit_scores", "column receiving the scores (a dict per edited "
               "image; a list of them for a list of images)", empty=None),
    ]

    def __init__(self, clip_serving: ClipServing | str | os.PathLike | None = None, *,
                 hf_clip: str | os.PathLike = "openai/clip-vit-base-patch32", min_changed_ratio: float = 0.001,
                 max_changed_ratio: float = 0.9, min_directional: float = 0.2, min_target_gain: float = 0.0,
                 min_target_score: float | None = None, min_image_similarity: float | None = None,
                 any_or_all: str = "all", difference_threshold: float = 24.0, blur_size: int = 3,
                 keep_dropped: bool = True, batch_size: int | None = None, torch_dtype: str | None = None,
                 trust_remote_code: bool | None = None, save_interval: int = 50, strict: bool = False):
        if not 0.0 <= min_changed_ratio <= max_changed_ratio <= 1.0:
            raise ValueError("need 0 <= min_changed_ratio <= max_changed_ratio <= 1, got "
                             f"{min_changed_ratio!r} and {max_changed_ratio!r}")
        for name, value in {"min_directional": min_directional, "min_target_gain": min_target_gain,
                            "min_target_score": min_target_score,
                            "min_image_similarity": min_image_similarity}.items():
            optional = name in ("min_target_score", "min_image_similarity")
            if (value is None and not optional) or isinstance(value, bool) or \
                    not isinstance(value, (int, float, type(None))):
                raise ValueError(f"{name} must be a number{' or None' if optional else ''}, got {value!r}")
        if any_or_all not in STRATEGIES:
            raise ValueError(f"any_or_all must be 'any' or 'all', got {any_or_all!r}")
        if not 0 <= difference_threshold < 255:
            raise ValueError(f"difference_threshold must be in [0, 255), got {difference_threshold!r}")
        check_positive_int("blur_size", blur_size)
        self.limits = {"min_changed_ratio": float(min_changed_ratio), "max_changed_ratio": float(max_changed_ratio),
                       "min_directional": float(min_directional), "min_target_gain": float(min_target_gain),
                       "min_target_score": min_target_score, "min_image_similarity": min_image_similarity}
        self.any_or_all = any_or_all
        self.difference_threshold = float(difference_threshold)
        self.blur_size = blur_size
        self.serving = build_serving(clip_serving or hf_clip, _clip_class(), argument="clip_serving",
                                     settings={"batch_size": batch_size, "torch_dtype": torch_dtype,
                                               "trust_remote_code": trust_remote_code},
                                     methods=("embed_images", "embed_texts", "config"))

    # -- one row ---------------------------------------------------------------------------

    def _planned(self, row: dict) -> tuple[Image.Image, list[Image.Image], str, str]:
        sources = row_image_paths(row.get(self.keys.source), self.keys.source)
        if len(sources) != 1:
            raise ValueError(f"key {self.keys.source!r}: expected one source image, got {len(sources)}")
        edited_paths = row_image_paths(row.get(self.keys.edited), self.keys.edited)
        if not edited_paths:
            raise ValueError(f"key {self.keys.edited!r}: no edited image to verify")
        captions = []
        for key in (self.keys.source_caption, self.keys.target_caption):
            caption = row.get(key)
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"key {key!r}: expected a caption, got {caption!r}")
            captions.append(caption)
        source = load_row_images(sources, self.keys.source)[sources[0]]
        loaded = load_row_images(edited_paths, self.keys.edited)
        return source, [loaded[path] for path in edited_paths], captions[0], captions[1]

    def edit_scores(self, source: Image.Image, edited: Image.Image, embeddings: dict[str, Any]) -> dict:
        """One edited image's scores, from the pixels and the pair's embeddings (`source`,
        `edited`, `source_caption`, `target_caption`: normalised numpy vectors)."""
        if edited.size != source.size:
            edited = edited.resize(source.size, Image.Resampling.BILINEAR)
        changed = float(difference_mask(source, edited, self.difference_threshold, self.blur_size).mean())
        s, e = embeddings["source"], embeddings["edited"]
        t_source, t_target = embeddings["source_caption"], embeddings["target_caption"]
        target_score = float(e @ t_target)
        scores = {"changed_ratio": changed, "directional": _direction_cosine(e - s, t_target - t_source),
                  "target_gain": target_score - float(s @ t_target), "target_score": target_score,
                  "image_similarity": float(s @ e)}
        return {name: round(value, SCORE_DECIMALS) for name, value in scores.items()}

    def failures(self, scores: dict) -> list[str]:
        """What an edited image's scores fail, in words (empty: it passes)."""
        limits, failed = self.limits, []
        if scores["changed_ratio"] < limits["min_changed_ratio"]:
            failed.append(f"nothing changed (changed ratio {scores['changed_ratio']:.4f} < "
                          f"{limits['min_changed_ratio']})")
        if scores["changed_ratio"] > limits["max_changed_ratio"]:
            failed.append(f"changed too much (changed ratio {scores['changed_ratio']:.4f} > "
                          f"{limits['max_changed_ratio']})")
        if scores["directional"] < limits["min_directional"]:
            failed.append(f"directional {scores['directional']:.4f} < {limits['min_directional']}")
        if scores["target_gain"] <= limits["min_target_gain"]:
            failed.append(f"target gain {scores['target_gain']:.4f} <= {limits['min_target_gain']}")
        if limits["min_target_score"] is not None and scores["target_score"] < limits["min_target_score"]:
            failed.append(f"target score {scores['target_score']:.4f} < {limits['min_target_score']}")
        if limits["min_image_similarity"] is not None and \
                scores["image_similarity"] < limits["min_image_similarity"]:
            failed.append(f"image similarity {scores['image_similarity']:.4f} < {limits['min_image_similarity']}")
        return failed

    # -- a batch ---------------------------------------------------------------------------

    def process_batch(self, rows: list[dict], row_ids: list[str], context: StepContext) -> list[dict]:
        planned: dict[int, tuple[Image.Image, list[Image.Image], str, str]] = {}
        failed: dict[int, str] = {}
        for offset, row in enumerate(rows):
            try:
                planned[offset] = self._planned(row)
            except ValueError as error:
                failed[offset] = str(error)
        images = [image for source, edited, _, _ in planned.values() for image in (source, *edited)]
        texts = [text for _, _, source_caption, target_caption in planned.values()
                 for text in (source_caption, target_caption)]
        image_vectors = self.serving.embed_images(images).numpy() if images else None
        text_vectors = self.serving.embed_texts(texts).numpy() if texts else None
        verdicts: dict[int, list[dict]] = {}
        image_at = 0
        for index, (offset, (source, edited, _, _)) in enumerate(planned.items()):
            captions = {"source_caption": text_vectors[2 * index], "target_caption": text_vectors[2 * index + 1]}
            verdicts[offset] = [self.edit_scores(source, image, {"source": image_vectors[image_at],
                                                                 "edited": image_vectors[image_at + 1 + j],
                                                                 **captions})
                                for j, image in enumerate(edited)]
            image_at += 1 + len(edited)
        return [self.row_failed(row, failed[offset], offset) if offset in failed else
                self._judged(row, verdicts[offset]) for offset, row in enumerate(rows)]

    def _judged(self, row: dict, scores: list[dict]) -> dict:
        single = isinstance(row.get(self.keys.edited), str)
        row = {**row, self.keys.scores: scores[0] if single else scores}
        failures = [self.failures(image_scores) for image_scores in scores]
        passed = [not failed for failed in failures]
        if any(passed) if self.any_or_all == "any" else all(passed):
            return row
        if single:
            return self.drop_row(row, ", ".join(failures[0]))
        reasons = "; ".join(f"image {number}: {', '.join(failed)}" for number, failed in enumerate(failures, 1)
                            if failed)
        return self.drop_row(row, f"{reasons} ({self.any_or_all})")


def _direction_cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    return float(a @ b) / norms if norms > 1e-6 else 0.0


def _clip_class() -> type[ClipServing]:
    from dataflowmm.serving.clip import ClipServing

    return ClipServing


__all__ = ["EditVerifier"]
