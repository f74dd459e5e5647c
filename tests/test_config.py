"""Recipe resolution: defaults < shared keys < stage section < command-line overrides."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from backtrack.config import CommonConfig, load_config, option, resolve
from backtrack.errors import UserError


@dataclass
class DemoConfig(CommonConfig):
    k: int = option(4, "samples per problem")
    temperature: float = option(0.8, "sampling temperature")
    phrases: list[str] = option(["Wait"], "phrases")
    engine: str = option("hf", "engine", choices=("hf", "vllm"))
    limit: int | None = option(None, "problems")
    lora: bool = option(False, "use LoRA")


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_resolution_order(tmp_path):
    recipe = write(tmp_path, "seed: 3\nmodel: m\nsample:\n  k: 8\n  temperature: 0.5\n")
    config = load_config(DemoConfig, recipe, "sample", {"temperature": "0.9", "lora": "true"})
    assert (config.seed, config.model, config.k) == (3, "m", 8)
    assert config.temperature == 0.9 and config.lora is True
    assert config.phrases == ["Wait"]


def test_other_sections_are_ignored(tmp_path):
    recipe = write(tmp_path, "train:\n  learning_rate: 0.1\nsample:\n  k: 2\n")
    assert load_config(DemoConfig, recipe, "sample").k == 2


def test_list_and_optional_overrides():
    config = resolve(DemoConfig, {}, None, {"phrases": "[a, b]", "limit": "10"})
    assert config.phrases == ["a", "b"] and config.limit == 10


@pytest.mark.parametrize("text, message", [
    ("bogus: 1\n", "unknown key 'bogus'"),
    ("sample:\n  kk: 1\n", "unknown key 'kk' in section 'sample'"),
    ("sample:\n  k: many\n", "key 'sample.k': expected a number"),
    ("sample:\n  k: 1.5\n", "expected an integer"),
    ("sample:\n  engine: tpu\n", "'tpu' is not one of"),
    ("sample: [1, 2]\n", "section 'sample' must be a mapping"),
    ("- a\n- b\n", "must be a mapping"),
    ("a: [unclosed\n", "invalid YAML"),
])
def test_bad_recipes_name_the_key(tmp_path, text, message):
    recipe = write(tmp_path, text)
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as info:
        load_config(DemoConfig, recipe, "sample")
    assert str(recipe) in str(info.value) or "invalid" not in message
    assert "\n" not in str(info.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_config(DemoConfig, tmp_path / "nope.yaml", "sample")


def test_bad_override_names_the_option():
    with pytest.raises(UserError, match="option '--k'"):
        resolve(DemoConfig, {}, None, {"k": "x"})
    with pytest.raises(UserError, match="unknown option '--nope'"):
        resolve(DemoConfig, {}, None, {"nope": "1"})
