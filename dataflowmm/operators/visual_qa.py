"""Visual question answering: a question per row and the row's images in, the VLM's answer out.

DataFlow-MM's `PromptedVQAGenerator` (the question from a column or a conversation) and
`PromptTemplatedVQAGenerator` (the question from a template filled with the row), on any
serving that follows the VLM protocol (`dataflowmm.serving.vlm_protocol`): a local chat
VLM (`LocalVLMServing`) or an OpenAI-compatible server (`APIVLMServing`: `vllm serve`,
SGLang, ...). All questions of a batch go to the serving in one call; a prompt that fails
(a rate limit, a refusal, a cut-off answer) fails its row only, and a transient failure
is retried by the step's next run.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from typing import TYPE_CHECKING, Any

from dataflowmm.contract import Input, Operator, Output, StepContext, is_transient
from dataflowmm.io.images import (
    ImageReadError,
    check_image_file,
    load_image,
    looks_like_base64_image,
)
from dataflowmm.operators.prompt_template import filled_template, template_fields
from dataflowmm.operators.prompted_image_generator import column_prompt, conversation_prompts
from dataflowmm.operators.sample_format import row_image_paths
from dataflowmm.seeds import derive_seed
from dataflowmm.serving.vlm_protocol import ImageSource, VLMPrompt

if TYPE_CHECKING:
    from dataflowmm.serving.vlm_protocol import VLMServing

LLAVA_IMAGE_TOKEN = "<image>"  # LLaVA / ShareGPT's placeholder for an image in a turn's text


def as_vlm_serving(serving: Any, argument: str = "serving") -> VLMServing:
    """`serving` itself when it follows the VLM protocol, else a `LocalVLMServing` of that
    model id or folder (built lazily: nothing loads)."""
    if isinstance(serving, (str, os.PathLike)):
        from dataflowmm.serving.vlm import LocalVLMServing

        return LocalVLMServing(serving)
    missing = [name for name in ("generate", "config") if not callable(getattr(serving, name, None))]
    if missing:
        raise ValueError(f"{argument} must be a VLM serving (LocalVLMServing, APIVLMServing), a model id or a "
                         f"local folder; {serving!r} has no {', '.join(missing)}")
    return serving


def row_images(row: dict, key: str) -> list[ImageSource]:
    """The images a row names under `key` (one path, a list of paths, or none): files checked
    (they exist, their header is an allowed image format) and left for the serving to read
    where it sends them; images carried in the row (base64) decoded. ValueError naming the
    key and the file when one cannot be used."""
    images: list[ImageSource] = []
    for path in row_image_paths(row.get(key), key):
        try:
            if looks_like_base64_image(path):
                images.append(load_image(path))
            else:
                check_image_file(path)
                images.append(path)
        except ImageReadError as error:
            raise ValueError(f"key {key!r}: {error}") from None
    return images


class VLMRowOperator(Operator):
    """One VLM prompt per row, all of a batch in one serving call; the answer becomes the
    row's outputs, or the row fails with why (transient failures retried by the next run).

    A subclass sets `self.serving` (through `as_vlm_serving`) and `self.system_prompt`, and
    implements `row_prompt` and `row_outputs`.
    """

    serving: VLMServing
    system_prompt: str | None = None

    @abstractmethod
    def row_prompt(self, row: dict) -> VLMPrompt:
        """The row's prompt; ValueError (naming the key) when the row cannot make one."""

    @abstractmethod
    def row_outputs(self, answer: str, row: dict) -> dict:
        """The written columns for the row's answer; ValueError when the answer is unusable."""

    def process_batch(self, rows: list[dict], row_ids: list[str], context: StepContext) -> list[dict]:
        prompts: dict[int, VLMPrompt] = {}
        failed: dict[int, str] = {}
        for offset, row in enumerate(rows):
            try:
                prompts[offset] = self.row_prompt(row)
            except ValueError as error:
                failed[offset] = str(error)
        offsets = list(prompts)
        seeds = [derive_seed(self.settings.seed, row_ids[offset]) for offset in offsets]
        answers = dict(zip(offsets, self.serving.generate([prompts[o] for o in offsets], seeds), strict=True)) \
            if offsets else {}
        out = []
        for offset, row in enumerate(rows):
            answer = answers.get(offset)
            if offset in failed:
                out.append(self.row_failed(row, failed[offset], offset))
            elif isinstance(answer, BaseException):
                out.append(self.row_failed(row, str(answer), offset, transient=is_transient(answer)))
            else:
                try:
                    out.append({**row, **self.row_outputs(answer, row)})
                except ValueError as error:
                    out.append(self.row_failed(row, str(error), offset))
        return out

    def vlm_prompt(self, images: list[ImageSource], question: str) -> VLMPrompt:
        """A prompt of these images and this question, with the operator's system prompt."""
        return VLMPrompt(tuple(images), question, self.system_prompt)


_IMAGE_COLUMN_DOC = "column with the row's image path or list of paths (none: a text-only chat)"
_ANSWER_DOC = "column receiving the answer"


class PromptedVQAGenerator(VLMRowOperator):
    r"""
    Answer each row's question about the row's images with a VLM.

    The question is the row's `input_prompt_key` column when that is given, else the first
    user turn of its `input_conversation_key` column (DataFlow-MM's `{"role": "user",
    "content": ...}` or ShareGPT's `{"from": "human", "value": ...}`; LLaVA's `<image>`
    placeholders are removed from it). The images are the row's `input_image_key` column,
    one path or a list; a row with none is asked as a text-only chat. A row whose question
    or images cannot be read, or whose request fails, is kept with `answer` null and its
    `error`.

    Args:
        serving (`LocalVLMServing`, `APIVLMServing`, `str` or `os.PathLike`):
            Any serving of the VLM protocol, or a model id or folder to build a `LocalVLMServing` from.
        system_prompt (`str`, *optional*):
            System turn of every question; `None` leaves the serving's own (DataFlow-MM's
            "You are a helpful assistant." is what Qwen2-VL's chat template adds by itself;
            LLaVA's templates have no system turn).
        save_interval (`int`, *optional*, defaults to 50):
            Rows between checkpoints; a killed run resumes from the last one.
        seed (`int`, *optional*, defaults to 0):
            Global seed; each row's answer is sampled with a seed derived from it and the row.
        strict (`bool`, *optional*, defaults to `False`):
            Raise on the first row that cannot be answered.
    """

    columns = [
        Input("prompt", "input_prompt_key", None, "column with each row's question (wins over the conversation)",
              required=False),
        Input("conversation", "input_conversation_key", "conversations",
              "column of conversations; the first user turn is the question"),
        Input("image", "input_image_key", "images", _IMAGE_COLUMN_DOC, images=True, required=False),
        Output("answer", "output_answer_key", "answer", _ANSWER_DOC, empty=None),
    ]

    def __init__(self, serving: VLMServing | str | os.PathLike, system_prompt: str | None = None, *,
                 save_interval: int = 50, seed: int = 0, strict: bool = False):
        self.serving = as_vlm_serving(serving)
        self.system_prompt = system_prompt

    def required_keys(self) -> list[str]:
        return [self.keys.prompt or self.keys.conversation]

    def row_prompt(self, row: dict) -> VLMPrompt:
        key = self.keys.prompt or self.keys.conversation
        if row.get(key) is None:
            raise ValueError(f"key {key!r}: missing")
        if self.keys.prompt:
            question = column_prompt(row[key], key)[0]
        else:
            question = conversation_prompts(row[key], key)[0].replace(LLAVA_IMAGE_TOKEN, "").strip()
            if not question:
                raise ValueError(f"key {key!r}: the first user turn holds no text besides {LLAVA_IMAGE_TOKEN}")
        return self.vlm_prompt(row_images(row, self.keys.image), question)

    def row_outputs(self, answer: str, row: dict) -> dict:
        return {self.keys.answer: answer}


class PromptTemplatedVQAGenerator(VLMRowOperator):
    r"""
    Ask each row a question built from a template filled with the row's columns, about the
    row's images.

    `PromptTemplatedVQAGenerator(serving, "Is the {shape} in this picture {colour}?")` asks
    a row `{"shape": "circle", "colour": "red", "images": [...]}` "Is the circle in this
    picture red?". The template's `{field}` names are the columns it reads (`str.format`:
    `{meta[lang]}` reads a nested field). A row missing a field (or holding null there) is
    kept with `answer` null and its `error`, as is a row whose images cannot be read or whose
    request fails; a row without images is asked as a text-only chat.

    Args:
        serving (`LocalVLMServing`, `APIVLMServing`, `str` or `os.PathLike`):
            Any serving of the VLM protocol, or a model id or folder to build a `LocalVLMServing` from.
        prompt_template (`str`):
            The question's template.
        system_prompt (`str`, *optional*):
            System turn of every question; `None` leaves the serving's own.
        save_interval (`int`, *optional*, defaults to 50):
            Rows between checkpoints; a killed run resumes from the last one.
        seed (`int`, *optional*, defaults to 0):
            Global seed; each row's answer is sampled with a seed derived from it and the row.
        strict (`bool`, *optional*, defaults to `False`):
            Raise on the first row that cannot be answered.
    """

    columns = [
        Input("image", "input_image_key", "images", _IMAGE_COLUMN_DOC, images=True, required=False),
        Output("answer", "output_answer_key", "answer", _ANSWER_DOC, empty=None),
    ]

    def __init__(self, serving: VLMServing | str | os.PathLike, prompt_template: str,
                 system_prompt: str | None = None, *, save_interval: int = 50, seed: int = 0, strict: bool = False):
        if not isinstance(prompt_template, str):
            raise ValueError(f"prompt_template must be a str.format template, got {type(prompt_template).__name__}")
        self.fields = template_fields(prompt_template)
        if not self.fields:
            raise ValueError(f"prompt_template {prompt_template!r} names no {{field}}")
        self.serving = as_vlm_serving(serving)
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt

    def required_keys(self) -> list[str]:
        return list(self.fields)

    def row_prompt(self, row: dict) -> VLMPrompt:
        question = filled_template(self.prompt_template, self.fields, row)
        if not question.strip():
            raise ValueError("the filled template is empty")
        return self.vlm_prompt(row_images(row, self.keys.image), question)

    def row_outputs(self, answer: str, row: dict) -> dict:
        return {self.keys.answer: answer}


__all__ = ["PromptTemplatedVQAGenerator", "PromptedVQAGenerator", "VLMRowOperator", "as_vlm_serving",
           "row_images"]
