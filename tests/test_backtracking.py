"""`backtrack backtrack`: exact cutting and phrase insertion, rounds, token-exact continuation."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import BACKTRACK_CMD

from backtrack.backtracking import (PRESETS, BacktrackConfig, Chain, choose_phrase, cut_point,
                                    insertion, resolve_phrases, run_chains)
from backtrack.engines import Completion, GenerationParams
from backtrack.errors import UserError
from backtrack.generation import RunStats
from backtrack.store import RecordStore
from backtrack.tasks import get_task

MILD = "Wait, that's not right..."


def continued(text: str, finish: str = "stop", phrase: str = MILD) -> str:
    prefix = text[:cut_point(text, finish)]
    return prefix + insertion(prefix, phrase)


@pytest.mark.parametrize("text, finish, expected", [
    # closing tag: replaced by the phrase on a new line
    ("<think>3 + 4 = 7\n7 * 2 = 14</think>\nThe answer is 14.", "stop",
     "<think>3 + 4 = 7\n7 * 2 = 14\nWait, that's not right..."),
    # the tag on its own line: the phrase takes its place
    ("<think>\n3 + 4 = 7\n</think>\n\nThe answer is 7.", "stop",
     "<think>\n3 + 4 = 7\nWait, that's not right..."),
    # spaces before the tag go with the cut-off part
    ("<think>3 + 4 = 7 </think> The answer is 7.", "stop",
     "<think>3 + 4 = 7\nWait, that's not right..."),
    # several tags (an earlier round's text): the last one
    ("<think>a</think>b\nWait, that's not right... c</think>\nThe answer is 2.", "stop",
     "<think>a</think>b\nWait, that's not right... c\nWait, that's not right..."),
    # the tag wins over truncation
    ("<think>3 + 4 = 7</think>\nThe answer is 7. And then", "length",
     "<think>3 + 4 = 7\nWait, that's not right..."),
    # no tag, truncated: after the last complete line
    ("<think>3 + 4 = 7\n7 * 2 = 1", "length", "<think>3 + 4 = 7\nWait, that's not right..."),
    ("<think>3 + 4 = 7 and th", "length", "Wait, that's not right..."),
    # no tag, finished: before the final answer statement
    ("3 + 4 = 7\n7 * 2 = 14\nThe answer is 14.", "stop",
     "3 + 4 = 7\n7 * 2 = 14\nWait, that's not right..."),
    ("3 + 4 = 7. The answer is 7.", "stop", "3 + 4 = 7.\nWait, that's not right..."),
    # no tag and no answer: the phrase goes at the end
    ("<think>3 + 4 = 7", "stop", "<think>3 + 4 = 7\nWait, that's not right..."),
    ("", "stop", "Wait, that's not right..."),
])
def test_cut_and_insert_golden(text, finish, expected):
    assert continued(text, finish) == expected


def test_phrases():
    assert resolve_phrases(["mild"]) == [MILD]
    assert resolve_phrases("strong") == ["Wait, that's definitely wrong..."]
    assert resolve_phrases(["Hmm, let me re-check.", "mild"]) == ["Hmm, let me re-check.", MILD]
    for bad, message in ((["medium"], "unknown preset 'medium'"), ([" "], "must not be empty"),
                         ([], "give a preset")):
        with pytest.raises(UserError, match=message):
            resolve_phrases(bad)
    with pytest.raises(UserError, match="unknown preset"):
        BacktrackConfig(phrase=["wait"]).validate()
    phrases = ["A...", "B...", "C..."]
    picks = [choose_phrase(phrases, f"p{i}", 0, 0, 1) for i in range(60)]
    assert picks == [choose_phrase(phrases, f"p{i}", 0, 0, 1) for i in range(60)]
    assert set(picks) == set(phrases)
    assert {choose_phrase([MILD], f"p{i}", 1, 2, 3) for i in range(5)} == {MILD}


class ScriptedEngine:
    """Returns scripted continuations and records what it was asked."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, params):
        self.calls.append((list(prompts), params.n))
        return [[Completion(self.script(p, i), 5, "stop") for i in range(params.n)]
                for p in prompts]


def wrong_sample(pid, idx, completion, finish="stop"):
    return {"problem_id": pid, "sample_idx": idx, "round": 0, "prompt": "<P>",
            "completion": completion, "extracted": "13", "correct": False, "new_tokens": 9,
            "finish_reason": finish, "answer": "14"}


def test_rounds_send_still_wrong_continuations_back():
    task = get_task("arith", {})
    a = wrong_sample("a", 0, "<think>3 + 4 = 7</think>\nThe answer is 13.")
    b = wrong_sample("b", 1, "<think>2 * 7 = 15</think>\nThe answer is 15.")

    def script(prompt, i):
        if prompt.startswith("<P><think>3 + 4 = 7\n"):
            return " 7 * 2 = 14</think>\nThe answer is 14." if prompt.count(MILD) == 1 \
                else " no</think>\nThe answer is 9."
        return " 2 * 7 = 13</think>\nThe answer is 13."  # b stays wrong

    engine = ScriptedEngine(script)
    chains = [Chain.start(a, c) for c in range(2)] + [Chain.start(b, 0)]
    run_chains(engine, task, chains, [MILD], rounds=3, params=GenerationParams(seed=1),
               stats=RunStats())
    # Round 1: a's two continuations share one prompt (n=2); b has its own.
    assert engine.calls[0] == (["<P><think>2 * 7 = 15\n" + MILD], 1)
    assert engine.calls[1] == (["<P><think>3 + 4 = 7\n" + MILD], 2)
    # Rounds 2 and 3 only for b, cut at its newest </think>.
    assert engine.calls[2] == ([f"<P><think>2 * 7 = 15\n{MILD} 2 * 7 = 13\n{MILD}"], 1)
    assert len(engine.calls) == 4
    record_a, record_b = chains[0].record(), chains[2].record()
    assert record_a["round"] == 1 and record_a["final_correct"] is True
    assert record_a["chain"][1] == {
        "round": 1, "prefix": "<think>3 + 4 = 7", "phrase": "\n" + MILD,
        "completion": " 7 * 2 = 14</think>\nThe answer is 14.", "extracted": "14",
        "correct": True, "new_tokens": 5, "finish_reason": "stop"}
    assert record_a["completion"] == \
        f"<think>3 + 4 = 7\n{MILD} 7 * 2 = 14</think>\nThe answer is 14."
    assert record_a["chain"][0]["completion"] == a["completion"] and record_a["phrase"] == MILD
    assert record_b["round"] == 3 and record_b["final_correct"] is False
    assert [s["correct"] for s in record_b["chain"]] == [False] * 4
    for step in record_b["chain"][1:]:  # every round keeps its exact text
        assert record_b["completion"].startswith(step["prefix"] + step["phrase"])
    assert record_b["chain"][3]["prefix"] == f"<think>2 * 7 = 15\n{MILD} 2 * 7 = 13\n{MILD} 2 * 7 = 13"


def test_continuation_extends_the_trace_token_for_token(tiny_model_dir):
    """The continuation prompt's tokens are the original trace's tokens up to the cut."""
    from backtrack.chat import render_continuation, render_prompt
    from backtrack.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    messages = [{"role": "user", "content": "Tom has 3 apples. Tom gets 4 more."}]
    prompt = render_prompt(tokenizer, messages)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for trace, finish in (("<think>3 + 4 = 7\n7 * 2 = 14</think>\nThe answer is 14.", "stop"),
                          ("<think>3 + 4 = 7\n7 * 2 = 14\nThe answer is 14.", "stop"),
                          ("<think>3 + 4 = 7\n7 * 2 = 1", "length")):
        prefix = trace[:cut_point(trace, finish)]
        original = encode(prompt + trace)
        kept = encode(prompt + prefix)
        assert original[:len(kept)] == kept  # the cut falls on a token boundary
        partial = prefix + insertion(prefix, PRESETS["mild"])
        continuation = encode(render_continuation(tokenizer, messages, partial))
        assert continuation[:len(kept)] == kept
        assert continuation[len(kept):] == encode(partial[len(prefix):])
        assert render_continuation(tokenizer, messages, partial) == prompt + partial


def test_backtrack_stage_end_to_end(tiny_model_dir, tmp_path, cli_env):
    import torch

    from backtrack import backtracking, sample

    threads = torch.get_num_threads()
    common = {"model": str(tiny_model_dir), "output_dir": str(tmp_path), "task": "arith",
              "max_new_tokens": 10, "progress": False, "engine_args": {"num_threads": 1}}
    try:
        sample.main(sample.SampleConfig(limit=3, k=2, **common))
        config = BacktrackConfig(rounds=2, continuations=2, batch_size=2, **common)
        summary = backtracking.main(config)
    finally:
        torch.set_num_threads(threads)
    samples = {(r["problem_id"], r["sample_idx"]): r
               for r in RecordStore.read(tmp_path / "samples").records()}
    wrong = [k for k, r in samples.items() if not r["correct"]]
    assert wrong, "a random tiny model should get some wrong"
    store = RecordStore.read(tmp_path / "backtrack")
    records = store.records()
    assert store.key_fields == ("problem_id", "sample_idx", "continuation_idx")
    assert sorted((r["problem_id"], r["sample_idx"], r["continuation_idx"]) for r in records) \
        == sorted((*k, c) for k in wrong for c in range(2))
    task = get_task("arith", {})
    for r in records:
        source = samples[(r["problem_id"], r["sample_idx"])]
        assert r["chain"][0]["completion"] == source["completion"] and r["prompt"] == source["prompt"]
        assert 1 <= r["round"] == len(r["chain"]) - 1 <= 2
        text, finish = source["completion"], source["finish_reason"]
        for step in r["chain"][1:]:
            assert step["prefix"] == text[:cut_point(text, finish)]
            assert step["phrase"] == insertion(step["prefix"], MILD)
            text, finish = step["prefix"] + step["phrase"] + step["completion"], step["finish_reason"]
            assert step["correct"] == task.check(text, r["answer"]).correct
            assert 1 <= step["new_tokens"] <= 10
        assert r["completion"] == text and r["final_correct"] == r["chain"][-1]["correct"]
    saved = json.loads((tmp_path / "backtrack" / "summary.json").read_text())
    assert saved["continuations"] == len(records) == summary["continuations"]
    assert saved["wrong_samples"] == len(wrong) and saved["rounds"][0]["continuations"] == len(records)
    # Resume: nothing redone. Bad input: one-line errors, exit 2, records untouched.
    shard = tmp_path / "backtrack" / "records-0-of-1.jsonl"
    before = shard.read_bytes()
    assert backtracking.main(config)["continuations"] == len(records)
    base = ["backtrack", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path),
            "--max-new-tokens", "10", "--rounds", "2", "--continuations", "2"]
    for extra, message in ((["--phrase", "medium"], "unknown preset 'medium'"),
                           (["--shard", "1/1"], "expected i/N"),
                           (["--engine", "tgi"], "'tgi' is not one of"),
                           (["--phrase", "strong"], "different config")):
        bad = subprocess.run(BACKTRACK_CMD + base + extra, env=cli_env, capture_output=True,
                             text=True, timeout=120)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    assert shard.read_bytes() == before
