"""PromptedImageGenerator end to end on tiny models through FileStorage."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.operators import PromptedImageGenerator, RowError
from dataflowmm.serving import LocalImageGenServing

EXAMPLE = Path(__file__).resolve().parent.parent / "example_data" / "text_to_image" / "prompts.jsonl"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def tiny_sd_serving(tiny_model, **overrides):
    settings = dict(batch_size=2, num_inference_steps=2, height=32, width=32)
    settings.update(overrides)
    return LocalImageGenServing(str(tiny_model("tiny-sd")), **settings)


def generate(entry, cache, serving, save_interval=50, **run_kwargs):
    storage = FileStorage(entry, cache_path=cache)
    summary = PromptedImageGenerator(serving, save_interval=save_interval).run(storage.step(), **run_kwargs)
    return summary, read_jsonl(summary.output_path)


def load_pixels(cache, rel_path):
    return np.asarray(Image.open(Path(cache) / rel_path), dtype=np.int16)


def test_example_prompts_on_tiny_sd(tmp_path, tiny_model):
    serving = tiny_sd_serving(tiny_model, num_images_per_prompt=2)
    summary, rows = generate(EXAMPLE, tmp_path / "cache", serving)
    inputs = read_jsonl(EXAMPLE)
    assert len(rows) == len(inputs) and [r["id"] for r in rows] == [r["id"] for r in inputs]
    assert summary.errors == 0 and all(r["error"] is None for r in rows)
    multi_turn = next(r for r in rows if r["id"] == "t2i-007")
    assert len(multi_turn["images"]) == 4  # two user turns x two images each
    assert all(len(r["images"]) == 2 for r in rows if r["id"] != "t2i-007")
    assert summary.images_written == sum(len(r["images"]) for r in rows) == 18
    paths = [p for r in rows for p in r["images"]]
    assert len(set(paths)) == len(paths)
    for path in paths:
        assert path.isascii() and not path.startswith("/")  # named by row identity, relative
        with Image.open(tmp_path / "cache" / path) as image:
            assert image.format == "PNG" and image.size == (32, 32)


def test_tiny_flux_end_to_end(tmp_path, tiny_model):
    entry = write_jsonl(tmp_path / "in.jsonl", [{"conversations": [{"role": "user", "content": p}]}
                                                  for p in ("a cat", "un chien", "a bird")])
    serving = LocalImageGenServing(str(tiny_model("tiny-flux")), batch_size=2, num_inference_steps=2,
                                   height=32, width=32)
    summary, rows = generate(entry, tmp_path / "cache", serving)
    assert summary.images_written == 3 and [len(r["images"]) for r in rows] == [1, 1, 1]
    with Image.open(tmp_path / "cache" / rows[0]["images"][0]) as image:
        assert image.size == (32, 32)


def test_bad_rows_are_kept_with_their_error(tmp_path, tiny_model):
    rows_in = [
        {"conversations": [{"role": "user", "content": "a house"}]},
        {"conversations": [{"role": "user", "content": "   "}]},
        {"other": 1},
        {"conversations": [{"role": "user", "content": 42}]},
        {"conversations": "not a list"},
        {"conversations": [{"role": "assistant", "content": "no user turn"}]},
        {"conversations": [{"role": "user", "content": "a tree"}]},
    ]
    summary, rows = generate(write_jsonl(tmp_path / "in.jsonl", rows_in), tmp_path / "cache",
                             tiny_sd_serving(tiny_model))
    assert len(rows) == len(rows_in) and summary.errors == 5 and summary.images_written == 2
    assert [len(r["images"]) for r in rows] == [1, 0, 0, 0, 0, 0, 1]
    errors = [r["error"] for r in rows]
    assert errors[0] is None and errors[6] is None
    assert "'conversations': no user turn with text" in errors[1]
    assert "'conversations': missing" in errors[2]
    assert "turn 0 content is int, expected a string" in errors[3]
    assert "expected a list of turns" in errors[4]
    assert rows[2]["other"] == 1  # the rest of a failed row is kept


def test_strict_mode_raises_on_first_bad_row(tmp_path, tiny_model):
    entry = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "ok"}, {"prompt": ""}])
    storage = FileStorage(entry, cache_path=tmp_path / "cache")
    generator = PromptedImageGenerator(tiny_sd_serving(tiny_model), strict=True)
    with pytest.raises(RowError, match=r"in\.jsonl: row 1: key 'prompt': empty prompt"):
        generator.run(storage.step(), input_prompt_key="prompt")


def test_plain_prompt_column_and_duplicate_prompts(tmp_path, tiny_model):
    entry = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a lamp"}, {"prompt": "a lamp"}, {"prompt": "x" * 500}])
    _, rows = generate(entry, tmp_path / "cache", tiny_sd_serving(tiny_model), input_prompt_key="prompt",
                       output_image_key="pictures")
    paths = [r["pictures"][0] for r in rows]
    assert len(set(paths)) == 3 and all(len(Path(p).name) < 40 for p in paths)
    # same prompt, different rows: different seeds, different pictures
    assert np.abs(load_pixels(tmp_path / "cache", paths[0]) - load_pixels(tmp_path / "cache", paths[1])).max() > 0


def test_missing_key_fails_before_the_model_loads(tmp_path):
    entry = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    serving = LocalImageGenServing("nobody/no-such-model-anywhere")  # would fail if loaded
    storage = FileStorage(entry, cache_path=tmp_path / "cache")
    with pytest.raises(KeyError, match="no row has key 'conversations'"):
        PromptedImageGenerator(serving).run(storage.step())


def test_save_interval_does_not_change_bytes_and_batch_size_only_noise(tmp_path, tiny_model):
    entry = write_jsonl(tmp_path / "in.jsonl", [{"prompt": f"scene {i}"} for i in range(5)])

    def images(cache, batch_size, save_interval):
        _, rows = generate(entry, cache, tiny_sd_serving(tiny_model, batch_size=batch_size),
                           save_interval=save_interval, input_prompt_key="prompt")
        return [r["images"][0] for r in rows]

    reference = images(tmp_path / "a", 2, 1)
    same_batches = images(tmp_path / "b", 2, 3)
    assert reference == same_batches  # names depend on rows only
    for path in reference:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
    images(tmp_path / "c", 3, 2)
    for path in reference:
        difference = np.abs(load_pixels(tmp_path / "a", path) - load_pixels(tmp_path / "c", path))
        assert difference.max() <= 2 and difference.mean() < 0.05


def test_rerun_reuses_and_changed_setting_recomputes(tmp_path, tiny_model):
    entry = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    first, _ = generate(entry, tmp_path / "cache", tiny_sd_serving(tiny_model), input_prompt_key="prompt")
    again, _ = generate(entry, tmp_path / "cache", tiny_sd_serving(tiny_model), input_prompt_key="prompt")
    changed, _ = generate(entry, tmp_path / "cache", tiny_sd_serving(tiny_model, num_inference_steps=3),
                          input_prompt_key="prompt")
    assert not first.reused and again.reused and not changed.reused
    assert changed.images_written == 2


def test_images_in_rows_equal_the_files_pixel_for_pixel(tmp_path, tiny_model):
    from dataflowmm.io.images import image_from_str

    serving = tiny_sd_serving(tiny_model)
    entry = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a red circle"}, {"prompt": ""}])
    _, as_files = generate(entry, tmp_path / "files", serving, input_prompt_key="prompt")
    storage = FileStorage(entry, cache_path=tmp_path / "rows")
    summary = PromptedImageGenerator(serving, images_in_rows=True).run(storage.step(), input_prompt_key="prompt")
    in_rows = read_jsonl(summary.output_path)
    assert in_rows[0]["images"][0].startswith("iVBORw0KGgo") and in_rows[1]["images"] == []
    assert np.array_equal(np.asarray(image_from_str(in_rows[0]["images"][0]), dtype=np.int16),
                          load_pixels(tmp_path / "files", as_files[0]["images"][0]))
    assert not list((tmp_path / "rows").rglob("*.png"))
