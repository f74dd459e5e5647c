"""On-policy rounds (`iterations: R`): the plan (golden), refusals, digests, and a tiny run in
which round 2 samples with round 1's model and trains on round 2's own samples."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
from test_pipeline import TINY

from backtrack import pipeline
from backtrack.errors import UserError

GOLDEN = Path(__file__).parent / "golden" / "iterations.json"


def _plan(out: Path, **changes):
    recipe = {**copy.deepcopy(TINY), "output_dir": str(out), **changes}
    return pipeline.plan(*pipeline.resolve_recipe(recipe, "tiny.yaml", {}))


def _relative(value, out: Path):
    """Paths inside the run folder relative to it, so the golden file holds no tmp path."""
    if isinstance(value, dict):
        return {k: _relative(v, out) for k, v in value.items()}
    text = str(value)
    return os.path.relpath(text, out) if text.startswith(str(out)) else value


def _describe(step, out: Path) -> dict:
    config = step.config
    entry = {"stage": step.stage, "deps": step.deps,
             "output_dir": _relative(config.output_dir, out),
             "model": _relative(config.model, out), "seed": config.seed}
    for key in ("arm", "arms", "arm_models", "iterations"):
        if hasattr(config, key):
            entry[key] = _relative(getattr(config, key), out)
    return entry


def test_plan_of_three_rounds_matches_golden(tmp_path):
    """Round r samples with round r-1's model of the arm, builds and trains in its own
    folder from that model; evaluations read the last round; base is not iterated."""
    out = tmp_path / "run"
    steps = _plan(out, arms=["base", "rft", "rft_bt", "rft_bt@forcing"], iterations=3)
    got = {s.name: _describe(s, out) for s in steps}
    expected = json.loads(GOLDEN.read_text())
    assert list(got) == list(expected)
    assert got == expected
    # what round 2 of rft_bt reads, as the stages resolve it from those configs
    from backtrack.arms import parent_model_path
    from backtrack.layout import RunLayout

    by_name = {s.name: s for s in steps}
    train2 = by_name["train_rft_bt_iter2"].config
    round1_model = str(out / "models" / "rft_bt")
    (out / "models" / "rft_bt").mkdir(parents=True)
    (out / "models" / "rft_bt" / "config.json").write_text("{}")
    assert parent_model_path("rft_bt", train2.model, train2.output_dir) == round1_model
    assert by_name["sample_rft_bt_iter2"].config.model == round1_model
    assert RunLayout.of(train2).sft_arm("rft_bt") == out / "iterations/rft_bt/iter2/sft/rft_bt"
    assert RunLayout.of(by_name["build_rft_bt_iter2"].config).samples == \
        out / "iterations/rft_bt/iter2/samples"


def test_one_round_plans_as_before(tmp_path):
    out = tmp_path / "run"
    once, default = _plan(out, iterations=1), _plan(out)
    assert [s.name for s in once] == [s.name for s in default]
    assert pipeline.step_digests(once) == pipeline.step_digests(default)
    assert not any("iter" in s.name for s in default)


def test_rounds_share_digests_across_run_folders(tmp_path):
    """A round's digest leaves out the previous model's path (a path inside the run), so two
    runs of a study that resolve a round alike share it; the round's seed is its own."""
    a = _plan(tmp_path / "a", arms=["base", "rft"], iterations=2)
    b = _plan(tmp_path / "b", arms=["base", "rft"], iterations=2)
    assert pipeline.step_digests(a) == pipeline.step_digests(b)
    steps = {s.name: s for s in a}
    assert steps["sample_rft_iter2"].config.seed != steps["sample"].config.seed
    other = _plan(tmp_path / "c", arms=["base", "rft"], iterations=2,
                  train={**TINY["train"], "learning_rate": 0.002})
    digests, changed = pipeline.step_digests(a), pipeline.step_digests(other)
    assert digests["sample"] == changed["sample"]
    assert digests["sample_rft_iter2"] != changed["sample_rft_iter2"]  # round 1 model differs


@pytest.mark.parametrize("arms, iterations, message", [
    (["base", "outcome_rl"], 2, "none of the arms .* trains with SFT on its own samples"),
    (["rft_bt", "outcome_rl_from_rft_bt"], 2,
     "'outcome_rl_from_rft_bt' trains on top of 'rft_bt', which iterates"),
    (["rft"], 0, "must be at least 1"),
])
def test_rounds_refused_where_they_cannot_apply(tmp_path, arms, iterations, message):
    with pytest.raises(UserError, match=message):
        _plan(tmp_path, arms=arms, iterations=iterations)


def test_accelerate_launch_of_a_later_round_trains_in_its_folder(tmp_path, monkeypatch):
    recipe = {**copy.deepcopy(TINY), "output_dir": str(tmp_path), "arms": ["rft"],
              "iterations": 2}
    config, recipe, source, shared = pipeline.resolve_recipe(
        recipe, "tiny.yaml", {"accelerate_config": "recipes/accelerate/ddp.yaml"})
    steps = {s.name: s for s in pipeline.plan(config, recipe, source, shared)}
    calls = []
    monkeypatch.setattr("subprocess.run",
                        lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    for name in ("train_rft", "train_rft_iter2"):
        steps[name].run(steps[name].config)
    first, second = calls
    assert "--output-dir" not in first and "--model" not in first
    option = {second[i]: second[i + 1] for i in range(len(second) - 1)}
    assert option["--output-dir"] == str(tmp_path / "iterations" / "rft" / "iter2")
    assert option["--model"] == str(tmp_path / "models" / "rft")
    assert option["--seed"] == str(steps["train_rft_iter2"].config.seed)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_rounds_end_to_end(tmp_path, monkeypatch):
    """Round 2 samples with round 1's model, trains round 1's model on round 2's own correct
    samples, the evaluation reads round 2's model, and the report records both rounds."""
    from datasets import load_from_disk

    from backtrack.build import read_records

    monkeypatch.setenv("BACKTRACK_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    recipe = {**copy.deepcopy(TINY), "output_dir": str(out), "arms": ["base", "rft"],
              "iterations": 2, "eval": {**TINY["eval"], "n": 1, "limit": 2}}
    recipe["toy_base"]["steps"] = 90
    config, recipe, source, shared = pipeline.resolve_recipe(recipe, "tiny.yaml", {})
    pipeline.run_steps(config, pipeline.plan(config, recipe, source, shared))
    round1, round2 = out / "models" / "rft", out / "iterations" / "rft" / "iter2"
    sampled = json.loads((round2 / "samples" / "run.json").read_text())
    assert sampled["model_path"] == str(round1)
    trained = json.loads((round2 / "models" / "rft" / "run.json").read_text())
    assert trained["base_model"] == str(round1)
    correct = {(r["prompt"], r["completion"]) for r in read_records(round2 / "samples")
               if r["correct"]}
    rows = load_from_disk(str(round2 / "sft" / "rft"))
    assert {(r["prompt"], r["completion"].removesuffix("<|im_end|>")) for r in rows} == correct
    first = {r["completion"] for r in read_records(out / "samples") if r["correct"]}
    assert {c for _, c in correct} != first  # fresh samples, not round 1's again
    metrics = json.loads((out / "eval" / "rft" / "metrics.json").read_text())
    assert metrics["model_path"] == str(round2 / "models" / "rft")
    rounds = json.loads((out / "report" / "results.json").read_text())["iterations"]["rft"]
    assert [r["iteration"] for r in rounds] == [1, 2]
    assert rounds[1]["sampled_from"] == str(round1)
    assert rounds[1]["sft"]["examples"] == len(rows)
    assert "## Iterations" in (out / "report" / "report.md").read_text()
