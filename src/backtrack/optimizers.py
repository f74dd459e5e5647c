"""Muon for a model's hidden matrices and AdamW for the rest, as one optimizer.

Muon (Jordan et al. 2024; Moonshot's "Muon is Scalable for LLM Training", 2025) orthogonalises
each hidden weight matrix's momentum before the step; in small-transformer speedruns it reaches
AdamW's loss in fewer steps. torch ships `torch.optim.Muon`, but only for 2D hidden matrices:
embeddings, the (tied) output head and the norms need AdamW beside it. HF Trainer and its
learning-rate scheduler take one `torch.optim.Optimizer`, and transformers lists no Muon
choice, so this class holds torch's two optimizers under one set of parameter groups and one
state: the scheduler sets every group's `lr`, and Trainer's checkpoints save and restore both
(hand-written because no library we use combines them; the steps themselves are torch's).

torch's Muon runs its Newton-Schulz iterations in bfloat16, as Muon's authors do on GPUs. A
CPU without bf16 matrix instructions (AVX2 machines such as Zen 3) multiplies bf16 in ATen's
scalar loop: one 432 x 160 orthogonalisation took 44 ms there against 1.75 ms with AVX512_BF16
and 2.8 ms in float32 (oneDNN limited to AVX2 on the Zen 4 machine, docs/SPEED.md), which
doubled the toy base's step time. So `newton_schulz: auto` keeps bfloat16 where oneDNN multiplies it
natively and runs the same iterations in float32 elsewhere (`float32_newton_schulz`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

NEWTON_SCHULZ = ("auto", "bfloat16", "float32")


def fast_bf16_matmul() -> bool:
    """Whether oneDNN multiplies bfloat16 matrices natively on this CPU (torch's own check)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def newton_schulz_dtype(choice: str, device: str = "cpu") -> str:
    """The dtype Muon orthogonalises in: `choice`, or for "auto" bfloat16 where it is fast
    (off the CPU always: GPUs multiply bf16 natively)."""
    if choice not in NEWTON_SCHULZ:
        raise ValueError(f"newton_schulz: one of {NEWTON_SCHULZ}, got {choice!r}")
    if choice == "auto":
        return "bfloat16" if device != "cpu" or fast_bf16_matmul() else "float32"
    return choice


def _newton_schulz_float32(grad, ns_coefficients, ns_steps: int, eps: float):
    """The quintic Newton-Schulz orthogonalisation torch's Muon runs, in float32: scaled to a
    spectral norm of at most 1 (on the wide orientation), then `ns_steps` times
    X <- a X + (b A + c A^2) X with A = X X^T."""
    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.float().T if tall else grad.float()
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


@contextmanager
def float32_newton_schulz():
    """torch's Muon steps with the orthogonalisation in float32 until exit (its step calls the
    module's `_zeropower_via_newtonschulz`, which casts to bfloat16; torch has no option)."""
    from torch.optim import _muon

    own = _muon._zeropower_via_newtonschulz
    _muon._zeropower_via_newtonschulz = _newton_schulz_float32
    try:
        yield
    finally:
        _muon._zeropower_via_newtonschulz = own


class MuonWithAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` on the groups built from `muon_params`, `torch.optim.AdamW` on the
    others. Muon uses Moonshot's `match_rms_adamw` learning-rate scaling, so both take the same
    `lr` and `weight_decay` (the AdamW values the toy base was tuned with)."""

    def __init__(self, muon_params, adamw_decay, adamw_no_decay, lr: float,
                 weight_decay: float, betas=(0.9, 0.999), momentum: float = 0.95,
                 newton_schulz: str = "auto"):
        muon_params = list(muon_params)
        device = muon_params[0].device.type if muon_params else "cpu"
        self.newton_schulz = newton_schulz_dtype(newton_schulz, device)
        self._muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay,
                                      momentum=momentum, adjust_lr_fn="match_rms_adamw")
        adamw_groups = [{"params": list(adamw_decay), "weight_decay": weight_decay},
                        {"params": list(adamw_no_decay), "weight_decay": 0.0}]
        adamw_groups = [g for g in adamw_groups if g["params"]]
        self._adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas,
                                        weight_decay=weight_decay)
        for group in self._muon.param_groups:
            group["muon"] = True
        for group in self._adamw.param_groups:
            group["muon"] = False
        # The group dicts are the inner optimizers' own (add_param_group keeps the dict), so a
        # scheduler's lr change reaches them.
        super().__init__(self._muon.param_groups + self._adamw.param_groups, defaults={})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this one's groups and state (once at construction,
        again after `load_state_dict`, which replaces both)."""
        for inner, is_muon in ((self._muon, True), (self._adamw, False)):
            inner.param_groups = [g for g in self.param_groups if g["muon"] is is_muon]
            inner.state = self.state

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._muon.param_groups:
            with float32_newton_schulz() if self.newton_schulz == "float32" else nullcontext():
                self._muon.step()
        if self._adamw.param_groups:
            self._adamw.step()
        return loss


def hidden_matrices(model) -> list[str]:
    """Names of the 2D weights inside the transformer blocks (Muon's share): attention and MLP
    projections. Embeddings and the output head (tied here) stay with AdamW, as Muon's
    authors advise."""
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ValueError("muon: the model has no `model.layers` (a decoder-only transformer)")
    names = {id(p) for p in layers.parameters() if p.ndim == 2}
    return [name for name, p in model.named_parameters() if id(p) in names and p.requires_grad]


def muon_with_adamw(model, lr: float, weight_decay: float,
                    newton_schulz: str = "auto") -> MuonWithAdamW:
    """The optimizer for `model`: Muon on `hidden_matrices`, AdamW elsewhere, with AdamW's
    weight decay off for vectors (norms, biases), as HF Trainer's default grouping has it;
    Muon orthogonalising in `newton_schulz` (`newton_schulz_dtype`)."""
    muon_names = set(hidden_matrices(model))
    muon, decay, plain = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        target = muon if name in muon_names else decay if param.ndim >= 2 else plain
        target.append(param)
    return MuonWithAdamW(muon, decay, plain, lr=lr, weight_decay=weight_decay,
                         newton_schulz=newton_schulz)
