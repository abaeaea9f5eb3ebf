"""A loopback chat server speaking OpenAI's chat completions, which looks at the images it gets.

    with LoopbackChatAPI(latency=0.05) as api:
        serving = APIVLMServing("loopback-vlm", base_url=api.base_url, api_key=api.api_key)

It reads the last user turn (text and `image_url` parts carrying base64 data URLs) and
answers from the pixels, with the shapes world's pixel judge (`judge_image`), so an answer
proves which image and question it belongs to:

| the question mentions                         | the answer, per image                         |
| --------------------------------------------- | --------------------------------------------- |
| `background`                                  | the background's colour (`blue`)              |
| `colour` / `color`                            | the shape's colour (`red`)                    |
| `shape`                                       | the shape (`circle`)                          |
| `N questions` and `JSON`                      | a JSON list of N `{"question", "answer"}` pairs |
| `instruction` and `JSON`                      | a JSON edit proposal (`edit_proposal`)        |
| anything else                                 | the caption (`a red circle on a blue background`) |

Several images: their answers joined by `"; "`. No image: `I see no image.` An answer of
more words than the request's `max_tokens` is cut there with `finish_reason="length"`.
Markers in the question make the server misbehave for that request (its question and
images), one action per attempt in turn (the last one repeats):

| marker            | answers                                                          |
| ----------------- | ---------------------------------------------------------------- |
| `[429]`           | 429 with `Retry-After: 0.1`, then the answer                     |
| `[429-wait]`      | 429 with `Retry-After: 1.2`, then the answer                     |
| `[500x2]`         | 500 twice, then the answer                                       |
| `[500]`           | 500 always                                                       |
| `[hang]`          | no answer for `hang_seconds` (past any short client time-out)    |
| `[hang-once]`     | hangs once, then the answer                                      |
| `[hang-twice]`    | hangs twice, then the answer                                     |
| `[bad-json]`      | 200 whose body is not JSON                                       |
| `[bad-json-once]` | a body that is not JSON once, then the answer                    |
| `[refuse]`        | 400 `content_filter` (a gateway's content policy)                |
| `[refuse-answer]` | 200 whose message holds a `refusal` and no content               |
| `[truncate]`      | 200 with half the answer and `finish_reason="length"`            |
| `[echo-auth]`     | 401 whose message repeats the request's Authorization header    |

`requests` counts requests per `request_key(question, images)` (every attempt, retries
included). `python -m dataflowmm.kit.loopback_chat_api --latency 0.05` serves one from
its own process and prints its base URL (key `sk-loopback-secret` unless `--api-key`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time

from PIL import Image

from dataflowmm.io.images import ImageReadError, decode_base64
from dataflowmm.kit.loopback_server import (
    COMMON_SCRIPTS,
    LoopbackHandler,
    LoopbackServer,
    error_body,
    serve_until_interrupted,
)
from dataflowmm.kit.shapes import COLOUR_NAMES, caption_for, judge_image

SCRIPTS = {
    **COMMON_SCRIPTS,
    "[hang-twice]": ["hang", "hang", "ok"],
    "[bad-json-once]": ["bad-json", "ok"],
    "[bad-json]": ["bad-json"],
    "[refuse-answer]": ["refuse-answer"],
    "[refuse]": ["refuse"],
    "[truncate]": ["truncate"],
}
# The questions a QA-generation request gets, in turn, and which attribute answers each.
QA_QUESTIONS = (("What colour is the shape?", "colour"), ("What shape is shown?", "shape"),
                ("What colour is the background?", "background"), ("Describe the image.", "caption"))
_QA_COUNT = re.compile(r"(\d+)\s+(?:\w+\s+)?questions?", re.IGNORECASE)
NO_IMAGE = "I see no image."


def request_key(question: str, images: list[Image.Image]) -> str:
    """What the server counts requests by: the question and a digest of each image's pixels."""
    digests = [hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()[:12] for image in images]
    return " @ ".join([question, *digests]) if digests else question


def _attribute(found: dict, name: str) -> str:
    if name == "caption":
        if None in (found["shape"], found["colour"]):
            return f"a plain {found['background']} image"
        return caption_for(found["shape"], found["colour"], found["background"])
    return found[name] or "unknown"


def qa_pairs(image: Image.Image, count: int) -> list[dict]:
    """`count` question-answer pairs about a shapes-world image, judged from its pixels."""
    found = judge_image(image)
    return [{"question": question, "answer": _attribute(found, name)}
            for question, name in itertools.islice(itertools.cycle(QA_QUESTIONS), count)]


def edit_proposal(image: Image.Image) -> str:
    """An edit of a shapes-world image, as JSON: `{"instruction": "make the circle green",
    "source_caption": ..., "target_caption": ...}`, the new colour the palette's next after the
    shape's that is not the background's; a sentence (no JSON) when no shape is found."""
    found = judge_image(image)
    if None in (found["shape"], found["colour"]):
        return "I see no shape to edit."
    start = COLOUR_NAMES.index(found["colour"])
    colour = next(name for name in COLOUR_NAMES[start + 1:] + COLOUR_NAMES[:start]
                  if name != found["background"])
    return json.dumps({"instruction": f"make the {found['shape']} {colour}",
                       "source_caption": caption_for(found["shape"], found["colour"], found["background"]),
                       "target_caption": caption_for(found["shape"], colour, found["background"])})


def loopback_answer(question: str, images: list[Image.Image]) -> str:
    """The server's answer to `question` about `images` (see the module's table)."""
    if not images:
        return NO_IMAGE
    lowered = question.lower()
    if "json" in lowered and "instruction" in lowered:
        return edit_proposal(images[0])
    if "json" in lowered and (match := _QA_COUNT.search(question)):
        return json.dumps(qa_pairs(images[0], int(match.group(1))))
    if "background" in lowered:
        name = "background"
    elif "colour" in lowered or "color" in lowered:
        name = "colour"
    elif "shape" in lowered:
        name = "shape"
    else:
        name = "caption"
    return "; ".join(_attribute(judge_image(image), name) for image in images)


def user_turn(body: dict) -> tuple[str, list[Image.Image]]:
    """The last user turn's text and images; ValueError when the request has none usable."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    users = [message for message in messages if isinstance(message, dict) and message.get("role") == "user"]
    if not users:
        raise ValueError("no user message")
    content = users[-1].get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ValueError("a user message's content must be a string or a list of parts")
    texts, images = [], []
    for part in content:
        if part.get("type") == "text":
            texts.append(part["text"])
        elif part.get("type") == "image_url":
            images.append(_data_url_image(part["image_url"]["url"]))
        else:
            raise ValueError(f"unknown content part type {part.get('type')!r}")
    return "\n".join(texts), images


def _data_url_image(url: str) -> Image.Image:
    if not url.startswith("data:image/") or ";base64," not in url:
        raise ValueError("the loopback server takes images as base64 data URLs only")
    try:
        return decode_base64(url)
    except ImageReadError as error:
        raise ValueError(f"cannot read an image: {error}") from None


class LoopbackChatAPI(LoopbackServer):
    """An OpenAI-compatible `/v1/chat/completions` server on 127.0.0.1 (a thread per request).

    Args:
        latency: seconds every request waits before answering.
        api_key: the bearer token it requires (401 otherwise).
        hang_seconds: how long a `[hang]` request stays unanswered.
        port: port on 127.0.0.1 (0: any free one).
    """

    path = "/chat/completions"
    scripts = SCRIPTS

    def completion(self, body: dict, text: str, finish_reason: str = "stop", refusal: str | None = None) -> dict:
        """A chat completion body answering `text` (None content with a refusal)."""
        words = len(text.split()) if text else 0
        message = {"role": "assistant", "content": None if refusal else text, "refusal": refusal}
        return {"id": f"chatcmpl-loopback-{time.monotonic_ns()}", "object": "chat.completion",
                "created": int(time.time()), "model": body.get("model", ""),
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
                "usage": {"prompt_tokens": 1, "completion_tokens": words, "total_tokens": words + 1}}


class _Handler(LoopbackHandler):
    api: LoopbackChatAPI

    def _invalid(self, body: dict) -> str | None:
        if not isinstance(body.get("model"), str):
            return "model is required"
        self._turn = user_turn(body)  # ValueError: a 400 naming the problem
        return None

    def _action(self, body: dict) -> str:
        question, images = self._turn
        return self.api._action(request_key(question, images), marked=question)

    def _play(self, action: str, body: dict) -> None:
        question, images = self._turn
        if action == "bad-json":
            self._send(200, b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess')
        elif action == "refuse":
            self._send(400, error_body("The response was filtered due to the prompt triggering the content "
                                       "management policy.", "content_filter"))
        elif action == "refuse-answer":
            self._send(200, self.api.completion(body, "", refusal="I'm sorry, I can't help with that."))
        elif action == "truncate":
            answer = loopback_answer(question, images)
            self._send(200, self.api.completion(body, answer[: max(1, len(answer) // 2)], "length"))
        else:
            self._send(200, self._answer(body, loopback_answer(question, images)))

    def _answer(self, body: dict, answer: str) -> dict:
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        words = answer.split()
        if isinstance(limit, int) and len(words) > limit:
            return self.api.completion(body, " ".join(words[:limit]), "length")
        return self.api.completion(body, answer)


LoopbackChatAPI.handler = _Handler


def main(argv: list[str] | None = None) -> None:
    """Serve until interrupted: `python -m dataflowmm.kit.loopback_chat_api --latency 0.05`."""
    serve_until_interrupted(LoopbackChatAPI, "A loopback OpenAI-compatible chat API that judges "
                            "shapes-world images (for offline tries).", argv)


if __name__ == "__main__":
    main()
