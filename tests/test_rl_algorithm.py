"""The RL core against hand-computed golden cases (tests/golden/rl_*.json) and properties."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from backtrack.errors import UserError
from backtrack.rl import algorithm as alg

GOLDEN = Path(__file__).parent / "golden"
ADV = json.loads((GOLDEN / "rl_advantages.json").read_text())
LOSSES = json.loads((GOLDEN / "rl_losses.json").read_text())["cases"]


def _methods(alpha=2.0):
    return alg.make_methods(kl=0.05, kl_stage1_attempt1=1.0, kl_stage1_attempt2=0.01, alpha=alpha)


@pytest.mark.parametrize("case", ADV["group"], ids=lambda c: c["name"])
def test_group_advantages_golden(case):
    got = alg.group_advantages(case["rewards"], case["group_size"], case["baseline"],
                               case["scale_std"])
    assert got.tolist() == pytest.approx(case["expected"], abs=1e-7)


@pytest.mark.parametrize("case", ADV["method"], ids=lambda c: c["name"])
def test_segment_advantages_golden(case):
    method = _methods(case["alpha"])[case["method"]]
    got = alg.segment_advantages(method, case["rewards"], case["group_size"])
    assert {k: v.tolist() for k, v in got.items()} == {
        k: pytest.approx(v, abs=1e-7) for k, v in case["expected"].items()}


def test_loo_is_a_rescaled_mean_baseline():
    rewards = torch.rand(6 * 5)
    mean = alg.group_advantages(rewards, 5, "mean")
    loo = alg.group_advantages(rewards, 5, "loo")
    assert torch.allclose(loo, mean * 5 / 4, atol=1e-6)
    assert torch.allclose(mean.view(6, 5).sum(1), torch.zeros(6), atol=1e-6)


@pytest.mark.parametrize("case", LOSSES, ids=lambda c: c["name"])
def test_policy_loss_golden(case):
    logps = torch.tensor(case["logps"], requires_grad=True)
    tensor = lambda key: torch.tensor(case[key]) if key in case else None  # noqa: E731
    loss, stats = alg.policy_loss(
        logps, tensor("advantages").float(), tensor("mask").float(),
        kl_weights=tensor("kl_weights"), ref_logps=tensor("ref_logps"),
        old_logps=tensor("old_logps"), loss_type=case["loss_type"],
        kl_ratio=case.get("kl_ratio", True),
        num_items=case.get("num_items"), max_completion_length=case.get("max_completion_length"))
    loss.backward()
    assert loss.item() == pytest.approx(case["expected"], abs=1e-7)
    assert logps.grad.tolist() == [pytest.approx(row, abs=1e-7) for row in case["grad"]]
    assert stats["tokens"] == sum(map(sum, case["mask"]))


def test_token_weights_follow_the_method_table():
    stage1 = _methods()["score_stage1"]
    a1, a2, prompt, carried, bridge = (alg.segment_id(s) for s in (
        "attempt1", "attempt2", "prompt", "carried", "bridge"))
    pad = alg.PAD_SEGMENT
    # rollout 0 spans two rows (attempt 1; context + attempt 2), rollout 1 likewise
    segments = torch.tensor([[prompt, a1, a1, pad], [carried, bridge, a2, a2],
                             [prompt, a1, pad, pad], [carried, bridge, a2, pad]])
    rows = torch.tensor([0, 0, 1, 1])
    seg_adv = {"attempt1": torch.tensor([0.0, 0.0]), "attempt2": torch.tensor([0.5, -0.5])}
    adv, kl, mask = alg.token_weights(stage1, segments, rows, seg_adv)
    assert mask.tolist() == [[0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0]]
    assert torch.allclose(kl, torch.tensor(
        [[0, 1, 1, 0], [0, 0, .01, .01], [0, 1, 0, 0], [0, 0, .01, 0]]))
    assert adv.tolist() == [[0, 0, 0, 0], [0, 0, .5, .5], [0, 0, 0, 0], [0, 0, -.5, 0]]


def test_bad_methods_and_inputs_are_user_errors():
    with pytest.raises(UserError, match="unknown segment 'attempt3'"):
        alg.Method("m", 2, {"attempt3": alg.SegmentRule({"r2": 1.0})}).validate()
    with pytest.raises(UserError, match="not sampled by the policy"):
        alg.Method("m", 2, {"bridge": alg.SegmentRule({"r2": 1.0})}).validate()
    with pytest.raises(UserError, match="must be >= 0"):
        alg.make_methods(kl=-0.1, kl_stage1_attempt1=1, kl_stage1_attempt2=0, alpha=1)
    with pytest.raises(UserError, match="unknown reward 'r3'"):
        alg.Method("m", 1, {"attempt1": alg.SegmentRule({"r3": 1.0})}).validate()
    with pytest.raises(UserError, match="leave-one-out"):
        alg.group_advantages([1.0, 0.0], 1, "loo")
    with pytest.raises(UserError, match="unknown loss type"):
        alg.policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), loss_type="x")


def test_token_logps_match_log_softmax(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 9, 11, 20, 7], [3, 4, 8, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    full = alg.token_logps(model, ids, mask, temperature=0.7)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1] / 0.7
    manual = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(full, manual, atol=1e-5)
    assert torch.allclose(alg.token_logps(model, ids, mask, 0.7, first=2), full[:, 2:], atol=1e-5)
