"""The s2r_sft arm through the build stage, and the self_verify protocol in the eval stage."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from backtrack.errors import UserError
from backtrack.store import SAMPLE_KEY, RecordStore
from backtrack.tasks import get_task
from conftest import BACKTRACK_CMD

TASK_ARGS = {"train_size": 6, "test_size": 4}


def _attempt(problem, slip: bool) -> str:
    """The toy model's format; with `slip`, the last step's result is off by one."""
    lines = problem.solution.splitlines()
    answer = int(problem.answer) + (1 if slip else 0)
    if slip:
        head, _ = lines[-1].rsplit("=", 1)
        lines[-1] = f"{head}= {answer}"
    return "<think>\n" + "\n".join(lines) + f"\n</think>\nThe answer is {answer}."


def _write_samples(folder, tokenizer):
    from backtrack.chat import render_prompt

    task = get_task("arith", TASK_ARGS)
    rows = []
    for problem in task.problems("train"):
        prompt = render_prompt(tokenizer, task.messages(problem))
        for idx, slip in enumerate([True, False, True, False]):
            text = _attempt(problem, slip)
            rows.append({"problem_id": problem.id, "sample_idx": idx, "round": 0,
                         "prompt": prompt, "completion": text, "extracted": None,
                         "correct": task.check(text, problem.answer).correct,
                         "new_tokens": 30, "finish_reason": "stop", "answer": problem.answer})
    with RecordStore(folder, {"test": "samples"}, key_fields=SAMPLE_KEY) as store:
        store.append(rows)
    return rows


def _verify(out, **cues):
    """The verify stage on the written samples: arith's hook writes the verifications."""
    from backtrack.verifying import VerifyConfig, main

    main(VerifyConfig(task="arith", task_args=TASK_ARGS, output_dir=str(out), progress=False,
                      **cues))


def test_build_writes_s2r_trajectories(tmp_path, tiny_model_dir):
    from datasets import load_from_disk

    from backtrack.build import BuildConfig, main
    from backtrack.models import load_tokenizer

    rows = _write_samples(tmp_path / "samples", load_tokenizer(str(tiny_model_dir)))
    assert {r["correct"] for r in rows} == {True, False}
    _verify(tmp_path)
    main(BuildConfig(arms=["s2r_sft"], task="arith", task_args=TASK_ARGS,
                     model=str(tiny_model_dir), output_dir=str(tmp_path),
                     s2r={"right_first_share": 0.5}))
    data = load_from_disk(str(tmp_path / "sft" / "s2r_sft"))
    assert len(data) >= 6 and set(data["source"]) == {"s2r"}
    wrong_first = [c for c in data["completion"] if "So the answer is wrong." in c]
    assert wrong_first and all("Let me try again." in c for c in wrong_first)
    assert all(c.rstrip("<|im_end|>").endswith("So the answer is correct.")
               for c in data["completion"])
    stats = json.loads((tmp_path / "sft" / "stats.json").read_text())
    assert stats["inputs"]["per_arm"]["s2r_sft"]["trajectories"] == len(data)


def test_s2r_data_needs_the_verify_records(tmp_path, tiny_model_dir, gsm8k_dir, cli_env):
    """The s2r_sft data reads its verifications from the verify stage: without its records
    the build is a one-line error (exit 2) and writes nothing."""
    from backtrack.models import load_tokenizer

    _write_samples(tmp_path / "samples", load_tokenizer(str(tiny_model_dir)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"task": "gsm8k", "task_args": {"path": str(gsm8k_dir)},
                                      "model": str(tiny_model_dir)}))
    out = subprocess.run([*BACKTRACK_CMD, "build", "-c", str(recipe), "--arms", "[s2r_sft]",
                          "--output-dir", str(tmp_path)], capture_output=True, text=True,
                         env=cli_env, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'verify'}: not a record store (no store.json); run its stage first"]
    assert not (tmp_path / "sft").exists()
    with pytest.raises(UserError, match="right_first_share"):
        from backtrack.build import BuildConfig
        from backtrack.methods.s2r import data_config

        data_config(BuildConfig(s2r={"right_first_share": 1.5}))


@pytest.mark.parametrize("s2r,message", [
    ({"verify_cue": ""}, "option 'verify_cue': must not be empty"),
    ({"retry_cue": "   "}, "option 'retry_cue': must not be empty"),
    ({"right_first_share": 1.5}, "option 'right_first_share': must be in [0, 1], got 1.5"),
    ({"right_first_share": -0.2}, "option 'right_first_share': must be in [0, 1], got -0.2"),
    ({"max_trajectories": -3}, "option 'max_trajectories': must be 0 (all) or more"),
    ({"verify_kue": "Hmm."}, "unknown key 'verify_kue' in section 's2r'"),
])
def test_bad_s2r_options_write_nothing(tmp_path, tiny_model_dir, s2r, message):
    """The build stage with a bad `s2r` option: a one-line UserError, and no sft/ (not even a
    temp folder) left behind, though another arm's data was fine."""
    from backtrack.build import BuildConfig, main
    from backtrack.models import load_tokenizer

    _write_samples(tmp_path / "samples", load_tokenizer(str(tiny_model_dir)))
    with pytest.raises(UserError) as caught:
        main(BuildConfig(arms=["rft", "s2r_sft"], task="arith", task_args=TASK_ARGS,
                         model=str(tiny_model_dir), output_dir=str(tmp_path), s2r=s2r))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"]


def test_bad_s2r_option_on_the_command_line_exits_2(tmp_path, tiny_model_dir, cli_env):
    from backtrack.models import load_tokenizer

    _write_samples(tmp_path / "samples", load_tokenizer(str(tiny_model_dir)))
    out = subprocess.run([*BACKTRACK_CMD, "build", "--task", "arith", "--task-args",
                          json.dumps(TASK_ARGS), "--model", str(tiny_model_dir), "--arms",
                          "[rft, s2r_sft]", "--s2r", "{verify_cue: '', right_first_share: 2}",
                          "--output-dir", str(tmp_path)],
                         capture_output=True, text=True, env=cli_env, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == ["error: option 'verify_cue': must not be empty"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"]


def test_self_verify_grades_the_last_attempt_and_adds_verdict_metrics(tmp_path, tiny_model_dir):
    from backtrack import evaluate

    config = evaluate.EvalConfig(arms=["base@self_verify"], task="arith", task_args=TASK_ARGS,
                                 model=str(tiny_model_dir), output_dir=str(tmp_path), n=2,
                                 limit=2, max_new_tokens=12, n_boot=50, progress=False,
                                 engine_args={"num_threads": 1})
    summary = evaluate.main(config)["base@self_verify"]
    assert summary["protocol"] == "self_verify"
    assert {"verdict_accuracy", "attempts_per_answer", "pass@2"} <= set(summary["metrics"])
    task = get_task("arith", TASK_ARGS)
    problem = task.problems("test")[0]
    from backtrack.engines import Completion
    from backtrack.protocols import get_protocol

    trace = (_attempt(problem, True) + "\nWait, let me recheck my solution.\nSo the answer is "
             "wrong.\nLet me try again.\n" + _attempt(problem, False)
             + "\nWait, let me recheck my solution.\nSo the answer is correct.")
    record = get_protocol("self_verify").make_record(task, problem, "P", 0,
                                                     Completion(trace, 50, "stop"))
    assert record["correct"] is True and record["extracted"] == problem.answer
