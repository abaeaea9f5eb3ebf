"""A loopback server speaking the OpenAI images API, misbehaving on request.

    with LoopbackImagesAPI(latency=0.05) as api:
        serving = APIImageGenServing("loopback-image", base_url=api.base_url, api_key=api.api_key)

Each image is a small solid-colour PNG whose colour derives from the prompt, the request's
seed (when sent) and the image's index, so results are deterministic. A prompt containing
a marker makes the server misbehave for that prompt, one action per request in turn
(the last action repeats):

| marker        | answers                                                          |
| ------------- | ---------------------------------------------------------------- |
| `[429]`       | 429 with `Retry-After: 0.1`, then images                          |
| `[429-wait]`  | 429 with `Retry-After: 1.2` (longer than any backoff), then images |
| `[500x2]`     | 500 twice, then images                                           |
| `[500]`       | 500 always                                                       |
| `[hang]`      | no answer for `hang_seconds` (past any short client time-out)    |
| `[hang-once]` | hangs once, then images                                          |
| `[bad-b64]`   | 200 with a body whose `b64_json` is not base64                   |
| `[refuse]`    | 400 `content_policy_violation`                                   |
| `[echo-auth]` | 401 whose message repeats the request's Authorization header     |

With `response_format="url"`, markers choose the URL answered instead:

| marker               | the image URL                                                  |
| -------------------- | -------------------------------------------------------------- |
| `[url-file]`         | `file:///etc/passwd`                                           |
| `[url-redirect-host]`| redirects to the same file on `localhost` (another host name)  |
| `[url-redirect-same]`| redirects to the file on the same host                         |
| `[url-huge]`         | `huge_bytes` bytes without a length, then the connection closes |
| `[url-trickle]`      | the file one byte per 50 ms (for at most `hang_seconds`)        |

`requests` counts requests per prompt (every attempt, retries included) and `arrivals`
holds their arrival times.
"""

from __future__ import annotations

import base64
import hashlib
import io
import time

from PIL import Image

from dataflowmm.kit.loopback_server import (
    COMMON_SCRIPTS,
    LoopbackHandler,
    LoopbackServer,
    error_body,
    serve_until_interrupted,
)

SCRIPTS = {
    **COMMON_SCRIPTS,
    "[bad-b64]": ["bad-b64"],
    "[refuse]": ["refuse"],
}


def loopback_image(prompt: str, seed: object, index: int, size: int = 16) -> Image.Image:
    """The image the loopback server draws for (prompt, seed, index): one solid colour."""
    digest = hashlib.sha256(f"{prompt}\x1f{seed}\x1f{index}".encode()).digest()
    return Image.new("RGB", (size, size), tuple(digest[:3]))


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class LoopbackImagesAPI(LoopbackServer):
    """An OpenAI-compatible `/v1/images/generations` server on 127.0.0.1 (a thread per request).

    Args:
        latency: seconds every request waits before answering.
        api_key: the bearer token it requires (401 otherwise).
        hang_seconds: how long a `[hang]` request stays unanswered.
        image_size: side of the square images, in pixels.
        port: port on 127.0.0.1 (0: any free one).
        huge_bytes: how many bytes a `[url-huge]` download sends.

    `python -m dataflowmm.kit.loopback_images_api --latency 0.05` serves one from its own process
    and prints its base URL (the API key is `sk-loopback-secret` unless `--api-key` is given).
    """

    path = "/images/generations"
    scripts = SCRIPTS

    def __init__(self, latency: float = 0.0, api_key: str = "sk-loopback-secret",
                 hang_seconds: float = 5.0, image_size: int = 16, port: int = 0,
                 huge_bytes: int = 2 * 2**20):
        super().__init__(latency=latency, api_key=api_key, hang_seconds=hang_seconds, port=port)
        self.huge_bytes = huge_bytes
        self.image_size = image_size
        self._files: dict[str, bytes] = {}

    def _answer(self, body: dict, host: str) -> dict:
        prompt, seed = body["prompt"], body.get("seed")
        data = []
        for index in range(int(body.get("n") or 1)):
            image = loopback_image(prompt, seed, index, self.image_size)
            if body.get("response_format") == "url":
                name = hashlib.sha256(f"{prompt}{seed}{index}".encode()).hexdigest()[:16]
                with self._lock:
                    self._files[name] = base64.b64decode(_png_b64(image))
                data.append({"url": _image_url(prompt, host, name)})
            else:
                data.append({"b64_json": _png_b64(image)})
        return {"created": int(time.time()), "data": data}


def _image_url(prompt: str, host: str, name: str) -> str:
    if "[url-file]" in prompt:
        return "file:///etc/passwd"
    kinds = [kind for kind in ("redirect-host", "redirect-same", "huge", "trickle") if f"[url-{kind}]" in prompt]
    return f"http://{host}/{kinds[0] if kinds else 'files'}/{name}.png"


class _Handler(LoopbackHandler):
    api: LoopbackImagesAPI

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        kind, _, name = self.path.strip("/").rpartition("/")
        content = self.api._files.get(name.removesuffix(".png"))
        if content is None:
            self._send(404, error_body("no such file"))
        elif kind in ("redirect-host", "redirect-same"):
            host = f"http://localhost:{self.server.server_address[1]}" if kind == "redirect-host" else ""
            self._send(302, b"", {"Location": f"{host}/files/{name}"})
        elif kind in ("huge", "trickle"):
            self._stream(kind, content)
        else:
            self._send(200, content, content_type="image/png")

    def _stream(self, kind: str, content: bytes) -> None:
        """`[url-huge]`: huge_bytes bytes, no length; `[url-trickle]`: a byte per 50 ms."""
        self.close_connection = True
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            if kind == "trickle":
                self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if kind == "huge":
                piece = content + bytes(64 * 1024)
                for _ in range(self.api.huge_bytes // len(piece) + 1):
                    self.wfile.write(piece)
                return
            deadline = time.monotonic() + self.api.hang_seconds
            for byte in content:
                if self.api._stopping.wait(0.05) or time.monotonic() > deadline:
                    return
                self.wfile.write(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):  # the client gave up
            pass

    def _invalid(self, body: dict) -> str | None:
        return None if isinstance(body.get("prompt"), str) else "prompt is required"

    def _action(self, body: dict) -> str:
        return self.api._action(body["prompt"])

    def _play(self, action: str, body: dict) -> None:
        if action == "ok":
            self._send(200, self.api._answer(body, self.headers.get("Host", "127.0.0.1")))
        elif action == "bad-b64":
            self._send(200, {"created": 0, "data": [{"b64_json": "this is *not* base64!"}] * int(body.get("n") or 1)})
        elif action == "refuse":
            self._send(400, error_body("Your request was rejected as a result of our safety system.",
                                       "content_policy_violation"))


LoopbackImagesAPI.handler = _Handler


def main(argv: list[str] | None = None) -> None:
    """Serve until interrupted: `python -m dataflowmm.kit.loopback_images_api --latency 0.05`."""
    serve_until_interrupted(LoopbackImagesAPI, "A loopback OpenAI-compatible images API (for offline tries).", argv)


if __name__ == "__main__":
    main()
