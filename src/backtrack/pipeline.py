"""`backtrack run`: the whole experiment from one recipe, resumable step by step.

The plan comes from the arms registry: the recipe's `arms` (evaluations, e.g. `[base, rft,
rft_bt, budget_forcing]`) pull in the arms they need and their parents; the toy base runs when
`model: toy`; sample / backtrack / verify run when an arm's data reads them; build writes
every SFT arm's data; each trained arm gets one training step (`train` for SFT, `rl` for RL) from its parent's
model; every evaluation gets an eval step; the report reads them all. Each step's config is
resolved from the same recipe as its own subcommand would (top-level keys, then its section),
and the shared options given on the command line (`--seed`, `--output-dir`, ...) apply to
every step.

A step counts as done when `<output_dir>/run/stages/<step>.json` holds the hash of its config's
hashed fields (`config.option(hashed=...)`) and of the steps it reads from, and its outputs
(`outputs(config)` / `done(config)` of the stage module) are still there; the marker is written
only after the step returns, so an interrupted step runs again (record stores resume record by
record, training from its last checkpoint). A changed config re-runs the step and everything
downstream of it, after moving its old outputs to `run/stale/`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from backtrack.config import (CommonConfig, hashed_values, option, read_recipe, resolve,
                              unread_fields)
from backtrack.errors import UserError
from backtrack.fileio import read_json, write_json
from backtrack.layout import RunLayout
from backtrack.share import SHARED_STAGES, StepShare

ALL_STAGES = ("toy_base", "sample", "backtrack", "verify", "build", "train", "rl", "eval",
              "report")
EMBEDDED_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "toy.yaml"
# stage -> (module, config class); a training kind of the registry is a stage name
STAGE_MODULES = {
    "toy_base": ("backtrack.toy_base", "ToyBaseConfig"),
    "sample": ("backtrack.sample", "SampleConfig"),
    "backtrack": ("backtrack.backtracking", "BacktrackConfig"),
    "verify": ("backtrack.verifying", "VerifyConfig"),
    "build": ("backtrack.build", "BuildConfig"),
    "train": ("backtrack.train", "TrainConfig"),
    "rl": ("backtrack.rl.stage", "RLConfig"),
    "eval": ("backtrack.evaluate", "EvalConfig"),
    "report": ("backtrack.report", "ReportConfig"),
}
TRAINING_STAGES = {"sft": "train", "rl": "rl"}


@dataclass
class RunConfig(CommonConfig):
    """Run every step of the experiment from one recipe, skipping steps already done."""

    arms: list = option(["base", "rft", "rft_bt", "budget_forcing"], "Evaluations to run and "
                        "report: arm names (`backtrack arms`) or arm@protocol.")
    iterations: int = option(1, "On-policy rounds (expert iteration): an SFT arm that trains "
                             "on its own samples is made this many times, each round sampling, "
                             "backtracking, building and training from the previous round's "
                             "model; its evaluations use the last round's (iterations.py).")
    stages: list = option(list(ALL_STAGES), "Stages to run, in pipeline order (others are "
                          "assumed done).", hashed=False)
    force: bool = option(False, "Re-run the selected stages even when their output exists.",
                         hashed=False)
    jobs: int = option(1, "Steps run at once: with N > 1, steps whose inputs are ready (the "
                       "arms' trainings, their evaluations) run side by side in N processes, "
                       "the CPU threads split between them (pipeline_jobs.py).", hashed=False)
    accelerate_config: str = option("", "Run the train steps as `accelerate launch "
                                    "--config_file <this>` subprocesses (multi-GPU); empty = "
                                    "in this process.", hashed=False)

    def validate(self) -> None:
        from backtrack.arms import required_arms, validate_evaluations
        from backtrack.iterations import iterated_arms

        unknown = [s for s in self.stages if s not in ALL_STAGES]
        if unknown:
            raise UserError(f"option 'stages': unknown stage(s) {unknown} (known: "
                            f"{list(ALL_STAGES)})")
        if self.jobs < 1:
            raise UserError("option 'jobs': must be at least 1")
        if self.jobs > 1 and self.accelerate_config:
            raise UserError("option 'jobs': set it to 1 with accelerate_config (the trainings "
                            "then run on every GPU, one at a time)")
        evaluations = validate_evaluations(self.arms)
        iterated_arms(required_arms([e.arm.name for e in evaluations]), self.iterations)


@dataclass
class Step:
    """One unit of work: a stage main with its resolved config and the steps it reads from."""

    name: str
    stage: str
    config: Any
    run: Callable[[Any], Any]
    deps: list[str]
    unhashed: tuple[str, ...] = ()  # config fields left out of its digest (see step_digests)

    @property
    def module(self):
        return importlib.import_module(STAGE_MODULES[self.stage][0])

    def outputs(self) -> list[Path]:
        return self.module.outputs(self.config)

    def done(self) -> bool:
        """Whether its outputs are still there (a cleaned cache or folder means re-run)."""
        check = getattr(self.module, "done", None)
        return check(self.config) if check else all(p.exists() for p in self.outputs())


def resolve_run(recipe_path: str | None, overrides: dict) -> tuple[RunConfig, dict, str, dict]:
    """The run config, the recipe, its name and the shared overrides, from what the CLI got.

    Without a recipe path the embedded toy recipe applies. Shared overrides are the
    CommonConfig fields given on the command line; they reach every step.
    """
    if recipe_path:
        recipe, source = read_recipe(recipe_path), str(recipe_path)
    elif EMBEDDED_RECIPE.is_file():
        recipe, source = read_recipe(EMBEDDED_RECIPE), str(EMBEDDED_RECIPE)
    else:
        recipe, source = {}, "defaults"
    return resolve_recipe(recipe, source, overrides)


def resolve_recipe(recipe: dict, source: str, overrides: dict
                   ) -> tuple[RunConfig, dict, str, dict]:
    """`resolve_run` for a recipe mapping already in hand (a study's merged recipes)."""
    config = resolve(RunConfig, recipe, "run", overrides, source=source)
    common = {f.name for f in dataclasses.fields(CommonConfig)}
    shared = {k: v for k, v in overrides.items() if k in common}
    return config, recipe, source if recipe else "", shared


def plan(config: RunConfig, recipe: dict, source: str, shared: dict) -> list[Step]:
    """The steps of the experiment with configs resolved from the recipe and the registry."""
    from backtrack.arms import model_source, parse_evaluation, required_arms
    from backtrack.iterations import iterated_arms, later_rounds, model_dir, train_step

    evaluations = [parse_evaluation(e) for e in config.arms]
    arms = required_arms([e.arm.name for e in evaluations])
    iterated = iterated_arms(arms, config.iterations)
    last = {name: config.iterations for name in iterated}  # the round whose model counts

    def cfg(stage, **extra):
        module, cls_name = STAGE_MODULES[stage]
        cls = getattr(importlib.import_module(module), cls_name)
        return resolve(cls, recipe, stage, {**shared, **extra}, source=source or "defaults")

    def stage_args(selected: list) -> dict[str, dict]:
        args = _stage_args(selected, recipe)
        verified = [a.name for a in selected if "verify" in a.reads]
        if verified:  # the cues of those arms' S²R data (build.s2r)
            from backtrack.verifying import plan_options

            args.setdefault("verify", {}).update(plan_options(cfg("build", arms=verified),
                                                              recipe))
        return args

    needed = stage_args(arms)

    def step(name, stage, deps, args=None, **extra):
        conf = cfg(stage, **{**(needed if args is None else args).get(stage, {}), **extra})
        return Step(name, stage, conf, getattr(importlib.import_module(
            STAGE_MODULES[stage][0]), "main"), deps)

    base = ["toy_base"] if config.model == "toy" else []

    def model_step(arm_name: str) -> list[str]:
        source = model_source(arm_name)
        return [train_step(source.name, last.get(source.name, 1))] if source else base

    steps = [step("toy_base", "toy_base", [])] if base else []
    steps += _data_steps(arms, step, base)
    for stage in {TRAINING_STAGES[a.training] for a in arms if a.training}:
        cfg(stage)  # the recipe's own section must be valid, even where an arm fixes a key
    for arm in (a for a in arms if a.training):
        deps = (["build"] if arm.build else []) + (model_step(arm.parent) if arm.parent else base)
        steps.append(_training_step(config, source, shared, step, arm, deps))
        if arm.name in iterated:
            train = functools.partial(_training_step, config, source, shared, step, arm)
            steps += later_rounds(config, arm, stage_args([arm]), step, train)
    layout = RunLayout.of(config)
    for evaluation in evaluations:
        origin = model_source(evaluation.arm.name)
        models = ({origin.name: model_dir(layout, origin.name, last[origin.name])}
                  if origin and origin.name in last else {})
        steps.append(step(f"eval_{evaluation.name}", "eval", model_step(evaluation.arm.name),
                          arms=[evaluation.name], arm_models=models))
    steps.append(step("report", "report", [f"eval_{e.name}" for e in evaluations],
                      arms=[e.name for e in evaluations], iterations=config.iterations))
    return steps


def _data_steps(arms: list, step: Callable, base: list[str]) -> list[Step]:
    """sample / backtrack / verify when an arm's data reads them, and one build step for every
    SFT arm. The build reads the last of them, and also verify when that is planned (so a
    plan without verify keeps the digests it had before the stage existed)."""
    data_arms = [a.name for a in arms if a.build is not None]
    reads = {stage for a in arms if a.build is not None for stage in a.reads}
    steps = []
    if reads & {"sample", "backtrack", "verify"}:
        steps.append(step("sample", "sample", base))
    if "backtrack" in reads:
        steps.append(step("backtrack", "backtrack", ["sample"]))
    upstream = [s.name for s in steps][-1:]
    if "verify" in reads:
        steps.append(step("verify", "verify", ["sample"]))
        upstream = [s for s in upstream if s != "sample"] + ["verify"]
    if data_arms:
        steps.append(step("build", "build", upstream, arms=data_arms))
        steps[-1].unhashed = unread_fields(steps[-1].config, data_arms)
    return steps


def _stage_args(arms: list, recipe: dict) -> dict[str, dict]:
    """Options the selected arms need from upstream steps (largest value wins); what the
    recipe's own section sets is left to the recipe."""
    merged: dict[str, dict] = {}
    for arm in arms:
        for stage, options in arm.stage_args.items():
            for key, value in options.items():
                if key in (recipe.get(stage) or {}):
                    continue
                old = merged.setdefault(stage, {}).get(key)
                merged[stage][key] = value if old is None else max(old, value)
    return merged


def _training_step(config: RunConfig, source: str, shared: dict, step: Callable, arm,
                   deps: list[str], name: str = "", args: dict | None = None,
                   extra: dict | None = None) -> Step:
    """The training step of an arm: SFT (`train`) or RL (`rl`), with the arm's fixed options
    (`extra`: a round's folder and model, iterations.py)."""
    stage = TRAINING_STAGES[arm.training]
    extra = extra or {"arm": arm.name, **arm.train_args}
    if stage == "rl":
        extra["parent"] = arm.parent or "base"
    built = step(name or f"train_{arm.name}", stage, deps, args=args, **extra)
    if config.accelerate_config:
        from backtrack.launch import accelerate_launcher

        built.run = accelerate_launcher(config, source, shared, stage)
    return built


def config_hash(config: Any, dep_hashes: list[str], unhashed: tuple[str, ...] = ()) -> str:
    """A step's hash: its hashed fields that differ from their defaults, and its inputs'
    hashes. Leaving defaults out means a newly added option does not re-run finished runs;
    `unhashed` fields are ones an upstream digest already covers (a round's model path)."""
    defaults = hashed_values(type(config)())
    values = {k: v for k, v in hashed_values(config).items()
              if defaults.get(k) != v and k not in unhashed}
    text = json.dumps([values, sorted(dep_hashes)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _prepare(step: Step, marker: dict | None, changed: bool, layout: RunLayout) -> Any:
    """Before a (re-)run: set aside outputs of an older config; resume interrupted training.

    Outputs of a changed config are moved to `run/stale/` rather than deleted, and a record
    store would refuse them anyway (its fingerprint differs).
    """
    if changed:
        stale = layout.stale / time.strftime("%Y%m%d-%H%M%S")
        for folder in step.outputs():
            if folder.exists():
                stale.mkdir(parents=True, exist_ok=True)
                name = str(folder.relative_to(layout.output_dir)).replace(os.sep, "-")
                os.replace(folder, stale / f"{step.name}-{name}")
                print(f"[run] {step.name}: moved old output {folder} to {stale}")
    if hasattr(step.config, "resume"):  # training steps: continue an interrupted run
        own = RunLayout.of(step.config)  # a later round trains in its own folder
        interrupted = marker is None and own.checkpoints(step.config.arm).is_dir()
        return dataclasses.replace(step.config, resume=interrupted)
    return step.config


def step_digests(steps: list[Step]) -> dict[str, str]:
    """Each step's digest: its hashed config fields and the digests of the steps it reads."""
    hashes: dict[str, str] = {}
    for step in steps:
        hashes[step.name] = config_hash(step.config, [hashes.get(d, "") for d in step.deps],
                                        step.unhashed)
    return hashes


def steps_done(config: RunConfig, steps: list[Step]) -> dict[str, bool]:
    """Whether each step is done (its marker holds its digest and its outputs are there)."""
    layout = RunLayout.of(config)
    hashes = step_digests(steps)
    return {s.name: _is_done(s, read_json(layout.markers / f"{s.name}.json"), hashes[s.name])
            for s in steps}


def _is_done(step: Step, marker: dict | None, digest: str) -> bool:
    return marker is not None and marker.get("config_hash") == digest and step.done()


def run_steps(config: RunConfig, steps: list[Step], share: StepShare | None = None) -> dict:
    """Run the selected steps in order (`jobs` > 1: ready ones side by side), skipping done
    ones; returns per-step timings.

    With a `share` (a study's), a step of a shared stage whose digest another run has computed
    is linked from there instead of run, and one run here is published there."""
    layout = RunLayout.of(config)
    hashes = step_digests(steps)
    timings: dict[str, dict] = {}

    def settle(step: Step) -> bool:
        timing = _skip_or_link(step, hashes[step.name], config, layout, share)
        if timing:
            timings[step.name] = timing
        return timing is not None

    def launch_args(step: Step) -> tuple:
        sharing = share is not None and step.stage in SHARED_STAGES
        marker = read_json(layout.markers / f"{step.name}.json")
        return step, hashes[step.name], marker, config, layout, share if sharing else None

    def finish(step: Step, result: tuple) -> None:
        seconds, folder = result
        write_json(layout.markers / f"{step.name}.json", {
            "config_hash": hashes[step.name], "seconds": round(seconds, 2),
            **({"shared": str(folder)} if folder else {}),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        timings[step.name] = {"status": "ran", "seconds": round(seconds, 2)}
        print(f"[run] {step.name}: done in {_fmt(seconds)}", flush=True)

    if config.jobs > 1:
        from backtrack.pipeline_jobs import run_parallel

        run_parallel(steps, config.jobs, settle, launch_args, _run_step, finish)
        return {s.name: timings[s.name] for s in steps if s.name in timings}
    for step in steps:
        if not settle(step):
            finish(step, _run_step(*launch_args(step)))
    return timings


def _skip_or_link(step: Step, digest: str, config: RunConfig, layout: RunLayout,
                  share: StepShare | None) -> dict | None:
    """The timing of a step that needs no run (done, not selected, or linked from a study's
    share), or None when it must run."""
    marker_path = layout.markers / f"{step.name}.json"
    done = _is_done(step, read_json(marker_path), digest)
    if step.stage not in config.stages or (done and not config.force):
        why = "done" if done else "not selected"
        print(f"[run] {step.name}: skipped ({why})", flush=True)
        return {"status": "skipped", "seconds": 0.0}
    sharing = share is not None and step.stage in SHARED_STAGES
    if sharing and not config.force and share.complete(step.name, digest):
        folder = share.link(step, digest, layout)
        write_json(marker_path, {"config_hash": digest, "seconds": 0.0, "shared": str(folder),
                                 "linked": True,
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        print(f"[run] {step.name}: linked from {folder}", flush=True)
        return {"status": "linked", "seconds": 0.0}
    return None


def _run_step(step: Step, digest: str, marker: dict | None, config: RunConfig,
              layout: RunLayout, share: StepShare | None) -> tuple[float, Path | None]:
    """Run one step in the run (publishing it to `share` if given): (seconds, share folder)."""
    changed = (marker is not None and marker.get("config_hash") != digest) or config.force
    if changed:
        print(f"[run] {step.name}: config changed or forced; running again")
    if share is not None:
        share.detach(step)
    print(f"[run] {step.name}: running", flush=True)
    start = time.perf_counter()
    step.run(_prepare(step, marker, changed, layout))
    seconds = time.perf_counter() - start
    folder = None
    if share is not None:
        folder = share.publish(step, digest, layout, {"seconds": round(seconds, 2)})
    return seconds, folder


def _fmt(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def run_recipe(recipe_path: str | None, overrides: dict, share_dir: Path | None = None,
               reuse: tuple[Path, ...] = ()) -> Path:
    """`backtrack run`: plan from the recipe and the command-line overrides, run, report.

    `share_dir` (a study's `shared/` folder) shares steps with other runs, `reuse` other
    studies' share folders it imports complete steps from (see share.py)."""
    from backtrack.runinfo import write_run_info

    config, recipe, source, shared = resolve_run(recipe_path, overrides)
    layout = RunLayout.of(config)
    steps = plan(config, recipe, source, shared)
    start = time.perf_counter()
    share = StepShare(Path(share_dir), tuple(reuse)) if share_dir else None
    timings = run_steps(config, steps, share)
    total = time.perf_counter() - start
    timings["total"] = {"seconds": round(total, 2)}
    write_json(layout.timings, timings)
    write_run_info(layout.output_dir, config, "run", inputs=[source] if source else [],
                   extra={"recipe": source, "overrides": overrides,
                          "share_dir": str(share_dir) if share_dir else None,
                          "reuse_shares": [str(p) for p in reuse],
                          "steps": {s.name: dataclasses.asdict(s.config) for s in steps},
                          "timings": timings})
    ran = [f"{name} {_fmt(t['seconds'])}" for name, t in timings.items()
           if t.get("status") == "ran"]
    linked = [name for name, t in timings.items() if t.get("status") == "linked"]
    summary = ", ".join(ran) or ("nothing ran" if linked else "nothing to do, every step was done")
    if linked:
        summary += f"; linked from shares: {', '.join(linked)}"
    print("[run] wall time per step: " + summary, flush=True)
    report_md = layout.report / "report.md"
    print(f"[run] total {_fmt(total)}; report: {report_md}", flush=True)
    return report_md


def main(config: RunConfig) -> Path:
    """Run with a resolved config (programmatic use): its fields act as the overrides."""
    overrides = {f.name: getattr(config, f.name) for f in dataclasses.fields(RunConfig)}
    return run_recipe(None, overrides)
