"""What every serving of an OpenAI-compatible HTTP API shares (images API, chat completions).

- the official `openai` client, made on first use (`load`), closed by `cleanup`, never
  pickled (a serving travels to Ray actors without its connections);
- the key from `api_key` or an environment variable, kept out of `config()`, `repr`,
  pickles' meaning and every error message (servers may echo it: blotted out as `***`);
- bounded concurrency: requests go out at most `max_concurrency` at once, from one pool of
  threads kept while the serving is loaded; results in input order;
- retries: the client retries 429s, 5xx answers, time-outs and connection errors
  `max_retries` times with exponential backoff and jitter, waiting what a `Retry-After`
  header asks; a refusal (content policy) is never retried;
- errors: an item whose request still fails comes back as a `GenerationFailed` in its
  place (so only its row fails), `transient` when it may pass later (the step's next run
  retries that row): 429, 5xx, time-outs, connection errors, a body that is not JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from dataflowmm.checks import check_positive_int
from dataflowmm.serving.common import GenerationFailed

# Error codes a server gives for a request it refuses on content grounds: never worth a retry.
REFUSAL_CODES = ("content_policy_violation", "moderation_blocked", "content_filter")

Item = TypeVar("Item")
Result = TypeVar("Result")


class OpenAICompatibleServing:
    """Base of the API servings: client, key, concurrency, retries and per-item failures.

    A subclass calls `_set_client_settings` in its constructor, sends each item's request
    from a function given to `_each`, and raises `GenerationFailed` there for an answer it
    cannot use. Its docstring documents the shared arguments (see `APIImageGenServing`).
    """

    model: str
    base_url: str | None
    seed_parameter: str | None
    batch_size: int
    max_concurrency: int
    max_retries: int
    timeout: float
    extra_body: dict

    def _set_client_settings(self, model: str, *, base_url: str | None, api_key: str | None, api_key_env: str,
                             seed_parameter: str | None, batch_size: int, max_concurrency: int,
                             max_retries: int, timeout: float, extra_body: dict | None) -> None:
        """Check and keep the settings every API serving takes; nothing is sent."""
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty model name, got {model!r}")
        check_positive_int("batch_size", batch_size)
        check_positive_int("max_concurrency", max_concurrency)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if not float(timeout) > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if extra_body is not None and not isinstance(extra_body, dict):
            raise ValueError(f"extra_body must be a dict, got {type(extra_body).__name__}")
        if seed_parameter is not None and (not isinstance(seed_parameter, str) or not seed_parameter):
            raise ValueError(f"seed_parameter must be a request field name or None, got {seed_parameter!r}")
        key = api_key if api_key is not None else os.environ.get(api_key_env)
        if not key:
            raise ValueError(f"no API key: set the environment variable {api_key_env} or pass api_key= "
                             "(servers without authentication accept any value, e.g. api_key='none')")
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        self.seed_parameter = seed_parameter
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.timeout = float(timeout)
        self.extra_body = dict(extra_body or {})
        self._api_key = key
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None

    @property
    def model_name(self) -> str:
        return self.model

    # ----------------------------------------------------------------- loading
    def load(self) -> None:
        """Make the HTTP client and the request threads (nothing is sent until a request)."""
        if self._client is not None:
            return
        try:
            import openai
        except ImportError:
            raise ImportError(f"{type(self).__name__} needs the openai client: pip install 'dataflowmm[api]'") from None
        self._client = openai.OpenAI(api_key=self._api_key, base_url=self.base_url,
                                     max_retries=self.max_retries, timeout=self.timeout)
        # One pool for the serving's life: threads are not started again for every batch, and
        # callers sharing the serving share its `max_concurrency`.
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix=type(self).__name__)

    def cleanup(self) -> None:
        """Close the client's connections and stop its threads; a later request makes new ones."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._client is not None:
            self._client.close()
        self._client = None
        self._pool = None

    @property
    def loaded(self) -> bool:
        return self._client is not None

    def __getstate__(self) -> dict:  # travels to Ray actors without its open connections and threads
        return {**self.__dict__, "_client": None, "_pool": None}

    # ---------------------------------------------------------------- requests
    def _each(self, send: Callable[[Item, int], Result], items: Sequence[Item],
              seeds: Sequence[int]) -> list[Result | GenerationFailed]:
        """`send(item, seed)` for every item, at most `max_concurrency` at once, in input
        order; an item whose request fails gets a `GenerationFailed` in its place."""
        if len(seeds) != len(items):
            raise ValueError(f"got {len(items)} items but {len(seeds)} seeds; give one seed per item")
        if not items:
            return []
        self.load()

        def attempt(item: Item, seed: int) -> Result | GenerationFailed:
            try:
                return send(item, seed)
            except GenerationFailed as failure:
                return GenerationFailed(self._redacted(str(failure)), failure.transient)
            except Exception as error:  # noqa: BLE001 - every request failure becomes that item's error
                return GenerationFailed(self._redacted(describe_failure(error, self.max_retries)),
                                        is_transient_failure(error))

        return list(self._pool.map(attempt, items, seeds))

    def _extra_body(self, seed: int) -> dict:
        """`extra_body` with the item's seed under `seed_parameter` when set."""
        extra = dict(self.extra_body)
        if self.seed_parameter:
            extra[self.seed_parameter] = seed
        return extra

    def _redacted(self, text: str) -> str:
        """`text` with the API key blotted out (servers may echo request headers in errors)."""
        return text.replace(self._api_key, "***") if len(self._api_key) >= 4 else text

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r}, "
                f"max_concurrency={self.max_concurrency})")


def is_transient_failure(error: Exception) -> bool:
    """A failure that may pass if the request is sent again later: a time-out, a connection
    error, a 429 or 5xx answer, or a body that is not JSON (a proxy's error page, a cut
    connection)."""
    import openai

    if isinstance(error, (openai.APITimeoutError, openai.APIConnectionError, json.JSONDecodeError,
                          openai.APIResponseValidationError)):
        return True
    status = getattr(error, "status_code", None)
    return isinstance(error, openai.APIStatusError) and isinstance(status, int) and (status == 429 or status >= 500)


def describe_failure(error: Exception, max_retries: int) -> str:
    """One line on why a request failed for good."""
    import openai

    retried = f" (after {max_retries} retries)" if max_retries else ""
    if isinstance(error, openai.APITimeoutError):
        return f"request timed out{retried}"
    if isinstance(error, openai.APIConnectionError):
        return f"connection failed{retried}: {error.__cause__ or error}"
    if isinstance(error, json.JSONDecodeError):
        return f"the server's answer is not valid JSON ({error.msg} at character {error.pos})"
    if isinstance(error, openai.APIStatusError):
        code = getattr(error, "code", None)
        message = " ".join(str(getattr(error, "message", error)).split())
        if code in REFUSAL_CODES:
            return f"refused by the server's content policy ({code}): {message}"
        retryable = error.status_code == 429 or error.status_code >= 500
        return f"HTTP {error.status_code}{retried if retryable else ''}: {message}"
    return f"{type(error).__name__}: {error}"
