"""EditTriples: one row per (source image, instruction, edited image), what an instruction-
editing model (InstructPix2Pix, FLUX Kontext, Qwen-Image-Edit) trains on."""

from __future__ import annotations

from typing import Any

from dataflowmm.contract import Input, Operator, Output, StepContext
from dataflowmm.operators.sample_format import row_image_paths


class EditTriples(Operator):
    r"""
    Split each row's edits into edit triples: one output row per edited image, holding its
    source image, its instruction and the edited image as single values.

    `PromptedImageEditGenerator` writes, per row, `num_images_per_prompt` edits per source
    image, image by image; row `{"images": [a, b], "instruction": "make the circle red",
    "edited_images": [a1, a2, b1, b2]}` becomes four rows `{"source_image": a, "instruction":
    ..., "edited_image": a1}`, ... (the list columns are replaced by the single ones; an
    instruction given as a list, one per source image, is split with them). Every other
    column is kept. A row whose edited images do not divide evenly among its source images,
    or whose instruction list has another length, is kept with its error; a row without
    edited images (its edit failed) gives no triple.

    Args:
        save_interval (`int`, *optional*, defaults to 1000):
            Rows between checkpoints.
        strict (`bool`, *optional*, defaults to `False`):
            Raise on the first row that cannot be split.
    """

    columns = [
        Input("source", "input_image_key", "images", "column with the row's source image path, or a list",
              images=True),
        Input("edited", "input_edited_image_key", "edited_images",
              "column with the edited image paths (the same number per source image, image by image)", images=True),
        Input("instruction", "input_instruction_key", "instruction",
              "column with the instruction: a string, or a list with one per source image"),
        Output("source_out", "output_source_image_key", "source_image", "column receiving the source image",
               images=True, empty=None),
        Output("edited_out", "output_edited_image_key", "edited_image", "column receiving the edited image",
               images=True, empty=None),
    ]
    default_input_batch_size = 1024  # no model: a batch is just a unit of work

    def __init__(self, *, save_interval: int = 1000, strict: bool = False):
        pass

    def image_output_keys(self) -> list[str]:
        return []  # the paths of images other steps made: nothing is generated here

    def process_batch(self, rows: list[dict], row_ids: list[str], context: StepContext) -> list[dict]:
        out = []
        for offset, row in enumerate(rows):
            try:
                out.extend(self._triples(row))
            except ValueError as error:
                out.append(self.row_failed(row, str(error), offset))
        return out

    def _triples(self, row: dict) -> list[dict]:
        keys = self.keys
        sources = row_image_paths(row.get(keys.source), keys.source)
        edited = row_image_paths(row.get(keys.edited), keys.edited)
        if not edited:
            return []
        if not sources or len(edited) % len(sources):
            raise ValueError(f"key {keys.edited!r}: {len(edited)} edited images for {len(sources)} source images")
        per_source = len(edited) // len(sources)
        instructions = self._instructions(row.get(keys.instruction), len(sources))
        kept = {name: value for name, value in row.items() if name not in (keys.source, keys.edited)}
        return [{**kept, keys.instruction: instructions[index // per_source],
                 keys.source_out: sources[index // per_source], keys.edited_out: path}
                for index, path in enumerate(edited)]

    def _instructions(self, value: Any, count: int) -> list[Any]:
        if not isinstance(value, list):
            return [value] * count
        if len(value) != count:
            raise ValueError(f"key {self.keys.instruction!r}: {len(value)} instructions for {count} source images")
        return value
