"""A study: one base recipe run over several seeds and variants, each (variant, seed) a run.

A study file names a base recipe, the seeds, and variants as overrides in the recipe's own
shape, e.g.

    recipe: toy.yaml            # relative to this file
    seeds: [0, 1, 2]
    seed_scope: all             # all | finetune | base
    output_dir: runs/study-toy
    arms: [base, rft]           # the recipe's top-level `arms` for every run
    variants:
      default: {}
      lr3e-4: {train: {learning_rate: 3.0e-4}}
      bt-only: {arms: [base, rft_bt]}
      bases: {seed_scope: all}  # this variant's seeds also train their own toy base

`study_runs` turns it into runs, each with its own `<output_dir>/<variant>/seed<k>/` and fully
merged recipe mapping; every step `backtrack run` would plan for each run is resolved here,
so an unknown key or a badly typed value stops the study before anything runs.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from backtrack.config import RUN_KEYS, check_recipe, coerce, option, read_recipe, resolve
from backtrack.errors import UserError
from backtrack.store import parse_shard, shard_of

SEED_SCOPES = ("all", "finetune", "base")
# Keys the study itself sets in every run; a variant may not.
STUDY_KEYS = ("output_dir", "seed")
# Folders of the study beside its variants' (a variant of either name would collide).
RESERVED_NAMES = ("shared", "report")
# A variant key that is the study's, not the recipe's: its own seed scope.
VARIANT_KEYS = ("seed_scope",)
# Sections whose `arms` the pipeline sets per step: a variant picks evaluations with `arms`.
PLANNED_ARMS = ("build", "eval", "report")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class StudyConfig:
    """Seeds and variants of one base recipe; each (variant, seed) is a `backtrack run`."""

    recipe: str = option("", "Base recipe, relative to the study file.")
    seeds: list = option([], "Seeds; every variant runs once per seed (at least one).")
    variants: dict = option({"default": {}}, "Variants: {name: overrides}, overrides in the "
                            "recipe's shape (top-level keys, stage sections such as "
                            "`toy_base: {steps: 10}`); a section or task_args is updated key by "
                            "key, any other value is replaced.")
    seed_scope: str = option("all", "Which stages the study seed varies: `all`; `finetune` "
                             "(every stage but the toy base, which keeps the recipe's seed, so "
                             "all seeds share one base model); `base` (only the toy base). A "
                             "variant may set its own `seed_scope`, so one study can hold both "
                             "sources of variance and share the steps they have in common.",
                             choices=SEED_SCOPES)
    output_dir: str = option("runs/study", "Folder of the study; run <variant>/seed<k>/ and "
                             "report/ go under it.")
    arms: list = option([], "Evaluations of every run (the recipe's top-level `arms`; a "
                        "variant may set its own); empty: the recipe's.")
    share: bool = option(True, "Compute a step once when runs resolve it identically (same "
                         "config and upstream) and link it into each of them from "
                         "<output_dir>/shared/; false: every run computes its own.")
    reuse_shares: list = option([], "Share folders of other studies (e.g. "
                                "runs/study-toy/shared), read before a shared step is "
                                "computed: a step complete there with the same digest is "
                                "imported into this study's share (hard links) and linked, "
                                "not recomputed. Never written. Needs share: true.")
    source: str = option("", "The study file (set when it is read).")


@dataclass
class Run:
    """One (variant, seed) of a study: where it writes and the recipe it runs."""

    variant: str
    seed: int
    output_dir: str
    recipe: dict
    overrides: dict

    @property
    def name(self) -> str:
        return f"{self.variant}/seed{self.seed}"


def _duplicate_keys(node: yaml.Node, path: str = "") -> str | None:
    """The first duplicate mapping key in a composed YAML tree, as a message (else None).

    PyYAML keeps the last of two equal keys silently; two variants with one name would then
    drop one of them without a word."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                if path == "variants":
                    return f"two variants named '{key}' (lines {seen[key]} and {line})"
                return f"duplicate key '{path + '.' if path else ''}{key}' (line {line})"
            seen[key] = line
            found = _duplicate_keys(value_node, f"{path + '.' if path else ''}{key}")
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _duplicate_keys(item, path)
            if found:
                return found
    return None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: study file not found")
    text = path.read_text()
    try:
        duplicate = _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from exc
    if duplicate:
        raise UserError(f"{path}: {duplicate}")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a study must be a mapping of keys to values")
    return data


def load_study(path: str | Path) -> StudyConfig:
    """Read and check a study file (the recipe and variants are checked by `study_runs`)."""
    path = Path(path)
    data = _read_yaml(path)
    hints = typing.get_type_hints(StudyConfig)
    fields = {f.name: f for f in dataclasses.fields(StudyConfig) if f.name != "source"}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise UserError(f"{path}: unknown key '{key}' (known: {sorted(fields)})")
        kwargs[key] = coerce(value, hints[key], f"{path}: key '{key}'")
        choices = fields[key].metadata.get("choices")
        if choices and kwargs[key] not in choices:
            raise UserError(f"{path}: key '{key}': {kwargs[key]!r} is not one of {list(choices)}")
    if not kwargs.get("recipe"):
        raise UserError(f"{path}: key 'recipe' (the base recipe) is required")
    config = StudyConfig(**kwargs, source=str(path))
    _check(config, path)
    return config


def _check_reuse(config: StudyConfig, path: Path) -> None:
    own = (Path(config.output_dir) / "shared").resolve()
    for i, folder in enumerate(config.reuse_shares):
        where = f"{path}: key 'reuse_shares[{i}]'"
        if not config.share:
            raise UserError(f"{where}: reusing other studies' shares needs share: true")
        if not Path(folder).is_dir():
            raise UserError(f"{where}: {folder} is not a folder (a study's shared/ folder)")
        if Path(folder).resolve() == own:
            raise UserError(f"{where}: {folder} is this study's own share")


def _check(config: StudyConfig, path: Path) -> None:
    seeds = [coerce(s, int, f"{path}: key 'seeds[{i}]'") for i, s in enumerate(config.seeds)]
    if not seeds:
        raise UserError(f"{path}: key 'seeds' is empty; a study needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"{path}: key 'seeds' lists a seed twice ({seeds})")
    config.seeds = seeds
    _check_reuse(config, path)
    if not config.variants:
        raise UserError(f"{path}: key 'variants' is empty; use `default: {{}}` for the recipe "
                        "as it is")
    for name, overrides in config.variants.items():
        where = f"{path}: variant '{name}'"
        if not _NAME_RE.match(str(name)):
            raise UserError(f"{where}: a variant name is a folder name (letters, digits, "
                            "_ . + -)")
        if name in RESERVED_NAMES:
            raise UserError(f"{where}: the names {list(RESERVED_NAMES)} are folders of the "
                            "study itself")
        if overrides is not None and not isinstance(overrides, dict):
            raise UserError(f"{where}: overrides must be a mapping")
        for key in STUDY_KEYS:
            if key in (overrides or {}):
                raise UserError(f"{where}: key '{key}' is set by the study, not by a variant")
        scope = (overrides or {}).get("seed_scope", config.seed_scope)
        if scope not in SEED_SCOPES:
            raise UserError(f"{where}: key 'seed_scope': {scope!r} is not one of "
                            f"{list(SEED_SCOPES)}")
        check_recipe(recipe_overrides(overrides), where)
        for section in PLANNED_ARMS:
            if "arms" in ((overrides or {}).get(section) or {}):
                raise UserError(f"{where}: key '{section}.arms' is set per step by `backtrack "
                                "run`; choose evaluations with the top-level key 'arms'")


def recipe_path(config: StudyConfig) -> Path:
    """The base recipe: relative paths are taken from the study file's folder."""
    path = Path(config.recipe)
    return path if path.is_absolute() else Path(config.source).parent / path


def recipe_overrides(overrides: dict | None) -> dict:
    """A variant's overrides without the study's own keys (`VARIANT_KEYS`)."""
    return {k: v for k, v in (overrides or {}).items() if k not in VARIANT_KEYS}


def variant_scope(config: StudyConfig, variant: str) -> str:
    """The seed scope of one variant: its own `seed_scope`, else the study's."""
    return (config.variants.get(variant) or {}).get("seed_scope", config.seed_scope)


def merge(recipe: dict, overrides: dict) -> dict:
    """The recipe with overrides applied: a mapping at the top level (a stage section,
    task_args) is updated key by key, any other value is replaced."""
    merged = copy.deepcopy(recipe)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def apply_seed(recipe: dict, seed: int, scope: str) -> dict:
    """The recipe with the study seed applied to the stages `scope` names.

    The seed replaces the top-level seed and the seed of every in-scope section that sets its
    own; with `finetune` the toy base is pinned to the seed the recipe gave it, with `base`
    only the toy base's seed is set."""
    out = copy.deepcopy(recipe)
    base_seed = (out.get("toy_base") or {}).get("seed", out.get("seed", 0))
    if scope == "base":
        out["toy_base"] = {**(out.get("toy_base") or {}), "seed": seed}
        return out
    out["seed"] = seed
    for section, values in list(out.items()):
        if isinstance(values, dict) and "seed" in values and section != "task_args":
            out[section] = {**values, "seed": seed}
    if scope == "finetune":
        out["toy_base"] = {**(out.get("toy_base") or {}), "seed": base_seed}
    return out


def stage_classes() -> list[tuple[str, type]]:
    """(recipe section, config class) of every stage the CLI knows (`cli.STAGES`)."""
    from backtrack.cli import STAGES

    return [(section, getattr(importlib.import_module(module), cls_name))
            for _, module, cls_name, section, _ in STAGES if section]


def validate_recipe(recipe: dict, source: str) -> None:
    """Resolve every step `backtrack run` plans from the recipe, and every stage section on its
    own (a stage the plan leaves out is checked too): unknown keys and bad values raise."""
    from backtrack import pipeline

    check_recipe(recipe, source)
    # the top-level `arms` are evaluations (the plan gives each stage its own arms)
    standalone = {k: v for k, v in recipe.items() if k not in RUN_KEYS}
    where = ""
    try:
        for section, cls in stage_classes():
            where = f"section '{section}': "
            resolve(cls, standalone, section, source=source)
        where = ""
        pipeline.plan(*pipeline.resolve_recipe(recipe, source, {}))
    except UserError as exc:  # a config's own validate() does not know the file
        if str(exc).startswith(source):
            raise
        raise UserError(f"{source}: {where}{exc}") from exc


def study_runs(config: StudyConfig) -> list[Run]:
    """Every (variant, seed) of the study, in file order, each with its merged recipe."""
    base_path = recipe_path(config)
    base = read_recipe(base_path)
    validate_recipe(base, str(base_path))
    scopes = {variant_scope(config, v) for v in config.variants}
    if "base" in scopes and base.get("model", "toy") != "toy":
        raise UserError(f"{config.source}: seed_scope 'base' varies only the toy base, but the "
                        f"recipe's model is '{base.get('model')}'")
    if config.arms:
        base = merge(base, {"arms": list(config.arms)})
    runs = []
    for variant, overrides in config.variants.items():
        merged = merge(base, recipe_overrides(overrides))
        scope = variant_scope(config, variant)
        for seed in config.seeds:
            output_dir = str(Path(config.output_dir) / variant / f"seed{seed}")
            recipe = {**apply_seed(merged, seed, scope), "output_dir": output_dir}
            validate_recipe(recipe, f"{config.source}: variant '{variant}'")
            runs.append(Run(variant, seed, output_dir, recipe, copy.deepcopy(overrides or {})))
    return runs


def select_runs(runs: list[Run], shard: str) -> list[Run]:
    """The runs shard `i/N` owns: a stable hash of the run name, so N machines split a study
    without talking to each other and a run never moves between shards."""
    index, count = parse_shard(shard)
    return [run for run in runs if shard_of(run.name, count) == index]


def only_runs(runs: list[Run], only: str) -> list[Run]:
    """The runs `--only` names: comma-separated variants (`no-retry`) or runs
    (`no-retry/seed0`), in the study's order. A part of a study that does not fit one
    machine's time is run this way and finished later; an unknown name is a user error."""
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    if not wanted:
        raise UserError("--only: name one or more variants or runs (variant/seed<k>)")
    known = {run.variant for run in runs} | {run.name for run in runs}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise UserError(f"--only: no variant or run named {', '.join(unknown)} in this study "
                        f"(variants: {', '.join(dict.fromkeys(r.variant for r in runs))})")
    return [run for run in runs if run.variant in wanted or run.name in wanted]
