"""shapes-clip: a `CLIPModel` + `CLIPProcessor` (for `ClipServing`) trained contrastively on
shapes-world image-caption pairs; held out: zero-shot caption accuracy."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from dataflowmm.kit.shapes import HELD_OUT_SEED, TRAIN_SEED, all_captions
from dataflowmm.kit.shapes_recipes import ClipRecipe
from dataflowmm.kit.shapes_training import (
    WORLD_WORDS,
    Clock,
    attribute_accuracies,
    caption_indices,
    descend,
    images_to_unit,
    make_optimizer,
    normalise,
    recipe_for,
    sample_batches,
    train_loop,
    training_session,
    write_report,
)
from dataflowmm.models.offline_tokenizers import make_clip_tokenizer
from dataflowmm.models.tiny_diffusion import quiet_saving


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



def build_shapes_clip(out_dir: Path, models_dir: Path | None = None,
                      recipe: ClipRecipe | None = None) -> dict:
    """Train shapes-clip and save it (model, processor, report) into `out_dir`.

    Returns the training report.
    """
    from transformers import CLIPProcessor

    recipe = recipe_for("shapes-clip", recipe, ClipRecipe)
    clock = Clock()
    with training_session("shapes-clip", recipe.threads, recipe.seed):
        tokenizer = make_shapes_clip_tokenizer(recipe.max_text_tokens)
        image_processor = _clip_image_processor(recipe.world.image_size)
        model = _clip_model(recipe, tokenizer)
        final_loss = _train_clip(model, tokenizer, image_processor, recipe)
        held_out = _evaluate_clip(model, tokenizer, image_processor, recipe)
    model.eval()
    with quiet_saving():
        model.save_pretrained(out_dir, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return write_report(out_dir, "shapes-clip", recipe, clock, final_loss, held_out)


def _caption_tokens(tokenizer, captions: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(captions, padding=True, return_tensors="pt"))


def _train_clip(model, tokenizer, image_processor, recipe: ClipRecipe) -> float:
    pixels, attributes = recipe.world.arrays(recipe.train_images, TRAIN_SEED)
    images = normalise(images_to_unit(pixels), image_processor)
    captions = caption_indices(attributes)
    tokens = _caption_tokens(tokenizer, all_captions())
    batches = sample_batches(len(images), recipe.batch_size, recipe.steps, recipe.seed)
    optimizer, schedule = make_optimizer(model.parameters(), recipe.learning_rate,
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
        loss_value = descend(loss, optimizer, schedule)
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100.0))
        return loss_value

    return train_loop("shapes-clip", recipe.steps, step)


@torch.no_grad()
def _evaluate_clip(model, tokenizer, image_processor, recipe: ClipRecipe) -> dict:
    """Zero-shot accuracy over the 90 captions on held-out images, overall and per attribute."""
    model.eval()
    pixels, attributes = recipe.world.arrays(recipe.held_out_images, HELD_OUT_SEED)
    images = normalise(images_to_unit(pixels), image_processor)
    captions = all_captions()
    image_embeds = F.normalize(model.get_image_features(pixel_values=images).pooler_output, dim=-1)
    text_embeds = F.normalize(model.get_text_features(**_caption_tokens(tokenizer, captions))
                              .pooler_output, dim=-1)
    predicted = (image_embeds @ text_embeds.T).argmax(dim=1).tolist()
    truth = caption_indices(attributes).tolist()
    return attribute_accuracies([captions[p] for p in predicted], [captions[t] for t in truth])


def evaluate_shapes_clip(folder: Path, recipe: ClipRecipe | None = None) -> dict:
    """The held-out figures of the shapes-clip saved in `folder` (its training's evaluation)."""
    from transformers import CLIPModel, CLIPProcessor

    recipe = recipe_for("shapes-clip", recipe, ClipRecipe)
    processor = CLIPProcessor.from_pretrained(folder)
    model = CLIPModel.from_pretrained(folder, dtype=torch.float32)
    return _evaluate_clip(model, processor.tokenizer, processor.image_processor, recipe)
