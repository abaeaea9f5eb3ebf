"""The trained shapes-world models mean something, through the same servings as real models.

They ship with the package (float16, `dataflowmm/kit/weights/`) and are copied once per
test session through the `trained_model` fixture. Training them from scratch is
`make test-training` (tests/test_shapes_training.py).
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from click.testing import CliRunner

from dataflowmm.cli import main
from dataflowmm.kit import shapes_recipes, shapes_training, shipped_weights, trained_models
from dataflowmm.kit.shapes import (
    COLOUR_NAMES,
    HELD_OUT_SEED,
    SHAPES,
    ShapesWorld,
    all_captions,
    caption_for,
)
from dataflowmm.kit.shapes_recipes import read_training_report
from dataflowmm.kit.shapes_training import parse_caption
from dataflowmm.kit.train_shapes_captioner import build_shapes_captioner
from dataflowmm.kit.train_shapes_clip import build_shapes_clip
from dataflowmm.kit.train_shapes_sd import judge_generated
from dataflowmm.models.tiny import tiny_model_path, trained_model_path
from dataflowmm.serving import ClipServing, LocalCaptionServing, LocalImageGenServing

# Held-out images the trainings never saw (their own evaluation uses the first 500).
EVAL_START = 10_000


def _held_out(count: int):
    return ShapesWorld().samples(count, seed=HELD_OUT_SEED, start=EVAL_START)


# --------------------------------------------------------------------------- recipes and cache


def test_recipe_hash_changes_with_the_recipe_and_the_world():
    clip = shapes_recipes.recipe_hash("shapes-clip")
    assert len(clip) == 8 and shapes_recipes.recipe_hash("shapes-clip") == clip  # stable
    assert trained_models.folder_name("shapes-clip").startswith(f"shapes-clip-{clip}-")
    changed = dataclasses.replace(shapes_recipes.RECIPES["shapes-clip"], steps=5)
    assert shapes_recipes.recipe_hash("shapes-clip", changed) != clip
    other_world = dataclasses.replace(shapes_recipes.RECIPES["shapes-clip"],
                                      world=ShapesWorld(max_extent=0.5))
    assert shapes_recipes.recipe_hash("shapes-clip", other_world) != clip


def test_shapes_sd_hash_follows_the_clip_it_reuses(monkeypatch):
    before = shapes_recipes.recipe_hash("shapes-sd")
    recipes = dict(shapes_recipes.RECIPES)
    recipes["shapes-clip"] = dataclasses.replace(recipes["shapes-clip"], steps=5)
    monkeypatch.setattr(shapes_recipes, "RECIPES", recipes)
    assert shapes_recipes.recipe_hash("shapes-sd") != before


def test_trained_models_have_their_own_reference_prefix(tiny_models_dir):
    """tiny: names random-weight models only; a trained one named with it is an error
    naming the right reference (and the other way round)."""
    with pytest.raises(ValueError, match=r"'tiny:shapes-clip': shapes-clip is trained, use trained:shapes-clip"):
        ClipServing("tiny:shapes-clip")
    with pytest.raises(ValueError, match=r"'trained:tiny-sd': tiny-sd has random weights, use tiny:tiny-sd"):
        LocalImageGenServing("trained:tiny-sd")
    with pytest.raises(ValueError, match=r"'trained:nope'; choose from trained:shapes-clip, "):
        LocalCaptionServing("trained:nope")
    with pytest.raises(ValueError, match="use trained:shapes-sd"):
        tiny_model_path("shapes-sd", tiny_models_dir)
    with pytest.raises(ValueError, match="use tiny:tiny-clip"):
        trained_model_path("tiny-clip", tiny_models_dir)
    serving = ClipServing("trained:shapes-clip")  # nothing is copied before first use
    assert serving.config()["model"] == "trained:shapes-clip"
    assert serving.config()["model_folder"] == trained_models.folder_name("shapes-clip")


@pytest.mark.parametrize("name", list(shapes_recipes.RECIPES))
def test_shipped_weights_were_trained_with_the_code_recipe(name):
    """A recipe changed in the code without retraining fails here, naming the command."""
    mismatch = shipped_weights.recipe_mismatch(name)
    assert mismatch is None, mismatch
    report = shipped_weights.shipped_report(name)
    assert report["threads"] == shapes_recipes.TRAINING_THREADS
    assert report["shipped"]["dtype"] == "float16"
    assert report["shipped"]["weights_sha256"] == shipped_weights.weights_digest(shipped_weights.shipped_folder(name))


def test_a_changed_recipe_is_named_with_the_command_that_retrains(monkeypatch, tmp_path, capsys):
    quick = dataclasses.replace(shapes_recipes.RECIPES["shapes-captioner"], steps=3)
    monkeypatch.setattr(shapes_recipes, "RECIPES", {**shapes_recipes.RECIPES, "shapes-captioner": quick})
    monkeypatch.setattr(trained_models, "_WARNED", set())
    message = shipped_weights.recipe_mismatch("shapes-captioner")
    assert message.startswith("the shipped weights of trained:shapes-captioner were trained with recipe ")
    assert f"the code's recipe is {shapes_recipes.recipe_hash('shapes-captioner', quick)}" in message
    assert "run `dataflowmm models train shapes-captioner` to retrain and rewrite them in " in message
    # The shipped weights are still used, under their own recipe's name, with that warning.
    runs = dict(shapes_training.TRAINING_RUNS)
    folder = trained_model_path("shapes-captioner", tmp_path)
    assert folder.name == trained_models.folder_name("shapes-captioner")
    assert shapes_recipes.recipe_hash("shapes-captioner", quick) not in folder.name
    assert shapes_training.TRAINING_RUNS == runs
    assert f"[dataflowmm] warning: {message}" in capsys.readouterr().err


def test_models_train_retrains_ships_float16_and_reports_both(tmp_path, monkeypatch):
    """`dataflowmm models train NAME --out DIR` on a quick recipe: trained from scratch,
    written as float16, held-out figures of both copies printed and recorded."""
    from safetensors import safe_open

    quick = dataclasses.replace(shapes_recipes.RECIPES["shapes-captioner"], steps=3,
                                train_images=256, held_out_images=16)
    monkeypatch.setattr(shapes_recipes, "RECIPES", {**shapes_recipes.RECIPES, "shapes-captioner": quick})
    threads = torch.get_num_threads()
    runs = shapes_training.TRAINING_RUNS.get("shapes-captioner", 0)
    result = CliRunner().invoke(main, ["models", "train", "shapes-captioner", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert shapes_training.TRAINING_RUNS["shapes-captioner"] == runs + 1
    assert torch.get_num_threads() == threads  # the training's fixed count was restored
    report = read_training_report(tmp_path / "out")
    assert report["recipe"]["steps"] == 3
    assert report["recipe_hash"] == shapes_recipes.recipe_hash("shapes-captioner", quick)
    assert set(report["held_out"]) >= {"exact", "colour", "shape"}
    assert report["shipped"]["held_out"]["images"] == 16
    lines = result.stdout.splitlines()  # training progress goes to stderr
    assert lines[0].startswith(f"trained shapes-captioner (recipe {report['recipe_hash']}) in ")
    assert lines[1].startswith("  held-out, trained (float32):   exact ")
    assert lines[2].startswith("  held-out, shipped (float16):   exact ")
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as handle:
        dtypes = {handle.get_tensor(key).dtype for key in handle.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
    assert not (tmp_path / "out" / "dataflowmm_tiny_model.json").exists()
    assert shipped_weights.recipe_mismatch("shapes-captioner") is not None  # the package's copy untouched


@pytest.mark.parametrize("name", ["shapes-clip", "shapes-captioner"])
def test_training_twice_gives_bit_identical_weights(tmp_path, name):
    import hashlib

    build = {"shapes-clip": build_shapes_clip, "shapes-captioner": build_shapes_captioner}[name]
    quick = dataclasses.replace(shapes_recipes.RECIPES[name], steps=4, train_images=512, held_out_images=32)
    digests, reports = [], []
    for run in ("a", "b"):
        reports.append(build(tmp_path / run, recipe=quick))
        digests.append(hashlib.sha256((tmp_path / run / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert reports[0]["held_out"] == reports[1]["held_out"] and reports[0]["final_loss"] == reports[1]["final_loss"]


def test_first_use_copies_the_shipped_weights_as_float32_and_trains_nothing(tmp_path):
    from safetensors import safe_open

    runs = dict(shapes_training.TRAINING_RUNS)
    started = time.perf_counter()
    folder = trained_model_path("shapes-sd", tmp_path)
    copied = time.perf_counter() - started
    again = trained_model_path("shapes-sd", tmp_path)
    print(f"first use of shapes-sd: copied as float32 in {copied:.2f} s")
    assert again == folder and shapes_training.TRAINING_RUNS == runs
    shipped = shipped_weights.shipped_folder("shapes-sd")
    for path in sorted(shipped.rglob("*.safetensors")):
        local = folder / path.relative_to(shipped)
        with safe_open(path, framework="pt") as small, safe_open(local, framework="pt") as full:
            assert set(small.keys()) == set(full.keys())
            for key in small.keys():
                stored, loaded = small.get_tensor(key), full.get_tensor(key)
                if stored.is_floating_point():
                    assert stored.dtype == torch.float16 and loaded.dtype == torch.float32
                assert torch.equal(stored.to(loaded.dtype), loaded), key
    assert read_training_report(folder) == shipped_weights.shipped_report("shapes-sd")


def test_cli_lists_and_copies_the_trained_models(trained_model, tiny_models_dir):
    listed = CliRunner().invoke(main, ["models", "list"])
    assert listed.exit_code == 0
    lines = {line.split()[0]: line for line in listed.output.splitlines()}
    assert lines["trained:shapes-clip"].split()[1] == "trained" and lines["tiny:tiny-clip"].split()[1] == "random"
    assert trained_models.folder_name("shapes-clip") in lines["trained:shapes-clip"]
    folder = trained_model("shapes-clip")
    built = CliRunner().invoke(main, ["models", "tiny", str(tiny_models_dir), "--name", "shapes-clip"])
    assert built.exit_code == 0, built.output
    assert str(folder) in built.output
    assert "held-out: exact " in built.output


# --------------------------------------------------------------------------- meaning


def test_captioner_names_colour_and_shape(trained_model):
    folder = trained_model("shapes-captioner")
    report = read_training_report(folder)
    samples = _held_out(200)
    serving = LocalCaptionServing(folder, device="cpu", batch_size=50, max_new_tokens=12)
    captions = [candidates[0] for candidates in serving.caption([s.image for s in samples])]
    parsed = [parse_caption(caption) or {} for caption in captions]
    colour = sum(p.get("colour") == s.attributes["colour"] for p, s in zip(parsed, samples, strict=True)) / 200
    shape = sum(p.get("shape") == s.attributes["shape"] for p, s in zip(parsed, samples, strict=True)) / 200
    exact = sum(c == s.caption for c, s in zip(captions, samples, strict=True)) / 200
    print(f"shapes-captioner via LocalCaptionServing: exact {exact:.1%}, colour {colour:.1%}, "
          f"shape {shape:.1%}; training report {report['held_out']}")
    assert colour >= 0.95 and shape >= 0.95


def test_clip_zero_shot_and_swapped_colours(trained_model):
    folder = trained_model("shapes-clip")
    samples = _held_out(300)
    serving = ClipServing(folder, device="cpu", batch_size=128)
    images = serving.embed_images([s.image for s in samples])
    captions = all_captions()
    predicted = (images @ serving.embed_texts(captions).T).argmax(dim=1)
    accuracy = sum(captions[i] == s.caption for i, s in zip(predicted.tolist(), samples, strict=True)) / len(samples)

    swapped = [caption_for(s.attributes["shape"], s.attributes["background"], s.attributes["colour"])
               for s in samples]
    true_scores = serving.image_text_similarity([s.image for s in samples], [s.caption for s in samples])
    swapped_scores = serving.image_text_similarity([s.image for s in samples], swapped)
    print(f"shapes-clip via ClipServing: zero-shot {accuracy:.1%}; cosine true "
          f"{true_scores.mean():.2f}, colours swapped {swapped_scores.mean():.2f}")
    assert accuracy >= 0.95
    assert (true_scores > swapped_scores).float().mean() >= 0.98
    assert true_scores.mean() - swapped_scores.mean() > 0.2


def _sd_prompts() -> list[str]:
    return all_captions()  # every shape, colour and background pair once


def test_shapes_sd_text2image_follows_the_prompt(trained_model):
    folder = trained_model("shapes-sd")
    recipe = read_training_report(folder)["recipe"]
    serving = LocalImageGenServing(folder, task="text2image", device="cpu", batch_size=45,
                                   num_inference_steps=25, guidance_scale=recipe["guidance_scale"])
    prompts = _sd_prompts()
    images = [generated[0] for generated in serving.generate(prompts, seeds=list(range(len(prompts))))]
    assert all(image.size == (32, 32) for image in images)
    judged = judge_generated(images, prompts, trained_model("shapes-clip"))
    print(f"shapes-sd text2image ({len(prompts)} prompts, 25 steps): {judged}")
    assert judged["colour"] >= 0.85 and judged["shape"] >= 0.70


def test_shapes_sd_image2image_keeps_or_changes_what_the_prompt_says(trained_model):
    folder = trained_model("shapes-sd")
    recipe = read_training_report(folder)["recipe"]
    samples = _held_out(60)
    # Ask for the same picture with the shape in another colour (never the background's).
    recoloured = []
    for index, sample in enumerate(samples):
        options = [c for c in COLOUR_NAMES if c not in (sample.attributes["colour"], sample.attributes["background"])]
        recoloured.append(caption_for(sample.attributes["shape"], options[index % len(options)],
                                      sample.attributes["background"]))
    serving = LocalImageGenServing(folder, task="image2image", device="cpu", batch_size=30,
                                   num_inference_steps=25, guidance_scale=recipe["guidance_scale"],
                                   strength=0.8)
    outputs = serving.generate(recoloured, seeds=list(range(len(samples))),
                               images=[s.image for s in samples])
    images = [generated[0] for generated in outputs]
    assert all(image.size == (32, 32) for image in images)
    judged = judge_generated(images, recoloured, trained_model("shapes-clip"))
    print(f"shapes-sd image2image (strength 0.8, new shape colour): {judged}")
    assert judged["colour"] >= 0.6 and judged["background"] >= 0.8
    assert SHAPES and parse_caption(recoloured[0]) is not None


# Recorded figures are shares of 500 held-out images; another CPU sums floats in another
# order, which may flip a near tie: allow two images.
REPORT_TOLERANCE = 2 / 500


@pytest.mark.parametrize("name", ["shapes-clip", "shapes-captioner"])
def test_shipped_reports_hold_on_this_machine(trained_model, name):
    """The held-out figures recorded for the shipped copy are what it measures here
    (inference only), and clear the bars the training tests hold a fresh training to."""
    report = read_training_report(trained_model(name))
    measured = trained_models.evaluate(name, trained_model(name))
    recorded = report["shipped"]["held_out"]
    print(name, f"trained in {report['training_seconds']} s;", "recorded", json.dumps(recorded),
          "measured here", json.dumps(measured))
    assert measured.keys() == recorded.keys() and measured["images"] == recorded["images"]
    for key, value in recorded.items():
        assert abs(measured[key] - value) <= REPORT_TOLERANCE, (key, measured[key], value)
    bars = {"shapes-clip": ("exact",), "shapes-captioner": ("colour", "shape")}[name]
    assert all(measured[key] >= 0.95 for key in bars)


# --------------------------------------------------------------------------- quality operators


def _shapes_rows(folder, count: int, seed: int = HELD_OUT_SEED, start: int = EVAL_START):
    """Held-out shapes images as PNG files and rows {"id", "images", "text", attributes}."""
    from dataflowmm.io.images import save_png

    rows = []
    for sample in ShapesWorld().samples(count, seed=seed, start=start):
        path = f"images/{len(rows):06d}.png"
        save_png(sample.image, folder / path)
        rows.append({"id": len(rows), "images": [path], "text": sample.caption, **sample.attributes})
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_clip_score_filter_removes_captions_with_the_wrong_colour(tmp_path, trained_model):
    from dataflowmm import FileStorage
    from dataflowmm.operators import ClipScoreEvaluator, ClipScoreFilter

    rows = _shapes_rows(tmp_path / "data", 200)
    swapped = set(range(0, 200, 4))  # a quarter: the shape's colour named wrong
    for index in swapped:
        row = rows[index]
        wrong = [c for c in COLOUR_NAMES if c not in (row["colour"], row["background"])][index % 4]
        row["text"] = caption_for(row["shape"], wrong, row["background"])
    storage = FileStorage(_write_jsonl(tmp_path / "data" / "shapes.jsonl", rows), cache_path=tmp_path / "cache")
    serving = ClipServing(trained_model("shapes-clip"), device="cpu", batch_size=100)
    ClipScoreEvaluator(serving).run(storage.step())
    summary = ClipScoreFilter(serving, min_score=0.75, keep_dropped=True).run(storage.step())
    kept = {json.loads(line)["id"] for line in open(summary.output_path)}
    dropped = set(range(200)) - kept
    precision = len(dropped & swapped) / max(1, len(dropped))
    recall = len(dropped & swapped) / len(swapped)
    scores = [json.loads(line)["clip_score"][0] for line in open(summary.output_path)]
    print(f"ClipScoreFilter(min_score=0.75) on 200 shapes rows, 50 with a wrong colour: dropped "
          f"{len(dropped)}, precision {precision:.1%}, recall {recall:.1%}; kept scores "
          f"{min(scores):.2f}..{max(scores):.2f}")
    assert precision >= 0.95 and recall >= 0.95
    assert summary.rows_dropped == len(dropped) and f"{len(dropped)} rows dropped" in summary.line()


def test_deduplicator_finds_planted_near_duplicates_only(tmp_path, trained_model):
    import io

    from PIL import Image

    from dataflowmm import FileStorage
    from dataflowmm.io.images import save_png
    from dataflowmm.operators import ImageDeduplicator

    folder = tmp_path / "data"
    # 90 distinct images: every caption once (the same caption at another place and size
    # is a near duplicate for shapes-clip, which was trained to see only the caption).
    samples, seen = [], set()
    for sample in ShapesWorld().samples(2000, seed=HELD_OUT_SEED, start=EVAL_START):
        if sample.caption not in seen:
            seen.add(sample.caption)
            samples.append(sample)
    rows = []
    for index, sample in enumerate(samples):
        save_png(sample.image, folder / f"images/{index}.png")
        rows.append({"id": index, "images": [f"images/{index}.png"], "text": sample.caption})
    planted = {}
    for number, index in enumerate(range(0, 90, 3)):
        image, kind = samples[index].image, ("resized", "jpeg", "png")[number % 3]
        path = folder / f"images/copy-{index}.{'jpg' if kind == 'jpeg' else 'png'}"
        if kind == "resized":  # a few pixels larger
            save_png(image.resize((35, 35), Image.Resampling.BICUBIC), path)
        elif kind == "jpeg":  # re-encoded, lossy
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=95, subsampling=0)
            path.write_bytes(buffer.getvalue())
        else:  # re-encoded losslessly: the same pixels
            image.save(path, "PNG", compress_level=1)
        planted[len(rows)] = (index, kind)
        rows.append({"id": len(rows), "images": [str(path.relative_to(folder))], "text": "copy"})
    storage = FileStorage(_write_jsonl(folder / "rows.jsonl", rows), cache_path=tmp_path / "cache")
    serving = ClipServing(trained_model("shapes-clip"), device="cpu", batch_size=64)
    summary = ImageDeduplicator(serving, similarity_threshold=0.97, keep_dropped=True).run(storage.step())
    kept = [json.loads(line)["id"] for line in open(summary.output_path)]
    side = [json.loads(line) for line in open(summary.output_path.replace(".jsonl", ".dropped.jsonl"))]
    reasons = {row["id"]: row["dropped_by"] for row in side}
    print(f"ImageDeduplicator(0.97): {len(kept)} kept of {len(rows)}; e.g. {list(reasons.values())[:3]}")
    assert kept == list(range(90))  # every distinct image, none of the copies
    for row_id, (original, kind) in planted.items():
        expected = "exact duplicate" if kind == "png" else "near duplicate"
        assert reasons[row_id].startswith(f"ImageDeduplicator: {expected} of row {original}"), (kind, reasons[row_id])
