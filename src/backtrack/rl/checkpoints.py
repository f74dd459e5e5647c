"""Checkpoints and the per-step log of the RL stage.

A checkpoint is `accelerate`'s `save_state` (model, optimizer and every process's RNG state)
plus `state.json` (the step count and the log so far), written to `.step-N.tmp` and renamed to
`step-N` only when complete, so every `step-*` folder can be resumed from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from backtrack.fileio import read_json, write_json

STATE_FILE = "state.json"
PLOTTED = (("reward", "reward"), ("accuracy_attempt1", "attempt-1 accuracy"),
           ("accuracy_attempt2", "attempt-2 accuracy"), ("kl", "KL to reference"),
           ("loss", "loss"))


def checkpoints(folder: Path) -> list[Path]:
    """Complete `step-N` folders, oldest first."""
    found = [p for p in folder.glob("step-*")
             if p.is_dir() and p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def prepare_folder(accelerator, folder: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start at step 0). Leftover temp folders are
    removed; without `resume`, old checkpoints are too."""
    if accelerator.is_main_process:
        for tmp in folder.glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        if not resume and folder.exists():
            shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    found = checkpoints(folder) if resume else []
    if resume and not found and accelerator.is_main_process:
        print(f"no checkpoint in {folder}: starting at step 0")
    return found[-1] if found else None


def save(accelerator, folder: Path, step: int, log: list[dict], keep: int) -> None:
    final = folder / f"step-{step}"
    tmp = folder / f".step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, {"step": step, "log": log})
        tmp.rename(final)
        for old in checkpoints(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load(accelerator, checkpoint: Path) -> tuple[int, list[dict]]:
    accelerator.load_state(str(checkpoint))
    state = read_json(checkpoint / STATE_FILE)
    return int(state["step"]), list(state["log"])


def write_log(path: Path, log: list[dict]) -> None:
    write_json(path, log, indent=1)


def plot_log(log: list[dict], path: Path, title: str) -> None:
    """Reward, attempt accuracies, KL and loss over optimizer steps (one panel each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, label) for key, label in PLOTTED
              if any(e.get(key) is not None for e in log)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        points = [(e["step"], e[key]) for e in log if e.get(key) is not None]
        ax.plot([s for s, _ in points], [v for _, v in points], marker=".", lw=1)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(log: list[dict]) -> dict:
    """Totals for run.json: seconds by phase and the share outside generation + fwd/bwd."""
    total = sum(e["seconds_total"] for e in log)
    gen = sum(e["seconds_generation"] for e in log)
    fwd = sum(e["seconds_forward_backward"] for e in log)
    return {"steps_logged": len(log), "seconds_total": total, "seconds_generation": gen,
            "seconds_forward_backward": fwd, "seconds_other": total - gen - fwd,
            "share_other": (total - gen - fwd) / total if total else None,
            "rollouts": sum(e["rollouts"] for e in log),
            "rollouts_per_second": sum(e["rollouts"] for e in log) / total if total else None}


def dumps(entry: dict) -> str:
    return json.dumps(entry, default=str)
