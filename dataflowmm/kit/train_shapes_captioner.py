"""shapes-captioner: a `VisionEncoderDecoderModel` (ViT + BERT-style decoder, for
`LocalCaptionServing`) trained on shapes-world captions; held out: exact-caption, colour,
shape and background accuracy."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from dataflowmm.kit.shapes import HELD_OUT_SEED, TRAIN_SEED, all_captions, caption_for
from dataflowmm.kit.shapes_recipes import CaptionerRecipe
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
from dataflowmm.models.tiny_diffusion import quiet_saving


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

    recipe = recipe_for("shapes-captioner", recipe, CaptionerRecipe)
    size = recipe.world.image_size
    clock = Clock()
    with training_session("shapes-captioner", recipe.threads, recipe.seed):
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
    return write_report(out_dir, "shapes-captioner", recipe, clock, final_loss, held_out)


def _train_captioner(model, tokenizer, image_processor, recipe: CaptionerRecipe) -> float:
    pixels, attributes = recipe.world.arrays(recipe.train_images, TRAIN_SEED)
    images = normalise(images_to_unit(pixels), image_processor)
    captions = caption_indices(attributes)
    # [CLS] caption [SEP]: the decoder reads all but the last token and predicts all but the first.
    ids = tokenizer(all_captions(), padding=True, return_tensors="pt")["input_ids"]
    batches = sample_batches(len(images), recipe.batch_size, recipe.steps, recipe.seed)
    optimizer, schedule = make_optimizer(model.parameters(), recipe.learning_rate,
                                     recipe.weight_decay, recipe.warmup_steps, recipe.steps)
    model.train()

    def step(number: int) -> float:
        chosen = batches[number - 1]
        tokens = ids[captions[chosen]]
        logits = model(pixel_values=images[chosen], decoder_input_ids=tokens[:, :-1]).logits
        targets = tokens[:, 1:].masked_fill(tokens[:, 1:] == tokenizer.pad_token_id, -100)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return descend(loss, optimizer, schedule)

    return train_loop("shapes-captioner", recipe.steps, step)


@torch.no_grad()
def _evaluate_captioner(model, tokenizer, image_processor, recipe: CaptionerRecipe) -> dict:
    """Greedy captions of held-out images: exact, colour, shape and background accuracy."""
    model.eval()
    pixels, attributes = recipe.world.arrays(recipe.held_out_images, HELD_OUT_SEED)
    images = normalise(images_to_unit(pixels), image_processor)
    output = model.generate(pixel_values=images, max_new_tokens=12, do_sample=False)
    predicted = [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]
    truth = [caption_for(a["shape"], a["colour"], a["background"]) for a in attributes]
    return attribute_accuracies(predicted, truth)


def evaluate_shapes_captioner(folder: Path, recipe: CaptionerRecipe | None = None) -> dict:
    """The held-out figures of the shapes-captioner saved in `folder` (its training's evaluation)."""
    from transformers import AutoTokenizer, VisionEncoderDecoderModel, ViTImageProcessor

    recipe = recipe_for("shapes-captioner", recipe, CaptionerRecipe)
    model = VisionEncoderDecoderModel.from_pretrained(folder, dtype=torch.float32)
    return _evaluate_captioner(model, AutoTokenizer.from_pretrained(folder),
                               ViTImageProcessor.from_pretrained(folder), recipe)
