"""Golden files of the instruction-editing operators (continues `test_golden_operators.py`).

`EditInstructionGenerator` asks the loopback chat server, which answers from the pixels: exact.
`EditVerifier` scores pixel-drawn edits with the random-weight tiny CLIP (the same weights on
any machine); its default thresholds sit >= 0.012 from every score they judge here (measured
once), so no CPU moves a verdict; scores are compared as scores, as are those its reasons print.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from golden_files import check_golden
from PIL import Image
from test_golden_outputs import write_jsonl

from dataflowmm import FileStorage
from dataflowmm.contract import DROPPED_KEY
from dataflowmm.io.images import save_png
from dataflowmm.kit.shapes_edits import redraw, target_colours, write_edit_sources
from dataflowmm.operators import EditInstructionGenerator, EditTriples, EditVerifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def chat_api():
    pytest.importorskip("openai")
    from dataflowmm.kit.loopback_chat_api import LoopbackChatAPI

    with LoopbackChatAPI(api_key="sk-golden") as server:
        yield server


def test_edit_instruction_generator_golden(tmp_path, chat_api):
    from dataflowmm.serving import APIVLMServing

    data = tmp_path / "data"
    sources = rows_of(write_edit_sources(data, 3, seed=5))
    Image.new("RGB", (32, 32), (40, 80, 220)).save(data / "images" / "plain.png")  # no shape: no edit proposed
    (data / "images" / "corrupt.png").write_bytes(b"not a png")
    entry = write_jsonl(data / "rows.jsonl", [
        {"id": 0, "images": sources[0]["images"]},
        {"id": 1, "images": sources[1]["images"][0]},  # one path
        {"id": 2, "images": ["images/plain.png"]},  # the answer holds no JSON: error row
        {"id": 3, "images": []},  # no image: error row, nothing asked
        {"id": 4, "images": ["images/corrupt.png"]},  # unreadable: error row
        {"id": 5, "images": sources[2]["images"]},
    ])
    vlm = APIVLMServing("loopback-vlm", base_url=chat_api.base_url, api_key="sk-golden", timeout=5, max_retries=1,
                        batch_size=4)
    summary = EditInstructionGenerator(vlm, save_interval=4).run(FileStorage(entry, cache_path=tmp_path / "c").step())
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (3, 6, 0, 0)
    out = rows_of(summary.output_path)
    assert out[0]["instruction"].startswith(f"make the {sources[0]['shape']} ")
    assert out[0]["source_caption"] == sources[0]["text"]
    check_golden("edit_instruction_generator", summary.output_path, tmp_path)  # the server judges pixels: exact


def test_edit_verifier_golden(tmp_path, tiny_model):
    from dataflowmm.serving import ClipServing

    data = tmp_path / "data"
    sources = rows_of(write_edit_sources(data, 4, seed=5))
    for index, row in enumerate(sources):
        other = next(c for c in target_colours(row) if c != row["target_colour"])
        for name, image in {"perfect": redraw(row, colour=row["target_colour"]), "copy": redraw(row),
                            "whole": redraw(row, colour=row["target_colour"], background=other)}.items():
            save_png(image, data / f"edits/{index}_{name}.png")
    redraw(sources[0], colour=sources[0]["target_colour"]).resize((64, 64), Image.Resampling.NEAREST).save(
        data / "edits/0_large.png")
    (data / "edits" / "corrupt.png").write_bytes(b"not a png")

    def row(index, edited, **changes):
        source = sources[index]
        caption = f"a {source['target_colour']} {source['shape']} on a {source['background']} background"
        return {"images": source["images"], "edited_images": edited, "source_caption": source["text"],
                "target_caption": caption, **changes}

    rows = [
        row(0, "edits/0_perfect.png"),  # kept (directional 0.319, gain 0.013)
        row(1, "edits/1_perfect.png"),  # tiny CLIP's directional -0.156 and gain -0.030: dropped
        row(0, "edits/0_copy.png"),  # nothing changed: dropped
        row(3, "edits/3_whole.png"),  # the background too: changed too much, dropped
        row(3, ["edits/3_perfect.png", "edits/3_copy.png"]),  # all must pass: image 2 fails, dropped
        row(0, "edits/0_large.png"),  # another size: compared at the source's; kept
        row(2, "edits/corrupt.png"),  # unreadable: error row, kept
        row(2, "edits/2_perfect.png", target_caption=None),  # no target caption: error row, kept
        row(2, ["edits/2_whole.png"]),  # a list of one: dropped, its reason per image
    ]
    for number, value in enumerate(rows):
        value["id"] = number
    entry = write_jsonl(data / "rows.jsonl", rows)
    clip = ClipServing(str(tiny_model("tiny-clip")), torch_dtype="fp32", batch_size=3)
    summary = EditVerifier(clip, save_interval=4).run(FileStorage(entry, cache_path=tmp_path / "c").step())
    assert (summary.errors, summary.rows_out, summary.rows_dropped, summary.images_written) == (2, 4, 5, 0)
    check_golden("edit_verifier", summary.output_path, tmp_path, score_keys=["edit_scores"])
    check_golden("edit_verifier.dropped", summary.dropped_path, tmp_path, score_keys=["edit_scores"],
                 scored_text_keys=[DROPPED_KEY])


def test_edit_triples_golden(tmp_path):
    data = tmp_path / "data"
    sources = rows_of(write_edit_sources(data, 2, seed=5))
    first, second = sources[0]["images"][0], sources[1]["images"][0]
    entry = write_jsonl(data / "rows.jsonl", [
        {"id": 0, "images": [first], "instruction": "make it red", "edited_images": [second, first]},
        {"id": 1, "images": [first, second], "instruction": ["a", "b"], "edited_images": [second, first]},
        {"id": 2, "images": first, "instruction": "x", "edited_images": []},  # the edit failed: no triple
        {"id": 3, "images": [first, second], "instruction": "y", "edited_images": [first]},  # uneven: error
        {"id": 4, "images": [first], "instruction": ["p", "q"], "edited_images": [second]},  # error
    ])
    summary = EditTriples(save_interval=2).run(FileStorage(entry, cache_path=tmp_path / "c").step())
    assert (summary.rows_in, summary.rows_out, summary.errors, summary.images_written) == (5, 6, 2, 0)
    out = rows_of(summary.output_path)
    assert [(row["id"], row["instruction"]) for row in out] == [(0, "make it red"), (0, "make it red"), (1, "a"),
                                                                (1, "b"), (3, "y"), (4, ["p", "q"])]
    assert out[2]["source_image"] == "../data/" + first and out[2]["edited_image"] == "../data/" + second
    assert "images" not in out[0] and "edited_images" not in out[0]
    assert out[4]["error"] == "EditTriples: key 'edited_images': 1 edited images for 2 source images"
    assert out[5]["error"] == "EditTriples: key 'instruction': 2 instructions for 1 source images"
    check_golden("edit_triples", summary.output_path, tmp_path / "c")
