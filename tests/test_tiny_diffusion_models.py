"""Tiny diffusion and CLIP models: offline tokenizers, deterministic builds, real loaders."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from dataflowmm.models import tiny_diffusion
from dataflowmm.models.offline_tokenizers import make_clip_tokenizer, make_t5_tokenizer


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _size_mb(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e6


def test_clip_tokenizer_is_deterministic_and_never_unknown(tmp_path):
    from transformers import AutoTokenizer

    first, second = make_clip_tokenizer(), make_clip_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert first.model_max_length == 77
    ids = first("A photo of a cat, ünïcödé 日本 ✨!").input_ids
    assert ids[0] == first.bos_token_id and ids[-1] == first.eos_token_id
    assert first.unk_token_id not in ids[1:-1]
    assert first.tokenize("a dog with the") == ["a</w>", "dog</w>", "with</w>", "the</w>"]
    first.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("a red sofa").input_ids == first("a red sofa").input_ids


def test_t5_tokenizer_is_deterministic_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    first, second = make_t5_tokenizer(), make_t5_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert (first.pad_token_id, first.eos_token_id, first.unk_token_id) == (0, 1, 2)
    ids = first("A photo of a zebra!").input_ids
    assert ids[-1] == first.eos_token_id and first.unk_token_id not in ids
    assert first.decode(ids, skip_special_tokens=True) == "A photo of a zebra!"
    first.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("a cat").input_ids == first("a cat").input_ids


@pytest.mark.parametrize("name", ["sd", "instruct_pix2pix", "flux", "clip"])
def test_builds_are_deterministic_and_small(tmp_path, name):
    build = getattr(tiny_diffusion, f"build_tiny_{name}")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    build(tmp_path / "a")
    build(tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _size_mb(tmp_path / "a") < 10


def test_tiny_sd_loads_with_every_auto_class(tiny_model):
    from diffusers import (
        AutoPipelineForImage2Image,
        AutoPipelineForText2Image,
        DiffusionPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionPipeline,
    )

    folder = tiny_model("tiny-sd")
    assert type(DiffusionPipeline.from_pretrained(folder)) is StableDiffusionPipeline
    image2image = AutoPipelineForImage2Image.from_pretrained(folder)
    assert type(image2image) is StableDiffusionImg2ImgPipeline
    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    assert type(pipeline) is StableDiffusionPipeline
    assert pipeline.safety_checker is None
    assert pipeline.unet.config.sample_size * pipeline.vae_scale_factor == 32
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        "a cat", num_inference_steps=1, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (32, 32) and image.mode == "RGB"


def test_tiny_instruct_pix2pix_loads_by_its_class_name_and_edits(tiny_model):
    from diffusers import (
        AutoPipelineForImage2Image,
        DiffusionPipeline,
        StableDiffusionInstructPix2PixPipeline,
    )
    from PIL import Image

    folder = tiny_model("tiny-instruct-pix2pix")
    pipeline = DiffusionPipeline.from_pretrained(folder)
    assert type(pipeline) is StableDiffusionInstructPix2PixPipeline
    assert pipeline.unet.config.in_channels == 8 and pipeline.safety_checker is None
    # diffusers 0.42's auto class refuses it (rather than map it to SD img2img, whose 4-channel
    # input would not fit): the serving's task "edit" loads the class the folder names
    with pytest.raises(ValueError, match="StableDiffusionInstructPix2PixPipeline"):
        AutoPipelineForImage2Image.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    source = Image.new("RGB", (40, 24), (200, 30, 30))
    images = pipeline(["make it blue", "add snow"], image=[source, source], num_inference_steps=2,
                      image_guidance_scale=1.5, generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert [image.size for image in images] == [(40, 24), (40, 24)]


def test_tiny_flux_loads_as_a_dev_like_flux_pipeline(tiny_model):
    from diffusers import AutoPipelineForText2Image, FluxPipeline

    pipeline = AutoPipelineForText2Image.from_pretrained(tiny_model("tiny-flux"))
    assert type(pipeline) is FluxPipeline
    assert pipeline.transformer.config.guidance_embeds
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        ["a cat", "a dog"],
        height=32,
        width=32,
        num_inference_steps=1,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert [image.size for image in images] == [(32, 32), (32, 32)]


def test_tiny_clip_loads_with_clip_model_and_auto_processor(tiny_model):
    from PIL import Image
    from transformers import AutoProcessor, CLIPModel

    folder = tiny_model("tiny-clip")
    model = CLIPModel.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert model.config.projection_dim == 16
    assert model.config.vision_config.image_size == 32
    inputs = processor(
        text=["a cat", "a dog on a sofa"],
        images=[Image.new("RGB", (50, 40)), Image.new("RGB", (32, 32))],
        return_tensors="pt",
        padding=True,
    )
    with torch.inference_mode():
        output = model(**inputs)
    assert output.logits_per_image.shape == (2, 2)
    assert output.image_embeds.shape == (2, 16) and output.text_embeds.shape == (2, 16)
