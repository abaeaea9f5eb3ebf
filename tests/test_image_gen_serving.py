"""LocalImageGenServing on the tiny SD and FLUX models (CPU), plus fake pipelines for the
safety-checker retries and the multi-replica path."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dataflowmm.seeds import derive_seed
from dataflowmm.serving.image_gen import LocalImageGenServing

PROMPTS = ["a cat", "a dog in the park", "a red car", "a bowl of fruit"]
SEEDS = [11, 22, 33, 44]


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _bytes(outputs: list[list[Image.Image]]) -> list[list[bytes]]:
    return [[image.tobytes() for image in images] for images in outputs]


@pytest.fixture(scope="module")
def sd_serving(tiny_model):
    serving = LocalImageGenServing(
        tiny_model("tiny-sd"), batch_size=3, num_images_per_prompt=2, num_inference_steps=2
    )
    yield serving
    serving.cleanup()


# ------------------------------------------------------------- constructor
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "inpaint"}, "task"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"strength": 1.5}, "strength"),
        ({"torch_dtype": "fp8"}, "torch_dtype"),
        ({"max_safety_retries": -1}, "max_safety_retries"),
        ({"compile": "fast"}, "compile"),
        ({"compile": 1}, "compile"),
        ({"strength": True}, "strength"),
        ({"task": "edit", "image_guidance_scale": -1}, "image_guidance_scale"),
        ({"image_guidance_scale": 1.5}, "task 'edit'"),  # text2image has no input image
        ({"true_cfg_scale": "4"}, "true_cfg_scale"),
        ({"negative_prompt": ["x"]}, "negative_prompt"),
    ],
)
def test_bad_arguments_fail_in_the_constructor(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalImageGenServing(tiny_model("tiny-sd"), **kwargs)


@pytest.mark.parametrize(
    "model", ["/no/such/model", "./missing-model", "~/missing-dataflowmm-model"]
)
def test_missing_local_folder_is_named(model):
    with pytest.raises(FileNotFoundError, match="missing|no/such"):
        LocalImageGenServing(model)


def test_a_file_is_not_a_model_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LocalImageGenServing(path)


def test_constructor_does_not_load(monkeypatch, tiny_model):
    def fail(*args, **kwargs):
        raise AssertionError("loaded in the constructor")

    monkeypatch.setattr(LocalImageGenServing, "_load_replica", fail)
    serving = LocalImageGenServing(tiny_model("tiny-sd"), task="image2image")
    assert not serving.loaded
    with pytest.raises(ValueError, match="seeds"):
        serving.generate(["a", "b"], [1])
    with pytest.raises(ValueError, match="input image"):
        serving.generate(["a"], [1])
    assert serving.generate([], []) == []
    assert not serving.loaded


def test_unloadable_model_gives_an_actionable_error(tmp_path):
    # A folder that is no pipeline (a hub id would need the network, or HF_HUB_OFFLINE set
    # before huggingface_hub is imported, to fail fast).
    (tmp_path / "not-a-pipeline").mkdir()
    serving = LocalImageGenServing(tmp_path / "not-a-pipeline")
    with pytest.raises(RuntimeError, match=r"(?s)not-a-pipeline.*dataflowmm models tiny"):
        serving.load()
    assert not serving.loaded


def test_config_is_json_and_tracks_outputs(tiny_model):
    import json

    base = LocalImageGenServing(tiny_model("tiny-sd"), num_inference_steps=2)
    config = base.config()
    assert json.loads(json.dumps(config)) == config
    assert config["model"] == str(tiny_model("tiny-sd")) and config["task"] == "text2image"
    assert "strength" not in config  # only image2image uses it
    other_batch = LocalImageGenServing(tiny_model("tiny-sd"), num_inference_steps=2, batch_size=9)
    assert other_batch.config() == config
    other_steps = LocalImageGenServing(tiny_model("tiny-sd"), num_inference_steps=3)
    assert other_steps.config() != config
    image2image = LocalImageGenServing(tiny_model("tiny-sd"), task="image2image", strength=0.5)
    assert image2image.config()["strength"] == 0.5


# ---------------------------------------------------------- GPU settings
@pytest.fixture
def compiled_modules(monkeypatch) -> list[torch.nn.Module]:
    """Modules whose in-place `compile()` was called; recorded, not compiled (torch.compile's
    first use costs seconds of imports, and a CPU compile needs a C++ compiler)."""
    compiled: list[torch.nn.Module] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, *a, **k: compiled.append(module))
    return compiled


def test_gpu_settings_are_applied_at_load_and_only_vae_tiling_enters_config(tiny_model, compiled_modules):
    plain = LocalImageGenServing(tiny_model("tiny-sd"), num_inference_steps=2)
    # compile and channels_last change pixels by rounding only, like batch_size: not in config
    faster = LocalImageGenServing(tiny_model("tiny-sd"), num_inference_steps=2, compile=True,
                                  channels_last=True)
    assert faster.config() == plain.config()
    tiled = LocalImageGenServing(tiny_model("tiny-sd"), num_inference_steps=2, vae_tiling=True)
    assert tiled.config() == {**plain.config(), "vae_tiling": True}

    serving = LocalImageGenServing(tiny_model("tiny-sd"), compile=True, channels_last=True,
                                   vae_tiling=True, device="cpu")
    serving.load()
    pipeline = serving._pipelines[0]
    assert compiled_modules == [pipeline.unet]  # the whole UNet, in place: its type and config stay
    assert pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipeline.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipeline.vae.use_tiling
    serving.cleanup()


def test_regional_compile_compiles_each_repeated_block_only(tiny_model, compiled_modules):
    serving = LocalImageGenServing(tiny_model("tiny-flux"), compile="regional", device="cpu")
    serving.load()
    transformer = serving._pipelines[0].transformer
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert blocks and compiled_modules == blocks
    serving.cleanup()


# --------------------------------------------------------------- tiny SD
def test_text2image_counts_order_size_and_determinism(sd_serving):
    first = sd_serving.generate(PROMPTS, SEEDS)
    assert len(first) == len(PROMPTS)
    for images in first:
        assert len(images) == 2
        for image in images:
            assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    again = sd_serving.generate(PROMPTS, SEEDS)
    assert _bytes(again) == _bytes(first)
    # Order and batch independence: prompt 2 alone gives (nearly) its images of the batch.
    alone = sd_serving.generate([PROMPTS[2]], [SEEDS[2]])
    for a, b in zip(alone[0], first[2], strict=True):
        assert np.abs(_array(a) - _array(b)).max() <= 3


def test_batch_size_changes_pixels_only_by_noise(sd_serving, tiny_model):
    batched = sd_serving.generate(PROMPTS, SEEDS)
    one_by_one = LocalImageGenServing(
        tiny_model("tiny-sd"), batch_size=1, num_images_per_prompt=2, num_inference_steps=2
    ).generate(PROMPTS, SEEDS)
    for images_a, images_b in zip(batched, one_by_one, strict=True):
        for a, b in zip(images_a, images_b, strict=True):
            assert np.abs(_array(a) - _array(b)).max() <= 3


def test_different_seeds_give_different_images(sd_serving):
    outputs = sd_serving.generate(["a cat"] * 2, [1, 2])
    images = [image for per_prompt in outputs for image in per_prompt]
    arrays = [_array(image) for image in images]
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            assert np.abs(arrays[i] - arrays[j]).max() > 10


def test_cleanup_frees_the_pipelines_and_generate_reloads(tiny_model):
    serving = LocalImageGenServing(tiny_model("tiny-sd"), num_inference_steps=2)
    before = serving.generate(["a cat"], [5])
    pipeline = weakref.ref(serving._pipelines[0])
    unet = weakref.ref(serving._pipelines[0].unet)
    serving.cleanup()
    gc.collect()
    assert not serving.loaded and pipeline() is None and unet() is None
    after = serving.generate(["a cat"], [5])
    assert serving.loaded
    assert _bytes(after) == _bytes(before)
    serving.cleanup()


def test_image2image_follows_input_sizes_and_strength(tiny_model):
    folder = tiny_model("tiny-sd")
    rng = np.random.default_rng(0)
    inputs = [
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).convert("L"),
    ]
    prompts, seeds = ["a cat", "a dog", "a tree"], [1, 2, 3]
    light = LocalImageGenServing(folder, task="image2image", num_inference_steps=4, strength=0.5)
    outputs = light.generate(prompts, seeds, inputs)
    assert [[image.size for image in images] for images in outputs] == [
        [(48, 40)],
        [(32, 32)],
        [(48, 40)],
    ]
    assert all(images[0].mode == "RGB" for images in outputs)
    assert _bytes(light.generate(prompts, seeds, inputs)) == _bytes(outputs)
    strong = LocalImageGenServing(folder, task="image2image", num_inference_steps=4, strength=1.0)
    stronger = strong.generate(prompts, seeds, inputs)
    assert np.abs(_array(stronger[0][0]) - _array(outputs[0][0])).max() > 10
    with pytest.raises(ValueError, match="images"):
        light.generate(prompts, seeds, inputs[:2])
    light.cleanup()
    strong.cleanup()


# -------------------------------------------------------------- tiny FLUX
def test_tiny_flux_text2image(tiny_model):
    serving = LocalImageGenServing(
        tiny_model("tiny-flux"),
        batch_size=2,
        num_images_per_prompt=2,
        num_inference_steps=2,
        height=32,
        width=32,
        guidance_scale=3.5,
        call_kwargs={"max_sequence_length": 32},
    )
    outputs = serving.generate(PROMPTS[:3], SEEDS[:3])
    assert [[image.size for image in images] for images in outputs] == [[(32, 32)] * 2] * 3
    assert type(serving._pipelines[0]).__name__ == "FluxPipeline"
    assert _bytes(serving.generate(PROMPTS[:3], SEEDS[:3])) == _bytes(outputs)
    alone = serving.generate([PROMPTS[2]], [SEEDS[2]])
    for a, b in zip(alone[0], outputs[2], strict=True):
        assert np.abs(_array(a) - _array(b)).max() <= 3
    serving.cleanup()


# ---------------------------------------------------- fake pipelines (no model)
class FakePipeline:
    """Records its calls; flags (as NSFW) every image whose generator seed is in `flagged`;
    each image is a solid colour made from its seed, so tests can tell which seed made it."""

    def __init__(self, flagged: set[int] | None = None, name: str = "fake") -> None:
        self.flagged = flagged or set()
        self.name = name
        self.calls: list[dict] = []

    def __call__(
        self,
        prompt,
        num_images_per_prompt=1,
        num_inference_steps=50,
        generator=None,
        output_type="pil",
    ):
        self.calls.append(
            dict(
                prompt=list(prompt),
                num_images_per_prompt=num_images_per_prompt,
                num_inference_steps=num_inference_steps,
                seeds=[g.initial_seed() for g in generator],
                output_type=output_type,
            )
        )
        assert torch.is_inference_mode_enabled()
        seeds = [g.initial_seed() for g in generator]
        images = [Image.new("L", (4, 4), color=seed % 251) for seed in seeds]
        return SimpleNamespace(
            images=images, nsfw_content_detected=[s in self.flagged for s in seeds]
        )


def _fake_serving(
    monkeypatch, tiny_model, replicas: list[FakePipeline], **kwargs
) -> LocalImageGenServing:
    available = iter(replicas)
    monkeypatch.setattr(
        LocalImageGenServing, "_load_replica", lambda self, device: next(available)
    )
    serving = LocalImageGenServing(tiny_model("tiny-sd"), **kwargs)
    serving.devices = ["cpu"] * len(replicas)
    return serving


def _colour(seed: int) -> int:
    return seed % 251


def test_only_accepted_arguments_are_passed(monkeypatch, tiny_model):
    fake = FakePipeline()
    serving = _fake_serving(
        monkeypatch,
        tiny_model,
        [fake],
        guidance_scale=7.0,
        height=64,
        num_inference_steps=3,
        call_kwargs={"output_type": "pil"},
    )
    serving.generate(["a"], [1])
    call = fake.calls[0]
    assert (
        call["num_inference_steps"] == 3
    )  # guidance_scale / height are not parameters of the fake
    assert call["seeds"] == [derive_seed(1, 0)]


def test_generators_follow_diffusers_order(monkeypatch, tiny_model):
    fake = FakePipeline()
    serving = _fake_serving(monkeypatch, tiny_model, [fake], batch_size=2, num_images_per_prompt=3)
    outputs = serving.generate(["a", "b", "c"], [7, 8, 9])
    assert [call["prompt"] for call in fake.calls] == [["a", "b"], ["c"]]
    assert fake.calls[0]["seeds"] == [derive_seed(s, j) for s in (7, 8) for j in range(3)]
    for images, seed in zip(outputs, [7, 8, 9], strict=True):
        assert [image.getpixel((0, 0)) for image in images] == [
            (_colour(derive_seed(seed, j)),) * 3 for j in range(3)
        ]
        assert all(image.mode == "RGB" for image in images)


def test_flagged_image_is_regenerated_with_retry_seeds(monkeypatch, tiny_model):
    bad = {derive_seed(2, 1), derive_seed(2, 1, "safety-retry", 1)}
    fake = FakePipeline(flagged=bad)
    serving = _fake_serving(monkeypatch, tiny_model, [fake], num_images_per_prompt=2)
    outputs = serving.generate(["a", "b"], [1, 2])
    retry_calls = fake.calls[1:]
    assert [call["seeds"] for call in retry_calls] == [
        [derive_seed(2, 1, "safety-retry", 1)],
        [derive_seed(2, 1, "safety-retry", 2)],
    ]
    assert all(
        call["prompt"] == ["b"] and call["num_images_per_prompt"] == 1 for call in retry_calls
    )
    assert outputs[1][1].getpixel((0, 0))[0] == _colour(derive_seed(2, 1, "safety-retry", 2))
    assert outputs[1][0].getpixel((0, 0))[0] == _colour(derive_seed(2, 0))
    assert outputs[0][1] is not None


def test_image_still_flagged_after_retries_is_none(monkeypatch, tiny_model):
    always = {derive_seed(3, 0)} | {derive_seed(3, 0, "safety-retry", a) for a in range(1, 10)}
    fake = FakePipeline(flagged=always)
    serving = _fake_serving(monkeypatch, tiny_model, [fake], max_safety_retries=2)
    outputs = serving.generate(["x", "y"], [3, 4])
    assert outputs[0] == [None]
    assert isinstance(outputs[1][0], Image.Image)
    assert len(fake.calls) == 1 + 2


def test_batches_go_round_robin_to_replicas_and_keep_order(monkeypatch, tiny_model):
    replicas = [FakePipeline(name="r0"), FakePipeline(name="r1")]
    serving = _fake_serving(monkeypatch, tiny_model, replicas, batch_size=2)
    prompts = [f"p{i}" for i in range(7)]
    outputs = serving.generate(prompts, list(range(7)))
    assert [call["prompt"] for call in replicas[0].calls] == [["p0", "p1"], ["p4", "p5"]]
    assert [call["prompt"] for call in replicas[1].calls] == [["p2", "p3"], ["p6"]]
    assert [images[0].getpixel((0, 0))[0] for images in outputs] == [
        _colour(derive_seed(seed, 0)) for seed in range(7)
    ]


# ------------------------------------------------------------- editing (task "edit")
def test_existing_tasks_configs_keep_their_keys(tiny_model):
    """Steps cached before the edit task and its settings existed stay valid."""
    old_keys = {"serving", "model", "model_content", "revision", "task", "num_images_per_prompt", "height", "width",
                "num_inference_steps", "guidance_scale", "torch_dtype", "max_safety_retries", "call_kwargs"}
    text2image = LocalImageGenServing(tiny_model("tiny-sd")).config()
    image2image = LocalImageGenServing(tiny_model("tiny-sd"), task="image2image").config()
    assert set(text2image) == old_keys and set(image2image) == old_keys | {"strength"}
    assert image2image["strength"] == 0.8
    edit = LocalImageGenServing(tiny_model("tiny-instruct-pix2pix"), task="edit")
    assert edit.strength is None and set(edit.config()) == old_keys
    guided = LocalImageGenServing(tiny_model("tiny-instruct-pix2pix"), task="edit", image_guidance_scale=1.2,
                                  true_cfg_scale=4.0, negative_prompt=" ", strength=0.5).config()
    assert {key: guided[key] for key in set(guided) - old_keys} == {
        "image_guidance_scale": 1.2, "true_cfg_scale": 4.0, "negative_prompt": " ", "strength": 0.5}


class FakeEditPipeline(FakePipeline):
    """An InstructPix2Pix-like signature: `image` and `image_guidance_scale`, no `strength`,
    `true_cfg_scale` or `negative_prompt`."""

    def __call__(self, prompt, image, num_images_per_prompt=1, num_inference_steps=50, guidance_scale=7.5,
                 image_guidance_scale=1.5, generator=None, output_type="pil"):
        output = super().__call__(prompt, num_images_per_prompt, num_inference_steps, generator, output_type)
        self.calls[-1].update(images=[i.getpixel((0, 0)) for i in image], image_guidance_scale=image_guidance_scale)
        return output


def test_edit_gives_each_edit_its_own_prompt_and_image_and_only_accepted_settings(monkeypatch, tiny_model):
    fake = FakeEditPipeline()
    serving = _fake_serving(monkeypatch, tiny_model, [fake], task="edit", batch_size=2, num_images_per_prompt=2,
                            image_guidance_scale=1.25, true_cfg_scale=4.0, negative_prompt=" ", strength=0.3)
    sources = [Image.new("RGB", (4, 4), (value, 0, 0)) for value in (10, 20, 30)]
    outputs = serving.generate(["a", "b", "c"], [7, 8, 9], sources)
    first = fake.calls[0]
    # diffusers would tile 2 images' latents for 2 prompts x 2 edits (i0 i1 i0 i1); each edit gets its own
    assert first["prompt"] == ["a", "a", "b", "b"] and first["num_images_per_prompt"] == 1
    assert first["images"] == [(10, 0, 0), (10, 0, 0), (20, 0, 0), (20, 0, 0)]
    assert first["seeds"] == [derive_seed(s, j) for s in (7, 8) for j in range(2)]
    assert first["image_guidance_scale"] == 1.25
    assert [len(images) for images in outputs] == [2, 2, 2]
    assert outputs[2][1].getpixel((0, 0))[0] == _colour(derive_seed(9, 1))


def test_edit_refuses_a_pipeline_without_an_input_image(tiny_model):
    serving = LocalImageGenServing(tiny_model("tiny-sd"), task="edit")
    with pytest.raises(ValueError, match=r"StableDiffusionPipeline, which takes no input image.*'image2image' "
                                         r"with a target caption"):
        serving.load()
    with pytest.raises(ValueError, match="edit needs one input image per prompt"):
        serving.generate(["a"], [1])


def test_tiny_instruct_pix2pix_edits_each_image_by_its_own_instruction(tiny_model):
    rng = np.random.default_rng(0)
    sources = [Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)) for _ in range(3)]
    sources.append(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))
    prompts, seeds = ["make it snow", "add a hat", "night", "paint it"], [1, 2, 3, 4]
    serving = LocalImageGenServing(tiny_model("tiny-instruct-pix2pix"), task="edit", batch_size=4,
                                   num_images_per_prompt=2, num_inference_steps=2, image_guidance_scale=1.5)
    batched = serving.generate(prompts, seeds, sources)
    assert [[image.size for image in images] for images in batched] == [[(40, 24)] * 2] * 3 + [[(32, 32)] * 2]
    alone = [serving.generate([p], [s], [i])[0] for p, s, i in zip(prompts, seeds, sources, strict=True)]
    for together, by_itself in zip(batched, alone, strict=True):  # same pairs, noise-level differences only
        assert all(np.abs(_array(a) - _array(b)).max() <= 2 for a, b in zip(together, by_itself, strict=True))
    assert np.abs(_array(batched[0][0]) - _array(batched[0][1])).max() > 10  # each edit its own seed
    assert np.abs(_array(batched[1][0]) - _array(batched[2][0])).max() > 10
    serving.cleanup()


def test_flux_image2image_pairs_each_image_with_its_own_prompt(tiny_model):
    """diffusers' FLUX img2img tiles a batch's image latents for several images per prompt; each
    generated image gets its own prompt and input image instead (SD's img2img has its own path)."""
    rng = np.random.default_rng(0)
    sources = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    serving = LocalImageGenServing(tiny_model("tiny-flux"), task="image2image", batch_size=2, num_images_per_prompt=2,
                                   num_inference_steps=2, height=32, width=32,  # FLUX's default is 256 px
                                   call_kwargs={"max_sequence_length": 32})
    batched = serving.generate(["a cat", "a dog"], [1, 2], sources)
    for index, images in enumerate(batched):
        alone = serving.generate([["a cat", "a dog"][index]], [[1, 2][index]], [sources[index]])[0]
        assert all(np.abs(_array(a) - _array(b)).max() <= 2 for a, b in zip(images, alone, strict=True))
    serving.cleanup()
