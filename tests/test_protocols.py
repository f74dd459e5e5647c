"""Evaluation protocols: second-attempt prompts (golden strings), the two_attempt engine over
the hf, vllm (request building) and openai engines, SCoRe's metrics (golden cases)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from backtrack.engines import Completion, GenerationParams, derive_seed
from backtrack.errors import UserError
from backtrack.formats import phrase_retry_text, second_attempt_prompt
from backtrack.protocols import (BudgetForcingEngine, TwoAttemptEngine, get_protocol,
                                 two_attempt_record)

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from backtrack.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_second_attempt_prompts_match_golden_strings(tokenizer):
    from backtrack.chat import render_prompt

    golden = json.loads((GOLDEN / "second_attempt.json").read_text())
    assert render_prompt(tokenizer, golden["messages"]) == golden["prompt"]
    for case in golden["cases"]:
        prompt, carried = second_attempt_prompt(
            tokenizer, golden["messages"], golden["prompt"], case["attempt"],
            case["finish_reason"], case["form"], case["text"])
        assert (prompt, carried) == (case["expected_prompt"], case["expected_carried"]), \
            case["name"]
    with pytest.raises(ValueError, match="phrase"):
        second_attempt_prompt(tokenizer, [], "", "x", "stop", "nope", "t")


class ScriptedEngine:
    """First call: the given outputs; later calls continue every prompt with `then`."""

    def __init__(self, first, then=Completion(" 3 + 4 = 7</think>\nThe answer is 7.", 11,
                                              "stop")):
        self.first, self.then, self.calls = first, then, []

    def generate(self, prompts, params):
        self.calls.append((list(prompts), params))
        if len(self.calls) == 1:
            return self.first
        return [[self.then] for _ in prompts]

    def close(self):
        self.closed = True


def _tokenizer(text, add_special_tokens=False):
    return {"input_ids": text.split()}


def test_budget_forcing_replaces_first_think_close_and_continues_once():
    first = [[Completion("<think>2 + 2 = 5</think>\nThe answer is 5.", 12, "stop"),
              Completion("<think>2 + 2 = 5", 30, "length")]]
    inner = ScriptedEngine(first, Completion(" 2 + 2 = 4</think>\nThe answer is 4.", 9, "stop"))
    engine = BudgetForcingEngine(inner, _tokenizer, "Wait")
    (forced, untouched), = engine.generate(["PROMPT"], GenerationParams(n=2, seed=3))
    assert len(inner.calls) == 2
    prompts, params = inner.calls[1]
    assert prompts == ["PROMPT<think>2 + 2 = 5Wait"] and params.n == 1
    assert forced.text == "<think>2 + 2 = 5Wait 2 + 2 = 4</think>\nThe answer is 4."
    assert forced.finish_reason == "stop"
    assert forced.new_tokens == len("<think>2 + 2 = 5Wait".split()) + 9
    assert (untouched.text, untouched.new_tokens, untouched.finish_reason) == \
        ("<think>2 + 2 = 5", 30, "length")
    engine.close()
    assert inner.closed


def test_two_attempt_engine_keeps_attempt_one_and_counts_both(tokenizer):
    from backtrack.tasks import Problem, get_task

    first = [[Completion("<think>3 + 4 = 8</think>\nThe answer is 8.", 12, "stop"),
              Completion("<think>3 + 4 = 7</think>\nThe answer is 7.", 10, "stop")]]
    inner = ScriptedEngine(first)
    engine = TwoAttemptEngine(inner, tokenizer, "phrase", "Wait, that's not right...", {})
    (fixed, kept), = engine.generate(["P"], GenerationParams(n=2, seed=3))
    prompts, params = inner.calls[1]
    assert prompts == ["P<think>3 + 4 = 8\nWait, that's not right...",
                       "P<think>3 + 4 = 7\nWait, that's not right..."]
    assert params.n == 1 and params.seed == 4
    assert fixed.text == "<think>3 + 4 = 8\nWait, that's not right... 3 + 4 = 7</think>\n" \
                         "The answer is 7."
    assert fixed.new_tokens == 12 + 11 and fixed.extra["attempt1_new_tokens"] == 12
    task = get_task("arith")
    problem = Problem("p", "Tom has 3 apples and gets 4 more.", "7")
    wrong_then_right = two_attempt_record(task, problem, "P", 0, fixed)
    right_then_right = two_attempt_record(task, problem, "P", 1, kept)
    assert (wrong_then_right["attempt1_correct"], wrong_then_right["correct"]) == (False, True)
    assert wrong_then_right["attempt1_extracted"] == "8"
    assert (right_then_right["attempt1_correct"], right_then_right["correct"]) == (True, True)


def test_two_attempt_instruction_form_over_vllm_request_building(tokenizer, monkeypatch):
    """The vllm engine (vLLM is not installed here) receives attempt 2 as token ids of the
    instruction-turn prompt, one sample each, seeded from that prompt."""
    requests = []

    class FakeLLM:
        def __init__(self, **kwargs):
            pass

        def get_tokenizer(self):
            return tokenizer

        def generate(self, inputs, sampling, use_tqdm=False):
            requests.append((inputs, sampling))
            return [SimpleNamespace(outputs=[SimpleNamespace(
                index=i, text="<think>x</think>\nThe answer is 7.", token_ids=(5, 6),
                finish_reason="stop") for i in range(s["n"])]) for s in sampling]

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(LLM=FakeLLM,
                                                             SamplingParams=lambda **kw: kw))
    from backtrack.chat import render_prompt
    from backtrack.engines import make_engine

    messages = [{"role": "user", "content": "Q?"}]
    prompt = render_prompt(tokenizer, messages)
    engine = get_protocol("two_attempt").wrap(
        make_engine("vllm", "/model"), tokenizer,
        SimpleNamespace(second_attempt="instruction", second_attempt_instruction="Fix it.",
                        second_attempt_phrase="unused"), {prompt: messages})
    (only,), = engine.generate([prompt], GenerationParams(n=1, temperature=0.5, seed=2))
    second = render_prompt(tokenizer, messages + [
        {"role": "assistant", "content": "<think>x</think>\nThe answer is 7."},
        {"role": "user", "content": "Fix it."}])
    inputs, sampling = requests[1]
    assert inputs == [{"prompt_token_ids": tokenizer(second, add_special_tokens=False)[
        "input_ids"]}]
    assert sampling[0]["n"] == 1 and sampling[0]["seed"] == derive_seed(3, second)
    assert only.extra["second_attempt"] == "instruction" and only.new_tokens == 4


def test_two_attempt_over_hf_and_openai_engines(tiny_model_dir, tokenizer):
    """The same protocol object drives the real hf engine and the openai engine (served over
    loopback HTTP by the hf engine): same attempt-2 prompts, same completions."""
    from test_engines import TinyServer

    from backtrack.engines import make_engine

    hf = make_engine("hf", str(tiny_model_dir), batch_size=8, num_threads=1)
    server = TinyServer(hf)
    try:
        config = SimpleNamespace(second_attempt="phrase", second_attempt_phrase="Wait, that's "
                                 "not right...", second_attempt_instruction="unused")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Ben has 5 pens."}],
                                               tokenize=False, add_generation_prompt=True)
        params = GenerationParams(n=1, temperature=1.0, max_new_tokens=12, seed=5)
        wrapped = get_protocol("two_attempt").wrap(hf, tokenizer, config, {})
        (hf_row,), = wrapped.generate([prompt], params)
        openai = make_engine("openai", "tiny", base_url=server.url)
        (api_row,), = get_protocol("two_attempt").wrap(openai, tokenizer, config, {}).generate(
            [prompt], params)
        for row in (hf_row, api_row):
            carried = phrase_retry_text(row.extra["attempt1"], row.extra[
                "attempt1_finish_reason"], "Wait, that's not right...")
            assert row.text.startswith(carried) and row.extra["second_attempt"] == "phrase"
            assert row.new_tokens > row.extra["attempt1_new_tokens"] >= 1
        assert server.bodies[-1]["prompt"] == prompt + phrase_retry_text(
            api_row.extra["attempt1"], api_row.extra["attempt1_finish_reason"],
            "Wait, that's not right...")
    finally:
        server.close()


def test_score_metrics_golden_cases():
    from backtrack.metrics import summarize

    golden = json.loads((GOLDEN / "score_metrics.json").read_text())
    for case in golden["cases"]:
        records = [{**r, "completion": "", "extracted": None, "new_tokens": 1, "answer": "1"}
                   for r in case["records"]]
        metrics = summarize(records, n_boot=20)["metrics"]
        for name, value in case["expected"].items():
            assert metrics[name]["value"] == pytest.approx(value), (case["name"], name)


def test_unknown_protocol_is_a_user_error():
    from backtrack.arms import parse_evaluation

    assert parse_evaluation("base@two_attempt").name == "base@two_attempt"
    assert parse_evaluation("budget_forcing").protocol == "forcing"
    with pytest.raises(UserError, match="unknown protocol 'nope'"):
        parse_evaluation("base@nope")
