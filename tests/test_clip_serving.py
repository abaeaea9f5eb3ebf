"""ClipServing on the tiny CLIP model (CPU)."""

from __future__ import annotations

import gc
import json
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from dataflowmm.serving.clip import ClipServing

TEXTS = ["a cat", "a dog in the park", "a red car", "a bowl of fruit", "two people", "a tree"]


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (48, 40), (20, 64)]
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for w, h in (sizes[i % len(sizes)] for i in range(count))
    ]


@pytest.fixture(scope="module")
def clip(tiny_model):
    serving = ClipServing(tiny_model("tiny-clip"), batch_size=4)
    yield serving
    serving.cleanup()


def test_embeddings_are_normalised_float32_cpu(clip):
    images = clip.embed_images(_images(5))
    texts = clip.embed_texts(TEXTS)
    assert images.shape == (5, 16) and texts.shape == (6, 16)
    for embeddings in (images, texts):
        assert embeddings.dtype == torch.float32 and embeddings.device.type == "cpu"
        assert torch.allclose(embeddings.norm(dim=-1), torch.ones(len(embeddings)), atol=1e-5)


def test_identical_inputs_have_similarity_one(clip):
    images = _images(3)
    copies = [image.copy() for image in images]
    assert torch.allclose(clip.image_image_similarity(images, copies), torch.ones(3), atol=1e-5)
    assert torch.allclose(clip.text_text_similarity(TEXTS, list(TEXTS)), torch.ones(6), atol=1e-5)
    pairs = clip.image_text_similarity(images, TEXTS[:3])
    assert pairs.shape == (3,) and bool(((pairs >= -1.0001) & (pairs <= 1.0001)).all())
    different = clip.text_text_similarity(["a cat"], ["a bowl of fruit on a wooden table"])
    assert float(different[0]) < 0.999


def test_results_do_not_depend_on_batch_size(clip, tiny_model):
    one = ClipServing(tiny_model("tiny-clip"), batch_size=1)
    images = _images(5)
    assert torch.allclose(one.embed_images(images), clip.embed_images(images), atol=1e-5)
    assert torch.allclose(one.embed_texts(TEXTS), clip.embed_texts(TEXTS), atol=1e-5)
    one.cleanup()


def test_long_texts_are_truncated_and_odd_images_accepted(clip):
    long_text = "a photo of a cat sitting on a red sofa " * 60
    embeddings = clip.embed_texts([long_text, long_text + "and more words"])
    assert embeddings.shape == (2, 16)
    assert torch.allclose(embeddings[0], embeddings[1], atol=1e-5)  # the tail was cut
    odd = [_images(1)[0].convert("L"), _images(1)[0].convert("RGBA")]
    assert clip.embed_images(odd).shape == (2, 16)


def test_empty_inputs_and_mismatched_pairs(clip):
    assert clip.embed_texts([]).shape == (0, 16)
    assert clip.embed_images([]).shape == (0, 16)
    with pytest.raises(ValueError, match="pairs"):
        clip.text_text_similarity(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="list"):
        clip.embed_texts("a cat")


def test_cleanup_frees_the_model_and_reloads(tiny_model):
    serving = ClipServing(tiny_model("tiny-clip"))
    before = serving.embed_texts(["a cat"])
    model = weakref.ref(serving._replicas[0].model)
    serving.cleanup()
    gc.collect()
    assert not serving.loaded and model() is None
    assert torch.equal(serving.embed_texts(["a cat"]), before)
    serving.cleanup()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
     ({"torch_dtype": "int8"}, "torch_dtype must be one of")],
)
def test_bad_arguments_fail_before_loading(tiny_model, kwargs, message, monkeypatch):
    import transformers

    loads = []
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: loads.append(a))
    with pytest.raises(ValueError, match=message):
        ClipServing(tiny_model("tiny-clip"), **kwargs)
    assert loads == []


def test_missing_folder_and_unloadable_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-clip"):
        ClipServing("./missing-clip")
    serving = ClipServing(tmp_path)  # a folder with no model in it
    assert not serving.loaded
    with pytest.raises(RuntimeError, match=r"(?s)could not load model.*dataflowmm models tiny"):
        serving.embed_texts(["a cat"])
    assert not serving.loaded


def test_config_is_json(clip, tiny_model):
    config = clip.config()
    assert json.loads(json.dumps(config)) == config
    assert config["model"] == str(tiny_model("tiny-clip"))
    assert ClipServing(tiny_model("tiny-clip"), batch_size=2).config() == config
