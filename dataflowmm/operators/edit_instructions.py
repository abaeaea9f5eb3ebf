"""EditInstructionGenerator: an edit instruction for each source image, with its captions before and after.

InstructPix2Pix's training data is (source image, instruction, edited image), made from an
instruction and two captions: the source's ("a photo of a horse") and the target's, the same
caption after the edit ("a photo of a zebra"). This operator writes those three texts for
each row, from templates over the row's columns (the edit is known: a data set of attributes
to change), or by asking any VLM serving about the row's image (`LocalVLMServing`,
`APIVLMServing`: vLLM, SGLang, any OpenAI-compatible server). An image-to-image serving then
makes the edit from the target caption or the instruction, and `EditVerifier` keeps the edits
that did what was asked.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING

from dataflowmm.contract import Input, Output, StepContext
from dataflowmm.operators.prompt_template import filled_template, template_fields
from dataflowmm.operators.visual_qa import VLMRowOperator, as_vlm_serving, row_images
from dataflowmm.serving.vlm_protocol import VLMPrompt

if TYPE_CHECKING:
    from dataflowmm.serving.vlm_protocol import VLMServing

EDIT_PROMPT = (
    "Propose one edit of this image that changes a single thing in it. Answer with a JSON object "
    'of three strings: "instruction" (the edit as a short imperative, such as "make the car red"), '
    '"source_caption" (a one-line caption of the image as it is) and "target_caption" (that caption '
    "after the edit, changed only where the edit changes the image)."
)
# What an answer may call each text (lower case, spaces for "_" and "-").
_NAMES = {
    "instruction": ("instruction", "edit instruction", "edit"),
    "source_caption": ("source caption", "input caption", "original caption", "caption before", "before"),
    "target_caption": ("target caption", "output caption", "edited caption", "caption after", "after"),
}
_LINE = re.compile(r"^\s*(?:[-*\d.)]+\s*)?\**\s*([a-z _-]+?)\s*\**\s*[:=]\s*(.+?)\s*$", re.IGNORECASE)


def parse_edit_answer(answer: str) -> dict[str, str]:
    """The instruction and the two captions in a VLM's answer: a JSON object (bare, in a code
    fence or amid other text) or lines such as `Instruction: ...` / `Target caption: ...`.
    Keys are matched without regard to case, `_`/`-`/spaces, and a few synonyms
    (`input_caption`, `output_caption`, `edit`). ValueError when any of the three is missing
    or empty."""
    if not isinstance(answer, str):
        raise ValueError(f"the answer is not text: {answer!r}")
    found = _from_json(answer) or {}
    if len(found) < len(_NAMES):
        found = {**_from_lines(answer), **found}
    missing = [name for name in _NAMES if not found.get(name)]
    if missing:
        shown = answer if len(answer) <= 200 else answer[:200] + "..."
        raise ValueError(f"the answer names no {', '.join(missing)} (expected JSON with instruction, "
                         f"source_caption and target_caption, or one 'Name: text' line each): {shown!r}")
    return {name: found[name] for name in _NAMES}


def _canonical(key: str) -> str | None:
    key = re.sub(r"[\s_-]+", " ", key.strip().lower())
    return next((name for name, aliases in _NAMES.items() if key in aliases), None)


def _from_json(answer: str) -> dict[str, str] | None:
    start, end = answer.find("{"), answer.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        value = json.loads(answer[start:end + 1])
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    found = {}
    for key, text in value.items():
        name = _canonical(str(key))
        if name and isinstance(text, str) and text.strip() and name not in found:
            found[name] = text.strip()
    return found


def _from_lines(answer: str) -> dict[str, str]:
    found = {}
    for line in answer.splitlines():
        match = _LINE.match(line)
        name = match and _canonical(match.group(1))
        if name and name not in found:
            text = match.group(2).strip().strip('"').strip("'").strip().rstrip(",")
            if text:
                found[name] = text
    return found


class EditInstructionGenerator(VLMRowOperator):
    r"""
    Write an edit instruction for each row's source image, with captions of the image before
    and after the edit.

    Two ways, one of them per operator:

    - **templates** over the row's columns (`str.format`, as `PromptTemplate`):
      `EditInstructionGenerator(instruction_template="make the {shape} {target_colour}",
      source_caption_template="a {colour} {shape}", target_caption_template="a {target_colour} {shape}")`
      writes `"make the circle red"` for `{"shape": "circle", "colour": "blue", "target_colour": "red"}`.
      No model, no image read. A caption template left `None` leaves that column unwritten.
      A row missing a field (or holding null there) is kept with its `error`.
    - **a VLM** (`serving=`): each row's image (`input_image_key`: one path or a list) goes to
      the serving with `prompt` (which may name row columns: `{field}`; literal braces doubled),
      all of a batch in one call. The answer is read as JSON (`{"instruction": ...,
      "source_caption": ..., "target_caption": ...}`, also inside a code fence or other text) or as
      `Instruction: ...` / `Source caption: ...` / `Target caption: ...` lines
      (`parse_edit_answer`). A row without an image, whose image cannot be read, whose request
      fails (transient failures are retried by the next run) or whose answer lacks any of the
      three texts is kept with its `error` and the three columns null.

    Args:
        serving (`LocalVLMServing`, `APIVLMServing`, `str` or `os.PathLike`, *optional*):
            Any serving of the VLM protocol, or a model id or folder to build a `LocalVLMServing` from.
        instruction_template (`str`, *optional*):
            Template of the instruction (template mode; not with `serving`).
        source_caption_template (`str`, *optional*):
            Template of the caption of the source image (template mode).
        target_caption_template (`str`, *optional*):
            Template of the caption of the edited image (template mode).
        prompt (`str`, *optional*, defaults to `EDIT_PROMPT`):
            The question asked with each image (VLM mode).
        system_prompt (`str`, *optional*):
            System turn of every question (VLM mode); `None` leaves the serving's own.
        save_interval (`int`, *optional*, defaults to 50):
            Rows between checkpoints; a killed run resumes from the last one.
        seed (`int`, *optional*, defaults to 0):
            Global seed; each row's answer is sampled with a seed derived from it and the row.
        strict (`bool`, *optional*, defaults to `False`):
            Raise on the first row that cannot be processed.
    """

    columns = [
        Input("image", "input_image_key", "images", "column with each row's source image path (or list; "
              "VLM mode only)", images=True, required=False),
        Output("instruction", "output_instruction_key", "instruction", "column receiving the edit instruction",
               empty=None),
        Output("source_caption", "output_source_caption_key", "source_caption",
               "column receiving the caption of the source image", empty=None),
        Output("target_caption", "output_target_caption_key", "target_caption",
               "column receiving the caption of the image after the edit", empty=None),
    ]
    default_input_batch_size = 256  # template mode: no model, a batch is a unit of work

    def __init__(self, serving: VLMServing | str | os.PathLike | None = None, *,
                 instruction_template: str | None = None, source_caption_template: str | None = None,
                 target_caption_template: str | None = None, prompt: str = EDIT_PROMPT,
                 system_prompt: str | None = None, save_interval: int = 50, seed: int = 0, strict: bool = False):
        templates = {"instruction": instruction_template, "source_caption": source_caption_template,
                     "target_caption": target_caption_template}
        given = {name: template for name, template in templates.items() if template is not None}
        if (serving is None) == (instruction_template is None):
            raise ValueError("give either serving (a VLM proposes the edit) or instruction_template (templates "
                             "over the row's columns), not both" if serving is not None else
                             "give serving (a VLM proposes the edit) or instruction_template (templates over the "
                             "row's columns)")
        if serving is not None and given:
            raise ValueError("caption templates are for template mode; with serving the VLM writes the captions")
        for name, template in {**given, **({"prompt": prompt} if serving is not None else {})}.items():
            if not isinstance(template, str) or not template.strip():
                raise ValueError(f"{name if name == 'prompt' else name + '_template'} must be a non-empty "
                                 f"str.format template, got {template!r}")
        self.templates = {name: (template, template_fields(template)) for name, template in given.items()}
        self.serving = as_vlm_serving(serving) if serving is not None else None
        self.prompt = prompt
        self.prompt_fields = template_fields(prompt) if serving is not None else []
        self.system_prompt = system_prompt

    def required_keys(self) -> list[str]:
        if self.serving is not None:
            return [self.keys.image, *self.prompt_fields]
        return sorted({field for _, fields in self.templates.values() for field in fields})

    def empty_outputs(self) -> dict:
        names = _NAMES if self.serving is not None else self.templates
        return {getattr(self.keys, name): None for name in names}

    def process_batch(self, rows: list[dict], row_ids: list[str], context: StepContext) -> list[dict]:
        if self.serving is not None:
            return super().process_batch(rows, row_ids, context)
        out = []
        for offset, row in enumerate(rows):
            try:
                texts = {getattr(self.keys, name): filled_template(template, fields, row)
                         for name, (template, fields) in self.templates.items()}
            except ValueError as error:
                out.append(self.row_failed(row, str(error), offset))
                continue
            out.append({**row, **texts})
        return out

    # -- VLM mode --------------------------------------------------------------------------

    def row_prompt(self, row: dict) -> VLMPrompt:
        images = row_images(row, self.keys.image)
        if not images:
            raise ValueError(f"key {self.keys.image!r}: no source image")
        question = filled_template(self.prompt, self.prompt_fields, row) if self.prompt_fields else self.prompt
        return self.vlm_prompt(images, question)

    def row_outputs(self, answer: str, row: dict) -> dict:
        return {getattr(self.keys, name): text for name, text in parse_edit_answer(answer).items()}


__all__ = ["EDIT_PROMPT", "EditInstructionGenerator", "parse_edit_answer"]
