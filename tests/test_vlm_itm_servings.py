"""LocalVLMServing (multi-image chat prompts) and ImageTextMatchingServing on tiny random models."""

import pytest
from PIL import Image

from dataflowmm.serving import ImageTextMatchingServing, LocalVLMServing, VLMPrompt
from dataflowmm.serving.common import Serving

RED, GREEN, BLUE = (Image.new("RGB", (40, 30), c) for c in ((200, 20, 20), (20, 200, 20), (20, 20, 200)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class CountingGenerate:
    """Wraps a loaded model's generate to record each call's batch size and input length."""

    def __init__(self, serving):
        model = serving._replicas[0].model
        self.calls, self.original = [], model.generate
        model.generate = self

    def __call__(self, **kwargs):
        self.calls.append((kwargs["input_ids"].shape[0], int(kwargs["pixel_values"].shape[0])))
        return self.original(**kwargs)


@pytest.mark.parametrize("name", ["tiny-chat-vlm", "tiny-llava-next"])
def test_vlm_answers_multi_image_prompts_in_batches_with_new_tokens_only(tiny_model, name):
    serving = LocalVLMServing(tiny_model(name), max_new_tokens=6, batch_size=2)
    assert isinstance(serving, Serving) and not serving.loaded
    prompts = [VLMPrompt((RED, GREEN), "What differs between these two pictures?"),
               VLMPrompt((BLUE,), "Describe it."),
               VLMPrompt((GREEN, BLUE, RED), "Which one is red?")]
    serving.load()
    counter = CountingGenerate(serving)
    answers = serving.generate(prompts, seeds=[1, 2, 3])
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)
    assert [calls[0] for calls in counter.calls] == [2, 1]  # prompts per generate call
    for answer in answers:
        assert "ASSISTANT" not in answer and "USER" not in answer and "differs" not in answer
    # seeded per prompt: the same prompt and seed give the same answer in another batch
    assert serving.generate([prompts[1]], seeds=[2]) == [answers[1]]
    assert serving.generate(prompts, seeds=[1, 2, 3]) == answers


def test_vlm_greedy_and_argument_checks(tiny_model):
    serving = LocalVLMServing(tiny_model("tiny-chat-vlm"), max_new_tokens=4, do_sample=False)
    prompt = VLMPrompt((RED,), "Describe it.")
    assert serving.generate([prompt], seeds=[1]) == serving.generate([prompt], seeds=[2])
    assert serving.config()["do_sample"] is False
    for kwargs, message in (({"temperature": 0}, "temperature"), ({"top_p": 1.5}, "top_p"),
                            ({"batch_size": 0}, "batch_size"),
                            ({"generate_kwargs": {"num_beams": 2}}, "num_beams"),
                            ({"generate_kwargs": {"do_sample": False}}, "do_sample")):
        with pytest.raises(ValueError, match=message):
            LocalVLMServing(tiny_model("tiny-chat-vlm"), **kwargs)
    with pytest.raises(ValueError, match="needs text"):
        VLMPrompt((RED,), " ")
    with pytest.raises(ValueError, match="one entry per prompt"):
        serving.generate([prompt], seeds=[1, 2])


def test_vlm_refuses_a_model_without_chat_template(tiny_model):
    with pytest.raises(ValueError, match="no chat template"):
        LocalVLMServing(tiny_model("tiny-blip2")).load()


def test_itm_scores_are_probabilities_batched_and_independent_of_batching(tiny_model):
    model = tiny_model("tiny-blip-itm")
    images, texts = [RED, GREEN, BLUE, RED, GREEN], ["a red square", "green", "a blue sky", "cat", "dog"]
    one_batch = ImageTextMatchingServing(model, batch_size=8)
    small = ImageTextMatchingServing(model, batch_size=2)
    scores = one_batch.score(images, texts)
    assert len(scores) == 5 and all(0.0 <= s <= 1.0 for s in scores)
    assert small.score(images, texts) == pytest.approx(scores, abs=1e-5)
    assert one_batch.forward_calls == 1 and small.forward_calls == 3
    assert one_batch.score([], []) == []
    with pytest.raises(ValueError, match="pairs"):
        one_batch.score([RED], ["a", "b"])
    assert one_batch.config()["model"] == str(model)
