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
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

SCRIPTS = {
    "[429-wait]": ["429-wait", "ok"],
    "[429]": ["429", "ok"],
    "[500x2]": ["500", "500", "ok"],
    "[500]": ["500"],
    "[hang-once]": ["hang", "ok"],
    "[hang]": ["hang"],
    "[bad-b64]": ["bad-b64"],
    "[refuse]": ["refuse"],
    "[echo-auth]": ["echo-auth"],
}


def loopback_image(prompt: str, seed: object, index: int, size: int = 16) -> Image.Image:
    """The image the loopback server draws for (prompt, seed, index): one solid colour."""
    digest = hashlib.sha256(f"{prompt}\x1f{seed}\x1f{index}".encode()).digest()
    return Image.new("RGB", (size, size), tuple(digest[:3]))


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class LoopbackImagesAPI:
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

    def __init__(self, latency: float = 0.0, api_key: str = "sk-loopback-secret",
                 hang_seconds: float = 5.0, image_size: int = 16, port: int = 0,
                 huge_bytes: int = 2 * 2**20):
        self.latency = latency
        self.api_key = api_key
        self.hang_seconds = hang_seconds
        self.huge_bytes = huge_bytes
        self.image_size = image_size
        self.port = port
        self.requests: Counter[str] = Counter()
        self.arrivals: dict[str, list[float]] = {}
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._files: dict[str, bytes] = {}
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def wait_for_requests(self, total: int, timeout: float = 10.0) -> int:
        """Wait until `total` requests have arrived (or `timeout` seconds pass); returns the count.

        A client that timed out has already moved on while its last attempt may still sit in
        this server's accept queue, so counts are only final once the server has read it.
        """
        deadline = time.monotonic() + timeout
        while self.total_requests < total and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.total_requests

    def start(self) -> LoopbackImagesAPI:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> LoopbackImagesAPI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what the handler asks ----------------------------------------------------------
    def _action(self, prompt: str) -> str:
        with self._lock:
            attempt = self.requests[prompt]
            self.arrivals.setdefault(prompt, []).append(time.monotonic())
            self.requests[prompt] += 1
        for marker, script in SCRIPTS.items():
            if marker in prompt:
                return script[min(attempt, len(script) - 1)]
        return "ok"

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


def _error(message: str, code: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


class _Handler(BaseHTTPRequestHandler):
    api: LoopbackImagesAPI
    protocol_version = "HTTP/1.1"  # keep-alive, as real API servers
    disable_nagle_algorithm = True  # headers and body go out at once: no 40 ms delayed-ACK stalls

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, payload: dict | bytes, headers: dict | None = None,
              content_type: str = "application/json") -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (time-out)
            pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        kind, _, name = self.path.strip("/").rpartition("/")
        content = self.api._files.get(name.removesuffix(".png"))
        if content is None:
            self._send(404, _error("no such file"))
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

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if not self.path.rstrip("/").endswith("/images/generations"):
            self._send(404, _error(f"unknown path {self.path}"))
            return
        authorization = self.headers.get("Authorization", "")
        if authorization != f"Bearer {self.api.api_key}":
            self._send(401, _error("invalid API key", "invalid_api_key"))
            return
        if not isinstance(body.get("prompt"), str):
            self._send(400, _error("prompt is required"))
            return
        with self.api._lock:
            self.api.bodies.append(body)
            self.api.in_flight += 1
            self.api.max_in_flight = max(self.api.max_in_flight, self.api.in_flight)
        try:
            self._generate(body)
        finally:
            with self.api._lock:
                self.api.in_flight -= 1

    def _generate(self, body: dict) -> None:
        action = self.api._action(body["prompt"])
        if self.api.latency:
            time.sleep(self.api.latency)
        if action == "ok":
            self._send(200, self.api._answer(body, self.headers.get("Host", "127.0.0.1")))
        elif action == "429":
            self._send(429, _error("rate limited", "rate_limit_exceeded", "requests"), {"Retry-After": "0.1"})
        elif action == "429-wait":
            self._send(429, _error("rate limited", "rate_limit_exceeded", "requests"), {"Retry-After": "1.2"})
        elif action == "500":
            self._send(500, _error("internal error", None, "server_error"))
        elif action == "hang":
            self.api._stopping.wait(self.api.hang_seconds)
            self._send(500, _error("too late"))
        elif action == "bad-b64":
            self._send(200, {"created": 0, "data": [{"b64_json": "this is *not* base64!"}] * int(body.get("n") or 1)})
        elif action == "refuse":
            self._send(400, _error("Your request was rejected as a result of our safety system.",
                                   "content_policy_violation"))
        elif action == "echo-auth":
            self._send(401, _error(f"key not accepted: {self.headers.get('Authorization')}", "invalid_api_key"))


def main(argv: list[str] | None = None) -> None:
    """Serve until interrupted: `python -m dataflowmm.kit.loopback_images_api --latency 0.05`."""
    import argparse

    parser = argparse.ArgumentParser(description="A loopback OpenAI-compatible images API (for offline tries).")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds every request waits")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--api-key", default="sk-loopback-secret", help="the bearer token it requires")
    args = parser.parse_args(argv)
    api = LoopbackImagesAPI(latency=args.latency, api_key=args.api_key, port=args.port).start()
    print(api.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        api.stop()


if __name__ == "__main__":
    main()
