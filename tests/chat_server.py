"""A small OpenAI-compatible chat-completions server on 127.0.0.1, what Ollama, LM Studio and vLLM
serve at /v1: the prompt enhancer's tests talk to it over real HTTP through the `openai` client."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

Behaviour = Literal["expand", "error", "slow", "empty", "garbage"]


def expansion_of(prompt: str) -> str:
    """What the server answers for `prompt`: deterministic, so tests know the enhanced prompt."""
    return f"A detailed photograph of {prompt}, soft golden evening light, shallow depth of field."


@dataclass
class ChatServer:
    url: str = ""
    behaviour: Behaviour = "expand"
    slow_s: float = 3.0
    requests: list[dict[str, Any]] = field(default_factory=list)

    def answer(self, body: dict[str, Any]) -> tuple[int, bytes]:
        self.requests.append(body)
        if self.behaviour == "error":
            return 500, b'{"error": {"message": "model crashed: /srv/secret/path"}}'
        if self.behaviour == "slow":
            time.sleep(self.slow_s)
        if self.behaviour == "garbage":
            return 200, b"<html>not json</html>"
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        content = "" if self.behaviour == "empty" else f'Here is the prompt: "{expansion_of(user)}"'
        return 200, json.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "test"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
            }
        ).encode()


@contextmanager
def chat_server() -> Iterator[ChatServer]:
    server_state = ChatServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self.send_error(404)
                return
            length = int(self.headers.get("Content-Length", 0))
            status, payload = server_state.answer(json.loads(self.rfile.read(length)))
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout): nothing to answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    server_state.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_state
    finally:
        httpd.shutdown()
        httpd.server_close()
