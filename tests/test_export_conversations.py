"""`dataflowmm export --to llava / sharegpt`: conversation JSON a LLaVA-style loader reads,
images copied beside it under stable names, rows with errors left out and counted."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dataflowmm.cli import main
from dataflowmm.export import export_step
from dataflowmm.io.images import image_to_str

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
from llava_loader import load_llava_samples  # noqa: E402


def noise(seed: int, size=(12, 10)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def step_file(tmp_path) -> tuple[Path, list[Image.Image]]:
    images = [noise(i) for i in range(4)]
    folder = tmp_path / "cache" / "step1_images"
    folder.mkdir(parents=True)
    images[0].save(folder / "a.png")
    images[1].save(folder / "b.jpg", quality=95)
    images[2].save(folder / "c.png")
    rows = [
        {"id": "q1", "images": ["step1_images/a.png"], "caption": "a noisy square",
         "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "noise"}],
         "error": None},
        {"id": "q2", "images": ["step1_images/b.jpg", "step1_images/c.png"], "caption": "two",
         "conversations": [{"role": "user", "content": "Compare them."}, {"role": "assistant", "content": "same"}],
         "error": None},
        {"id": "q3", "images": [], "caption": None, "conversations": [], "error": "VLM: HTTP 500"},
        {"id": "q4", "images": [image_to_str(images[3])], "caption": "inline",
         "conversations": [{"from": "human", "value": "<__dj__image> Describe."}, {"from": "gpt", "value": "ok"}],
         "error": None},
    ]
    path = tmp_path / "cache" / "step.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "cache" / "step.manifest.json").write_text(json.dumps({"rows_dropped": 2}))
    return path, images


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_llava_export_loads_with_a_llava_style_loader(tmp_path, step_file):
    path, images = step_file
    out = tmp_path / "train" / "llava.json"
    report = export_step(path, "llava", out)
    assert report.counts == {"rows": 4, "exported": 3, "left_out_error": 1, "left_out_no_image": 0,
                             "dropped_by_filter": 2}
    records = json.loads(out.read_text())
    assert [record["id"] for record in records] == ["q1", "q2", "q4"]
    assert records[0]["image"] == "llava_images/000000000.png"  # one image: a string, named by row
    assert records[1]["image"] == ["llava_images/000000001_0.jpg", "llava_images/000000001_1.png"]
    # turns normalised: roles to from/value, a token per image prepended, Data-Juicer's token replaced
    assert records[1]["conversations"][0] == {"from": "human", "value": "<image>\n<image>\nCompare them."}
    assert records[2]["conversations"][0]["value"] == "<image> Describe."
    samples = load_llava_samples(out, out.parent)
    assert np.array_equal(pixels(samples[0]["images"][0]), pixels(images[0]))
    assert np.array_equal(pixels(samples[1]["images"][1]), pixels(images[2]))
    assert np.array_equal(pixels(samples[2]["images"][0]), pixels(images[3]))
    # the JPEG is copied as it is, never re-encoded
    assert (out.parent / records[1]["image"][0]).read_bytes() == (path.parent / "step1_images/b.jpg").read_bytes()
    assert samples[1]["conversations"][1] == {"from": "gpt", "value": "same"}


def test_sharegpt_export_has_images_lists_and_descriptions_from_text(tmp_path, step_file):
    path, _ = step_file
    export_step(path, "sharegpt", tmp_path / "sharegpt.json")
    records = json.loads((tmp_path / "sharegpt.json").read_text())
    assert records[0]["images"] == ["sharegpt_images/000000000.png"]
    assert records[0]["conversations"][1] == {"from": "gpt", "value": "noise"}
    # without conversations, a text column answers the prompt: one description turn per row
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    described = path.with_name("described.jsonl")  # beside the step: image paths stay valid
    described.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "conversations"}) + "\n"
                                 for row in rows))
    report = export_step(described, "sharegpt", tmp_path / "captions.json", prompt="What is shown?")
    records = json.loads((tmp_path / "captions.json").read_text())
    assert report.counts["exported"] == 3 and report.counts["left_out_error"] == 1
    assert records[0]["conversations"] == [{"from": "human", "value": "<image>\nWhat is shown?"},
                                           {"from": "gpt", "value": "a noisy square"}]
    assert records[1]["conversations"][0]["value"] == "<image>\n<image>\nWhat is shown?"


def test_a_mismatch_of_tokens_and_images_names_the_row(tmp_path, step_file):
    path, _ = step_file
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["conversations"][0] = {"from": "human", "value": "<image>\nCompare them."}
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "llava.json"
    with pytest.raises(ValueError, match=r"step.jsonl: row 1, column 'conversations': 1 <image> tokens for 2 images"):
        export_step(path, "llava", out)
    assert not out.exists()  # the JSON is written atomically: nothing half-written


def test_re_export_replaces_stale_images_and_link_shares_the_files(tmp_path, step_file):
    path, _ = step_file
    out = tmp_path / "llava.json"
    (tmp_path / "llava_images").mkdir()
    (tmp_path / "llava_images" / "999999999.png").write_bytes(b"old")
    export_step(path, "llava", out, link=True)
    assert sorted(p.name for p in (tmp_path / "llava_images").iterdir()) == [
        "000000000.png", "000000001_0.jpg", "000000001_1.png", "000000003.png"]
    assert os.path.samefile(tmp_path / "llava_images" / "000000000.png", path.parent / "step1_images" / "a.png")


def test_cli_prints_what_was_left_out_and_names_missing_text(tmp_path, step_file):
    path, _ = step_file
    result = CliRunner().invoke(main, ["export", str(path), "--to", "llava", str(tmp_path / "l.json")])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (f"exported 3 of 4 rows -> {tmp_path / 'l.json'}; left out: 1 with errors, "
                                     "2 dropped by the step's filter")
    plain = tmp_path / "cache" / "plain.jsonl"
    plain.write_text(json.dumps({"images": ["step1_images/a.png"], "score": 1}) + "\n")
    result = CliRunner().invoke(main, ["export", str(plain), "--to", "sharegpt", str(tmp_path / "s.json")])
    assert result.exit_code == 1
    assert "plain.jsonl: no conversation column and no text column to make one from" in result.output
    result = CliRunner().invoke(main, ["export", str(plain), "--to", "hf", str(tmp_path / "h"), "--link"])
    assert result.exit_code == 2 and "--to hf takes no options, got link" in result.output
