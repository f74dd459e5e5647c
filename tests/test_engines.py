"""Engines: the hf engine on a tiny model, vLLM request building, the OpenAI engine over HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from backtrack.engines import GenerationParams, cut_at_stop, derive_seed, make_engine
from backtrack.errors import UserError


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    import torch

    threads = torch.get_num_threads()  # one thread: far faster for a tiny model on a busy CPU
    yield make_engine("hf", str(tiny_model_dir), batch_size=16, num_threads=1)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts(hf):
    from backtrack.chat import render_prompt

    questions = ["Tom has 3 apples.", "Ann has 12 coins. Ann gets 4 more. How many coins now?",
                 "Ben has 5 pens.", "Mia has 7 cards. Mia gets 2 more."]
    return [render_prompt(hf.tokenizer, [{"role": "user", "content": q}]) for q in questions]


def sampled(params=None, **kw) -> GenerationParams:
    return params or GenerationParams(**{"n": 3, "temperature": 1.0, "max_new_tokens": 24,
                                         "seed": 7, **kw})


def test_hf_is_deterministic_for_a_seed_and_order_free(hf, prompts):
    first = hf.generate(prompts, sampled())
    assert [[c.text for c in row] for row in first] == \
        [[c.text for c in row] for row in hf.generate(prompts, sampled())]
    other = hf.generate(prompts, sampled(seed=8))
    assert [c.text for row in other for c in row] != [c.text for row in first for c in row]
    reordered = hf.generate(prompts[::-1], sampled())[::-1]
    assert [[c.text for c in row] for row in reordered] == [[c.text for c in row] for row in first]
    assert all(len(row) == 3 for row in first)
    assert len({c.text for row in first for c in row}) > 3  # samples differ


def test_shared_prefill_matches_num_return_sequences(hf, prompts):
    shared = hf.generate(prompts, sampled())
    hf.share_prefill = False
    try:
        copied = hf.generate(prompts, sampled())
    finally:
        hf.share_prefill = True
    assert [[c.token_ids for c in row] for row in shared] == \
        [[c.token_ids for c in row] for row in copied]


def test_hf_greedy_equals_generate_on_the_prompt_ids(hf, prompts):
    """The engine feeds exactly the prompt's tokens (no extra BOS) and decodes losslessly."""
    import torch

    params = GenerationParams(n=1, temperature=0, max_new_tokens=20)
    for prompt, row in zip(prompts, hf.generate(prompts, params)):
        ids = hf.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = hf.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=20, eos_token_id=hf.eos_ids,
                                    pad_token_id=hf.pad_id)
        expected = out[0, ids.shape[1]:].tolist()
        completion = row[0]
        ended = bool(expected) and expected[-1] in hf.eos_ids
        assert completion.token_ids == (expected[:-1] if ended else expected)
        assert completion.new_tokens == len(expected)
        assert completion.finish_reason == ("stop" if ended else "length")
        assert completion.text == hf.tokenizer.decode(completion.token_ids)


def test_hf_finish_reasons_and_stop_strings(hf, prompts):
    rows = hf.generate(prompts, sampled(n=4, max_new_tokens=12))
    completions = [c for row in rows for c in row]
    for c in completions:
        assert "<|im_end|>" not in c.text and "<|pad|>" not in c.text
        if c.finish_reason == "length":
            assert c.new_tokens == 12 == len(c.token_ids)
        else:
            assert c.new_tokens == len(c.token_ids) + 1 <= 12
    # Stop at a string the model is known to produce at this seed: the text ends before it.
    target = next(c for c in completions if len(c.text) > 6)
    stop = target.text[3:6]
    stopped = hf.generate(prompts, sampled(n=4, max_new_tokens=12, stop=[stop]))
    flat = [c for row in stopped for c in row]
    assert all(stop not in c.text for c in flat)
    hit = [c for c in flat if c.finish_reason == "stop" and len(c.token_ids) >= c.new_tokens]
    assert hit and all(c.new_tokens < 12 or c.finish_reason == "stop" for c in hit)


def test_params_and_engine_errors(tiny_model_dir):
    with pytest.raises(UserError, match="temperature 0"):
        GenerationParams(n=2, temperature=0).validate()
    with pytest.raises(UserError, match="unknown engine 'gpt'"):
        make_engine("gpt", str(tiny_model_dir))
    with pytest.raises(UserError, match=r"unknown option\(s\) \['batchsize'\]"):
        make_engine("hf", str(tiny_model_dir), batchsize=3)


def test_openai_token_split():
    from backtrack.engines.openai import split_tokens

    choices = [{"text": "abc", "finish_reason": "stop"}, {"text": "x", "finish_reason": "length"},
               {"text": "a", "finish_reason": "stop"}]
    assert split_tokens(20, choices, 10) == [8, 10, 2]
    assert split_tokens(7, choices[:1], 10) == [7]


def test_cut_at_stop_and_seeds():
    assert cut_at_stop("a b\nQuestion: c", ["\nQuestion:", "b"]) == ("a ", True)
    assert cut_at_stop("abc", ["x", ""]) == ("abc", False)
    assert derive_seed(1, "p") == derive_seed(1, "p") != derive_seed(2, "p")


# ---------------------------------------------------------------- vLLM (request building only)


def test_vllm_request_building():
    from backtrack.engines.vllm import llm_kwargs, sampling_kwargs, to_completions, token_prompt

    params = GenerationParams(n=4, temperature=0.7, top_p=0.9, max_new_tokens=99, seed=3,
                              stop=["\nQ:"])
    kw = sampling_kwargs(params, "prompt text", [2, 5])
    assert kw == {"n": 4, "temperature": 0.7, "top_p": 0.9, "max_tokens": 99,
                  "seed": derive_seed(3, "prompt text"), "stop": ["\nQ:"],
                  "stop_token_ids": [2, 5], "skip_special_tokens": False,
                  "spaces_between_special_tokens": False}
    assert sampling_kwargs(GenerationParams(n=1, temperature=0), "p", [])["stop"] is None
    with pytest.raises(UserError, match="temperature 0"):
        sampling_kwargs(GenerationParams(n=2, temperature=0), "p", [])
    llm = llm_kwargs("/m", tensor_parallel_size=2, data_parallel_size=2, max_model_len=4096)
    assert llm["enable_prefix_caching"] is True and llm["tensor_parallel_size"] == 2
    assert llm["data_parallel_size"] == 2 and llm["max_model_len"] == 4096
    assert "data_parallel_size" not in llm_kwargs("/m")
    assert token_prompt([1, 2]) == {"prompt_token_ids": [1, 2]}
    out = SimpleNamespace(outputs=[
        SimpleNamespace(index=1, text="b<|im_end|>", token_ids=(4, 5, 2), finish_reason="stop"),
        SimpleNamespace(index=0, text="a", token_ids=(3,), finish_reason="length")])
    got = to_completions(out, ("<|im_end|>",))
    assert [(c.text, c.new_tokens, c.finish_reason) for c in got] == [
        ("a", 1, "length"), ("b", 3, "stop")]


def test_vllm_missing_is_a_user_error(tiny_model_dir):
    pytest.importorskip("backtrack")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"backtrack\[vllm\]"):
            make_engine("vllm", str(tiny_model_dir))
    else:
        pytest.skip("vLLM is installed")


# ---------------------------------------------------------------- OpenAI-compatible over HTTP


class TinyServer:
    """A real HTTP server on loopback serving /v1/completions from the hf engine."""

    def __init__(self, engine, fail_first: int = 0, status: int = 503):
        self.engine, self.fail_left, self.status = engine, fail_first, status
        self.bodies, self.in_flight, self.max_in_flight = [], 0, 0
        self.lock, self.engine_lock = threading.Lock(), threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, data):
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self._send(200, {"data": [{"id": "tiny"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append(body)
                    failing = server.fail_left > 0
                    server.fail_left -= failing
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if failing:
                        status, data = server.status, {"error": "busy"}
                    else:
                        time.sleep(0.02)  # let concurrent requests overlap
                        status, data = 200, server.complete(body)
                finally:  # before replying: the client may send its next request at once
                    with server.lock:
                        server.in_flight -= 1
                self._send(status, data)

        return Handler

    def complete(self, body: dict) -> dict:
        params = GenerationParams(n=body["n"], temperature=body["temperature"],
                                  top_p=body["top_p"], max_new_tokens=body["max_tokens"],
                                  seed=body["seed"], stop=body.get("stop") or [])
        with self.engine_lock:
            (row,) = self.engine.generate([body["prompt"]], params)
        self.last_usage = sum(c.new_tokens for c in row)
        return {"choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason}
                            for i, c in enumerate(row)],
                "usage": {"completion_tokens": self.last_usage}}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_openai_engine_over_loopback_http(hf, prompts):
    server = TinyServer(hf)
    try:
        engine = make_engine("openai", "tiny", base_url=server.url, concurrency=2)
        assert engine.model == "tiny"  # taken from /v1/models
        params = GenerationParams(n=1, temperature=1.0, max_new_tokens=16, seed=5, stop=["\n"])
        rows = engine.generate(prompts * 2, params)
        for prompt, row in zip(prompts * 2, rows):
            direct = hf.generate([prompt], GenerationParams(
                n=1, temperature=1.0, max_new_tokens=16, seed=derive_seed(5, prompt),
                stop=["\n"]))[0]
            assert [(c.text, c.new_tokens, c.finish_reason) for c in row] == \
                [(c.text, c.new_tokens, c.finish_reason) for c in direct]
        assert server.max_in_flight <= 2
        body = server.bodies[0]
        assert body["model"] == "tiny" and body["stop"] == ["\n"] and body["max_tokens"] == 16
        assert body["skip_special_tokens"] is False and body["prompt"] in prompts
        many = engine.generate(prompts[:1], GenerationParams(n=3, temperature=1.0,
                                                             max_new_tokens=10, seed=1))[0]
        assert len(many) == 3 and all(0 <= c.new_tokens <= 10 for c in many)
        assert all(c.new_tokens == 10 for c in many if c.finish_reason == "length")
        assert sum(c.new_tokens for c in many) == server.last_usage
    finally:
        server.close()


def test_openai_engine_retries_then_succeeds(hf, prompts):
    server = TinyServer(hf, fail_first=2)
    try:
        engine = make_engine("openai", "tiny", base_url=server.url, served_model="tiny",
                             backoff=0.01)
        rows = engine.generate(prompts[:1], GenerationParams(n=1, temperature=0,
                                                             max_new_tokens=5))
        assert len(rows[0]) == 1 and len(server.bodies) == 3
    finally:
        server.close()


def test_openai_engine_client_error_is_not_retried(hf):
    server = TinyServer(hf, fail_first=5, status=400)
    try:
        engine = make_engine("openai", "tiny", base_url=server.url, served_model="x")
        with pytest.raises(UserError, match="HTTP 400"):
            engine.generate(["p"], GenerationParams(n=1, temperature=0, max_new_tokens=2))
        assert len(server.bodies) == 1
    finally:
        server.close()


def test_openai_engine_unreachable_server():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"cannot reach .*after 2 attempts"):
        make_engine("openai", "m", base_url=f"http://127.0.0.1:{port}/v1", retries=1,
                    backoff=0.01)
    assert time.perf_counter() - start < 5
