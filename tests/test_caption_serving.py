"""LocalCaptionServing on the tiny captioners (CPU): counts, order, prompts, seeds, reloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from dataflowmm.models.tiny_captioners import build_tiny_chat_vlm
from dataflowmm.serving.caption import LocalCaptionServing, SeededSamplingLogitsProcessor

transformers.logging.set_verbosity_error()

FAMILIES = ["tiny-blip", "tiny-blip2", "tiny-vision-encoder-decoder"]


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def servings(tiny_model):
    """One loaded sampling serving per family (caption_num 3), shared by the module."""
    made = {
        name: LocalCaptionServing(tiny_model(name), caption_num=3, max_new_tokens=8, batch_size=4)
        for name in FAMILIES
    }
    yield made
    for serving in made.values():
        serving.cleanup()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-chat-vlm")
    build_tiny_chat_vlm(folder)
    return folder


# ---------------------------------------------------------------- constructor


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"caption_num": 0}, "caption_num"),
        ({"batch_size": 0}, "batch_size"),
        ({"torch_dtype": "int3"}, "torch_dtype"),
        ({"top_p": 0.0}, "top_p"),
        ({"generate_kwargs": {"do_sample": True}}, "do_sample"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalCaptionServing("some-org/some-model", **kwargs)


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LocalCaptionServing(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="nope"):
        LocalCaptionServing("./nope")
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="weights.bin"):
        LocalCaptionServing(str(a_file))


def test_unloadable_model_fails_on_first_use_with_advice(tmp_path):
    serving = LocalCaptionServing(tmp_path)  # an empty folder: constructing loads nothing
    with pytest.raises(RuntimeError, match="dataflowmm models tiny") as error:
        serving.caption(_images(1))
    assert str(tmp_path) in str(error.value)


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("name", FAMILIES)
def test_caption_num_strings_per_image_in_input_order(servings, name):
    serving = servings[name]
    images = _images(3)
    together = serving.caption(images, seeds=[5, 6, 7])
    assert len(together) == 3 and all(len(candidates) == 3 for candidates in together)
    assert all(isinstance(text, str) and text == text.strip() for c in together for text in c)
    alone = [serving.caption([image], seeds=[seed])[0] for image, seed in zip(images, [5, 6, 7], strict=True)]
    assert together == alone


@pytest.mark.parametrize("name", FAMILIES)
def test_candidate_does_not_depend_on_batch(servings, name):
    serving, images, seeds = servings[name], _images(5, seed=1), [11, 12, 13, 14, 15]
    results = []
    for batch_size in (1, 4):
        serving.batch_size = batch_size
        results.append(serving.caption(images, seeds=seeds))
    serving.batch_size = 4
    assert results[0] == results[1]
    assert serving.caption(images[2:4], seeds=seeds[2:4]) == results[0][2:4]


@pytest.mark.parametrize("name", FAMILIES)
def test_seeds_make_sampling_reproducible(servings, name):
    serving, images = servings[name], _images(2)
    first = serving.caption(images, seeds=[1, 2])
    assert serving.caption(images, seeds=[1, 2]) == first
    others = serving.caption(images, seeds=[3, 4])
    assert others != first
    assert len({text for candidates in first for text in candidates}) > 1  # candidates differ


def test_greedy_by_default_for_one_caption(tiny_model):
    serving = LocalCaptionServing(tiny_model("tiny-blip2"), max_new_tokens=6)
    images = _images(2)
    assert serving.caption(images, seeds=[1, 2]) == serving.caption(images, seeds=[8, 9])
    beams = LocalCaptionServing(tiny_model("tiny-blip2"), caption_num=2, do_sample=False,
                                max_new_tokens=6).caption(images)
    assert [len(c) for c in beams] == [2, 2]


def test_images_are_converted_to_rgb(servings):
    image = _images(1)[0]
    variants = [image.convert("L"), image.convert("RGBA"), image.convert("P")]
    result = servings["tiny-blip"].caption(variants, caption_num=1)
    assert [len(candidates) for candidates in result] == [1, 1, 1]
    with pytest.raises(TypeError, match="PIL"):
        servings["tiny-blip"].caption([np.zeros((4, 4, 3))])


def test_prompts_per_image_and_length_check(servings):
    serving, images = servings["tiny-blip"], _images(3)
    mixed = serving.caption(images, prompts=["a photo of", None, "a dog"], seeds=[1, 2, 3])
    assert mixed[0] == serving.caption(images[:1], prompts="a photo of", seeds=[1])[0]
    assert mixed[1] == serving.caption(images[1:2], seeds=[2])[0]
    with pytest.raises(ValueError, match="one entry per image"):
        serving.caption(images, prompts=["a", "b"])


# ---------------------------------------------------------------- prompt echo


def _raw_generate(serving, **inputs) -> torch.Tensor:
    model = serving._replicas[0].model
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=serving.max_new_tokens)


def test_blip_prompt_echo_is_cut_by_token_ids(tiny_model):
    serving = LocalCaptionServing(tiny_model("tiny-blip"), max_new_tokens=6)
    images = _images(1)
    captions = serving.caption(images, prompts="a photo of")
    processor = serving._replicas[0].processor.processor
    inputs = processor(images=images, text=["a photo of"], return_tensors="pt")
    prompt_ids = inputs["input_ids"][0, 1:-1].tolist()  # without [CLS] and [SEP]
    raw = _raw_generate(serving, **inputs)[0]
    # BLIP's generate returns [DEC] + the prompt tokens + the new tokens ...
    assert raw[1 : 1 + len(prompt_ids)].tolist() == prompt_ids
    assert processor.tokenizer.decode(raw, skip_special_tokens=True).startswith("a photo of")
    # ... the serving returns only the new ones.
    new = processor.tokenizer.decode(raw[1 + len(prompt_ids) :], skip_special_tokens=True)
    assert captions == [[new.strip()]]


def test_blip2_prompt_echo_is_cut(tiny_model):
    serving = LocalCaptionServing(tiny_model("tiny-blip2"), max_new_tokens=6)
    images = _images(1)
    captions = serving.caption(images, prompts="a photo of")
    processor = serving._replicas[0].processor.processor
    inputs = processor(images=images, text=["a photo of"], return_tensors="pt")
    raw = _raw_generate(serving, **inputs)[0]
    length = inputs["input_ids"].shape[1]
    assert raw[:length].tolist() == inputs["input_ids"][0].tolist()  # the echo
    assert captions == [[processor.tokenizer.decode(raw[length:], skip_special_tokens=True).strip()]]


def test_vision_encoder_decoder_prompt_is_a_decoder_prefix(tiny_model):
    serving = LocalCaptionServing(tiny_model("tiny-vision-encoder-decoder"), max_new_tokens=6)
    images = _images(1)
    captions = serving.caption(images, prompts="a photo of")
    tokenizer = serving._replicas[0].processor.tokenizer
    model = serving._replicas[0].model
    start = model.generation_config.decoder_start_token_id
    prefix = [start] + tokenizer("a photo of", add_special_tokens=False)["input_ids"]
    pixels = serving._replicas[0].processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    raw = _raw_generate(serving, pixel_values=pixels, decoder_input_ids=torch.tensor([prefix]))[0]
    assert raw[: len(prefix)].tolist() == prefix
    assert captions == [[tokenizer.decode(raw[len(prefix) :], skip_special_tokens=True).strip()]]


def test_chat_vlm_returns_only_the_answer(chat_model):
    serving = LocalCaptionServing(chat_model, caption_num=2, max_new_tokens=6, batch_size=2)
    images = _images(3)
    captions = serving.caption(images, prompts="What is in the picture?", seeds=[1, 2, 3])
    assert [len(c) for c in captions] == [2, 2, 2]
    assert captions[1] == serving.caption(images[1:2], prompts="What is in the picture?",
                                          seeds=[2])[0]
    # Greedy: compare with the raw output, whose first tokens are the whole chat prompt.
    greedy = LocalCaptionServing(chat_model, max_new_tokens=6)
    caption = greedy.caption(images[:1])[0][0]
    processor = greedy._replicas[0].processor.processor
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe this image in one sentence."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images[:1], text=[text], return_tensors="pt")
    raw = _raw_generate(greedy, **inputs)[0]
    length = inputs["input_ids"].shape[1]
    assert processor.tokenizer.decode(raw[:length]).startswith("</s>USER: <image>")
    assert caption == processor.tokenizer.decode(raw[length:], skip_special_tokens=True).strip()


# ---------------------------------------------------------------- lifecycle, config


def test_cleanup_then_caption_again(tiny_model):
    serving = LocalCaptionServing(tiny_model("tiny-blip"), caption_num=2, max_new_tokens=6)
    images = _images(2)
    before = serving.caption(images, seeds=[1, 2])
    serving.cleanup()
    assert not serving.loaded
    assert serving.caption(images, seeds=[1, 2]) == before


def test_config_is_json_and_tracks_output_settings(tiny_model):
    folder = tiny_model("tiny-blip")
    config = LocalCaptionServing(folder, caption_num=2).config()
    assert json.loads(json.dumps(config)) == config
    assert config["model"] == str(folder) and config["caption_num"] == 2
    assert config["dtype"] == "float32"
    assert LocalCaptionServing(folder, caption_num=2, batch_size=1).config() == config
    assert LocalCaptionServing(folder, caption_num=2, top_p=0.5).config() != config


# ---------------------------------------------------------------- the sampler


def test_seeded_sampler_rows_are_independent():
    scores = torch.randn(3, 50)
    together = SeededSamplingLogitsProcessor([1, 2, 3], temperature=1.0, top_p=0.9)(None, scores)
    alone = SeededSamplingLogitsProcessor([2], temperature=1.0, top_p=0.9)(None, scores[1:2])
    assert torch.equal(together[1:2], alone)
    assert (torch.isfinite(together).sum(dim=-1) == 1).all()


def test_seeded_sampler_respects_top_p():
    scores = torch.tensor([[10.0, 9.0, -5.0, -5.0]]).repeat(200, 1)
    out = SeededSamplingLogitsProcessor(list(range(200)), temperature=1.0, top_p=0.5)(None, scores)
    assert set(out.argmax(dim=-1).tolist()) == {0}
    out = SeededSamplingLogitsProcessor(list(range(200)), temperature=1.0, top_p=0.99)(None, scores)
    assert set(out.argmax(dim=-1).tolist()) == {0, 1}
