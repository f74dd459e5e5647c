"""cpu_kernel's packed linears (`engines/cpu_linear`): F.linear's products from weights packed
once, packed again when a weight changes, and input a caller got wrong refused in one line."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 128])
@pytest.mark.parametrize("n_in, n_out", [(160, 432), (432, 160), (160, 501), (40, 17), (7, 33),
                                         (385, 48)])
def test_packed_linear_gives_f_linear_products(kernels, rows, n_in, n_out):
    """Rows beyond the 6-row tiles, outputs beyond the panels (17, 33, 501), inputs beyond
    the 192-feature blocks (385, 432), with and without a bias: F.linear's products up to
    float order."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(rows * 1000 + n_in)
    x = torch.randn(rows, n_in, generator=generator)
    weight = torch.randn(n_out, n_in, generator=generator) / n_in ** 0.5
    packed = kernels.pack_linear(weight)
    for bias in (None, torch.randn(n_out, generator=generator)):
        got = kernels.packed_linear(x, packed, bias, n_out)
        assert got.shape == (rows, n_out)
        assert torch.allclose(got, F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)


def test_a_weight_is_packed_once_and_again_after_it_changes(kernels):
    """The RL loop updates the policy's weights in place between engine calls: the next step
    must multiply by the new ones."""
    import torch
    import torch.nn.functional as F

    from backtrack.engines.cpu_linear import PackedLinear, packed_weight

    layer = torch.nn.Linear(16, 24, bias=True)
    x = torch.randn(4, 1, 16)
    first = packed_weight(kernels, layer.weight)
    assert packed_weight(kernels, layer.weight) is first  # kept while unchanged
    with torch.no_grad():
        layer.weight.mul_(2)  # an optimizer step
        got = PackedLinear(kernels, layer.weight, layer.bias)(x)
    assert packed_weight(kernels, layer.weight) is not first
    assert got.shape == (4, 1, 24)
    assert torch.allclose(got, F.linear(x, layer.weight, layer.bias), atol=1e-5)


def test_packed_linear_refuses_a_weight_of_another_width(kernels):
    import torch

    packed = kernels.pack_linear(torch.randn(24, 16))
    with pytest.raises(RuntimeError, match="packed_linear: a contiguous x"):
        kernels.packed_linear(torch.randn(3, 15), packed, None, 24)
    with pytest.raises(RuntimeError, match="packed_linear: x: a Float CPU tensor"):
        kernels.packed_linear(torch.randn(3, 16, dtype=torch.float64), packed, None, 24)


def test_the_step_multiplies_packed_only_with_the_kernel(kernels, tiny_model_dir, monkeypatch):
    """With cpu_kernel the step's plain layers hold packed linears; without it, or with
    `PACKED_LINEARS` off (the benchmark's former lever), F.linear."""
    import functools

    from backtrack.engines import hf_step
    from backtrack.engines.cpu_linear import PackedLinear
    from backtrack.engines.hf import HFEngine

    engine = HFEngine(str(tiny_model_dir), num_threads=1)
    layer = engine.model.model.layers[0]
    assert isinstance(hf_step.PlainLayer(layer, 0, kernels).q, PackedLinear)
    assert isinstance(hf_step.PlainLayer(layer, 0).q, functools.partial)
    built = []
    monkeypatch.setattr(hf_step, "PlainLayer", lambda *args: built.append(args) or args)
    hf_step.shared_prefix_step(engine.model, kernels=kernels)
    hf_step.shared_prefix_step(engine.model)
    monkeypatch.setattr(hf_step, "PACKED_LINEARS", False)
    hf_step.shared_prefix_step(engine.model, kernels=kernels)
    layers = engine.model.config.num_hidden_layers
    assert [args[2] is kernels for args in built] == [True] * layers + [False] * 2 * layers
