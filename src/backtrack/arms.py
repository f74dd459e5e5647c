"""Arms as data: every method is an entry of one registry, run through the same pipeline.

An arm says how its model is produced (which SFT data it builds, which training step, from
which parent arm's model), how it is evaluated (its protocol) and what the report compares it
with. The pipeline plan, `backtrack eval`, the report and the CLI loop over this registry, so a
new method is one new module in `backtrack/methods/` that calls `register(Arm(...))`; no
stage has an `if arm == ...` branch. Built-in arms: `backtrack arms`.

An evaluation is an arm under a protocol: `rft` is `rft` under its own protocol (`single`),
`base@two_attempt` is the base model under SCoRe's two-attempt protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from backtrack.errors import UserError

TRAININGS = ("sft", "rl")  # training steps an arm can take (stage `train` or `rl`)


@dataclass(frozen=True)
class Arm:
    name: str
    summary: str  # one line, shown by `backtrack arms`
    parent: str | None = "base"  # arm whose model this one starts from; None = the recipe's model
    training: str | None = None  # "sft", "rl" or None (evaluates its parent's model as it is)
    build: Callable | None = None  # SFT data: build(context) -> (examples, info); see build.py
    reads: tuple[str, ...] = ()  # stages whose records `build` reads (sample, backtrack, verify)
    train_args: dict = field(default_factory=dict)  # fixed options of its training step
    # options it needs from upstream steps, e.g. {"backtrack": {"confirm": 1000}}; the plan
    # gives a step the largest value any selected arm asks for (a recipe value wins over it)
    stage_args: dict = field(default_factory=dict)
    protocol: str = "single"  # how it is evaluated (see protocols.py)
    compare_with: tuple[str, ...] = ()  # arms the report tests it against, headline first

    def __post_init__(self) -> None:
        if self.training not in (None, *TRAININGS):
            raise ValueError(f"arm {self.name}: training must be one of {TRAININGS} or None")
        if self.training == "sft" and self.build is None:
            raise ValueError(f"arm {self.name}: an SFT arm needs a `build` function")


ARMS: dict[str, Arm] = {}


def register(arm: Arm) -> Arm:
    """Add an arm to the registry (a later registration of the same name replaces it)."""
    ARMS[arm.name] = arm
    return arm


def load_methods() -> None:
    """Import the built-in method modules, which register their arms."""
    import backtrack.methods  # noqa: F401


def arm_names() -> list[str]:
    load_methods()
    return list(ARMS)


def get_arm(name: str) -> Arm:
    load_methods()
    if name not in ARMS:
        raise UserError(f"unknown arm '{name}' (known: {', '.join(ARMS)}; `backtrack arms` "
                        "lists them)")
    return ARMS[name]


def lineage(name: str) -> list[Arm]:
    """The arm and its ancestors, nearest first (`rl on rft_bt` -> [it, rft_bt, base])."""
    chain, seen = [], set()
    arm: Arm | None = get_arm(name)
    while arm is not None:
        if arm.name in seen:
            raise UserError(f"arm '{name}': its parents form a cycle ({' -> '.join(seen)})")
        seen.add(arm.name)
        chain.append(arm)
        arm = get_arm(arm.parent) if arm.parent else None
    return chain


def model_source(name: str) -> Arm | None:
    """The nearest arm in the lineage that trains a model; None = the recipe's base model."""
    return next((arm for arm in lineage(name) if arm.training), None)


def required_arms(names: list[str]) -> list[Arm]:
    """Every arm the given ones need (themselves and their ancestors), parents first."""
    ordered: list[Arm] = []
    for name in names:
        for arm in reversed(lineage(name)):
            if arm not in ordered:
                ordered.append(arm)
    return ordered


@dataclass(frozen=True)
class Evaluation:
    """An arm under a protocol; `name` is its folder under eval/ and its row in the report."""

    arm: Arm
    protocol: str

    @property
    def name(self) -> str:
        return self.arm.name if self.protocol == self.arm.protocol else \
            f"{self.arm.name}@{self.protocol}"


def parse_evaluation(entry: str) -> Evaluation:
    """`arm` (its own protocol) or `arm@protocol`; unknown names are one-line errors."""
    from backtrack.protocols import get_protocol

    name, _, protocol = str(entry).partition("@")
    arm = get_arm(name.strip())
    return Evaluation(arm, get_protocol(protocol.strip() or arm.protocol).name)


def validate_evaluations(entries: list, where: str = "option 'arms'") -> list[Evaluation]:
    if not entries:
        raise UserError(f"{where}: give at least one arm (known: {', '.join(arm_names())})")
    try:
        return [parse_evaluation(e) for e in entries]
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from exc


def describe() -> list[str]:
    """One line per arm: name, how its model is made, its protocol, its summary."""
    lines = []
    for name in arm_names():
        arm = ARMS[name]
        made = f"{arm.training} from {arm.parent}" if arm.training else (
            f"model of {arm.parent}" if arm.parent else "the recipe's model")
        lines.append(f"{name:16s} {made:22s} [{arm.protocol}] {arm.summary}")
    return lines


def model_path(name: str, model: str, output_dir: str, arm_models: dict | None = None) -> str:
    """The model folder an arm is evaluated with: its own trained model, the nearest trained
    ancestor's, or the recipe's base model (alias resolved); `arm_models` names another
    folder for a trained arm (an iterated arm's last round)."""
    from pathlib import Path

    from backtrack.layout import RunLayout
    from backtrack.models import resolve_model_path

    source = model_source(name)
    if source is None:
        return resolve_model_path(model, output_dir)
    path = Path((arm_models or {}).get(source.name) or RunLayout(Path(output_dir)).model(
        source.name))
    if not (path / "config.json").is_file():
        command = "train" if source.training == "sft" else "rl"
        raise UserError(f"{path}: no trained model for arm '{source.name}'; run `backtrack "
                        f"{command} --arm {source.name}` first")
    return str(path)


def parent_model_path(name: str, model: str, output_dir: str) -> str:
    """The model an arm's training starts from (its parent's model)."""
    arm = get_arm(name)
    if arm.parent is None:
        from backtrack.models import resolve_model_path

        return resolve_model_path(model, output_dir)
    return model_path(arm.parent, model, output_dir)
