"""An OpenAI-compatible chat-completions server on loopback, scripted per test.

The real `openai` client talks to it over HTTP, so everything between the
gateway and the wire is the production code. Each call is answered by the next
scripted reply, or by a handler function; a call beyond the script is an
error the test sees at teardown (`assert_no_surprises`).

A request with `"stream": true` is answered as Server-Sent Events in OpenAI's
shape (`chat.completion.chunk` objects, then `data: [DONE]`): a `streamed(...)`
reply as its exact content deltas, any other successful completion as one
delta. Error replies stay plain JSON, as the real API sends them.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "FakeOpenAI",
    "Reply",
    "completion",
    "garbage",
    "http_error",
    "slow",
    "streamed",
    "verdict",
]


@dataclass(frozen=True)
class Reply:
    """One scripted answer: an HTTP status, a body, headers, and a delay before sending.

    `chunks` (set by `streamed`) are the content deltas a stream request gets,
    with `chunk_delay_s` between events; None streams the body's content whole.
    """

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    chunks: tuple[str, ...] | None = None
    chunk_delay_s: float = 0.0


def completion(
    content: str, *, model: str = "fake-critic", tokens: tuple[int, int] = (120, 40)
) -> Reply:
    """A chat completion whose message content is `content`."""
    return Reply(
        200,
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content},
                 "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": tokens[0], "completion_tokens": tokens[1],
                      "total_tokens": sum(tokens)},
        },
    )  # fmt: skip


def streamed(chunks: list[str], *, delay_s: float = 0.0) -> Reply:
    """A completion sent to a stream request as exactly these content deltas.

    `delay_s` is the pause after each content event (before the next delta or the
    closing chunk): the first delta comes at once, so a test can make a stream
    stall or outlast its deadline after it began. A non-stream request gets the
    joined text as an ordinary completion.
    """
    base = completion("".join(chunks))
    return replace(base, chunks=tuple(chunks), chunk_delay_s=delay_s)


def verdict(
    violates: bool, rules: list[str] | None = None, *, explanation: str = "", revised: str = ""
) -> Reply:
    """A completion carrying the critic's JSON verdict."""
    return completion(json.dumps({
        "violates_rules": violates,
        "violated_rules": rules or [],
        "explanation": explanation or ("breaks a rule" if violates else "complies"),
        "revised_response": revised,
    }))  # fmt: skip


def http_error(status: int, message: str = "scripted failure", retry_after: str = "") -> Reply:
    """An error response in OpenAI's shape."""
    headers = {"retry-after": retry_after} if retry_after else {}
    return Reply(status, {"error": {"message": message, "type": "server_error"}}, headers)


def garbage(text: str = "I think it is fine!! {not json") -> Reply:
    """A completion whose content is not the JSON verdict."""
    return completion(text)


def slow(seconds: float, reply: Reply | None = None) -> Reply:
    """`reply` (a clean verdict by default) after `seconds`."""
    return replace(reply or verdict(False), delay_s=seconds)


Handler = Callable[[dict[str, Any]], Reply]


def _sse_events(reply: Reply, request: dict[str, Any]) -> list[tuple[bool, dict[str, Any]]]:
    """The `chat.completion.chunk` objects that stream `reply`, in OpenAI's order.

    A role-only first chunk, one chunk per content delta, a chunk with
    finish_reason, and (when the request asked for `include_usage`) a last chunk
    with no choices and the usage; while usage is asked for, the others carry
    `"usage": null`, as the API does. Each comes with whether to pause before it
    (it follows a content delta).
    """
    body = reply.body if isinstance(reply.body, dict) else {}
    choices = body.get("choices") or [{}]
    message = choices[0].get("message") or {}
    finish = choices[0].get("finish_reason") or "stop"
    deltas = list(reply.chunks) if reply.chunks is not None else [message.get("content") or ""]
    options = request.get("stream_options") or {}
    with_usage = bool(options.get("include_usage"))
    base = {
        "id": body.get("id", "chatcmpl-fake"),
        "object": "chat.completion.chunk",
        "created": body.get("created", int(time.time())),
        "model": body.get("model", "fake-critic"),
        "system_fingerprint": None,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        event = {**base, "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ]}  # fmt: skip
        if with_usage:
            event["usage"] = None
        return event

    events = [(False, chunk({"role": "assistant", "content": "", "refusal": None}))]
    events += [(i > 0, chunk({"content": text})) for i, text in enumerate(deltas)]
    events.append((bool(deltas), chunk({}, finish)))
    if with_usage:
        events.append((False, {**base, "choices": [], "usage": body.get("usage")}))
    return events


class FakeOpenAI:
    """The server; use as a context manager or call `close()`."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.surprises: list[str] = []
        self._script: deque[Reply] = deque()
        self._handler: Handler | None = None
        self._lock = threading.Lock()
        fake = self

        class _Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                reply = fake._next(self.path, body)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if body.get("stream") and reply.status == 200:
                    self._stream(reply, body)
                    return
                payload = json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout); that is the point of slow replies

            def _stream(self, reply: Reply, request: dict[str, Any]) -> None:
                # HTTP/1.0 without a content-length: closing the connection ends the body.
                events: list[tuple[bool, dict[str, Any] | str]] = [
                    *_sse_events(reply, request),
                    (False, "[DONE]"),
                ]
                try:
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("cache-control", "no-cache")
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    for pause, event in events:
                        if pause and reply.chunk_delay_s:
                            time.sleep(reply.chunk_delay_s)
                        data = event if isinstance(event, str) else json.dumps(event)
                        self.wfile.write(f"data: {data}\n\n".encode())
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading (its deadline); nothing to finish

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        """What to give the `openai` client (or OPENAI_BASE_URL)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, *replies: Reply) -> None:
        """Answer the next calls with these replies, in order."""
        with self._lock:
            self._script.extend(replies)

    def handle_with(self, handler: Handler | None) -> None:
        """Answer calls beyond the script with `handler(request_json)`."""
        self._handler = handler

    @property
    def calls(self) -> int:
        """Chat-completion calls received."""
        return len(self.requests)

    def _next(self, path: str, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.requests.append(body)
            if not path.endswith("/chat/completions"):
                self.surprises.append(f"unexpected path {path}")
                return http_error(404, "not found")
            if self._script:
                return self._script.popleft()
        if self._handler is not None:
            return self._handler(body)
        self.surprises.append(f"call {len(self.requests)} was not scripted")
        return http_error(500, "the fake was called more often than scripted")

    def assert_no_surprises(self) -> None:
        """Fail when the fake was called more than scripted, or on a wrong path."""
        assert not self.surprises, self.surprises

    def close(self) -> None:
        """Stop the server."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
