"""shapes-sd: a `StableDiffusionPipeline` (tiny VAE and UNet, shapes-clip's text encoder; for
`LocalImageGenServing`, text-to-image and image-to-image) trained on the shapes world;
held out: prompt-colour and shape match (`judge_generated`)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dataflowmm.kit.shapes import (
    HELD_OUT_SEED,
    SHAPES,
    TRAIN_SEED,
    all_captions,
    caption_for,
    judge_image,
)
from dataflowmm.kit.shapes_recipes import DiffusionRecipe
from dataflowmm.kit.shapes_training import (
    Clock,
    caption_indices,
    descend,
    images_to_unit,
    make_optimizer,
    parse_caption,
    recipe_for,
    sample_batches,
    train_loop,
    training_session,
    write_report,
)
from dataflowmm.models.tiny_diffusion import quiet_saving


def build_shapes_sd(out_dir: Path, models_dir: Path | None = None,
                    recipe: DiffusionRecipe | None = None) -> dict:
    """Train shapes-sd and save the pipeline and its report into `out_dir`.

    Its text encoder and tokenizer are shapes-clip's (trained first, through the same
    cache in `models_dir`, when missing), frozen: the VAE and the UNet are trained here.
    Returns the training report.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from dataflowmm.models.tiny import trained_model_path

    recipe = recipe_for("shapes-sd", recipe, DiffusionRecipe)
    clip_folder = trained_model_path("shapes-clip", models_dir)
    clock = Clock()
    with training_session("shapes-sd", recipe.threads, recipe.seed):
        tokenizer = CLIPTokenizer.from_pretrained(clip_folder)
        text_encoder = _text_encoder_from_clip(clip_folder)
        pixels, attributes = recipe.world.arrays(recipe.train_images, TRAIN_SEED)
        images = images_to_unit(pixels) * 2.0 - 1.0
        vae = _train_vae(images, recipe)
        latents = _encode_latents(vae, images)
        prompts = _prompt_embeddings(text_encoder, tokenizer, ["", *all_captions()])
        unet, final_loss = _train_unet(latents, caption_indices(attributes) + 1, prompts, recipe)
        pipeline = StableDiffusionPipeline(
            vae=vae.eval(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet.eval(),
            scheduler=_inference_scheduler(recipe),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        held_out = _evaluate_sd(pipeline, clip_folder, recipe)
    with quiet_saving():
        pipeline.save_pretrained(out_dir, safe_serialization=True)
    return write_report(out_dir, "shapes-sd", recipe, clock, final_loss, held_out)


def _text_encoder_from_clip(clip_folder: Path):
    """shapes-clip's text tower as a `CLIPTextModel` (what Stable Diffusion pipelines load)."""
    from transformers import CLIPModel, CLIPTextModel

    clip = CLIPModel.from_pretrained(clip_folder)
    text_encoder = CLIPTextModel(clip.config.text_config)
    # transformers 5 flattened CLIPTextModel; 4.x wraps the same module in `.text_model`.
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())
    return text_encoder.eval().requires_grad_(False)


@torch.no_grad()
def _prompt_embeddings(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """(P, T, D) text states exactly as `StableDiffusionPipeline.encode_prompt` makes them:
    padded to the tokenizer's maximum length, no attention mask."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def _vae_model(recipe: DiffusionRecipe):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(recipe.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(recipe.vae_channels),
        block_out_channels=recipe.vae_channels,
        layers_per_block=1,
        latent_channels=recipe.latent_channels,
        norm_num_groups=8,
        sample_size=recipe.world.image_size,
        mid_block_add_attention=False,  # plain images need no attention; it is most of the cost
    )


def _train_vae(images: torch.Tensor, recipe: DiffusionRecipe):
    """A KL autoencoder trained on reconstruction with a light KL term;
    its scaling factor is set so the training latents have unit variance."""
    vae = _vae_model(recipe)
    batches = sample_batches(len(images), recipe.vae_batch_size, recipe.vae_steps, recipe.seed + 1)
    noise = torch.Generator().manual_seed(recipe.seed + 2)
    optimizer, schedule = make_optimizer(vae.parameters(), recipe.vae_learning_rate, 0.0,
                                     recipe.warmup_steps, recipe.vae_steps)
    vae.train()

    def step(number: int) -> float:
        batch = images[batches[number - 1]]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=noise)).sample
        loss = F.mse_loss(reconstruction, batch) + recipe.vae_kl_weight * posterior.kl().mean()
        return descend(loss, optimizer, schedule)

    train_loop("shapes-sd (autoencoder)", recipe.vae_steps, step)
    vae.eval()
    with torch.no_grad():
        sample = vae.encode(images[:2048]).latent_dist.mean
    vae.register_to_config(scaling_factor=round(1.0 / float(sample.std()), 5))
    return vae.requires_grad_(False)


@torch.no_grad()
def _encode_latents(vae, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Scaled latent means of all training images (the UNet trains on these)."""
    chunks = [vae.encode(images[i : i + batch_size]).latent_dist.mean
              for i in range(0, len(images), batch_size)]
    latents = torch.cat(chunks) * vae.config.scaling_factor
    return latents.contiguous(memory_format=torch.channels_last)


def _unet_model(recipe: DiffusionRecipe, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=recipe.world.image_size // 2 ** (len(recipe.vae_channels) - 1),
        in_channels=recipe.latent_channels,
        out_channels=recipe.latent_channels,
        block_out_channels=recipe.unet_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=recipe.attention_head_dim,
        norm_num_groups=8,
        # The prompt also reaches every ResNet block through the time embedding
        # (attention-pooled text states, as in DeepFloyd IF), not only the 8x8 attention.
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def _scheduler_config(recipe: DiffusionRecipe) -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_schedule=recipe.beta_schedule,
        beta_start=recipe.beta_start,
        beta_end=recipe.beta_end,
        prediction_type=recipe.prediction_type,
        clip_sample=False,
    )


def _inference_scheduler(recipe: DiffusionRecipe):
    from diffusers import DDIMScheduler

    # "trailing" spacing makes the first of few inference steps the last training timestep.
    # (steps_offset only affects "leading" spacing; 1 keeps StableDiffusionPipeline quiet.)
    return DDIMScheduler(**_scheduler_config(recipe), timestep_spacing=recipe.timestep_spacing,
                         set_alpha_to_one=False, steps_offset=1)


def _train_unet(latents: torch.Tensor, prompt_ids: torch.Tensor, prompts: torch.Tensor,
                recipe: DiffusionRecipe):
    """Denoising training with prompt dropout (for classifier-free guidance) and an
    exponential moving average of the weights, which is what gets saved.

    `prompt_ids` index `prompts`, whose row 0 is the empty prompt.
    """
    from diffusers import DDPMScheduler

    # channels-last convolutions are about a quarter faster on CPU here.
    unet = _unet_model(recipe, prompts.shape[-1]).to(memory_format=torch.channels_last)
    average = _unet_model(recipe, prompts.shape[-1]).to(memory_format=torch.channels_last)
    average.load_state_dict(unet.state_dict())
    average.requires_grad_(False)
    scheduler = DDPMScheduler(**_scheduler_config(recipe))
    weights = _min_snr_weights(scheduler, recipe)
    steps, size = recipe.unet_steps, recipe.unet_batch_size
    batches = sample_batches(len(latents), size, steps, recipe.seed + 3)
    draws = torch.Generator().manual_seed(recipe.seed + 4)
    optimizer, schedule = make_optimizer(unet.parameters(), recipe.unet_learning_rate, 0.0,
                                     recipe.warmup_steps, steps)
    unet.train()

    def step(number: int) -> float:
        chosen = batches[number - 1]
        clean = latents[chosen]
        noise = torch.randn(clean.shape, generator=draws).contiguous(memory_format=torch.channels_last)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (size,), generator=draws)
        dropped = torch.rand(size, generator=draws) < recipe.prompt_dropout
        conditions = prompts[torch.where(dropped, 0, prompt_ids[chosen])]
        predicted = unet(scheduler.add_noise(clean, noise, timesteps), timesteps, conditions).sample
        if recipe.prediction_type == "v_prediction":
            target = scheduler.get_velocity(clean, noise, timesteps)
        else:
            target = noise
        per_sample = F.mse_loss(predicted, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * weights[timesteps]).mean()
        loss_value = descend(loss, optimizer, schedule)
        with torch.no_grad():
            # Warm-up of the average: early weights are forgotten quickly.
            decay = min(recipe.ema_decay, (1 + number) / (10 + number))
            for kept, current in zip(average.parameters(), unet.parameters(), strict=True):
                kept.lerp_(current, 1.0 - decay)
        return loss_value

    final_loss = train_loop("shapes-sd (unet)", steps, step)
    return average.to(memory_format=torch.contiguous_format), final_loss


def _min_snr_weights(scheduler, recipe: DiffusionRecipe) -> torch.Tensor:
    """Per-timestep loss weights of Min-SNR-gamma (Hang et al., 2023): nearly clean timesteps,
    where only fine detail is learned, count less, so the shapes themselves train faster."""
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1.0 - alphas)
    if recipe.prediction_type == "v_prediction":
        return snr.clamp(max=recipe.min_snr_gamma) / (snr + 1.0)
    return (recipe.min_snr_gamma / snr).clamp(max=1.0)


@torch.no_grad()
def _evaluate_sd(pipeline, clip_folder: Path, recipe: DiffusionRecipe) -> dict:
    """Generate one image per held-out prompt and judge it.

    Colour and background by pixel statistics (`judge_image`); shape by shapes-clip
    (zero-shot among the three captions that differ from the prompt only in the shape)
    and, for reference, by the pixel fill ratio.
    """
    prompts = [all_captions()[i % 90] for i in range(recipe.held_out_prompts)]
    generators = [torch.Generator().manual_seed(HELD_OUT_SEED * 100_000 + i)
                  for i in range(len(prompts))]
    images = []
    for start in range(0, len(prompts), 32):
        images += pipeline(prompts[start : start + 32], generator=generators[start : start + 32],
                           num_inference_steps=recipe.inference_steps,
                           guidance_scale=recipe.guidance_scale).images
    return judge_generated(images, prompts, clip_folder)


def evaluate_shapes_sd(folder: Path, clip_folder: Path, recipe: DiffusionRecipe | None = None) -> dict:
    """The held-out figures of the shapes-sd saved in `folder`, judged by the shapes-clip in
    `clip_folder` (its training's evaluation)."""
    from diffusers import StableDiffusionPipeline

    from dataflowmm.serving.common import dtype_keyword

    recipe = recipe_for("shapes-sd", recipe, DiffusionRecipe)
    pipeline = StableDiffusionPipeline.from_pretrained(folder, **{dtype_keyword("diffusers"): torch.float32})
    pipeline.set_progress_bar_config(disable=True)
    return _evaluate_sd(pipeline, clip_folder, recipe)


def judge_generated(images: list, prompts: list[str], clip_folder: str | Path) -> dict:
    """How often generated `images` match their shapes-world `prompts`.

    Returns the share of images whose shape colour (`colour`) and background
    (`background`) match by pixel statistics, whose shape matches by shapes-clip
    (`shape`, zero-shot among the prompt's caption with each of the three shapes) and by
    the pixel fill ratio (`shape_by_pixels`).
    """
    from dataflowmm.serving.clip import ClipServing

    wanted = [parse_caption(prompt) for prompt in prompts]
    if any(w is None for w in wanted):
        raise ValueError("judge_generated needs prompts in the shapes-world caption form")
    judged = [judge_image(image) for image in images]
    clip = ClipServing(clip_folder, device="cpu", batch_size=256)
    candidates = [caption_for(shape, w["colour"], w["background"]) for w in wanted for shape in SHAPES]
    image_embeds = clip.embed_images(images)
    text_embeds = clip.embed_texts(candidates).view(len(images), len(SHAPES), -1)
    by_clip = [SHAPES[int(i)] for i in torch.einsum("nd,nkd->nk", image_embeds, text_embeds).argmax(1)]
    count = len(images)

    def share(hits) -> float:
        return round(sum(hits) / count, 4)

    return {
        "prompts": count,
        "colour": share(j["colour"] == w["colour"] for j, w in zip(judged, wanted, strict=True)),
        "background": share(j["background"] == w["background"] for j, w in zip(judged, wanted, strict=True)),
        "shape": share(s == w["shape"] for s, w in zip(by_clip, wanted, strict=True)),
        "shape_by_pixels": share(j["shape"] == w["shape"] for j, w in zip(judged, wanted, strict=True)),
    }
