"""The shapes world: deterministic samples, captions that say what is drawn, a pixel judge
that reads it back, and a toy dataset on disk."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from dataflowmm.kit.shapes import (
    COLOUR_NAMES,
    COLOURS,
    HELD_OUT_SEED,
    SHAPES,
    ShapesWorld,
    all_captions,
    caption_for,
    judge_image,
    nearest_colour,
    write_shapes_dataset,
)


def test_samples_are_deterministic_and_splits_differ():
    world = ShapesWorld()
    first, again = world.sample(7, seed=0), world.sample(7, seed=0)
    assert first.caption == again.caption and first.attributes == again.attributes
    assert first.image.tobytes() == again.image.tobytes()
    other_split = world.sample(7, seed=HELD_OUT_SEED)
    assert other_split.image.tobytes() != first.image.tobytes()
    image, caption, attributes = first  # unpacks as a tuple
    assert image.size == (32, 32) and image.mode == "RGB"


def test_captions_name_the_attributes_and_cover_the_world():
    world = ShapesWorld()
    captions = set()
    for _image, caption, attributes in world.samples(400):
        assert caption == caption_for(attributes["shape"], attributes["colour"], attributes["background"])
        assert attributes["shape"] in SHAPES and attributes["colour"] in COLOUR_NAMES
        assert attributes["background"] != attributes["colour"]
        captions.add(caption)
    assert len(all_captions()) == len(set(all_captions())) == 3 * 6 * 5
    assert captions <= set(all_captions()) and len(captions) > 80


def test_pixels_match_the_attributes():
    world = ShapesWorld()
    for image, _, attributes in world.samples(50):
        pixels = np.asarray(image)
        # The border is background; the shape's centre pixel is the shape colour.
        assert nearest_colour(pixels[0, 0]) == attributes["background"]
        x, y = attributes["center"]
        if attributes["shape"] == "triangle":  # the centroid lies lower than the box centre
            y += attributes["extent"] / 6
        assert nearest_colour(pixels[int(y), int(x)]) == attributes["colour"]
        assert max(abs(a - b) for a, b in zip(attributes["shape_rgb"], COLOURS[attributes["colour"]], strict=True)) <= 12


def test_pixel_judge_reads_generated_images_back():
    world = ShapesWorld()
    samples = world.samples(300, seed=HELD_OUT_SEED)
    for image, _, attributes in samples:
        judged = judge_image(image)
        assert (judged["shape"], judged["colour"], judged["background"]) == (
            attributes["shape"], attributes["colour"], attributes["background"]), attributes


def test_pixel_judge_on_a_plain_image_finds_no_shape():
    judged = judge_image(Image.new("RGB", (32, 32), COLOURS["blue"]))
    assert judged["background"] == "blue" and judged["colour"] is None and judged["shape"] is None


def test_write_dataset(tmp_path):
    path = write_shapes_dataset(tmp_path / "toy", count=12, seed=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 12
    for index, row in enumerate(rows):
        image = Image.open(path.parent / row["images"][0])
        expected = ShapesWorld().sample(index, seed=3)
        assert image.tobytes() == expected.image.tobytes()
        assert row["text"] == expected.caption and row["shape"] == expected.attributes["shape"]
    again = write_shapes_dataset(tmp_path / "again", count=12, seed=3)
    assert again.read_text() == path.read_text()

