"""`backtrack run`: the whole experiment from one recipe, resumable stage by stage.

Stages: toy base model (when `model: toy`), sample on the train split, backtrack, build both
SFT arms, train both arms, evaluate every arm, report. Each stage's config is resolved from the
same recipe as its own subcommand would (top-level keys, then its section), and shared options
given on the command line (`--seed`, `--output-dir`, ...) apply to every stage.

A stage counts as done when `<output_dir>/run/stages/<stage>.json` holds the hash of its
resolved config and of the stages it reads from; the marker is written only after the stage
returns, so an interrupted stage runs again (its record stores resume record by record, and
training resumes from its last checkpoint). A changed config re-runs the stage and everything
downstream of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from backtrack.config import CommonConfig, option, read_recipe, resolve
from backtrack.errors import UserError

ALL_STAGES = ("toy_base", "sample", "backtrack", "build", "train", "eval", "report")
# Fields that change how a stage runs, not what it produces (markers live in output_dir, so
# a moved run folder stays done).
UNHASHED_FIELDS = {"resume", "batch_size", "engine_args", "progress", "output_dir"}
EMBEDDED_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "toy.yaml"


@dataclass
class RunConfig(CommonConfig):
    """Run every stage of the experiment from one recipe, skipping stages already done."""

    recipe: str = option("", "Recipe the stages are resolved from (set by --config; default: "
                         "the embedded recipes/toy.yaml).")
    stages: list = option(list(ALL_STAGES), "Stages to run, in pipeline order (others are "
                          "assumed done).", )
    force: bool = option(False, "Re-run the selected stages even when their output exists.")
    accelerate_config: str = option("", "Run the train steps as `accelerate launch "
                                    "--config_file <this>` subprocesses (multi-GPU); empty = "
                                    "in this process.")

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in ALL_STAGES]
        if unknown:
            raise UserError(f"option 'stages': unknown stage(s) {unknown} (known: "
                            f"{list(ALL_STAGES)})")


@dataclass
class Step:
    """One unit of work: a stage main with its resolved config and the steps it reads from."""

    name: str
    stage: str
    config: Any
    run: Callable[[Any], Any]
    deps: list[str]


def effective_config(config: RunConfig) -> tuple[RunConfig, dict, str, dict]:
    """The run config with the recipe applied, the recipe, its name and the CLI overrides.

    Overrides are the fields whose value differs from what the recipe alone gives (without
    --config the CLI resolved against plain defaults, and the embedded recipe applies).
    """
    if config.recipe:
        recipe, source = read_recipe(config.recipe), config.recipe
        reference = resolve(RunConfig, recipe, "run", source=source)
    else:
        embedded = EMBEDDED_RECIPE.is_file()
        recipe = read_recipe(EMBEDDED_RECIPE) if embedded else {}
        source = str(EMBEDDED_RECIPE) if embedded else "defaults"
        reference = RunConfig()
    overrides = {f.name: getattr(config, f.name) for f in dataclasses.fields(RunConfig)
                 if f.name != "recipe" and getattr(config, f.name) != getattr(reference, f.name)}
    effective = resolve(RunConfig, recipe, "run", overrides, source=source)
    effective.recipe = source if recipe else ""
    shared = {k: v for k, v in overrides.items()
              if k in {f.name for f in dataclasses.fields(CommonConfig)}}
    return effective, recipe, source, shared


def plan(config: RunConfig, recipe: dict, source: str, shared: dict) -> list[Step]:
    """The steps of the experiment with configs resolved from the recipe."""
    from backtrack import backtracking, build, evaluate, report, sample, toy_base, train

    def cfg(cls, section, **extra):
        return resolve(cls, recipe, section, {**shared, **extra}, source=source)

    base = ["toy_base"] if config.model == "toy" else []
    steps = []
    if config.model == "toy":
        steps.append(Step("toy_base", "toy_base", cfg(toy_base.ToyBaseConfig, "toy_base"),
                          toy_base.main, []))
    steps += [
        Step("sample", "sample", cfg(sample.SampleConfig, "sample"), sample.main, base),
        Step("backtrack", "backtrack", cfg(backtracking.BacktrackConfig, "backtrack"),
             backtracking.main, ["sample"]),
        Step("build", "build", cfg(build.BuildConfig, "build"), build.main, ["backtrack"]),
    ]
    for arm in ("rft", "rft_bt"):
        run_train = train.main
        if config.accelerate_config:
            run_train = _accelerate_launcher(config, shared)
        steps.append(Step(f"train_{arm}", "train", cfg(train.TrainConfig, "train", arm=arm),
                          run_train, ["build"]))
    eval_config = cfg(evaluate.EvalConfig, "eval")
    for arm in eval_config.arms:
        deps = [f"train_{arm}"] if arm in ("rft", "rft_bt") else base
        steps.append(Step(f"eval_{arm}", "eval", dataclasses.replace(eval_config, arms=[arm]),
                          evaluate.main, deps))
    report_config = cfg(report.ReportConfig, "report")
    report_config = dataclasses.replace(report_config, arms=list(eval_config.arms))
    steps.append(Step("report", "report", report_config, report.main,
                      [f"eval_{arm}" for arm in eval_config.arms]))
    return steps


def _accelerate_launcher(config: RunConfig, shared: dict) -> Callable[[Any], None]:
    """A train step that runs `backtrack train` under `accelerate launch` (one process per
    GPU), since a multi-process launch cannot happen inside this process."""
    import subprocess
    import sys

    def launch(train_config) -> None:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   config.accelerate_config, "-m", "backtrack.cli", "train", "--arm",
                   train_config.arm, "--resume", str(train_config.resume).lower()]
        if config.recipe:
            command += ["--config", config.recipe]
        for key, value in shared.items():
            text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            command += ["--" + key.replace("_", "-"), text]
        print("[run] " + " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            raise UserError(f"training arm '{train_config.arm}' under accelerate failed "
                            "(see its output above)")

    return launch


def config_hash(config: Any, dep_hashes: list[str]) -> str:
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in UNHASHED_FIELDS}
    text = json.dumps([fields, sorted(dep_hashes)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _marker(output_dir: Path, name: str) -> Path:
    return output_dir / "run" / "stages" / f"{name}.json"


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def step_outputs(step: Step, output_dir: Path) -> list[Path]:
    """The folders a step writes (the toy model itself is cached by config hash elsewhere)."""
    if step.stage == "train":
        return [output_dir / "models" / step.config.arm,
                output_dir / "checkpoints" / step.config.arm]
    if step.stage == "eval":
        from backtrack.evaluate import eval_dir

        return [eval_dir(step.config) / arm for arm in step.config.arms]
    folder = {"toy_base": "toy_base", "sample": "samples", "backtrack": "backtrack",
              "build": "sft", "report": "report"}[step.stage]
    return [output_dir / folder]


def outputs_exist(step: Step, output_dir: Path) -> bool:
    """Whether a step's outputs are still there (a cleaned cache or folder means re-run)."""
    if step.stage == "toy_base":
        info = _read_marker(output_dir / "toy_base" / "run.json") or {}
        return (Path(info.get("model_dir", "/nonexistent")) / "config.json").is_file()
    folders = step_outputs(step, output_dir)
    if step.stage == "train":
        folders = folders[:1]  # checkpoints are optional
    return all(folder.exists() for folder in folders)


def _prepare(step: Step, marker: dict | None, changed: bool, output_dir: Path) -> Any:
    """Before a (re-)run: set aside outputs of an older config; resume interrupted training.

    Outputs of a changed config are moved to `run/stale/` rather than deleted, and a record
    store would refuse them anyway (its fingerprint differs).
    """
    if changed:
        stale = output_dir / "run" / "stale" / time.strftime("%Y%m%d-%H%M%S")
        for folder in step_outputs(step, output_dir):
            if folder.exists():
                stale.mkdir(parents=True, exist_ok=True)
                name = str(folder.relative_to(output_dir)).replace(os.sep, "-")
                os.replace(folder, stale / f"{step.name}-{name}")
                print(f"[run] {step.name}: moved old output {folder} to {stale}")
    if step.stage == "train":
        interrupted = marker is None and (output_dir / "checkpoints" / step.config.arm).is_dir()
        return dataclasses.replace(step.config, resume=interrupted)
    return step.config


def run_steps(config: RunConfig, steps: list[Step]) -> dict:
    """Run the selected steps in order, skipping done ones; returns per-step timings."""
    output_dir = Path(config.output_dir)
    hashes: dict[str, str] = {}
    timings: dict[str, dict] = {}
    for step in steps:
        digest = config_hash(step.config, [hashes.get(d, "") for d in step.deps])
        hashes[step.name] = digest
        marker_path = _marker(output_dir, step.name)
        marker = _read_marker(marker_path)
        selected = step.stage in config.stages
        done = (marker is not None and marker.get("config_hash") == digest
                and outputs_exist(step, output_dir))
        if not selected or (done and not config.force):
            why = "done" if done else "not selected"
            print(f"[run] {step.name}: skipped ({why})", flush=True)
            timings[step.name] = {"status": "skipped", "seconds": 0.0}
            continue
        changed = (marker is not None and marker.get("config_hash") != digest) or config.force
        if changed:
            print(f"[run] {step.name}: config changed or forced; running again")
        print(f"[run] {step.name}: running", flush=True)
        start = time.perf_counter()
        step.run(_prepare(step, marker, changed, output_dir))
        seconds = time.perf_counter() - start
        _write_json(marker_path, {"config_hash": digest, "seconds": round(seconds, 2),
                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        timings[step.name] = {"status": "ran", "seconds": round(seconds, 2)}
        print(f"[run] {step.name}: done in {_fmt(seconds)}", flush=True)
    return timings


def _fmt(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def main(config: RunConfig) -> Path:
    from backtrack.runinfo import write_run_info

    config, recipe, source, shared = effective_config(config)
    output_dir = Path(config.output_dir)
    steps = plan(config, recipe, source, shared)
    start = time.perf_counter()
    timings = run_steps(config, steps)
    total = time.perf_counter() - start
    timings["total"] = {"seconds": round(total, 2)}
    _write_json(output_dir / "timings.json", timings)
    write_run_info(output_dir, config, "run", inputs=[config.recipe] if config.recipe else [],
                   extra={"steps": {s.name: dataclasses.asdict(s.config) for s in steps},
                          "timings": timings})
    ran = [f"{name} {_fmt(t['seconds'])}" for name, t in timings.items()
           if t.get("status") == "ran"]
    print("[run] wall time per step: " + (", ".join(ran) or "nothing to do, every step was done"),
          flush=True)
    report_md = output_dir / "report" / "report.md"
    print(f"[run] total {_fmt(total)}; report: {report_md}", flush=True)
    return report_md
