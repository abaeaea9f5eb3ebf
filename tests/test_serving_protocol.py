"""Servings share one protocol; operators build them from ids or take them as they are."""

import inspect
import json
import pickle

import pytest

from dataflowmm.operators import ImageCaptioner, ImageDiffusionAugmenter, PromptedImageGenerator
from dataflowmm.serving import (
    APIImageGenServing,
    APIVLMServing,
    ClipServing,
    ImageTextMatchingServing,
    LocalCaptionServing,
    LocalImageGenServing,
    LocalVLMServing,
)
from dataflowmm.serving.common import Serving

# Every serving class, and the tiny model it is built on (None: an API serving).
SERVING_MODELS = {
    LocalImageGenServing: "tiny-sd",
    LocalCaptionServing: "tiny-blip",
    ClipServing: "tiny-clip",
    ImageTextMatchingServing: "tiny-blip-itm",
    LocalVLMServing: "tiny-chat-vlm",
    APIImageGenServing: None,
    APIVLMServing: None,
}


@pytest.fixture(scope="module")
def make_serving(tiny_model):
    """make_serving(cls, **settings) -> a serving of class `cls` on its tiny model."""

    def make(cls, **settings):
        if SERVING_MODELS[cls] is None:
            pytest.importorskip("openai")
            # Nothing listens there: loading makes a client and sends nothing.
            return cls("loopback-image", base_url="http://127.0.0.1:9/v1", api_key="sk-test", **settings)
        return cls(str(tiny_model(SERVING_MODELS[cls])), **settings)

    return make


@pytest.mark.parametrize("cls", list(SERVING_MODELS), ids=lambda cls: cls.__name__)
def test_every_serving_follows_the_protocol_and_loads_lazily(make_serving, cls):
    serving = make_serving(cls)
    assert isinstance(serving, Serving)
    assert serving.loaded is False  # constructing never loads a model
    config = serving.config()
    assert json.loads(json.dumps(config)) == config  # plain JSON, as fingerprints need
    assert config["serving"] == cls.__name__ and config["model"] == serving.model
    assert make_serving(cls).config() == config  # the same settings, the same identity
    serving.load()
    assert serving.loaded is True
    travelled = pickle.loads(pickle.dumps(serving))  # to a Ray actor: without its live model
    assert travelled.loaded is False and travelled.config() == config
    serving.cleanup()
    assert serving.loaded is False
    serving.load()  # a cleaned-up serving loads again
    assert serving.loaded is True
    serving.cleanup()


@pytest.mark.parametrize("cls", list(SERVING_MODELS), ids=lambda cls: cls.__name__)
def test_one_name_for_the_batch_size(make_serving, cls):
    batch_settings = [name for name in inspect.signature(cls).parameters if "batch" in name]
    assert batch_settings == ["batch_size"]  # no second name (gpu_batch_size, ...) for the same thing
    assert make_serving(cls, batch_size=3).batch_size == 3
    for wrong in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            make_serving(cls, batch_size=wrong)
    caption = make_serving(LocalCaptionServing, batch_size=3)
    assert ImageCaptioner(caption).input_batch_size == 3  # an operator's rows per batch follow it


def test_a_setting_that_conflicts_with_a_passed_serving_is_an_error(tiny_model):
    caption = LocalCaptionServing(str(tiny_model("tiny-blip")), batch_size=4)
    with pytest.raises(ValueError, match=r"batch_size=2 conflicts with the serving passed as caption_serving "
                                         r"\(batch_size=4\)"):
        ImageCaptioner(caption, batch_size=2)
    assert ImageCaptioner(caption, batch_size=4).serving is caption  # the same value is no conflict
    diffusion = LocalImageGenServing(str(tiny_model("tiny-sd")), task="image2image", strength=0.5)
    with pytest.raises(ValueError, match=r"strength=0\.8 conflicts .* hf_diffusion \(strength=0\.5\)"):
        ImageDiffusionAugmenter(diffusion, strength=0.8, caption_key="caption")
    with pytest.raises(ValueError, match="hf_diffusion must be a serving with task='image2image'"):
        ImageDiffusionAugmenter(LocalImageGenServing(str(tiny_model("tiny-sd"))), caption_key="caption")
    assert not diffusion.loaded and not caption.loaded


def test_operators_build_servings_from_model_folders(tiny_model):
    generator = PromptedImageGenerator(str(tiny_model("tiny-sd")))
    assert isinstance(generator.serving, LocalImageGenServing) and generator.serving.task == "text2image"
    augmenter = ImageDiffusionAugmenter(str(tiny_model("tiny-sd")), batch_size=3, caption_key="caption")
    assert augmenter.diffusion.batch_size == 3 and augmenter.diffusion.torch_dtype == "fp32"
    with pytest.raises(ValueError, match="caption_serving must be a model id, a local folder or a "
                                         "LocalCaptionServing"):
        ImageCaptioner(object())
