"""`backtrack run` end to end on a tiny toy world, then a re-run that skips every stage."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from backtrack import pipeline
from backtrack.config import read_recipe
from backtrack.errors import UserError
from backtrack.layout import RunLayout
from conftest import BACKTRACK_CMD

TINY = {
    "task": "arith",
    # 1-step sums: 14 chains in the train split, 49 left for the toy corpus.
    "task_args": {"steps": 1, "max_start": 9, "max_operand": 9, "ops": "+", "test_size": 8,
                  "train_size": 16},
    "model": "toy",
    "output_dir": "runs/never-used",  # overridden on the command line
    "toy_base": {"layers": 1, "hidden": 48, "heads": 2, "intermediate": 96, "vocab_size": 200,
                 "steps": 150, "batch_size": 16, "lr": 0.01, "warmup_steps": 10,
                 "eval_problems": 0, "correction_rate": 0.2, "threads": 1},
    "sample": {"k": 4, "limit": 16, "max_new_tokens": 40, "progress": False},
    "backtrack": {"max_new_tokens": 32, "progress": False},
    "train": {"max_steps": 2, "per_device_batch_size": 8, "learning_rate": 0.001,
              "save_steps": 100, "logging_steps": 1},
    "eval": {"n": 2, "limit": 4, "max_new_tokens": 40, "n_boot": 100, "progress": False},
    "report": {"n_boot": 200},
}
STEPS = ["toy_base", "sample", "backtrack", "build", "train_rft", "train_rft_bt", "eval_base",
         "eval_rft", "eval_rft_bt", "eval_budget_forcing", "report"]


def _run(recipe, out, env, *extra):
    return subprocess.run([*BACKTRACK_CMD, "run", "--config", str(recipe), "--output-dir",
                           str(out), *extra], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_end_to_end_then_resume_skips_everything(tmp_path, cli_env):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    cli_env["BACKTRACK_CACHE"] = str(tmp_path / "cache")
    first = _run(recipe, out, cli_env)
    assert first.returncode == 0, first.stderr[-3000:]
    for step in STEPS:
        assert f"[run] {step}: done in" in first.stdout, step
    assert f"report: {out / 'report' / 'report.md'}" in first.stdout
    results = json.loads((out / "report" / "results.json").read_text())
    assert set(results["arms"]) == {"base", "rft", "rft_bt", "budget_forcing"}
    assert results["arms"]["rft"]["samples"] == 8  # 4 problems x 2 samples
    text = (out / "report" / "report.md").read_text()
    assert all(f"| {arm} |" in text for arm in results["arms"])
    timings = json.loads((out / "timings.json").read_text())
    assert [k for k in timings if k != "total"] == STEPS
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["steps"]["sample"]["output_dir"] == str(out)  # CLI override reached stages

    second = _run(recipe, out, cli_env)
    assert second.returncode == 0, second.stderr[-3000:]
    for step in STEPS:
        assert f"[run] {step}: skipped (done)" in second.stdout, step

    # A changed eval option re-runs only the eval steps and the report.
    TINY["eval"]["temperature"] = 0.5
    recipe.write_text(yaml.safe_dump(TINY))
    third = _run(recipe, out, cli_env, "--stages", "[eval, report]")
    TINY["eval"].pop("temperature")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "[run] train_rft: skipped (done)" in third.stdout
    assert "[run] eval_base: done in" in third.stdout and "[run] report: done in" in third.stdout
    assert list((out / "run" / "stale").glob("*/eval_base-eval-base"))


def test_shared_cli_overrides_apply_to_every_stage(tmp_path):
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump({**TINY, "seed": 3, "eval": {"seed": 9, "n": 2}}))
    overrides = {"output_dir": str(tmp_path / "o")}  # as the CLI hands them over
    effective, recipe, source, shared = pipeline.resolve_run(str(recipe_path), overrides)
    assert shared == overrides and effective.seed == 3
    steps = {s.name: s for s in pipeline.plan(effective, recipe, source, shared)}
    assert steps["eval_base"].config.seed == 9  # a stage section still wins over the top level
    assert steps["sample"].config.seed == 3
    assert all(s.config.output_dir == str(tmp_path / "o") for s in steps.values())
    assert steps["train_rft"].config.arm == "rft" and steps["eval_rft_bt"].config.arms == ["rft_bt"]

    effective, recipe, source, shared = pipeline.resolve_run(str(recipe_path), {"seed": 5})
    steps = {s.name: s for s in pipeline.plan(effective, recipe, source, shared)}
    assert steps["eval_base"].config.seed == 5 and steps["sample"].config.seed == 5


def test_plan_follows_the_recipes_arms_and_their_parents(tmp_path):
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump({**TINY, "arms": ["rft_bt", "base@two_attempt"]}))
    effective, recipe, source, shared = pipeline.resolve_run(str(recipe_path), {})
    steps = {s.name: s for s in pipeline.plan(effective, recipe, source, shared)}
    assert list(steps) == ["toy_base", "sample", "backtrack", "build", "train_rft_bt",
                           "eval_rft_bt", "eval_base@two_attempt", "report"]
    assert steps["build"].config.arms == ["rft_bt"]
    assert steps["eval_base@two_attempt"].deps == ["toy_base"]
    assert steps["report"].config.arms == ["rft_bt", "base@two_attempt"]
    only_base = {**TINY, "arms": ["base"]}
    recipe_path.write_text(yaml.safe_dump(only_base))
    plan = pipeline.plan(*pipeline.resolve_run(str(recipe_path), {}))
    assert [s.name for s in plan] == ["toy_base", "eval_base", "report"]
    recipe_path.write_text(yaml.safe_dump({**TINY, "arms": ["base", "nope"]}))
    with pytest.raises(UserError, match="unknown arm 'nope'.*known: base"):
        pipeline.resolve_run(str(recipe_path), {})


def test_build_options_of_other_arms_leave_the_build_hash_alone(tmp_path):
    """S²R's data options (build.s2r) re-run the build of s2r_sft, not that of rft / rft_bt."""
    recipe_path = tmp_path / "r.yaml"

    def digests(arms, build):
        recipe_path.write_text(yaml.safe_dump({**TINY, "arms": arms,
                                                "build": {**TINY.get("build", {}), **build}}))
        return pipeline.step_digests(pipeline.plan(*pipeline.resolve_run(str(recipe_path), {})))

    s2r = {"s2r": {"max_trajectories": 10}}
    plain, with_s2r = digests(["rft", "rft_bt"], {}), digests(["rft", "rft_bt"], s2r)
    assert plain["build"] == with_s2r["build"] and plain["eval_rft"] == with_s2r["eval_rft"]
    assert digests(["rft", "s2r_sft"], {})["build"] != digests(["rft", "s2r_sft"], s2r)["build"]
    # an option every arm reads still counts
    assert plain["build"] != digests(["rft", "rft_bt"], {"loss_on": "masked_wrong"})["build"]


def test_step_hash_follows_config_and_upstream():
    a = pipeline.RunConfig(seed=1)
    assert pipeline.config_hash(a, ["x"]) == pipeline.config_hash(pipeline.RunConfig(seed=1), ["x"])
    assert pipeline.config_hash(a, ["x"]) != pipeline.config_hash(a, ["y"])
    assert pipeline.config_hash(a, ["x"]) != pipeline.config_hash(pipeline.RunConfig(seed=2), ["x"])
    # fields declared hashed=False (how a step runs, not what it makes) never re-run a step
    moved = pipeline.RunConfig(seed=1, output_dir="elsewhere", force=True)
    assert pipeline.config_hash(a, ["x"]) == pipeline.config_hash(moved, ["x"])


@pytest.mark.parametrize("name", ["toy.yaml", "gsm8k-smollm2-cpu.yaml",
                                  "gsm8k-llama3.2-1b-instruct.yaml",
                                  "gsm8k-qwen2.5-1.5b-instruct.yaml"])
def test_recipes_resolve_for_every_stage(name):
    path = pipeline.EMBEDDED_RECIPE.parent / name
    effective, recipe, source, shared = pipeline.resolve_run(str(path), {})
    assert read_recipe(path) == recipe and not shared
    steps = pipeline.plan(effective, recipe, source, shared)
    assert [s.name for s in steps][-1] == "report"
    assert len({s.config.output_dir for s in steps}) == 1


def test_accelerate_config_launches_train_steps_as_subprocesses(tmp_path, monkeypatch):
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(TINY))
    effective, recipe, source, shared = pipeline.resolve_run(
        str(recipe_path), {"seed": 7, "accelerate_config": "recipes/accelerate/ddp.yaml"})
    steps = {s.name: s for s in pipeline.plan(effective, recipe, source, shared)}
    calls = []
    monkeypatch.setattr("subprocess.run",
                        lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    step = steps["train_rft_bt"]
    step.run(step.config)
    (cmd,) = calls
    assert cmd[1:5] == ["-m", "accelerate.commands.launch", "--config_file",
                        "recipes/accelerate/ddp.yaml"]
    assert cmd[5:9] == ["-m", "backtrack.cli", "train", "--arm"] and cmd[9] == "rft_bt"
    assert cmd[cmd.index("--config") + 1] == str(recipe_path)
    assert cmd[cmd.index("--seed") + 1] == "7"
    monkeypatch.setattr("subprocess.run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(UserError, match="rft_bt"):
        step.run(step.config)


def test_changed_train_step_sets_aside_model_and_checkpoints(tmp_path):
    from backtrack.train import TrainConfig

    for folder in ("models/rft", "checkpoints/rft"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "f").write_text("old")
    step = pipeline.Step("train_rft", "train", TrainConfig(arm="rft", output_dir=str(tmp_path)),
                         lambda c: None, ["build"])
    layout = RunLayout(tmp_path)
    prepared = pipeline._prepare(step, {"config_hash": "old"}, True, layout)
    assert not (tmp_path / "models" / "rft").exists()
    assert not (tmp_path / "checkpoints" / "rft").exists()
    moved = sorted(p.name for p in (tmp_path / "run" / "stale").glob("*/*"))
    assert moved == ["train_rft-checkpoints-rft", "train_rft-models-rft"]
    assert prepared.resume is False
    (tmp_path / "checkpoints" / "rft").mkdir(parents=True)  # interrupted, never finished
    assert pipeline._prepare(step, None, False, layout).resume is True


def test_without_config_the_embedded_toy_recipe_applies():
    effective, recipe, source, shared = pipeline.resolve_run(None, {"seed": 4})
    assert source == str(pipeline.EMBEDDED_RECIPE) and recipe["model"] == "toy"
    assert effective.output_dir == recipe["output_dir"] and shared == {"seed": 4}


def test_arms_pass_upstream_options_and_new_default_options_keep_hashes(tmp_path, monkeypatch):
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump({**TINY, "arms": ["rft_bt_confirm", "base"]}))
    steps = {s.name: s for s in pipeline.plan(*pipeline.resolve_run(str(recipe_path), {}))}
    assert steps["backtrack"].config.confirm == 1000  # the confirm arm's stage_args
    recipe_path.write_text(yaml.safe_dump({**TINY, "arms": ["rft_bt_confirm"],
                                           "backtrack": {**TINY["backtrack"], "confirm": 7}}))
    steps = {s.name: s for s in pipeline.plan(*pipeline.resolve_run(str(recipe_path), {}))}
    assert steps["backtrack"].config.confirm == 7  # the recipe's own value wins
    from backtrack.sample import SampleConfig

    before = pipeline.config_hash(SampleConfig(k=8), [])
    assert before == pipeline.config_hash(SampleConfig(k=8, progress=False), [])
    assert before != pipeline.config_hash(SampleConfig(k=8, top_p=0.9), [])
    assert before == pipeline.config_hash(SampleConfig(k=8, top_p=1.0), [])  # a default


@pytest.mark.parametrize("arms", ["base,rft,rft_bt", "rft,rft_fix", "rft_bt_confirm"])
def test_plans_without_verify_keep_their_digests(arms):
    """The verify stage changed how the build step's upstream is chosen; a plan whose arms
    read no verify has the digests it had before (golden: computed on main before it)."""
    golden = json.loads((Path(__file__).parent / "golden" / "verify.json").read_text())
    recipe = {**TINY, "arms": arms.split(",")}
    steps = pipeline.plan(*pipeline.resolve_recipe(recipe, "tiny", {"output_dir": "runs/x"}))
    assert pipeline.step_digests(steps) == golden["plan_digests"][arms]


def test_verify_step_gets_the_cues_of_the_s2r_data():
    """s2r_sft reads verify: the plan runs it after sample with build.s2r's cues, and the build
    reads backtrack and verify; a verify section that says other cues is refused."""
    cues = {"verify_cue": "Hmm, let me check.", "verdict_wrong": "That is not right."}
    recipe = {**TINY, "arms": ["rft_bt", "s2r_sft"], "build": {"s2r": cues},
              "verify": {"tries": 2, "verify_cue": "Hmm, let me check."}}
    steps = {s.name: s for s in pipeline.plan(*pipeline.resolve_recipe(recipe, "tiny", {}))}
    assert list(steps)[:5] == ["toy_base", "sample", "backtrack", "verify", "build"]
    verify = steps["verify"].config
    assert steps["verify"].deps == ["sample"] and steps["build"].deps == ["backtrack", "verify"]
    assert (verify.tries, verify.verify_cue, verify.verdict_wrong, verify.retry_cue) == \
        (2, "Hmm, let me check.", "That is not right.", "Let me try again.")
    alone = {s.name: s.deps for s in pipeline.plan(*pipeline.resolve_recipe(
        {**TINY, "arms": ["s2r_sft"]}, "tiny", {}))}
    assert alone["build"] == ["verify"]
    rounds = {s.name: s for s in pipeline.plan(*pipeline.resolve_recipe(
        {**recipe, "arms": ["s2r_sft"], "iterations": 2}, "tiny", {"output_dir": "o"}))}
    again = rounds["verify_s2r_sft_iter2"]
    assert again.deps == ["sample_s2r_sft_iter2"] and again.config.verify_cue == verify.verify_cue
    assert again.config.output_dir == "o/iterations/s2r_sft/iter2"
    assert rounds["build_s2r_sft_iter2"].deps == ["verify_s2r_sft_iter2"]
    recipe["verify"] = {"verdict_wrong": "Nope."}
    with pytest.raises(UserError, match=r"^key 'verify.verdict_wrong' \('Nope.'\) differs from "
                                        r"build.s2r.verdict_wrong \('That is not right.'\); set "
                                        r"it once, in build.s2r$"):
        pipeline.plan(*pipeline.resolve_recipe(recipe, "tiny", {}))
