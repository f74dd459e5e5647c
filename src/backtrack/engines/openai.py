"""The OpenAI-compatible engine: any server with `/v1/completions` (vLLM, SGLang, llama.cpp).

The plain completions endpoint takes raw prompt strings, so a continuation prompt (chat prompt
+ the model's partial answer) is continued exactly; the chat endpoint would re-render it.
Requests run in a bounded thread pool and are retried with exponential backoff on connection
errors, timeouts, 429 and 5xx; a server that stays unreachable is a one-line `UserError`.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from backtrack.engines import Completion, Engine, GenerationParams, derive_seed
from backtrack.errors import UserError

# vLLM / SGLang extensions: keep special tokens such as `<think>` in the text and do not add a
# second BOS to a prompt whose chat template already has one. Other servers ignore them.
DEFAULT_EXTRA_BODY = {"skip_special_tokens": False, "spaces_between_special_tokens": False,
                      "add_special_tokens": False}
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def completion_body(model: str, prompt: str, params: GenerationParams,
                    extra_body: dict | None) -> dict:
    """The JSON body of one `/v1/completions` request (seed derived from the prompt)."""
    body = {"model": model, "prompt": prompt, "n": params.n, "max_tokens": params.max_new_tokens,
            "temperature": params.temperature, "top_p": params.top_p,
            "seed": derive_seed(params.seed, prompt)}
    if params.stop:
        body["stop"] = list(params.stop)
    body.update(extra_body or {})
    return body


def split_tokens(total: int, choices: list[dict], max_tokens: int) -> list[int]:
    """Per-choice token counts from the response's total over its n choices.

    A choice cut by the length limit used exactly `max_tokens`; the rest of the total is
    shared among the others in proportion to their text length (exact when n = 1).
    """
    counts = [max_tokens if c.get("finish_reason") == "length" else 0 for c in choices]
    others = [i for i, c in enumerate(choices) if c.get("finish_reason") != "length"]
    rest = max(total - sum(counts), 0)
    weights = {i: max(len(choices[i].get("text") or ""), 1) for i in others}
    for i in others:
        counts[i] = rest * weights[i] // sum(weights.values())
    for j in range(rest - sum(counts[i] for i in others) if others else 0):
        counts[others[j % len(others)]] += 1
    return counts


def parse_response(data: dict, n: int, max_tokens: int) -> list[Completion]:
    choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != n:
        raise UserError(f"openai engine: server returned {len(choices)} choices, expected {n}")
    total = (data.get("usage") or {}).get("completion_tokens")
    counts = split_tokens(int(total), choices, max_tokens) if total is not None else [0] * n
    return [Completion(text=c.get("text") or "", new_tokens=k,
                       finish_reason="length" if c.get("finish_reason") == "length" else "stop")
            for k, c in zip(counts, choices)]


class OpenAIEngine(Engine):
    """`model_path` names the model; `served_model` overrides the name sent to the server
    (default: the first model the server lists)."""

    def __init__(self, model_path: str, base_url: str = "http://localhost:8000/v1",
                 served_model: str | None = None, api_key: str | None = None,
                 concurrency: int = 8, retries: int = 4, backoff: float = 1.0,
                 timeout: float = 600.0, extra_body: dict | None = None):
        import os

        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY")
        self.concurrency, self.retries = max(1, int(concurrency)), max(0, int(retries))
        self.backoff, self.timeout = float(backoff), float(timeout)
        self.extra_body = DEFAULT_EXTRA_BODY if extra_body is None else dict(extra_body)
        self._local = threading.local()
        self.model = served_model or self._first_model()

    def _session(self):
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            if self.api_key:
                self._local.session.headers["Authorization"] = f"Bearer {self.api_key}"
        return self._local.session

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        import requests

        url = f"{self.base_url}{path}"
        for attempt in range(self.retries + 1):
            try:
                response = self._session().request(method, url, json=body, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                error = f"cannot reach {url} ({type(exc).__name__})"
            else:
                if response.status_code == 200:
                    return response.json()
                error = f"{url} answered HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in RETRY_STATUS:
                    raise UserError(f"openai engine: {error}")
            if attempt < self.retries:
                time.sleep(min(self.backoff * 2 ** attempt, 30.0))
        raise UserError(f"openai engine: {error} after {self.retries + 1} attempts; "
                        "is the server running? (engine_args.base_url)")

    def _first_model(self) -> str:
        models = self._request("GET", "/models").get("data") or []
        if not models:
            raise UserError(f"openai engine: {self.base_url}/models lists no model; "
                            "set engine_args.served_model")
        return models[0]["id"]

    def _complete(self, prompt: str, params: GenerationParams) -> list[Completion]:
        body = completion_body(self.model, prompt, params, self.extra_body)
        return parse_response(self._request("POST", "/completions", body), params.n,
                              params.max_new_tokens)

    def generate(self, prompts: list[str], params: GenerationParams) -> list[list[Completion]]:
        params.validate()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda p: self._complete(p, params), prompts))
