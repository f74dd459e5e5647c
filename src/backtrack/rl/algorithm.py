"""The RL core in pure torch: segment-aware advantages, per-segment KL and the clipped PG loss.

Why a hand-written loop and not TRL's `GRPOTrainer`: GRPOTrainer applies one KL coefficient
(`beta`) and one advantage to every completion token of a sequence. SCoRe (Kumar et al. 2024)
needs different treatment per part of a two-attempt rollout: Stage I puts a strong KL on
attempt 1 alone, with no reward term there, and drives attempt 2 by its own reward; Stage II
credits each attempt with a different (shaped) reward. TRL's SCoRe PR (huggingface/trl#2115)
was closed unfinished, and its multi-turn support has no per-segment KL. So the few lines
that differ live here, and `tests/test_rl_trl_parity.py` anchors them to GRPOTrainer: on a
single-attempt batch our loss and gradients equal its `_compute_loss` to 1e-5 (same k3 KL
estimator, same PPO-style clipping, same "grpo" / "bnpo" / "dapo" / "dr_grpo" aggregation).

Data model: every token of a training row carries a segment id (index into `SEGMENTS`; -1 =
padding). A `Method` is a small table: for each segment the policy samples, which weighted sum
of the rollout's named rewards (`r1` = attempt 1 correct, `r2` = attempt 2 correct) drives
its advantage, and the weight of its KL to the reference model. Context segments (the prompt,
attempt-1 text carried into the attempt-2 prompt, the retry phrase or instruction) are never
trained.

Process-level rewards (S²R, Ma et al. 2025): a self-verifying trace is split into steps
(attempts, verifications, and the cues between them), each step a span of tokens with its own
reward. A rule weights the reward `step` to use it; the step's advantage is its reward minus
the mean reward of the group's steps that share its segment and the rewards of every step
before it (S²R's "prefix" baseline, computed here within the rollout group, as RLOO does for
outcome rewards; `step_advantages`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from backtrack.errors import UserError

# Segment ids are positions in this tuple. The last four are the parts of an S²R trace after
# its first attempt: the verify cue, a verification, the retry cue and a later attempt.
SEGMENTS = ("prompt", "attempt1", "carried", "bridge", "attempt2",
            "verify_cue", "verification", "retry_cue", "reattempt")
PAD_SEGMENT = -1
# segments the policy samples (the only trainable ones)
GENERATED = ("attempt1", "attempt2", "verify_cue", "verification", "retry_cue", "reattempt")
# r1 / r2: attempt 1 / 2 of a rollout correct; step: the reward of the step a token is in
REWARDS = ("r1", "r2", "step")
BASELINES = ("mean", "loo")
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")


def segment_id(name: str) -> int:
    if name not in SEGMENTS:
        raise UserError(f"unknown segment '{name}' (known: {', '.join(SEGMENTS)})")
    return SEGMENTS.index(name)


@dataclass(frozen=True)
class SegmentRule:
    """How one segment is trained: advantage from `sum(w * reward)`, plus `kl` x KL."""

    reward: dict[str, float] = field(default_factory=dict)  # {} = no reward term
    kl: float = 0.0


@dataclass(frozen=True)
class Method:
    """An RL method as data: how many attempts a rollout has and a rule per segment."""

    name: str
    attempts: int
    rules: dict[str, SegmentRule]

    def validate(self) -> None:
        for seg, rule in self.rules.items():
            segment_id(seg)
            if seg not in GENERATED:
                raise UserError(f"method '{self.name}': segment '{seg}' is not sampled by the "
                                f"policy, so it cannot be trained (trainable: {list(GENERATED)})")
            if rule.kl < 0:
                raise UserError(f"method '{self.name}': KL coefficient of segment '{seg}' "
                                f"must be >= 0, got {rule.kl}")
            for name in rule.reward:
                if name not in REWARDS:
                    raise UserError(f"method '{self.name}': unknown reward '{name}' "
                                    f"(known: {', '.join(REWARDS)})")
        if self.attempts == 1 and "attempt2" in self.rules:
            raise UserError(f"method '{self.name}': a single-attempt method has no attempt2")
        if self.attempts == 2 and set(self.rules) - {"attempt1", "attempt2"}:
            raise UserError(f"method '{self.name}': a two-attempt method trains attempt1 and "
                            "attempt2 only")

    @property
    def uses_steps(self) -> bool:
        """Whether its advantages need rollouts split into rewarded steps."""
        return any("step" in rule.reward for rule in self.rules.values())


def make_methods(kl: float, kl_stage1_attempt1: float, kl_stage1_attempt2: float,
                 alpha: float) -> dict[str, Method]:
    """The built-in methods.

    - outcome: one attempt, advantage from its correctness (GRPO / RLOO on the final answer).
    - score_stage1 (SCoRe Stage I): attempt 2 maximises r2 under a light KL; attempt 1 gets no
      reward term, only a strong KL that keeps it near the reference (the parent model).
    - score_stage2 (SCoRe Stage II): attempt 1 is credited with r1 and attempt 2 with the
      shaped r2 + alpha * (r2 - r1) (rewarding the flip wrong -> right), both with the usual KL.
    - process (S²R's process-level RL): one self-verifying trace; each attempt and each
      verification is credited with its own step reward, the cues carry no reward (advantage
      0) but stay under the KL, as in S²R.
    """
    methods = {
        "outcome": Method("outcome", 1, {"attempt1": SegmentRule({"r1": 1.0}, kl)}),
        "score_stage1": Method("score_stage1", 2, {
            "attempt1": SegmentRule({}, kl_stage1_attempt1),
            "attempt2": SegmentRule({"r2": 1.0}, kl_stage1_attempt2)}),
        "score_stage2": Method("score_stage2", 2, {
            "attempt1": SegmentRule({"r1": 1.0}, kl),
            "attempt2": SegmentRule({"r2": 1.0 + alpha, "r1": -alpha}, kl)}),
        "process": Method("process", 1, {
            "attempt1": SegmentRule({"step": 1.0}, kl), "reattempt": SegmentRule({"step": 1.0}, kl),
            "verification": SegmentRule({"step": 1.0}, kl),
            "verify_cue": SegmentRule({}, kl), "retry_cue": SegmentRule({}, kl)}),
    }
    for method in methods.values():
        method.validate()
    return methods


def group_advantages(rewards, group_size: int, baseline: str = "mean", scale_std: bool = False,
                     eps: float = 1e-4):
    """Advantages of rewards laid out as consecutive groups of `group_size` rollouts.

    `mean`: r - mean(group) (GRPO); `loo`: r - mean(the other G-1 rollouts) (RLOO), which is
    G/(G-1) x the former. `scale_std` divides by the group's unbiased std + eps, like TRL's
    `scale_rewards="group"`.
    """
    import torch

    if baseline not in BASELINES:
        raise UserError(f"unknown baseline '{baseline}' (known: {', '.join(BASELINES)})")
    if baseline == "loo" and group_size < 2:
        raise UserError("a leave-one-out baseline needs group_size >= 2")
    grouped = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    if baseline == "mean":
        adv = grouped - mean
    else:
        adv = grouped - (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    if scale_std:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        adv = adv / (std + eps)
    return adv.reshape(-1)


def segment_advantages(method: Method, rewards: dict, group_size: int, baseline: str = "mean",
                       scale_std: bool = False) -> dict:
    """{segment: advantage per rollout} for every trained segment of `method` (from the
    rollout-level rewards; a `step` term is per step, see `step_advantages`)."""
    import torch

    out = {}
    for seg, rule in method.rules.items():
        count = len(next(iter(rewards.values())))
        total = torch.zeros(count)
        for name, weight in rule.reward.items():
            if name == "step":
                continue
            total = total + weight * torch.as_tensor(rewards[name], dtype=torch.float32)
        out[seg] = group_advantages(total, group_size, baseline, scale_std)
    return out


def step_advantages(steps: list[list[tuple[str, float | None]]], group_size: int,
                    baseline: str = "mean") -> list[list[float]]:
    """Advantage of every step of every rollout (rollouts laid out G per problem, as in
    `group_advantages`); `steps[r]` = [(segment, reward or None), ...] in the order written.

    A step is compared with the steps of its group that share its segment and the rewards of
    all rewarded steps before it (its "prefix", S²R's baseline: a verification after a right
    attempt is compared with other verifications after a right attempt). `mean`: reward minus
    the mean over those steps, itself included; `loo`: minus the mean over the others. A step
    whose prefix no other step of the group shares gets baseline 0 (S²R's fallback when too
    few actions share a prefix); a step without a reward (a cue) gets advantage 0.
    """
    if baseline not in BASELINES:
        raise UserError(f"unknown baseline '{baseline}' (known: {', '.join(BASELINES)})")
    if len(steps) % group_size:
        raise ValueError(f"{len(steps)} rollouts are not groups of {group_size}")
    keys: list[list[tuple | None]] = []
    for rollout in steps:
        earlier: list[float] = []
        keys.append([])
        for segment, reward in rollout:
            keys[-1].append(None if reward is None else (segment, tuple(earlier)))
            if reward is not None:
                earlier.append(float(reward))
    out: list[list[float]] = []
    for start in range(0, len(steps), group_size):
        shared: dict[tuple, list[float]] = {}
        for r in range(start, start + group_size):
            for key, (_, reward) in zip(keys[r], steps[r]):
                if key is not None:
                    shared.setdefault(key, []).append(float(reward))
        for r in range(start, start + group_size):
            out.append([])
            for key, (_, reward) in zip(keys[r], steps[r]):
                if key is None:
                    out[-1].append(0.0)
                    continue
                same = shared[key]
                if len(same) == 1:
                    base = 0.0
                elif baseline == "mean":
                    base = sum(same) / len(same)
                else:
                    base = (sum(same) - float(reward)) / (len(same) - 1)
                out[-1].append(float(reward) - base)
    return out


def token_weights(method: Method, segments, row_rollout, seg_advantages: dict, steps=None,
                  step_adv=None):
    """Per-token (advantage, KL weight, loss mask) for rows whose tokens carry segment ids.

    `segments` [B, T] are the segment ids of the *scored* tokens (targets), `row_rollout` [B]
    the rollout each row belongs to (a two-attempt rollout may span two rows). For a method
    with `step` rewards, `steps` [B, T] holds the index of the step each scored token is in
    (-1 = none) and `step_adv` [rollouts, steps] the advantages of `step_advantages`.
    """
    import torch

    advantages = torch.zeros(segments.shape)
    kl_weights = torch.zeros(segments.shape)
    mask = torch.zeros(segments.shape)
    per_step = None
    if method.uses_steps:
        if steps is None or step_adv is None:
            raise ValueError(f"method '{method.name}' needs the rollouts' steps")
        rows = row_rollout.unsqueeze(1).expand_as(steps)
        per_step = step_adv[rows, steps.clamp(min=0)] * (steps >= 0)
    for seg, rule in method.rules.items():
        hit = (segments == segment_id(seg)).float()
        advantages += hit * seg_advantages[seg][row_rollout].unsqueeze(1)
        if rule.reward.get("step"):
            advantages += hit * rule.reward["step"] * per_step
        kl_weights += hit * rule.kl
        mask += hit
    return advantages, kl_weights, mask


def per_token_kl(logps, ref_logps):
    """k3 estimator of KL(policy || reference) per token (Schulman; as in TRL):
    exp(ref - logp) - (ref - logp) - 1, unbiased and always >= 0."""
    import torch

    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def policy_loss(logps, advantages, mask, *, kl_weights=None, ref_logps=None, old_logps=None,
                loss_type: str = "grpo", epsilon_low: float = 0.2,
                epsilon_high: float | None = None, kl_ratio: bool = True, num_items=None,
                max_completion_length: int | None = None):
    """The clipped policy-gradient loss with a per-token KL term, and detached statistics.

    All tensors are [B, T] over scored tokens. `old_logps` (the sampling policy) defaults to
    `logps.detach()` (one update per batch: ratio 1). Aggregation as TRL: `grpo` = mean over
    each row's tokens, then over rows; `bnpo` = mean over all tokens of the batch; `dapo` =
    sum / `num_items` (all scored tokens across processes divided by the process count, so
    data parallelism averages to the global token mean; default: this batch's count);
    `dr_grpo` = sum / (rows x `max_completion_length`). `kl_ratio` multiplies the KL by the
    (differentiable) ratio so its gradient is the unbiased reverse-KL gradient, which changes
    it even on-policy (TRL's `use_bias_correction_kl`, on by default there too).
    """
    import torch

    if loss_type not in LOSS_TYPES:
        raise UserError(f"unknown loss type '{loss_type}' (known: {', '.join(LOSS_TYPES)})")
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    high = epsilon_low if epsilon_high is None else epsilon_high
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if ref_logps is not None and kl_weights is not None:
        kl = per_token_kl(logps, ref_logps)
        per_token = per_token + kl_weights * (kl * ratio if kl_ratio else kl)
    loss = aggregate(per_token, mask, loss_type, num_items, max_completion_length)
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1.0)
        stats = {"tokens": float(mask.sum()),
                 "clip_fraction": float((((ratio < 1 - epsilon_low) & (advantages < 0))
                                         | ((ratio > 1 + high) & (advantages > 0))).float()
                                        .mul(mask).sum() / tokens),
                 "kl": float((kl * mask).sum() / tokens) if kl is not None else 0.0}
    return loss, stats


def aggregate(per_token, mask, loss_type: str, num_items=None, max_completion_length=None):
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dapo":
        total = mask.sum() if num_items is None else num_items
        return (per_token * mask).sum() / max(float(total), 1.0)
    if max_completion_length is None:
        raise ValueError("loss type 'dr_grpo' needs max_completion_length")
    return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)


def token_logps(model, input_ids, attention_mask, temperature: float = 1.0, first: int = 0):
    """Log-probabilities [B, T-1-first] of each next token (targets input_ids[:, first+1:])
    under logits / temperature (the distribution sampled from, as TRL scores it).

    Rows are right-padded, so positions are 0..T-1 and match generation without padding.
    `first` skips the logits of leading positions no row scores (the shared prompt start).
    """
    import torch

    hidden = model(input_ids=input_ids, attention_mask=attention_mask,
                   logits_to_keep=input_ids.size(1) - first).logits
    logits = hidden[:, :-1].float() / temperature
    targets = input_ids[:, first + 1:]
    picked = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
