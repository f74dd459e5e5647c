"""The decode step's linears on CPU (`cpu_linear.cpp`; with the hf engine's `cpu_kernel`).

A decode step multiplies at most a few hundred rows by each weight. At those shapes torch's
F.linear (MKL's sgemm) re-packs the weight into its panel layout at every call: on the toy
model's [128 x 160] x [160 x 432] products it reached ~75 GFLOP/s on one Zen 4 core where a
kernel reading weights packed once reaches ~92, and MKL's own packed API
(`torch.ops.mkl._mkl_linear`, inductor's) gave no more than F.linear (docs/SPEED.md). So each
weight is packed once (`pack_linear`), kept while the weight is unchanged (its version counter:
an optimizer step or a load re-packs it, as the RL loop needs), and multiplied by
`packed_linear`, whose sums follow MKL's order on AVX-512 (the same floats as F.linear on the
Zen 4 machine from 13 rows up; at fewer rows, or elsewhere, the last bits may differ). The packed
copies hold the model's linear weights a second time in memory (5.3 MB for the toy model).
"""

from __future__ import annotations

import weakref

# id(weight) -> (a weak reference to it, its version when packed, the packed weight)
_PACKED: dict = {}


def packed_weight(kernels, weight):
    """`weight` as `kernels.pack_linear` lays it out, packed again only after it changed."""
    key = id(weight)
    entry = _PACKED.get(key)
    if entry is None or entry[0]() is not weight or entry[1] != weight._version:
        reference = weakref.ref(weight, lambda _, key=key: _PACKED.pop(key, None))
        entry = (reference, weight._version, kernels.pack_linear(weight.detach()))
        _PACKED[key] = entry
    return entry[2]


def supports(weight) -> bool:
    """Whether `packed_linear` computes this nn.Linear weight: float32 on CPU."""
    import torch

    return weight.device.type == "cpu" and weight.dtype == torch.float32


class PackedLinear:
    """F.linear(x, weight, bias) for a decode step, by the packed kernel."""

    def __init__(self, kernels, weight, bias):
        self.kernels, self.bias = kernels, bias
        self.packed, self.out_features = packed_weight(kernels, weight), weight.shape[0]

    def __call__(self, x):
        flat = x.reshape(-1, x.shape[-1])
        out = self.kernels.packed_linear(flat, self.packed, self.bias, self.out_features)
        return out.view(*x.shape[:-1], self.out_features)
