"""Golden files: each built-in operator's cache file and images, pinned across refactors.

One small pipeline per operator on tiny models, with a failed row and a save_interval that
does not divide the row count. How outputs are compared so that the goldens hold on any CPU
(framework text exactly, model outputs within measured tolerances) is in `golden_files.py`.
The other operators' goldens are in `test_golden_operators.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from golden_files import check_golden
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.operators import ImageCaptioner, ImageDiffusionAugmenter, PromptedImageGenerator
from dataflowmm.serving import LocalCaptionServing, LocalImageGenServing


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def make_pictures(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(["a", "b", "c"]):
        pixels = np.random.default_rng(seed).integers(0, 255, (24, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")


def test_prompted_image_generator_golden(tmp_path, tiny_model):
    entry = write_jsonl(tmp_path / "data" / "prompts.jsonl", [
        {"id": 0, "conversations": [{"role": "user", "content": "a red circle"}]},
        {"id": 1, "conversations": [{"role": "user", "content": "   "}]},  # no prompt: error row
        {"id": 2, "conversations": [{"role": "user", "content": "a cat"},
                                    {"role": "assistant", "content": "ok"},
                                    {"role": "user", "content": "now a dog, 犬"}]},
        {"id": 3, "conversations": [{"from": "human", "value": "a blue square"}]},
        {"id": 4, "conversations": [{"role": "user", "content": "a red circle"}]},  # duplicate prompt
    ])
    serving = LocalImageGenServing(str(tiny_model("tiny-sd")), batch_size=2, num_images_per_prompt=2,
                                   num_inference_steps=2, height=32, width=32, torch_dtype="fp32")
    storage = FileStorage(entry, cache_path=tmp_path / "cache")
    summary = PromptedImageGenerator(serving, save_interval=3, seed=7).run(storage.step())
    assert summary.errors == 1 and summary.images_written == 10
    assert len(check_golden("prompted_image_generator", summary.output_path, tmp_path,
                            image_keys=["images"])["images"]) == 10


def test_image_captioner_golden(tmp_path, tiny_model):
    make_pictures(tmp_path / "data" / "pics")
    entry = write_jsonl(tmp_path / "data" / "rows.jsonl", [
        {"images": ["pics/a.png"], "text": "<__dj__image> a picture <|__dj__eoc|>"},
        {"images": ["pics/missing.png"], "text": "gone"},  # error row
        {"images": ["pics/b.png", "pics/c.png"], "text": "two pictures"},
        {"images": [], "text": "no image"},
        {"images": ["pics/c.png"], "text": "the third"},
    ])
    serving = LocalCaptionServing(str(tiny_model("tiny-blip")), caption_num=2, max_new_tokens=6,
                                  batch_size=2, torch_dtype="fp32")
    captioner = ImageCaptioner(serving, caption_num=2, keep_candidate_mode="all",
                               keep_original_sample=True, batch_size=2, save_interval=3, seed=3)
    summary = captioner.run(FileStorage(entry, cache_path=tmp_path / "cache").step())
    assert summary.errors == 1
    check_golden("image_captioner", summary.output_path, tmp_path, model_text_keys=["text"])


def test_image_diffusion_augmenter_golden(tmp_path, tiny_model):
    make_pictures(tmp_path / "data" / "pics")
    entry = write_jsonl(tmp_path / "data" / "rows.jsonl", [
        {"images": ["pics/a.png"], "caption": "a noisy picture"},
        {"images": ["pics/b.png", "pics/missing.png"], "caption": "broken"},  # error row
        {"images": ["pics/b.png", "pics/c.png"], "caption": ["first", "second"]},
        {"images": [], "caption": "nothing"},
    ])
    serving = LocalImageGenServing(str(tiny_model("tiny-sd")), task="image2image", batch_size=2,
                                   num_inference_steps=3, torch_dtype="fp32")
    augmenter = ImageDiffusionAugmenter(serving, aug_num=2, caption_key="caption", image_size=32,
                                        keep_candidate_mode="random_any", candidate_num=3,
                                        save_interval=3, seed=5)
    summary = augmenter.run(FileStorage(entry, cache_path=tmp_path / "cache").step(),
                            output_image_key="generated")
    assert summary.errors == 1
    assert len(check_golden("image_diffusion_augmenter", summary.output_path, tmp_path,
                            image_keys=["generated"])["images"]) == 6
