"""`backtrack rl`: outcome RL and SCoRe change the model, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BACKTRACK_CMD

from backtrack.rl.stage import RLConfig, main

REPO = Path(__file__).resolve().parents[1]
# Small answers, so that even the random tiny model is sometimes right (~7 % of rollouts).
TASK_ARGS = "{train_size: 40, test_size: 10, max_value: 9, max_start: 9, max_operand: 5}"
TASK = {"task": "arith", "task_args": {"train_size": 40, "test_size": 10, "max_value": 9,
                                       "max_start": 9, "max_operand": 5}}
FAST = {"group_size": 4, "problems_per_step": 8, "max_new_tokens": 24, "lr": 1e-3,
        "temperature": 1.0, "engine_args": {"num_threads": 1}}


def _weights(path) -> dict:
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


@pytest.mark.parametrize("method,arm", [("outcome", "outcome_rl"), ("score", "score")])
def test_rl_changes_the_model(tiny_model_dir, tmp_path, method, arm):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    final = main(RLConfig(output_dir=str(out), model=str(tiny_model_dir), arm=arm,
                          method=method, steps=4, stage1_steps=2, **TASK, **FAST))
    assert final == out / "models" / arm
    assert sorted(p.name for p in (out / "models").iterdir()) == [arm]  # no temp folder left
    log = json.loads((final / "rl_log.json").read_text())
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    expected = ["outcome"] * 4 if method == "outcome" else ["score_stage1"] * 2 + ["score_stage2"] * 2
    assert [e["stage"] for e in log] == expected
    assert all(e["rollouts"] == 32 for e in log)
    if method == "score":
        assert all(e["accuracy_attempt2"] is not None for e in log)
    assert any(e["grad_norm"] > 0 for e in log)  # some group had a reward spread
    base, tuned = _weights(tiny_model_dir), _weights(final)
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(changed) > len(base) // 2
    assert (final / "rl_log.png").stat().st_size > 1000
    info = json.loads((final / "run.json").read_text())
    assert info["stage"] == "rl" and info["global_step"] == 4 and info["share_other"] < 0.5


def _cli(out: Path, model: Path, *extra: str) -> list[str]:
    return [*BACKTRACK_CMD, "rl", "--output-dir", str(out), "--model", str(model),
            "--task", "arith", "--task-args", TASK_ARGS, "--group-size", "4",
            "--problems-per-step", "8", "--max-new-tokens", "24", "--lr", "1e-3",
            "--temperature", "1.0", "--engine-args", "{num_threads: 1}", *extra]


def test_sigkill_then_resume_ends_with_the_same_steps(tiny_model_dir, tmp_path, cli_env):
    out = tmp_path / "run"
    args = _cli(out, tiny_model_dir, "--steps", "4", "--save-steps", "2", "--method", "score",
                "--stage1-steps", "2")
    proc = subprocess.Popen(args, env=cli_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    folder = out / "checkpoints" / "outcome_rl"
    deadline = time.time() + 120
    while not list(folder.glob("step-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(int(p.name[5:]) for p in folder.glob("step-*"))
    assert saved and not (out / "models" / "outcome_rl").exists()
    done = subprocess.run(args + ["--resume", "true"], env=cli_env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = out / "models" / "outcome_rl"
    info = json.loads((final / "run.json").read_text())
    assert info["global_step"] == 4 and info["resumed_from"].endswith(f"step-{saved[-1]}")
    assert info["steps_this_run"] == 4 - saved[-1]
    log = json.loads((final / "rl_log.json").read_text())
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    assert [e["stage"] for e in log] == ["score_stage1"] * 2 + ["score_stage2"] * 2
    # model, optimizer and RNG state come back exactly: the same run without the kill
    torch.set_num_threads(1)
    again = main(RLConfig(output_dir=str(tmp_path / "again"), model=str(tiny_model_dir),
                          method="score", steps=4, stage1_steps=2, save_steps=2, **TASK, **FAST))
    straight = json.loads((again / "rl_log.json").read_text())
    assert [e["loss"] for e in straight] == [e["loss"] for e in log]
    assert any(e["grad_norm"] > 0 for e in log[saved[-1]:])
    resumed, uninterrupted = _weights(final), _weights(again)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


@pytest.mark.parametrize("extra,message", [
    (["--method", "ppo"], "'ppo' is not one of ['outcome', 'score_stage1', 'score', 'process']"),
    (["--kl", "-0.1"], "option 'kl': must be >= 0"),
    (["--kl-stage1-attempt1", "-1"], "option 'kl_stage1_attempt1': must be >= 0"),
    (["--baseline", "loo", "--group-size", "1"], "leave-one-out baseline needs at least 2"),
    (["--parent", "rft_bt"], "no trained model for arm 'rft_bt'"),
    (["--report-to", "mlflow"], "'mlflow' is not one of"),
    (["--method", "process"], "option 'scale_std': method process does not scale"),
    (["--reward-on", "final_attempt", "--trace-format", "nope"],
     "option 'trace_format': unknown format 'nope' (known: s2r)"),
])
def test_bad_input_is_one_line_exit_2(tiny_model_dir, tmp_path, cli_env, extra, message):
    out = tmp_path / "run"
    done = subprocess.run(_cli(out, tiny_model_dir, *extra), env=cli_env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (out / "models").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("arms,section,stages,message", [
    ("[outcome_rl]", "{method: ppo}", "[rl]", "key 'rl.method': 'ppo' is not one of"),
    ("[score]", "{kl_stage1_attempt1: -0.5}", "[rl]", "'kl_stage1_attempt1': must be >= 0"),
    ("[outcome_rl]", "{baseline: loo, group_size: 1}", "[rl]", "leave-one-out baseline"),
    ("[outcome_rl_from_rft_bt]", "{steps: 1}", "[rl, eval, report]",
     "no trained model for arm 'rft_bt'"),
])
def test_run_refuses_bad_rl_recipes(tiny_model_dir, tmp_path, cli_env, arms, section, stages,
                                    message):
    """`backtrack run`: the recipe's rl section is checked even where an arm fixes a key
    (the method), and a parent arm's missing model stops the run before it writes."""
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"task: arith\ntask_args: {TASK_ARGS}\nmodel: {tiny_model_dir}\n"
                      f"output_dir: {out}\narms: {arms}\nrl: {section}\n")
    done = subprocess.run([*BACKTRACK_CMD, "run", "--config", str(recipe), "--stages", stages],
                          env=cli_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_two_cpu_processes_through_accelerate(tiny_model_dir, tmp_path, cli_env):
    out = tmp_path / "run"
    args = _cli(out, tiny_model_dir, "--steps", "3", "--method", "score", "--stage1-steps", "1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"), *args[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = out / "models" / "outcome_rl"
    info = json.loads((final / "run.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == 3
    log = json.loads((final / "rl_log.json").read_text())
    assert [e["rollouts"] for e in log] == [32, 32, 32]  # 4 problems x G = 4 on each process
    base, tuned = _weights(tiny_model_dir), _weights(final)
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
