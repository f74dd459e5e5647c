"""retry_sft and gold_sft (retry data in fine-tuning): which problems they hold, what the
transcripts say and which of their tokens carry loss, through the build stage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_build import build, tokenizer, write_records  # noqa: F401 (fixture)

from backtrack.errors import UserError
from backtrack.tasks import get_task
from backtrack.toy_base import RETRY_PHRASES

TASK = get_task("arith", {})
PROBLEMS = TASK.problems("train", 6)[2:5]  # the sampled problems: not the split's first ones


def sampled_run(out: Path) -> Path:
    """Sample records (content irrelevant here) for three train problems, two samples each."""
    records = [{"problem_id": p.id, "sample_idx": i, "round": 0, "prompt": "<P>",
                "completion": "x", "extracted": None, "correct": False, "new_tokens": 1,
                "finish_reason": "stop", "answer": p.answer}
               for p in PROBLEMS for i in range(2)]
    write_records(out / "samples", records, key_fields=("problem_id", "sample_idx", "round"))
    return out


def rows(out: Path, arm: str) -> list[dict]:
    from datasets import load_from_disk

    return list(load_from_disk(str(out / "sft" / arm)))


def test_gold_sft_is_the_reference_solutions_of_the_sampled_problems(tmp_path, tiny_model_dir,
                                                                      tokenizer):
    out = sampled_run(tmp_path / "run")
    build(out, tiny_model_dir, arms=["gold_sft"], retry_data={"per_problem": 1})
    gold = rows(out, "gold_sft")
    assert [r["problem_id"] for r in gold] == [p.id for p in PROBLEMS]
    for row, problem in zip(gold, PROBLEMS):
        assert row["completion"] == (f"<think>\n{problem.solution}\n</think>\nThe answer is "
                                     f"{problem.answer}.<|im_end|>")
        assert row["source"] == "gold"
        assert all(row["completion_mask"][row["prompt_length"]:])  # every completion token
        assert TASK.check(row["completion"], problem.answer).correct


def test_retry_sft_writes_the_corpus_corrections_with_its_masks(tmp_path, tiny_model_dir,
                                                                 tokenizer):
    out = sampled_run(tmp_path / "run")
    build(out, tiny_model_dir, arms=["retry_sft"], retry_data={"correction_rate": 1.0})
    retry = rows(out, "retry_sft")
    assert len(retry) == 2 * len(PROBLEMS)  # per_problem defaults to 2
    for row in retry:
        problem = next(p for p in PROBLEMS if p.id == row["problem_id"])
        phrases = [p for p in RETRY_PHRASES if p in row["completion"]]
        assert row["source"] == "retry" and len(phrases) >= 1
        assert TASK.check(row["completion"], problem.answer).correct  # the redo ends right
        body = row["completion"][len("<think>\n"):]
        wrong, _, redo = body.partition(phrases[0])
        assert problem.solution.splitlines()[-1] in redo  # the redo reaches the last step
        ids, mask = row["input_ids"][row["prompt_length"]:], \
            row["completion_mask"][row["prompt_length"]:]
        # as in pretraining: the wrong steps and the phrase carry no loss, the rest does
        off = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
        on = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        assert phrases[0] in off and phrases[0] not in on and on.endswith("<|im_end|>")
        assert "The answer is" in on


def test_retry_sft_at_a_share_and_reproducible(tmp_path, tiny_model_dir, tokenizer):
    out = sampled_run(tmp_path / "run")
    options = {"correction_rate": 0.5, "per_problem": 8}
    build(out, tiny_model_dir, arms=["retry_sft"], retry_data=options)
    first = rows(out, "retry_sft")
    sources = [r["source"] for r in first]
    assert 0 < sources.count("retry") < len(sources) == 8 * len(PROBLEMS)
    build(out, tiny_model_dir, arms=["retry_sft"], retry_data=options)
    assert [r["completion"] for r in rows(out, "retry_sft")] == [r["completion"] for r in first]
    build(out, tiny_model_dir, arms=["retry_sft"], retry_data={**options, "loss_on_errors": True,
                                                               "loss_on_phrases": True})
    assert all(all(r["completion_mask"][r["prompt_length"]:]) for r in rows(out, "retry_sft"))


@pytest.mark.parametrize("options, message", [
    ({"correction_rat": 0.5}, "build.retry_data: unknown key(s) ['correction_rat']"),
    ({"per_problem": 0}, "build.retry_data.per_problem: must be 1 or more"),
    ({"correction_rate": 2.0}, "correction_rate: must be between 0 and 1"),
])
def test_bad_retry_data_options(tmp_path, tiny_model_dir, options, message):
    out = sampled_run(tmp_path / "run")
    with pytest.raises(UserError, match=re.escape(message)):
        build(out, tiny_model_dir, arms=["retry_sft"], retry_data=options)
    assert not (out / "sft").exists()  # nothing half-written


def test_the_plan_builds_retry_data_from_the_samples_alone():
    """retry_sft and gold_sft read the sample stage only: no backtrack step, and the build's
    retry_data options reach the step (and its hash) only when one of them is built."""
    from test_pipeline import TINY

    from backtrack import pipeline

    recipe = {**TINY, "arms": ["base", "retry_sft", "gold_sft"],
              "build": {"retry_data": {"correction_rate": 0.5}}}
    steps = {s.name: s for s in pipeline.plan(*pipeline.resolve_recipe(recipe, "tiny", {}))}
    assert "backtrack" not in steps and steps["build"].deps == ["sample"]
    assert steps["build"].config.retry_data == {"correction_rate": 0.5}
    assert {"train_retry_sft", "train_gold_sft", "eval_retry_sft"} <= set(steps)
    plain = {**TINY, "arms": ["base", "rft"]}
    digest = pipeline.step_digests(pipeline.plan(*pipeline.resolve_recipe(plain, "t", {})))
    plain["build"] = {**TINY.get("build", {}), "retry_data": {"correction_rate": 0.5}}
    assert pipeline.step_digests(pipeline.plan(*pipeline.resolve_recipe(plain, "t", {}))) == digest
