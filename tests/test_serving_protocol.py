"""Servings share one protocol; operators build them from ids or take them as they are."""

import json

import pytest

from dataflowmm.operators import ImageCaptioner, ImageDiffusionAugmenter, PromptedImageGenerator
from dataflowmm.serving import ClipServing, LocalCaptionServing, LocalImageGenServing
from dataflowmm.serving.common import Serving


@pytest.fixture(scope="module")
def servings(tiny_model):
    return [LocalImageGenServing(str(tiny_model("tiny-sd"))), LocalCaptionServing(str(tiny_model("tiny-blip"))),
            ClipServing(str(tiny_model("tiny-clip")))]


def test_every_serving_follows_the_protocol_and_loads_lazily(servings):
    for serving in servings:
        assert isinstance(serving, Serving)
        assert serving.loaded is False  # constructing never loads a model
        json.dumps(serving.config())
        assert isinstance(serving.batch_size, int)


def test_one_name_for_the_batch_size(tiny_model):
    caption = LocalCaptionServing(str(tiny_model("tiny-blip")), batch_size=3)
    assert caption.batch_size == 3 and ImageCaptioner(caption).input_batch_size == 3
    with pytest.raises(TypeError):
        LocalCaptionServing(str(tiny_model("tiny-blip")), gpu_batch_size=3)


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
