"""The anchor: our RL loss and gradients equal TRL `GRPOTrainer._compute_loss` on one batch.

Our loop is hand-written because GRPOTrainer has one KL coefficient and one advantage for all
completion tokens, while SCoRe Stage I needs a strong KL on attempt 1 only with the reward on
attempt 2 (and TRL's SCoRe PR, huggingface/trl#2115, was closed unfinished); see
`backtrack.rl.algorithm`. On a single-attempt batch the two must agree exactly: same
advantages, temperature-scaled log-probs, k3 KL with weight beta, PPO-style clipping (with an
off-policy `old_per_token_logps`, so clipping is exercised), the ratio-weighted KL gradient
(`use_bias_correction_kl`) and loss aggregation.
"""

from __future__ import annotations

import pytest
import torch

from backtrack.rl import algorithm as alg

PROMPT_LEN, COMPLETION_LEN, TEMPERATURE = 5, 6, 0.7
REWARDS = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]  # 3 problems x G = 2 rollouts


def _batch():
    gen = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(10, 300, (6, PROMPT_LEN), generator=gen)
    completion_ids = torch.randint(10, 300, (6, COMPLETION_LEN), generator=gen)
    lengths = torch.tensor([6, 3, 5, 1, 6, 4])  # completions are right-padded
    completion_mask = (torch.arange(COMPLETION_LEN)[None] < lengths[:, None]).long()
    return prompt_ids, completion_ids, completion_mask


def _trl_trainer(model_dir, tmp_path, loss_type: str, beta: float, scale_rewards: str,
                 kl_ratio: bool):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), loss_type=loss_type, beta=beta, epsilon=0.2,
        scale_rewards=scale_rewards, temperature=TEMPERATURE, num_generations=2,
        per_device_train_batch_size=6, max_completion_length=COMPLETION_LEN, use_cpu=True,
        use_bias_correction_kl=kl_ratio, report_to="none", logging_steps=1,
        bf16=False)  # TRL defaults to bf16 autocast, even on CPU
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=lambda completions, **_: [0.0] *
                          len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["a", "b", "c"]}))
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    return trainer


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type,beta,scale_std,off_policy,kl_ratio", [
    ("grpo", 0.04, True, True, True), ("bnpo", 0.1, False, True, False),
    ("dapo", 0.04, True, False, True), ("grpo", 0.0, False, False, True)])
def test_loss_and_gradients_match_grpo_trainer(tiny_model_dir, tmp_path, loss_type, beta,
                                               scale_std, off_policy, kl_ratio):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    trainer = _trl_trainer(tiny_model_dir, tmp_path, loss_type, beta,
                           "group" if scale_std else "none", kl_ratio)
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # a reference that differs from the policy, so the KL is not zero
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompt_ids, completion_ids, completion_mask = _batch()
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    first = PROMPT_LEN - 1
    with torch.no_grad():
        ref_logps = alg.token_logps(reference, input_ids, attention_mask, TEMPERATURE, first)
        old_logps = None
        if off_policy:  # as if sampled by an older policy: ratios far enough from 1 to clip
            old_logps = alg.token_logps(ours, input_ids, attention_mask, TEMPERATURE, first)
            old_logps = old_logps + 0.4 * torch.randn(old_logps.shape)

    # ours: a single-attempt batch through the outcome method's table
    method = alg.make_methods(kl=beta, kl_stage1_attempt1=0, kl_stage1_attempt2=0,
                              alpha=0)["outcome"]
    seg_adv = alg.segment_advantages(method, {"r1": REWARDS}, 2, "mean", scale_std)
    segments = torch.where(completion_mask.bool(), alg.segment_id("attempt1"), alg.PAD_SEGMENT)
    adv, kl_w, mask = alg.token_weights(method, segments, torch.arange(6), seg_adv)
    logps = alg.token_logps(ours, input_ids, attention_mask, TEMPERATURE, first)
    loss, _ = alg.policy_loss(logps, adv, mask, kl_weights=kl_w, ref_logps=ref_logps,
                              old_logps=old_logps, loss_type=loss_type, kl_ratio=kl_ratio)
    loss.backward()

    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
              "completion_ids": completion_ids, "completion_mask": completion_mask,
              "advantages": seg_adv["attempt1"], "num_items_in_batch": completion_mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = ref_logps
    if old_logps is not None:
        inputs["old_per_token_logps"] = old_logps
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    theirs, mine = _grads(trainer.model), _grads(ours)
    assert theirs.keys() == mine.keys() and len(mine) > 5
    for name in mine:
        assert torch.allclose(mine[name], theirs[name], atol=1e-5), name
    assert max(g.abs().max() for g in mine.values()) > 1e-3  # the gradients are not trivially 0
