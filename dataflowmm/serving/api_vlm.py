"""Vision-language answers from any OpenAI-compatible chat server (`POST /v1/chat/completions`):
vLLM (`vllm serve`), SGLang, LMDeploy, TGI, OpenAI."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

from PIL import Image

from dataflowmm.checks import check_positive_int
from dataflowmm.io.images import (
    ImageReadError,
    load_image,
    looks_like_base64_image,
    open_image,
    read_image_file,
)
from dataflowmm.serving.api_client import OpenAICompatibleServing
from dataflowmm.serving.common import GenerationFailed, jsonable
from dataflowmm.serving.vlm_protocol import ImageSource, VLMAnswer, VLMPrompt, check_vlm_prompts

IMAGE_DETAILS = ("auto", "low", "high")
IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG"}
_JPEG_QUALITY = 95
_QUOTED_CHARACTERS = 300  # of a cut-off answer, in its error


class APIVLMServing(OpenAICompatibleServing):
    r"""
    Answer image prompts with a chat vision-language model behind an OpenAI-compatible
    server, through the official `openai` client: `vllm serve Qwen/Qwen2.5-VL-7B-Instruct`,
    SGLang, LMDeploy, TGI, OpenAI, or a gateway in front of them.

    Each prompt is one chat request: an optional system turn, then a user turn holding the
    prompt's images as `image_url` parts (base64 data URLs in `image_format`, downscaled to
    `max_image_side` first when set; image files are read in the request's thread, and one
    already in that format and size goes as its own bytes) followed by its text; a prompt
    without images is a text-only turn. Requests run on a bounded pool (`max_concurrency` at
    once); the client retries 429s, 5xx answers, time-outs and connection errors with
    exponential backoff and jitter, waiting what a `Retry-After` header asks. A prompt whose request still fails, that
    the server refuses (content policy or the model's `refusal`, not retried), whose answer
    was cut off at `max_tokens` (`finish_reason="length"`) or that comes back empty gets a
    `GenerationFailed` in place of its text, so only its row fails; failures that may pass
    (429, 5xx, time-out, connection, a body that is not JSON) are `transient` and the step's
    next run retries those rows. The constructor checks its arguments and sends nothing.

    The API key is taken from `api_key` or the environment variable `api_key_env`; it
    is never part of `config()` (so never in a manifest), `repr`, or an error message.

    Args:
        model (`str`):
            The model name the server serves (`vllm serve NAME` serves it as `NAME`, or as
            `--served-model-name`).
        base_url (`str`, *optional*):
            API root, e.g. `"http://localhost:8000/v1"` for `vllm serve`; default
            `$OPENAI_BASE_URL`, else OpenAI's.
        api_key (`str`, *optional*):
            The key; default: the environment variable named by `api_key_env`. Servers
            without authentication accept any value, e.g. `"none"`.
        api_key_env (`str`, *optional*, defaults to `"OPENAI_API_KEY"`):
            Environment variable holding the key.
        max_tokens (`int`, *optional*, defaults to 256):
            Most tokens per answer; an answer cut off there is that row's error.
        temperature (`float`, *optional*):
            Sampling temperature; the server's default when `None`.
        top_p (`float`, *optional*):
            Nucleus sampling mass; the server's default when `None`.
        seed_parameter (`str`, *optional*, defaults to `"seed"`):
            Name of the request field that takes a seed: each request sends its prompt's
            seed there (vLLM, SGLang and OpenAI's chat API take `seed`); `None` sends none.
        system_prompt (`str`, *optional*):
            System turn of every request whose prompt brings none of its own.
        image_detail (`str`, *optional*):
            `"auto"`, `"low"` or `"high"`: OpenAI's `detail` of each `image_url`; not sent when `None`.
        max_image_side (`int`, *optional*):
            Images whose longer side exceeds this many pixels are downscaled (aspect kept,
            Lanczos) before sending; `None` sends them at their size.
        image_format (`str`, *optional*, defaults to `"png"`):
            How images travel: `"png"` (lossless) or `"jpeg"` (smaller, quality 95).
        extra_body (`dict`, *optional*):
            Extra JSON fields for every request (server-specific options: vLLM's `top_k`,
            `repetition_penalty`, `chat_template_kwargs`, ...).
        batch_size (`int`, *optional*, defaults to 256):
            Prompts an operator hands over per `generate` call (one step batch, and the least
            rows between checkpoints). Requests in flight run down at the end of each call, so
            keep it many times `max_concurrency`.
        max_concurrency (`int`, *optional*, defaults to 16):
            Requests in flight at once.
        max_retries (`int`, *optional*, defaults to 4):
            Retries per request on 429, 5xx, time-outs and connection errors.
        timeout (`float`, *optional*, defaults to 120):
            Seconds one attempt may take.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_tokens: int = 256,
        temperature: float | None = None,
        top_p: float | None = None,
        seed_parameter: str | None = "seed",
        system_prompt: str | None = None,
        image_detail: str | None = None,
        max_image_side: int | None = None,
        image_format: str = "png",
        extra_body: dict | None = None,
        batch_size: int = 256,
        max_concurrency: int = 16,
        max_retries: int = 4,
        timeout: float = 120.0,
    ) -> None:
        check_positive_int("max_tokens", max_tokens)
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                        or temperature < 0):
            raise ValueError(f"temperature must be a number >= 0 or None, got {temperature!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
        if image_detail is not None and image_detail not in IMAGE_DETAILS:
            raise ValueError(f"image_detail must be one of {', '.join(IMAGE_DETAILS)} or None, got {image_detail!r}")
        if max_image_side is not None:
            check_positive_int("max_image_side", max_image_side)
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError(f"system_prompt must be a string or None, got {system_prompt!r}")
        self._set_client_settings(model, base_url=base_url, api_key=api_key, api_key_env=api_key_env,
                                  seed_parameter=seed_parameter, batch_size=batch_size,
                                  max_concurrency=max_concurrency, max_retries=max_retries, timeout=timeout,
                                  extra_body=extra_body)
        self.max_tokens = max_tokens
        self.temperature = None if temperature is None else float(temperature)
        self.top_p = None if top_p is None else float(top_p)
        self.system_prompt = system_prompt or None
        self.image_detail = image_detail
        self.max_image_side = max_image_side
        self.image_format = image_format

    # --------------------------------------------------------------- answering
    def generate(self, prompts: Sequence[VLMPrompt], seeds: Sequence[int] | None = None) -> list[VLMAnswer]:
        """One answer per prompt, in order, stripped, or a `GenerationFailed` saying why its
        request failed. Prompts are sent concurrently (at most `max_concurrency` at once).

        Args:
            prompts (`list[VLMPrompt]`):
                Each prompt's images (none: a text-only turn), question and optional system prompt.
            seeds (`list[int]`, *optional*):
                One seed per prompt (default 0 for all), sent under `seed_parameter` when set.
        """
        prompts, seeds = check_vlm_prompts(prompts, seeds)
        return self._each(self._answer, prompts, seeds)

    def _answer(self, prompt: VLMPrompt, seed: int) -> str:
        # The client's plain `post` (its documented way to send any body) keeps its retries,
        # time-outs and errors, without the typed request and response models of
        # `chat.completions.create`, which cost more CPU than the rest of a request together.
        # cast_to=object: the answer's JSON as parsed (text when the server sends no JSON).
        return self._text(self._client.post("/chat/completions", body=self.request(prompt, seed), cast_to=object))

    def request(self, prompt: VLMPrompt, seed: int = 0) -> dict[str, Any]:
        """The JSON body of one chat completions request (`extra_body` and the seed merged in)."""
        system = prompt.system if prompt.system is not None else self.system_prompt
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": self._content(prompt)})
        request: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens}
        if self.temperature is not None:
            request["temperature"] = self.temperature
        if self.top_p is not None:
            request["top_p"] = self.top_p
        request.update(self._extra_body(seed))
        return request

    def _content(self, prompt: VLMPrompt) -> str | list[dict[str, Any]]:
        if not prompt.images:  # text-only: plain content, which every server takes
            return prompt.text
        try:  # files are read here, in the request's thread
            parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": self._image_url(image)}
                                           for image in prompt.images]
        except ImageReadError as error:
            raise GenerationFailed(str(error)) from None
        return parts + [{"type": "text", "text": prompt.text}]

    def _image_url(self, source: ImageSource) -> dict[str, str]:
        """An `image_url` part: a data URL of the image as `image_format`, downscaled when over
        `max_image_side`. A file already in that format, in RGB and small enough, goes as its own
        bytes (its header checked, nothing decoded: the pixels are the file's either way)."""
        encoded = None
        if isinstance(source, Image.Image):
            image = source
        elif looks_like_base64_image(source):
            image = load_image(source)
        else:
            file = read_image_file(source)
            if (file.format, file.mode) == (IMAGE_FORMATS[self.image_format], "RGB") and not self._too_big(file.size):
                encoded = file.data
            image = None if encoded is not None else open_image(file.data, name=f"image {source}")
        if encoded is None:
            encoded = self._encoded(image)
        url = {"url": f"data:image/{self.image_format};base64,{base64.b64encode(encoded).decode('ascii')}"}
        if self.image_detail:
            url["detail"] = self.image_detail
        return url

    def _too_big(self, size: tuple[int, int]) -> bool:
        return bool(self.max_image_side) and max(size) > self.max_image_side

    def _encoded(self, image: Image.Image) -> bytes:
        image = image.convert("RGB")
        if self._too_big(image.size):
            scale = self.max_image_side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        if self.image_format == "jpeg":
            image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
        else:
            image.save(buffer, format="PNG")
        return buffer.getvalue()

    def _text(self, response: Any) -> str:
        """The answer's text from a chat completion's JSON; GenerationFailed for a refusal, a
        cut-off or an empty answer."""
        choices = response.get("choices") if isinstance(response, dict) else None
        if not choices or not isinstance(choices[0], dict):
            raise GenerationFailed("the server's answer holds no choices", transient=True)
        choice = choices[0]
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        content, refusal, finish = message.get("content"), message.get("refusal"), choice.get("finish_reason")
        if refusal or finish == "content_filter":
            raise GenerationFailed(f"refused by the model or the server's content filter: "
                                   f"{refusal or 'finish_reason=content_filter'}")
        if finish == "length":
            quoted = (content or "")[:_QUOTED_CHARACTERS]
            raise GenerationFailed(f"the answer was cut off at max_tokens={self.max_tokens} "
                                   f"(finish_reason=length; raise max_tokens): {quoted!r}")
        if not isinstance(content, str) or not content.strip():
            raise GenerationFailed(f"the model's answer is empty (finish_reason={finish})")
        return content.strip()

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """What changes the answers (fingerprints cached steps); never the key, concurrency or retries."""
        return jsonable({
            "serving": type(self).__name__,
            "model": self.model,
            "base_url": self.base_url,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed_parameter": self.seed_parameter,
            "system_prompt": self.system_prompt,
            "image_detail": self.image_detail,
            "max_image_side": self.max_image_side,
            "image_format": self.image_format,
            "extra_body": self.extra_body,
        })


__all__ = ["APIVLMServing", "GenerationFailed"]
