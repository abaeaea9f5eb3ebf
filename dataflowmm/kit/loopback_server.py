"""What the loopback API servers share: an HTTP server on 127.0.0.1 in a thread, a bearer key,
a fixed latency, scripted misbehaviour per request key, and request counting.

A request's key (the images API: its prompt; the chat API: its question and images) picks
a script by the markers it contains; attempt `k` of that key gets the script's action `k`
(the last one repeats), so a retried request meets the next action.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar


class _Server(ThreadingHTTPServer):
    """A thread per request, and room for every connection a burst of clients opens at once:
    with socketserver's listen backlog of 5, the connections past it wait for a SYN
    retransmission (1 s), so a client with a short time-out gave up on a request the server
    never saw, and request counts came out short."""

    daemon_threads = True
    request_queue_size = 128


# Actions every loopback server knows; each server adds its own.
COMMON_SCRIPTS: dict[str, list[str]] = {
    "[429-wait]": ["429-wait", "ok"],
    "[429]": ["429", "ok"],
    "[500x2]": ["500", "500", "ok"],
    "[500]": ["500"],
    "[hang-once]": ["hang", "ok"],
    "[hang]": ["hang"],
    "[echo-auth]": ["echo-auth"],
}


def error_body(message: str, code: str | None = None, kind: str = "invalid_request_error") -> dict:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


class LoopbackServer:
    """An OpenAI-compatible server on 127.0.0.1 (a thread per request); see the subclasses.

    Args:
        latency: seconds every request waits before answering.
        api_key: the bearer token it requires (401 otherwise).
        hang_seconds: how long a `[hang]` request stays unanswered.
        port: port on 127.0.0.1 (0: any free one).

    `requests` counts requests per key (every attempt, retries included), `arrivals` holds
    their arrival times, `bodies` the JSON bodies received, `max_in_flight` the most
    requests it held at once.
    """

    path: ClassVar[str] = ""  # the endpoint, e.g. "/images/generations"
    scripts: ClassVar[dict[str, list[str]]] = COMMON_SCRIPTS
    handler: ClassVar[type]

    def __init__(self, latency: float = 0.0, api_key: str = "sk-loopback-secret", hang_seconds: float = 5.0,
                 port: int = 0):
        self.latency = latency
        self.api_key = api_key
        self.hang_seconds = hang_seconds
        self.port = port
        self.requests: Counter[str] = Counter()
        self.arrivals: dict[str, list[float]] = {}
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
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

    def start(self):
        handler = type("Handler", (self.handler,), {"api": self})
        self._server = _Server(("127.0.0.1", self.port), handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _action(self, key: str, marked: str | None = None) -> str:
        """Count a request for `key` and return its scripted action (markers looked up in
        `marked`, default the key)."""
        with self._lock:
            attempt = self.requests[key]
            self.arrivals.setdefault(key, []).append(time.monotonic())
            self.requests[key] += 1
        text = key if marked is None else marked
        for marker, script in self.scripts.items():
            if marker in text:
                return script[min(attempt, len(script) - 1)]
        return "ok"


class LoopbackHandler(BaseHTTPRequestHandler):
    """Reads a POST to the server's endpoint, checks the key, counts it in flight, and
    plays the common actions; a subclass answers `ok` and its own actions in `_play`."""

    api: LoopbackServer
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

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) or b"{}"
        if not self.path.rstrip("/").endswith(self.api.path):
            self._send(404, error_body(f"unknown path {self.path}"))
            return
        if self.headers.get("Authorization", "") != f"Bearer {self.api.api_key}":
            self._send(401, error_body("invalid API key", "invalid_api_key"))
            return
        try:
            body = json.loads(raw)
            problem = self._invalid(body)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            problem = f"malformed request: {error}"
        if problem:
            self._send(400, error_body(problem))
            return
        with self.api._lock:
            self.api.bodies.append(body)
            self.api.in_flight += 1
            self.api.max_in_flight = max(self.api.max_in_flight, self.api.in_flight)
        try:
            action = self._action(body)
            if self.api.latency:
                time.sleep(self.api.latency)
            if not self._play_common(action):
                self._play(action, body)
        finally:
            with self.api._lock:
                self.api.in_flight -= 1

    def _play_common(self, action: str) -> bool:
        if action == "429":
            self._send(429, error_body("rate limited", "rate_limit_exceeded", "requests"), {"Retry-After": "0.1"})
        elif action == "429-wait":
            self._send(429, error_body("rate limited", "rate_limit_exceeded", "requests"), {"Retry-After": "1.2"})
        elif action == "500":
            self._send(500, error_body("internal error", None, "server_error"))
        elif action == "hang":
            self.api._stopping.wait(self.api.hang_seconds)
            self._send(500, error_body("too late"))
        elif action == "echo-auth":
            self._send(401, error_body(f"key not accepted: {self.headers.get('Authorization')}", "invalid_api_key"))
        else:
            return False
        return True

    def _invalid(self, body: Any) -> str | None:
        """Why the request body is unusable (a 400), or None."""
        raise NotImplementedError

    def _action(self, body: dict) -> str:
        """Count the request and return its scripted action."""
        raise NotImplementedError

    def _play(self, action: str, body: dict) -> None:
        """Answer `ok` or this server's own actions."""
        raise NotImplementedError


def serve_until_interrupted(server_class: type, description: str, argv: Sequence[str] | None = None,
                            **options: Any) -> None:
    """`python -m ...`: serve one server from its own process, printing its base URL."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds every request waits")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--api-key", default="sk-loopback-secret", help="the bearer token it requires")
    args = parser.parse_args(argv)
    api = server_class(latency=args.latency, api_key=args.api_key, port=args.port, **options).start()
    print(api.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        api.stop()
