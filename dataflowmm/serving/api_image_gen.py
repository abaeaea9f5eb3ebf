"""Image generation through an OpenAI-compatible images API (`POST /v1/images/generations`)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from PIL import Image

from dataflowmm.checks import check_positive_int
from dataflowmm.io.downloads import DownloadRefused, download, url_is_internal
from dataflowmm.io.images import ImageReadError, open_image
from dataflowmm.serving.api_client import REFUSAL_CODES, OpenAICompatibleServing
from dataflowmm.serving.common import GenerationFailed, jsonable

RESPONSE_FORMATS = ("b64_json", "url")

__all__ = ["REFUSAL_CODES", "RESPONSE_FORMATS", "APIImageGenServing", "GenerationFailed"]


class APIImageGenServing(OpenAICompatibleServing):
    r"""
    Generate images with any server that speaks the OpenAI images API (OpenAI, Azure-style
    gateways, self-hosted compatible servers), through the official `openai` client.

    Requests run on a bounded pool (`max_concurrency` at once). The client retries 429s,
    5xx answers, time-outs and connection errors with exponential backoff and jitter,
    waiting what a `Retry-After` header asks; a prompt whose request still fails, or that
    the server refuses (content policy, not retried), comes back as a `GenerationFailed`
    in place of its images, so only its row fails. The constructor checks its arguments
    and loads nothing; the client is made on first use.

    The API key is taken from `api_key` or the environment variable `api_key_env`; it
    is never part of `config()` (so never in a manifest), `repr`, or an error message.

    Args:
        model (`str`, *optional*, defaults to `"dall-e-3"`):
            Model name the server knows (`"dall-e-3"`, `"gpt-image-1"`, a self-hosted model's name).
        base_url (`str`, *optional*):
            API root, e.g. `"http://localhost:8000/v1"` for a self-hosted server; default
            `$OPENAI_BASE_URL`, else OpenAI's.
        api_key (`str`, *optional*):
            The key; default: the environment variable named by `api_key_env`. Servers
            without authentication accept any value, e.g. `"none"`.
        api_key_env (`str`, *optional*, defaults to `"OPENAI_API_KEY"`):
            Environment variable holding the key.
        size (`str`, *optional*):
            `"1024x1024"`, `"1792x1024"`, ...; the server's default when `None`.
        quality (`str`, *optional*):
            `"standard"`, `"hd"`, `"low"`, `"high"`, ...; the server's default when `None`.
        style (`str`, *optional*):
            `"vivid"` or `"natural"` (DALL-E 3); the server's default when `None`.
        n (`int`, *optional*, defaults to 1):
            Images per request (per prompt).
        response_format (`str`, *optional*, defaults to `"b64_json"`):
            `"b64_json"` (images inside the answer) or `"url"` (downloaded afterwards, within
            bounds: http(s) only, no redirect to another host, no internal address unless
            `base_url` is one, at most `max_download_bytes`, within `timeout` seconds; see
            `dataflowmm.io.downloads`). A refused download is that prompt's error.
        seed_parameter (`str`, *optional*):
            Name of a request field that takes a seed, for compatible servers that accept one
            (e.g. `"seed"`); each request then sends its prompt's seed. OpenAI takes none.
        batch_size (`int`, *optional*, defaults to 32):
            Prompts an operator hands over per `generate` call (one step batch).
        max_concurrency (`int`, *optional*, defaults to 8):
            Requests in flight at once.
        max_retries (`int`, *optional*, defaults to 4):
            Retries per request on 429, 5xx, time-outs and connection errors.
        timeout (`float`, *optional*, defaults to 120):
            Seconds one attempt may take; also the total deadline of one image's download.
        max_download_bytes (`int`, *optional*, defaults to 64 MiB):
            Largest image a `url` answer may download.
        extra_body (`dict`, *optional*):
            Extra JSON fields for every request (server-specific options).
    """

    def __init__(
        self,
        model: str = "dall-e-3",
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        size: str | None = None,
        quality: str | None = None,
        style: str | None = None,
        n: int = 1,
        response_format: str = "b64_json",
        seed_parameter: str | None = None,
        batch_size: int = 32,
        max_concurrency: int = 8,
        max_retries: int = 4,
        timeout: float = 120.0,
        extra_body: dict | None = None,
        max_download_bytes: int = 64 * 2**20,
    ) -> None:
        if response_format not in RESPONSE_FORMATS:
            raise ValueError(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}")
        check_positive_int("n", n)
        check_positive_int("max_download_bytes", max_download_bytes)
        self._set_client_settings(model, base_url=base_url, api_key=api_key, api_key_env=api_key_env,
                                  seed_parameter=seed_parameter, batch_size=batch_size,
                                  max_concurrency=max_concurrency, max_retries=max_retries, timeout=timeout,
                                  extra_body=extra_body)
        self.size = size
        self.quality = quality
        self.style = style
        self.n = n
        self.response_format = response_format
        self.max_download_bytes = max_download_bytes
        self._internal_ok = False  # set on load: may `url` answers point at internal addresses?

    def load(self) -> None:
        """Make the HTTP client (nothing is sent until `generate`)."""
        if self._client is not None:
            return
        super().load()
        # A self-hosted server (base_url on an internal address) may hand out internal URLs.
        self._internal_ok = url_is_internal(self.base_url)

    # -------------------------------------------------------------- generating
    def generate(self, prompts: list[str], seeds: list[int]) -> list[list[Image.Image] | GenerationFailed]:
        """Per prompt, `n` RGB images, or a `GenerationFailed` saying why its request failed.

        Prompts are requested concurrently (at most `max_concurrency` at once); results are
        in input order. `seeds[i]` is sent only when `seed_parameter` is set.
        """
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, not one string")
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        return self._each(self._generate_one, list(prompts), list(seeds))

    def _generate_one(self, prompt: str, seed: int) -> list[Image.Image]:
        return self._images(self._client.images.generate(**self._request(prompt, seed)))

    def _request(self, prompt: str, seed: int) -> dict[str, Any]:
        request: dict[str, Any] = {"prompt": prompt, "model": self.model, "n": self.n,
                                   "response_format": self.response_format}
        for name in ("size", "quality", "style"):
            if getattr(self, name) is not None:
                request[name] = getattr(self, name)
        extra = self._extra_body(seed)
        if extra:
            request["extra_body"] = extra
        return request

    def _images(self, response: Any) -> list[Image.Image]:
        data = list(getattr(response, "data", None) or [])
        if len(data) != self.n:
            raise GenerationFailed(f"the server returned {len(data)} images, {self.n} requested")
        return [self._image(item) for item in data]

    def _image(self, item: Any) -> Image.Image:
        if item.b64_json:
            try:
                payload = base64.b64decode(item.b64_json, validate=True)
            except (binascii.Error, ValueError) as error:
                raise GenerationFailed(f"malformed base64 image in the response: {error}") from None
        elif item.url:
            payload = self._download(item.url)
        else:
            raise GenerationFailed("the response holds neither b64_json nor url")
        try:
            return open_image(payload, name="the response's image")
        except ImageReadError as error:
            raise GenerationFailed(str(error)) from None

    def _download(self, url: str) -> bytes:
        try:
            return download(url, allow_internal=self._internal_ok, max_bytes=self.max_download_bytes,
                            deadline=self.timeout)
        except DownloadRefused as error:
            raise GenerationFailed(f"downloading the image URL failed: {error}") from None

    # ------------------------------------------------------------------ config
    def config(self) -> dict:
        """What changes the images (fingerprints cached steps); never the key, concurrency or retries."""
        return jsonable({
            "serving": type(self).__name__,
            "model": self.model,
            "base_url": self.base_url,
            "size": self.size,
            "quality": self.quality,
            "style": self.style,
            "n": self.n,
            "seed_parameter": self.seed_parameter,
            "extra_body": self.extra_body,
        })
