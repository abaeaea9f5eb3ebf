"""DifferenceCaptioner's stages with scripted servings: what survives, what is asked, what is written."""

import json
import re

import pytest
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.operators import DifferenceCaptioner
from dataflowmm.operators.difference_captioner import (
    ITM_DEFAULTS,
    MLLM_DEFAULTS,
    SIMILARITY_DEFAULTS,
)
from dataflowmm.seeds import derive_seed

NAMES = {(200, 30, 30): "red", (30, 200, 30): "green", (30, 30, 200): "blue", (128, 128, 128): "grey"}
REGION = re.compile(r"this region: \[([\d.]+), ([\d.]+), ([\d.]+), ([\d.]+)\]\.$")


def colour_at(image, x, y):
    return NAMES.get(image.getpixel((x, y)), "odd")


class ScriptedVLM:
    """Region questions: the colour at the region's centre; difference questions: both captions."""

    def __init__(self, batch_size=64, same_caption=None):
        self.batch_size, self.calls, self.same_caption = batch_size, [], same_caption

    def generate(self, prompts, seeds=None):
        self.calls.append({"texts": [p.text for p in prompts], "images": [p.images for p in prompts],
                           "seeds": list(seeds)})
        answers = []
        for prompt in prompts:
            match = REGION.search(prompt.text)
            if match:
                image = prompt.images[0]
                x1, y1, x2, y2 = map(float, match.groups())
                centre = (int((x1 + x2) / 2 * image.width), int((y1 + y2) / 2 * image.height))
                answers.append(self.same_caption or f"a {colour_at(image, *centre)} square")
            else:
                answers.append("difference: " + prompt.text.split("is: ")[1].split(",")[0])
        return answers

    def config(self):
        return {"scripted": "vlm"}


class ScriptedITM:
    """Score 0.9 unless `low(crop, text)` says the pair does not match (then 0.05)."""

    def __init__(self, low=lambda crop, text: False, batch_size=32):
        self.low, self.batch_size, self.calls = low, batch_size, []

    def score(self, images, texts):
        self.calls.append([(image.size, text) for image, text in zip(images, texts, strict=True)])
        return [0.05 if self.low(image, text) else 0.9 for image, text in zip(images, texts, strict=True)]

    def config(self):
        return {"scripted": "itm"}


class ScriptedClip:
    batch_size = 32

    def __init__(self):
        self.calls = []

    def text_text_similarity(self, a, b):
        self.calls.append(list(zip(a, b, strict=True)))
        return [1.0 if x == y else 0.4 for x, y in zip(a, b, strict=True)]

    def config(self):
        return {"scripted": "clip"}


def captioner(vlm=None, itm=None, clip=None, **kwargs):
    return DifferenceCaptioner(vlm_serving=vlm or ScriptedVLM(), itm_serving=itm or ScriptedITM(),
                               clip_serving=clip or ScriptedClip(), **kwargs)


def square_image(size=(100, 80), squares=()):
    image = Image.new("RGB", size, (128, 128, 128))
    for (x1, y1, x2, y2), colour in squares:
        image.paste(colour, (x1, y1, x2, y2))
    return image


@pytest.fixture
def data(tmp_path):
    """A pair where the square at (20..30, 20..30) turns from red to blue; the green one stays."""
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    square_image(squares=[((20, 20, 30, 30), (200, 30, 30)), ((60, 40, 70, 50), (30, 200, 30))]).save(folder / "img/a.png")
    square_image(squares=[((20, 20, 30, 30), (30, 30, 200)), ((60, 40, 70, 50), (30, 200, 30))]).save(folder / "img/b.png")
    # the second image at twice the size: it is resized to the first's
    square_image((200, 160), [((40, 40, 60, 60), (30, 30, 200)), ((120, 80, 140, 100), (30, 200, 30))]) \
        .save(folder / "img/b_big.png")
    (folder / "img/corrupt.png").write_bytes(b"no image here")
    return folder


CHANGED, SAME = [25, 25, 10, 10], [65, 45, 10, 10]


def run_rows(data, tmp_path, rows, op, cache="cache", **kwargs):
    entry = data / "rows.jsonl"
    entry.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = op.run(FileStorage(entry, cache_path=tmp_path / cache).step(), **kwargs)
    return summary, [json.loads(line) for line in open(summary.output_path)]


def pair_row(boxes, second="img/b.png", **extra):
    return {"image_path1": "img/a.png", "image_path2": second, "bbox_tag": boxes, **extra}


def test_changed_box_is_kept_unchanged_oversize_and_outside_boxes_are_not(data, tmp_path):
    vlm, itm, clip = ScriptedVLM(), ScriptedITM(), ScriptedClip()
    outside, huge = [500, 500, 10, 10], [50, 40, 90, 70]
    _, (row,) = run_rows(data, tmp_path, [pair_row([SAME, huge, CHANGED, outside])], captioner(vlm, itm, clip))

    assert row["error"] is None
    assert row["bbox_tag"] == [CHANGED]
    assert row["region_caption1"] == ["a red square"] and row["region_caption2"] == ["a blue square"]
    assert row["bbox_difference_captions"] == ["difference: a red square"]
    assert row["region_itm_scores1"] == [0.9] and row["region_itm_scores2"] == [0.9]
    assert row["region_caption_similarities"] == [0.4]
    # the oversize and outside boxes never reach a model; the same-looking box reaches CLIP and stops there
    assert len(vlm.calls[0]["texts"]) == 4
    assert clip.calls == [[("a green square", "a green square"), ("a red square", "a blue square")]]


def test_region_questions_use_normalised_corners_and_image_two_at_image_one_size(data, tmp_path):
    vlm = ScriptedVLM()
    run_rows(data, tmp_path, [pair_row([CHANGED], second="img/b_big.png")], captioner(vlm))
    texts, images = vlm.calls[0]["texts"], vlm.calls[0]["images"]
    assert texts == ["Please provide a clear description for this region: [0.20, 0.25, 0.30, 0.38]."] * 2
    assert [tuple(image.size for image in prompt) for prompt in images] == [((100, 80),), ((100, 80),)]


def test_itm_check_filters_a_box_whose_crop_does_not_match_its_caption(data, tmp_path):
    # Data-Juicer's check never filters (its texts lack the image token); ours does.
    itm = ScriptedITM(low=lambda crop, text: text == "a blue square")
    _, (row,) = run_rows(data, tmp_path, [pair_row([CHANGED])], captioner(itm=itm))
    assert row["bbox_tag"] == [[0.0, 0.0, 0.0, 0.0]] and row["bbox_difference_captions"] == [""]
    assert row["error"] is None
    assert len(itm.calls[0]) == 2  # both crops were scored


def test_itm_range_comes_from_data_juicers_dict(data, tmp_path):
    strict_itm = captioner(image_text_matching_filter_args={"min_score": 0.95})
    _, (row,) = run_rows(data, tmp_path, [pair_row([CHANGED])], strict_itm)
    assert row["region_caption1"] == [""]


def test_boxes_are_tracked_by_index_when_captions_repeat(data, tmp_path):
    """Two boxes with identical caption pairs; only the second box's crop fails ITM. Data-Juicer
    matches captions back to boxes by string, so it would keep both or the wrong one."""
    vlm = ScriptedVLM(same_caption=None)
    vlm.generate_original = vlm.generate

    def same_captions(prompts, seeds=None):
        answers = vlm.generate_original(prompts, seeds)
        return [("left words" if i % 2 == 0 else "right words") if "region" in p.text else a
                for i, (p, a) in enumerate(zip(prompts, answers, strict=True))]

    vlm.generate = same_captions
    first, second = [25, 25, 10, 10], [65, 45, 12, 12]
    itm = ScriptedITM(low=lambda crop, text: crop.size == (12, 12))
    _, (row,) = run_rows(data, tmp_path, [pair_row([second, first])], captioner(vlm, itm))
    assert row["bbox_tag"] == [first]
    assert row["region_caption1"] == ["left words"] and row["region_caption2"] == ["right words"]
    assert len(row["bbox_difference_captions"]) == 1


def test_identical_captions_fall_back_to_data_juicers_empty_shape(data, tmp_path):
    # default similarity maximum 0.8: identical captions (similarity 1.0) describe no difference
    _, rows = run_rows(data, tmp_path, [pair_row([SAME]), pair_row([]), pair_row([[0, 0, 0, 0]]),
                                        pair_row(None)], captioner())
    for row in rows:
        assert row["error"] is None
        assert row["bbox_tag"] == [[0.0, 0.0, 0.0, 0.0]]
        assert row["region_caption1"] == row["region_caption2"] == row["bbox_difference_captions"] == [""]
        assert row["region_itm_scores1"] == row["region_caption_similarities"] == [None]


def test_data_juicers_similarity_maximum_keeps_identical_captions(data, tmp_path):
    op = captioner(text_pair_similarity_filter_args={"max_score": 1.0})
    _, (row,) = run_rows(data, tmp_path, [pair_row([SAME])], op)
    assert row["bbox_tag"] == [SAME] and row["region_caption_similarities"] == [1.0]


def test_crops_are_clamped_to_the_image(data, tmp_path):
    itm = ScriptedITM()
    corner = [2, 3, 10, 10]  # reaches 3 px left of and 2 px above the image
    _, (row,) = run_rows(data, tmp_path, [pair_row([corner])], captioner(itm=itm))
    assert [size for size, _ in itm.calls[0]] == [(7, 8), (7, 8)]
    assert row["error"] is None


def test_difference_question_shows_the_marked_pair_as_one_image(data, tmp_path):
    vlm = ScriptedVLM()
    run_rows(data, tmp_path, [pair_row([CHANGED])], captioner(vlm))
    (marked,), = vlm.calls[1]["images"]
    assert marked.size == (2 * 100 + 20, 80)
    text = vlm.calls[1]["texts"][0]
    assert "left image is: a red square" in text and "right image is: a blue square" in text
    # red box 5 px outside the 20..30 square, 3 px wide, on both halves; black gap between
    for left in (0, 120):
        assert marked.getpixel((left + 15, 25)) == (255, 0, 0)
        assert marked.getpixel((left + 17, 25)) == (255, 0, 0)
        assert marked.getpixel((left + 18, 25)) == (128, 128, 128)
    assert all(marked.getpixel((x, 40)) == (0, 0, 0) for x in range(100, 120))


def test_every_region_of_a_batch_goes_to_the_models_together_and_seeds_follow_rows(data, tmp_path):
    vlm, itm, clip = ScriptedVLM(), ScriptedITM(), ScriptedClip()
    rows = [pair_row([CHANGED, SAME], id=i) for i in range(4)]
    _, out = run_rows(data, tmp_path, rows, captioner(vlm, itm, clip, input_batch_size=4))
    assert len(vlm.calls) == 2 and len(itm.calls) == 1 and len(clip.calls) == 1
    assert len(vlm.calls[0]["texts"]) == 16 and len(vlm.calls[1]["texts"]) == 4
    assert len(set(vlm.calls[0]["seeds"])) == 16
    assert all(row["bbox_tag"] == [CHANGED] for row in out)

    again = ScriptedVLM()
    run_rows(data, tmp_path, rows, captioner(again, input_batch_size=1), cache="other")
    assert sorted(seed for call in again.calls for seed in call["seeds"]) == \
        sorted(seed for call in vlm.calls for seed in call["seeds"])  # seeds do not depend on batching


def test_bad_rows_are_kept_with_an_error_naming_the_key(data, tmp_path):
    rows = [
        pair_row([CHANGED], second="img/missing.png"),
        pair_row([CHANGED], second="img/corrupt.png"),
        pair_row([[1, 2, 3]]),
        pair_row("25,25,10,10"),
        pair_row([[25, 25, -1, 10]]),
        {"image_path1": "img/a.png", "image_path2": "img/b.png"},
        pair_row([CHANGED]),
    ]
    summary, out = run_rows(data, tmp_path, rows, captioner())
    errors = [row["error"] for row in out]
    assert "key 'image_path2'" in errors[0] and "not found" in errors[0]
    assert "key 'image_path2'" in errors[1] and "cannot read image" in errors[1]
    assert "key 'bbox_tag': box 0 must be [cx, cy, w, h]" in errors[2]
    assert "key 'bbox_tag': boxes must be a list" in errors[3]
    assert "negative width" in errors[4]
    assert "key 'bbox_tag' is missing" in errors[5]
    assert errors[6] is None and out[6]["bbox_tag"] == [CHANGED]
    assert summary.errors == 6 and len(out) == len(rows)
    assert out[2]["bbox_tag"] == [[1, 2, 3]] and out[2]["region_caption1"] == []  # input kept as it was


def test_marked_pairs_are_saved_named_by_row_identity_and_box_index(data, tmp_path):
    op = captioner(save_marked_pairs=True)
    rows = [pair_row([SAME, CHANGED]), pair_row([SAME, CHANGED])]  # duplicates must not collide
    summary, out = run_rows(data, tmp_path, rows, op)
    paths = [row["marked_pair_images"][0] for row in out]
    assert len(set(paths)) == 2 and all(path.endswith("_1.png") for path in paths)
    for path in paths:
        assert Image.open(tmp_path / "cache" / path).size == (220, 80)
    assert summary.images_written == 2


def test_output_keys_are_run_arguments(data, tmp_path):
    row = {"a": "img/a.png", "b": "img/b.png", "boxes": [CHANGED]}
    _, (out,) = run_rows(data, tmp_path, [row], captioner(), input_image1_key="a", input_image2_key="b",
                         input_bbox_key="boxes", output_bbox_key="kept", output_difference_caption_key="diff")
    assert out["boxes"] == [CHANGED] and out["kept"] == [CHANGED] and out["diff"] == ["difference: a red square"]


def test_data_juicer_dicts_are_accepted_and_never_mutated():
    mllm = {"hf_model": "/nonexistent-but-absolute", "max_new_tokens": 8, "num_proc": 4}
    defaults = (dict(MLLM_DEFAULTS), dict(ITM_DEFAULTS), dict(SIMILARITY_DEFAULTS))
    given = dict(mllm)
    with pytest.raises(FileNotFoundError):
        DifferenceCaptioner(mllm)
    assert mllm == given
    assert (MLLM_DEFAULTS, ITM_DEFAULTS, SIMILARITY_DEFAULTS) == defaults
    assert SIMILARITY_DEFAULTS["max_score"] == 0.8 and ITM_DEFAULTS["min_score"] == 0.1
    with pytest.raises(ValueError, match="unknown keys 'hf_modle'"):
        DifferenceCaptioner({"hf_modle": "x"})
    with pytest.raises(ValueError, match="either vlm_serving or mllm_mapper_args"):
        captioner(mllm_mapper_args={"hf_model": "x"})
    with pytest.raises(ValueError, match="min_score 0.9 is above max_score 0.5"):
        captioner(text_pair_similarity_filter_args={"min_score": 0.9, "max_score": 0.5})
    with pytest.raises(ValueError, match="max_area_ratio"):
        captioner(max_area_ratio=0)


def test_settings_that_conflict_with_a_passed_serving_are_refused(tiny_models_dir):
    from dataflowmm.serving import LocalVLMServing

    vlm = LocalVLMServing("llava-hf/llava-v1.6-vicuna-7b-hf", max_new_tokens=16)
    assert captioner(vlm=vlm, mllm_mapper_args={"max_new_tokens": 16}).vlm is vlm
    with pytest.raises(ValueError, match="max_new_tokens=256 conflicts"):
        captioner(vlm=vlm, mllm_mapper_args={"max_new_tokens": 256})


def test_seeds_derive_from_row_and_box_index(data, tmp_path):
    vlm = ScriptedVLM()
    summary, _ = run_rows(data, tmp_path, [pair_row([SAME, CHANGED])], captioner(vlm, seed=7))
    from dataflowmm.seeds import row_identity

    row_id = row_identity(pair_row([SAME, CHANGED]), 0)
    assert vlm.calls[0]["seeds"] == [derive_seed(7, row_id, "region", index, number)
                                     for index in (0, 1) for number in (1, 2)]
    assert vlm.calls[1]["seeds"] == [derive_seed(7, row_id, "difference", 1)]
