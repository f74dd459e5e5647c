"""The `backtrack` command: one subcommand per pipeline stage.

Each stage module defines a config dataclass (whose field help is the `--help` text) and a
`main(config)`. This file only turns those dataclasses into Typer options: every field becomes
an optional `--field-name` override on top of `--config recipe.yaml`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
import typing
from pathlib import Path
from typing import Optional

import typer

from backtrack.config import load_config
from backtrack.errors import EXIT_USER_ERROR, UserError

# (command, module, config class, recipe section, one-line help)
STAGES = [
    ("toy-base", "backtrack.toy_base", "ToyBaseConfig", "toy_base",
     "Train the toy world's tokenizer and tiny base model from scratch (cached)."),
    ("sample", "backtrack.sample", "SampleConfig", "sample",
     "Sample k think-then-answer solutions per problem and check them."),
    ("backtrack", "backtrack.backtracking", "BacktrackConfig", "backtrack",
     "Send each wrong sample back with a phrase in place of </think>; check the continuation."),
    ("verify", "backtrack.verifying", "VerifyConfig", "verify",
     "S²R: a verification of each sample attempt, by the task's hook or the model itself "
     "(kept when its verdict agrees with the checker)."),
    ("build", "backtrack.build", "BuildConfig", "build",
     "Build the RFT and RFT+BT SFT datasets from sample and backtrack records."),
    ("train", "backtrack.train", "TrainConfig", "train",
     "Fine-tune the base model on one arm with TRL SFTTrainer (full or LoRA)."),
    ("rl", "backtrack.rl.stage", "RLConfig", "rl",
     "On-policy RL of one arm (outcome RL, SCoRe) from a parent model with the hf engine."),
    ("eval", "backtrack.evaluate", "EvalConfig", "eval",
     "Sample n answers per test problem for each arm; pass@k, maj@k, self-correction stats."),
    ("probe", "backtrack.probe", "ProbeConfig", "probe",
     "Linear probe on the model's hidden state where the phrase would go: can it tell its "
     "right answers from its wrong ones (held-out AUROC)?"),
    ("report", "backtrack.report", "ReportConfig", "report",
     "Write report.md, plots and results.json from the evaluation outputs."),
    ("run", "backtrack.pipeline", "RunConfig", "run",
     "The whole experiment for the recipe's arms: toy base, sample, backtrack, build, train, "
     "eval, report."),
    ("check", "backtrack.check", "CheckConfig", None,
     "Score completions in a JSONL file against gold answers."),
]

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0],
                  pretty_exceptions_enable=False)


def _type_name(tp) -> str:
    text = getattr(tp, "__name__", None) or str(tp)
    return text.replace("typing.", "").upper()


def _make_command(module_name: str, class_name: str, section: str | None):
    module = importlib.import_module(module_name)
    config_cls = getattr(module, class_name)
    hints = typing.get_type_hints(config_cls)
    params = [inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
        default=typer.Option(None, "--config", "-c", help="Recipe YAML file."))]
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        help_text = f.metadata.get("help", "")
        if choices:
            help_text += f" One of: {', '.join(map(str, choices))}."
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
            default=typer.Option(None, "--" + f.name.replace("_", "-"), help=help_text,
                                 metavar=_type_name(hints[f.name]),
                                 show_default=str(default))))

    def command(**kwargs):
        recipe = kwargs.pop("config")
        overrides = {k: v for k, v in kwargs.items() if v is not None}
        if hasattr(module, "run_recipe"):  # `run` resolves every step from the recipe itself
            module.run_recipe(str(recipe) if recipe is not None else None, overrides)
            return
        config = load_config(config_cls, recipe, section, overrides)
        module.main(config)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = (config_cls.__doc__ or "").strip()
    return command


for _name, _module, _cls, _section, _help in STAGES:
    app.command(_name, help=_help)(_make_command(_module, _cls, _section))


@app.command("study")
def study_command(
    config: Path = typer.Option(..., "--config", "-c", help="Study YAML file (a base recipe, "
                                "seeds, variants; see backtrack/study.py)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs and which runs "
                                 "share each step, then exit; nothing runs."),
    shard: str = typer.Option("", "--shard", help="Run only shard i/N of the runs (N "
                              "processes or machines sharing one output_dir)."),
    report_only: bool = typer.Option(False, "--report-only", help="Write the study report "
                                     "from the runs evaluated so far; nothing runs."),
    only: str = typer.Option("", "--only", help="Run only these variants or runs, "
                             "comma-separated (`no-retry,retry0.5/seed0`); the rest later."),
) -> None:
    """Run every (variant, seed) of a study, computing identical steps once, then report."""
    from backtrack.study_run import run_study

    run_study(config, dry_run=dry_run, shard=shard, report_only=report_only, only=only)


@app.command("arms")
def list_arms() -> None:
    """List the arms (methods) and evaluation protocols."""
    from backtrack.arms import describe
    from backtrack.protocols import PROTOCOLS

    for line in describe():
        typer.echo(line)
    typer.echo("\nprotocols (evaluate any arm under one with arm@protocol):")
    for name, protocol in PROTOCOLS.items():
        typer.echo(f"  {name:14s} {protocol.summary}")


@app.command("tasks")
def list_tasks() -> None:
    """List the available tasks."""
    from backtrack.tasks import TASKS, task_names

    for name in task_names():
        cls = TASKS[name]
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:10s} {summary}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors (unknown option...) carry their exit code
        if isinstance(exc, _click_errors()):
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        raise


def _click_errors() -> tuple[type, ...]:
    """Click's exception base classes: typer 0.29 (the locked version) raises those of its
    own vendored click (`typer._click`), older typer those of the click package."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click"):
        try:
            found.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


if __name__ == "__main__":
    main()
