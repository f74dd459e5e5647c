"""`jobs: N` in a run: steps whose inputs are ready run side by side, in N worker processes.

The toy world's engines decode on one CPU thread each (two threads on shared cores were slower,
benchmarks/sampling.py), so a run that goes step by step leaves the second core idle through
sampling, the small trainings and every evaluation. The arms' trainings and evaluations read
only upstream steps, so they can run at once. Written by hand: the steps are a small DAG of
in-process stage mains, and nothing in our dependencies schedules several such jobs
(accelerate and torch.distributed parallelise one job across processes, not several jobs).

Each step still runs exactly as in a sequential run (`pipeline._run_step`: stale outputs set
aside, training resumed, study shares published); the parent writes its marker when it ends,
so a killed run resumes the same way. A step alone in flight gets every thread; steps side by
side split them.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
from typing import Callable


def _threads(running: int) -> int:
    """Threads per step with `running` steps in flight: $OMP_NUM_THREADS (else every core)
    split between them."""
    total = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    return max(1, total // max(1, running))


def _work(run_step: Callable, args: tuple, threads: int):
    """In a worker: run one step on `threads` CPU threads."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # toy-base and engines read it at start
    import torch

    torch.set_num_threads(threads)
    return run_step(*args)


def _die_with_parent() -> None:
    """Worker initializer: on Linux, the kernel kills the worker when the run's process dies
    (a SIGKILLed run must not leave a step writing beside its re-run)."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _warm() -> None:
    """Start a worker and import torch in it before its first step needs it."""
    import torch  # noqa: F401


def run_parallel(steps: list, jobs: int, settle: Callable, launch_args: Callable,
                 run_step: Callable, finish: Callable) -> None:
    """Run `steps` (in dependency order) with up to `jobs` at once.

    `settle(step)` says whether the step needs no run (skipped or linked: it handles those),
    `launch_args(step)` gives `run_step`'s arguments, `finish(step, result)` records a step
    that ran. A failed step stops the run once the steps in flight end (its error is raised)."""
    names = {step.name for step in steps}
    pending, ended, running = list(steps), set(), {}
    context = multiprocessing.get_context("spawn")  # no forked torch threads or locks
    with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                                     initializer=_die_with_parent) as pool:
        for _ in range(jobs):  # every worker now: a step that starts later starts warm
            pool.submit(_warm)
        failure = None
        while pending or running:
            ready = [s for s in pending if all(d in ended or d not in names for d in s.deps)]
            while ready and len(running) < jobs and failure is None:
                step = ready.pop(0)
                pending.remove(step)
                if settle(step):
                    ended.add(step.name)
                    ready = [s for s in pending
                             if all(d in ended or d not in names for d in s.deps)]
                    continue
                share = min(jobs, len(running) + 1 + len(ready))
                print(f"[run] {step.name}: running ({_threads(share)} thread(s), "
                      f"{len(running) + 1} step(s) in flight)", flush=True)
                future = pool.submit(_work, run_step, launch_args(step), _threads(share))
                running[future] = step
            if not running:
                if failure is not None or not pending:
                    break
                raise RuntimeError(f"steps {[s.name for s in pending]} wait on steps that "
                                   f"never ran")
            done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in done:
                step = running.pop(future)
                try:
                    finish(step, future.result())
                except BaseException as exc:  # noqa: BLE001 (re-raised below)
                    failure = failure or exc
                    pending.clear()
                else:
                    ended.add(step.name)
        if failure is not None:
            raise failure
