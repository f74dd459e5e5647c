"""Muon for a model's hidden matrices and AdamW for the rest, as one optimizer.

Muon (Jordan et al. 2024; Moonshot's "Muon is Scalable for LLM Training", 2025) orthogonalises
each hidden weight matrix's momentum before the step; in small-transformer speedruns it reaches
AdamW's loss in fewer steps. torch ships `torch.optim.Muon`, but only for 2D hidden matrices:
embeddings, the (tied) output head and the norms need AdamW beside it. HF Trainer and its
learning-rate scheduler take one `torch.optim.Optimizer`, and transformers lists no Muon
choice, so this class holds torch's two optimizers under one set of parameter groups and one
state: the scheduler sets every group's `lr`, and Trainer's checkpoints save and restore both
(hand-written because no library we use combines them; the steps themselves are torch's).
"""

from __future__ import annotations

import torch


class MuonWithAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` on the groups built from `muon_params`, `torch.optim.AdamW` on the
    others. Muon uses Moonshot's `match_rms_adamw` learning-rate scaling, so both take the same
    `lr` and `weight_decay` (the AdamW values the toy base was tuned with)."""

    def __init__(self, muon_params, adamw_decay, adamw_no_decay, lr: float,
                 weight_decay: float, betas=(0.9, 0.999), momentum: float = 0.95):
        self._muon = torch.optim.Muon(list(muon_params), lr=lr, weight_decay=weight_decay,
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
        for inner in (self._muon, self._adamw):
            if inner.param_groups:
                inner.step()
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


def muon_with_adamw(model, lr: float, weight_decay: float) -> MuonWithAdamW:
    """The optimizer for `model`: Muon on `hidden_matrices`, AdamW elsewhere, with AdamW's
    weight decay off for vectors (norms, biases), as HF Trainer's default grouping has it."""
    muon_names = set(hidden_matrices(model))
    muon, decay, plain = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        target = muon if name in muon_names else decay if param.ndim >= 2 else plain
        target.append(param)
    return MuonWithAdamW(muon, decay, plain, lr=lr, weight_decay=weight_decay)
