"""S²R (Ma et al. 2025): teach the model to verify its own answer, then to retry only when its
check says wrong. `s2r_sft` is the behaviour-initialisation SFT on self-verifying,
self-correcting trajectories built from the model's own samples (`s2r_data.py`); `s2r` adds
outcome-level RL on top (reward on the last attempt, leave-one-out baseline as S²R's RLOO).
Their outputs are graded on their last attempt and get verification metrics (`self_verify`).
"""

from __future__ import annotations

from backtrack.arms import Arm, register
from backtrack.protocols import Protocol
from backtrack.protocols import register as register_protocol


def data_config(build_config):
    """The S²R data options from the build section's `s2r` mapping (seed: the run's)."""
    from backtrack.config import resolve
    from backtrack.methods.s2r_data import S2RDataConfig

    options = {"seed": build_config.seed, **build_config.s2r}
    return resolve(S2RDataConfig, {"s2r": options}, "s2r", source="build")


def build_s2r(context):
    """Trajectories from the sample records (and backtrack traces if asked), verified by the
    task's `verification` hook; a task without one is a one-line error."""
    from backtrack.methods.s2r_data import build_s2r_examples, task_verifier
    from backtrack.tasks import get_task

    options = data_config(context.config)
    task = get_task(context.config.task, context.config.task_args)
    verify = task_verifier(task, task.problems("train"), options)
    traces = context.traces() if options.backtrack_attempts else []
    return build_s2r_examples(context.samples(), traces, verify, options, context.tokenizer,
                              str(context.layout.samples), str(context.layout.backtrack))


def _final_attempt_record(task, problem, prompt, sample_idx, completion) -> dict:
    """A sample record graded on the trace's last attempt (the checker alone would read a
    number out of the verification that follows the answer)."""
    from backtrack.generation import sample_record
    from backtrack.methods.s2r_metrics import final_attempt_text

    record = sample_record(task, problem, prompt, sample_idx, completion)
    check = task.check(final_attempt_text(completion.text), problem.answer)
    record.update(extracted=check.extracted, correct=bool(check.correct))
    return record


def _verification_metrics(records, task, config) -> dict:
    from backtrack.methods.s2r_metrics import summarize

    found = summarize(records, task.check, n_boot=config.n_boot, seed=config.seed)
    return {"metrics": found["metrics"], "per_problem": found["per_problem"]}


register_protocol(Protocol(
    "self_verify", "one trace that checks itself (S²R): graded on its last attempt, plus "
    "verdict accuracy and attempts per answer", make_record=_final_attempt_record,
    extra_metrics=_verification_metrics))
register(Arm("s2r_sft", "S²R behaviour initialisation: SFT on attempt -> verify -> retry "
             "trajectories of the model's own samples", training="sft", build=build_s2r,
             reads=("sample",), protocol="self_verify", compare_with=("rft_bt", "base")))
register(Arm("s2r", "S²R: s2r_sft then outcome-level RL (reward on the final answer, RLOO)",
             parent="s2r_sft", training="rl", protocol="self_verify",
             train_args={"method": "outcome", "baseline": "loo",
                         "scale_std": False, "reward_on": "final_attempt"},
             compare_with=("s2r_sft", "rft_bt")))
