"""Training recipes of the tiny models trained on the shapes world, and their hashes.

A recipe's hash names everything that decides a model's weights: the recipe (sizes,
steps, learning rate, seed, thread count), the world it is trained on, the recipes of the
models it reuses, and the version of the training code. The shipped weights record the
hash they were trained with (`shipped_weights.recipe_mismatch` compares), and the models
cache names each copy by it.

This module imports no torch: resolving a cached model's folder stays instant.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dataflowmm.kit.shapes import ShapesWorld
from dataflowmm.seeds import canonical_json

# Bump when the training code changes in a way that changes weights.
TRAINING_CODE_VERSION = 1
# Torch threads while training: float reductions are ordered by the thread count, so a
# fixed count makes the weights repeatable (see README, "Shapes-world models").
TRAINING_THREADS = 2
# Written beside each trained model: its recipe, training time and held-out figures.
REPORT_FILE = "training_report.json"


@dataclass(frozen=True)
class ClipRecipe:
    """A `CLIPModel` trained contrastively on shapes-world image-caption pairs."""

    train_images: int = 20_000
    held_out_images: int = 500
    steps: int = 700
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    patch_size: int = 4
    projection_dim: int = 64
    max_text_tokens: int = 16
    seed: int = 0
    threads: int = TRAINING_THREADS
    world: ShapesWorld = field(default_factory=ShapesWorld)


@dataclass(frozen=True)
class CaptionerRecipe:
    """A `VisionEncoderDecoderModel` (ViT encoder, BERT-style decoder) trained on captions."""

    # Three times the images at the same steps: held-out shape accuracy 95.8 % -> 97.2 %
    # (the smaller set was being memorised), at no extra training time.
    train_images: int = 60_000
    held_out_images: int = 500
    steps: int = 1500
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    hidden_size: int = 64
    encoder_layers: int = 2
    decoder_layers: int = 2
    heads: int = 4
    patch_size: int = 4
    seed: int = 0
    threads: int = TRAINING_THREADS
    world: ShapesWorld = field(default_factory=ShapesWorld)


@dataclass(frozen=True)
class DiffusionRecipe:
    """A Stable-Diffusion-layout pipeline: a tiny KL autoencoder and a conditional UNet,
    conditioned on the trained shapes-clip text encoder (frozen)."""

    train_images: int = 10_000
    held_out_prompts: int = 90
    # Three autoencoder blocks: 8x8 latents, which make each UNet step three times cheaper
    # than 16x16 ones, so the same training time buys more steps (shape match by
    # shapes-clip went from 64 % to 92 % with less training time).
    vae_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    attention_head_dim: int = 8
    vae_steps: int = 1000
    vae_batch_size: int = 16
    vae_learning_rate: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 1200
    unet_batch_size: int = 64
    unet_learning_rate: float = 4e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995
    min_snr_gamma: float = 5.0
    prompt_dropout: float = 0.1
    # A cosine schedule ends in pure noise, so generation starts where training did: with
    # Stable Diffusion's schedule, 32x32 images keep their mean colour at the last step,
    # which the model learns to read from noise that has none (wrong background colours).
    # Pure noise needs v-prediction (epsilon says nothing about the image there).
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "v_prediction"
    timestep_spacing: str = "trailing"
    inference_steps: int = 25
    guidance_scale: float = 3.0
    seed: int = 0
    threads: int = TRAINING_THREADS
    world: ShapesWorld = field(default_factory=ShapesWorld)


RECIPES: dict[str, object] = {
    "shapes-clip": ClipRecipe(),
    "shapes-captioner": CaptionerRecipe(),
    "shapes-sd": DiffusionRecipe(),
}
# Models whose trained parts another model reuses (their recipes are part of its hash).
DEPENDENCIES: dict[str, tuple[str, ...]] = {"shapes-sd": ("shapes-clip",)}


def recipe_hash(name: str, recipe: object | None = None) -> str:
    """8 hex digits naming everything that decides model `name`'s weights.

    `recipe` defaults to the registered one (`RECIPES[name]`).
    """
    recipe = RECIPES[_known(name)] if recipe is None else recipe
    content = {
        "name": name,
        "recipe_type": type(recipe).__name__,
        "recipe": asdict(recipe),
        "training_code_version": TRAINING_CODE_VERSION,
        "dependencies": {dep: recipe_hash(dep) for dep in DEPENDENCIES.get(name, ())},
    }
    return hashlib.sha256(canonical_json(content).encode()).hexdigest()[:8]


def _known(name: str) -> str:
    if name not in RECIPES:
        raise ValueError(f"no shapes-world recipe for {name!r}; choose from {', '.join(RECIPES)}")
    return name


def read_training_report(folder: str | Path) -> dict:
    """The `training_report.json` of a trained shapes model folder."""
    return json.loads((Path(folder) / REPORT_FILE).read_text())
