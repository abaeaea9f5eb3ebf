"""Tiny random-weight image captioners: BLIP, BLIP-2 (OPT), ViT+GPT-2 and a LLaVA-like chat VLM.

Every builder writes a `save_pretrained` folder (model and processor) into an existing
empty folder, deterministically, in about a second. Configs are the real ones shrunk to
32x32 images and 32-wide layers; tokenizers are made in memory from a list of common
English caption words, so even random weights decode to (mostly) words.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dataflowmm.models.offline_tokenizers import byte_alphabet

IMAGE_SIZE = 32
PATCH_SIZE = 8
HIDDEN = 32
SEED = 0

# Common caption words; both tokenizers are built from them.
WORDS: tuple[str, ...] = tuple(
    """
    a an the of in on at with and or to from by for near under over behind next beside
    is are was sitting standing walking running lying holding looking playing eating riding
    flying swimming smiling wearing carrying jumping sleeping parked covered filled made
    photo picture image view close up background foreground top bottom left right front
    man woman boy girl child children people person men women baby crowd player family
    dog cat horse bird cow sheep elephant giraffe zebra bear fish duck animal animals
    car bus truck train bike bicycle motorcycle boat plane airplane street road city
    building house room kitchen table chair bed sofa window door wall floor roof tree
    trees grass field park beach water ocean sea river lake sky cloud clouds sun snow
    mountain hill rock sand flower flowers plant garden food pizza sandwich cake plate
    bowl cup glass bottle fruit apple banana orange bread coffee shirt hat jacket dress
    shoes bag umbrella ball frisbee kite phone computer laptop book clock sign light
    red blue green yellow white black brown gray pink purple orange dark bright small
    large big little old young tall long short wooden metal empty open many two three
    several some other each this that it its their his her together day night sunny
    """.split()
)
PUNCTUATION: tuple[str, ...] = (".", ",", "!", "?", "'", "-")
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# --------------------------------------------------------------------------- tokenizers


def make_bert_tokenizer():
    """A BERT WordPiece tokenizer (uncased) over `WORDS`, with BLIP's "[DEC]" bos token.

    Single letters and digits (and their "##" continuations) are in the vocabulary too,
    so any lowercase ASCII text tokenizes without "[UNK]".
    """
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(PUNCTUATION) + list(LETTERS) + [f"##{c}" for c in LETTERS]
    tokens += [w for w in WORDS if w not in tokens]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def _training_corpus() -> list[str]:
    """Deterministic sentences using every word, for the BPE trainer."""
    words = list(WORDS)
    lines = [" ".join(words[i : i + 8]) for i in range(0, len(words), 8)]
    lines += [f"a photo of a {w}." for w in words]
    return lines + [f"The {w}, the {w}!" for w in words]


def train_byte_level_bpe(special_tokens: list[str], vocab_size: int = 1500):
    """Byte-level BPE (GPT-2 style) vocab and merges trained on the caption words.

    Returns `(vocab, merges)` with merges as tuples, ready for `GPT2Tokenizer`.
    Every byte is in the alphabet, so nothing is ever unknown.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def make_opt_tokenizer():
    """An OPT-style `GPT2Tokenizer` (bos = eos = "</s>", pad "<pad>") plus an "<image>" token."""
    from transformers import GPT2Tokenizer

    vocab, merges = train_byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>"])
    tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def make_gpt2_tokenizer():
    """A GPT-2 style tokenizer: "<|endoftext|>" as bos/eos/unk and a distinct "<pad>"."""
    from transformers import GPT2Tokenizer

    vocab, merges = train_byte_level_bpe(["<|endoftext|>", "<pad>"])
    return GPT2Tokenizer(vocab=vocab, merges=merges, pad_token="<pad>")


def unprintable_byte_token_ids(tokenizer) -> list[int]:
    """Ids of single-byte tokens that are not printable ASCII (control bytes, UTF-8 parts).

    The tiny byte-level models suppress them (`generation_config.suppress_tokens`) so
    random weights decode to words and word pieces rather than control characters.
    """
    vocab = tokenizer.get_vocab()
    table = dict(enumerate(byte_alphabet()))
    return sorted(vocab[table[b]] for b in range(256) if not 32 <= b < 127 and table[b] in vocab)


def _vocab_size(tokenizer) -> int:
    """Embedding rows needed: every id the tokenizer can produce, rounded up to 8."""
    return (len(tokenizer) + 7) // 8 * 8


def _seed() -> None:
    torch.manual_seed(SEED)


def _small(**overrides) -> dict:
    """The shared transformer size: 2 layers, width 32, 4 heads."""
    base = {"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": 2,
            "num_attention_heads": 4}
    base.update(overrides)
    return base


def _vision(**overrides) -> dict:
    return _small(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **overrides)


def _blip_image_processor():
    from transformers import BlipImageProcessor

    return BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def blip_config(tokenizer):
    """A tiny `BlipConfig` (captioning and image-text matching share it) for a BERT tokenizer."""
    from transformers import BlipConfig

    text_config = _small(
        vocab_size=_vocab_size(tokenizer),
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
        initializer_range=0.02,
    )
    # BLIP's vision default initializer_range (1e-10) would leave the weights near zero.
    return BlipConfig(
        text_config=text_config,
        vision_config=_vision(initializer_range=0.02),
        projection_dim=HIDDEN,
        image_text_hidden_size=HIDDEN,
    )


# --------------------------------------------------------------------------- builders


def build_tiny_blip(out_dir: Path) -> None:
    """A tiny `BlipForConditionalGeneration` with a BERT WordPiece tokenizer ([DEC] bos)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    tokenizer = make_bert_tokenizer()
    config = blip_config(tokenizer)
    _seed()
    model = BlipForConditionalGeneration(config).eval()
    model.generation_config.max_length = 20
    model.save_pretrained(out_dir)
    BlipProcessor(image_processor=_blip_image_processor(), tokenizer=tokenizer).save_pretrained(out_dir)


def build_tiny_blip2(out_dir: Path) -> None:
    """A tiny `Blip2ForConditionalGeneration` with an OPT language model and 4 query tokens."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig

    tokenizer = make_opt_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text_config = OPTConfig(
        vocab_size=_vocab_size(tokenizer),
        hidden_size=HIDDEN,
        word_embed_proj_dim=HIDDEN,
        ffn_dim=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config=_vision(initializer_range=0.02),
        qformer_config=_small(encoder_hidden_size=HIDDEN, vocab_size=_vocab_size(tokenizer)),
        text_config=text_config.to_dict(),
        num_query_tokens=4,
        image_token_index=image_token_id,
    )
    _seed()
    model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = unprintable_byte_token_ids(tokenizer)
    model.save_pretrained(out_dir)
    processor = Blip2Processor(image_processor=_blip_image_processor(), tokenizer=tokenizer,
                               num_query_tokens=4)
    processor.save_pretrained(out_dir)


def build_tiny_vision_encoder_decoder(out_dir: Path) -> None:
    """A tiny ViT encoder + GPT-2 decoder (the nlpconnect/vit-gpt2 layout).

    Like that model, the folder holds a `ViTImageProcessor` and a GPT-2 tokenizer but no
    combined processor class: `AutoProcessor` returns the tokenizer alone.
    """
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tokenizer = make_gpt2_tokenizer()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoder = ViTConfig(**_vision())
    decoder = GPT2Config(
        vocab_size=_vocab_size(tokenizer), n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
        add_cross_attention=True, is_decoder=True,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = eos, pad, eos
    _seed()
    model = VisionEncoderDecoderModel(config=config).eval()
    generation = model.generation_config
    generation.decoder_start_token_id, generation.pad_token_id = eos, pad
    generation.bos_token_id, generation.eos_token_id = eos, eos
    generation.suppress_tokens = unprintable_byte_token_ids(tokenizer)
    model.save_pretrained(out_dir)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def build_tiny_chat_vlm(out_dir: Path) -> None:
    """A tiny LLaVA-1.5-like chat VLM: CLIP vision tower + Llama decoder + chat template."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = make_opt_tokenizer()  # "</s>" bos/eos, "<pad>", "<image>"
    tokenizer.padding_side = "left"
    text_config = LlamaConfig(
        **_small(num_key_value_heads=4),
        vocab_size=_vocab_size(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_vision(projection_dim=HIDDEN)),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    _seed()
    model = LlavaForConditionalGeneration(config).eval()
    generation = model.generation_config
    generation.bos_token_id, generation.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.suppress_tokens = unprintable_byte_token_ids(tokenizer)
    model.save_pretrained(out_dir)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
