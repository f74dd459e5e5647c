"""The `backtrack` command in a subprocess: help, tasks, check, and one-line user errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import BACKTRACK_CMD


def run(args: list[str], env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(BACKTRACK_CMD + args, capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_stages(cli_env):
    result = run(["--help"], cli_env)
    assert result.returncode == 0
    for command in ("toy-base", "sample", "backtrack", "train", "eval", "report", "run", "check",
                    "tasks"):
        assert command in result.stdout


def test_check_help_documents_fields(cli_env):
    result = run(["check", "--help"], cli_env)
    assert result.returncode == 0
    assert "--file" in result.stdout and "--out" in result.stdout and "--task" in result.stdout


def test_tasks(cli_env):
    result = run(["tasks"], cli_env)
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"arith", "gsm8k", "jsonl"} <= set(names)


def test_check_happy_path(tmp_path, cli_env):
    rows = [
        {"id": "a", "completion": "<think>9*2=18</think>\nThe answer is 18.",
         "answer": "She makes 9 * 2 = $<<9*2=18>>18.\n#### 18"},
        {"id": "b", "completion": "So she pays $1,080.", "answer": 1080},
        {"completion": "<think>The answer is 3", "answer": "3"},
        {"completion": "The answer is 12. Wait, that's not right... The answer is 14.",
         "answer": "#### 12", "extra": [1, 2]},
    ]
    source = write_rows(tmp_path / "in.jsonl", rows)
    out = tmp_path / "scored" / "out.jsonl"
    result = run(["check", "--task", "gsm8k", "--file", str(source), "--out", str(out)], cli_env)
    assert result.returncode == 0, result.stderr
    assert "0.5000" in result.stdout
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["extracted"] for r in scored] == ["18", "1,080", None, "14"]
    assert [r["correct"] for r in scored] == [True, True, False, False]
    assert scored[3]["extra"] == [1, 2] and scored[0]["id"] == "a"
    info = json.loads((out.parent / "out.jsonl.run.json").read_text())
    assert info["stage"] == "check" and info["accuracy"] == 0.5
    assert info["input_hashes"][str(source)]


BAD_INPUTS = {
    "malformed": ([{"completion": "x", "answer": "1"}, "{oops"], "line 2: malformed JSON"),
    "missing answer": ([{"completion": "x"}], "line 1: missing field 'answer'"),
    "missing completion": ([{"completion": "x", "answer": "1"}, {"answer": "1"}],
                           "line 2: missing field 'completion'"),
    "unparseable gold": ([{"completion": "x", "answer": "#### many"}],
                         "line 1: cannot read a gold answer"),
    "not an object": ([[1, 2]], "line 1: expected a JSON object"),
    "empty": ([], "no rows"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_check_bad_input_writes_nothing(tmp_path, cli_env, name):
    rows, message = BAD_INPUTS[name]
    source = write_rows(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out" / "scored.jsonl"
    result = run(["check", "--file", str(source), "--out", str(out)], cli_env)
    assert_user_error(result, str(source), message)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_check_missing_file_and_unknown_task(tmp_path, cli_env):
    good = write_rows(tmp_path / "in.jsonl", [{"completion": "1", "answer": "1"}])
    out = tmp_path / "o.jsonl"
    missing = run(["check", "--file", str(tmp_path / "nope.jsonl"), "--out", str(out)], cli_env)
    assert_user_error(missing, "nope.jsonl", "not found")
    unknown = run(["check", "--task", "nope", "--file", str(good), "--out", str(out)], cli_env)
    assert_user_error(unknown, "unknown task 'nope'")
    no_out = run(["check", "--file", str(good)], cli_env)
    assert_user_error(no_out, "--out")
    assert not out.exists()


def test_recipe_unknown_key_and_bad_value(tmp_path, cli_env):
    good = write_rows(tmp_path / "in.jsonl", [{"completion": "1", "answer": "1"}])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("task: gsm8k\nmodle: toy\n")
    result = run(["check", "--config", str(recipe), "--file", str(good), "--out",
                  str(tmp_path / "o.jsonl")], cli_env)
    assert_user_error(result, str(recipe), "unknown key 'modle'")
    recipe.write_text("task: gsm8k\nseed: many\n")
    result = run(["check", "--config", str(recipe), "--file", str(good), "--out",
                  str(tmp_path / "o.jsonl")], cli_env)
    assert_user_error(result, "seed", "expected a number")
    result = run(["check", "--seed", "1.5", "--file", str(good), "--out",
                  str(tmp_path / "o.jsonl")], cli_env)
    assert_user_error(result, "--seed", "expected an integer")
    assert not (tmp_path / "o.jsonl").exists()


def test_check_with_recipe_task_args(tmp_path, cli_env, gsm8k_dir):
    """A recipe's shared keys (task, task_args) apply to `check` too."""
    good = write_rows(tmp_path / "in.jsonl", [{"completion": "The answer is 7", "answer": "7"}])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"task: gsm8k\ntask_args: {{path: {gsm8k_dir}}}\n")
    out = tmp_path / "o.jsonl"
    result = run(["check", "-c", str(recipe), "--file", str(good), "--out", str(out)], cli_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["correct"] is True


def test_unknown_option_is_one_line_exit_2(tmp_path, cli_env):
    result = run(["rl", "--output-dir", str(tmp_path / "run"), "--kl-coef", "0.1"], cli_env)
    assert_user_error(result, "No such option: --kl-coef")
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
