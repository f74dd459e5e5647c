"""`backtrack rl`: on-policy RL of one arm (outcome RL, SCoRe) from a parent model.

Each step takes `problems_per_step` train problems, samples `group_size` rollouts per problem
with the `hf` engine on the live policy (no weight sync), adds a second attempt for SCoRe,
rewards attempts with the task's checker, and takes one AdamW step on the clipped policy
gradient + per-segment KL to the frozen parent (`backtrack.rl.algorithm`; why it is
hand-written is said there). The policy forward/backward runs over all rows of the step at
once (or `micro_batch_rows` at a time), each problem's prompt once (`rl.shared_forward`).
Runs the same under `accelerate launch` (each process takes its share of the step's problems;
DDP averages gradients). Checkpoints go to
`<output_dir>/checkpoints/<arm>/`; the final model is assembled in a temp folder and renamed
to `<output_dir>/models/<arm>/` (with `rl_log.json`, `rl_log.png`, `run.json`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from backtrack.config import CommonConfig, option
from backtrack.errors import UserError
from backtrack.layout import trained_model_done, trained_model_outputs
from backtrack.rl.algorithm import BASELINES, LOSS_TYPES
from backtrack.trackers import TRACKERS

RL_METHODS = ("outcome", "score_stage1", "score", "process")


@dataclass
class RLConfig(CommonConfig):
    """On-policy RL of one arm from its parent; writes <output_dir>/models/<arm>/."""

    arm: str = option("outcome_rl", "Name of the trained model (<output_dir>/models/<arm>/).")
    parent: str = option("base", "Model to start from and to keep the KL to: `base` (the "
                         "recipe's model) or an arm trained earlier (<output_dir>/models/<parent>/).")
    method: str = option("outcome", "outcome: one attempt, reward = correct answer (GRPO/RLOO). "
                         "score: SCoRe Stage I for `stage1_steps`, then Stage II. score_stage1: "
                         "Stage I only (ablation). process: one trace split into steps by "
                         "`trace_format`, each step rewarded on its own (S²R's process-level RL). "
                         "In `backtrack run` each RL arm sets its own.", choices=RL_METHODS)
    stage1_steps: int = option(10, "Steps of SCoRe Stage I before Stage II (method score).")
    group_size: int = option(8, "Rollouts per problem (G); advantages compare within a group.")
    problems_per_step: int = option(16, "Train problems per optimizer step (all processes).")
    steps: int = option(40, "Optimizer steps.")
    lr: float = option(1e-5, "AdamW learning rate (constant).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this (0 = no clipping).")
    kl: float = option(0.05, "KL weight on every attempt for outcome and SCoRe Stage II.")
    kl_stage1_attempt1: float = option(0.5, "SCoRe Stage I: KL weight that keeps attempt 1 "
                                       "near the parent model.")
    kl_stage1_attempt2: float = option(0.05, "SCoRe Stage I: KL weight on attempt 2.")
    alpha: float = option(1.0, "SCoRe Stage II bonus: attempt 2 is rewarded r2 + alpha (r2 - r1).")
    baseline: str = option("mean", "Advantage baseline: group mean (GRPO) or leave-one-out "
                           "mean of the other G-1 rollouts (RLOO).", choices=BASELINES)
    scale_std: bool = option(True, "Divide advantages by the group's reward std (GRPO).")
    loss_type: str = option("dapo", "Loss aggregation as TRL: grpo (per-row mean, then mean), "
                            "bnpo/dapo (mean over all tokens), dr_grpo (sum / rows x "
                            "max_new_tokens).", choices=LOSS_TYPES)
    epsilon: float = option(0.2, "PPO clip range of the importance ratio (lower side).")
    epsilon_high: float = option(0.2, "PPO clip range (upper side).")
    temperature: float = option(0.8, "Sampling temperature (log-probs are scored at it too).")
    top_p: float = option(1.0, "Nucleus sampling threshold.")
    max_new_tokens: int = option(160, "Longest attempt in tokens.")
    reward_on: str = option("answer", "What the reward checks: the answer of the whole text "
                            "(`answer`), or the last attempt of a self-verifying trace "
                            "(`final_attempt`, S²R: a verification may follow the answer).",
                            choices=("answer", "final_attempt"))
    trace_format: str = option("s2r", "How `reward_on: final_attempt` and method `process` read "
                               "a rollout: a format registered by a method module (`s2r`: "
                               "attempts, verifications and cues of a self-verifying trace, "
                               "with the cues the parent model was trained on).")
    second_attempt: str = option("phrase", "How attempt 2 is asked for: phrase (cut attempt 1 "
                                 "before </think>, append the phrase, same turn) or instruction "
                                 "(a user turn with the instruction).", choices=("phrase",
                                                                                 "instruction"))
    second_attempt_text: str = option("", "The phrase (or preset mild/strong) or instruction; "
                                      "empty = mild phrase / SCoRe's instruction.")
    micro_batch_rows: int = option(0, "Rows per forward/backward (0 = the whole step at once).",
                                   hashed=False)
    share_prompt_forward: bool = option(True, "Run each group's shared prompt through the "
                                        "policy and reference once per step, not once per "
                                        "rollout (same loss to float rounding; off = the plain "
                                        "per-row forward).", hashed=False)
    engine_args: dict = option({}, "Options of the hf engine (batch_size, cache, num_threads).")
    save_steps: int = option(20, "Write a checkpoint every N optimizer steps.", hashed=False)
    save_total_limit: int = option(2, "Checkpoints kept on disk (oldest deleted).", hashed=False)
    resume: bool = option(False, "Continue from the arm's last checkpoint; without it a run "
                          "starts at step 0 and removes the arm's old checkpoints.", hashed=False)
    report_to: str = option("none", "Stream the per-step log to a tracker (via accelerate; "
                            "tensorboard logs go to <output_dir>/logs/rl_<arm>/).", choices=TRACKERS,
                            hashed=False)
    logging_steps: int = option(1, "Print a progress line every N steps.", hashed=False)

    def validate(self) -> None:
        for name in ("group_size", "problems_per_step", "steps", "max_new_tokens", "save_steps",
                     "save_total_limit", "logging_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"option '{name}': must be at least 1")
        for name in ("kl", "kl_stage1_attempt1", "kl_stage1_attempt2", "lr", "epsilon",
                     "epsilon_high", "weight_decay", "max_grad_norm", "micro_batch_rows"):
            if getattr(self, name) < 0:
                raise UserError(f"option '{name}': must be >= 0, got {getattr(self, name)}")
        if self.baseline == "loo" and self.group_size < 2:
            raise UserError("option 'group_size': a leave-one-out baseline needs at least 2")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise UserError("options 'temperature' > 0 and 'top_p' in (0, 1] are needed to sample")
        if self.method == "score" and not 0 < self.stage1_steps < self.steps:
            raise UserError(f"option 'stage1_steps': must be in [1, steps - 1] for method score "
                            f"(got {self.stage1_steps} with steps {self.steps}; use method "
                            "score_stage1 for Stage I alone)")
        if self.method == "process" and self.scale_std:
            raise UserError("option 'scale_std': method process does not scale its step "
                            "advantages (S²R); set it to false")
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.arm):
            raise UserError(f"option 'arm': {self.arm!r} is not a valid folder name")
        if self.parent == self.arm:
            raise UserError(f"option 'parent': an arm cannot be its own parent ({self.arm!r})")


def resolve_parent(config: RLConfig) -> str:
    """The parent's model folder (the registry's: the recipe's model for `base`, else the
    model of the parent arm, trained earlier)."""
    from backtrack.arms import model_path

    try:
        return model_path(config.parent, config.model, config.output_dir)
    except UserError as exc:
        raise UserError(f"option 'parent': {exc}") from exc


outputs = trained_model_outputs  # the pipeline reads a stage's outputs and done from here
done = trained_model_done


@dataclass(frozen=True)
class TraceReader:
    """How RL reads the traces of a method that writes structured ones (S²R's)."""

    final_text: Callable[[str], str]  # the part of a rollout its outcome reward checks
    # (text, gold) -> [(end character, segment, reward or None), ...] tiling the text
    split_steps: Callable[[str, str], list]


TRACE_FORMATS: dict[str, Callable] = {}  # name -> make(config, task) -> TraceReader


def register_trace_format(name: str, make: Callable) -> None:
    """Called by a method module (e.g. `methods/s2r.py`), so the stage has no method branches."""
    TRACE_FORMATS[name] = make


def trace_reader(config: RLConfig, task) -> TraceReader:
    from backtrack.arms import load_methods

    load_methods()
    if config.trace_format not in TRACE_FORMATS:
        raise UserError(f"option 'trace_format': unknown format {config.trace_format!r} "
                        f"(known: {', '.join(TRACE_FORMATS)})")
    return TRACE_FORMATS[config.trace_format](config, task)


class FinalAttemptTask:
    """A task whose reward reads the last attempt of a structured trace (`final_text`)."""

    def __init__(self, task, final_text: Callable[[str], str]):
        self.task, self.final_text = task, final_text

    def __getattr__(self, name):
        return getattr(self.task, name)

    def reward(self, completion: str, gold: str) -> float:
        return self.task.reward(self.final_text(completion), gold)


def second_attempt_text(config: RLConfig) -> str:
    from backtrack.formats import PHRASE_PRESETS, SCORE_INSTRUCTION

    text = config.second_attempt_text
    if config.second_attempt == "phrase":
        return PHRASE_PRESETS.get(text or "mild", text)
    return text or SCORE_INSTRUCTION


def method_at(config: RLConfig, methods: dict, step: int):
    """The method table of optimizer step `step` (0-based); SCoRe switches stages."""
    if config.method == "score":
        return methods["score_stage1" if step < config.stage1_steps else "score_stage2"]
    return methods[config.method]


def problems_at(config: RLConfig, problems: list, step: int, rank: int, world: int) -> list:
    """This process's share of step `step`'s problems: epochs of seeded shuffles, so a
    resumed run sees the same problems as an uninterrupted one."""
    from backtrack.engines import derive_seed

    per_step, picked = config.problems_per_step, []
    for index in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(index, len(problems))
        order = list(range(len(problems)))
        random.Random(derive_seed(config.seed, "rl-epoch", epoch)).shuffle(order)
        picked.append(problems[order[offset]])
    return picked[rank::world]


def main(config: RLConfig) -> Path:
    """Train the arm; resumes from its last checkpoint when `resume` is set."""
    from backtrack.rl.loop import run

    config.validate()
    return run(config, resolve_parent(config))
