"""Visual QA operators and every VLM-using operator, on both VLM servings: the tiny local chat
VLM and the loopback chat server (an OpenAI-compatible API that judges shapes-world pixels)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dataflowmm import FileStorage
from dataflowmm.kit.shapes import write_shapes_dataset
from dataflowmm.operators import (
    DifferenceCaptioner,
    ImageCaptioner,
    ImageQAGenerator,
    PromptedVQAGenerator,
    PromptTemplatedVQAGenerator,
)
from dataflowmm.operators.image_qa import llava_turns, parse_qa_pairs
from dataflowmm.serving import GenerationFailed, LocalVLMServing, VLMPrompt
from dataflowmm.serving.vlm_protocol import VLMServing

KEY = "sk-vqa-test"
EXAMPLES = Path(__file__).resolve().parent.parent / "example_data"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def chat_api():
    pytest.importorskip("openai")
    from dataflowmm.kit.loopback_chat_api import LoopbackChatAPI

    with LoopbackChatAPI(api_key=KEY) as server:
        yield server


def api_serving(server, **options):
    from dataflowmm.serving import APIVLMServing

    return APIVLMServing("loopback-vlm", base_url=server.base_url, api_key=KEY, timeout=5, max_retries=1, **options)


@pytest.fixture(scope="module")
def local_vlm(tiny_model):
    return LocalVLMServing(str(tiny_model("tiny-chat-vlm")), max_new_tokens=5, batch_size=4, torch_dtype="fp32")


@pytest.fixture(params=["local", "api"])
def vlm(request, local_vlm, chat_api):
    return local_vlm if request.param == "local" else api_serving(chat_api)


@pytest.fixture
def shapes(tmp_path):
    """Four shapes-world rows (held-out split) with a question each; row 3 without images."""
    entry = write_shapes_dataset(tmp_path / "data", 4, seed=1)
    rows = [json.loads(line) for line in entry.read_text().splitlines()]
    questions = ["What colour is the shape?", "What shape is shown?", "What colour is the background?", "Hello?"]
    for row, question in zip(rows, questions, strict=True):
        row["question"] = question
        row["conversations"] = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "?"}]
    rows[3]["images"] = []
    entry.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return entry, rows


def run(entry, tmp_path, operator, cache="cache", **keys):
    summary = operator.run(FileStorage(entry, cache_path=tmp_path / cache).step(), **keys)
    return summary, [json.loads(line) for line in open(summary.output_path, encoding="utf-8")]


# -- every VLM-using operator takes either serving ------------------------------------------------

def test_both_servings_follow_the_vlm_protocol(vlm):
    assert isinstance(vlm, VLMServing)
    red = Image.new("RGB", (32, 32), (220, 40, 40))
    answers = vlm.generate([VLMPrompt((red,), "Describe it."), VLMPrompt((), "Say hi."),
                            VLMPrompt((red, red), "What differs?", system="Be brief.")], seeds=[1, 2, 3])
    assert len(answers) == 3 and all(isinstance(answer, str) and answer for answer in answers)


def test_prompted_vqa_runs_with_both_servings(vlm, shapes, tmp_path):
    entry, rows = shapes
    summary, out = run(entry, tmp_path, PromptedVQAGenerator(vlm), input_prompt_key="question")
    assert summary.errors == 0 and all(isinstance(row["answer"], str) and row["answer"] for row in out)
    if not isinstance(vlm, LocalVLMServing):  # the loopback server answers from the pixels
        assert [row["answer"] for row in out] == [rows[0]["colour"], rows[1]["shape"], rows[2]["background"],
                                                  "I see no image."]


def test_prompt_templated_vqa_runs_with_both_servings(vlm, shapes, tmp_path):
    entry, rows = shapes
    template = PromptTemplatedVQAGenerator(vlm, "What colour is this {shape}?")
    summary, out = run(entry, tmp_path, template, output_answer_key="colour_answer")
    assert summary.errors == 0 and all(row["colour_answer"] for row in out)
    if not isinstance(vlm, LocalVLMServing):
        assert [row["colour_answer"] for row in out[:3]] == [row["colour"] for row in rows[:3]]


def test_image_qa_runs_with_both_servings(vlm, shapes, tmp_path):
    entry, rows = shapes
    summary, out = run(entry, tmp_path, ImageQAGenerator(vlm, num_questions=3))
    assert out[3]["error"] == "ImageQAGenerator: key 'images': no image" and out[3]["conversations"] == []
    if isinstance(vlm, LocalVLMServing):  # random weights write no JSON: each row's error keeps the raw text
        assert all("malformed model answer" in row["error"] and "raw answer: " in row["error"] for row in out[:3])
        return
    assert summary.errors == 1
    for row in out[:3]:
        turns = row["conversations"]
        assert [turn["from"] for turn in turns] == ["human", "gpt"] * 3
        assert turns[0]["value"] == "<image>\nWhat colour is the shape?" and turns[1]["value"] == row["colour"]
        assert turns[3]["value"] == row["shape"] and turns[5]["value"] == row["background"]


def test_image_captioner_runs_with_both_servings(vlm, shapes, tmp_path):
    entry, rows = shapes
    captioner = ImageCaptioner(vlm, caption_num=2, keep_candidate_mode="all", keep_original_sample=False)
    summary, out = run(entry, tmp_path, captioner, output_text_key="caption")
    assert summary.errors == 0 and len(out) == 6  # 3 rows with an image x 2 candidates
    if not isinstance(vlm, LocalVLMServing):
        assert [row["caption"] for row in out] == [row["text"] for row in rows[:3] for _ in range(2)]


def test_difference_captioner_runs_with_both_servings(vlm, tmp_path, tiny_model):
    from dataflowmm.serving import ClipServing, ImageTextMatchingServing

    pairs = [json.loads(line) for line in (EXAMPLES / "image_difference" / "pairs.jsonl").read_text().splitlines()]
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for pair in pairs[:2]:
        for key in ("image_path1", "image_path2"):
            (data / pair[key]).write_bytes((EXAMPLES / "image_difference" / pair[key]).read_bytes())
    entry = data / "pairs.jsonl"
    entry.write_text("".join(json.dumps({**pair, "bbox_tag": pair["changed_boxes"]}) + "\n" for pair in pairs[:2]))
    captioner = DifferenceCaptioner(
        image_text_matching_filter_args={"min_score": 0.0, "max_score": 1.0},
        text_pair_similarity_filter_args={"min_score": -1.0, "max_score": 1.0},
        vlm_serving=vlm, itm_serving=ImageTextMatchingServing(str(tiny_model("tiny-blip-itm"))),
        clip_serving=ClipServing(str(tiny_model("tiny-clip"))))
    summary, out = run(entry, tmp_path, captioner)
    assert summary.errors == 0
    assert all(len(row["bbox_difference_captions"]) == len(row["bbox_tag"]) and all(row["bbox_difference_captions"])
               for row in out)


# -- what each operator reads and how it fails ----------------------------------------------------

class ScriptedVLM:
    """A VLM serving whose answers are scripted per question; records what it was asked."""

    batch_size = 8

    def __init__(self, answer=lambda prompt: f"answer to {prompt.text}"):
        self.answer, self.prompts, self.seeds = answer, [], []

    def generate(self, prompts, seeds=None):
        self.prompts += list(prompts)
        self.seeds += list(seeds)
        return [self.answer(prompt) for prompt in prompts]

    def config(self):
        return {"scripted": "vlm"}


def test_prompted_vqa_reads_the_first_user_turn_and_the_images_it_can(shapes, tmp_path):
    entry, rows = shapes
    rows[1]["images"] = "images/missing.png"  # one path, not a list: read as one
    rows[2]["conversations"] = [{"from": "human", "value": "<image>"}]
    entry.write_text("".join(json.dumps(row) + "\n" for row in rows))
    scripted = ScriptedVLM()
    summary, out = run(entry, tmp_path, PromptedVQAGenerator(scripted, system_prompt="Be brief.", seed=3))
    assert [prompt.text for prompt in scripted.prompts] == ["What colour is the shape?", "Hello?"]
    assert [len(prompt.images) for prompt in scripted.prompts] == [1, 0]  # no images: a text-only chat
    assert {prompt.system for prompt in scripted.prompts} == {"Be brief."}
    assert out[1]["answer"] is None and out[1]["error"].startswith(
        "PromptedVQAGenerator: key 'images': image not found: ") and "missing.png" in out[1]["error"]
    assert out[2]["error"] == ("PromptedVQAGenerator: key 'conversations': the first user turn holds no text "
                               "besides <image>")
    assert summary.errors == 2 and out[0]["answer"] == "answer to What colour is the shape?"


def test_a_failed_answer_fails_its_row_only_and_transient_ones_are_retried(shapes, tmp_path):
    entry, _ = shapes

    def flaky(prompt):
        if "shape is" in prompt.text:
            return GenerationFailed("HTTP 429 (after 1 retries): slow down", transient=True)
        if "background" in prompt.text:
            return GenerationFailed("refused by the server's content policy")
        return "fine"

    first, out = run(entry, tmp_path, PromptedVQAGenerator(ScriptedVLM(flaky)), input_prompt_key="question")
    assert [row["error"] for row in out] == [None, "PromptedVQAGenerator: HTTP 429 (after 1 retries): slow down",
                                             "PromptedVQAGenerator: refused by the server's content policy", None]
    again = ScriptedVLM()
    second, out = run(entry, tmp_path, PromptedVQAGenerator(again), input_prompt_key="question")
    assert second.rows_retried == 1 and [prompt.text for prompt in again.prompts] == ["What shape is shown?"]
    assert out[1]["answer"] == "answer to What shape is shown?" and out[2]["error"] is not None


def test_prompt_templated_vqa_fails_a_row_missing_a_field(shapes, tmp_path):
    entry, rows = shapes
    rows[0]["meta"] = {"size": "small"}
    rows[1]["meta"] = {}
    entry.write_text("".join(json.dumps(row) + "\n" for row in rows))
    scripted = ScriptedVLM()
    template = PromptTemplatedVQAGenerator(scripted, "Is the {meta[size]} {shape} {colour}?")
    summary, out = run(entry, tmp_path, template)
    assert out[0]["answer"] == "answer to Is the small " + rows[0]["shape"] + " " + rows[0]["colour"] + "?"
    assert out[1]["error"] == "PromptTemplatedVQAGenerator: template field: key 'size': missing"
    assert out[2]["error"] == "PromptTemplatedVQAGenerator: key 'meta': missing" and out[2]["answer"] is None
    assert template.required_keys() == ["colour", "meta", "shape"]
    with pytest.raises(ValueError, match="names no"):
        PromptTemplatedVQAGenerator(scripted, "no fields")


@pytest.mark.parametrize("text", [
    '[{"question": "What colour?", "answer": "red"}, {"question": "Shape?", "answer": "circle"}]',
    'Sure! Here they are:\n```json\n[{"Question": "What colour?", "Answer": "red"}, {"q": "Shape?", "a": "circle"}]\n```',
    '{"qa_pairs": [{"question": "What colour?", "answer": "red"}, {"question": "Shape?", "answer": "circle"}]}',
    "1. Q: What colour?\nA: red\n2. Question: Shape?\nAnswer: circle",
])
def test_qa_pairs_are_read_from_the_forms_models_write(text):
    assert parse_qa_pairs(text) == [("What colour?", "red"), ("Shape?", "circle")]


def test_a_malformed_qa_answer_is_the_rows_error_with_the_raw_text(shapes, tmp_path):
    entry, _ = shapes
    raw = 'I think [{"question": "incomplete"'
    summary, out = run(entry, tmp_path, ImageQAGenerator(ScriptedVLM(lambda prompt: raw), num_questions=2))
    assert out[0]["conversations"] == [] and out[0]["error"] == (
        "ImageQAGenerator: malformed model answer: no question-answer pairs found (expected a JSON list of "
        f'{{"question", "answer"}} objects, or Q:/A: lines); raw answer: {raw}')
    assert summary.errors == 4
    assert llava_turns([("q1", "a1"), ("q2", "a2")], 2) == [
        {"from": "human", "value": "<image>\n<image>\nq1"}, {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]


def test_the_local_vlm_answers_what_it_can_when_one_prompt_fails(local_vlm, monkeypatch):
    red = Image.new("RGB", (32, 32), (220, 40, 40))
    prompts = [VLMPrompt((red,), "fine"), VLMPrompt((red,), "boom"), VLMPrompt((), "text only")]
    expected = local_vlm.generate(prompts[::2], seeds=[1, 3])
    original = local_vlm._generate_batch

    def failing(replica, batch, seeds):
        if any(prompt.text == "boom" for prompt in batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(replica, batch, seeds)

    monkeypatch.setattr(local_vlm, "_generate_batch", failing)
    monkeypatch.setattr(local_vlm, "fitted_batch_size", None)  # the module's serving: restored after
    answers = local_vlm.generate(prompts, seeds=[1, 2, 3])
    assert [answers[0], answers[2]] == expected
    assert isinstance(answers[1], GenerationFailed) and answers[1].transient
    assert "OutOfMemoryError: CUDA out of memory" in str(answers[1])


def test_a_truncated_image_fails_its_row_only_with_both_servings(vlm, shapes, tmp_path):
    entry, rows = shapes
    good = (entry.parent / rows[0]["images"][0]).read_bytes()
    (entry.parent / "images" / "truncated.png").write_bytes(good[: len(good) // 2])
    rows[1]["images"] = ["images/truncated.png"]
    entry.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary, out = run(entry, tmp_path, PromptedVQAGenerator(vlm), input_prompt_key="question")
    assert summary.errors == 1 and out[1]["answer"] is None and out[1]["error"].startswith("PromptedVQAGenerator: ")
    if isinstance(vlm, LocalVLMServing):  # read here: the error names the file
        assert out[1]["error"].endswith("truncated.png: image file is truncated")
    else:  # a header that checks out goes on unchanged; the server that decodes it refuses it
        assert "HTTP 400" in out[1]["error"]
    assert all(row["answer"] for index, row in enumerate(out) if index != 1)


def test_the_scaffold_needs_a_serving_to_be_named():
    from dataflowmm.scaffold import load_pipeline_module

    scaffold = load_pipeline_module(Path(__file__).resolve().parent.parent / "gpu_pipelines" / "visual_qa_pipeline.py")
    with pytest.raises(SystemExit):
        scaffold.parse_args([])
    args = scaffold.parse_args(["--base-url", "http://gpu-box:8000/v1", "--model", "Qwen/Qwen2.5-VL-7B-Instruct"])
    with scaffold.vlm_serving(args) as serving:  # nothing is sent until a step runs
        assert (serving.model, serving.base_url, serving.batch_size) == (
            "Qwen/Qwen2.5-VL-7B-Instruct", "http://gpu-box:8000/v1", 256)
        assert not serving.loaded
