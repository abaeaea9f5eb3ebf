"""ImageTask / ImageGeneration: generations with their own seeds, images as files or in rows,
per-row errors, fail-fast column checks, resume; a scripted serving plus the tiny SD model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.io.images import image_from_str
from dataflowmm.operators import ImageGeneration, ImageTask
from dataflowmm.serving.api_image_gen import GenerationFailed


class ScriptedServing:
    """Draws a solid colour from each seed; prompts containing "FAIL" fail, "FLAG" are flagged."""

    batch_size = 2
    model_name = "scripted-model"

    def __init__(self, crash_on_call: int | None = None):
        self.calls: list[list[str]] = []
        self.crash_on_call = crash_on_call

    def generate(self, prompts, seeds):
        self.calls.append(list(prompts))
        if self.crash_on_call is not None and len(self.calls) == self.crash_on_call:
            raise KeyboardInterrupt("killed")
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            if "FAIL" in prompt:
                out.append(GenerationFailed("HTTP 500 (after 2 retries): internal error"))
            elif "FLAG" in prompt:
                out.append([None])
            else:
                out.append([Image.new("RGB", (8, 8), tuple(seed.to_bytes(8, "big")[:3]))])
        return out

    def config(self):
        return {"serving": "scripted"}

    @property
    def prompts_seen(self) -> list[str]:
        return [prompt for call in self.calls for prompt in call]


def write_prompts(path: Path, prompts: list) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run(tmp_path, task, prompts, cache="cache", **storage_kwargs):
    entry = write_prompts(tmp_path / "prompts.jsonl", prompts)
    storage = FileStorage(entry, cache_path=tmp_path / cache, **storage_kwargs)
    summary = task.run(storage.step())
    return summary, read_rows(summary.output_path)


def pixels(path) -> tuple:
    with Image.open(path) as image:
        return image.convert("RGB").getpixel((0, 0))


# ------------------------------------------------------------- ImageGeneration
def test_num_generations_gives_distinct_images_each_with_its_own_seed(tmp_path):
    serving = ScriptedServing()
    summary, rows = run(tmp_path, ImageGeneration(serving, num_generations=3), ["a cat", "a dog"])
    assert [row["prompt"] for row in rows] == ["a cat"] * 3 + ["a dog"] * 3
    assert summary.rows_out == 6 and summary.images_written == 6 and summary.errors == 0
    assert all(row["model_name"] == "scripted-model" and row["error"] is None for row in rows)
    assert all(row["image"] == row["image_path"] for row in rows)
    folder = Path(summary.output_path).parent
    colours = [pixels(folder / row["image"]) for row in rows]
    assert len(set(colours)) == 6  # every generation drew its own seed
    assert not Path(rows[0]["image"]).is_absolute() and rows[0]["image"].endswith("_0_0.png")
    assert len(list((folder / Path(rows[0]["image"]).parent).glob("*.png"))) == 6


def test_group_generations_keeps_one_row_with_lists(tmp_path):
    _, rows = run(tmp_path, ImageGeneration(ScriptedServing(), num_generations=2, group_generations=True),
                  ["a cat", "FAIL here"])
    assert len(rows) == 2
    assert len(rows[0]["image"]) == 2 and rows[0]["image"] == rows[0]["image_path"]
    assert rows[1]["image"] == [None, None]
    assert "generation 0: HTTP 500" in rows[1]["error"] and "generation 1:" in rows[1]["error"]


def test_failed_rows_are_kept_with_their_error(tmp_path):
    summary, rows = run(tmp_path, ImageGeneration(ScriptedServing(), num_generations=2),
                        ["fine", "", None, "FAIL please", "FLAG me"])
    by_prompt = {}
    for row in rows:
        by_prompt.setdefault(row["id"], []).append(row)
    assert [len(by_prompt[i]) for i in range(5)] == [2, 1, 1, 2, 2]
    assert by_prompt[1][0]["error"] == "ImageGeneration: key 'prompt': empty prompt"
    assert by_prompt[2][0]["error"] == "ImageGeneration: input column 'prompt' is missing"
    assert all("HTTP 500" in row["error"] and row["image"] is None for row in by_prompt[3])
    assert all("safety checker" in row["error"] for row in by_prompt[4])
    assert all(row["model_name"] == "scripted-model" for row in rows)
    assert summary.errors == 6 and summary.images_written == 2


def test_strict_names_file_and_row(tmp_path):
    with pytest.raises(ValueError, match=r"prompts.jsonl: row 1: .*empty prompt"):
        run(tmp_path, ImageGeneration(ScriptedServing(), strict=True), ["fine", " "])


def test_a_missing_column_fails_before_any_model_loads(tmp_path):
    serving = ScriptedServing()
    entry = tmp_path / "rows.jsonl"
    entry.write_text('{"text": "a cat"}\n')
    with pytest.raises(KeyError, match="'prompt'"):
        ImageGeneration(serving).run(FileStorage(entry, cache_path=tmp_path / "c").step())
    with pytest.raises(KeyError, match="'caption'"):
        ImageGeneration(serving).run(FileStorage(entry, cache_path=tmp_path / "d").step(),
                                     input_mappings={"prompt": "caption"})
    assert serving.calls == []


def test_images_in_rows_are_base64_and_no_file_is_written(tmp_path):
    task = ImageGeneration(ScriptedServing(), images_in_rows=True, image_format="jpeg")
    summary, rows = run(tmp_path, task, ["a cat"])
    image = image_from_str(rows[0]["image"])
    assert image.size == (8, 8) and rows[0]["image"].startswith("/9j/")  # JPEG
    assert rows[0]["image_path"] is None
    assert not any(Path(summary.output_path).parent.rglob("*.jpg"))


def test_png_in_rows_is_the_served_image_pixel_for_pixel(tmp_path):
    _, in_rows = run(tmp_path, ImageGeneration(ScriptedServing(), images_in_rows=True), ["a cat"], cache="a")
    _, as_files = run(tmp_path, ImageGeneration(ScriptedServing()), ["a cat"], cache="b")
    from_file = Image.open(tmp_path / "b" / as_files[0]["image"]).convert("RGB")
    assert np.array_equal(np.asarray(image_from_str(in_rows[0]["image"])), np.asarray(from_file))


def test_resume_after_a_kill_redoes_no_finished_chunk(tmp_path):
    prompts = [f"prompt {i}" for i in range(8)]
    _, uninterrupted = run(tmp_path, ImageGeneration(ScriptedServing(), save_interval=2), prompts, cache="whole")

    killed = ScriptedServing(crash_on_call=3)  # batches of 2: dies in the third batch
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, ImageGeneration(killed, save_interval=2), prompts, cache="resumed")
    again = ScriptedServing()
    summary, resumed = run(tmp_path, ImageGeneration(again, save_interval=2), prompts, cache="resumed")
    assert again.prompts_seen == prompts[4:]
    assert summary.chunks_resumed == 2
    assert [r["image"] for r in resumed] == [r["image"].replace("whole", "resumed") for r in uninterrupted]
    assert [pixels(tmp_path / "resumed" / r["image"]) for r in resumed] == \
           [pixels(tmp_path / "whole" / r["image"]) for r in uninterrupted]


def test_a_finished_step_is_reused_and_a_changed_task_recomputes(tmp_path):
    serving = ScriptedServing()
    run(tmp_path, ImageGeneration(serving), ["a cat"])
    summary, _ = run(tmp_path, ImageGeneration(serving), ["a cat"])
    assert summary.reused and len(serving.calls) == 1
    summary, rows = run(tmp_path, ImageGeneration(serving, num_generations=2), ["a cat"])
    assert not summary.reused and len(rows) == 2


# ------------------------------------------------------------- custom tasks
class StyledPortrait(ImageTask):
    """A user's task: a subject and an optional style in, an image and its prompt out."""

    def __init__(self, *args, style_suffix: str = "oil painting", **kwargs):
        self.style_suffix = style_suffix
        super().__init__(*args, **kwargs)

    @property
    def inputs(self):
        return {"subject": True, "style": False}

    @property
    def outputs(self):
        return ["portrait", "portrait_path", "full_prompt"]

    @property
    def image_outputs(self):
        return ["portrait"]

    def format_input(self, row):
        return f"a portrait of {row['subject']}, {row.get('style') or self.style_suffix}"

    def format_output(self, output, row):
        return {"portrait": output["images"][0], "full_prompt": self.format_input(row)}


def test_a_custom_task_reads_mapped_inputs_and_writes_its_outputs(tmp_path):
    entry = tmp_path / "people.jsonl"
    entry.write_text('{"who": "a knight", "style": "pixel art"}\n{"who": "a queen"}\n{"style": "x"}\n')
    serving = ScriptedServing()
    storage = FileStorage(entry, cache_path=tmp_path / "cache")
    summary = StyledPortrait(serving).run(storage.step(), input_mappings={"subject": "who"},
                                          output_mappings={"full_prompt": "prompt_used"})
    rows = read_rows(summary.output_path)
    assert serving.prompts_seen == ["a portrait of a knight, pixel art", "a portrait of a queen, oil painting"]
    assert rows[0]["prompt_used"] == "a portrait of a knight, pixel art"
    assert rows[0]["portrait"] == rows[0]["portrait_path"] and rows[0]["portrait"].endswith(".png")
    assert rows[0]["model_name"] == "scripted-model"
    assert rows[2]["error"] == "StyledPortrait: input column 'who' is missing" and rows[2]["portrait"] is None
    assert summary.images_written == 2


def test_a_task_attribute_is_part_of_the_fingerprint(tmp_path):
    entry = tmp_path / "people.jsonl"
    entry.write_text('{"subject": "a knight"}\n')
    first = StyledPortrait(ScriptedServing()).run(FileStorage(entry, cache_path=tmp_path / "c").step())
    other = StyledPortrait(ScriptedServing(), style_suffix="watercolour").run(
        FileStorage(entry, cache_path=tmp_path / "c").step())
    assert not other.reused and first.output_path == other.output_path
    assert read_rows(other.output_path)[0]["full_prompt"].endswith("watercolour")


def test_task_definition_mistakes_fail_at_construction():
    class NoImageColumn(StyledPortrait):
        @property
        def image_outputs(self):
            return ["picture"]

    with pytest.raises(ValueError, match="'picture'"):
        NoImageColumn(ScriptedServing())
    with pytest.raises(ValueError, match="num_generations"):
        ImageGeneration(ScriptedServing(), num_generations=0)
    with pytest.raises(ValueError, match="image_format"):
        ImageGeneration(ScriptedServing(), image_format="gif")
    with pytest.raises(ValueError, match="has no generate"):
        ImageGeneration(object())
    with pytest.raises(ValueError, match="unknown column 'text'"):
        ImageGeneration(ScriptedServing()).run(None, input_mappings={"text": "x"})


def test_an_image_in_an_undeclared_column_is_a_clear_error(tmp_path):
    class Sloppy(StyledPortrait):
        def format_output(self, output, row):
            return {"full_prompt": output["images"][0]}

    entry = tmp_path / "people.jsonl"
    entry.write_text('{"subject": "a knight"}\n')
    with pytest.raises(TypeError, match="'full_prompt'.*image_outputs"):
        Sloppy(ScriptedServing()).run(FileStorage(entry, cache_path=tmp_path / "c").step())


# ------------------------------------------------------------- a real tiny model
def test_image_generation_with_the_tiny_diffusion_model(tmp_path, tiny_model):
    from dataflowmm.serving import LocalImageGenServing

    serving = LocalImageGenServing(tiny_model("tiny-sd"), batch_size=4, num_inference_steps=2,
                                   height=32, width=32)
    task = ImageGeneration(serving, num_generations=2, seed=7)
    summary, rows = run(tmp_path, task, ["a red circle", "a blue square"])
    assert summary.images_written == 4 and rows[0]["model_name"] == str(tiny_model("tiny-sd"))
    folder = Path(summary.output_path).parent
    arrays = [np.asarray(Image.open(folder / row["image"])) for row in rows]
    assert arrays[0].shape == (32, 32, 3)
    assert not np.array_equal(arrays[0], arrays[1])  # two generations, two seeds
    again = ImageGeneration(serving, num_generations=2, seed=7, images_in_rows=True)
    _, in_rows = run(tmp_path, again, ["a red circle", "a blue square"], cache="again")
    assert np.array_equal(np.asarray(image_from_str(in_rows[1]["image"])), arrays[1])
