"""On-policy rounds (expert iteration): sample -> backtrack -> build -> train, R times.

With the top-level recipe key `iterations: R` (default 1; not `backtrack.rounds`, which counts
continuations of one wrong trace) every selected SFT arm that trains on its own samples of
the recipe's model (rft, rft_bt, rft_fix, rft_bt_confirm, s2r_sft) runs R rounds. Round 1 is
the ordinary run: samples of the recipe's model in `samples/`, shared with runs without
iterations. Round r >= 2 of arm X samples the train split again with X's round r-1 model,
backtracks (when X reads backtracking), verifies (when X reads verify), builds X's data alone
and fine-tunes round r-1's model on it, all in `<output_dir>/iterations/X/iter<r>/`
(samples/, backtrack/, verify/, sft/X/, models/X/).

A round is made by the ordinary stages with `output_dir` set to its folder and `model` to the
previous round's model folder, so no stage knows about iterations. Each round draws its own
samples: its steps' seed is `derive_seed(seed, "iteration", r)`, since a model close to the
previous round's, sampled with the same random stream, would mostly repeat its samples. A
round's step digest leaves out `model` (a path inside the run; the step that made it is in
its upstream), so identical rounds of two runs of a study share one computation. X's
evaluations read the last round's model (`eval.arm_models`), and the report records each
round's model and yield (`summary`). An arm that trains on top of an iterated arm (RL on
rft_bt, s2r on s2r_sft) is refused rather than silently started from round 1.
"""

from __future__ import annotations

import os
from pathlib import Path

from backtrack.errors import UserError
from backtrack.fileio import read_json
from backtrack.layout import RunLayout


def iterable(arm) -> bool:
    """An arm that can iterate: SFT on data it samples itself, from the recipe's model."""
    from backtrack.arms import model_source

    return (arm.training == "sft" and "sample" in arm.reads
            and (arm.parent is None or model_source(arm.parent) is None))


def iterated_arms(arms: list, iterations: int) -> list[str]:
    """The names of the selected arms (registry entries) that run `iterations` rounds."""
    from backtrack.arms import lineage

    if iterations < 1:
        raise UserError(f"option 'iterations': must be at least 1 (got {iterations})")
    if iterations == 1:
        return []
    names = [arm.name for arm in arms if iterable(arm)]
    if not names:
        raise UserError(f"option 'iterations': {iterations} rounds, but none of the arms "
                        f"{[a.name for a in arms]} trains with SFT on its own samples "
                        "(e.g. rft, rft_bt)")
    for arm in arms:
        above = [a.name for a in lineage(arm.name)[1:] if a.name in names]
        if arm.training and above:
            raise UserError(f"option 'iterations': arm '{arm.name}' trains on top of "
                            f"'{above[0]}', which iterates; evaluate it in a run without "
                            "iterations")
    return names


def train_step(arm: str, round_: int) -> str:
    """The name of the step that trains round `round_` of `arm`."""
    return f"train_{arm}" if round_ == 1 else f"train_{arm}_iter{round_}"


def round_layout(layout: RunLayout, arm: str, round_: int) -> RunLayout:
    return layout if round_ == 1 else layout.iteration(arm, round_)


def model_dir(layout: RunLayout, arm: str, round_: int) -> str:
    """Round `round_`'s model of `arm`, as an absolute path: it is handed to stages as their
    `model`, and a relative `a/b` would read as a hub id while the folder is missing."""
    return os.path.abspath(round_layout(layout, arm, round_).model(arm))


def round_specs(layout: RunLayout, arm, round_: int) -> list[tuple[str, str, list, dict]]:
    """(name, stage, deps, options) of the steps of round `round_` >= 2 of `arm`."""
    prev = train_step(arm.name, round_ - 1)
    where = {"output_dir": str(round_layout(layout, arm.name, round_).output_dir),
             "model": model_dir(layout, arm.name, round_ - 1)}
    suffix = f"{arm.name}_iter{round_}"
    specs = [(f"sample_{suffix}", "sample", [prev], where)]
    if "backtrack" in arm.reads:
        specs.append((f"backtrack_{suffix}", "backtrack", [specs[-1][0]], where))
    upstream = [specs[-1][0]]
    if "verify" in arm.reads:  # as pipeline._data_steps: build reads backtrack and verify
        specs.append((f"verify_{suffix}", "verify", [specs[0][0]], where))
        upstream = [name for name in upstream if name != specs[0][0]] + [specs[-1][0]]
    specs.append((f"build_{suffix}", "build", upstream, {**where, "arms": [arm.name]}))
    specs.append((train_step(arm.name, round_), "train", [specs[-1][0], prev],
                  {**where, "arm": arm.name, **arm.train_args}))
    return specs


def round_seed(seed: int, round_: int) -> int:
    from backtrack.engines import derive_seed

    return seed if round_ == 1 else derive_seed(seed, "iteration", round_)


def later_rounds(config, arm, own_args: dict, step, train) -> list:
    """The pipeline steps of rounds 2..R of `arm`: `step(name, stage, deps, args, **options)`
    makes a data step, `train(deps, name, args, options)` its training step; `own_args` are
    the upstream options this arm alone needs. Each gets its round's seed, and a digest
    without the previous round's model path."""
    import dataclasses

    steps = []
    for round_ in range(2, config.iterations + 1):
        for name, stage, deps, extra in round_specs(RunLayout.of(config), arm, round_):
            made = (train(deps, name, own_args, extra) if stage == "train"
                    else step(name, stage, deps, args=own_args, **extra))
            made.config = dataclasses.replace(made.config,
                                              seed=round_seed(made.config.seed, round_))
            made.unhashed = ("model",)
            steps.append(made)
    return steps


def _round_record(layout: RunLayout, arm: str, round_: int) -> dict:
    """What round `round_` of `arm` sampled from, how much data it yielded, what it trained."""
    folder = round_layout(layout, arm, round_)
    sample = read_json(folder.samples / "summary.json") or {}
    backtrack = read_json(folder.backtrack / "summary.json")
    sft = ((read_json(folder.sft / "stats.json") or {}).get("arms") or {}).get(arm) or {}
    losses = read_json(folder.model(arm) / "loss.json") or []
    record = {
        "iteration": round_,
        "sampled_from": (read_json(folder.samples / "run.json") or {}).get("model_path"),
        "model": str(folder.model(arm)),
        "sample": {k: sample.get(k) for k in ("samples", "correct", "accuracy",
                                              "problems_solved")},
        "sft": {k: sft.get(k) for k in ("examples", "problems", "sources")},
        "final_train_loss": losses[-1].get("loss") if losses else None,
    }
    if backtrack is not None and folder.backtrack.is_dir():
        record["backtrack"] = {k: backtrack.get(k) for k in ("wrong_samples", "continuations",
                                                             "final_correct", "wrong_to_right")}
    return record


def summary(output_dir: Path, evaluations: list[str], iterations: int) -> dict:
    """{arm: one record per round} for the iterated arms among the evaluations' arms."""
    from backtrack.arms import parse_evaluation, required_arms

    if iterations <= 1:
        return {}
    arms = required_arms([parse_evaluation(e).arm.name for e in evaluations])
    layout = RunLayout(Path(output_dir))
    return {arm: [_round_record(layout, arm, r) for r in range(1, iterations + 1)]
            for arm in iterated_arms(arms, iterations)}


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def markdown(rounds: dict | None) -> list[str]:
    """The report's section on the rounds of each iterated arm (empty without iterations)."""
    if not rounds:
        return []
    lines = ["## Iterations (on-policy rounds)", "",
             "Round r samples the train split with round r-1's model of the arm and fine-tunes "
             "that model on the data it yields; the tables above evaluate the last round's "
             "model. Sample accuracy and wrong->right in %.", "",
             "| arm | round | sample acc. | wrong->right | SFT examples | final loss | model |",
             "|---|---|---|---|---|---|---|"]
    for arm, records in rounds.items():
        for r in records:
            loss = r["final_train_loss"]
            lines.append(
                f"| {arm} | {r['iteration']} | {_percent(r['sample'].get('accuracy'))} | "
                f"{_percent((r.get('backtrack') or {}).get('wrong_to_right'))} | "
                f"{r['sft'].get('examples') or ''} | {'' if loss is None else f'{loss:.4f}'} | "
                f"{r['model']} |")
    return lines + [""]
