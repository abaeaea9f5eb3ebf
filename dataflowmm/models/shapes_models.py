"""Tiny models trained on the shapes world on first use: shapes-clip, shapes-captioner, shapes-sd.

Random-weight tiny models exercise code paths; these also mean something. Each is trained
on a CPU in a minute or two from a recipe (`shapes_recipes.py`) with fixed seeds and a
fixed torch thread count, checked on held-out shapes-world images, and saved with
`save_pretrained`, so the servings load them like any hub model:

- shapes-clip: `CLIPModel` + `CLIPProcessor` for `ClipServing`; zero-shot caption accuracy.
- shapes-captioner: `VisionEncoderDecoderModel` (ViT + BERT-style decoder) for
  `LocalCaptionServing`; exact-caption, colour and shape accuracy.
- shapes-sd: `StableDiffusionPipeline` (tiny VAE and UNet, shapes-clip's text encoder) for
  `LocalImageGenServing`, text-to-image and image-to-image; prompt-colour and shape match.

Training prints progress lines and the held-out figures, and writes them to
`training_report.json` in the model folder.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dataflowmm.models import shapes_recipes
from dataflowmm.models.offline_tokenizers import make_clip_tokenizer
from dataflowmm.models.shapes_recipes import (
    CaptionerRecipe,
    ClipRecipe,
    DiffusionRecipe,
    recipe_hash,
)
from dataflowmm.models.tiny_diffusion import quiet_saving
from dataflowmm.shapes import (
    COLOUR_NAMES,
    HELD_OUT_SEED,
    SHAPES,
    TRAIN_SEED,
    all_captions,
    caption_for,
    judge_image,
)

REPORT_FILE = "training_report.json"
# Words of every shapes-world caption; the tokenizers hold each as one token.
WORLD_WORDS: tuple[str, ...] = ("a", "on", "background", *SHAPES, *COLOUR_NAMES)
# How many progress lines a training prints (besides the last).
_PROGRESS_LINES = 6
# Counts trainings in this process (tests check that a cached model is not retrained).
TRAINING_RUNS: dict[str, int] = {}


# --------------------------------------------------------------------------- shared helpers


def _log(message: str) -> None:
    print(f"[dataflowmm] {message}", file=sys.stderr, flush=True)


@contextmanager
def _training_session(name: str, threads: int, seed: int) -> Iterator[None]:
    """Fixed thread count and seed for a training, restored afterwards.

    The thread count orders float reductions, so it is part of the recipe; the caller's
    global RNG state is left as it was.
    """
    previous_threads = torch.get_num_threads()
    TRAINING_RUNS[name] = TRAINING_RUNS.get(name, 0) + 1
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(previous_threads)


def _optimizer(parameters, learning_rate: float, weight_decay: float, warmup_steps: int,
               steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a linear warm-up and a cosine decay to a tenth of the rate."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _descend(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
             schedule: torch.optim.lr_scheduler.LambdaLR) -> float:
    """One optimisation step on `loss` (then the learning-rate schedule); returns its value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    return loss.item()


def _train_loop(label: str, steps: int, step_fn: Callable[[int], float]) -> float:
    """Run `step_fn(step)` `steps` times, printing progress; returns the last loss average."""
    every = max(1, steps // _PROGRESS_LINES)
    started, recent = time.perf_counter(), []
    for step in range(1, steps + 1):
        recent.append(step_fn(step))
        if step % every == 0 or step == steps:
            loss = sum(recent) / len(recent)
            _log(f"training {label}: step {step}/{steps} loss {loss:.4f} "
                 f"({time.perf_counter() - started:.0f} s)")
            recent = []
    return loss


def _batches(count: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch_size) sample indices drawn from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, count, (steps, batch_size), generator=generator)


def _images_to_unit(pixels: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)


def _caption_indices(attributes: list[dict]) -> torch.Tensor:
    """Index of each sample's caption in `all_captions()`."""
    index = {caption: i for i, caption in enumerate(all_captions())}
    return torch.tensor([index[caption_for(a["shape"], a["colour"], a["background"])]
                         for a in attributes])


class _Clock:
    """Wall-clock and CPU seconds since creation (CPU time shows the work done even when
    other processes share the cores)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _write_report(out_dir: Path, name: str, recipe: object, clock: _Clock, final_loss: float,
                  held_out: dict) -> dict:
    import transformers

    seconds, cpu_seconds = clock.seconds()
    report = {
        "name": name,
        "recipe_hash": recipe_hash(name, recipe),
        "recipe": asdict(recipe),
        "training_seconds": round(seconds, 1),
        "training_cpu_seconds": round(cpu_seconds, 1),
        "final_loss": round(final_loss, 5),
        "held_out": held_out,
        "threads": recipe.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    summary = ", ".join(f"{key} {value:.1%}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in held_out.items())
    _log(f"trained {name} in {seconds:.0f} s ({cpu_seconds:.0f} s CPU): held-out {summary}")
    return report


def read_training_report(folder: str | Path) -> dict:
    """The `training_report.json` of a trained shapes model folder."""
    return json.loads((Path(folder) / REPORT_FILE).read_text())


def _recipe(name: str, recipe: object | None, kind: type) -> object:
    # Looked up at call time, so a recipe registered (or patched) later is the one trained.
    recipe = shapes_recipes.RECIPES[name] if recipe is None else recipe
    if not isinstance(recipe, kind):
        raise TypeError(f"{name} needs a {kind.__name__}, got {type(recipe).__name__}")
    return recipe


# --------------------------------------------------------------------------- shapes-clip


def make_shapes_clip_tokenizer(max_length: int):
    """A `CLIPTokenizer` whose merges make every shapes-world word a single token.

    It is a byte-level BPE like CLIP's, so any other text still tokenizes (into bytes).
    """
    corpus = tuple(" ".join([word] * 3) for word in WORLD_WORDS)
    return make_clip_tokenizer(model_max_length=max_length, num_merges=80, corpus=corpus)


def _clip_model(recipe: ClipRecipe, tokenizer):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    tower = dict(hidden_size=recipe.hidden_size, intermediate_size=2 * recipe.hidden_size,
                 num_attention_heads=recipe.heads, num_hidden_layers=recipe.layers)
    text = CLIPTextConfig(
        **tower,
        vocab_size=len(tokenizer),
        max_position_embeddings=recipe.max_text_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(**tower, image_size=recipe.world.image_size,
                              patch_size=recipe.patch_size)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=recipe.projection_dim)
    return CLIPModel(config)


def _clip_image_processor(image_size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size})


def _normalise(images: torch.Tensor, image_processor) -> torch.Tensor:
    """What the image processor does to a [0, 1] image of the model's size."""
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    return (images - mean) / std


def build_shapes_clip(out_dir: Path, models_dir: Path | None = None,
                      recipe: ClipRecipe | None = None) -> dict:
    """Train shapes-clip and save it (model, processor, report) into `out_dir`.

    Returns the training report.
    """
    from transformers import CLIPProcessor

    recipe = _recipe("shapes-clip", recipe, ClipRecipe)
    clock = _Clock()
    with _training_session("shapes-clip", recipe.threads, recipe.seed):
        tokenizer = make_shapes_clip_tokenizer(recipe.max_text_tokens)
        image_processor = _clip_image_processor(recipe.world.image_size)
        model = _clip_model(recipe, tokenizer)
        final_loss = _train_clip(model, tokenizer, image_processor, recipe)
        held_out = _evaluate_clip(model, tokenizer, image_processor, recipe)
    model.eval()
    with quiet_saving():
        model.save_pretrained(out_dir, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return _write_report(out_dir, "shapes-clip", recipe, clock, final_loss, held_out)


def _caption_tokens(tokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(captions, padding=True, return_tensors="pt"))


def _train_clip(model, tokenizer, image_processor, recipe: ClipRecipe) -> float:
    pixels, attributes = recipe.world.arrays(recipe.train_images, TRAIN_SEED)
    images = _normalise(_images_to_unit(pixels), image_processor)
    captions = _caption_indices(attributes)
    tokens = _caption_tokens(tokenizer, all_captions())
    batches = _batches(len(images), recipe.batch_size, recipe.steps, recipe.seed)
    optimizer, schedule = _optimizer(model.parameters(), recipe.learning_rate,
                                     recipe.weight_decay, recipe.warmup_steps, recipe.steps)
    model.train()

    def step(number: int) -> float:
        chosen = batches[number - 1]
        batch_captions = captions[chosen]
        image_embeds = F.normalize(model.get_image_features(pixel_values=images[chosen]).pooler_output, dim=-1)
        text_embeds = F.normalize(model.get_text_features(
            **{key: value[batch_captions] for key, value in tokens.items()}).pooler_output, dim=-1)
        logits = model.logit_scale.exp() * image_embeds @ text_embeds.T
        # Several images in a batch share a caption: every match is a right answer.
        same = (batch_captions[:, None] == batch_captions[None, :]).float()
        targets = same / same.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        loss_value = _descend(loss, optimizer, schedule)
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100.0))
        return loss_value

    return _train_loop("shapes-clip", recipe.steps, step)


@torch.no_grad()
def _evaluate_clip(model, tokenizer, image_processor, recipe: ClipRecipe) -> dict:
    """Zero-shot accuracy over the 90 captions on held-out images, overall and per attribute."""
    model.eval()
    pixels, attributes = recipe.world.arrays(recipe.held_out_images, HELD_OUT_SEED)
    images = _normalise(_images_to_unit(pixels), image_processor)
    captions = all_captions()
    image_embeds = F.normalize(model.get_image_features(pixel_values=images).pooler_output, dim=-1)
    text_embeds = F.normalize(model.get_text_features(**_caption_tokens(tokenizer, captions))
                              .pooler_output, dim=-1)
    predicted = (image_embeds @ text_embeds.T).argmax(dim=1).tolist()
    truth = _caption_indices(attributes).tolist()
    return _attribute_accuracies([captions[p] for p in predicted], [captions[t] for t in truth])


def _attribute_accuracies(predicted: list[str], truth: list[str]) -> dict:
    """Exact-caption accuracy plus shape, colour and background accuracy (read from words)."""
    def words(caption: str) -> dict:
        parsed = parse_caption(caption)
        return parsed or {"shape": None, "colour": None, "background": None}

    pairs = [(words(p), words(t)) for p, t in zip(predicted, truth, strict=True)]
    result = {"images": len(truth),
              "exact": sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)}
    for key in ("colour", "shape", "background"):
        result[key] = sum(p[key] == t[key] for p, t in pairs) / len(pairs)
    return result


def parse_caption(caption: str) -> dict | None:
    """{"shape", "colour", "background"} of a caption in the world's form, else None."""
    words = caption.lower().replace(".", " ").split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    colour, shape, background = words[1], words[2], words[5]
    if shape not in SHAPES or colour not in COLOUR_NAMES or background not in COLOUR_NAMES:
        return None
    return {"shape": shape, "colour": colour, "background": background}


# --------------------------------------------------------------------------- shapes-captioner


def make_shapes_bert_tokenizer():
    """A BERT WordPiece tokenizer holding each shapes-world word whole, plus letters and
    digits so other text still tokenizes."""
    from transformers import BertTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","]
    tokens += list(letters) + [f"##{c}" for c in letters] + list(WORLD_WORDS)
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def _captioner_model(recipe: CaptionerRecipe, tokenizer):
    from transformers import (
        BertConfig,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    size = dict(hidden_size=recipe.hidden_size, intermediate_size=2 * recipe.hidden_size,
                num_attention_heads=recipe.heads, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    encoder = ViTConfig(**size, num_hidden_layers=recipe.encoder_layers,
                        image_size=recipe.world.image_size, patch_size=recipe.patch_size)
    decoder = BertConfig(
        **size,
        num_hidden_layers=recipe.decoder_layers,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,  # room for LocalCaptionServing's max_new_tokens
        is_decoder=True,
        add_cross_attention=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    start, end, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = start, end, pad
    model = VisionEncoderDecoderModel(config=config)
    generation = model.generation_config
    generation.decoder_start_token_id, generation.bos_token_id = start, start
    generation.eos_token_id, generation.pad_token_id = end, pad
    return model


def build_shapes_captioner(out_dir: Path, models_dir: Path | None = None,
                           recipe: CaptionerRecipe | None = None) -> dict:
    """Train shapes-captioner and save it (model, image processor, tokenizer, report) into
    `out_dir`. Returns the training report."""
    from transformers import ViTImageProcessor

    recipe = _recipe("shapes-captioner", recipe, CaptionerRecipe)
    size = recipe.world.image_size
    clock = _Clock()
    with _training_session("shapes-captioner", recipe.threads, recipe.seed):
        tokenizer = make_shapes_bert_tokenizer()
        image_processor = ViTImageProcessor(size={"height": size, "width": size})
        model = _captioner_model(recipe, tokenizer)
        final_loss = _train_captioner(model, tokenizer, image_processor, recipe)
        held_out = _evaluate_captioner(model, tokenizer, image_processor, recipe)
    model.eval()
    with quiet_saving():
        model.save_pretrained(out_dir, safe_serialization=True)
    image_processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return _write_report(out_dir, "shapes-captioner", recipe, clock, final_loss, held_out)


def _train_captioner(model, tokenizer, image_processor, recipe: CaptionerRecipe) -> float:
    pixels, attributes = recipe.world.arrays(recipe.train_images, TRAIN_SEED)
    images = _normalise(_images_to_unit(pixels), image_processor)
    captions = _caption_indices(attributes)
    # [CLS] caption [SEP]: the decoder reads all but the last token and predicts all but the first.
    ids = tokenizer(all_captions(), padding=True, return_tensors="pt")["input_ids"]
    batches = _batches(len(images), recipe.batch_size, recipe.steps, recipe.seed)
    optimizer, schedule = _optimizer(model.parameters(), recipe.learning_rate,
                                     recipe.weight_decay, recipe.warmup_steps, recipe.steps)
    model.train()

    def step(number: int) -> float:
        chosen = batches[number - 1]
        tokens = ids[captions[chosen]]
        logits = model(pixel_values=images[chosen], decoder_input_ids=tokens[:, :-1]).logits
        targets = tokens[:, 1:].masked_fill(tokens[:, 1:] == tokenizer.pad_token_id, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return _descend(loss, optimizer, schedule)

    return _train_loop("shapes-captioner", recipe.steps, step)


@torch.no_grad()
def _evaluate_captioner(model, tokenizer, image_processor, recipe: CaptionerRecipe) -> dict:
    """Greedy captions of held-out images: exact, colour, shape and background accuracy."""
    model.eval()
    pixels, attributes = recipe.world.arrays(recipe.held_out_images, HELD_OUT_SEED)
    images = _normalise(_images_to_unit(pixels), image_processor)
    output = model.generate(pixel_values=images, max_new_tokens=12, do_sample=False)
    predicted = [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]
    truth = [caption_for(a["shape"], a["colour"], a["background"]) for a in attributes]
    return _attribute_accuracies(predicted, truth)


# --------------------------------------------------------------------------- shapes-sd


def build_shapes_sd(out_dir: Path, models_dir: Path | None = None,
                    recipe: DiffusionRecipe | None = None) -> dict:
    """Train shapes-sd and save the pipeline and its report into `out_dir`.

    Its text encoder and tokenizer are shapes-clip's (trained first, through the same
    cache in `models_dir`, when missing), frozen: the VAE and the UNet are trained here.
    Returns the training report.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from dataflowmm.models.tiny import tiny_model_path

    recipe = _recipe("shapes-sd", recipe, DiffusionRecipe)
    clip_folder = tiny_model_path("shapes-clip", models_dir)
    clock = _Clock()
    with _training_session("shapes-sd", recipe.threads, recipe.seed):
        tokenizer = CLIPTokenizer.from_pretrained(clip_folder)
        text_encoder = _text_encoder_from_clip(clip_folder)
        pixels, attributes = recipe.world.arrays(recipe.train_images, TRAIN_SEED)
        images = _images_to_unit(pixels) * 2.0 - 1.0
        vae = _train_vae(images, recipe)
        latents = _encode_latents(vae, images)
        prompts = _prompt_embeddings(text_encoder, tokenizer, ["", *all_captions()])
        unet, final_loss = _train_unet(latents, _caption_indices(attributes) + 1, prompts, recipe)
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
    return _write_report(out_dir, "shapes-sd", recipe, clock, final_loss, held_out)


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
    batches = _batches(len(images), recipe.vae_batch_size, recipe.vae_steps, recipe.seed + 1)
    noise = torch.Generator().manual_seed(recipe.seed + 2)
    optimizer, schedule = _optimizer(vae.parameters(), recipe.vae_learning_rate, 0.0,
                                     recipe.warmup_steps, recipe.vae_steps)
    vae.train()

    def step(number: int) -> float:
        batch = images[batches[number - 1]]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=noise)).sample
        loss = F.mse_loss(reconstruction, batch) + recipe.vae_kl_weight * posterior.kl().mean()
        return _descend(loss, optimizer, schedule)

    _train_loop("shapes-sd (autoencoder)", recipe.vae_steps, step)
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
    batches = _batches(len(latents), size, steps, recipe.seed + 3)
    draws = torch.Generator().manual_seed(recipe.seed + 4)
    optimizer, schedule = _optimizer(unet.parameters(), recipe.unet_learning_rate, 0.0,
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
        loss_value = _descend(loss, optimizer, schedule)
        with torch.no_grad():
            # Warm-up of the average: early weights are forgotten quickly.
            decay = min(recipe.ema_decay, (1 + number) / (10 + number))
            for kept, current in zip(average.parameters(), unet.parameters(), strict=True):
                kept.lerp_(current, 1.0 - decay)
        return loss_value

    final_loss = _train_loop("shapes-sd (unet)", steps, step)
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
