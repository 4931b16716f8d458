"""A real HTTP server speaking OpenAI chat completions, whose faults the tests script.

Not a mock: the client under test opens real TCP connections to it. Each request takes the next
behaviour from ``script`` (then ``default``); after ``fail_after`` answered requests every further
request is dropped, like a server that dies halfway. Every request body and Authorization header
is recorded, so tests assert exactly what reached the server.

Run as a script (``python chat_server.py --port N``) it is a tiny stand-in LLM server process for
the server-lifecycle tests.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

BEHAVIOURS = ("ok", "drop", "500", "503", "429", "400", "sleep", "garbage", "no_choices")


def echo_answer(body: dict) -> str:
    return "answer to: " + body["messages"][-1]["content"]


def _examples(user: str) -> list[str]:
    return re.findall(r"^Example \d+: (.*)$", user, flags=re.MULTILINE)


def oracle_answer(body: dict) -> str:
    """A perfect judge for fixture latents that fire on one word.

    Explainer: names the most common marked span. Detection: 1 where the example contains the
    explained word. Fuzzing: 1 where every marked span is that word.
    """
    system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
    if "[EXPLANATION]" in system:
        spans = Counter(re.findall(r"<<(.*?)>>", user))
        return f'[EXPLANATION]: the word "{spans.most_common(1)[0][0]}"'
    found = re.search(r'Feature: the word "(.*)"', user)
    assert found is not None, f"not a fixture explanation: {user[:80]!r}"
    word = found.group(1)
    if "yes or no" in system:  # one example per prompt (method logprob)
        one = re.search(r"^Example: (.*)$", user, flags=re.MULTILINE)
        assert one is not None, f"no example in {user[:80]!r}"
        example = one.group(1)
        spans = re.findall(r"<<(.*?)>>", example)
        hit = (bool(spans) and all(s == word for s in spans)) if "marked" in system else \
            bool(re.search(rf"\b{re.escape(word)}\b", example))
        return "yes" if hit else "no"
    if "marked" in system:
        answers = [int(bool(spans) and all(s == word for s in spans))
                   for spans in (re.findall(r"<<(.*?)>>", e) for e in _examples(user))]
    else:
        answers = [int(bool(re.search(rf"\b{re.escape(word)}\b", e))) for e in _examples(user)]
    return json.dumps(answers)


class _QuietServer(ThreadingHTTPServer):
    """Clients that time out close their socket; the late write's broken pipe is expected."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ChatServer:
    """``with ChatServer(answer=..., script=[...]) as server:`` then use ``server.base_url``."""

    def __init__(self, answer: Callable[[dict], str] = echo_answer, script: Sequence[str] = (),
                 default: str = "ok", fail_after: int | None = None, sleep: float = 1.0,
                 delay: float = 0.0, logprobs: bool = True) -> None:
        self.answer, self.script, self.default = answer, list(script), default
        self.logprobs = logprobs  # False: ignore "logprobs" in requests, as transformers serve
        self.fail_after, self.sleep, self.delay = fail_after, sleep, delay
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.answered = self.granted = 0
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self.httpd = _QuietServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def requests(self) -> int:
        return len(self.bodies)

    def _next(self, body: dict, auth: str | None) -> str:
        with self._lock:
            self.bodies.append(body)
            self.auth.append(auth)
            if self.fail_after is not None and self.granted >= self.fail_after:
                return "drop"
            behaviour = self.script.pop(0) if self.script else self.default
            self.granted += behaviour == "ok"  # decided here, so concurrency cannot overshoot
            return behaviour

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                behaviour = server._next(body, self.headers.get("Authorization"))
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server._respond(self, behaviour, body)
                finally:
                    with server._lock:
                        server.in_flight -= 1

        return Handler

    def _respond(self, handler: BaseHTTPRequestHandler, behaviour: str, body: dict) -> None:
        if behaviour == "drop":
            handler.close_connection = True
            return
        time.sleep(self.sleep if behaviour == "sleep" else self.delay)
        if behaviour in ("500", "503", "429", "400"):
            self._send(handler, int(behaviour), b'{"error": "scripted"}')
        elif behaviour == "garbage":
            self._send(handler, 200, b"<html>not json")
        elif behaviour == "no_choices":
            self._send(handler, 200, b'{"object": "chat.completion", "choices": []}')
        else:
            with self._lock:
                self.answered += 1
            text = self.answer(body)
            reply = {"object": "chat.completion", "model": body.get("model"), "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text},
                 "finish_reason": "stop"}]}
            if body.get("logprobs") and self.logprobs:  # OpenAI/vLLM layout: the answer token is the likely one
                other = {"yes": " No", "no": " Yes"}.get(text.strip().lower(), "maybe")
                top = [{"token": text, "logprob": -0.2}, {"token": other, "logprob": -1.8},
                       {"token": "The", "logprob": -4.0}]
                reply["choices"][0]["logprobs"] = {"content": [
                    {"token": text, "logprob": -0.2, "top_logprobs": top}]}
            self._send(handler, 200, json.dumps(reply).encode())

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def __enter__(self) -> Self:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    args = parser.parse_args()
    time.sleep(args.startup_delay)
    srv = ChatServer()
    srv.httpd.server_close()
    srv.httpd = _QuietServer(("127.0.0.1", args.port), srv._handler())
    print(f"listening on {args.port}", flush=True)
    srv.httpd.serve_forever()
