"""S²R (Ma et al. 2025): teach the model to verify its own answer, then to retry only when its
check says wrong. `s2r_sft` is the behaviour-initialisation SFT on self-verifying,
self-correcting trajectories built from the model's own samples (`s2r_data.py`); `s2r` adds
outcome-level RL on top (reward on the last attempt, leave-one-out baseline as S²R's RLOO);
`s2r_process` adds process-level RL instead (each attempt rewarded by its correctness, each
verification by whether its verdict agrees with the checker; `s2r_metrics.step_rewards`).
Their outputs are graded on their last attempt and get verification metrics (`self_verify`).

The cues and verdicts a model writes are those of its S²R SFT data (`build.s2r`), so the
evaluation and the RL stage read them from that data's build stats (`cues_for`), not from
the defaults: a recipe sets them once.
"""

from __future__ import annotations

import dataclasses

from backtrack.arms import Arm, register
from backtrack.errors import UserError
from backtrack.protocols import Protocol
from backtrack.protocols import register as register_protocol
from backtrack.rl.stage import register_trace_format


def data_config(build_config):
    """The S²R data options from the build section's `s2r` mapping (seed: the run's)."""
    from backtrack.config import resolve
    from backtrack.methods.s2r_data import S2RDataConfig

    options = {"seed": build_config.seed, **build_config.s2r}
    return resolve(S2RDataConfig, {"s2r": options}, "s2r", source="build")


def build_s2r(context):
    """Trajectories from the sample records (and backtrack traces if asked), verified by the
    verify stage's records (the task's hook or the model's own checks, `verifying.py`), which
    must use this data's cues."""
    from backtrack.methods.s2r_data import build_s2r_examples
    from backtrack.verifying import records_verifier

    options = data_config(context.config)
    verify = records_verifier(context.layout, options, context.task())
    traces = context.traces() if options.backtrack_attempts else []
    examples, stats = build_s2r_examples(context.samples(), traces, verify, options,
                                         context.tokenizer, str(context.layout.samples),
                                         str(context.layout.backtrack))
    return examples, {**stats, "cues": dataclasses.asdict(options.cues())}


def cues_for(arm_name: str, output_dir: str):
    """The cues an arm's model was trained to write: those recorded in the build stats of the
    nearest S²R SFT arm in its lineage; the defaults for a lineage without one (or data built
    before the stats recorded them)."""
    from pathlib import Path

    from backtrack.arms import lineage
    from backtrack.fileio import read_json
    from backtrack.layout import RunLayout
    from backtrack.methods.s2r_data import Cues

    built = [arm for arm in lineage(arm_name) if arm.build is build_s2r]
    if not built:
        return Cues()
    path = RunLayout(Path(output_dir)).sft / "stats.json"
    stats = read_json(path)
    if stats is None:
        raise UserError(f"{path}: missing or unreadable, so the S²R cues arm '{built[0].name}' "
                        "was trained with are unknown (run `backtrack build` first)")
    info = ((stats.get("inputs") or {}).get("per_arm") or {}).get(built[0].name) or {}
    return Cues(**info["cues"]) if "cues" in info else Cues()


def _eval_options(config, evaluation) -> dict:
    return {"cues": cues_for(evaluation.arm.name, config.output_dir)}


def _final_attempt_record(task, problem, prompt, sample_idx, completion, cues=None) -> dict:
    """A sample record graded on the trace's last attempt (the checker alone would read a
    number out of the verification that follows the answer)."""
    from backtrack.generation import sample_record
    from backtrack.methods.s2r_data import Cues
    from backtrack.methods.s2r_metrics import final_attempt_text

    record = sample_record(task, problem, prompt, sample_idx, completion)
    check = task.check(final_attempt_text(completion.text, cues or Cues()), problem.answer)
    record.update(extracted=check.extracted, correct=bool(check.correct))
    return record


def _verification_metrics(records, task, config, cues=None) -> dict:
    from backtrack.methods.s2r_data import Cues
    from backtrack.methods.s2r_metrics import summarize

    found = summarize(records, task.check, cues or Cues(), n_boot=config.n_boot,
                      seed=config.seed)
    return {"metrics": found["metrics"], "per_problem": found["per_problem"]}


def _trace_reader(config, task):
    """The RL stage's view of S²R traces, with the cues of the parent model's data."""
    from backtrack.methods.s2r_metrics import final_attempt_text, step_rewards
    from backtrack.rl.stage import TraceReader

    cues = cues_for(config.parent, config.output_dir)
    return TraceReader(final_text=lambda text: final_attempt_text(text, cues),
                       split_steps=lambda text, gold: step_rewards(text, gold, task.check, cues))


VERDICT_BARS = (("verdict_accuracy", "verdict accuracy"), ("wrong_precision", "'wrong' precision"),
                ("wrong_recall", "'wrong' recall"))


def plot_verdicts(ax, evaluations: dict) -> None:
    """Verdict accuracy (and precision / recall of "wrong" verdicts) per evaluation, with the
    95 % CIs over problems; an evaluation that reached no verdict has no bar."""
    import numpy as np

    width = 0.8 / len(VERDICT_BARS)
    x = np.arange(len(evaluations))
    for i, (metric, label) in enumerate(VERDICT_BARS):
        cells = [data["metrics"].get(metric) or {} for data in evaluations.values()]
        values = [100 * c["value"] if c.get("value") is not None else np.nan for c in cells]
        low = [v - 100 * c["low"] if c.get("low") is not None else 0 for v, c in zip(values, cells)]
        high = [100 * c["high"] - v if c.get("high") is not None else 0
                for v, c in zip(values, cells)]
        ax.bar(x + (i - (len(VERDICT_BARS) - 1) / 2) * width, values, width, label=label,
               yerr=[np.nan_to_num(low), np.nan_to_num(high)], capsize=3)
    ax.set_xticks(x, list(evaluations), rotation=20)
    ax.set_ylim(0, 105)
    ax.set_ylabel("% (95 % CI over problems)")
    ax.set_title("Self-verification: verdicts against the checker")
    ax.legend(fontsize=8)


register_protocol(Protocol(
    "self_verify", "one trace that checks itself (S²R): graded on its last attempt, plus "
    "verdict accuracy and attempts per answer", make_record=_final_attempt_record,
    extra_metrics=_verification_metrics, options=_eval_options, plot=plot_verdicts,
    plot_file="verdict_accuracy.png"))
register_trace_format("s2r", _trace_reader)
register(Arm("s2r_sft", "S²R behaviour initialisation: SFT on attempt -> verify -> retry "
             "trajectories of the model's own samples", training="sft", build=build_s2r,
             reads=("sample", "verify"), protocol="self_verify", compare_with=("rft_bt", "base")))
register(Arm("s2r", "S²R: s2r_sft then outcome-level RL (reward on the final answer, RLOO)",
             parent="s2r_sft", training="rl", protocol="self_verify",
             train_args={"method": "outcome", "baseline": "loo",
                         "scale_std": False, "reward_on": "final_attempt"},
             compare_with=("s2r_sft", "rft_bt")))
register(Arm("s2r_process", "S²R: s2r_sft then process-level RL (each attempt rewarded by its "
             "correctness, each verification by its verdict's agreement with the checker)",
             parent="s2r_sft", training="rl", protocol="self_verify",
             train_args={"method": "process", "baseline": "loo", "scale_std": False,
                         "reward_on": "final_attempt"},
             compare_with=("s2r", "s2r_sft")))
