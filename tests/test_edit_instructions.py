"""EditInstructionGenerator (templates, or any VLM serving) and EditVerifier's behaviour:
what they write, which rows fail, how a list of edited images is judged. The figures on
shapes-sd edits are in test_edit_verification.py."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from dataflowmm import FileStorage
from dataflowmm.contract import DROPPED_KEY
from dataflowmm.io.images import save_png
from dataflowmm.kit.shapes import ShapesWorld, judge_image
from dataflowmm.kit.shapes_edits import (
    INSTRUCTION_TEMPLATE,
    SOURCE_CAPTION_TEMPLATE,
    TARGET_CAPTION_TEMPLATE,
    judge_edit,
    redraw,
    target_colours,
    write_edit_sources,
)
from dataflowmm.operators import EditInstructionGenerator, EditVerifier
from dataflowmm.operators.edit_instructions import EDIT_PROMPT, parse_edit_answer
from dataflowmm.serving.common import GenerationFailed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


SHAPES_TEMPLATES = {"instruction_template": INSTRUCTION_TEMPLATE, "source_caption_template": SOURCE_CAPTION_TEMPLATE,
                    "target_caption_template": TARGET_CAPTION_TEMPLATE}

# --------------------------------------------------------------------------- kit


def test_edit_sources_name_a_target_colour_that_is_neither_the_shape_nor_the_background(tmp_path):
    rows = rows_of(write_edit_sources(tmp_path, 60, seed=3))
    assert all(row["target_colour"] in target_colours(row) for row in rows)
    assert rows == rows_of(write_edit_sources(tmp_path / "again", 60, seed=3))  # seeded
    assert len({row["target_colour"] for row in rows}) >= 4
    sample = ShapesWorld().sample(0, seed=3)
    assert redraw(sample.attributes).tobytes() == sample.image.tobytes()  # the same drawing
    edit = redraw(sample.attributes, colour=rows[0]["target_colour"])
    assert judge_edit(rows[0], edit, rows[0]["target_colour"])["right"]
    assert not judge_edit(rows[0], sample.image, rows[0]["target_colour"])["colour_changed"]


# --------------------------------------------------------------------------- templates


def test_templates_write_the_instruction_and_both_captions(tmp_path):
    entry = write_edit_sources(tmp_path / "data", 6, seed=777)
    rows = rows_of(entry)
    rows[2].pop("target_colour")  # missing field: error row
    write_rows(entry, rows)
    summary = EditInstructionGenerator(**SHAPES_TEMPLATES).run(FileStorage(entry, cache_path=tmp_path / "c").step())
    out = rows_of(summary.output_path)
    assert summary.errors == 1 and summary.rows_out == 6
    first = out[0]
    assert first["instruction"] == f"make the {first['shape']} {first['target_colour']}"
    assert first["source_caption"] == first["text"]
    assert first["target_caption"] == f"a {first['target_colour']} {first['shape']} on a {first['background']} background"
    assert out[2]["error"] == "EditInstructionGenerator: key 'target_colour': missing"
    assert (out[2]["instruction"], out[2]["source_caption"], out[2]["target_caption"]) == (None, None, None)


def test_a_caption_template_left_out_leaves_its_column_unwritten(tmp_path):
    entry = write_rows(tmp_path / "rows.jsonl", [{"thing": "sky", "to": "red"}, {"thing": "sea"}])
    generator = EditInstructionGenerator(instruction_template="make the {thing} {to}",
                                         target_caption_template="a {to} {thing}")
    summary = generator.run(FileStorage(entry, cache_path=tmp_path / "c").step(), output_instruction_key="edit")
    out = rows_of(summary.output_path)
    assert out[0] == {"thing": "sky", "to": "red", "edit": "make the sky red", "target_caption": "a red sky",
                      "error": None}
    assert "source_caption" not in out[1] and out[1]["edit"] is None and out[1]["error"].endswith("'to': missing")


@pytest.mark.parametrize("arguments, message", [
    ({}, "give serving"),
    ({"serving": "some/vlm", "instruction_template": "make it {x}"}, "not both"),
    ({"serving": "some/vlm", "target_caption_template": "a {x}"}, "caption templates are for template mode"),
    ({"instruction_template": " "}, "instruction_template must be a non-empty"),
    ({"serving": "some/vlm", "prompt": ""}, "prompt must be a non-empty"),
    ({"serving": object()}, "must be a VLM serving"),
])
def test_generator_arguments_are_checked(arguments, message):
    with pytest.raises(ValueError, match=message):
        EditInstructionGenerator(**arguments)


# --------------------------------------------------------------------------- VLM answers


@pytest.mark.parametrize("answer", [
    '{"instruction": "make the car red", "source_caption": "a blue car", "target_caption": "a red car"}',
    'Sure!\n```json\n{"Instruction": "make the car red", "input_caption": "a blue car",\n'
    ' "output-caption": "a red car", "note": 3}\n```',
    "Instruction: make the car red\nSource caption: a blue car\nTarget caption: a red car",
    '- **Edit instruction**: "make the car red"\n- **Original caption**: a blue car\n- **Edited caption**: a red car',
    '{"instruction": "make the car red"}\nSource caption: a blue car\nTarget caption: a red car',
])
def test_vlm_answers_are_read_as_json_or_lines(answer):
    assert parse_edit_answer(answer) == {"instruction": "make the car red", "source_caption": "a blue car",
                                         "target_caption": "a red car"}


@pytest.mark.parametrize("answer, missing", [
    ("I would paint the car red.", "instruction, source_caption, target_caption"),
    ('{"instruction": "make the car red", "source_caption": "a blue car"}', "target_caption"),
    ('{"instruction": "", "source_caption": "a", "target_caption": "b"}', "instruction"),
    ('[{"instruction": "x"}]', "source_caption, target_caption"),  # the object inside a list is read
])
def test_unusable_answers_name_what_they_lack(answer, missing):
    with pytest.raises(ValueError, match=f"names no {missing}"):
        parse_edit_answer(answer)


class ScriptedVLM:
    """A VLM serving that answers from a script keyed by the prompt's text (no model)."""

    batch_size = 8

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def generate(self, prompts, seeds=None):
        self.calls.append(list(prompts))
        return [self.answers.get(prompt.text, self.answers.get("*")) for prompt in prompts]

    def config(self):
        return {"serving": "ScriptedVLM"}


def test_vlm_mode_asks_once_per_batch_and_fails_rows_it_cannot_read(tmp_path):
    entry = write_edit_sources(tmp_path / "data", 5, seed=777)
    rows = rows_of(entry)
    for row, hint in zip(rows, ["image", "image", "mess", None, "busy"], strict=True):
        row["hint"] = hint
    rows[1]["images"] = []  # no image: error row, nothing asked
    write_rows(entry, rows)
    good = '{"instruction": "make it red", "source_caption": "a thing", "target_caption": "a red thing"}'
    vlm = ScriptedVLM({"Edit this mess.": "no idea", "Edit this busy.": GenerationFailed("rate limited", transient=True),
                       "*": good})
    summary = EditInstructionGenerator(vlm, prompt="Edit this {hint}.").run(
        FileStorage(entry, cache_path=tmp_path / "c").step())
    out = rows_of(summary.output_path)
    assert len(vlm.calls) == 1  # one call for the batch, rows that cannot make a prompt left out
    assert [p.text for p in vlm.calls[0]] == ["Edit this image.", "Edit this mess.", "Edit this busy."]
    assert vlm.calls[0][0].images[0].endswith("source_777_000000.png")
    assert out[0]["instruction"] == "make it red" and out[0]["target_caption"] == "a red thing"
    assert out[1]["error"] == "EditInstructionGenerator: key 'images': no source image"
    assert "names no instruction" in out[2]["error"] and out[2]["instruction"] is None
    assert out[3]["error"] == "EditInstructionGenerator: key 'hint': missing"
    assert out[4]["error"] == "EditInstructionGenerator: rate limited"
    assert summary.errors == 4


def test_the_default_prompt_asks_for_json():
    assert "JSON" in EDIT_PROMPT and "source_caption" in EDIT_PROMPT and "target_caption" in EDIT_PROMPT


# --------------------------------------------------------------------------- verifier


@pytest.fixture(scope="module")
def shapes_clip(trained_model):
    from dataflowmm.serving import ClipServing

    return ClipServing(trained_model("shapes-clip"), device="cpu", torch_dtype="fp32")


def edit_rows(folder: Path, count: int = 4) -> list[dict]:
    """Sources with a perfect pixel edit, a copy (no change), and an edit that recolours the
    background too; paths relative to `folder`."""
    rows = rows_of(write_edit_sources(folder, count, seed=777))
    for index, row in enumerate(rows):
        others = [c for c in target_colours(row) if c != row["target_colour"]]
        for name, image in {"perfect": redraw(row, colour=row["target_colour"]),
                            "copy": redraw(row),
                            "whole": redraw(row, colour=row["target_colour"], background=others[0])}.items():
            save_png(image, folder / f"edits/{index}_{name}.png")
            row[name] = f"edits/{index}_{name}.png"
        row["source_caption"] = row["text"]
        row["target_caption"] = f"a {row['target_colour']} {row['shape']} on a {row['background']} background"
    return rows


def test_verifier_keeps_a_right_edit_and_drops_no_change_and_whole_image_with_reasons(tmp_path, shapes_clip):
    rows = edit_rows(tmp_path / "data", 2)
    candidates = [{**row, "edited_images": row[name], "kind": name} for row in rows
                  for name in ("perfect", "copy", "whole")]
    entry = write_rows(tmp_path / "data" / "candidates.jsonl", candidates)
    summary = EditVerifier(shapes_clip).run(FileStorage(entry, cache_path=tmp_path / "c").step())
    kept, dropped = rows_of(summary.output_path), rows_of(summary.dropped_path)  # keep_dropped by default
    assert [row["kind"] for row in kept] == ["perfect", "perfect"]
    assert [row["kind"] for row in dropped] == ["copy", "whole", "copy", "whole"]
    scores = kept[0]["edit_scores"]
    assert set(scores) == {"changed_ratio", "directional", "target_gain", "target_score", "image_similarity"}
    assert 0.05 < scores["changed_ratio"] < 0.9 and scores["directional"] > 0.5 and scores["target_gain"] > 0.1
    copy = dropped[0]
    assert copy["edit_scores"]["changed_ratio"] == 0 and copy["edit_scores"]["directional"] == 0
    assert copy[DROPPED_KEY] == ("EditVerifier: nothing changed (changed ratio 0.0000 < 0.001), directional "
                                 "0.0000 < 0.2, target gain 0.0000 <= 0.0")
    assert dropped[1][DROPPED_KEY].startswith("EditVerifier: changed too much (changed ratio 1.0000 > 0.9)")


def test_a_list_of_edited_images_is_judged_all_or_any(tmp_path, shapes_clip):
    row = edit_rows(tmp_path / "data", 1)[0]
    entry = write_rows(tmp_path / "data" / "rows.jsonl", [
        {**row, "edited_images": [row["perfect"], row["copy"]]},
        {**row, "edited_images": [row["perfect"]]},
    ])
    summaries = {}
    for any_or_all, kept_count in (("all", 1), ("any", 2)):
        verifier = EditVerifier(shapes_clip, any_or_all=any_or_all)
        summaries[any_or_all] = summary = verifier.run(FileStorage(entry, cache_path=tmp_path / any_or_all).step(),
                                                       output_scores_key="scores")
        kept = rows_of(summary.output_path)
        assert summary.rows_out == kept_count and all(isinstance(row["scores"], list) for row in kept)
    dropped = rows_of(summaries["all"].dropped_path)
    assert dropped[0][DROPPED_KEY].startswith("EditVerifier: image 2: nothing changed")
    assert dropped[0][DROPPED_KEY].endswith("(all)") and len(dropped[0]["scores"]) == 2


def test_rows_that_cannot_be_verified_are_kept_with_their_error(tmp_path, shapes_clip):
    row = edit_rows(tmp_path / "data", 1)[0]
    (tmp_path / "data" / "edits" / "corrupt.png").write_bytes(b"not a png")
    entry = write_rows(tmp_path / "data" / "rows.jsonl", [
        {**row, "edited_images": "edits/corrupt.png"},
        {**row, "edited_images": "edits/missing.png"},
        {**row, "edited_images": []},
        {**row, "edited_images": row["perfect"], "target_caption": None},
        {**row, "edited_images": row["perfect"], "images": [row["perfect"], row["copy"]]},
        {**row, "edited_images": row["perfect"]},
    ])
    summary = EditVerifier(shapes_clip).run(FileStorage(entry, cache_path=tmp_path / "c").step())
    out = rows_of(summary.output_path)
    assert summary.errors == 5 and summary.rows_dropped == 0 and len(out) == 6
    errors = [row["error"] for row in out]
    assert "key 'edited_images'" in errors[0] and "edits/corrupt.png" in errors[0]
    assert "image not found" in errors[1]
    assert errors[2] == "EditVerifier: key 'edited_images': no edited image to verify"
    assert errors[3] == "EditVerifier: key 'target_caption': expected a caption, got None"
    assert errors[4] == "EditVerifier: key 'images': expected one source image, got 2"
    assert errors[5] is None and out[5]["edit_scores"]["target_gain"] > 0
    assert all(row["edit_scores"] is None for row in out[:5])


def test_one_embedding_call_per_batch_for_images_and_one_for_texts(tmp_path, shapes_clip):
    rows = edit_rows(tmp_path / "data", 3)
    entry = write_rows(tmp_path / "data" / "rows.jsonl",
                       [{**row, "edited_images": [row["perfect"], row["whole"]]} for row in rows])
    calls = []

    class Counting(type(shapes_clip)):
        def embed_images(self, images):
            calls.append(("images", len(images)))
            return super().embed_images(images)

        def embed_texts(self, texts):
            calls.append(("texts", len(texts)))
            return super().embed_texts(texts)

    clip = Counting(shapes_clip.model, device="cpu", torch_dtype="fp32", batch_size=4)
    EditVerifier(clip, any_or_all="any").run(FileStorage(entry, cache_path=tmp_path / "c").step())
    assert calls == [("images", 9), ("texts", 6)]  # 3 rows: 3 sources and 6 edits; 3 caption pairs


def test_optional_thresholds_and_their_reasons(tmp_path, shapes_clip):
    row = edit_rows(tmp_path / "data", 1)[0]
    entry = write_rows(tmp_path / "data" / "rows.jsonl", [{**row, "edited_images": row["perfect"]}])
    verifier = EditVerifier(shapes_clip, min_target_score=0.999, min_image_similarity=0.999, min_directional=0.999,
                            min_target_gain=0.9)
    summary = verifier.run(FileStorage(entry, cache_path=tmp_path / "c").step())
    reason = rows_of(summary.dropped_path)[0][DROPPED_KEY]
    assert [part.split(" ")[0] for part in reason.removeprefix("EditVerifier: ").split(", ")] == [
        "directional", "target", "target", "image"]
    assert judge_image(redraw(row, colour=row["target_colour"]))["colour"] == row["target_colour"]


@pytest.mark.parametrize("arguments, message", [
    ({"min_changed_ratio": 0.5, "max_changed_ratio": 0.4}, "min_changed_ratio <= max_changed_ratio"),
    ({"max_changed_ratio": 1.5}, "<= 1"),
    ({"any_or_all": "most"}, "any_or_all"),
    ({"min_directional": None}, "min_directional must be a number"),
    ({"min_target_score": "high"}, "min_target_score must be a number or None"),
    ({"difference_threshold": 300}, "difference_threshold"),
    ({"blur_size": 0}, "blur_size"),
])
def test_verifier_arguments_are_checked(arguments, message):
    with pytest.raises(ValueError, match=message):
        EditVerifier("some/clip", **arguments)


def test_verifier_defaults_and_fingerprint():
    verifier = EditVerifier("some/clip")
    assert verifier.keep_dropped_rows() and verifier.input_batch_size == 32
    assert verifier.params()["arguments"]["max_changed_ratio"] == 0.9
    assert verifier.params() != EditVerifier("some/clip", min_target_score=0.8).params()


def test_run_keywords():
    def keywords(cls):
        return [(name, p.default) for name, p in inspect.signature(cls.run).parameters.items()
                if name not in ("self", "storage", "retry_errors")]

    assert keywords(EditInstructionGenerator) == [
        ("input_image_key", "images"), ("output_instruction_key", "instruction"),
        ("output_source_caption_key", "source_caption"), ("output_target_caption_key", "target_caption")]
    assert keywords(EditVerifier) == [
        ("input_source_image_key", "images"), ("input_edited_image_key", "edited_images"),
        ("input_source_caption_key", "source_caption"), ("input_target_caption_key", "target_caption"),
        ("output_scores_key", "edit_scores")]
    assert EditInstructionGenerator(instruction_template="{a}").input_batch_size == 256
    assert EditInstructionGenerator(ScriptedVLM({})).input_batch_size == 8  # the VLM serving's batch_size
