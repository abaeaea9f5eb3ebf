"""Shapes-world edits: source rows an instruction-editing pipeline starts from, and a judge of edits.

An edit of the shapes world recolours the shape: "make the circle red". `write_edit_sources`
writes source images with, per row, the colour to make the shape (`target_colour`: never the
shape's own colour, never the background's, drawn from a seed), so the templates below turn
each row into an instruction and the captions before and after:

    rows = write_edit_sources(folder, 96, seed=777)
    EditInstructionGenerator(instruction_template=INSTRUCTION_TEMPLATE,
                             source_caption_template=SOURCE_CAPTION_TEMPLATE,
                             target_caption_template=TARGET_CAPTION_TEMPLATE)

`judge_edit` reads an edited image back with the pixel judge (`judge_image`) and says whether
the instructed attribute changed and the others did not; `redraw` draws a source again with
other colours (a perfect edit, or a planted bad one: a wrong colour, the background too).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

from dataflowmm.kit.shapes import (
    COLOUR_NAMES,
    COLOURS,
    ShapesWorld,
    _draw_shape,
    judge_image,
    write_shapes_dataset,
)
from dataflowmm.seeds import derive_seed

# The shapes world's edit: the shape takes another colour (the shape's, never the background's).
INSTRUCTION_TEMPLATE = "make the {shape} {target_colour}"
SOURCE_CAPTION_TEMPLATE = "a {colour} {shape} on a {background} background"
TARGET_CAPTION_TEMPLATE = "a {target_colour} {shape} on a {background} background"


def target_colours(attributes: dict) -> list[str]:
    """The colours a source's shape may be made: neither its own nor its background's."""
    return [name for name in COLOUR_NAMES if name not in (attributes["colour"], attributes["background"])]


def write_edit_sources(folder: str | os.PathLike, count: int, seed: int = 777, world: ShapesWorld | None = None,
                       file_name: str = "edit_sources.jsonl") -> Path:
    r"""
    Write `count` shapes-world source images (split `seed`) and one jsonl row per image.

    Each row has `images` (a one-element list, relative to the jsonl file), `text` (the
    caption), the sample's attributes (`shape`, `colour`, `background`, ...) and
    `target_colour`: the colour the edit should give the shape, drawn from `seed` and the
    row's index, never the shape's colour or the background's.

    Returns:
        `Path`: the jsonl file.
    """
    def target(index: int, attributes: dict) -> dict:
        rng = random.Random(derive_seed("shapes-edit-target", seed, index))
        return {"target_colour": rng.choice(target_colours(attributes))}

    return write_shapes_dataset(folder, count, seed, world, file_name, image_prefix="source_", extra_columns=target)


def redraw(attributes: dict, colour: str | None = None, background: str | None = None,
           world: ShapesWorld | None = None) -> Image.Image:
    """The sample of `attributes` drawn again, its shape in `colour` and on `background` (palette
    names; `None` keeps the sample's own jittered colour): the same shape, size and place."""
    world = world or ShapesWorld()
    scale = world.supersampling
    canvas = world.image_size * scale
    extent = round(attributes["extent"] * scale)
    left = round(attributes["center"][0] * scale - extent / 2)
    top = round(attributes["center"][1] * scale - extent / 2)
    shape_rgb = COLOURS[colour] if colour else tuple(attributes["shape_rgb"])
    background_rgb = COLOURS[background] if background else tuple(attributes["background_rgb"])
    image = Image.new("RGB", (canvas, canvas), background_rgb)
    _draw_shape(ImageDraw.Draw(image), attributes["shape"], (left, top, left + extent, top + extent), shape_rgb)
    return image.resize((world.image_size, world.image_size), Image.Resampling.BOX)


def judge_edit(source: dict, edited: Image.Image, target_colour: str) -> dict:
    """What the pixel judge reads in an edited image of the source with attributes `source`.

    Returns `shape`, `colour`, `background` (as `judge_image` reads them), `colour_changed`
    (the shape is `target_colour` now), `others_unchanged` (shape and background as in the
    source) and `right` (both).
    """
    found = judge_image(edited)
    changed = found["colour"] == target_colour
    unchanged = found["shape"] == source["shape"] and found["background"] == source["background"]
    return {"shape": found["shape"], "colour": found["colour"], "background": found["background"],
            "colour_changed": changed, "others_unchanged": unchanged, "right": changed and unchanged}


__all__ = ["INSTRUCTION_TEMPLATE", "SOURCE_CAPTION_TEMPLATE", "TARGET_CAPTION_TEMPLATE", "judge_edit", "redraw",
           "target_colours", "write_edit_sources"]
