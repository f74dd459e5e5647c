"""The arms registry: lookups, lineage, and a new method added from a test module alone."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from backtrack import arms
from backtrack.errors import UserError
from conftest import BACKTRACK_CMD
from test_pipeline import TINY


def test_unknown_arm_lists_the_known_ones():
    with pytest.raises(UserError, match=r"unknown arm 'nope' \(known: base, budget_forcing, rft"):
        arms.get_arm("nope")
    with pytest.raises(UserError, match="option 'arms': give at least one arm"):
        arms.validate_evaluations([])


def test_lineage_and_model_source(monkeypatch):
    monkeypatch.setitem(arms.ARMS, "rl_on_rft_bt", arms.Arm(
        "rl_on_rft_bt", "test", parent="rft_bt", training="rl"))
    monkeypatch.setitem(arms.ARMS, "forced_rl", arms.Arm(
        "forced_rl", "test", parent="rl_on_rft_bt", protocol="forcing"))
    assert [a.name for a in arms.lineage("forced_rl")] == ["forced_rl", "rl_on_rft_bt", "rft_bt",
                                                           "base"]
    assert arms.model_source("forced_rl").name == "rl_on_rft_bt"
    assert arms.model_source("budget_forcing") is None
    assert [a.name for a in arms.required_arms(["forced_rl", "rft"])] == [
        "base", "rft_bt", "rl_on_rft_bt", "forced_rl", "rft"]


def test_backtrack_arms_lists_every_arm_and_protocol(cli_env):
    out = subprocess.run([*BACKTRACK_CMD, "arms"], capture_output=True, text=True, env=cli_env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("base", "rft", "rft_bt", "budget_forcing", "single", "forcing", "two_attempt"):
        assert f"{name} " in out.stdout, name


def build_rft_cap1(context):
    """RFT keeping one correct first attempt per problem: a method that exists only here."""
    from backtrack.methods.rft import rft_examples

    return rft_examples(context.samples(), context.tokenizer, 1, str(context.layout.samples))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_arm_registered_in_a_test_runs_through_the_pipeline(tmp_path, monkeypatch):
    from backtrack.pipeline import run_recipe

    monkeypatch.setitem(arms.ARMS, "rft_cap1", arms.Arm(
        "rft_cap1", "rft with one solution per problem", training="sft", build=build_rft_cap1,
        reads=("sample",), compare_with=("base",)))
    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "arms": ["base", "rft_cap1", "rft_cap1@forcing"]}))
    out = tmp_path / "run"
    report = run_recipe(str(recipe), {"output_dir": str(out)})
    results = json.loads((out / "report" / "results.json").read_text())
    assert list(results["arms"]) == ["base", "rft_cap1", "rft_cap1@forcing"]
    assert results["arms"]["rft_cap1@forcing"]["protocol"] == "forcing"
    assert "| rft_cap1 |" in report.read_text()
    assert {(c["arm"], c["reference"]) for c in results["comparisons"]} == {
        ("rft_cap1", "base"), ("rft_cap1@forcing", "rft_cap1")}
    stats = json.loads((out / "sft" / "stats.json").read_text())
    assert list(stats["arms"]) == ["rft_cap1"]  # no other arm's data was built
    assert stats["arms"]["rft_cap1"]["examples"] == stats["arms"]["rft_cap1"]["problems"]
    assert not (out / "backtrack").exists()  # the arm reads no backtrack records
    assert (out / "models" / "rft_cap1" / "config.json").is_file()


def test_rl_arms_train_with_the_rl_stage_from_their_parent(tmp_path):
    from backtrack import pipeline

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "arms": ["score", "outcome_rl_from_rft_bt",
                                                       "s2r"]}))
    steps = {s.name: s for s in pipeline.plan(*pipeline.resolve_run(str(recipe), {}))}
    score, on_bt, s2r = (steps[f"train_{n}"] for n in ("score", "outcome_rl_from_rft_bt", "s2r"))
    assert (score.stage, score.config.method, score.config.parent) == ("rl", "score", "base")
    assert on_bt.deps == ["train_rft_bt"] and on_bt.config.parent == "rft_bt"
    assert s2r.deps == ["train_s2r_sft"] and s2r.config.reward_on == "final_attempt"
    assert steps["eval_score"].config.arms == ["score"]
    assert steps["build"].config.arms == ["rft_bt", "s2r_sft"]
