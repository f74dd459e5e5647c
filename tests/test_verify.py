"""The verify stage: S²R's verifications of sample attempts, by the task's hook or the model."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from backtrack import verifying
from backtrack.errors import UserError
from backtrack.methods.s2r_data import Cues, S2RDataConfig, parse_verdict, render_trajectory
from backtrack.store import RecordStore
from backtrack.tasks import get_task
from conftest import BACKTRACK_CMD
from test_s2r_arm import TASK_ARGS, _write_samples

GOLDEN = json.loads((Path(__file__).parent / "golden" / "verify.json").read_text())
FAST = {"max_new_tokens": 12, "progress": False, "engine_args": {"num_threads": 1}}


def _config(tmp_path, model, **options):
    return verifying.VerifyConfig(task="arith", task_args=TASK_ARGS, model=str(model),
                                  output_dir=str(tmp_path), **{**FAST, **options})


# ------------------------------------------------------------------ pure parts


def test_model_prompt_golden_and_the_trajectory_format():
    case = GOLDEN["prompt"]
    prompt = verifying.verify_prompt(case["prompt"], case["attempt"], case["verify_cue"])
    assert prompt == case["expected"]
    # the same text an S²R trajectory holds before its verification
    completion, segments = render_trajectory([(case["attempt"], "So the answer is correct.",
                                               True)], S2RDataConfig())
    assert case["prompt"] + completion[:segments[2].start] == prompt


@pytest.mark.parametrize("case", GOLDEN["cuts"], ids=lambda c: c["name"])
def test_a_try_is_cut_at_its_first_verdict(case):
    phrases = case.get("phrases") or {"verdict_correct": "So the answer is correct.",
                                      "verdict_wrong": "So the answer is wrong."}
    verdict, cut = verifying.cut_at_verdict(case["text"], phrases["verdict_correct"],
                                            phrases["verdict_wrong"])
    assert (verdict, cut) == (case["verdict"], case["cut"])
    assert parse_verdict(cut, **phrases) == verdict  # the cut text's last verdict is its first


def test_the_filter_keeps_the_first_agreeing_try_without_a_cue():
    cues = Cues()
    tries = [(None, "3 + 4 = 7."), ("correct", "Looks fine. So the answer is correct."),
             ("wrong", "Let me try again. So the answer is wrong."),
             ("wrong", "3 + 4 = 8. So the answer is wrong."),
             ("wrong", "No. So the answer is wrong.")]
    assert verifying.choose_try(tries, False, cues) == 3  # try 2 holds the retry cue
    assert verifying.choose_try(tries, True, cues) == 1
    assert verifying.choose_try(tries[:1] + tries[2:3], False, cues) is None
    sample = {"problem_id": "p", "sample_idx": 2, "completion": "A", "correct": True}
    dropped = verifying.verify_record(sample, "model", [tries[0], tries[3]], cues, 40)
    assert dropped == {"problem_id": "p", "sample_idx": 2, "attempt": "A", "correct": True,
                       "source": "model", "verification": None, "verdicts": [None, "wrong"],
                       "kept_try": None, "new_tokens": 40}


def test_attempts_are_distinct_per_problem_and_capped():
    rows = [{"problem_id": "b", "sample_idx": i, "round": 0, "completion": text}
            for i, text in enumerate(["x", "y ", "y", "", "z"])]
    rows += [{"problem_id": "a", "sample_idx": 0, "round": 0, "completion": "x"},
             {"problem_id": "a", "sample_idx": 1, "round": 1, "completion": "w"}]
    key = [(r["problem_id"], r["sample_idx"]) for r in verifying.distinct_attempts(rows)]
    assert key == [("a", 0), ("b", 0), ("b", 1), ("b", 4)]
    capped = verifying.distinct_attempts(rows, max_attempts=2)
    assert [(r["problem_id"], r["sample_idx"]) for r in capped] == [("a", 0), ("b", 0), ("b", 1)]


def test_summary_counts_agreement_precision_and_recall():
    records = [{"problem_id": "p", "correct": True, "source": "model", "verification": "v",
                "verdicts": ["correct", "wrong", None]},
               {"problem_id": "q", "correct": False, "source": "model", "verification": "v",
                "verdicts": ["wrong", "correct", None, "wrong"]},
               {"problem_id": "q", "correct": False, "source": "task", "verification": None,
                "verdicts": [None]}]
    summary = verifying.summarize_verify(records, Cues())
    assert summary["attempts"] == 3 and summary["verified"] == 2
    assert summary["sources"] == {"model": {"attempts": 2, "verified": 2},
                                  "task": {"attempts": 1, "verified": 0}}
    assert (summary["tries"], summary["verdicts"]) == (8, 5)
    assert summary["agreement"] == 0.6  # correct/right, wrong/wrong x2 of 5 verdicts
    assert summary["agreement_on_right"] == 0.5 and summary["agreement_on_wrong"] == 0.6667
    assert summary["wrong_precision"] == 0.6667  # 2 of 3 "wrong" verdicts on wrong attempts
    assert summary["wrong_recall"] == 0.4  # 2 of 5 tries on wrong attempts (None = missed)
    assert summary["cues"]["verify"] == Cues().verify


@pytest.mark.parametrize("options,message", [
    ({"tries": 0}, "options 'tries' and 'batch_size' must be >= 1"),
    ({"verify_cue": "  "}, "option 'verify_cue': must not be empty"),
    ({"verdict_wrong": ""}, "option 'verdict_wrong': must not be empty"),
    ({"max_attempts": -1}, "option 'max_attempts': must be 0 (all) or more"),
    ({"source": "human"}, "'human' is not one of ['auto', 'task', 'model']"),
])
def test_bad_options_are_one_line_errors(options, message):
    from backtrack.config import resolve

    with pytest.raises(UserError) as caught:
        resolve(verifying.VerifyConfig, {"verify": options}, "verify")
    assert message in str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------------ the stage


def test_task_source_writes_the_hooks_verifications(tmp_path, tiny_model_dir):
    """arith through `source: auto` (its hook, no engine): every verification is the hook's,
    kept where its verdict agrees with the checker, and the S²R data built from the records
    equals the data built by calling the hook directly."""
    from backtrack.build import BuildConfig, BuildContext
    from backtrack.methods.s2r import build_s2r
    from backtrack.methods.s2r_data import build_s2r_examples, task_verifier
    from backtrack.models import load_tokenizer

    samples = _write_samples(tmp_path / "samples", load_tokenizer(str(tiny_model_dir)))
    summary = verifying.main(_config(tmp_path, "no-model-needed"))
    task = get_task("arith", TASK_ARGS)
    problems = {p.id: p for p in task.problems("train")}
    records = RecordStore.read(tmp_path / "verify").records()
    assert len(records) == summary["attempts"] == 12  # 6 problems x 2 distinct attempts
    assert summary["sources"] == {"task": {"attempts": 12, "verified": 12}}
    assert summary["agreement"] == 1.0 and summary["this_run"]["new_tokens"] == 0
    for record in records:
        hook = task.verification(problems[record["problem_id"]], record["attempt"])
        assert record["verification"] == hook and record["verdicts"] == [parse_verdict(hook)]
    config = BuildConfig(arms=["s2r_sft"], task="arith", task_args=TASK_ARGS,
                         model=str(tiny_model_dir), output_dir=str(tmp_path))
    from_records, stats = build_s2r(BuildContext(config, None))
    direct, _ = build_s2r_examples(samples, [], task_verifier(task, list(problems.values()),
                                                              S2RDataConfig()), S2RDataConfig())
    assert from_records == direct and stats["trajectories"] == len(direct) > 0


def test_build_refuses_verifications_with_other_cues(tmp_path, tiny_model_dir):
    from backtrack.build import BuildConfig, main
    from backtrack.models import load_tokenizer

    _write_samples(tmp_path / "samples", load_tokenizer(str(tiny_model_dir)))
    verifying.main(_config(tmp_path, "x", verdict_wrong="That is not right."))
    with pytest.raises(UserError) as caught:
        main(BuildConfig(arms=["s2r_sft"], task="arith", task_args=TASK_ARGS,
                         model=str(tiny_model_dir), output_dir=str(tmp_path)))
    assert str(caught.value) == (
        f"{tmp_path / 'verify'}: verifications were written with verify.verdict_wrong 'That is "
        "not right.', but build.s2r.verdict_wrong is 'So the answer is wrong.'; run `backtrack "
        "verify` with the same cues")
    assert not (tmp_path / "sft").exists()


def test_model_source_end_to_end_then_resume_writes_no_duplicates(tmp_path, tiny_model_dir,
                                                                  cli_env):
    """`backtrack verify --source model` on the tiny model: one record per attempt with a
    verdict per try (the random model finds none, so nothing is kept); a run resumed from the
    first chunk of that store ends with the same records, each key once."""
    from backtrack.models import load_tokenizer

    _write_samples(tmp_path / "full" / "samples", load_tokenizer(str(tiny_model_dir)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"task": "arith", "task_args": TASK_ARGS,
                                      "model": str(tiny_model_dir),
                                      "verify": {"source": "model", "tries": 2, **FAST,
                                                 "batch_size": 5}}))
    out = subprocess.run([*BACKTRACK_CMD, "verify", "-c", str(recipe), "--output-dir",
                          str(tmp_path / "full")], capture_output=True, text=True, env=cli_env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    full = RecordStore.read(tmp_path / "full" / "verify").records()
    summary = json.loads((tmp_path / "full" / "verify" / "summary.json").read_text())
    assert len(full) == summary["attempts"] == 12 and summary["tries"] == 24
    assert all(r["source"] == "model" and len(r["verdicts"]) == 2 for r in full)
    assert summary["sources"]["model"]["attempts"] == 12
    assert summary["this_run"]["new_tokens"] > 0
    assert {"agreement", "agreement_on_right", "agreement_on_wrong", "wrong_precision",
            "wrong_recall", "verdict_rate", "verified", "cues"} <= set(summary)

    partial = tmp_path / "partial" / "verify"
    shutil.copytree(tmp_path / "full" / "samples", tmp_path / "partial" / "samples")
    partial.mkdir()
    shutil.copy(tmp_path / "full" / "verify" / "store.json", partial / "store.json")
    lines = (tmp_path / "full" / "verify" / "records-0-of-1.jsonl").read_text().splitlines()
    (partial / "records-0-of-1.jsonl").write_text("\n".join(lines[:5]) + "\n")
    config = verifying.VerifyConfig(task="arith", task_args=TASK_ARGS, model=str(tiny_model_dir),
                                    output_dir=str(tmp_path / "partial"), source="model",
                                    tries=2, batch_size=5, **FAST)
    resumed = verifying.main(config)
    assert resumed["this_run"]["generated"] == 7
    written = (partial / "records-0-of-1.jsonl").read_text().splitlines()
    assert len(written) == 12 and [json.loads(line) for line in written] == \
        [json.loads(line) for line in lines]


def test_source_task_without_a_hook_exits_2(tmp_path, gsm8k_dir, cli_env):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"task": "gsm8k", "task_args": {"path": str(gsm8k_dir)}}))
    out = subprocess.run([*BACKTRACK_CMD, "verify", "-c", str(recipe), "--source", "task",
                          "--output-dir", str(tmp_path / "o")], capture_output=True, text=True,
                         env=cli_env, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: option 'source': task 'gsm8k' has no verification hook; use source 'model' "
        "(or 'auto') to have the model write its own"]
    assert not (tmp_path / "o").exists()
    assert verifying.resolve_source(verifying.VerifyConfig(), get_task(
        "gsm8k", {"path": str(gsm8k_dir)})) == "model"
