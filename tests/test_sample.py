"""`backtrack sample`: records, resume after SIGKILL, sharding, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import BACKTRACK_CMD

from backtrack.sample import SampleConfig
from backtrack.store import RecordStore
from backtrack.tasks import get_task

FIELDS = {"problem_id", "sample_idx", "round", "prompt", "completion", "extracted", "correct",
          "new_tokens", "finish_reason", "answer"}


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    yield {"num_threads": 1}
    torch.set_num_threads(threads)


def config(model_dir, out, **kw) -> SampleConfig:
    values = {"model": str(model_dir), "output_dir": str(out), "task": "arith", "limit": 5,
              "k": 3, "max_new_tokens": 12, "batch_size": 2, "progress": False, **kw}
    return SampleConfig(**values)


def test_sample_writes_checked_records(tiny_model_dir, tmp_path, one_thread):
    from backtrack import sample

    summary = sample.main(config(tiny_model_dir, tmp_path, engine_args=one_thread))
    records = RecordStore.read(tmp_path / "samples").records()
    task = get_task("arith", {})
    problems = {p.id: p for p in task.problems("train", 5)}
    assert {(r["problem_id"], r["sample_idx"], r["round"]) for r in records} == \
        {(pid, i, 0) for pid in problems for i in range(3)}
    for r in records:
        assert set(r) == FIELDS
        assert r["answer"] == problems[r["problem_id"]].answer
        assert r["prompt"].endswith("<|im_start|>assistant\n")
        assert problems[r["problem_id"]].question in r["prompt"]
        check = task.check(r["completion"], r["answer"])
        assert (r["extracted"], r["correct"]) == (check.extracted, check.correct)
        assert 1 <= r["new_tokens"] <= 12
        assert (r["finish_reason"] == "length") == (r["new_tokens"] == 12 and
                                                    r["finish_reason"] != "stop")
    saved = json.loads((tmp_path / "samples" / "summary.json").read_text())
    assert saved["problems"] == 5 and saved["samples"] == 15 == summary["samples"]
    assert saved["this_run"]["engine"] == {"device": "cpu", "dtype": "float32",
                                           "cpu_kernel": False, "kv_cache_dtype": "float32"}
    assert saved["accuracy"] == round(sum(r["correct"] for r in records) / 15, 4)
    assert json.loads((tmp_path / "samples" / "run.json").read_text())["stage"] == "sample"
    # A re-run finds everything done and appends nothing; a larger k adds only new indices.
    shard = tmp_path / "samples" / "records-0-of-1.jsonl"
    before = shard.read_bytes()
    assert sample.main(config(tiny_model_dir, tmp_path, engine_args=one_thread))["samples"] == 15
    assert shard.read_bytes() == before
    sample.main(config(tiny_model_dir, tmp_path, k=4, engine_args=one_thread))
    assert shard.read_bytes().startswith(before)
    assert len(RecordStore.read(tmp_path / "samples").records()) == 20


def test_shards_merge_to_the_unsharded_keys(tiny_model_dir, tmp_path, one_thread):
    from backtrack import sample

    for i in range(2):
        sample.main(config(tiny_model_dir, tmp_path, k=2, shard=f"{i}/2", engine_args=one_thread))
    files = sorted(p.name for p in (tmp_path / "samples").glob("records-*.jsonl"))
    assert files == ["records-0-of-2.jsonl", "records-1-of-2.jsonl"]
    keys = [(r["problem_id"], r["sample_idx"]) for r in
            RecordStore.read(tmp_path / "samples").records()]
    ids = [p.id for p in get_task("arith", {}).problems("train", 5)]
    assert sorted(keys) == sorted((pid, i) for pid in ids for i in range(2))


def run_cli(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(BACKTRACK_CMD + args, env=env, capture_output=True, text=True,
                          timeout=180, **kw)


def cli_args(model_dir: Path, out: Path) -> list[str]:
    return ["sample", "--model", str(model_dir), "--output-dir", str(out), "--limit", "30",
            "--k", "2", "--max-new-tokens", "20", "--batch-size", "2", "--progress", "false"]


@pytest.fixture
def env(cli_env):
    return {**cli_env, "OMP_NUM_THREADS": "1"}


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, env):
    full, killed = tmp_path / "full", tmp_path / "killed"
    uninterrupted = subprocess.Popen(BACKTRACK_CMD + cli_args(tiny_model_dir, full), env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(BACKTRACK_CMD + cli_args(tiny_model_dir, killed), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = killed / "samples" / "records-0-of-1.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shard.exists() and shard.read_bytes().count(b"\n") >= 8:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert uninterrupted.wait(timeout=180) == 0, uninterrupted.stderr.read()
    written = shard.read_bytes().count(b"\n")
    assert 8 <= written < 60
    resumed = run_cli(cli_args(tiny_model_dir, killed), env)
    assert resumed.returncode == 0, resumed.stderr

    def lines(out):
        text = (out / "samples" / "records-0-of-1.jsonl").read_text()
        return [json.loads(x) for x in text.splitlines()]

    full_lines, resumed_lines = lines(full), lines(killed)
    key = lambda r: (r["problem_id"], r["sample_idx"], r["round"])  # noqa: E731
    assert len(resumed_lines) == len({key(r) for r in resumed_lines}) == 60  # each key once
    assert {key(r) for r in resumed_lines} == {key(r) for r in full_lines}
    # Chunks are fixed and seeded, so the resumed records are the very same samples.
    assert sorted(resumed_lines, key=key) == sorted(full_lines, key=key)
    # Bad input on the finished store: one-line errors, exit 2, records untouched.
    before = (killed / "samples" / "records-0-of-1.jsonl").read_bytes()
    for extra, message in ((["--temperature", "0.5"], "different config"),
                           (["--engine", "gpt"], "'gpt' is not one of"),
                           (["--shard", "2/2"], "expected i/N")):
        bad = run_cli(cli_args(tiny_model_dir, killed) + extra, env)
        assert bad.returncode == 2, bad.stderr
        assert message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert (killed / "samples" / "records-0-of-1.jsonl").read_bytes() == before
