"""Tiny random-weight models for difference captioning: a LLaVA-NeXT chat VLM and BLIP-ITM.

Built like `tiny_captioners` (same tokenizers, sizes and chat template), so they load
through the real `from_pretrained` code: `AutoModelForImageTextToText` for the VLM,
`BlipForImageTextRetrieval` for image-text matching.
"""

from __future__ import annotations

from pathlib import Path

from dataflowmm.models.tiny_captioners import (
    HIDDEN,
    IMAGE_SIZE,
    LLAVA_CHAT_TEMPLATE,
    PATCH_SIZE,
    _blip_image_processor,
    _seed,
    _small,
    _vision,
    _vocab_size,
    blip_config,
    make_bert_tokenizer,
    make_opt_tokenizer,
    unprintable_byte_token_ids,
)


def build_tiny_llava_next(out_dir: Path) -> None:
    """A tiny LLaVA-NeXT (llava-v1.6-like, Data-Juicer's default family): any-resolution tiling."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tokenizer = make_opt_tokenizer()  # "</s>" bos/eos, "<pad>", "<image>"
    tokenizer.padding_side = "left"
    text_config = LlamaConfig(
        **_small(num_key_value_heads=4),
        vocab_size=_vocab_size(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_vision(projection_dim=HIDDEN)),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=pinpoints,
    )
    _seed()
    model = LlavaNextForConditionalGeneration(config).eval()
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.suppress_tokens = unprintable_byte_token_ids(tokenizer)
    model.save_pretrained(out_dir)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=pinpoints,
    )
    LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(out_dir)


def build_tiny_blip_itm(out_dir: Path) -> None:
    """A tiny `BlipForImageTextRetrieval` (the blip-itm-base-coco layout) with a BERT tokenizer."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    tokenizer = make_bert_tokenizer()
    config = blip_config(tokenizer)
    _seed()
    BlipForImageTextRetrieval(config).eval().save_pretrained(out_dir)
    BlipProcessor(image_processor=_blip_image_processor(), tokenizer=tokenizer).save_pretrained(out_dir)
