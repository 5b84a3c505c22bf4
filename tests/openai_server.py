"""A local OpenAI-compatible chat-completions server for the tests: serves a causal LM folder greedily,
as vLLM or llama.cpp's server would, on 127.0.0.1 and a free port (never a remote address).

It answers ``GET /v1/models`` and ``POST /v1/chat/completions`` (the last user turn, continued by
the model through ``complete()``, the function a local judge writes its replies with), counts the
completions it serves, checks the bearer key when given one, and can fail its next requests on
purpose (``fail_next``) to exercise retries.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import transformers

from mergekit_evolve.evaluate.example_objectives import complete
from mergekit_evolve.recipe.evolve_settings import GenerationSettings


class JudgeServer:
    def __init__(self, folder: Path, name: str, key: str | None = None):
        self.name, self.key = name, key
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        self.completions = 0
        self.fail_next: list[tuple[int, str]] = []  # (status, message) for the next requests, in order
        self.lock = threading.Lock()  # one generation at a time, as one model on one device
        self.url = ""

    def reply(self, body: dict[str, Any]) -> str:
        text = body["messages"][-1]["content"]
        settings = GenerationSettings(max_new_tokens=body.get("max_tokens", 16))
        with self.lock:
            self.completions += 1
            return complete(self.model, self.tokenizer, [text], [0], settings, bool(self.tokenizer.chat_template))[0]

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def refused(self) -> bool:
                if server.key is not None and self.headers.get("Authorization") != f"Bearer {server.key}":
                    self.send(401, {"error": {"message": "Incorrect API key provided",
                                              "type": "invalid_request_error"}})
                    return True
                with server.lock:
                    failure = server.fail_next.pop(0) if server.fail_next else None
                if failure is not None:
                    self.send(failure[0], {"error": {"message": failure[1]}})
                    return True
                return False

            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    self.send(404, {"error": {"message": f"no route {self.path}"}})
                elif not self.refused():
                    self.send(200, {"object": "list", "data": [{"id": server.name, "object": "model"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    self.send(404, {"error": {"message": f"no route {self.path}"}})
                elif body.get("model") != server.name:
                    self.send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist"}})
                elif not self.refused():
                    content = server.reply(body)
                    self.send(200, {"object": "chat.completion", "model": server.name, "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "length"}]})

        return Handler


@contextmanager
def serving(folder: Path, name: str = "tiny-judge", key: str | None = None) -> Iterator[JudgeServer]:
    """The server, listening until the block ends; its base URL (``.../v1``) is ``server.url``."""
    server = JudgeServer(folder, name, key)
    http = ThreadingHTTPServer(("127.0.0.1", 0), server.handler())
    server.url = f"http://127.0.0.1:{http.server_address[1]}/v1"
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        http.shutdown()
        http.server_close()
        thread.join()
