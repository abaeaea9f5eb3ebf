"""Tiny random-weight text-to-image and CLIP models, built offline in about a second.

Each builder writes a `save_pretrained` folder with the real library classes and configs
(only the sizes shrunk), so the serving code loads it through the same `from_pretrained`
paths as a hub model. Weights are seeded: two builds write identical files.

- tiny-sd: `StableDiffusionPipeline` (UNet, KL VAE, CLIP text encoder, DDIM), 32 px by
  default, no safety checker.
- tiny-instruct-pix2pix: `StableDiffusionInstructPix2PixPipeline`, tiny-sd's parts with an
  8-channel UNet input (noisy latents + the source image's latents); edits keep the source
  image's size (rounded down to even pixels).
- tiny-flux: `FluxPipeline`, FLUX.1-dev-like (guidance embedding, CLIP + T5 encoders,
  flow-matching scheduler with dynamic shifting). `FluxPipeline` defaults to 256 px here
  (its `default_sample_size` 128 x VAE factor 2: 4096 image tokens whatever the VAE) and
  to `max_sequence_length=512` (passed explicitly to the T5 tokenizer, so no tokenizer
  setting shortens it); a default call takes about 1.5 s per image on 2 CPU cores. Pass
  `height`/`width` 32 and `max_sequence_length` 32 for fast test calls.
- tiny-clip: `CLIPModel` (32 px images, 16-d projections) with a `CLIPProcessor`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from dataflowmm.models.offline_tokenizers import make_clip_tokenizer, make_t5_tokenizer

SEED = 0
CLIP_TEXT_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
_CROSS_DIM = 32


@contextmanager
def quiet_saving() -> Iterator[None]:
    """No "Writing model shards" progress bars while a model is saved."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _clip_text_config(tokenizer, **overrides):
    """A 2-layer, 32-wide CLIP text tower with the ids of `tokenizer`."""
    from transformers import CLIPTextConfig

    values = dict(
        vocab_size=len(tokenizer),
        hidden_size=_CROSS_DIM,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=CLIP_TEXT_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    values.update(overrides)
    return CLIPTextConfig(**values)


def _vae(**overrides):
    """A 2-level KL autoencoder (scale factor 2, 4 latent channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED + 1)
    values = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    values.update(overrides)
    return AutoencoderKL(**values)


def _clip_text_encoder(tokenizer):
    from transformers import CLIPTextModel

    torch.manual_seed(SEED + 2)
    return CLIPTextModel(_clip_text_config(tokenizer)).eval()


def _sd_unet(in_channels: int):
    """A 2-level UNet (~1 M parameters) on 4-channel latents; `in_channels` 8 for InstructPix2Pix
    (the noisy latents concatenated with the source image's latents)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _build_sd_like(out_dir: Path, pipeline_class, unet_in_channels: int) -> None:
    """An SD-family pipeline (tiny UNet, KL VAE, CLIP text encoder, DDIM, no safety checker)."""
    tokenizer = make_clip_tokenizer(model_max_length=CLIP_TEXT_MAX_LENGTH)
    torch.manual_seed(SEED)
    unet = _sd_unet(unet_in_channels)
    pipeline = pipeline_class(
        vae=_vae(),
        text_encoder=_clip_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with quiet_saving():
        pipeline.save_pretrained(out_dir, safe_serialization=True)


def build_tiny_sd(out_dir: Path) -> None:
    """Write a tiny Stable Diffusion pipeline folder (~1.2 M parameters) into `out_dir`."""
    from diffusers import StableDiffusionPipeline

    _build_sd_like(out_dir, StableDiffusionPipeline, unet_in_channels=4)


def build_tiny_instruct_pix2pix(out_dir: Path) -> None:
    """Write a tiny InstructPix2Pix pipeline folder into `out_dir`: tiny-sd's parts with a UNet
    taking 8 channels, saved as `StableDiffusionInstructPix2PixPipeline` (what model_index.json
    names, so `DiffusionPipeline.from_pretrained` loads it as such)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    _build_sd_like(out_dir, StableDiffusionInstructPix2PixPipeline, unet_in_channels=8)


def build_tiny_flux(out_dir: Path) -> None:
    """Write a tiny FLUX.1-dev-like pipeline folder into `out_dir`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = make_clip_tokenizer(model_max_length=CLIP_TEXT_MAX_LENGTH)
    tokenizer_2 = make_t5_tokenizer(model_max_length=T5_MAX_LENGTH)
    torch.manual_seed(SEED)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_CROSS_DIM,
        pooled_projection_dim=_CROSS_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(SEED + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=_CROSS_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(
            use_quant_conv=False,
            use_post_quant_conv=False,
            scaling_factor=0.3611,
            shift_factor=0.1159,
        ),
        text_encoder=_clip_text_encoder(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    with quiet_saving():
        pipeline.save_pretrained(out_dir, safe_serialization=True)


def build_tiny_clip(out_dir: Path) -> None:
    """Write a tiny `CLIPModel` and its `CLIPProcessor` into `out_dir`."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPVisionConfig,
    )

    tokenizer = make_clip_tokenizer(model_max_length=CLIP_TEXT_MAX_LENGTH)
    vision = CLIPVisionConfig(
        hidden_size=_CROSS_DIM,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
    )
    config = CLIPConfig(
        text_config=_clip_text_config(tokenizer).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=16,
    )
    torch.manual_seed(SEED)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    with quiet_saving():
        model.save_pretrained(out_dir, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
