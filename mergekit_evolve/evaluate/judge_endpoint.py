"""A judge behind an OpenAI-compatible chat-completions endpoint (``judge_model: openai:MODEL``).

OpenAI itself, or a server of one's own speaking the same API (vLLM, llama.cpp's server, Ollama,
TGI). The judge writes a reply and ``pattern`` reads the rating from it (``scoring: parse``),
as MT-Bench's GPT-4 judge is read. Its URL and key come from the environment variables the
recipe's ``endpoint:`` names (``OPENAI_BASE_URL``, ``OPENAI_API_KEY`` by default, as the openai
client reads them), so a published recipe holds neither. Replies are asked ``concurrency`` at a
time; a rate limit, a server error or a lost connection is tried again ``retries`` times, then
the trial fails with the endpoint's own message. Plain ``urllib``: no client package to install.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mergekit_evolve.evaluate.example_objectives import ObjectiveError, TaskSetupError
from mergekit_evolve.recipe.evolve_settings import ENDPOINT_PREFIX, EndpointSettings, GenerationSettings

DEFAULT_URL = "https://api.openai.com/v1"
RETRIED = (408, 409, 429)  # and every 5xx: the request itself was fine


class EndpointError(ObjectiveError):
    """The endpoint's answer, as one line; ``status`` is its HTTP status (None: no answer, or not JSON)."""

    def __init__(self, message: str, status: int | None):
        super().__init__(message)
        self.status = status


class Endpoint:
    def __init__(self, judge_model: str, settings: EndpointSettings):
        self.model = judge_model.removeprefix(ENDPOINT_PREFIX)
        self.settings = settings

    @property
    def url(self) -> str:
        return (os.environ.get(self.settings.url_env) or DEFAULT_URL).rstrip("/")

    def check(self) -> None:
        """Before the search: the endpoint answers, and serves the model when it lists its models."""
        where = f"judge_model: {ENDPOINT_PREFIX}{self.model}"
        if not os.environ.get(self.settings.url_env) and not os.environ.get(self.settings.key_env):
            raise TaskSetupError(f"{where}: set {self.settings.url_env} "
                                 "(your server's URL, e.g. http://localhost:8000/v1) "
                                 f"or {self.settings.key_env} (OpenAI's API) in the environment", field="judge_model")
        try:
            listing = self.request("GET", "/models", retries=0)
        except EndpointError as e:
            if e.status == 404:  # a server without the listing still serves chat completions
                return
            raise TaskSetupError(f"{where}: {e}", field="judge_model") from None
        served = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]
        if served and self.model not in served:
            raise TaskSetupError(f"{where}: {self.url} serves no model '{self.model}' (it serves: {', '.join(served)})",
                                 field="judge_model")

    def replies(self, texts: list[str], ids: list[int], settings: GenerationSettings) -> list[str]:
        """The judge's reply to each text, as one user turn; sampled replies are seeded by ``settings.seed`` and
        the example id, as a local model's are (a server may ignore the seed: OpenAI's is best effort)."""
        def ask(text: str, example: int) -> str:
            body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": text}],
                                    "max_tokens": settings.max_new_tokens}
            if settings.do_sample:
                body.update(temperature=settings.temperature, seed=settings.seed * 1_000_003 + example)
            else:
                body["temperature"] = 0
            answer = self.request("POST", "/chat/completions", body)
            try:
                return answer["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise ObjectiveError(f"judge {ENDPOINT_PREFIX}{self.model}: {self.url}/chat/completions answered "
                                     f"without choices[0].message.content: {json.dumps(answer)[:200]}") from None

        with ThreadPoolExecutor(self.settings.concurrency) as pool:
            return list(pool.map(ask, texts, ids))

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                retries: int | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if key := os.environ.get(self.settings.key_env):
            headers["Authorization"] = f"Bearer {key}"
        data = None if body is None else json.dumps(body).encode()
        retries = self.settings.retries if retries is None else retries
        status = None
        for attempt in range(retries + 1):
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                status, reason, wait = e.code, f"HTTP {e.code}: {_message(e)}", _retry_after(e)
                if e.code not in RETRIED and e.code < 500:
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                status, reason, wait = None, str(getattr(e, "reason", e)) or type(e).__name__, None
            except json.JSONDecodeError as e:
                status, reason, wait = None, f"an answer that is not JSON ({e.msg})", None
                break
            if attempt < retries:
                time.sleep(wait if wait is not None else min(2.0**attempt, 30.0))
        tried = f" (tried {attempt + 1} times)" if attempt else ""
        raise EndpointError(f"judge {ENDPOINT_PREFIX}{self.model}: {method} {self.url}{path}: {reason}{tried}", status)


def _message(error: urllib.error.HTTPError) -> str:
    """The server's own words: OpenAI's ``{"error": {"message": ...}}``, else the body's first line."""
    text = error.read().decode("utf-8", "replace")
    try:
        found = json.loads(text).get("error")
        text = found.get("message", text) if isinstance(found, dict) else str(found or text)
    except (json.JSONDecodeError, AttributeError):
        pass
    return (text.strip().splitlines() or [error.reason or ""])[0][:300]


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    try:
        return min(float(error.headers.get("Retry-After", "")), 60.0)
    except ValueError:
        return None
