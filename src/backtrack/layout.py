"""Where each stage writes under `output_dir`: one object, so no stage spells a path twice.

Stages hand off through these folders; the pipeline reads `outputs(config)` of each stage
module (built from this layout) to know what a step wrote, what to set aside when its config
changes, and whether it is still there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    output_dir: Path

    @classmethod
    def of(cls, config) -> RunLayout:
        return cls(Path(config.output_dir))

    @property
    def toy_base(self) -> Path:
        return self.output_dir / "toy_base"  # run.json naming the cached model folder

    @property
    def samples(self) -> Path:
        return self.output_dir / "samples"

    @property
    def backtrack(self) -> Path:
        return self.output_dir / "backtrack"

    @property
    def verify(self) -> Path:
        return self.output_dir / "verify"  # S²R verifications of sample attempts

    @property
    def sft(self) -> Path:
        return self.output_dir / "sft"

    def sft_arm(self, arm: str) -> Path:
        return self.sft / arm

    def model(self, arm: str) -> Path:
        return self.output_dir / "models" / arm

    def checkpoints(self, arm: str) -> Path:
        return self.output_dir / "checkpoints" / arm

    def eval_root(self, split: str = "test") -> Path:
        """`eval/` for the test split; a dev evaluation on train problems goes to `eval_dev/`,
        so it never mixes with (or is read by the report as) the test results."""
        return self.output_dir / ("eval" if split == "test" else "eval_dev")

    def evaluation(self, name: str, split: str = "test") -> Path:
        return self.eval_root(split) / name

    def iteration(self, arm: str, round_: int) -> RunLayout:
        """Round `round_` >= 2 of an iterated arm (iterations.py): a run folder of its own."""
        return RunLayout(self.output_dir / "iterations" / arm / f"iter{round_}")

    def probe(self, arm: str) -> Path:
        return self.output_dir / "probe" / arm

    @property
    def report(self) -> Path:
        return self.output_dir / "report"

    @property
    def markers(self) -> Path:
        return self.output_dir / "run" / "stages"

    @property
    def stale(self) -> Path:
        return self.output_dir / "run" / "stale"

    @property
    def timings(self) -> Path:
        return self.output_dir / "timings.json"


def trained_model_outputs(config) -> list[Path]:
    """What a training step (`train`, `rl`) writes for `config.arm`: the model folder (its
    result) first, then its checkpoints (optional)."""
    layout = RunLayout.of(config)
    return [layout.model(config.arm), layout.checkpoints(config.arm)]


def trained_model_done(config) -> bool:
    """A training step is done while its model folder is complete."""
    return (RunLayout.of(config).model(config.arm) / "config.json").is_file()
