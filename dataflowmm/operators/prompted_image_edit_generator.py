"""PromptedImageEditGenerator: source image(s) and an instruction per row in, edited images out."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from PIL import Image

from dataflowmm.checks import check_positive_int
from dataflowmm.contract import Input, Operator, Output, RowError, StepContext
from dataflowmm.io.images import ImageOutput
from dataflowmm.operators.image_captioner import load_row_images
from dataflowmm.operators.prompted_image_generator import conversation_prompts
from dataflowmm.operators.sample_format import row_image_paths
from dataflowmm.seeds import derive_seed
from dataflowmm.serving.common import build_serving

if TYPE_CHECKING:
    from dataflowmm.serving.image_gen import LocalImageGenServing

EDIT_TASKS = ("edit", "image2image")


def row_instructions(value: Any, key: str, count: int) -> list[str]:
    """One instruction per source image from a plain column: a non-empty string for every image,
    or a list of `count` of them."""
    values = [value] * count if isinstance(value, str) else value
    if not isinstance(values, list):
        raise ValueError(f"key {key!r}: expected a string or a list of strings, got {type(value).__name__}")
    if len(values) != count:
        raise ValueError(f"key {key!r}: {len(values)} instructions for {count} images")
    for text in values:
        if not isinstance(text, str):
            raise ValueError(f"key {key!r}: instruction is {type(text).__name__}, expected a string")
        if not text.strip():
            raise ValueError(f"key {key!r}: empty instruction")
    return [text.strip() for text in values]


class PromptedImageEditGenerator(Operator):
    r"""
    Edit every source image of every row by the row's instruction (DataFlow-MM's
    `PromptedImageEditGenerator`).

    The instruction is the last user turn with text of the row's conversation (DataFlow-MM's
    choice; turns as `{"role": "user", "content": ...}` or ShareGPT's `{"from": "human", "value":
    ...}`), or, with `input_prompt_key`, a plain string column (a string for every image, or a
    list with one per image). Every (image, instruction) pair of a batch of rows goes to the
    serving in one `generate` call (split into model calls of the serving's `batch_size`). Each
    image yields `num_images_per_prompt` edits, written as PNG files named by the row's identity,
    the image index and the edit index; the output column lists them image by image. A row whose
    image is missing or unreadable, or whose instruction is missing or empty, is kept with its
    error and no outputs (`strict` raises instead).

    Models: an instruction editing pipeline (`task="edit"`: InstructPix2Pix, FLUX Kontext,
    Qwen-Image-Edit, loaded as the class their folder names), or any image-to-image model
    (`task="image2image"`) with a target caption as the prompt (`input_prompt_key`).

    Args:
        image_edit_serving (`str`, `os.PathLike` or `LocalImageGenServing`):
            Hub id or local folder (or `tiny:NAME`) of the model, built into a
            `LocalImageGenServing` with the settings below; or a built serving with task
            `"edit"` or `"image2image"`, used as is (giving a setting below with another value
            than the serving's is an error).
        save_interval (`int`, *optional*, defaults to 50):
            Rows between checkpoints; a killed run resumes from the last one.
        task (`str`, *optional*):
            `"edit"` (default) or `"image2image"` for the serving built here.
        num_images_per_prompt (`int`, *optional*):
            Edits per source image (1 when not given).
        batch_size (`int`, *optional*):
            (image, instruction) pairs per model call (4 when not given); also the rows per batch.
        num_inference_steps, guidance_scale, image_guidance_scale, true_cfg_scale, strength, negative_prompt, torch_dtype:
            The built serving's settings (see `LocalImageGenServing`); its defaults when not given.
        seed (`int`, *optional*, defaults to 0):
            Global seed. Source image i of a row is edited with `derive_seed(seed, row, i)` (edit j
            with `derive_seed(that, j)`), so results do not depend on batching or resuming.
        save_dir (`str` or `os.PathLike`, *optional*):
            Folder for the edited images; default `{cache_path}/{prefix}_step{N}_images`.
        absolute_paths (`bool`, *optional*, defaults to `False`):
            Write absolute image paths instead of paths relative to the dataset file.
        strict (`bool`, *optional*, defaults to `False`):
            Raise on the first unusable row instead of keeping it with an error.
        image_format (`str`, *optional*, defaults to `"png"`):
            `"png"` (lossless) or `"jpeg"`.
        images_in_rows (`bool`, *optional*, defaults to `False`):
            Put base64 strings into the rows instead of writing files.
    """

    columns = [
        Input("image", "input_image_key", "images", "column with each row's source image path, or a list of "
              "them: every image is edited", images=True),
        Input("conversation", "input_conversation_key", "conversation",
              "column of conversations; the last user turn with text is the instruction"),
        Output("output", "output_image_key", "edited_images", "column receiving the list of edited image paths "
               "(num_images_per_prompt per source image, in image order)", images=True, empty=[],
               only_if=lambda op: not op.image_output.images_in_rows),
        Input("prompt", "input_prompt_key", None, "read the instruction (or, for an image2image model, the "
              "target caption) from this plain column instead: a string, or a list with one per image"),
    ]

    def __init__(
        self,
        image_edit_serving: LocalImageGenServing | str | os.PathLike,
        save_interval: int = 50,
        *,
        task: str | None = None,
        num_images_per_prompt: int | None = None,
        batch_size: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        strength: float | None = None,
        negative_prompt: str | None = None,
        torch_dtype: str | None = None,
        seed: int = 0,
        save_dir: str | os.PathLike | None = None,
        absolute_paths: bool = False,
        strict: bool = False,
        image_format: str = "png",
        images_in_rows: bool = False,
    ):
        from dataflowmm.serving.image_gen import LocalImageGenServing

        if task is not None and task not in EDIT_TASKS:
            raise ValueError(f"task must be one of {', '.join(EDIT_TASKS)}, got {task!r}")
        for name, value in (("num_images_per_prompt", num_images_per_prompt), ("batch_size", batch_size)):
            if value is not None:
                check_positive_int(name, value)
        settings = {"task": task, "num_images_per_prompt": num_images_per_prompt, "batch_size": batch_size,
                    "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                    "image_guidance_scale": image_guidance_scale, "true_cfg_scale": true_cfg_scale,
                    "strength": strength, "negative_prompt": negative_prompt, "torch_dtype": torch_dtype}
        self.serving = build_serving(image_edit_serving, LocalImageGenServing, argument="image_edit_serving",
                                     settings=settings, defaults={"task": "edit"},
                                     methods=("generate", "config"))
        if getattr(self.serving, "task", None) not in EDIT_TASKS:
            raise ValueError(f"image_edit_serving must be a serving with task 'edit' or 'image2image' (an "
                             f"input image per prompt), got task={getattr(self.serving, 'task', None)!r}")
        self.image_output = ImageOutput(image_format, images_in_rows)

    def required_keys(self) -> list[str]:
        return [self.keys.image, self.keys.prompt or self.keys.conversation]

    def _row_job(self, row: dict) -> tuple[list[Image.Image], list[str]]:
        """The row's source images and one instruction per image; ValueError says what is wrong."""
        paths = row_image_paths(row.get(self.keys.image), self.keys.image)
        if not paths:
            raise ValueError(f"key {self.keys.image!r}: no source image")
        key = self.keys.prompt or self.keys.conversation
        if row.get(key) is None:
            raise ValueError(f"key {key!r}: missing")
        if self.keys.prompt:
            instructions = row_instructions(row[key], key, len(paths))
        else:
            instructions = [conversation_prompts(row[key], key)[-1]] * len(paths)
        loaded = load_row_images(paths, self.keys.image)
        return [loaded[path] for path in paths], instructions

    def process_batch(self, rows: list[dict], row_ids: list[str], context: StepContext) -> list[dict]:
        failed: dict[int, str] = {}
        pairs: list[tuple[int, int, Image.Image, str]] = []  # (row offset, image index, image, instruction)
        for offset, row in enumerate(rows):
            try:
                sources, instructions = self._row_job(row)
            except ValueError as error:
                failed[offset] = str(error)
                continue
            pairs.extend((offset, index, source, text)
                         for index, (source, text) in enumerate(zip(sources, instructions, strict=True)))

        edits = self.serving.generate(
            [text for *_, text in pairs],
            [derive_seed(self.settings.seed, row_ids[offset], index) for offset, index, *_ in pairs],
            [source for _, _, source, _ in pairs],
        ) if pairs else []

        for (offset, index, *_), candidates in zip(pairs, edits, strict=True):
            if offset not in failed and any(image is None for image in candidates):
                failed[offset] = f"image {index}: an edit was flagged by the safety checker after every retry"
        outputs: dict[int, list[str]] = {offset: [] for offset, *_ in pairs}
        for (offset, index, *_), candidates in zip(pairs, edits, strict=True):
            if offset not in failed:  # a row's files are written only when all its edits are usable
                outputs[offset].extend(self.image_output.store(image, context.save_dir, row_ids[offset], index,
                                                               candidate) for candidate, image in enumerate(candidates))

        return [self.row_failed(row, failed[offset], offset) if offset in failed
                else {**row, self.keys.output: outputs[offset]} for offset, row in enumerate(rows)]


__all__ = ["PromptedImageEditGenerator", "RowError"]
