"""The report's view of RL training: reward and attempt accuracies over RL steps, per arm."""

from __future__ import annotations

from pathlib import Path

from backtrack.fileio import read_json
from backtrack.layout import RunLayout

SERIES = (("reward", "reward"), ("accuracy_attempt1", "Acc@t1 (train)"),
          ("accuracy_attempt2", "Acc@t2 (train)"))


def load_logs(layout: RunLayout, names: list[str]) -> dict[str, list[dict]]:
    """`rl_log.json` of every reported arm trained with RL (evaluation names map to arms)."""
    logs = {}
    for name in names:
        arm = name.split("@")[0]
        log = read_json(layout.model(arm) / "rl_log.json")
        if isinstance(log, list) and log and arm not in logs:
            logs[arm] = log
    return logs


def plot(folder: Path, logs: dict[str, list[dict]]) -> str | None:
    """One panel per series, one line per arm; returns the PNG's name."""
    if not logs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SERIES), figsize=(5 * len(SERIES), 3.6))
    for ax, (key, label) in zip(axes, SERIES):
        for arm, log in logs.items():
            points = [(e["step"], e[key]) for e in log if e.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker=".", label=arm)
        ax.set_xlabel("RL step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "rl_curves.png", dpi=100)
    plt.close(fig)
    return "rl_curves.png"
