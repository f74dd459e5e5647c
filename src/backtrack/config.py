"""Typed configs for every stage, read from a YAML recipe plus command-line overrides.

A recipe is one flat YAML file per task and model. Top-level keys are the fields every stage
shares (`task`, `model`, `output_dir`, `seed`, ...); a section named after a stage (`sample:`,
`train:`, ...) holds that stage's own fields. Resolution order: dataclass defaults < shared
keys < the stage's section < command-line overrides. Unknown keys and badly typed values are
`UserError`s that name the key and the file.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from backtrack.errors import UserError


def option(default: Any, help: str, choices: tuple | None = None, hashed: bool = True,
           in_store: bool = True, protocol: str | None = None, arms: tuple = ()) -> Any:
    """A dataclass field whose `help` is its documentation and its `--help` text.

    What a field does to a stage's output is declared here, and every step hash, store
    fingerprint and cache key is derived from it (`hashed_values`, `store_values`):
    - `hashed=False`: it changes how a stage runs, not what it produces (batching, threads,
      progress bars, output_dir), so changing it never re-runs a step;
    - `in_store=False`: it changes how many records a stage writes (k, limit, shard, engine),
      not what a record holds, so a record store keeps its records when it changes;
    - `protocol`: it matters only to evaluations under that protocol (e.g. the forcing phrase);
    - `arms`: only these arms' data or training read it (e.g. S²R's data options), so a step
      that makes none of them leaves it out of its hash (`unread_fields`).
    """
    meta = {"help": help, "choices": choices, "hashed": hashed, "in_store": in_store,
            "protocol": protocol, "arms": tuple(arms)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def hashed_values(config: Any) -> dict:
    """The fields of a config that change what its stage produces (see `option`)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.metadata.get("hashed", True)}


def unread_fields(config: Any, arms: list[str]) -> tuple[str, ...]:
    """Fields declared for other arms only (`option(arms=...)`): a step making `arms` does not
    read them, so changing them must not re-run it."""
    return tuple(f.name for f in dataclasses.fields(config)
                 if f.metadata.get("arms") and not set(f.metadata["arms"]) & set(arms))


def store_values(config: Any, protocol: str | None = None) -> dict:
    """The fields that shape a record (a store written with other values is refused);
    protocol-specific fields only count for evaluations under that protocol."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.metadata.get("hashed", True) and f.metadata.get("in_store", True)
            and f.metadata.get("protocol") in (None, protocol)}


@dataclass
class CommonConfig:
    """Fields every stage shares; they live at the top level of a recipe."""

    task: str = option("arith", "Task name (see `backtrack tasks`).")
    task_args: dict = option({}, "Task options, e.g. {path: data/gsm8k, limit: 200}.")
    model: str = option("toy", "Base model: hub id, local folder, or alias (toy, smollm2-135m).")
    output_dir: str = option("runs/default", "Folder of the experiment; stages write under it.",
                             hashed=False)
    seed: int = option(0, "Random seed for sampling, data order and training.")


STAGE_SECTIONS = ("toy_base", "sample", "backtrack", "verify", "build", "train", "rl", "eval",
                  "report", "probe")
# Top-level recipe keys beyond CommonConfig's, applied to every stage config that has the field.
RUN_KEYS = ("arms", "iterations")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_string(value: str) -> Any:
    """Parse a command-line string as YAML so `4`, `0.7`, `true`, `[a, b]` get their types."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert `value` to type `tp`; raise a one-line UserError naming `where`."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{where}: a value is required")
    origin = typing.get_origin(inner)
    if inner is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if inner is bool:
        if isinstance(value, str):
            value = _parse_string(value)
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if inner in (int, float):
        if isinstance(value, str):
            value = _parse_string(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {value!r}")
        if inner is int and float(value) != int(value):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return inner(value)
    if inner is list or origin is list:
        if isinstance(value, str):
            parsed = _parse_string(value)
            value = parsed if isinstance(parsed, list) else [value]
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(inner) or (Any,)
        return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if inner is dict or origin is dict:
        if isinstance(value, str):
            value = _parse_string(value)
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if inner is Any:
        return value
    if isinstance(inner, type) and isinstance(value, str) and inner is not str:
        return coerce(value, str, where)
    return value


def read_recipe(path: str | Path | None) -> dict:
    """Load a recipe YAML file as a mapping (empty when no path is given)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from exc
    check_recipe(data, str(path))
    return data


def check_recipe(data: Any, source: str) -> None:
    """Refuse a recipe mapping with unknown top-level keys or a section that is no mapping.

    Section keys are checked when a stage resolves its config (`resolve`)."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe must be a mapping of keys to values")
    common = {f.name for f in dataclasses.fields(CommonConfig)}
    for key, value in data.items():
        if key in STAGE_SECTIONS:
            if value is not None and not isinstance(value, dict):
                raise UserError(f"{source}: section '{key}' must be a mapping")
        elif key not in common and key not in RUN_KEYS and key != "run":
            raise UserError(f"{source}: unknown key '{key}' (shared keys: "
                            f"{sorted(common) + list(RUN_KEYS)}; "
                            f"sections: {list(STAGE_SECTIONS)})")


def resolve(cls: type, recipe: dict, section: str | None, overrides: dict | None = None,
            source: str = "recipe") -> Any:
    """Build a `cls` config from a recipe mapping, its `section`, and overrides."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    common = {f.name for f in dataclasses.fields(CommonConfig)}
    values: dict[str, tuple[Any, str]] = {}
    for key, value in recipe.items():
        if (key in common or key in RUN_KEYS) and key in names:
            values[key] = (value, f"{source}: key '{key}'")
    stage_values = (recipe.get(section) or {}) if section else {}
    for key, value in stage_values.items():
        if key not in names:
            raise UserError(f"{source}: unknown key '{key}' in section '{section}' "
                            f"(known: {sorted(names - common)})")
        values[key] = (value, f"{source}: key '{section}.{key}'")
    for key, value in (overrides or {}).items():
        if key not in names:
            raise UserError(f"unknown option '--{key.replace('_', '-')}'")
        values[key] = (value, f"option '--{key.replace('_', '-')}'")
    kwargs = {}
    for key, (value, where) in values.items():
        kwargs[key] = coerce(value, hints[key], where)
        choices = _choices(cls, key)
        if choices and kwargs[key] not in choices:
            raise UserError(f"{where}: {kwargs[key]!r} is not one of {list(choices)}")
    config = cls(**kwargs)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


def _choices(cls: type, name: str) -> tuple | None:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("choices")
    return None


def load_config(cls: type, recipe_path: str | Path | None, section: str | None,
                overrides: dict | None = None) -> Any:
    """Read `recipe_path` and resolve a `cls` config for `section` with overrides."""
    recipe = read_recipe(recipe_path)
    return resolve(cls, recipe, section, overrides, source=str(recipe_path or "defaults"))


def dump_config(config: Any) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2, default=str)
