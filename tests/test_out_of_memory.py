"""A batch that runs out of accelerator memory is split and retried down to one item; the size
that fit is used for the rest of the step and recorded in its manifest; an item that does not
fit alone fails its row transiently, and the next run retries it. Fault-injecting servings
raise torch's OutOfMemoryError on CPU: fake pipelines, and the tiny CLIP model."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.checks import ItemOutOfMemory
from dataflowmm.operators import ClipScoreEvaluator, PromptedImageGenerator
from dataflowmm.serving import ClipServing, GenerationFailed, LocalImageGenServing
from dataflowmm.serving.fitting import run_fitting


def out_of_memory() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")


@pytest.fixture
def freed(monkeypatch) -> list[int]:
    """Counts the memory frees between tries (a real one collects garbage: slow in a test)."""
    calls: list[int] = []
    monkeypatch.setattr("dataflowmm.serving.device.free_memory", lambda: calls.append(1))
    return calls


# -- the shared mechanism --------------------------------------------------------------------

def test_a_batch_is_halved_until_it_fits_and_the_size_is_kept(freed):
    serving = SimpleNamespace(batch_size=8, model="fake", fitted_batch_size=None)
    tried: list[int] = []

    def call(piece):
        tried.append(len(piece))
        if len(piece) > 3:
            raise out_of_memory()
        return [item * 10 for item in piece]

    assert run_fitting(serving, list(range(10)), call) == [item * 10 for item in range(10)]
    assert tried == [8, 4, 2, 2, 2, 2, 2] and serving.fitted_batch_size == 2 and len(freed) == 2
    tried.clear()
    assert run_fitting(serving, [1, 2, 3], call) == [10, 20, 30] and tried == [2, 1]  # the size that fit, from now on


def test_an_item_that_does_not_fit_alone_raises_or_fails_in_its_place(freed):
    serving = SimpleNamespace(batch_size=4, model="fake", fitted_batch_size=None)

    def call(piece):
        if "huge" in piece:
            raise out_of_memory()
        if "bad" in piece:
            raise ValueError("the processor rejects this image")
        return [item.upper() for item in piece]

    with pytest.raises(ItemOutOfMemory, match=r"^fake: out of memory for one item alone \(OutOfMemoryError: CUDA"):
        run_fitting(serving, ["a", "huge", "b"], call)
    serving.fitted_batch_size = None
    answers = run_fitting(serving, ["a", "huge", "b", "bad", "c"], call, failures_in_place=True,
                          item_errors=(ValueError,))
    assert [answers[index] for index in (0, 2, 4)] == ["A", "B", "C"]
    assert isinstance(answers[1], GenerationFailed) and answers[1].transient
    assert str(answers[1]).startswith("fake: out of memory for one item alone (OutOfMemoryError: CUDA")
    assert isinstance(answers[3], GenerationFailed) and not answers[3].transient
    assert str(answers[3]) == "fake: ValueError: the processor rejects this image"
    with pytest.raises(KeyError):  # any other error is the caller's
        run_fitting(serving, ["a"], lambda piece: {}["x"], failures_in_place=True, item_errors=(ValueError,))


# -- CLIP on the tiny model ------------------------------------------------------------------

class TightClip(ClipServing):
    """ClipServing whose forward passes run out of memory above `fits` items."""

    fits = 2

    def load(self) -> None:
        if self.loaded:
            return
        super().load()
        for replica in self._replicas:
            for method in ("get_image_features", "get_text_features"):
                setattr(replica.model, method, self._tight(getattr(replica.model, method)))

    def _tight(self, forward):
        def tight(*args, **kwargs):
            inputs = next(value for value in [*args, *kwargs.values()] if isinstance(value, torch.Tensor))
            if inputs.shape[0] > self.fits:
                raise out_of_memory()
            return forward(*args, **kwargs)
        return tight


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 255, (32, 24 + 4 * i, 3), dtype=np.uint8)) for i in range(count)]


def test_clip_embeddings_after_splitting_match_the_batch_size_that_fits(tiny_model):
    model = tiny_model("tiny-clip")
    tight, fitting = TightClip(model, batch_size=4), ClipServing(model, batch_size=2)
    images, texts = _images(7), [f"a shape number {i}" for i in range(7)]
    # The batch-size rule: another batch size moves floats by rounding only.
    assert torch.allclose(tight.embed_images(images), fitting.embed_images(images), atol=1e-5)
    assert tight.fitted_batch_size == 2 and tight.config() == ClipServing(model, batch_size=5).config() | {
        "serving": "TightClip"}
    assert torch.allclose(tight.embed_texts(texts), fitting.embed_texts(texts), atol=1e-5)
    tight.cleanup()
    assert tight.fitted_batch_size is None


# -- steps: the manifest, a row that never fits, the retry -----------------------------------

class TightPipeline:
    """A fake diffusers pipeline: a solid colour per generator seed; runs out of memory above
    `fits` prompts per call, and for any prompt containing "huge" unless `huge_fits`."""

    def __init__(self, fits: int, huge_fits: bool):
        self.fits, self.huge_fits = fits, huge_fits
        self.calls: list[int] = []

    def __call__(self, prompt, num_images_per_prompt=1, generator=None, output_type="pil"):
        if len(prompt) > self.fits or (not self.huge_fits and any("huge" in text for text in prompt)):
            raise out_of_memory()
        self.calls.append(len(prompt))
        images = [Image.new("RGB", (4, 4), tuple(g.initial_seed().to_bytes(8, "big")[:3])) for g in generator]
        return SimpleNamespace(images=images, nsfw_content_detected=None)


class TightImageGen(LocalImageGenServing):
    """LocalImageGenServing on `TightPipeline`s (no model is loaded)."""

    def __init__(self, *args, fits: int = 2, huge_fits: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fits, self.huge_fits = fits, huge_fits

    def _load_replica(self, device: str) -> TightPipeline:
        return TightPipeline(self.fits, self.huge_fits)


PROMPTS = ["a fox", "a cat", "a dog", "a sun", "a car", "a hat", "a cup"]


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts))
    return path


def generate(entry: Path, cache: Path, serving: LocalImageGenServing, runner=None):
    operator = PromptedImageGenerator(serving, save_interval=4)
    summary = operator.run(FileStorage(entry, cache_path=cache, runner=runner).step(), input_prompt_key="prompt")
    rows = [json.loads(line) for line in Path(summary.output_path).read_text().splitlines()]
    return summary, rows, _manifest(cache)


def _manifest(cache: Path) -> dict:
    return json.loads(next(cache.glob("*.manifest.json")).read_text())


def image_bytes(cache: Path, rows: list[dict]) -> list[list[bytes]]:
    return [[(cache / path).read_bytes() for path in row["images"]] for row in rows]


def test_a_step_runs_at_the_size_that_fit_and_records_it(tiny_model, tmp_path, freed):
    entry = write_prompts(tmp_path / "data" / "prompts.jsonl", PROMPTS)
    model = str(tiny_model("tiny-sd"))
    tight = TightImageGen(model, batch_size=4, fits=2, device=["cpu", "cpu"])
    summary, rows, manifest = generate(entry, tmp_path / "tight", tight)
    _, fitting_rows, fitting_manifest = generate(entry, tmp_path / "fits", TightImageGen(model, batch_size=2))
    assert summary.errors == 0 and manifest["fitted_batch_size"] == {"serving": 2}
    assert "fitted_batch_size" not in fitting_manifest
    assert image_bytes(tmp_path / "tight", rows) == image_bytes(tmp_path / "fits", fitting_rows)
    assert [len(rows) for rows in [r["images"] for r in rows]] == [1] * len(PROMPTS)
    assert sorted(size for pipeline in tight._pipelines for size in pipeline.calls) == [1] + [2] * 3


def test_a_row_that_does_not_fit_alone_fails_transiently_and_the_next_run_retries_it(tiny_model, tmp_path, freed):
    prompts = [*PROMPTS[:2], "a huge mural", *PROMPTS[2:5]]
    entry = write_prompts(tmp_path / "data" / "prompts.jsonl", prompts)
    model, cache = str(tiny_model("tiny-sd")), tmp_path / "cache"
    summary, rows, manifest = generate(entry, cache, TightImageGen(model, batch_size=4, fits=4))
    assert summary.errors == 1 and manifest["transient_rows"] == 1
    assert rows[2]["images"] == [] and rows[2]["error"] == (
        f"PromptedImageGenerator: {model}: out of memory for one item alone (OutOfMemoryError: CUDA out of memory. "
        "Tried to allocate 9.00 GiB)")
    assert all(row["error"] is None and len(row["images"]) == 1 for i, row in enumerate(rows) if i != 2)
    assert manifest["fitted_batch_size"] == {"serving": 1}  # the huge prompt's batch went down to one
    kept = (cache / Path(summary.output_path).name).read_text().splitlines()
    retried, rows_after, manifest_after = generate(entry, cache, TightImageGen(model, batch_size=4, fits=4,
                                                                              huge_fits=True))
    assert retried.rows_retried == 1 and retried.errors == 0 and manifest_after["transient_rows"] == 0
    assert rows_after[2]["error"] is None and len(rows_after[2]["images"]) == 1
    after = Path(retried.output_path).read_text().splitlines()
    assert [line for i, line in enumerate(after) if i != 2] == [line for i, line in enumerate(kept) if i != 2]


def test_strict_raises_for_a_row_that_does_not_fit_alone(tiny_model, tmp_path, freed):
    entry = write_prompts(tmp_path / "data" / "prompts.jsonl", ["a fox", "a huge mural"])
    operator = PromptedImageGenerator(TightImageGen(str(tiny_model("tiny-sd")), batch_size=2), strict=True)
    with pytest.raises(ValueError, match=r"prompts\.jsonl: row 1: .* out of memory for one item alone"):
        operator.run(FileStorage(entry, cache_path=tmp_path / "cache").step(), input_prompt_key="prompt")


def test_out_of_memory_outside_the_fitting_of_a_batch_still_stops_the_step(tiny_model, tmp_path, freed):
    """A model too big to load is no row's fault: the step fails as before, no row is blamed."""

    class TooBig(TightImageGen):
        def _load_replica(self, device):
            raise out_of_memory()

    entry = write_prompts(tmp_path / "data" / "prompts.jsonl", PROMPTS[:3])
    with pytest.raises(torch.OutOfMemoryError):
        generate(entry, tmp_path / "cache", TooBig(str(tiny_model("tiny-sd")), batch_size=2))


@pytest.mark.slow  # ~20 s: a Ray actor imports torch and transformers and loads the tiny CLIP
def test_ray_actors_report_the_size_that_fit_in_the_manifest(tmp_path, ray_cluster, tiny_model):
    from dataflowmm.execution.ray_runner import RayRunner

    pictures = tmp_path / "data" / "pics"
    pictures.mkdir(parents=True)
    for index, image in enumerate(_images(5)):
        image.save(pictures / f"{index}.png")
    entry = tmp_path / "data" / "rows.jsonl"
    entry.write_text("".join(json.dumps({"images": [f"pics/{i}.png"], "text": f"shape {i}"}) + "\n"
                             for i in range(5)))
    model = str(tiny_model("tiny-clip"))
    outputs = []
    for name, runner in (("local", None), ("ray", RayRunner(replicas=1))):
        operator = ClipScoreEvaluator(TightClip(model, batch_size=4), save_interval=4)
        summary = operator.run(FileStorage(entry, cache_path=tmp_path / name, runner=runner).step())
        manifest = _manifest(tmp_path / name)
        assert summary.errors == 0 and manifest["fitted_batch_size"] == {"serving": 2}
        outputs.append([json.loads(line)["clip_score"] for line in Path(summary.output_path).read_text().splitlines()])
    assert np.allclose(outputs[0], outputs[1], atol=1e-4)  # scores are written rounded to 4 decimals
