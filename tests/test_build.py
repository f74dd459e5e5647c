"""`backtrack build`: arms, de-duplication, loss spans, tokenizer identity, bad input."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import BACKTRACK_CMD

from backtrack.build import BuildConfig, META_FILE, main
from backtrack.errors import UserError

QUESTIONS = {"p0": ("Tom has 3 apples. Tom gets 1 more. How many apples now?", 4),
             "p1": ("Ann has 5 coins. Ann gets 2 more. How many coins now?", 7)}
PHRASE = "Wait, that's not right..."


def _prompt(tokenizer, question: str) -> str:
    from backtrack.chat import render_prompt

    return render_prompt(tokenizer, [{"role": "user", "content": question}])


def _answer(a: int, b: int, result: int) -> str:
    return f"<think>{a} + {b} = {result}</think>\nThe answer is {result}."


BT_KEY = ("problem_id", "sample_idx", "continuation_idx")


def write_records(folder: Path, records: list[dict], key_fields=BT_KEY) -> None:
    """Write records through the record store, as the sample/backtrack stages do."""
    from backtrack.store import RecordStore

    with RecordStore(folder, {"test": folder.name}, key_fields=key_fields) as store:
        store.append(records)


def sample_record(tokenizer, pid: str, idx: int, completion: str, correct: bool) -> dict:
    question, gold = QUESTIONS[pid]
    return {"problem_id": pid, "sample_idx": idx, "round": 0,
            "prompt": _prompt(tokenizer, question), "completion": completion,
            "extracted": None, "correct": correct, "new_tokens": 10,
            "finish_reason": "stop", "answer": str(gold)}


def backtrack_record(tokenizer, pid: str, idx: int, wrong: str, continuation: str,
                     correct: bool) -> dict:
    """A one-round chain cut, joined and recorded by the backtrack stage's own code."""
    from backtrack.backtracking import Chain, cut_point, insertion

    chain = Chain.start(sample_record(tokenizer, pid, idx, wrong, False), 0)
    prefix = wrong[:cut_point(wrong, "stop")]
    inserted = insertion(prefix, PHRASE)
    chain.steps.append({"round": 1, "prefix": prefix, "phrase": inserted,
                        "completion": continuation, "extracted": None, "correct": correct,
                        "new_tokens": 9, "finish_reason": "stop"})
    chain.text = prefix + inserted + continuation
    return chain.record()


def bt_traces(tokenizer) -> list[dict]:
    """One wrong-then-right trace (p0) and one still wrong (p1)."""
    return [
        backtrack_record(tokenizer, "p0", 3, _answer(3, 1, 5),
                         " 3 + 1 = 4</think>\nThe answer is 4.", True),
        backtrack_record(tokenizer, "p1", 1, _answer(5, 2, 8),
                         " 5 + 2 = 9</think>\nThe answer is 9.", False),
    ]


def make_run(out: Path, tokenizer, bt: bool = True) -> Path:
    """A run folder with sample and backtrack records: 2 problems, duplicates, one wrong->right."""
    samples = [
        sample_record(tokenizer, "p0", 0, _answer(3, 1, 4), True),
        sample_record(tokenizer, "p0", 1, _answer(3, 1, 4), True),  # duplicate
        sample_record(tokenizer, "p0", 2, "<think>3 + 1 = 4, so 4</think>\nThe answer is 4.", True),
        sample_record(tokenizer, "p0", 3, _answer(3, 1, 5), False),
        sample_record(tokenizer, "p1", 0, _answer(5, 2, 7), True),
        sample_record(tokenizer, "p1", 1, _answer(5, 2, 8), False),
    ]
    traces = bt_traces(tokenizer)
    write_records(out / "samples", samples, key_fields=("problem_id", "sample_idx", "round"))
    write_records(out / "backtrack", traces if bt else [])
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def build(out: Path, model: Path, **kwargs) -> BuildConfig:
    config = BuildConfig(output_dir=str(out), model=str(model), **kwargs)
    main(config)
    return config


def _spans(tokenizer, row: dict) -> tuple[str, str]:
    """(text of tokens without loss, text of tokens with loss)."""
    ids, mask = row["input_ids"], row["completion_mask"]
    off = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    on = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    return off, on


def test_arms_dedup_stats_and_identity(tmp_path, tiny_model_dir, tokenizer):
    from datasets import load_from_disk

    out = make_run(tmp_path / "run", tokenizer)
    build(out, tiny_model_dir)
    rft, rft_bt = (load_from_disk(str(out / "sft" / arm)) for arm in ("rft", "rft_bt"))
    assert sorted(rft["completion"]) == sorted([
        _answer(3, 1, 4) + "<|im_end|>", _answer(5, 2, 7) + "<|im_end|>",
        "<think>3 + 1 = 4, so 4</think>\nThe answer is 4.<|im_end|>"])
    assert rft_bt["source"].count("bt") == 1 and len(rft_bt) == len(rft) + 1
    bt = rft_bt[rft_bt["source"].index("bt")]
    assert bt["completion"] == ("<think>3 + 1 = 5\n" + PHRASE
                                + " 3 + 1 = 4</think>\nThe answer is 4.<|im_end|>")
    assert bt["completion"] == bt_traces(tokenizer)[0]["completion"] + "<|im_end|>"
    for row in rft_bt:
        assert row["input_ids"][-1] == tokenizer.eos_token_id
        assert row["input_ids"][: row["prompt_length"]] == tokenizer(
            row["prompt"], add_special_tokens=False)["input_ids"]
    stats = json.loads((out / "sft" / "stats.json").read_text())
    assert stats["arms"]["rft"]["examples"] == 3 and stats["arms"]["rft"]["problems"] == 2
    assert stats["arms"]["rft_bt"]["backtracked_share"] == pytest.approx(0.25)
    mean = sum(len(r["input_ids"]) for r in rft_bt) / len(rft_bt)
    assert stats["arms"]["rft_bt"]["mean_tokens"] == pytest.approx(mean)
    assert stats["inputs"]["per_arm"]["rft"]["duplicates_dropped"] == 1
    meta = json.loads((out / "sft" / "rft" / META_FILE).read_text())
    assert meta["tokenizer"]["name_or_path"] == str(tiny_model_dir)
    assert (out / "sft" / "run.json").is_file()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("loss_on", ["all", "masked_wrong"])
def test_loss_spans(tmp_path, tiny_model_dir, tokenizer, loss_on):
    """`all`: the whole assistant turn; `masked_wrong`: the inserted phrase (with the newline
    that separates it from the cut text), the continuation and the end-of-turn token."""
    from datasets import load_from_disk

    out = make_run(tmp_path / "run", tokenizer)
    build(out, tiny_model_dir, loss_on=loss_on)
    rows = list(load_from_disk(str(out / "sft" / "rft_bt")))
    wrong = "<think>3 + 1 = 5"
    right = "\n" + PHRASE + " 3 + 1 = 4</think>\nThe answer is 4.<|im_end|>"
    for row in rows:
        off, on = _spans(tokenizer, row)
        if row["source"] == "rft":  # no wrong part: the same in both modes
            assert (off, on) == (row["prompt"], row["completion"])
        elif loss_on == "all":
            assert (off, on) == (row["prompt"], wrong + right)
        else:
            assert (off, on) == (row["prompt"] + wrong, right)


def test_max_per_problem(tmp_path, tiny_model_dir, tokenizer):
    from datasets import load_from_disk

    out = make_run(tmp_path / "run", tokenizer)
    build(out, tiny_model_dir, max_per_problem=1)
    rft = load_from_disk(str(out / "sft" / "rft"))
    assert sorted(rft["problem_id"]) == ["p0", "p1"]
    assert rft[rft["problem_id"].index("p0")]["completion"].startswith(_answer(3, 1, 4))


def test_end_of_turn_comes_from_the_template(tiny_model_dir):
    """A template whose turns end with a token other than eos: that token ends completions."""
    from transformers import AutoTokenizer

    from backtrack.build import end_of_turn_text

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = tok.chat_template.replace("<|im_end|>", "<|endoftext|>")
    assert tok.eos_token == "<|im_end|>" and end_of_turn_text(tok) == "<|endoftext|>"


def test_empty_arm_is_a_one_line_error(tmp_path, tiny_model_dir, tokenizer, cli_env):
    out = tmp_path / "run"
    write_records(out / "samples", [sample_record(tokenizer, "p0", 0, _answer(3, 1, 5), False)],
                  key_fields=("problem_id", "sample_idx", "round"))
    write_records(out / "backtrack", [])
    proc = subprocess.run(BACKTRACK_CMD + ["build", "--output-dir", str(out), "--model",
                                           str(tiny_model_dir)],
                          capture_output=True, text=True, env=cli_env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no correct samples" in proc.stderr
    assert str(out / "samples") in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["backtrack", "samples"]


def test_failed_rebuild_keeps_the_previous_datasets(tmp_path, tiny_model_dir, tokenizer):
    out = make_run(tmp_path / "run", tokenizer)
    build(out, tiny_model_dir)
    before = (out / "sft" / "rft" / META_FILE).read_text()
    with pytest.raises(UserError, match="record folder not found"):
        build(tmp_path / "elsewhere", tiny_model_dir)
    (out / "samples" / "store.json").unlink()  # a broken input folder
    with pytest.raises(UserError, match="not a record store"):
        build(out, tiny_model_dir)
    assert (out / "sft" / "rft" / META_FILE).read_text() == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_missing_model_is_a_user_error(tmp_path, tokenizer):
    out = make_run(tmp_path / "run", tokenizer)
    with pytest.raises(UserError, match="no-such-model"):
        build(out, tmp_path / "no-such-model")
    assert not (out / "sft").exists()


def test_a_trace_right_on_round_two_is_taken_whole(tokenizer):
    """Round 2's prefix holds the wrong first attempt and the wrong round-1 continuation."""
    from backtrack.methods.rft import trace_text

    record = backtrack_record(tokenizer, "p0", 3, _answer(3, 1, 5),
                              " 3 + 1 = 6</think>\nThe answer is 6.", False)
    first = record["chain"][1]
    round1_text = first["prefix"] + first["phrase"] + first["completion"]
    prefix = round1_text[: round1_text.rindex("</think>")]
    record["chain"].append({"round": 2, "prefix": prefix, "phrase": "\n" + PHRASE,
                            "completion": " 3 + 1 = 4</think>\nThe answer is 4.",
                            "correct": True})
    text, wrong_end = trace_text(record, "backtrack")
    assert text == ("<think>3 + 1 = 5\n" + PHRASE + " 3 + 1 = 6\n" + PHRASE
                    + " 3 + 1 = 4</think>\nThe answer is 4.")
    assert text[:wrong_end] == "<think>3 + 1 = 5\n" + PHRASE + " 3 + 1 = 6"
    record["chain"][2]["correct"] = False
    assert trace_text(record, "backtrack") is None
