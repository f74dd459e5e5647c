"""MuonWithAdamW: Muon on the blocks' matrices, AdamW on the rest, one optimizer for Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from backtrack import optimizers
from backtrack.optimizers import hidden_matrices, muon_with_adamw


def _tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                        intermediate_size=24, num_attention_heads=2,
                                        num_key_value_heads=2, tie_word_embeddings=True))


def _step(model, optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (3, 9), generator=generator)
    optimizer.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = _tiny_llama()
    names = set(hidden_matrices(model))
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in names)
    optimizer = muon_with_adamw(model, lr=1e-2, weight_decay=0.01)
    muon = [p for g in optimizer.param_groups if g["muon"] for p in g["params"]]
    adamw = [p for g in optimizer.param_groups if not g["muon"] for p in g["params"]]
    assert {id(p) for p in muon} == {id(p) for n, p in model.named_parameters() if n in names}
    assert model.model.embed_tokens.weight in adamw  # the tied head with it
    assert len(muon) + len(adamw) == len(list(model.parameters()))


def test_one_step_changes_every_parameter_and_muons_own_update():
    """Every parameter moves, and a block matrix moves exactly as torch's Muon alone moves it."""
    model = _tiny_llama()
    before = copy.deepcopy(model)
    _step(model, muon_with_adamw(model, lr=1e-2, weight_decay=0.0, newton_schulz="bfloat16"),
          seed=1)
    for (name, old), new in zip(before.named_parameters(), model.parameters()):
        assert not torch.equal(old, new), name

    reference = copy.deepcopy(before)
    weight = reference.model.layers[0].mlp.up_proj.weight
    alone = torch.optim.Muon([weight], lr=1e-2, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    _step(reference, alone, seed=1)
    torch.testing.assert_close(weight, model.model.layers[0].mlp.up_proj.weight, rtol=0, atol=0)


def test_a_scheduler_reaches_both_optimizers():
    """A learning rate of 0 from the scheduler leaves every parameter where it was."""
    model = _tiny_llama()
    before = copy.deepcopy(model)
    optimizer = muon_with_adamw(model, lr=1e-2, weight_decay=0.1)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)
    _step(model, optimizer, seed=2)
    for (name, old), new in zip(before.named_parameters(), model.parameters()):
        assert torch.equal(old, new), name


@pytest.mark.parametrize("at", [1, 2])
def test_state_dict_round_trip_continues_bitwise(at):
    """Saved after `at` steps and loaded into a fresh optimizer (as Trainer resumes), the next
    steps equal the uninterrupted run's: Muon's momentum and AdamW's moments both come back."""
    model = _tiny_llama()
    optimizer = muon_with_adamw(model, lr=1e-2, weight_decay=0.01)
    for seed in range(at):
        _step(model, optimizer, seed)
    saved_model, saved_state = copy.deepcopy(model), copy.deepcopy(optimizer.state_dict())
    for seed in range(at, 4):
        _step(model, optimizer, seed)

    resumed = saved_model
    fresh = muon_with_adamw(resumed, lr=1e-2, weight_decay=0.01)
    fresh.load_state_dict(saved_state)
    for seed in range(at, 4):
        _step(resumed, fresh, seed)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (432, 160)])
def test_float32_newton_schulz_orthogonalises_as_torchs_bfloat16_one(shape):
    """The same iterations: torch's bf16 result within bf16 rounding, singular values in the
    band Muon's quintic leaves them (~0.5-1.5 rather than 1)."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _zeropower_via_newtonschulz

    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    args = ((DEFAULT_A, DEFAULT_B, DEFAULT_C), 5, 1e-7)
    ours = optimizers._newton_schulz_float32(grad, *args)
    assert ours.dtype == torch.float32 and ours.shape == grad.shape
    torch.testing.assert_close(ours, _zeropower_via_newtonschulz(grad, *args).float(),
                               rtol=0, atol=0.03)
    singular = torch.linalg.svdvals(ours)
    assert 0.4 < float(singular.min()) and float(singular.max()) < 1.6


def test_newton_schulz_auto_is_bfloat16_only_where_the_cpu_multiplies_it(monkeypatch):
    monkeypatch.setattr(optimizers, "fast_bf16_matmul", lambda: False)
    assert optimizers.newton_schulz_dtype("auto") == "float32"
    assert optimizers.newton_schulz_dtype("auto", "cuda") == "bfloat16"  # GPUs: torch's
    model = _tiny_llama()
    assert muon_with_adamw(model, lr=1e-2, weight_decay=0.0).newton_schulz == "float32"
    assert optimizers.newton_schulz_dtype("bfloat16") == "bfloat16"
    monkeypatch.setattr(optimizers, "fast_bf16_matmul", lambda: True)
    assert optimizers.newton_schulz_dtype("auto") == "bfloat16"
    assert optimizers.newton_schulz_dtype("float32") == "float32"
    with pytest.raises(ValueError, match="newton_schulz"):
        optimizers.newton_schulz_dtype("fp8")


def test_a_float32_step_orthogonalises_in_float32_then_gives_torch_its_own_back():
    """A block matrix moves as torch's Muon moves it with float32 iterations, not as with
    bf16 ones, and torch's function is back after the step."""
    from torch.optim import _muon

    own = _muon._zeropower_via_newtonschulz
    before = _tiny_llama()
    moved = {}
    for dtype in ("float32", "bfloat16"):
        model = copy.deepcopy(before)
        _step(model, muon_with_adamw(model, lr=1e-2, weight_decay=0.0, newton_schulz=dtype), 1)
        moved[dtype] = model.model.layers[0].mlp.up_proj.weight
    assert _muon._zeropower_via_newtonschulz is own
    reference = copy.deepcopy(before)
    weight = reference.model.layers[0].mlp.up_proj.weight
    alone = torch.optim.Muon([weight], lr=1e-2, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    with optimizers.float32_newton_schulz():
        _step(reference, alone, seed=1)
    torch.testing.assert_close(weight, moved["float32"], rtol=0, atol=0)
    assert not torch.equal(moved["float32"], moved["bfloat16"])
