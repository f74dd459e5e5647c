"""Running each group's shared prompt once gives the plain per-row forward's log-probs and
gradients (`backtrack.rl.shared_forward` against `algorithm.token_logps`, itself anchored to
TRL GRPOTrainer in test_rl_trl_parity.py)."""

from __future__ import annotations

import torch

from backtrack.rl import algorithm as alg
from backtrack.rl.rollout import Row
from backtrack.rl.shared_forward import shared_batch, shared_logps

P, A1, CARRIED, BRIDGE, A2 = (alg.segment_id(s) for s in alg.SEGMENTS[:5])


def _rows() -> tuple[list[Row], list[int]]:
    """Three groups: 3 single-attempt rows whose completions share their first two tokens
    (trained tokens: the shared prefix stops a token before them), 2 rows of another prompt
    length, and one two-attempt rollout whose attempt-2 row shares only the prompt with its
    attempt-1 row."""
    gen = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(10, 300, (n,), generator=gen).tolist()

    rows, groups = [], []
    prompt, lead = ids(7), ids(2)
    for k, size in enumerate((5, 2, 4)):
        rows.append(Row(prompt + lead + ids(size), [P] * 7 + [A1] * (2 + size), k))
        groups.append(0)
    prompt = ids(4)
    for k, size in enumerate((6, 3)):  # with process-reward steps: two steps per completion
        rows.append(Row(prompt + ids(size), [P] * 4 + [A1] * size, 3 + k,
                        [-1] * 4 + [0] * (size // 2) + [1] * (size - size // 2)))
        groups.append(1)
    prompt, first = ids(9), ids(4)
    rows.append(Row(prompt + first, [P] * 9 + [A1] * 4, 5))
    rows.append(Row(prompt + first[:3] + ids(2) + ids(5),
                    [P] * 9 + [CARRIED] * 3 + [BRIDGE] * 2 + [A2] * 5, 5))
    groups += [2, 2]
    return rows, groups


def _dense(batch, logps, width):
    """Shared log-probs placed at plain-forward target positions [B, width]."""
    out = torch.zeros(logps.size(0), width)
    for i, start in enumerate(batch.positions[:, 0].tolist()):
        size = int(batch.suffix_mask[i].sum()) - 1
        out[i, start:start + size] = logps[i, :size]
    return out


def test_shared_prompt_forward_equals_the_plain_forward(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    rows, groups = _rows()
    trained = {A1, A2}
    plain_batch = shared_batch(rows, groups, trained, pad_id=0, share=False)
    ids, mask, targets = plain_batch.suffix_ids, plain_batch.suffix_mask, plain_batch.targets
    scored = sum(targets == s for s in trained).bool().float()
    weights = torch.rand(scored.shape) * scored

    plain = alg.token_logps(model, ids, mask, temperature=0.7)
    (plain * weights).sum().backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    batch = shared_batch(rows, groups, trained, pad_id=0)
    assert batch.positions[:, 0].tolist() == [6, 6, 6, 3, 3, 8, 8]  # a token before A1
    assert batch.prefix_ids.shape == (3, 8) and batch.owner.tolist() == [0, 0, 0, 1, 1, 2, 2]
    logps = shared_logps(model, batch, temperature=0.7)
    dense = _dense(batch, logps, plain.size(1))
    assert torch.allclose(dense * scored, plain * scored, atol=1e-5)
    (dense * weights).sum().backward()
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, plain_grads[name], atol=1e-5), name
    # the realigned segments are the plain targets' segments
    realigned = _dense(batch, batch.targets.float(), plain.size(1))
    assert torch.equal(realigned * scored, targets.float() * scored)
    steps = _dense(batch, batch.steps.float(), plain.size(1))
    assert torch.equal(steps * scored, plain_batch.steps.float() * scored)
    assert plain_batch.steps[3].tolist()[:8] == [-1, -1, -1, 0, 0, 0, 1, 1]


def test_no_sharing_is_the_plain_layout():
    rows, groups = _rows()
    batch = shared_batch(rows, groups, {A1, A2}, pad_id=0, share=False)
    assert batch.prefix_ids.size(1) == 0
    for i, row in enumerate(rows):
        size = len(row.ids)
        assert batch.suffix_ids[i, :size].tolist() == row.ids
        assert batch.suffix_ids[i, size:].eq(0).all() and batch.suffix_mask[i].sum() == size
        assert batch.targets[i, :size - 1].tolist() == row.segments[1:]
        assert batch.positions[i].tolist() == list(range(batch.suffix_ids.size(1)))


def test_length_buckets_group_rows_of_similar_length():
    from backtrack.rl.shared_forward import length_buckets

    lengths = [30, 90, 31, 88, 29, 95, 33, 91]
    buckets = length_buckets(lengths, most=2)
    assert [sorted(lengths[i] for i in b) for b in buckets] == [[29, 30, 31, 33], [88, 90, 91, 95]]
    assert sorted(i for b in length_buckets(lengths) for i in b) == list(range(8))
    assert length_buckets([5, 6], most=4) == [[0], [1]]
