"""ImageQAGenerator: from an image alone, a VLM proposes questions and answers them; the pairs
become a LLaVA / ShareGPT conversation, ready for visual instruction tuning."""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any

from dataflowmm.checks import check_positive_int
from dataflowmm.contract import Input, Output
from dataflowmm.operators.sample_format import row_image_paths
from dataflowmm.operators.visual_qa import (
    LLAVA_IMAGE_TOKEN,
    VLMRowOperator,
    as_vlm_serving,
    row_images,
)
from dataflowmm.serving.vlm_protocol import VLMPrompt

if TYPE_CHECKING:
    from dataflowmm.serving.vlm_protocol import VLMServing

QA_PROMPT = (
    "Look at the image and write {num_questions} different questions about what it shows, each with a short, "
    "correct answer. Reply with only a JSON list of objects with the keys \"question\" and \"answer\", "
    "for example: [{\"question\": \"...\", \"answer\": \"...\"}]"
)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_LINE_PAIR = re.compile(r"^\s*(?:\d+[.)]\s*)?(?:Q|Question)\s*\d*\s*[:.]\s*(?P<q>.+?)\s*$\s*"
                        r"^\s*(?:A|Answer)\s*\d*\s*[:.]\s*(?P<a>.+?)\s*$", re.MULTILINE | re.IGNORECASE)
_QUESTION_KEYS = ("question", "q", "query")
_ANSWER_KEYS = ("answer", "a", "response")
_LIST_KEYS = ("qa_pairs", "pairs", "questions", "qas", "items", "data")


def parse_qa_pairs(text: str) -> list[tuple[str, str]]:
    """The question-answer pairs in a model's answer, in order; ValueError saying why there are none.

    Read, in turn: a JSON list of `{"question", "answer"}` objects (also `q`/`a`, any case),
    a JSON object holding such a list (`qa_pairs`, `pairs`, `questions`, ...) or being one
    pair, each of these inside a Markdown code fence or with prose around it; else lines
    `Q: ...` / `A: ...` (or `Question:` / `Answer:`, numbered or not).
    """
    candidates = [match.group(1) for match in _FENCE.finditer(text)] + [text]
    for candidate in candidates:
        pairs = _json_pairs(candidate)
        if pairs:
            return pairs
    pairs = [(m.group("q").strip(), m.group("a").strip()) for m in _LINE_PAIR.finditer(text)]
    if pairs:
        return pairs
    raise ValueError("no question-answer pairs found (expected a JSON list of {\"question\", \"answer\"} "
                     "objects, or Q:/A: lines)")


def _json_pairs(text: str) -> list[tuple[str, str]]:
    for opening, closing in (("[", "]"), ("{", "}")):
        start, end = text.find(opening), text.rfind(closing)
        if start < 0 or end <= start:
            continue
        try:
            value = json.loads(text[start:end + 1])
        except ValueError:
            continue
        pairs = _pairs_in(value)
        if pairs:
            return pairs
    return []


def _pairs_in(value: Any) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        lowered = {str(key).lower(): item for key, item in value.items()}
        for key in _LIST_KEYS:
            if isinstance(lowered.get(key), list):
                return _pairs_in(lowered[key])
        pair = _pair(lowered)
        return [pair] if pair else []
    if isinstance(value, list):
        pairs = [_pair({str(k).lower(): v for k, v in item.items()}) for item in value if isinstance(item, dict)]
        return [pair for pair in pairs if pair]
    return []


def _pair(item: dict) -> tuple[str, str] | None:
    question = next((item[key] for key in _QUESTION_KEYS if key in item), None)
    answer = next((item[key] for key in _ANSWER_KEYS if key in item), None)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):  # "How many?" -> 3
        answer = str(answer)
    if isinstance(question, str) and isinstance(answer, str) and question.strip() and answer.strip():
        return question.strip(), answer.strip()
    return None


def llava_turns(pairs: list[tuple[str, str]], image_count: int) -> list[dict]:
    """LLaVA / ShareGPT turns: `<image>\\n` (one per image) opening the first human turn."""
    turns = []
    for index, (question, answer) in enumerate(pairs):
        value = (f"{LLAVA_IMAGE_TOKEN}\n" * image_count + question) if index == 0 else question
        turns += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return turns


class ImageQAGenerator(VLMRowOperator):
    r"""
    From each row's images alone, have a VLM propose `num_questions` questions with their
    answers, written as a LLaVA / ShareGPT conversation:

        [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}, ...]

    The model is asked for a JSON list of `{"question", "answer"}` objects; its answer is
    read robustly (a code fence, prose around the JSON, a wrapping object, or `Q:`/`A:`
    lines; see `parse_qa_pairs`), and at most `num_questions` pairs are kept (fewer when the
    model gave fewer). An answer with no pair in it is that row's error, which quotes the
    raw answer in full. A row without images, with an image that cannot be read, or whose
    request fails is kept with an empty conversation and its `error`.

    Args:
        serving (`LocalVLMServing`, `APIVLMServing`, `str` or `os.PathLike`):
            Any serving of the VLM protocol, or a model id or folder to build a `LocalVLMServing` from.
        num_questions (`int`, *optional*, defaults to 3):
            Question-answer pairs asked for per row.
        prompt (`str`, *optional*, defaults to `QA_PROMPT`):
            The instruction; `{num_questions}` in it is filled in.
        system_prompt (`str`, *optional*):
            System turn of every request; `None` leaves the serving's own.
        save_interval (`int`, *optional*, defaults to 50):
            Rows between checkpoints; a killed run resumes from the last one.
        seed (`int`, *optional*, defaults to 0):
            Global seed; each row's answer is sampled with a seed derived from it and the row.
        strict (`bool`, *optional*, defaults to `False`):
            Raise on the first row that cannot be answered.
    """

    columns = [
        Input("image", "input_image_key", "images", "column with the row's image path or list of paths", images=True),
        Output("conversation", "output_conversation_key", "conversations",
               "column receiving the LLaVA / ShareGPT turns", empty=[]),
    ]

    def __init__(self, serving: VLMServing | str | os.PathLike, num_questions: int = 3, prompt: str = QA_PROMPT,
                 system_prompt: str | None = None, *, save_interval: int = 50, seed: int = 0, strict: bool = False):
        check_positive_int("num_questions", num_questions)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        self.serving = as_vlm_serving(serving)
        self.num_questions = num_questions
        self.prompt = prompt
        self.system_prompt = system_prompt

    def row_prompt(self, row: dict) -> VLMPrompt:
        images = row_images(row, self.keys.image)
        if not images:
            raise ValueError(f"key {self.keys.image!r}: no image")
        return self.vlm_prompt(images, self.prompt.replace("{num_questions}", str(self.num_questions)))

    def row_outputs(self, answer: str, row: dict) -> dict:
        try:
            pairs = parse_qa_pairs(answer)
        except ValueError as error:
            raise ValueError(f"malformed model answer: {error}; raw answer: {answer}") from None
        image_count = len(row_image_paths(row.get(self.keys.image), self.keys.image))
        return {self.keys.conversation: llava_turns(pairs[: self.num_questions], image_count)}


__all__ = ["QA_PROMPT", "ImageQAGenerator", "llava_turns", "parse_qa_pairs"]
