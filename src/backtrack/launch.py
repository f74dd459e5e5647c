"""Training steps of `backtrack run` under `accelerate launch` (multi-GPU).

A multi-process launch cannot happen inside the `run` process, so with `accelerate_config`
set the plan's `train` / `rl` steps run the stage's CLI as a subprocess (`pipeline.plan`).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from backtrack.errors import UserError


def accelerate_launcher(config, source: str, shared: dict,
                        stage: str = "train") -> Callable[[Any], None]:
    """A step's `run` that runs `backtrack <stage>` under `accelerate launch` with the run's
    `accelerate_config` (one process per GPU): the recipe `source`, the shared overrides,
    and a later round's own output_dir, model and seed."""
    import subprocess
    import sys

    def launch(train_config) -> None:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   config.accelerate_config, "-m", "backtrack.cli", stage, "--arm",
                   train_config.arm, "--resume", str(train_config.resume).lower()]
        if source:
            command += ["--config", source]
        values = dict(shared)
        if train_config.output_dir != config.output_dir:  # a later round (iterations.py)
            values.update({k: getattr(train_config, k) for k in ("output_dir", "model", "seed")})
        for key, value in values.items():
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            command += ["--" + key.replace("_", "-"), text]
        print("[run] " + " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            raise UserError(f"training arm '{train_config.arm}' under accelerate failed "
                            "(see its output above)")

    return launch
