"""ImageDifferenceRegions finds what changed between two images, and nothing else."""

import json

import pytest
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.kit.difference_pairs import difference_pair, jpeg_roundtrip, write_difference_pairs
from dataflowmm.operators import ImageDifferenceRegions
from dataflowmm.operators.boxes import iou

SEEDS = range(40)


def best_iou(truth, boxes):
    return max((iou(truth, box) for box in boxes), default=0.0)


@pytest.mark.parametrize("edit", ["move", "recolour", "add"])
def test_every_changed_region_is_found_and_nothing_else(edit):
    op = ImageDifferenceRegions()
    for seed in SEEDS:
        pair = difference_pair(seed, edit)
        boxes = op.regions(pair.first, pair.second)
        assert len(boxes) == len(pair.changed), (seed, pair.description, boxes)
        for truth in pair.changed:
            assert best_iou(truth, boxes) >= 0.5, (seed, pair.description, truth, boxes)


@pytest.mark.parametrize("edit", ["move", "recolour", "add"])
def test_changes_are_found_through_jpeg_noise(edit):
    op = ImageDifferenceRegions()
    for seed in SEEDS:
        pair = difference_pair(seed, edit)
        boxes = op.regions(jpeg_roundtrip(pair.first), jpeg_roundtrip(pair.second))
        for truth in pair.changed:
            assert best_iou(truth, boxes) >= 0.5, (seed, pair.description, truth, boxes)


def test_identical_images_and_jpeg_noise_alone_give_no_region():
    op = ImageDifferenceRegions()
    for seed in SEEDS:
        image = difference_pair(seed, "identical").first
        assert op.regions(image, image.copy()) == []
        for quality in (75, 50):
            assert op.regions(image, jpeg_roundtrip(image, quality)) == [], (seed, quality)


def test_moved_shape_gives_two_regions_largest_first_and_max_regions_keeps_the_largest():
    pair = difference_pair(3, "move")
    boxes = ImageDifferenceRegions().regions(pair.first, pair.second)
    assert len(boxes) == 2
    assert boxes[0][2] * boxes[0][3] >= boxes[1][2] * boxes[1][3]
    assert ImageDifferenceRegions(max_regions=1).regions(pair.first, pair.second) == boxes[:1]


def test_tiny_changes_are_dropped_and_nearby_fragments_merge():
    base = Image.new("RGB", (100, 100), (128, 128, 128))
    speck = base.copy()
    speck.putpixel((50, 50), (255, 0, 0))
    assert ImageDifferenceRegions(threshold=10, blur_size=1).regions(base, speck) == []
    two_bars = base.copy()
    for x in range(20, 40):
        for y in range(20, 30):
            two_bars.putpixel((x, y), (255, 255, 255))
            two_bars.putpixel((x, y + 11), (255, 255, 255))  # one-pixel gap between the bars
    boxes = ImageDifferenceRegions(merge_distance=2).regions(base, two_bars)
    assert boxes == [[30.0, 30.5, 20.0, 21.0]]
    assert len(ImageDifferenceRegions(merge_distance=0).regions(base, two_bars)) == 2


def test_second_image_of_another_size_is_compared_at_the_first_ones_size():
    pair = difference_pair(5, "add")
    bigger = pair.second.resize((256, 256), Image.Resampling.NEAREST)
    boxes = ImageDifferenceRegions().regions(pair.first, bigger.resize(pair.first.size))
    assert best_iou(pair.changed[0], boxes) >= 0.5


def test_pipeline_step_writes_boxes_and_keeps_bad_rows_with_their_error(tmp_path):
    entry = write_difference_pairs(tmp_path / "data", count=4)
    rows = [json.loads(line) for line in entry.read_text().splitlines()]
    rows.append({"id": "missing", "image_path1": "images/nope.png", "image_path2": rows[0]["image_path2"]})
    (tmp_path / "data" / "images" / "corrupt.png").write_bytes(b"not an image")
    rows.append({"id": "corrupt", "image_path1": rows[0]["image_path1"], "image_path2": "images/corrupt.png"})
    entry.write_text("".join(json.dumps(row) + "\n" for row in rows))

    summary = ImageDifferenceRegions(save_interval=2).run(FileStorage(entry, cache_path=tmp_path / "cache").step())
    out = [json.loads(line) for line in open(summary.output_path)]

    assert [row["id"] for row in out] == [row["id"] for row in rows]
    for row in out[:4]:
        assert row["error"] is None
        assert len(row["bbox_tag"]) == len(row["changed_boxes"])
        for truth in row["changed_boxes"]:
            assert best_iou(truth, row["bbox_tag"]) >= 0.5
        # paths stay relative, now to the step's output file
        assert (tmp_path / "cache" / row["image_path1"]).resolve() == (tmp_path / "data" / row["image_path1"][8:]).resolve()
    assert "key 'image_path1'" in out[4]["error"] and "not found" in out[4]["error"]
    assert "key 'image_path2'" in out[5]["error"] and "cannot read image" in out[5]["error"]
    assert out[4]["bbox_tag"] == [] and summary.errors == 2


def test_bad_arguments_fail_in_the_constructor():
    for kwargs in ({"threshold": -1}, {"blur_size": 0}, {"merge_distance": -1},
                   {"min_area_ratio": 1.5}, {"max_regions": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            ImageDifferenceRegions(**kwargs)
