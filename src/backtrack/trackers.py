"""Experiment trackers a stage can stream its log to (`report_to`), shared by train and rl.

The stages hand the name to the library that already integrates it (transformers' Trainer
callbacks for `train`, accelerate's trackers for `rl`); this module only names the choices
and turns a missing package into a one-line error before any training starts.
"""

from __future__ import annotations

import importlib.util

from backtrack.errors import UserError

TRACKERS = ("none", "tensorboard", "trackio", "wandb")
PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "trackio": ("trackio",),
            "wandb": ("wandb",)}


def require_tracker(name: str) -> None:
    """UserError when tracker `name` is unknown or its package is not installed."""
    if name not in TRACKERS:
        raise UserError(f"option 'report_to': unknown tracker '{name}' (known: "
                        f"{', '.join(TRACKERS)})")
    if name == "none":
        return
    packages = PACKAGES[name]
    if not any(importlib.util.find_spec(p) for p in packages):
        raise UserError(f"option 'report_to': {name} needs the package {packages[0]} "
                        f"(pip install {packages[0]})")
