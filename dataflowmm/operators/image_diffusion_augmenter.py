"""ImageDiffusionAugmenter: new versions of a row's images by image-to-image diffusion.

Data-Juicer's `image_diffusion_mapper`, batched: every image of every row in a batch goes
to the diffusion serving in one `generate` call, each candidate with its own seed.
"""

from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from dataflowmm.contract import Input, Operator, Output, StepContext
from dataflowmm.io.images import ImageReadError, image_file_name, load_image, save_png
from dataflowmm.operators.diffusion_augmenter_setup import (
    candidate_count,
    caption_serving,
    check_arguments,
    clip_serving,
    diffusion_serving,
)
from dataflowmm.operators.sample_format import SpecialTokens, row_image_paths
from dataflowmm.seeds import derive_seed

if TYPE_CHECKING:
    from dataflowmm.serving.caption import LocalCaptionServing
    from dataflowmm.serving.clip import ClipServing
    from dataflowmm.serving.image_gen import LocalImageGenServing

# Captions made by the caption model are conditioned on, and prefixed with, this text.
CAPTION_PROMPT = "A photo of a "
# Captions given in a row may carry Data-Juicer's special tokens; they are not prompt text.
DJ_TOKENS = SpecialTokens()
SAVE_DIR_ENV_VARS = ("DATAFLOWMM_PRODUCED_DATA_DIR", "DJ_PRODUCED_DATA_DIR")


def row_captions(row: dict, key: str, count: int) -> list[str]:
    """One caption per image from `row[key]`: a string for every image, or a list of `count`."""
    if key not in row or row[key] is None:
        raise ValueError(f"caption key {key!r}: missing")
    value = row[key]
    if isinstance(value, str):
        captions = [value] * count
    elif isinstance(value, list):
        if len(value) != count:
            raise ValueError(f"caption key {key!r}: {len(value)} captions for {count} images")
        if not all(isinstance(caption, str) for caption in value):
            raise ValueError(f"caption key {key!r}: every caption must be a string")
        captions = value
    else:
        raise ValueError(f"caption key {key!r}: expected a string or a list of strings, "
                         f"got {type(value).__name__}")
    return [DJ_TOKENS.remove(caption) for caption in captions]


def resize_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` resized (bilinear) to `size`, or itself when it already has that size."""
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)


@dataclass
class _Job:
    """A row with images being augmented."""

    offset: int
    paths: list[str]
    sources: list[Image.Image]
    captions: list[str] | None = None
    # candidates[i][c]: candidate c of image i (None where the safety checker flagged it)
    candidates: list[list[Image.Image | None]] = field(default_factory=list)
    scores: list[list[float]] | None = None
    kept: list[list[int]] = field(default_factory=list)


class ImageDiffusionAugmenter(Operator):
    r"""
    Augment rows of images with image-to-image diffusion (Data-Juicer's `image_diffusion_mapper`).

    Each source image is resized to an `image_size` square canvas, transformed by the diffusion
    model under its caption, and resized back to its own size. Every input row with images yields
    exactly `aug_num` generated rows (a copy of the row whose image list holds the new images),
    after the original row when `keep_original_sample`. Rows without images pass through (or are
    dropped when originals are not kept); a row that cannot be processed is kept once, with its
    error, and yields no generated rows.

    Args:
        hf_diffusion (`str`, `os.PathLike` or `LocalImageGenServing`, *optional*, defaults to `"CompVis/stable-diffusion-v1-4"`):
            Hub id or local folder of a diffusers image-to-image pipeline, or an already built
            `LocalImageGenServing` with `task="image2image"` and `num_images_per_prompt=1`, used
            as is: its own strength, guidance, steps, batch size and dtype apply, and giving one
            of those here with a different value is an error.
        torch_dtype (`str`, *optional*):
            `"fp32"`, `"fp16"`, `"bf16"` or `"auto"` for the models this operator builds
            (`"fp32"` when not given).
        revision (`str`, *optional*):
            Hub revision (branch, tag or commit) of `hf_diffusion`.
        trust_remote_code (`bool`, *optional*):
            Allow custom code shipped with the models this operator builds.
        strength (`float`, *optional*):
            How much of the source image is noised, in [0, 1]; 1 ignores the source image
            (0.8 when not given).
        guidance_scale (`float`, *optional*):
            Classifier-free guidance scale; higher follows the caption more closely (7.5 when not given).
        aug_num (`int`, *optional*, defaults to 1):
            Generated rows per input row with images.
        keep_original_sample (`bool`, *optional*, defaults to `True`):
            Emit each original row before its generated rows.
        caption_key (`str`, *optional*):
            Field holding the captions that guide generation: a string (for every image of the
            row) or a list with one caption per image. Data-Juicer's special tokens are removed.
            When `None`, each image is captioned by `hf_img2seq`, prompted with and prefixed by
            `"A photo of a "`.
        hf_img2seq (`str`, `os.PathLike` or `LocalCaptionServing`, *optional*, defaults to `"Salesforce/blip2-opt-2.7b"`):
            Caption model (id, folder or built serving); used only when `caption_key` is `None`.
        save_dir (`str` or `os.PathLike`, *optional*):
            Folder for the generated PNG files. Defaults to `$DATAFLOWMM_PRODUCED_DATA_DIR`, then
            `$DJ_PRODUCED_DATA_DIR`, then `{cache_path}/{prefix}_step{N}_images`.
        keep_candidate_mode (`str`, *optional*, defaults to `"all"`):
            `"all"`: generate `aug_num` candidates per image and keep them all. `"random_any"`:
            generate `candidate_num` and keep `aug_num` seeded random picks. `"similar_one"`:
            generate `candidate_num` and keep the `aug_num` most similar to the source image by
            `hf_clip` image embeddings (ties to the lower index). Kept candidates stay in
            candidate order; generated row k takes the k-th kept candidate of every image.
        candidate_num (`int`, *optional*):
            Candidates per image for `"random_any"` and `"similar_one"` (>= `aug_num`); defaults to
            `2 * aug_num`. Not used by `"all"`.
        hf_clip (`str`, `os.PathLike` or `ClipServing`, *optional*, defaults to `"openai/clip-vit-base-patch32"`):
            CLIP model (id, folder or built serving); used only by `"similar_one"`.
        num_inference_steps (`int`, *optional*):
            Denoising steps (the pipeline's default when `None`); `strength * steps` run.
        batch_size (`int`, *optional*):
            Images per diffusion call of the serving this operator builds (8 when not given); the
            diffusion serving's batch size is also the number of rows per batch.
        image_size (`int`, *optional*, defaults to 512):
            Side of the square canvas the source images are resized to; `None` keeps their size.
        save_interval (`int`, *optional*, defaults to 50):
            Rows between checkpoints; a killed run resumes from the last one.
        seed (`int`, *optional*, defaults to 0):
            Global seed. Candidate c of image i of a row uses `derive_seed(seed, row, i, c)`;
            captions and random picks derive their own seeds, so outputs do not depend on
            batching or resuming.
        absolute_paths (`bool`, *optional*, defaults to `False`):
            Write absolute image paths instead of paths relative to the dataset file.
        strict (`bool`, *optional*, defaults to `False`):
            Raise on the first row that cannot be processed instead of keeping it with an error.
    """

    columns = [
        Input("image", "input_image_key", "images", "column with each row's image paths (a list, or one path)",
              images=True),
        Input("text", "input_text_key", "text", "Data-Juicer's text column; accepted for recipe compatibility, "
              "not read", required=False),
        Output("output", "output_image_key", None, "column receiving the generated rows' image paths (the "
               "generated rows' images replace the originals)", images=True, default_from="image"),
    ]
    batching_serving = "diffusion"

    def __init__(
        self,
        hf_diffusion: str | os.PathLike | LocalImageGenServing = "CompVis/stable-diffusion-v1-4",
        *,
        torch_dtype: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool | None = None,
        strength: float | None = None,
        guidance_scale: float | None = None,
        aug_num: int = 1,
        keep_original_sample: bool = True,
        caption_key: str | None = None,
        hf_img2seq: str | os.PathLike | LocalCaptionServing = "Salesforce/blip2-opt-2.7b",
        save_dir: str | os.PathLike | None = None,
        keep_candidate_mode: str = "all",
        candidate_num: int | None = None,
        hf_clip: str | os.PathLike | ClipServing = "openai/clip-vit-base-patch32",
        num_inference_steps: int | None = None,
        batch_size: int | None = None,
        image_size: int | None = 512,
        save_interval: int = 50,
        seed: int = 0,
        absolute_paths: bool = False,
        strict: bool = False,
    ) -> None:
        check_arguments(strength, aug_num, keep_candidate_mode, candidate_num, image_size,
                         batch_size, caption_key)
        self.aug_num = aug_num
        self.keep_original_sample = bool(keep_original_sample)
        self.keep_candidate_mode = keep_candidate_mode
        self.candidate_num = candidate_count(keep_candidate_mode, aug_num, candidate_num)
        self.image_size = image_size
        self.caption_key = caption_key
        shared = {"torch_dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        shared_defaults = {"torch_dtype": "fp32"}
        self.diffusion = diffusion_serving(hf_diffusion, settings={
            **shared, "batch_size": batch_size, "strength": strength, "guidance_scale": guidance_scale,
            "num_inference_steps": num_inference_steps, "revision": revision}, defaults={
            **shared_defaults, "batch_size": 8, "strength": 0.8, "guidance_scale": 7.5})
        self.captioner = None if caption_key else caption_serving(hf_img2seq, shared, shared_defaults)
        self.clip = clip_serving(hf_clip, shared, shared_defaults) \
            if keep_candidate_mode == "similar_one" else None

    # ------------------------------------------------------------- operator contract
    def required_keys(self) -> list[str]:
        return [self.keys.image] + ([self.caption_key] if self.caption_key else [])

    def configured_save_dir(self) -> Path | None:
        """`save_dir`, else `$DATAFLOWMM_PRODUCED_DATA_DIR`, else `$DJ_PRODUCED_DATA_DIR`."""
        if self.settings.save_dir:
            return Path(self.settings.save_dir)
        for variable in SAVE_DIR_ENV_VARS:
            if os.environ.get(variable):
                return Path(os.environ[variable])
        return None

    # ------------------------------------------------------------------ batch
    def process_batch(self, rows: list[dict], row_ids: list[str], context: StepContext) -> list[dict]:
        failed: dict[int, dict] = {}
        jobs = self._prepare(rows, failed)
        self._caption(jobs, row_ids)
        self._generate(jobs, row_ids)
        self._score(jobs)
        jobs = [job for job in jobs if self._select(job, row_ids[job.offset], rows, failed)]
        paths = {job.offset: self._save(job, row_ids[job.offset], context.save_dir) for job in jobs}
        out_rows = []
        for offset, row in enumerate(rows):
            if offset in failed:
                out_rows.append(failed[offset])
                continue
            if self.keep_original_sample:
                out_rows.append(row)
            out_rows.extend(self._generated_rows(row, paths.get(offset)))
        return out_rows

    def _fail(self, rows: list[dict], offset: int, message: str, failed: dict[int, dict]) -> None:
        """Record row `offset` as failed (kept once, with its error); raises when strict."""
        failed[offset] = self.row_failed(rows[offset], message, offset)

    def empty_outputs(self) -> dict:
        """A failed row's outputs: the output column emptied, unless it is the input's."""
        return {} if self.keys.output == self.keys.image else {self.keys.output: []}

    def _prepare(self, rows: list[dict], failed: dict[int, dict]) -> list[_Job]:
        """Jobs for the rows with images: their source images and given captions."""
        jobs = []
        for offset, row in enumerate(rows):
            try:
                paths = row_image_paths(row.get(self.keys.image), self.keys.image)
                if not paths:
                    continue
                captions = row_captions(row, self.caption_key, len(paths)) if self.caption_key else None
                sources = [load_image(path) for path in paths]
            except (ImageReadError, ValueError) as error:
                self._fail(rows, offset, str(error), failed)
                continue
            jobs.append(_Job(offset, paths, sources, captions))
        return jobs

    def _caption(self, jobs: list[_Job], row_ids: list[str]) -> None:
        """Caption every image of the jobs without captions, in one serving call."""
        pending = [(job, index) for job in jobs if job.captions is None
                   for index in range(len(job.sources))]
        if not pending:
            return
        results = self.captioner.caption(
            [job.sources[index] for job, index in pending],
            prompts=CAPTION_PROMPT,
            seeds=[derive_seed(self.settings.seed, row_ids[job.offset], index, "caption")
                   for job, index in pending],
            caption_num=1,
        )
        for job in jobs:
            if job.captions is None:
                job.captions = []
        for (job, _), texts in zip(pending, results, strict=True):
            job.captions.append(CAPTION_PROMPT + DJ_TOKENS.remove(texts[0]))

    def _generate(self, jobs: list[_Job], row_ids: list[str]) -> None:
        """Every candidate of every image of every job, in one serving call."""
        tasks = [(job, index, candidate) for job in jobs for index in range(len(job.sources))
                 for candidate in range(self.candidate_num)]
        if not tasks:
            return
        canvases = {(id(job), index): self._canvas(job.sources[index])
                    for job, index, _ in tasks}
        outputs = self.diffusion.generate(
            [job.captions[index] for job, index, _ in tasks],
            [derive_seed(self.settings.seed, row_ids[job.offset], index, candidate)
             for job, index, candidate in tasks],
            [canvases[(id(job), index)] for job, index, _ in tasks],
        )
        for job in jobs:
            job.candidates = [[] for _ in job.sources]
        for (job, index, _), images in zip(tasks, outputs, strict=True):
            image = images[0]
            job.candidates[index].append(
                None if image is None else resize_to(image, job.sources[index].size))

    def _canvas(self, image: Image.Image) -> Image.Image:
        if self.image_size is None:
            return image
        return resize_to(image, (self.image_size, self.image_size))

    def _score(self, jobs: list[_Job]) -> None:
        """CLIP image-image similarity of each candidate to its source (similar_one only)."""
        if self.clip is None:
            return
        pairs = [(job, index, candidate) for job in jobs for index in range(len(job.sources))
                 for candidate, image in enumerate(job.candidates[index]) if image is not None]
        if not pairs:
            return
        similarities = self.clip.image_image_similarity(
            [job.candidates[index][candidate] for job, index, candidate in pairs],
            [job.sources[index] for job, index, _ in pairs],
        ).tolist()
        for job in jobs:
            job.scores = [[float("-inf")] * self.candidate_num for _ in job.sources]
        for (job, index, candidate), score in zip(pairs, similarities, strict=True):
            job.scores[index][candidate] = score

    def _select(self, job: _Job, row_id: str, rows: list[dict], failed: dict[int, dict]) -> bool:
        """Choose the kept candidates of each image; False (row failed) when too few are usable."""
        for index, candidates in enumerate(job.candidates):
            usable = [c for c, image in enumerate(candidates) if image is not None]
            if len(usable) < self.aug_num:
                flagged = len(candidates) - len(usable)
                self._fail(rows, job.offset, f"image {index}: {flagged} of {len(candidates)} "
                           "candidates flagged by the safety checker after every retry", failed)
                return False
            job.kept.append(self._pick(job, row_id, index, usable))
        return True

    def _pick(self, job: _Job, row_id: str, index: int, usable: list[int]) -> list[int]:
        """`aug_num` of the usable candidate indices of image `index`, in candidate order."""
        if self.keep_candidate_mode == "all":
            return usable
        if self.keep_candidate_mode == "random_any":
            picker = random.Random(derive_seed(self.settings.seed, row_id, index, "pick"))
            return sorted(picker.sample(usable, self.aug_num))
        scores = job.scores[index]
        return sorted(sorted(usable, key=lambda c: (-scores[c], c))[: self.aug_num])

    def _save(self, job: _Job, row_id: str, save_dir: Path) -> list[list[str]]:
        """Write the kept candidates as PNG; their paths, per image in kept order."""
        paths = []
        for index, kept in enumerate(job.kept):
            image_paths = []
            for candidate in kept:
                path = save_dir / image_file_name(row_id, index, candidate)
                save_png(job.candidates[index][candidate], path)
                image_paths.append(str(path))
            paths.append(image_paths)
        return paths

    def _generated_rows(self, row: dict, paths: list[list[str]] | None) -> list[dict]:
        """`aug_num` copies of `row`, copy k holding the k-th kept candidate of every image."""
        if paths is None:  # a row without images
            return []
        return [{**copy.deepcopy(row), self.keys.output: [per_image[k] for per_image in paths]}
                for k in range(self.aug_num)]


# ---------------------------------------------------------------------- construction
__all__ = ["ImageDiffusionAugmenter"]
