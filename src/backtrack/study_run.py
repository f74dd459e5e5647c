"""`backtrack study`: every (variant, seed) run of a study, steps shared, then the study report.

Each run is a `backtrack run` in its own folder (`<output_dir>/<variant>/seed<k>/`) from its
merged recipe, which is written there as `recipe.yaml` (so the run can be repeated alone with
`backtrack run --config <run>/recipe.yaml`, and its run.json names a file that exists). Runs
resume and skip what is done through the pipeline's step markers. With `share: true` a step
that several runs resolve identically (same digest: hashed config fields and upstream
digests) is computed by the first run that reaches it and linked into the others from
`<output_dir>/shared/` (share.py); the toy base is shared through its own model cache.

With `--shard i/N` a process runs only its runs; whichever process finds every run of the
study evaluated writes the study report (or `--report-only` writes it from what is there).
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from backtrack import pipeline
from backtrack.errors import UserError
from backtrack.fileio import write_text
from backtrack.share import MARKER, SHARED_STAGES, StepShare
from backtrack.study import Run, StudyConfig, load_study, only_runs, select_runs, study_runs

RECIPE_FILE = "recipe.yaml"


def recipe_file(run: Run) -> Path:
    return Path(run.output_dir) / RECIPE_FILE


def plan_run(run: Run) -> tuple[pipeline.RunConfig, list[pipeline.Step]]:
    """The run's config and steps, exactly as `backtrack run` on its recipe.yaml plans them."""
    config, recipe, source, shared = pipeline.resolve_recipe(run.recipe, str(recipe_file(run)),
                                                             {})
    return config, pipeline.plan(config, recipe, source, shared)


def share_key(step: pipeline.Step, digest: str, share: bool) -> str:
    """Where a step's result is kept: one place per key, however many runs have the step."""
    if step.stage == "toy_base":
        from backtrack.toy_base import config_hash

        return f"cache toy/{config_hash(step.config)}"
    if share and step.stage in SHARED_STAGES:
        return f"shared/{step.name}-{digest}"
    return "per run"


def share_groups(config: StudyConfig, runs: list[Run]) -> dict[tuple[str, str], list[str]]:
    """{(step, where it is kept): the runs that read it}, in plan order, from the plans' step
    digests alone (nothing runs)."""
    groups: dict[tuple[str, str], list[str]] = {}
    order: list[str] = []  # plan order; a step only some runs have goes after its predecessor
    for run in runs:
        _, steps = plan_run(run)
        digests = pipeline.step_digests(steps)
        previous = None
        for step in steps:
            if step.name not in order:
                order.insert(order.index(previous) + 1 if previous else 0, step.name)
            previous = step.name
            key = share_key(step, digests[step.name], config.share)
            where = key if key != "per run" else f"per run ({run.name})"
            groups.setdefault((step.name, where), []).append(run.name)
    return dict(sorted(groups.items(), key=lambda item: order.index(item[0][0])))


def print_plan(config: StudyConfig, runs: list[Run], mine: list[Run]) -> None:
    """`--dry-run`: the runs, then per step which runs share one computation of it."""
    variants = len(config.variants)
    print(f"study {config.source}: {len(runs)} runs ({variants} variant(s) x "
          f"{len(config.seeds)} seed(s)), seed_scope {config.seed_scope}, share "
          f"{'on' if config.share else 'off'}; this process runs {len(mine)}")
    for name, overrides in config.variants.items():
        if "seed_scope" in (overrides or {}):
            print(f"variant {name}: seed_scope {overrides['seed_scope']}")
    print("runs (variant, seed, folder):")
    for run in runs:
        flag = "" if run in mine else "  (not this process: --shard / --only)"
        print(f"  {run.variant:20s} {run.seed:6d}  {run.output_dir}{flag}")
    groups = share_groups(config, runs)
    print("steps (a step listed with several runs is computed once for all of them):")
    by_step: dict[str, list[tuple[str, list[str]]]] = {}
    for (step, where), names in groups.items():
        by_step.setdefault(step, []).append((where, names))
    for step, entries in by_step.items():
        for where, names in entries:
            if len(names) > 1:
                print(f"  {step:24s} {where}  <- {', '.join(names)}")
        alone = sum(len(names) == 1 for _, names in entries)
        if alone:
            more = "more, each" if alone < len(entries) else "computation(s), each"
            print(f"  {step:24s} {alone} {more} read by one run")
    total = sum(len(names) for names in groups.values())
    print(f"{len(groups)} step computations for {total} steps of {len(runs)} runs")
    _print_reused(config, groups)


def _print_reused(config: StudyConfig, groups: dict[tuple[str, str], list[str]]) -> None:
    """Which shared steps `reuse_shares` holds already (imported, not computed, at run time)."""
    if not config.reuse_shares:
        return
    share = StepShare(Path(config.output_dir) / "shared", tuple(map(Path, config.reuse_shares)))
    found = []
    for _step, where in groups:
        name = where.removeprefix("shared/")
        if where != name and not (share.root / name / MARKER).is_file():
            source = share.elsewhere(name)
            if source is not None:
                found.append(f"  {name} <- {source.parent}")
    print(f"{len(found)} shared step(s) found in reuse_shares (imported, not computed)"
          + (":\n" + "\n".join(found) if found else ""))


def write_recipe(config: StudyConfig, run: Run) -> Path:
    """The run's merged recipe, written into its folder for the record and for `run`."""
    header = (f"# Written by `backtrack study --config {config.source}`: variant "
              f"'{run.variant}', seed {run.seed}. Edit the study, not this file.\n")
    return write_text(recipe_file(run), header + yaml.safe_dump(run.recipe, sort_keys=False))


def pending_runs(runs: list[Run]) -> list[str]:
    """The runs whose evaluations are not all done (by their step markers)."""
    pending = []
    for run in runs:
        config, steps = plan_run(run)
        done = pipeline.steps_done(config, steps)
        if not all(done[s.name] for s in steps if s.stage == "eval"):
            pending.append(run.name)
    return pending


def execute(config: StudyConfig, runs: list[Run], mine: list[Run]) -> None:
    """Run this process's runs in order, then write the report if every run is evaluated."""
    from backtrack.study_report import write_study_report

    share_dir = Path(config.output_dir) / "shared" if config.share else None
    start = time.perf_counter()
    for index, run in enumerate(mine, 1):
        print(f"[study] run {index}/{len(mine)}: {run.name} in {run.output_dir}", flush=True)
        pipeline.run_recipe(str(write_recipe(config, run)), {}, share_dir,
                            reuse=tuple(Path(p) for p in config.reuse_shares))
    minutes = (time.perf_counter() - start) / 60
    print(f"[study] {len(mine)} run(s) in {minutes:.1f} min", flush=True)
    pending = pending_runs(runs)
    if pending:
        print(f"[study] the study report waits for {len(pending)} run(s) not evaluated yet: "
              f"{', '.join(pending)}", flush=True)
        return
    write_study_report(config, runs)


def run_study(path: str | Path, dry_run: bool = False, shard: str = "",
              report_only: bool = False, only: str = "") -> None:
    """`backtrack study`: check the whole study first (nothing runs on bad input)."""
    from backtrack.study_report import write_study_report

    if dry_run and report_only:
        raise UserError("options '--dry-run' and '--report-only': give one of them")
    config = load_study(path)
    runs = study_runs(config)
    mine = select_runs(runs, shard) if shard else runs
    if only:
        mine = [run for run in only_runs(runs, only) if run in mine]
    if dry_run:
        print_plan(config, runs, mine)
    elif report_only:
        write_study_report(config, runs)
    else:
        execute(config, runs, mine)
