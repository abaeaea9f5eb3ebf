"""Golden files of the other built-in operators (continues `test_golden_outputs.py`).

One small pipeline per operator on tiny models (or none), each with a failed row and a
save_interval that does not divide the row count; compared as `golden_files.py` says.
Filters and the deduplicator decide by model scores: their thresholds sit far (>= 0.01)
from every score they judge, measured once, so no CPU moves a verdict; the scores they
print into a dropped row's reason are compared as scores (`scored_text_keys`). The header
filters measure uncompressed BMP files (the same bytes on any machine) and the phash
deduplicator scenes drawn and resized by Pillow (no JPEG codec): exact comparisons.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from golden_files import check_golden
from PIL import Image
from test_golden_outputs import write_jsonl

from dataflowmm import FileStorage
from dataflowmm.contract import DROPPED_KEY
from dataflowmm.operators import (
    ClipScoreEvaluator,
    ClipScoreFilter,
    DifferenceCaptioner,
    ImageAspectRatioFilter,
    ImageDeduplicator,
    ImageDifferenceRegions,
    ImageGeneration,
    ImageQAGenerator,
    ImageShapeFilter,
    ImageSizeFilter,
    ImageTask,
    ImageTextMatchingFilter,
    PromptedImageEditGenerator,
    PromptedVQAGenerator,
    PromptTemplate,
    PromptTemplatedVQAGenerator,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "example_data"
IMG, EOC = "<__dj__image>", "<|__dj__eoc|>"


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def make_scenes(folder: Path) -> None:
    """Solid colours, a gradient, a lossless copy, a near copy (one pixel) and a corrupt file."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in {"red": (220, 30, 30), "white": (255, 255, 255), "black": (0, 0, 0),
                         "green": (30, 200, 30)}.items():
        Image.new("RGB", (16, 16), colour).save(folder / f"{name}.png")
    ramp = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    Image.fromarray(np.stack([ramp, ramp.T, 255 - ramp], axis=-1)).save(folder / "gradient.png")
    shutil.copy(folder / "red.png", folder / "red-copy.png")
    near = Image.new("RGB", (16, 16), (220, 30, 30))
    near.putpixel((15, 15), (250, 60, 30))
    near.save(folder / "red-near.png")
    (folder / "corrupt.png").write_bytes(b"not a png")


def test_prompt_template_golden(tmp_path):
    entry = write_jsonl(tmp_path / "data" / "rows.jsonl", [
        {"subject": "a red fox", "style": "watercolour", "meta": {"lang": "en"}},
        {"subject": "a tower", "style": None, "meta": {"lang": "en"}},  # null field: error row
        {"subject": "两只猫", "style": "ink", "meta": {"lang": "zh"}},
        {"subject": "a boat", "meta": {"lang": "en"}},  # missing field: error row
        {"subject": "{braces} stay", "style": "plain", "meta": {"lang": "en"}, "extra": [1, 2]},
    ])
    template = PromptTemplate("[{meta[lang]}] a photo of {subject}, {style}", save_interval=2)
    summary = template.run(FileStorage(entry, cache_path=tmp_path / "cache").step(), output_key="caption_prompt")
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (2, 5, 0, 0)
    check_golden("prompt_template", summary.output_path, tmp_path)


def copy_pairs(data: Path) -> list[dict]:
    """The example pairs (moved, recoloured, added shapes) copied next to the test's rows."""
    shutil.copytree(EXAMPLES / "image_difference" / "images", data / "images")
    return rows_of(EXAMPLES / "image_difference" / "pairs.jsonl")


def test_image_difference_regions_golden(tmp_path):
    pairs = copy_pairs(tmp_path / "data")
    with Image.open(tmp_path / "data" / pairs[1]["image_path2"]) as image:  # compared at image 1's size
        image.resize((image.width * 2, image.height * 2), Image.Resampling.NEAREST).save(
            tmp_path / "data" / "images" / "pair_01_b_large.png")
    rows = [{key: pair[key] for key in ("id", "image_path1", "image_path2")} for pair in pairs[:4]]
    rows += [
        {"id": "same", "image_path1": pairs[0]["image_path1"], "image_path2": pairs[0]["image_path1"]},
        {"id": "large", "image_path1": pairs[1]["image_path1"], "image_path2": "images/pair_01_b_large.png"},
        {"id": "gone", "image_path1": pairs[2]["image_path1"], "image_path2": "images/missing.png"},  # error
    ]
    entry = write_jsonl(tmp_path / "data" / "pairs.jsonl", rows)
    regions = ImageDifferenceRegions(input_batch_size=3, save_interval=4)
    summary = regions.run(FileStorage(entry, cache_path=tmp_path / "cache").step(), output_bbox_key="boxes")
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (1, 7, 0, 0)
    check_golden("image_difference_regions", summary.output_path, tmp_path)  # no model: all exact


def test_difference_captioner_golden(tmp_path, tiny_model):
    from dataflowmm.serving import ClipServing, ImageTextMatchingServing, LocalVLMServing

    pairs = copy_pairs(tmp_path / "data")
    rows = [{key: pair[key] for key in ("id", "image_path1", "image_path2")} | {"bbox_tag": pair["changed_boxes"]}
            for pair in pairs[:3]]
    rows[0]["bbox_tag"] = rows[0]["bbox_tag"] + [[64.0, 64.0, 120.0, 120.0]]  # too large: skipped
    rows.insert(1, {"id": "gone", "image_path1": pairs[0]["image_path1"], "image_path2": "images/missing.png",
                    "bbox_tag": [[10.0, 10.0, 8.0, 8.0]]})  # error row
    rows.append({"id": "nothing", "image_path1": pairs[3]["image_path1"], "image_path2": pairs[3]["image_path2"],
                 "bbox_tag": [[0.0, 0.0, 0.0, 0.0]]})  # no box: Data-Juicer's "nothing differs" shape
    entry = write_jsonl(tmp_path / "data" / "rows.jsonl", rows)
    # Open ranges keep every box, so which boxes survive (compared exactly) never hangs on a
    # score: the caption similarity is of sampled captions, which another CPU may change.
    captioner = DifferenceCaptioner(
        image_text_matching_filter_args={"min_score": 0.0, "max_score": 1.0},
        text_pair_similarity_filter_args={"min_score": -1.0, "max_score": 1.0},
        vlm_serving=LocalVLMServing(str(tiny_model("tiny-chat-vlm")), max_new_tokens=6, batch_size=8,
                                    torch_dtype="fp32"),
        itm_serving=ImageTextMatchingServing(str(tiny_model("tiny-blip-itm")), torch_dtype="fp32"),
        clip_serving=ClipServing(str(tiny_model("tiny-clip")), torch_dtype="fp32"),
        input_batch_size=2, save_interval=3, save_marked_pairs=True, seed=11)
    summary = captioner.run(FileStorage(entry, cache_path=tmp_path / "cache").step())
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (1, 5, 0, 4)
    check_golden("difference_captioner", summary.output_path, tmp_path, image_keys=["marked_pair_images"],
                 model_text_keys=["region_caption1", "region_caption2", "bbox_difference_captions"],
                 score_keys=["region_itm_scores1", "region_itm_scores2", "region_caption_similarities"])


@pytest.fixture
def images_api():
    pytest.importorskip("openai")
    from dataflowmm.kit.loopback_images_api import LoopbackImagesAPI

    with LoopbackImagesAPI(api_key="sk-golden") as server:
        yield server


def api_serving(api, **options):
    from dataflowmm.serving.api_image_gen import APIImageGenServing

    return APIImageGenServing("loopback-image", base_url=api.base_url, api_key="sk-golden", timeout=5,
                              max_retries=1, seed_parameter="seed", **options)


def test_image_generation_golden(tmp_path, images_api):
    entry = write_jsonl(tmp_path / "data" / "prompts.jsonl", [
        {"id": 0, "prompt": "a red circle"},
        {"id": 1, "prompt": "a forbidden thing [refuse]"},  # the API refuses: error row
        {"id": 2, "prompt": "  "},  # empty prompt: error row, nothing sent
        {"id": 3, "prompt": "two cats, 猫 [429]"},  # retried once, then answered
        {"id": 4, "prompt": "a red circle"},  # same prompt, another row: other seeds, other images
    ])
    task = ImageGeneration(api_serving(images_api, batch_size=2), num_generations=2, save_interval=3, seed=5)
    summary = task.run(FileStorage(entry, cache_path=tmp_path / "cache").step())
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (3, 9, 0, 6)
    assert len(check_golden("image_generation", summary.output_path, tmp_path,
                            image_keys=["image"])["images"]) == 6


class BrightPortrait(ImageTask):
    """A task of one's own: a mapped optional input, two output columns and a rejection rule."""

    def __init__(self, *args, style: str = "oil painting", **kwargs):
        super().__init__(*args, **kwargs)
        self.style = style

    @property
    def inputs(self):
        return {"subject": True, "style": False}

    @property
    def outputs(self):
        return ["portrait", "portrait_path", "full_prompt", "brightness"]

    @property
    def image_outputs(self):
        return ["portrait"]

    def format_input(self, row):
        return f"a portrait of {row['subject']}, {row.get('style') or self.style}"

    def format_output(self, output, row):
        brightness = sum(output["images"][0].convert("L").getdata()) // (16 * 16)
        if brightness < 60:
            raise ValueError(f"too dark ({brightness})")
        return {"portrait": output["images"][0], "full_prompt": self.format_input(row), "brightness": brightness}


def test_custom_image_task_golden(tmp_path, images_api):
    entry = write_jsonl(tmp_path / "data" / "people.jsonl", [
        {"who": "a knight", "style": "pixel art"},
        {"who": "a queen"},
        {"style": "ink"},  # no subject: error row
        {"who": "a dragon", "style": "watercolour"},
        {"who": "a jester", "style": "charcoal"},
    ])
    task = BrightPortrait(api_serving(images_api, batch_size=3), num_generations=3, group_generations=True,
                          save_interval=2, seed=1, style="fresco")
    summary = task.run(FileStorage(entry, cache_path=tmp_path / "cache").step(),
                       input_mappings={"subject": "who"}, output_mappings={"full_prompt": "prompt_used"})
    # Grouped: one row per input; the dragon's third image is too dark, so that row keeps its
    # two other generations and names the failed one in its error. Its 2 images are written and
    # pinned, but a failed row's images are not counted as written.
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (2, 5, 0, 9)
    assert len(check_golden("custom_image_task", summary.output_path, tmp_path,
                            image_keys=["portrait"])["images"]) == 11


SCORED_ROWS = [
    {"id": 0, "images": ["pics/red.png"], "text": "a red square"},
    {"id": 1, "images": ["pics/white.png"], "text": "a red square"},
    {"id": 2, "images": ["pics/red.png", "pics/white.png"], "text": "a red square"},
    {"id": 3, "images": [], "text": "no images"},
    {"id": 4, "images": ["pics/corrupt.png"], "text": "a red square"},  # unreadable: error row, kept
    {"id": 5, "images": ["pics/black.png", "pics/red.png"], "text": f"{IMG} a red square {EOC}{IMG} a red square {EOC}"},
    {"id": 6, "images": ["pics/gradient.png", "pics/green.png"], "text": f"{IMG}{IMG} two squares {EOC}"},
]


def scored_storage(tmp_path):
    make_scenes(tmp_path / "data" / "pics")
    return FileStorage(write_jsonl(tmp_path / "data" / "rows.jsonl", SCORED_ROWS), cache_path=tmp_path / "cache")


def test_clip_score_evaluator_golden(tmp_path, tiny_model):
    evaluator = ClipScoreEvaluator(str(tiny_model("tiny-clip")), batch_size=3, save_interval=4, torch_dtype="fp32")
    summary = evaluator.run(scored_storage(tmp_path).step())
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (1, 7, 0, 0)
    check_golden("clip_score_evaluator", summary.output_path, tmp_path, score_keys=["clip_score"])


def test_clip_score_filter_golden(tmp_path, tiny_model):
    # tiny-clip's scores here: red -0.244, white -0.008, black -0.251, row 6's chunk (avg) -0.168;
    # -0.12 is >= 0.048 from each: rows 0, 5 and 6 dropped, row 2 kept by its white image (any).
    scores = ClipScoreFilter(str(tiny_model("tiny-clip")), min_score=-0.12, max_score=1.0, keep_dropped=True,
                             batch_size=3, save_interval=4, torch_dtype="fp32")
    summary = scores.run(scored_storage(tmp_path).step(), output_score_key="clip_score")
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (1, 4, 3, 0)
    # The reasons print the scores ("score -0.2439 outside [-0.12, 1.0] (any)"): their numbers
    # are compared as scores, the rest of the text exactly.
    check_golden("clip_score_filter", summary.output_path, tmp_path, score_keys=["clip_score"])
    check_golden("clip_score_filter.dropped", summary.dropped_path, tmp_path, score_keys=["clip_score"],
                 scored_text_keys=[DROPPED_KEY])


@pytest.fixture(scope="module")
def sharp_itm(tiny_model, tmp_path_factory):
    """tiny-blip-itm with its matching head's weights times 64: the random model's probabilities
    all lie within 0.003 of 0.49, too close for any threshold to sit far from them all; a sharper
    head (like a trained one's) spreads them over a wide range."""
    from transformers import BlipForImageTextRetrieval

    source = Path(tiny_model("tiny-blip-itm"))
    folder = tmp_path_factory.mktemp("sharp-blip-itm")
    model = BlipForImageTextRetrieval.from_pretrained(source)
    model.itm_head.weight.data *= 64  # a power of two: exact
    model.itm_head.bias.data *= 64
    model.save_pretrained(folder)
    for path in source.iterdir():
        if path.suffix != ".safetensors" and path.name != "config.json" and path.is_file():
            shutil.copy(path, folder / path.name)
    return folder


def test_image_text_matching_filter_golden(tmp_path, sharp_itm):
    # The sharpened head's scores here: red and black 0.092, white 0.058, row 6's chunk [0.067,
    # 0.077] (min 0.067); 0.08 is >= 0.012 from each: rows 1, 2 (its white image, all) and 6 dropped.
    matching = ImageTextMatchingFilter(str(sharp_itm), min_score=0.08, max_score=1.0, keep_dropped=True,
                                       any_or_all="all", reduce_mode="min", batch_size=3, save_interval=4,
                                       torch_dtype="fp32")
    summary = matching.run(scored_storage(tmp_path).step(), output_score_key="itm_score")
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (1, 4, 3, 0)
    check_golden("image_text_matching_filter", summary.output_path, tmp_path, score_keys=["itm_score"])
    check_golden("image_text_matching_filter.dropped", summary.dropped_path, tmp_path, score_keys=["itm_score"],
                 scored_text_keys=[DROPPED_KEY])


DEDUP_ROWS = [
    {"id": 0, "images": ["pics/red.png"]},
    {"id": 1, "images": ["pics/gradient.png"]},
    {"id": 2, "images": ["pics/red-copy.png"]},  # the same pixels as row 0: exact duplicate
    {"id": 3, "images": ["pics/red-near.png"]},  # one pixel changed: near duplicate of row 0
    {"id": 4, "images": []},  # no images: kept
    {"id": 5, "images": ["pics/corrupt.png"]},  # unreadable: error row, kept
    {"id": 6, "images": ["pics/white.png", "pics/red.png"]},
    {"id": 7, "images": ["pics/white.png", "pics/red-near.png"]},  # near duplicate of row 6
    {"id": 8, "images": ["pics/red.png", "pics/white.png"]},  # another order: distinct
    {"id": 9, "images": ["pics/green.png"]},
    {"id": 10, "images": ["pics/black.png"]},
]


def test_image_deduplicator_golden(tmp_path, tiny_model):
    make_scenes(tmp_path / "data" / "pics")
    storage = FileStorage(write_jsonl(tmp_path / "data" / "rows.jsonl", DEDUP_ROWS), cache_path=tmp_path / "cache")
    # tiny-clip's cosines: the near copies 1.000; any two distinct single images <= 0.92, the two
    # orders of (white, red) 0.74; 0.97 is >= 0.03 from each.
    dedup = ImageDeduplicator(str(tiny_model("tiny-clip")), similarity_threshold=0.97, keep_dropped=True,
                              batch_size=3, save_interval=4, torch_dtype="fp32")
    summary = dedup.run(storage.step())
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (1, 8, 3, 0)
    # The near duplicates' reasons print the cosine: compared as a score, the rest exactly.
    check_golden("image_deduplicator", summary.output_path, tmp_path)
    check_golden("image_deduplicator.dropped", summary.dropped_path, tmp_path, scored_text_keys=[DROPPED_KEY])


def test_image_deduplicator_phash_golden(tmp_path):
    from dataflowmm.kit.shapes import ShapesWorld

    pics = tmp_path / "data" / "pics"
    pics.mkdir(parents=True)
    (pics / "corrupt.png").write_bytes(b"not a png")
    world = ShapesWorld(image_size=64)
    for index in range(3):
        world.scene(index, seed=3).save(pics / f"scene{index}.png")
    world.scene(0, seed=3).resize((48, 48), Image.Resampling.BILINEAR).save(pics / "scene0-small.png")
    world.scene(1, seed=3).crop((1, 2, 63, 62)).save(pics / "scene1-cropped.png")
    shutil.copy(pics / "scene2.png", pics / "scene2-copy.png")
    rows = [
        {"id": 0, "images": ["pics/scene0.png"]},
        {"id": 1, "images": ["pics/scene1.png"]},
        {"id": 2, "images": ["pics/scene0-small.png"]},  # resized: near duplicate of row 0
        {"id": 3, "images": ["pics/scene1-cropped.png"]},  # 2 pixels cropped: near duplicate of row 1
        {"id": 4, "images": []},  # no images: kept
        {"id": 5, "images": ["pics/corrupt.png"]},  # unreadable: error row, kept
        {"id": 6, "images": ["pics/scene2.png", "pics/scene0.png"]},
        {"id": 7, "images": ["pics/scene2-copy.png", "pics/scene0-small.png"]},  # near duplicate of row 6
        {"id": 8, "images": ["pics/scene0.png", "pics/scene2.png"]},  # another order: distinct
        {"id": 9, "images": "pics/scene2-copy.png"},  # the same pixels as scene2 (row 6's first image only)
        {"id": 10, "images": ["pics/scene2.png"]},  # exact duplicate of row 9
    ]
    storage = FileStorage(write_jsonl(tmp_path / "data" / "rows.jsonl", rows), cache_path=tmp_path / "cache")
    # phash distances (of 64 bits): the resized copy 0, the cropped one 2; distinct scenes >= 22.
    dedup = ImageDeduplicator(method="phash", keep_dropped=True, save_interval=4)
    summary = dedup.run(storage.step())
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (1, 7, 4, 0)
    check_golden("image_deduplicator_phash", summary.output_path, tmp_path)
    check_golden("image_deduplicator_phash.dropped", summary.dropped_path, tmp_path)


def make_shaped(folder: Path) -> str:
    """BMP files of several shapes (uncompressed: the same bytes on any machine) and a corrupt
    file in `folder`; returns a 20x10 BMP inline as a data URI."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in {"square": (16, 16), "wide": (48, 12), "tall": (12, 40), "small": (6, 6),
                       "big": (64, 40)}.items():
        Image.new("RGB", size, (40, 80, 220)).save(folder / f"{name}.bmp")
    (folder / "corrupt.png").write_bytes(b"not a png")
    inline = io.BytesIO()
    Image.new("RGB", (20, 10), (240, 210, 40)).save(inline, format="BMP")
    return "data:image/bmp;base64," + base64.b64encode(inline.getvalue()).decode()


def shaped_storage(tmp_path) -> FileStorage:
    inline = make_shaped(tmp_path / "data" / "pics")
    rows = [
        {"id": 0, "images": ["pics/square.bmp"]},  # 16x16, 822 bytes
        {"id": 1, "images": ["pics/wide.bmp"]},  # 48x12, 1782 bytes
        {"id": 2, "images": ["pics/tall.bmp", "pics/square.bmp"]},  # 12x40 (1494 bytes), 16x16
        {"id": 3, "images": []},  # no images: kept
        {"id": 4, "images": ["pics/corrupt.png"]},  # unreadable: error row, kept
        {"id": 5, "images": "pics/small.bmp"},  # one path: 6x6, 174 bytes
        {"id": 6, "images": ["pics/big.bmp", "pics/wide.bmp"]},  # 64x40 (7734 bytes), 48x12
        {"id": 7, "images": [inline]},  # inline: 20x10, 654 bytes
    ]
    return FileStorage(write_jsonl(tmp_path / "data" / "rows.jsonl", rows), cache_path=tmp_path / "cache")


@pytest.mark.parametrize("name, cls, bounds, dropped", [
    ("image_size_filter", ImageSizeFilter, {"min_size": "1KB", "max_size": "5KiB"}, 3),  # rows 0, 5, 7
    ("image_shape_filter", ImageShapeFilter, {"min_width": 12, "max_width": 48, "min_height": 10,
                                              "max_height": 40, "any_or_all": "all"}, 2),  # rows 5, 6
    ("image_aspect_ratio_filter", ImageAspectRatioFilter, {"min_ratio": 0.5, "max_ratio": 2.0,
                                                           "any_or_all": "all"}, 3),  # rows 1, 2, 6
])
def test_image_header_filters_golden(tmp_path, name, cls, bounds, dropped):
    operator = cls(**bounds, keep_dropped=True, input_batch_size=2, save_interval=3)
    summary = operator.run(shaped_storage(tmp_path).step(), output_stats_key="stats")
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (1, 8 - dropped,
                                                                                               dropped, 0)
    check_golden(name, summary.output_path, tmp_path)
    check_golden(f"{name}.dropped", summary.dropped_path, tmp_path)


@pytest.fixture
def chat_api():
    pytest.importorskip("openai")
    from dataflowmm.kit.loopback_chat_api import LoopbackChatAPI

    with LoopbackChatAPI(api_key="sk-golden") as server:
        yield server


def chat_serving(api, **options):
    from dataflowmm.serving import APIVLMServing

    return APIVLMServing("loopback-vlm", base_url=api.base_url, api_key="sk-golden", timeout=5, max_retries=1,
                         **options)


def shapes_images(data: Path) -> list[str]:
    """Five held-out shapes-world images (deterministic) and a corrupt file, relative to `data`."""
    from dataflowmm.kit.shapes import write_shapes_dataset

    write_shapes_dataset(data, 5, seed=1, file_name="shapes.jsonl")
    (data / "images" / "corrupt.png").write_bytes(b"not a png")
    return [f"images/1_{index:06d}.png" for index in range(5)]


def test_prompted_vqa_generator_golden(tmp_path, chat_api):
    images = shapes_images(tmp_path / "data")
    entry = write_jsonl(tmp_path / "data" / "rows.jsonl", [
        {"id": 0, "images": [images[0]], "conversations": [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                                                           {"from": "gpt", "value": "?"}]},
        {"id": 1, "images": images[1], "conversations": [{"role": "user", "content": "What shape is shown? 形状"}]},
        {"id": 2, "images": ["images/missing.png"], "conversations": [{"role": "user", "content": "Colour?"}]},
        {"id": 3, "images": [], "conversations": [{"role": "user", "content": "Just text, no image."}]},
        {"id": 4, "images": [images[2]], "conversations": [{"role": "user", "content": "[refuse] Shape?"}]},
        {"id": 5, "images": [images[3], images[4]], "conversations": [{"role": "user", "content": "[429] Background colour?"}]},
        {"id": 6, "images": [images[4]], "conversations": []},  # no user turn: error row
    ])
    vqa = PromptedVQAGenerator(chat_serving(chat_api, batch_size=2), save_interval=3, seed=4)
    summary = vqa.run(FileStorage(entry, cache_path=tmp_path / "cache").step())
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (3, 7, 0, 0)
    check_golden("prompted_vqa_generator", summary.output_path, tmp_path)  # the server judges pixels: exact


def test_prompt_templated_vqa_generator_golden(tmp_path, chat_api):
    images = shapes_images(tmp_path / "data")
    entry = write_jsonl(tmp_path / "data" / "rows.jsonl", [
        {"id": 0, "images": [images[0]], "thing": "shape", "meta": {"ask": "colour"}},
        {"id": 1, "images": [images[1]], "thing": "background", "meta": {"ask": "colour"}},
        {"id": 2, "images": [images[2]], "meta": {"ask": "colour"}},  # missing field: error row
        {"id": 3, "images": [images[3]], "thing": "shape", "meta": {}},  # missing nested field: error row
        {"id": 4, "images": ["images/corrupt.png"], "thing": "shape", "meta": {"ask": "shape"}},  # error row
        {"id": 5, "images": [images[4]], "thing": "picture", "meta": {"ask": "shape"}},
    ])
    vqa = PromptTemplatedVQAGenerator(chat_serving(chat_api, batch_size=4), "What {meta[ask]} is the {thing}?",
                                      save_interval=4)
    summary = vqa.run(FileStorage(entry, cache_path=tmp_path / "cache").step(), output_answer_key="reply")
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (3, 6, 0, 0)
    check_golden("prompt_templated_vqa_generator", summary.output_path, tmp_path)


def test_image_qa_generator_golden(tmp_path, chat_api):
    images = shapes_images(tmp_path / "data")
    entry = write_jsonl(tmp_path / "data" / "rows.jsonl", [
        {"id": 0, "images": [images[0]]},
        {"id": 1, "images": [images[1], images[2]]},  # two images: two <image> lines
        {"id": 2, "images": []},  # no image: error row
        {"id": 3, "images": ["images/corrupt.png"]},  # unreadable: error row
        {"id": 4, "images": images[3]},
    ])
    qa = ImageQAGenerator(chat_serving(chat_api, batch_size=2), num_questions=4, save_interval=3)
    summary = qa.run(FileStorage(entry, cache_path=tmp_path / "cache").step())
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (2, 5, 0, 0)
    check_golden("image_qa_generator", summary.output_path, tmp_path)


def test_prompted_image_edit_generator_golden(tmp_path, tiny_model):
    from dataflowmm.serving import LocalImageGenServing

    make_scenes(tmp_path / "data" / "scenes")
    entry = write_jsonl(tmp_path / "data" / "rows.jsonl", [
        {"id": 0, "images": ["scenes/red.png"], "conversation": [{"role": "user", "content": "make it blue"}]},
        {"id": 1, "images": ["scenes/corrupt.png"], "conversation": [{"role": "user", "content": "x"}]},  # error row
        {"id": 2, "images": ["scenes/gradient.png", "scenes/green.png"],  # two sizes: two model calls
         "conversation": [{"role": "user", "content": "a cat"}, {"role": "assistant", "content": "ok"},
                          {"role": "user", "content": "now snow, 雪"}]},
        {"id": 3, "images": "scenes/white.png", "conversation": [{"from": "human", "value": "  "}]},  # error row
        {"id": 4, "images": ["scenes/red.png"], "conversation": [{"role": "user", "content": "make it blue"}]},
    ])
    serving = LocalImageGenServing(str(tiny_model("tiny-instruct-pix2pix")), task="edit", batch_size=2,
                                   num_images_per_prompt=2, num_inference_steps=2, image_guidance_scale=1.5,
                                   torch_dtype="fp32")
    editor = PromptedImageEditGenerator(serving, save_interval=3, seed=9)
    summary = editor.run(FileStorage(entry, cache_path=tmp_path / "cache").step(), output_image_key="edits")
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (2, 5, 0, 8)
    assert len(check_golden("prompted_image_edit_generator", summary.output_path, tmp_path,
                            image_keys=["edits"])["images"]) == 8
