"""Instruction-editing data on the shapes world: instructions from templates, edits from the
trained shapes-sd (image-to-image), and `EditVerifier` judged by the pixel judge.

The figures (printed with `-s`, and in the README):
- precision: of the generated edits the verifier keeps, the share the pixel judge calls right
  (the shape now has the instructed colour; its shape and the background are unchanged), per
  source shape;
- recall: of planted bad edits (a wrong colour, no change, the whole image changed), the share
  the verifier drops, per kind.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.contract import DROPPED_KEY
from dataflowmm.io.images import load_image, save_png
from dataflowmm.kit.shapes import SHAPES, ShapesWorld, caption_for
from dataflowmm.kit.shapes_edits import (
    INSTRUCTION_TEMPLATE,
    SOURCE_CAPTION_TEMPLATE,
    TARGET_CAPTION_TEMPLATE,
    judge_edit,
    redraw,
    target_colours,
    write_edit_sources,
)
from dataflowmm.kit.shapes_recipes import read_training_report
from dataflowmm.operators import EditInstructionGenerator, EditVerifier
from dataflowmm.seeds import derive_seed
from dataflowmm.serving import ClipServing, LocalImageGenServing

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SOURCES = 96  # about a third of each shape
PLANTED_EACH = 32  # planted bad edits of each kind (the first sources)
# The verifier's thresholds for the figure: its defaults, and the edited image's CLIP score
# against the target caption on the trained shapes CLIP's scale (a true caption ~0.95, one of
# another colour ~0.48); without it, wrong colours slip through (printed as "defaults").
FIGURE_THRESHOLDS = {"min_target_score": 0.8}
PLANTED_KINDS = ("wrong colour (shapes-sd)", "wrong colour (pixels)", "no change (copy)", "no change (JPEG)",
                 "whole image (another image)", "whole image (background too)")


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def jpeg_copy(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def shapes_edit_rows(tmp_path: Path, trained_model) -> tuple[list[dict], list[dict]]:
    """Source rows with instructions (step 1), and the rows to verify: one generated edit per
    source and the planted bad edits, each with its `kind` and the judge's verdict."""
    data = tmp_path / "data"
    entry = write_edit_sources(data, SOURCES, seed=777)
    generator = EditInstructionGenerator(instruction_template=INSTRUCTION_TEMPLATE,
                                         source_caption_template=SOURCE_CAPTION_TEMPLATE,
                                         target_caption_template=TARGET_CAPTION_TEMPLATE)
    summary = generator.run(FileStorage(entry, cache_path=tmp_path / "cache").step())
    sources = rows_of(summary.output_path)
    assert summary.errors == 0 and all(row["instruction"] == f"make the {row['shape']} {row['target_colour']}"
                                       for row in sources)
    images = [load_image(data / row["images"][0]) for row in sources]
    # A wrong colour for each planted row: neither the instructed one, the shape's nor the background's.
    wrong = [random.Random(derive_seed("wrong-colour", index)).choice(
        [c for c in target_colours(row) if c != row["target_colour"]]) for index, row in enumerate(sources)]
    folder = trained_model("shapes-sd")
    serving = LocalImageGenServing(folder, task="image2image", device="cpu", batch_size=16, num_inference_steps=25,
                                   guidance_scale=3.0, strength=0.65, torch_dtype="fp32")
    prompts = [row["target_caption"] for row in sources]
    prompts += [caption_for(row["shape"], wrong[i], row["background"]) for i, row in enumerate(sources[:PLANTED_EACH])]
    edited = [generated[0] for generated in serving.generate(
        prompts, seeds=list(range(len(prompts))), images=images + images[:PLANTED_EACH])]
    assert read_training_report(folder)["recipe"]  # the trained model, not a random one
    others = ShapesWorld().samples(PLANTED_EACH, seed=778)
    rng = random.Random(5)
    candidates = []
    for index, row in enumerate(sources):
        made = {"generated": edited[index]}
        if index < PLANTED_EACH:
            backgrounds = [c for c in target_colours(row) if c != row["target_colour"]]
            made.update({
                PLANTED_KINDS[0]: edited[SOURCES + index],
                PLANTED_KINDS[1]: redraw(row, colour=wrong[index]),
                PLANTED_KINDS[2]: images[index].copy(),
                PLANTED_KINDS[3]: jpeg_copy(images[index], rng.randint(50, 90)),
                PLANTED_KINDS[4]: others[index].image,
                PLANTED_KINDS[5]: redraw(row, colour=row["target_colour"], background=rng.choice(backgrounds)),
                "perfect (pixels)": redraw(row, colour=row["target_colour"]),
            })
        for number, (kind, image) in enumerate(made.items()):
            path = f"edits/{index:04d}_{number}.png"
            save_png(image, data / path)
            candidates.append({"id": len(candidates), "images": row["images"], "edited_images": path, "kind": kind,
                               "instruction": row["instruction"], "source_caption": row["source_caption"],
                               "target_caption": row["target_caption"], "shape": row["shape"],
                               "right": judge_edit(row, image, row["target_colour"])["right"]})
    return sources, candidates


def figures(rows: list[dict], kept: set[int]) -> dict:
    """Precision per source shape (and for circles and triangles together), recall per planted
    kind (and over all), and how many generated edits were kept."""
    generated = [(i, row) for i, row in enumerate(rows) if row["kind"] == "generated"]
    out = {"precision": {}, "kept": {}, "judged_right": {}, "wrong_dropped": {}}
    for shape in (*SHAPES, "circle+triangle"):
        mine = [(i, row) for i, row in generated if row["shape"] in shape.split("+")]
        kept_rows = [row for i, row in mine if i in kept]
        out["precision"][shape] = sum(row["right"] for row in kept_rows) / max(1, len(kept_rows))
        out["kept"][shape] = f"{len(kept_rows)} of {len(mine)}"
        out["judged_right"][shape] = sum(row["right"] for _, row in mine) / max(1, len(mine))
        wrong = [i for i, row in mine if not row["right"]]
        out["wrong_dropped"][shape] = f"{sum(i not in kept for i in wrong)} of {len(wrong)}"
    planted = [(i, row) for i, row in enumerate(rows) if row["kind"] in PLANTED_KINDS]
    out["recall"] = {kind: sum(i not in kept for i, row in planted if row["kind"] == kind) / PLANTED_EACH
                     for kind in PLANTED_KINDS}
    out["recall"]["all"] = sum(i not in kept for i, _ in planted) / len(planted)
    perfect = [i for i, row in enumerate(rows) if row["kind"] == "perfect (pixels)"]
    out["perfect_kept"] = sum(i in kept for i in perfect) / len(perfect)
    return out


def show(name: str, result: dict) -> None:
    precision = ", ".join(f"{shape} {value:.3f} ({result['kept'][shape]} kept; judged right before: "
                          f"{result['judged_right'][shape]:.2f})" for shape, value in result["precision"].items())
    recall = ", ".join(f"{kind} {value:.2f}" for kind, value in result["recall"].items())
    wrong = ", ".join(f"{shape} {value}" for shape, value in result["wrong_dropped"].items())
    print(f"\nEditVerifier, {name}:\n  precision among kept: {precision}\n  recall of planted bad edits: {recall}\n"
          f"  generated edits the judge calls wrong, dropped: {wrong}\n"
          f"  perfect pixel edits kept: {result['perfect_kept']:.2f}")


def test_edit_verifier_keeps_right_edits_and_drops_planted_bad_ones(tmp_path, trained_model):
    _, candidates = shapes_edit_rows(tmp_path, trained_model)
    entry = tmp_path / "data" / "candidates.jsonl"
    entry.write_text("".join(json.dumps(row) + "\n" for row in candidates), encoding="utf-8")
    clip = ClipServing(trained_model("shapes-clip"), device="cpu", torch_dtype="fp32", batch_size=64)
    verifier = EditVerifier(clip, **FIGURE_THRESHOLDS)
    summary = verifier.run(FileStorage(entry, cache_path=tmp_path / "verified").step())
    assert summary.errors == 0 and summary.rows_out + summary.rows_dropped == len(candidates)
    kept_rows, dropped_rows = rows_of(summary.output_path), rows_of(summary.dropped_path)
    scores = {row["id"]: row["edit_scores"] for row in kept_rows + dropped_rows}
    kept = {row["id"] for row in kept_rows}
    result = figures(candidates, kept)
    show(f"min_target_score={FIGURE_THRESHOLDS['min_target_score']}, other thresholds default", result)
    defaults = EditVerifier(clip)  # the same scores, judged by the defaults alone (no model call)
    show("defaults", figures(candidates, {i for i, s in scores.items() if not defaults.failures(s)}))
    directional = EditVerifier(clip, min_directional=0.7)  # the other check on the model's scale
    show("min_directional=0.7", figures(candidates, {i for i, s in scores.items() if not directional.failures(s)}))
    reasons = Counter(row[DROPPED_KEY].split(" (")[0].removeprefix("EditVerifier: ") for row in dropped_rows
                      if row["kind"] in PLANTED_KINDS[2:4])
    print("  reasons for no-change edits:", dict(reasons))

    assert result["precision"]["circle+triangle"] >= 0.9
    assert result["recall"]["all"] >= 0.9 and min(result["recall"].values()) >= 0.8
    assert result["perfect_kept"] >= 0.9
    assert all(row[DROPPED_KEY].startswith("EditVerifier: ") for row in dropped_rows)


def test_readme_example(tmp_path, monkeypatch):
    """The README's instruction-editing pipeline runs as written (8 sources instead of 96)."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Instructions and verification\n", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert "write_edit_sources(\"edit_data\", 96, seed=777)" in example
    monkeypatch.chdir(tmp_path)
    exec(example.replace("96, seed=777", "8, seed=777"), {})
    verified = tmp_path / "edit_cache" / "dataflow_cache_step_step3.jsonl"
    kept = rows_of(verified)
    dropped = rows_of(verified.with_name("dataflow_cache_step_step3.dropped.jsonl"))
    assert len(kept) + len(dropped) == 8 and kept
    for row in kept + dropped:
        assert row["instruction"] == f"make the {row['shape']} {row['target_colour']}"
        assert isinstance(row["edited_images"], list) and len(row["edit_scores"]) == 1
