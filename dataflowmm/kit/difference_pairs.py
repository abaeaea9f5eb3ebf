"""Image pairs with known changes: a few shapes on a plain background, then one edit.

Edits: `move` (one shape goes to an empty place: two changed regions, where it was and where
it is), `recolour` (one shape changes colour), `add` (a new shape appears) and `identical`.
The pair and the boxes of the changed regions are deterministic in the seed, so tests,
the example data and the benchmark use the same pairs, and region proposals can be checked
against the truth.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from dataflowmm.io.atomic import atomic_write_text
from dataflowmm.io.images import save_png
from dataflowmm.kit.shapes import COLOURS
from dataflowmm.operators.boxes import Box, corners_to_box

EDITS = ("move", "recolour", "add", "identical")
SHAPE_KINDS = ("circle", "square", "triangle")
BACKGROUNDS = {"grey": (128, 128, 128), "sand": (210, 190, 150), "navy": (30, 40, 80)}
GRID = 4  # the image is a GRID x GRID board of cells; a shape sits inside one cell


@dataclass(frozen=True)
class _Shape:
    kind: str
    colour: str
    corners: tuple[int, int, int, int]


@dataclass
class DifferencePair:
    """Two images, what was edited and the `[cx, cy, w, h]` boxes of the changed regions."""

    first: Image.Image
    second: Image.Image
    edit: str
    changed: list[Box]
    description: str


def _draw(image: Image.Image, shape: _Shape) -> None:
    draw = ImageDraw.Draw(image)
    fill = COLOURS[shape.colour]
    x1, y1, x2, y2 = shape.corners
    if shape.kind == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    else:
        draw.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)


def _shape_in_cell(rng: random.Random, cell: int, size: int, colours: list[str]) -> _Shape:
    step = size // GRID
    side = rng.randint(step // 2, step - 6)
    x0, y0 = (cell % GRID) * step, (cell // GRID) * step
    x1, y1 = x0 + rng.randint(3, step - side - 3), y0 + rng.randint(3, step - side - 3)
    return _Shape(rng.choice(SHAPE_KINDS), rng.choice(colours), (x1, y1, x1 + side, y1 + side))


def _apart(cell: int, other: int) -> bool:
    return max(abs(cell % GRID - other % GRID), abs(cell // GRID - other // GRID)) >= 2


def difference_pair(seed: int, edit: str | None = None, size: int = 128, shapes: int = 3) -> DifferencePair:
    """The pair of `seed`: `shapes` shapes in distinct cells, then `edit` (default: by seed)."""
    rng = random.Random(seed)
    edit = edit or EDITS[seed % 3]  # identical pairs only when asked for
    if edit not in EDITS:
        raise ValueError(f"edit must be one of {', '.join(EDITS)}, got {edit!r}")
    background_name = rng.choice(list(BACKGROUNDS))
    colours = list(COLOURS)
    cells = rng.sample(range(GRID * GRID), shapes)
    scene = [_shape_in_cell(rng, cell, size, colours) for cell in cells]
    edited, changed, description = list(scene), [], "no change"
    target = rng.randrange(shapes)
    # A moved or added shape goes to a cell not touching an occupied one, so every changed
    # region is separate from the others (and from where the moved shape was).
    free = [cell for cell in range(GRID * GRID) if all(_apart(cell, used) for used in cells)]
    destination = rng.choice(free) if free else next(c for c in range(GRID * GRID) if c not in cells)
    if edit == "move":
        moved = _shape_in_cell(rng, destination, size, colours)
        edited[target] = _Shape(scene[target].kind, scene[target].colour, moved.corners)
        changed = [corners_to_box(*scene[target].corners), corners_to_box(*moved.corners)]
        description = f"the {scene[target].colour} {scene[target].kind} moved"
    elif edit == "recolour":
        new_colour = rng.choice([c for c in colours if c != scene[target].colour])
        edited[target] = _Shape(scene[target].kind, new_colour, scene[target].corners)
        changed = [corners_to_box(*scene[target].corners)]
        description = f"the {scene[target].colour} {scene[target].kind} became {new_colour}"
    elif edit == "add":
        added = _shape_in_cell(rng, destination, size, colours)
        edited.append(added)
        changed = [corners_to_box(*added.corners)]
        description = f"a {added.colour} {added.kind} was added"
    images = []
    for layout in (scene, edited):
        image = Image.new("RGB", (size, size), BACKGROUNDS[background_name])
        for shape in layout:
            _draw(image, shape)
        images.append(image)
    return DifferencePair(images[0], images[1], edit, changed, description)


def jpeg_roundtrip(image: Image.Image, quality: int = 75) -> Image.Image:
    """`image` encoded as JPEG and decoded again: the same picture plus compression noise."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def write_difference_pairs(out_dir: str | Path, count: int = 6, seed: int = 0, size: int = 128) -> Path:
    """`count` pairs as PNG files plus `pairs.jsonl` (paths relative to it, the edit, the true
    boxes under `changed_boxes`); returns the jsonl path."""
    out_dir = Path(out_dir)
    rows = []
    for index in range(count):
        pair = difference_pair(seed + index, size=size)
        names = [f"images/pair_{index:02d}_{side}.png" for side in ("a", "b")]
        save_png(pair.first, out_dir / names[0])
        save_png(pair.second, out_dir / names[1])
        rows.append({"id": f"pair-{index:02d}", "image_path1": names[0], "image_path2": names[1],
                     "edit": pair.edit, "description": pair.description, "changed_boxes": pair.changed})
    path = out_dir / "pairs.jsonl"
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path
