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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from backtrack.errors import UserError

# Segment ids are positions in this tuple; S²R's verify/retry segments are appended here.
SEGMENTS = ("prompt", "attempt1", "carried", "bridge", "attempt2")
PAD_SEGMENT = -1
GENERATED = ("attempt1", "attempt2")  # segments the policy samples (the only trainable ones)
REWARDS = ("r1", "r2")
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
        if self.attempts == 1 and any(s != "attempt1" for s in self.rules):
            raise UserError(f"method '{self.name}': a single-attempt method trains attempt1 only")


def make_methods(kl: float, kl_stage1_attempt1: float, kl_stage1_attempt2: float,
                 alpha: float) -> dict[str, Method]:
    """The built-in methods.

    - outcome: one attempt, advantage from its correctness (GRPO / RLOO on the final answer).
    - score_stage1 (SCoRe Stage I): attempt 2 maximises r2 under a light KL; attempt 1 gets no
      reward term, only a strong KL that keeps it near the reference (the parent model).
    - score_stage2 (SCoRe Stage II): attempt 1 is credited with r1 and attempt 2 with the
      shaped r2 + alpha * (r2 - r1) (rewarding the flip wrong -> right), both with the usual KL.
    """
    methods = {
        "outcome": Method("outcome", 1, {"attempt1": SegmentRule({"r1": 1.0}, kl)}),
        "score_stage1": Method("score_stage1", 2, {
            "attempt1": SegmentRule({}, kl_stage1_attempt1),
            "attempt2": SegmentRule({"r2": 1.0}, kl_stage1_attempt2)}),
        "score_stage2": Method("score_stage2", 2, {
            "attempt1": SegmentRule({"r1": 1.0}, kl),
            "attempt2": SegmentRule({"r2": 1.0 + alpha, "r1": -alpha}, kl)}),
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
    """{segment: advantage per rollout} for every trained segment of `method`."""
    import torch

    out = {}
    for seg, rule in method.rules.items():
        count = len(next(iter(rewards.values())))
        total = torch.zeros(count)
        for name, weight in rule.reward.items():
            total = total + weight * torch.as_tensor(rewards[name], dtype=torch.float32)
        out[seg] = group_advantages(total, group_size, baseline, scale_std)
    return out


def token_weights(method: Method, segments, row_rollout, seg_advantages: dict):
    """Per-token (advantage, KL weight, loss mask) for rows whose tokens carry segment ids.

    `segments` [B, T] are the segment ids of the *scored* tokens (targets), `row_rollout` [B]
    the rollout each row belongs to (a two-attempt rollout may span two rows).
    """
    import torch

    advantages = torch.zeros(segments.shape)
    kl_weights = torch.zeros(segments.shape)
    mask = torch.zeros(segments.shape)
    for seg, rule in method.rules.items():
        hit = (segments == segment_id(seg)).float()
        advantages += hit * seg_advantages[seg][row_rollout].unsqueeze(1)
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
