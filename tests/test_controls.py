"""rft_fix (coverage control) and rft_bt_confirm (confirm traces): which traces each keeps
(golden cases, built through the backtrack stage's own chain code), and their SFT datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_build import build, make_run, tokenizer  # noqa: F401 (fixture)

from backtrack.backtracking import Chain, confirms, run_chains
from backtrack.engines import Completion, GenerationParams
from backtrack.errors import UserError
from backtrack.generation import RunStats
from backtrack.methods.confirm import confirm_count, confirm_examples
from backtrack.methods.controls import fix_examples
from backtrack.methods.rft import bt_examples
from backtrack.tasks import get_task

GOLDEN = json.loads((Path(__file__).parent / "golden" / "controls.json").read_text())
MILD = "Wait, that's not right..."
TASK = get_task("arith", {})


class RoundScript:
    """A model that writes `continuations[r - 1]` in round r (r = phrases in its prompt)."""

    def __init__(self, continuations: list[str]):
        self.continuations = continuations

    def generate(self, prompts, params):
        return [[Completion(self.continuations[p.count(MILD) - 1], 5, "stop")] * params.n
                for p in prompts]


def traced(attempt: str, continuations: list[str], kind: str = "wrong", pid: str = "p0",
           idx: int = 0, prompt: str = "<P>") -> dict:
    """The backtrack record of `attempt` sent back with the mild phrase, made by run_chains."""
    check = TASK.check(attempt, "8")
    sample = {"problem_id": pid, "sample_idx": idx, "round": 0, "prompt": prompt,
              "completion": attempt, "extracted": check.extracted, "correct": check.correct,
              "new_tokens": 9, "finish_reason": "stop", "answer": "8"}
    chain = Chain.start(sample, 0, kind)
    run_chains(RoundScript(continuations), TASK, [chain], [MILD], rounds=len(continuations),
               params=GenerationParams(seed=0), stats=RunStats())
    return chain.record()


@pytest.mark.parametrize("case", GOLDEN["rft_fix"], ids=lambda c: c["name"])
def test_rft_fix_golden(case):
    record = traced(case["attempt"], case["continuations"])
    assert record["chain"][0]["correct"] is False
    fixes, info = fix_examples([record], None, TASK, "golden")
    bt, _ = bt_examples([record], None, "all", "golden")
    assert [e.completion for e in fixes] == ([case["fix"]] if case["fix"] else [])
    assert info["traces"] == len(bt) == (1 if case["fix"] or case["dropped"] else 0)
    assert [k for k, n in info["dropped"].items() if n] == ([case["dropped"]] if case["dropped"]
                                                           else [])
    for example in fixes:
        assert MILD not in example.completion and example.source == "fix"
        assert TASK.check(example.completion, "8").correct


@pytest.mark.parametrize("case", GOLDEN["confirm"], ids=lambda c: c["name"])
def test_confirm_golden(case):
    record = traced(case["attempt"], [case["continuation"]], kind="confirm")
    assert record["kind"] == "confirm" and record["chain"][0]["correct"] is True
    assert len(record["chain"]) == 2  # one round, whatever the continuation says
    assert confirms(record) is case["kept"]
    examples, sent = confirm_examples([record], None, "golden")
    assert sent == 1 and len(examples) == int(case["kept"])
    # a confirm trace is never a wrong -> right trace of rft_bt or rft_fix
    assert bt_examples([record], None, "all", "golden")[0] == []
    assert fix_examples([record], None, TASK, "golden")[0] == []


def test_one_fix_per_rft_bt_trace():
    """Two wrong attempts with the same correction: two fixes (as rft_bt has two traces); the
    same trace twice: one of each."""
    right = "\n3 + 1 = 4\n4 * 2 = 8\n</think>\nThe answer is 8."
    records = [traced("<think>\n3 + 1 = 5\n</think>\nThe answer is 5.", [right], idx=0),
               traced("<think>\n3 + 1 = 6\n</think>\nThe answer is 6.", [right], idx=1),
               traced("<think>\n3 + 1 = 6\n</think>\nThe answer is 6.", [right], idx=2)]
    fixes, _ = fix_examples(records, None, TASK, "x")
    bt, bt_info = bt_examples(records, None, "all", "x")
    assert len(fixes) == len(bt) == 2 and bt_info["duplicates_dropped"] == 1
    assert {e.completion for e in fixes} == {"<think>\n3 + 1 = 4\n4 * 2 = 8\n</think>\n"
                                             "The answer is 8."}


def test_fix_that_does_not_check_right_alone_is_dropped():
    """A chain step marked right whose continuation, on its own, answers wrong (a checker the
    record disagrees with) gives no clean solution."""
    record = traced("<think>\n3 + 1 = 5\n</think>\nThe answer is 5.",
                    ["\n3 + 1 = 4\n4 * 2 = 8\n</think>\nThe answer is 8."])
    record["answer"] = "9"
    fixes, info = fix_examples([record], None, TASK, "x")
    assert fixes == [] and info["dropped"]["not_right_alone"] == 1


def test_confirm_share_mixing():
    assert [confirm_count(10, s) for s in (0.0, 0.2, 0.5, 0.75)] == [0, 2, 10, 30]
    right = "<think>\n3 + 1 = 4\n4 * 2 = 8\n</think>\nThe answer is 8."
    records = [traced(right, [f"\n3 + 1 = 4\n4 * 2 = 8\n</think>\nThe answer is 8.{' ' * i}"],
                      kind="confirm", pid=f"p{i}") for i in range(6)]
    first, sent = confirm_examples(records, None, "x")
    again, _ = confirm_examples(list(reversed(records)), None, "x")
    # a fixed order whatever the records' order, so the first N is a fixed choice
    assert sent == 6 and len(first) == 6
    assert [e.problem_id for e in first] == [e.problem_id for e in again]


def _add_confirm(out: Path, tokenizer) -> None:
    """Confirm records beside the wrong traces of test_build's run (same store)."""
    from backtrack.store import RecordStore
    from test_build import _answer, _prompt, QUESTIONS

    records = []
    for idx, (pid, cont) in enumerate([("p0", " 3 + 1 = 4</think>\nThe answer is 4."),
                                       ("p1", " 5 + 2 = 7</think>\nThe answer is 7."),
                                       ("p1", " 5 + 2 = 8</think>\nThe answer is 8.")]):
        question, gold = QUESTIONS[pid]
        sample = {"problem_id": pid, "sample_idx": 10 + idx, "round": 0,
                  "prompt": _prompt(tokenizer, question), "completion": _answer(*{
                      "p0": (3, 1, 4), "p1": (5, 2, 7)}[pid]), "extracted": str(gold),
                  "correct": True, "new_tokens": 9, "finish_reason": "stop", "answer": str(gold)}
        chain = Chain.start(sample, 0, "confirm")
        chain.steps.append({"round": 1, "prefix": sample["completion"][:-len(
            f"</think>\nThe answer is {gold}.")], "phrase": "\n" + MILD, "completion": cont,
            "extracted": cont.split()[-1].rstrip("."), "correct": str(gold) in cont.split()[-1],
            "new_tokens": 5, "finish_reason": "stop"})
        records.append(chain.record())
    with RecordStore.read(out / "backtrack") as store:
        fingerprint = store.fingerprint
    with RecordStore(out / "backtrack", fingerprint, key_fields=store.key_fields) as store:
        store.append(records)


def test_build_rft_fix_and_rft_bt_confirm(tmp_path, tiny_model_dir, tokenizer):
    from datasets import load_from_disk

    out = make_run(tmp_path / "run", tokenizer)
    _add_confirm(out, tokenizer)
    build(out, tiny_model_dir, arms=["rft", "rft_bt", "rft_fix", "rft_bt_confirm"],
          confirm_share=0.5)
    data = {arm: load_from_disk(str(out / "sft" / arm))
            for arm in ("rft", "rft_bt", "rft_fix", "rft_bt_confirm")}
    fix = [r for r in data["rft_fix"] if r["source"] == "fix"]
    assert len(data["rft_fix"]) == len(data["rft"]) + 1 == len(data["rft_bt"])
    assert fix[0]["completion"] == "<think>3 + 1 = 4</think>\nThe answer is 4.<|im_end|>"
    assert sum(fix[0]["completion_mask"]) == len(fix[0]["input_ids"]) - fix[0]["prompt_length"]
    confirm = [r for r in data["rft_bt_confirm"] if r["source"] == "confirm"]
    # one wrong -> right trace, share 0.5 -> one confirm trace, of the two that kept the answer
    assert len(confirm) == 1 and len(data["rft_bt_confirm"]) == len(data["rft_bt"]) + 1
    assert confirm[0]["completion"].startswith("<think>")
    assert MILD in confirm[0]["completion"] and "The answer is 8" not in confirm[0]["completion"]
    stats = json.loads((out / "sft" / "stats.json").read_text())
    per_arm = stats["inputs"]["per_arm"]
    assert per_arm["rft_bt_confirm"]["confirm_sent"] == 3
    assert per_arm["rft_bt_confirm"]["confirm_kept"] == 2
    assert stats["arms"]["rft_bt_confirm"]["sources"] == {"bt": 1, "confirm": 1, "rft": 3}
    assert data["rft_bt"]["source"].count("bt") == 1  # confirm records do not reach rft_bt


def test_rft_bt_confirm_without_confirm_traces_is_a_one_line_error(tmp_path, tiny_model_dir,
                                                                    tokenizer):
    out = make_run(tmp_path / "run", tokenizer)
    with pytest.raises(UserError, match=r"no confirm traces .*--confirm") as err:
        build(out, tiny_model_dir, arms=["rft_bt_confirm"])
    assert str(out / "backtrack") in str(err.value) and "\n" not in str(err.value)
    assert not (out / "sft").exists()
    build(out, tiny_model_dir, arms=["rft_bt_confirm"], confirm_share=0.0)  # share 0: rft_bt
