"""PromptedImageEditGenerator: a scripted serving for calls, seeds, batching and bad rows; the tiny
InstructPix2Pix and the trained shapes SD (image-to-image with a target caption) end to end;
on Ray, see test_image_editing_pipeline.py (every step of the editing scaffold)."""

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.operators import PromptedImageEditGenerator, RowError
from dataflowmm.seeds import derive_seed, row_identity
from dataflowmm.serving import LocalImageGenServing

SOURCE_SIZE = (40, 24)  # not square: edits keep the source's size


class ScriptedEditServing:
    """Records every generate call; each edit is a solid colour made from its seed; an edit whose
    seed is in `flagged` comes back as None (the safety checker flagged it after every retry)."""

    task = "edit"

    def __init__(self, batch_size=4, num_images_per_prompt=1, flagged=()):
        self.batch_size, self.num_images_per_prompt, self.flagged = batch_size, num_images_per_prompt, set(flagged)
        self.calls = []

    def generate(self, prompts, seeds, images=None):
        self.calls.append({"prompts": list(prompts), "seeds": list(seeds), "sizes": [i.size for i in images]})
        return [[None if derive_seed(seed, j) in self.flagged else
                 Image.new("RGB", image.size, (derive_seed(seed, j) % 251, 0, 0))
                 for j in range(self.num_images_per_prompt)] for seed, image in zip(seeds, images, strict=True)]

    def config(self):
        return {"serving": "scripted", "n": self.num_images_per_prompt}

    def load(self):
        pass

    def cleanup(self):
        pass

    loaded = True


def make_image(path, seed=0, size=SOURCE_SIZE):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path.name


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def edit(entry, cache, operator, **run_kwargs):
    summary = operator.run(FileStorage(entry, cache_path=cache).step(), **run_kwargs)
    return summary, read_jsonl(summary.output_path)


def user(*texts):
    return [{"role": "user", "content": text} for text in texts]


# ----------------------------------------------------------------------- scripted serving
def test_run_keywords_are_data_flow_mm_s():
    parameters = inspect.signature(PromptedImageEditGenerator.run).parameters
    assert [(name, p.default) for name, p in parameters.items() if name.endswith("_key")] == [
        ("input_image_key", "images"), ("input_conversation_key", "conversation"),
        ("output_image_key", "edited_images"), ("input_prompt_key", None)]


def test_a_batch_s_pairs_go_in_one_call_seeded_and_named_by_row(tmp_path):
    for index, name in enumerate("abc"):
        make_image(tmp_path / f"{name}.png", seed=index, size=(40 + index, 24))
    rows_in = [
        {"id": 0, "images": "a.png", "conversation": user("make it red")},  # one path, not a list
        {"id": 1, "images": ["b.png", "c.png"],
         "conversation": user("first") + [{"role": "assistant", "content": "done"}] + user("add a hat", "  ")},
        {"id": 2, "images": ["a.png"], "conversation": [{"from": "human", "value": "night time"}]},
    ]
    entry = write_jsonl(tmp_path / "in.jsonl", rows_in)
    serving = ScriptedEditServing(batch_size=4, num_images_per_prompt=2)
    summary, rows = edit(entry, tmp_path / "cache", PromptedImageEditGenerator(serving, seed=7))
    ids = [row_identity(row, index) for index, row in enumerate(read_jsonl(entry))]
    assert len(serving.calls) == 1  # 3 rows, 4 pairs: one batch, one call
    call = serving.calls[0]
    assert call["prompts"] == ["make it red", "add a hat", "add a hat", "night time"]  # the last user turn
    assert call["seeds"] == [derive_seed(7, ids[0], 0), derive_seed(7, ids[1], 0), derive_seed(7, ids[1], 1),
                             derive_seed(7, ids[2], 0)]
    assert call["sizes"] == [(40, 24), (41, 24), (42, 24), (40, 24)]
    assert summary.errors == 0 and summary.images_written == 8
    assert [[Path(p).name for p in row["edited_images"]] for row in rows] == [
        [f"{ids[0]}_0_0.png", f"{ids[0]}_0_1.png"],
        [f"{ids[1]}_{i}_{j}.png" for i in range(2) for j in range(2)],
        [f"{ids[2]}_0_0.png", f"{ids[2]}_0_1.png"]]
    assert [row["conversation"] for row in rows] == [row["conversation"] for row in rows_in]
    assert [row["images"] for row in rows] == ["../a.png", ["../b.png", "../c.png"], ["../a.png"]]  # kept, re-based
    with Image.open(tmp_path / "cache" / rows[1]["edited_images"][3]) as image:
        assert image.size == (42, 24) and image.getpixel((0, 0))[0] == derive_seed(call["seeds"][2], 1) % 251


def test_rows_per_batch_follow_the_serving_s_batch_size_and_seeds_do_not(tmp_path):
    make_image(tmp_path / "a.png")
    entry = write_jsonl(tmp_path / "in.jsonl", [{"images": ["a.png"], "conversation": user(f"edit {i}")}
                                                for i in range(5)])
    two, five = ScriptedEditServing(batch_size=2), ScriptedEditServing(batch_size=5)
    edit(entry, tmp_path / "two", PromptedImageEditGenerator(two))
    edit(entry, tmp_path / "five", PromptedImageEditGenerator(five))
    assert [len(call["prompts"]) for call in two.calls] == [2, 2, 1]
    assert [len(call["prompts"]) for call in five.calls] == [5]
    assert [s for call in two.calls for s in call["seeds"]] == five.calls[0]["seeds"]


def test_bad_rows_are_kept_with_their_error(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", seed=1)
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    rows_in = [
        {"images": ["a.png"], "conversation": user("fine")},
        {"images": ["a.png", "missing.png"], "conversation": user("gone")},
        {"images": ["corrupt.png"], "conversation": user("unreadable")},
        {"images": ["a.png"], "conversation": user("   ")},
        {"images": ["a.png"], "conversation": [{"role": "assistant", "content": "no user turn"}]},
        {"images": ["a.png"]},
        {"images": [], "conversation": user("nothing to edit")},
        {"images": 3, "conversation": user("not a path")},
        {"images": ["b.png"], "conversation": user("also fine")},
    ]
    entry = write_jsonl(tmp_path / "in.jsonl", rows_in)
    serving = ScriptedEditServing(batch_size=16)
    summary, rows = edit(entry, tmp_path / "cache", PromptedImageEditGenerator(serving))
    assert summary.errors == 7 and summary.images_written == 2 and len(rows) == 9
    assert serving.calls[0]["prompts"] == ["fine", "also fine"]  # bad rows cost no model call
    errors = [row["error"] for row in rows]
    assert errors[0] is None and errors[-1] is None
    for error, expected in zip(errors[1:-1], ["missing.png", "corrupt.png", "no user turn", "no user turn",
                                               "'conversation': missing", "no source image", "'images'"], strict=True):
        assert error.startswith("PromptedImageEditGenerator: ") and expected in error
    assert all(row["edited_images"] == [] for row in rows[1:-1])
    with pytest.raises(RowError, match=r"row 1: .*missing\.png"):
        PromptedImageEditGenerator(ScriptedEditServing(), strict=True).run(
            FileStorage(entry, cache_path=tmp_path / "strict").step())


def test_a_prompt_column_gives_one_instruction_or_one_per_image(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", seed=1)
    entry = write_jsonl(tmp_path / "in.jsonl", [
        {"images": ["a.png", "b.png"], "target": "a red cat"},
        {"images": ["a.png", "b.png"], "target": ["a dog", "a bird"]},
        {"images": ["a.png", "b.png"], "target": ["only one"]},
        {"images": ["a.png"], "target": [""]},
    ])
    serving = ScriptedEditServing(batch_size=8)
    summary, rows = edit(entry, tmp_path / "cache", PromptedImageEditGenerator(serving),
                         input_prompt_key="target", output_image_key="edits")
    assert serving.calls[0]["prompts"] == ["a red cat", "a red cat", "a dog", "a bird"]
    assert [len(row["edits"]) for row in rows] == [2, 2, 0, 0]
    assert "1 instructions for 2 images" in rows[2]["error"] and "empty instruction" in rows[3]["error"]


def test_a_flagged_edit_fails_its_row_and_writes_none_of_its_files(tmp_path):
    make_image(tmp_path / "a.png")
    entry = write_jsonl(tmp_path / "in.jsonl", [{"images": ["a.png", "a.png"], "conversation": user("x")},
                                                {"images": ["a.png"], "conversation": user("y")}])
    row_id = row_identity(read_jsonl(entry)[0], 0)
    serving = ScriptedEditServing(flagged={derive_seed(derive_seed(0, row_id, 1), 0)})
    summary, rows = edit(entry, tmp_path / "cache", PromptedImageEditGenerator(serving))
    assert "image 1: an edit was flagged" in rows[0]["error"] and rows[0]["edited_images"] == []
    assert summary.images_written == 1
    assert [p.name for p in (tmp_path / "cache" / "dataflow_cache_step_step1_images").iterdir()] == [
        Path(rows[1]["edited_images"][0]).name]


def test_settings_build_the_serving_and_conflict_with_a_given_one(tiny_model):
    folder = str(tiny_model("tiny-instruct-pix2pix"))
    op = PromptedImageEditGenerator(folder, num_images_per_prompt=3, batch_size=5, image_guidance_scale=1.2,
                                    num_inference_steps=2)
    assert (op.serving.task, op.serving.num_images_per_prompt, op.serving.batch_size) == ("edit", 3, 5)
    assert op.serving.image_guidance_scale == 1.2 and op.input_batch_size == 5 and not op.serving.loaded
    img2img = PromptedImageEditGenerator(str(tiny_model("tiny-sd")), task="image2image", strength=0.6)
    assert (img2img.serving.task, img2img.serving.strength) == ("image2image", 0.6)
    given = LocalImageGenServing(folder, task="edit")
    assert PromptedImageEditGenerator(given, num_images_per_prompt=1).serving is given
    with pytest.raises(ValueError, match="num_images_per_prompt=2 conflicts"):
        PromptedImageEditGenerator(given, num_images_per_prompt=2)
    with pytest.raises(ValueError, match="task 'edit' or 'image2image'"):
        PromptedImageEditGenerator(LocalImageGenServing(folder))
    with pytest.raises(ValueError, match="task must be one of edit, image2image"):
        PromptedImageEditGenerator(folder, task="text2image")
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        PromptedImageEditGenerator(folder, num_images_per_prompt=0)


# ----------------------------------------------------------------------- real models
def test_tiny_instruct_pix2pix_end_to_end_and_a_second_run_reuses(tmp_path, tiny_model):
    names = [make_image(tmp_path / "data" / f"{i}.png", seed=i) for i in range(3)]
    entry = write_jsonl(tmp_path / "data" / "in.jsonl", [
        {"images": [names[0]], "conversation": user("make it snow")},
        {"images": names[1:], "conversation": user("turn it into a painting")},
        {"images": ["missing.png"], "conversation": user("gone")},
    ])

    def operator():
        return PromptedImageEditGenerator(str(tiny_model("tiny-instruct-pix2pix")), num_images_per_prompt=2,
                                          batch_size=2, num_inference_steps=2, image_guidance_scale=1.5,
                                          save_interval=2, seed=3)

    summary, rows = edit(entry, tmp_path / "cache", operator())
    assert summary.errors == 1 and summary.images_written == 6 and [len(r["edited_images"]) for r in rows] == [2, 4, 0]
    pixels = []
    for path in rows[0]["edited_images"] + rows[1]["edited_images"]:
        with Image.open(tmp_path / "cache" / path) as image:
            assert image.format == "PNG" and image.size == SOURCE_SIZE
            pixels.append(image.tobytes())
    assert len(set(pixels)) == 6  # every edit its own seed
    again = operator().run(FileStorage(entry, cache_path=tmp_path / "cache").step())
    assert again.reused


def test_shapes_sd_image2image_with_a_target_caption(tmp_path, trained_model):
    from dataflowmm.kit.shapes import COLOUR_NAMES, HELD_OUT_SEED, ShapesWorld, caption_for
    from dataflowmm.kit.shapes_recipes import read_training_report
    from dataflowmm.kit.train_shapes_sd import judge_generated

    folder = trained_model("shapes-sd")
    samples = ShapesWorld().samples(8, seed=HELD_OUT_SEED, start=10_000)
    rows_in = []
    for index, sample in enumerate(samples):
        sample.image.save(tmp_path / f"{index}.png")
        attributes = sample.attributes
        colour = [c for c in COLOUR_NAMES if c not in (attributes["colour"], attributes["background"])][index % 3]
        rows_in.append({"images": [f"{index}.png"], "target": caption_for(attributes["shape"], colour,
                                                                            attributes["background"])})
    entry = write_jsonl(tmp_path / "in.jsonl", rows_in)
    operator = PromptedImageEditGenerator(str(folder), task="image2image", strength=0.8, batch_size=8,
                                          num_inference_steps=25,
                                          guidance_scale=read_training_report(folder)["recipe"]["guidance_scale"])
    summary, rows = edit(entry, tmp_path / "cache", operator, input_prompt_key="target")
    assert summary.errors == 0 and summary.images_written == 8
    images = [Image.open(tmp_path / "cache" / row["edited_images"][0]).convert("RGB") for row in rows]
    assert all(image.size == (32, 32) for image in images)
    judged = judge_generated(images, [row["target"] for row in rows_in], trained_model("shapes-clip"))
    print(f"shapes-sd image2image with a target caption (new shape colour): {judged}")
    assert judged["background"] >= 0.75 and judged["colour"] >= 0.5, judged  # the target caption is followed


def test_readme_example_runs(tmp_path, monkeypatch):
    from test_readme_examples import readme_block

    make_image(tmp_path / "photos" / "cat.png")
    write_jsonl(tmp_path / "edits.jsonl", [{"images": ["photos/cat.png"], "conversation": user("make it snow")}])
    monkeypatch.chdir(tmp_path)
    exec(readme_block("Edited images from instructions"), {})
    rows = read_jsonl(tmp_path / "cache_local" / "image_edit" / "dataflow_cache_step_step1.jsonl")
    assert rows[0]["error"] is None and len(rows[0]["edited_images"]) == 2
