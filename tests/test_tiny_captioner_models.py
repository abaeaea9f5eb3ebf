"""The tiny captioner builders: deterministic, small, and loadable through the Auto classes."""

from __future__ import annotations

import json

import pytest
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from dataflowmm.models import tiny_captioners
from dataflowmm.models.tiny_captioners import (
    WORDS,
    build_tiny_blip,
    build_tiny_chat_vlm,
    make_bert_tokenizer,
    make_gpt2_tokenizer,
    make_opt_tokenizer,
)

transformers.logging.set_verbosity_error()

EXPECTED = {
    "tiny-blip": ("BlipForConditionalGeneration", "BlipProcessor"),
    "tiny-blip2": ("Blip2ForConditionalGeneration", "Blip2Processor"),
    # Like nlpconnect/vit-gpt2: no combined processor, AutoProcessor gives the tokenizer.
    "tiny-vision-encoder-decoder": ("VisionEncoderDecoderModel", "GPT2Tokenizer"),
}


def _folder_size(folder) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builds_and_loads_through_auto_classes(tiny_model, name):
    folder = tiny_model(name)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert _folder_size(folder) < 5_000_000
    model = AutoModelForImageTextToText.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert (type(model).__name__, type(processor).__name__) == EXPECTED[name]
    assert not model.training


def test_blip_config(tiny_model):
    config = json.loads((tiny_model("tiny-blip") / "config.json").read_text())
    assert config["vision_config"]["initializer_range"] == 0.02
    assert config["vision_config"]["image_size"] == 32
    tokenizer = AutoProcessor.from_pretrained(tiny_model("tiny-blip")).tokenizer
    assert tokenizer.bos_token == "[DEC]"
    assert config["text_config"]["bos_token_id"] == tokenizer.bos_token_id


def test_blip2_image_token_matches_tokenizer(tiny_model):
    folder = tiny_model("tiny-blip2")
    config = json.loads((folder / "config.json").read_text())
    processor = AutoProcessor.from_pretrained(folder)
    assert config["image_token_index"] == processor.tokenizer.convert_tokens_to_ids("<image>")
    assert config["num_query_tokens"] == processor.num_query_tokens == 4


def test_vision_encoder_decoder_special_tokens(tiny_model):
    folder = tiny_model("tiny-vision-encoder-decoder")
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for settings in (config, generation):
        assert settings["decoder_start_token_id"] == tokenizer.eos_token_id
        assert settings["pad_token_id"] == tokenizer.pad_token_id != tokenizer.eos_token_id


def test_builds_are_deterministic(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    build_tiny_blip(first)
    build_tiny_blip(second)
    weights = [(folder / "model.safetensors").read_bytes() for folder in (first, second)]
    assert weights[0] == weights[1]


def test_chat_vlm_builds_with_a_chat_template(tmp_path):
    build_tiny_chat_vlm(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "USER: <image>\nhi ASSISTANT:"
    assert _folder_size(tmp_path) < 5_000_000


def test_bert_tokenizer_knows_every_word():
    tokenizer = make_bert_tokenizer()
    ids = tokenizer("A photo of a dog", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["a", "photo", "of", "a", "dog"]
    assert all(word in tokenizer.get_vocab() for word in WORDS)
    assert tokenizer.unk_token_id not in tokenizer("zqx 123")["input_ids"]


@pytest.mark.parametrize("make", [make_opt_tokenizer, make_gpt2_tokenizer])
def test_bpe_tokenizers_round_trip_and_keep_words_whole(make):
    tokenizer = make()
    text = "a photo of a dog, Über café 42"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(tokenizer(" dog", add_special_tokens=False)["input_ids"]) == 1
    whole = sum(f"Ġ{word}" in tokenizer.get_vocab() for word in WORDS)
    assert whole > 0.9 * len(WORDS)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_unprintable_byte_tokens_are_single_bytes():
    tokenizer = make_gpt2_tokenizer()
    suppressed = tiny_captioners.unprintable_byte_token_ids(tokenizer)
    assert len(suppressed) == 256 - 95
    assert tokenizer.convert_tokens_to_ids("Ġ") not in suppressed  # the space byte stays
    assert tokenizer.convert_tokens_to_ids("a") not in suppressed
