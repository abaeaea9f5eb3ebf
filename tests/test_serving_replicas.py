"""Several replicas of one serving (one per device) give what one replica gives: CLIP, ITM and
the local VLM on tiny models, with two CPU "devices" taking the same path as two GPUs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dataflowmm.serving import (
    ClipServing,
    ImageTextMatchingServing,
    LocalCaptionServing,
    LocalImageGenServing,
    LocalVLMServing,
    VLMPrompt,
)

TEXTS = ["a red square", "a green circle", "a blue triangle", "two shapes", "a cat", "a tree", "a car"]


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (24 + 8 * (i % 3), 32, 3), dtype=np.uint8)) for i in range(count)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _calls_per_replica(serving, method: str) -> list[list[int]]:
    """Wraps `method` of every replica's model to record the batch size of each call."""
    calls: list[list[int]] = []
    for replica in serving._replicas:
        own: list[int] = []
        original = getattr(replica.model, method)

        def counting(*args, _original=original, _own=own, **kwargs):
            first = next(value for value in [*args, *kwargs.values()] if isinstance(value, torch.Tensor))
            _own.append(int(first.shape[0]))
            return _original(*args, **kwargs)

        setattr(replica.model, method, counting)
        calls.append(own)
    return calls


def test_clip_on_two_replicas_equals_one(tiny_model):
    one = ClipServing(tiny_model("tiny-clip"), batch_size=2, device="cpu")
    two = ClipServing(tiny_model("tiny-clip"), batch_size=2, device=["cpu", "cpu"])
    assert two.devices == ["cpu", "cpu"] and two.config() == one.config()
    images = _images(5)
    two.load()
    assert len(two._replicas) == 2
    calls = _calls_per_replica(two, "get_image_features")
    assert torch.equal(two.embed_images(images), one.embed_images(images))
    assert calls == [[2, 1], [2]]  # replica r takes batches r, r + 2, ...
    assert torch.equal(two.embed_texts(TEXTS), one.embed_texts(TEXTS))
    assert torch.equal(two.image_text_similarity(images, TEXTS[:5]), one.image_text_similarity(images, TEXTS[:5]))


def test_itm_on_two_replicas_equals_one(tiny_model):
    one = ImageTextMatchingServing(tiny_model("tiny-blip-itm"), batch_size=2, device="cpu")
    two = ImageTextMatchingServing(tiny_model("tiny-blip-itm"), batch_size=2, device=["cpu", "cpu"])
    assert two.config() == one.config()
    images = _images(5)
    assert two.score(images, TEXTS[:5]) == one.score(images, TEXTS[:5])
    assert len(two._replicas) == 2 and two.forward_calls == 3


def test_local_vlm_on_two_replicas_equals_one(tiny_model):
    settings = {"max_new_tokens": 4, "batch_size": 2}
    one = LocalVLMServing(tiny_model("tiny-chat-vlm"), device="cpu", **settings)
    two = LocalVLMServing(tiny_model("tiny-chat-vlm"), device=["cpu", "cpu"], **settings)
    assert two.config() == one.config()
    red, green = (Image.new("RGB", (24, 24), colour) for colour in ((200, 20, 20), (20, 200, 20)))
    prompts = [VLMPrompt((red,), "Describe it."), VLMPrompt((green, red), "What differs?"),
               VLMPrompt((), "Say hello."), VLMPrompt((green,), "Which colour?"), VLMPrompt((red,), "Shape?")]
    seeds = [5, 6, 7, 8, 9]
    two.load()
    calls = _calls_per_replica(two, "generate")
    answers = two.generate(prompts, seeds)
    assert answers == one.generate(prompts, seeds) and all(isinstance(a, str) for a in answers)
    assert calls == [[2, 1], [2]]


def test_captions_on_two_replicas_equal_one_each_replica_with_its_own_tokenizer(tiny_model):
    settings = {"max_new_tokens": 4, "batch_size": 2, "caption_num": 2, "do_sample": True}
    one = LocalCaptionServing(tiny_model("tiny-blip2"), device="cpu", **settings)
    two = LocalCaptionServing(tiny_model("tiny-blip2"), device=["cpu", "cpu"], **settings)
    assert two.config() == one.config()
    two.load()
    first, second = two._replicas
    assert first.processor.tokenizer is not second.processor.tokenizer  # replicas run in threads
    calls = _calls_per_replica(two, "generate")
    images, seeds = _images(5), [11, 12, 13, 14, 15]
    assert two.caption(images, seeds=seeds) == one.caption(images, seeds=seeds)
    assert calls == [[2, 1], [2]]  # replica r takes batches r, r + 2, ...


@pytest.mark.parametrize("serving_class", [ClipServing, ImageTextMatchingServing, LocalVLMServing,
                                           LocalCaptionServing, LocalImageGenServing])
@pytest.mark.parametrize("device", [[], ["cpu", 0], "", ("cpu", " "), 1])
def test_device_must_name_devices(tiny_model, serving_class, device):
    with pytest.raises(ValueError, match=r"device must be a device name \(\"cpu\", \"cuda:1\"\), a non-empty list of them"):
        serving_class(tiny_model("tiny-clip"), device=device)


def test_a_serving_on_listed_devices_travels_without_models(tiny_model):
    serving = ClipServing(tiny_model("tiny-clip"), batch_size=2, device=["cpu", "cpu"])
    serving.embed_texts(["a cat"])
    serving.fitted_batch_size = 1  # what fit here says nothing about where it lands
    travelled = pickle.loads(pickle.dumps(serving))
    assert travelled.devices == ["cpu", "cpu"] and not travelled.loaded
    assert travelled.fitted_batch_size is None and serving.loaded
    assert torch.equal(travelled.embed_texts(["a cat"]), serving.embed_texts(["a cat"]))
    assert len(travelled._replicas) == 2
