"""PromptedImageGenerator: prompts (conversations or a text column) in, generated images out."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from dataflowmm.contract import Input, Operator, Output, RowError, StepContext
from dataflowmm.io.images import ImageOutput
from dataflowmm.seeds import derive_seed
from dataflowmm.serving.common import build_serving

if TYPE_CHECKING:
    from dataflowmm.serving.image_gen import LocalImageGenServing

_USER_ROLES = ("user", "human")


def conversation_prompts(conversation: Any, key: str) -> list[str]:
    """The non-empty text of every user turn, in order.

    Turns are `{"role": "user", "content": ...}` (DataFlow-MM) or ShareGPT's
    `{"from": "human", "value": ...}`. Raises ValueError describing what is wrong.
    """
    if not isinstance(conversation, list):
        raise ValueError(f"key {key!r}: expected a list of turns, got {type(conversation).__name__}")
    prompts = []
    for index, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise ValueError(f"key {key!r}: turn {index} is {type(turn).__name__}, expected an object")
        role = turn.get("role", turn.get("from"))
        if role not in _USER_ROLES:
            continue
        content = turn.get("content", turn.get("value"))
        if not isinstance(content, str):
            raise ValueError(f"key {key!r}: turn {index} content is {type(content).__name__}, expected a string")
        if content.strip():
            prompts.append(content.strip())
    if not prompts:
        raise ValueError(f"key {key!r}: no user turn with text")
    return prompts


def column_prompt(value: Any, key: str) -> list[str]:
    """A plain prompt column: one non-empty string."""
    if not isinstance(value, str):
        raise ValueError(f"key {key!r}: prompt is {type(value).__name__}, expected a string")
    if not value.strip():
        raise ValueError(f"key {key!r}: empty prompt")
    return [value.strip()]


class PromptedImageGenerator(Operator):
    """Generate images for every prompt of every row.

    Args:
        t2i_serving: a `LocalImageGenServing` in text2image mode, or a model id or folder to
            build one from (with its defaults).
        save_interval: rows between checkpoints; a killed run resumes from the last one.
        seed: global seed; image j of prompt p of a row uses a seed derived from
            (seed, row identity, p), so results do not depend on batching or resuming.
        save_dir: folder for the PNG files; default `{cache_path}/{prefix}_step{N}_images`.
        absolute_paths: write absolute paths instead of paths relative to the dataset file.
        strict: raise on the first unusable row instead of keeping it with an error.
        image_format: `"png"` (default, lossless) or `"jpeg"`.
        images_in_rows: put base64 strings into the rows instead of writing files.
    """

    columns = [
        Input("conversation", "input_conversation_key", "conversations",
              "column of conversations; every user turn with text is a prompt"),
        Output("output", "output_image_key", "images", "column receiving the list of image paths "
               "(num_images_per_prompt per prompt, in prompt order)", images=True, empty=[],
               only_if=lambda op: not op.image_output.images_in_rows),
        Input("prompt", "input_prompt_key", None,
              "read one plain-string prompt per row from this column instead"),
    ]

    def __init__(
        self,
        t2i_serving: LocalImageGenServing | str | os.PathLike,
        save_interval: int = 50,
        *,
        seed: int = 0,
        save_dir: str | os.PathLike | None = None,
        absolute_paths: bool = False,
        strict: bool = False,
        image_format: str = "png",
        images_in_rows: bool = False,
    ):
        from dataflowmm.serving.image_gen import LocalImageGenServing

        self.serving = build_serving(t2i_serving, LocalImageGenServing, argument="t2i_serving",
                                     methods=("generate", "config"))
        self.image_output = ImageOutput(image_format, images_in_rows)

    def required_keys(self) -> list[str]:
        return [self.keys.prompt or self.keys.conversation]

    def _row_prompts(self, row: dict) -> list[str]:
        key = self.keys.prompt or self.keys.conversation
        if key not in row or row[key] is None:
            raise ValueError(f"key {key!r}: missing")
        if self.keys.prompt:
            return column_prompt(row[key], key)
        return conversation_prompts(row[key], key)

    def process_batch(self, rows: list[dict], row_ids: list[str], context: StepContext) -> list[dict]:
        failed: dict[int, str] = {}
        prompts_by_row: dict[int, list[str]] = {}
        for offset, row in enumerate(rows):
            try:
                prompts_by_row[offset] = self._row_prompts(row)
            except ValueError as error:
                failed[offset] = str(error)

        jobs = [(offset, index, prompt) for offset, prompts in prompts_by_row.items()
                for index, prompt in enumerate(prompts)]
        images = self.serving.generate(
            [prompt for _, _, prompt in jobs],
            [derive_seed(self.settings.seed, row_ids[offset], index) for offset, index, _ in jobs],
        ) if jobs else []

        images_by_row: dict[int, list[str]] = {offset: [] for offset in prompts_by_row}
        for (offset, prompt_index, _), candidates in zip(jobs, images, strict=True):
            if any(image is None for image in candidates):
                failed[offset] = "an image was flagged by the safety checker after every retry"
                continue
            for candidate_index, image in enumerate(candidates):
                images_by_row[offset].append(self.image_output.store(image, context.save_dir, row_ids[offset],
                                                                    prompt_index, candidate_index))

        out_rows = []
        for offset, row in enumerate(rows):
            if offset in failed:
                out_rows.append(self.row_failed(row, failed[offset], offset))
            else:
                out_rows.append({**row, self.keys.output: images_by_row[offset]})
        return out_rows


__all__ = ["PromptedImageGenerator", "RowError"]
