"""Backtrack stage options: confirm traces and the phrase-strength measurement."""

from __future__ import annotations

import json

import pytest

from backtrack.backtracking import PRESETS, BacktrackConfig, confirm_samples
from backtrack.phrase_yield import phrase_yield_summary
from backtrack.store import RecordStore

MILD, STRONG = PRESETS["mild"], PRESETS["strong"]


def _yield_record(phrase: str, pid: str, idx: int, cont: int, right: bool) -> dict:
    return {"phrase": phrase, "problem_id": pid, "sample_idx": idx, "continuation_idx": cont,
            "chain": [{"round": 0, "correct": False}, {"round": 1, "correct": right}]}


def test_phrase_yield_summary_is_paired_over_the_same_samples():
    # 4 samples x 2 continuations; strong is right on 6/8, mild on 2/8; sample s4 has only a
    # mild record and is left out of both.
    rows = []
    for i, (mild, strong) in enumerate([(1, 2), (1, 2), (0, 1), (0, 1)]):
        for c in range(2):
            rows.append(_yield_record(MILD, f"s{i}", 0, c, c < mild))
            rows.append(_yield_record(STRONG, f"s{i}", 0, c, c < strong))
    rows.append(_yield_record(MILD, "s4", 0, 0, True))
    summary = phrase_yield_summary(rows, [MILD, STRONG], n_boot=400)
    assert summary["samples"] == 4 and summary["baseline"] == MILD
    mild, strong = summary["phrases"]
    assert (mild["right"], mild["continuations"], mild["wrong_to_right"]) == (2, 8, 0.25)
    assert (strong["right"], strong["continuations"], strong["wrong_to_right"]) == (6, 8, 0.75)
    assert mild["low"] <= 0.25 <= mild["high"] and "vs_first" not in mild
    diff = strong["vs_first"]
    assert diff["diff"] == pytest.approx(0.5) and diff["problems"] == 4
    assert diff["low"] == pytest.approx(0.5) and diff["significant"]  # +0.5 on every sample


def test_confirm_samples_are_a_stable_prefix():
    records = [{"problem_id": f"p{i}", "sample_idx": j, "round": 0, "correct": (i + j) % 3 > 0}
               for i in range(20) for j in range(2)]
    three, five = confirm_samples(records, 3), confirm_samples(records, 5)
    assert len(five) == 5 and five[:3] == three and all(r["correct"] for r in five)
    assert confirm_samples(list(reversed(records)), 5) == five
    assert len(confirm_samples(records, 1000)) == sum(r["correct"] for r in records)


def _samples(tokenizer, out) -> list[dict]:
    from backtrack.chat import render_prompt

    records = []
    for i in range(4):
        prompt = render_prompt(tokenizer, [{"role": "user", "content": f"Tom has {i} apples."}])
        for j, right in enumerate((True, False)):
            value = i + 1 if right else i + 2
            records.append({"problem_id": f"p{i}", "sample_idx": j, "round": 0,
                            "prompt": prompt, "answer": str(i + 1), "extracted": str(value),
                            "completion": f"<think>\n{i} + 1 = {value}\n</think>\n"
                                          f"The answer is {value}.",
                            "correct": right, "new_tokens": 9, "finish_reason": "stop"})
    with RecordStore(out / "samples", {"test": "samples"}) as store:
        store.append(records)
    return records


def test_stage_confirm_and_compare_phrases(tiny_model_dir, tmp_path):
    """confirm=0 then confirm=3 on one store: the wrong traces and the store's fingerprint stay
    as they were, 3 confirm traces join them; compare_phrases continues every wrong sample with
    each phrase in its own store and reports each phrase's yield."""
    import torch

    from backtrack import backtracking
    from backtrack.models import load_tokenizer

    samples = _samples(load_tokenizer(str(tiny_model_dir)), tmp_path)
    common = {"model": str(tiny_model_dir), "output_dir": str(tmp_path), "task": "arith",
              "max_new_tokens": 6, "progress": False, "engine_args": {"num_threads": 1},
              "continuations": 2, "batch_size": 3}
    threads = torch.get_num_threads()
    try:
        backtracking.main(BacktrackConfig(**common))
        store_meta = (tmp_path / "backtrack" / "store.json").read_text()
        before = RecordStore.read(tmp_path / "backtrack").records()
        summary = backtracking.main(BacktrackConfig(confirm=3, compare_phrases=["mild", "strong"],
                                                    **common))
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "backtrack" / "store.json").read_text() == store_meta
    after = RecordStore.read(tmp_path / "backtrack").records()
    wrong = [r for r in after if "kind" not in r]
    confirm = [r for r in after if r.get("kind") == "confirm"]
    assert wrong == before and len(wrong) == 4 * 2
    chosen = {(r["problem_id"], r["sample_idx"]) for r in confirm_samples(samples, 3)}
    assert {(r["problem_id"], r["sample_idx"]) for r in confirm} == chosen
    assert len(confirm) == 3 * 2 and all(r["round"] == 1 and r["chain"][0]["correct"]
                                         for r in confirm)
    assert summary["continuations"] == 8 and summary["confirm"]["continuations"] == 6
    measured = RecordStore.read(tmp_path / "backtrack" / "phrase_yield").records()
    assert sorted({r["phrase"] for r in measured}) == sorted([MILD, STRONG])
    assert len(measured) == 2 * 4 * 2 and all(len(r["chain"]) == 2 for r in measured)
    saved = json.loads((tmp_path / "backtrack" / "summary.json").read_text())
    assert saved["phrase_yield"]["samples"] == 4
    assert [p["phrase"] for p in saved["phrase_yield"]["phrases"]] == [MILD, STRONG]
    assert [p["continuations"] for p in saved["phrase_yield"]["phrases"]] == [8, 8]
