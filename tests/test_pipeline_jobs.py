"""`jobs: N` (pipeline_jobs.py): ready steps side by side, dependencies kept, failures stop."""

from __future__ import annotations

import json
import os
import time

import pytest

from backtrack import pipeline
from backtrack.sample import SampleConfig


def stamp(config) -> None:
    """A stand-in stage main: records when it ran and on how many threads (id = its seed)."""
    import torch

    start = time.time()
    time.sleep(1.0)
    folder = os.path.join(config.output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{config.seed}.json"), "w") as handle:
        json.dump({"start": start, "end": time.time(), "threads": torch.get_num_threads(),
                   "pid": os.getpid()}, handle)


def fail(config) -> None:
    raise ValueError("this step fails")


def _steps(out, mains: dict, deps: dict) -> list:
    return [pipeline.Step(name, "sample", SampleConfig(output_dir=str(out), seed=i), main,
                          deps[name]) for i, (name, main) in enumerate(mains.items())]


def test_ready_steps_run_side_by_side_after_their_inputs(tmp_path):
    names = ["a", "b", "c", "d"]  # a -> (b, c) -> d
    deps = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}
    steps = _steps(tmp_path, {n: stamp for n in names}, deps)
    config = pipeline.RunConfig(output_dir=str(tmp_path), jobs=2)
    timings = pipeline.run_steps(config, steps)
    assert [timings[n]["status"] for n in names] == ["ran"] * 4
    seen = {n: json.loads((tmp_path / "samples" / f"{i}.json").read_text())
            for i, n in enumerate(names)}
    assert seen["b"]["start"] >= seen["a"]["end"] and seen["c"]["start"] >= seen["a"]["end"]
    assert seen["d"]["start"] >= max(seen["b"]["end"], seen["c"]["end"])
    assert seen["b"]["start"] < seen["c"]["end"] and seen["c"]["start"] < seen["b"]["end"]
    assert seen["b"]["pid"] != seen["c"]["pid"]
    cores = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    assert seen["a"]["threads"] == cores  # alone in flight: every thread
    assert seen["b"]["threads"] == seen["c"]["threads"] == max(1, cores // 2)
    for n in names:
        assert json.loads((tmp_path / "run" / "stages" / f"{n}.json").read_text())["seconds"] > 0.9
    again = pipeline.run_steps(config, steps)
    assert [again[n]["status"] for n in names] == ["skipped"] * 4


def test_a_failed_step_stops_the_run_without_a_marker(tmp_path):
    deps = {"a": [], "bad": [], "after": ["bad"]}
    steps = _steps(tmp_path, {"a": stamp, "bad": fail, "after": stamp}, deps)
    with pytest.raises(ValueError, match="this step fails"):
        pipeline.run_steps(pipeline.RunConfig(output_dir=str(tmp_path), jobs=2), steps)
    stages = tmp_path / "run" / "stages"
    assert (stages / "a.json").is_file()  # in flight beside the failure: finished, recorded
    assert not (stages / "bad.json").exists() and not (stages / "after.json").exists()
    assert not (tmp_path / "samples" / "2.json").exists()


def test_jobs_is_checked():
    from backtrack.errors import UserError

    with pytest.raises(UserError, match="jobs"):
        pipeline.RunConfig(jobs=0).validate()
    with pytest.raises(UserError, match="accelerate_config"):
        pipeline.RunConfig(jobs=2, accelerate_config="zero2.yaml").validate()


def linger(config) -> None:
    """A stand-in stage main that writes its pid, then runs for a minute."""
    with open(os.path.join(config.output_dir, f"pid-{config.seed}"), "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(60)


RUN_LINGERING = """
import sys
sys.path.insert(0, {tests!r})
from backtrack import pipeline
from backtrack.sample import SampleConfig
from test_pipeline_jobs import linger
steps = [pipeline.Step(n, "sample", SampleConfig(output_dir={out!r}, seed=i), linger, [])
         for i, n in enumerate(["a", "b"])]
pipeline.run_steps(pipeline.RunConfig(output_dir={out!r}, jobs=2), steps)
"""


def test_a_killed_run_leaves_no_worker_running(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    code = RUN_LINGERING.format(tests=str(Path(__file__).parent), out=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pid_files = [tmp_path / "pid-0", tmp_path / "pid-1"]
    deadline = time.time() + 60
    while not all(p.is_file() and p.read_text() for p in pid_files):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    workers = [int(p.read_text()) for p in pid_files]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{w}") and "zombie" not in _state(w) for w in workers):
        assert time.time() < deadline, "a worker outlived the killed run"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next(line for line in handle if line.startswith("State:")).lower()
    except (OSError, StopIteration):
        return "zombie"
