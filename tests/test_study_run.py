"""`backtrack study` end to end on a tiny toy world: 2 variants x 2 seeds, shared steps, shards,
the study report, a re-run that does nothing, and bad input refused before anything runs."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess

import pytest
import yaml

from backtrack import study, study_run
from conftest import BACKTRACK_CMD
from test_pipeline import TINY

SHARED = ["sample", "backtrack", "build", "eval_base"]  # the variants differ only in `train`
OWN = ["train_rft", "train_rft_bt", "eval_rft", "eval_rft_bt"]
STEPS = ["toy_base", *SHARED[:3], *OWN[:2], "eval_base", *OWN[2:], "report"]


def _study(tmp_path, variants: str = "  slow: {}\n  fast: {train: {learning_rate: 0.003}}\n",
           seeds: str = "[0, 1]"):
    recipe = {**copy.deepcopy(TINY), "arms": ["base", "rft", "rft_bt"]}
    recipe.pop("output_dir")
    recipe["toy_base"]["steps"] = 90  # its loss has levelled off by then (~12 s on a free core)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(recipe))
    path = tmp_path / "study.yaml"
    path.write_text(f"recipe: base.yaml\nseeds: {seeds}\noutput_dir: {tmp_path / 'out'}\n"
                    f"variants:\n{variants}")
    return path


def _cli(path, env, *extra):
    return subprocess.run([*BACKTRACK_CMD, "study", "--config", str(path), *extra],
                          capture_output=True, text=True, env=env, timeout=600)


def _marker(run_dir, step):
    return json.loads((run_dir / "run" / "stages" / f"{step}.json").read_text())


def _assert_shared_once_per_seed(out, cache):
    """Each shared step was computed once per seed and linked into the other variant's run;
    what the variants change was computed in each; seeds share nothing."""
    for seed in (0, 1):
        slow, fast = out / "slow" / f"seed{seed}", out / "fast" / f"seed{seed}"
        for step in SHARED:
            a, b = _marker(slow, step), _marker(fast, step)
            assert a["shared"] == b["shared"] and a["config_hash"] == b["config_hash"]
            assert [a.get("linked", False), b.get("linked", False)].count(True) == 1
        assert (slow / "samples").resolve() == (fast / "samples").resolve()
        assert (slow / "eval" / "base").resolve() == (fast / "eval" / "base").resolve()
        for step in OWN:  # what the variants change is computed in each of them
            a, b = _marker(slow, step), _marker(fast, step)
            assert a["shared"] != b["shared"] and not a.get("linked") and not b.get("linked")
        assert (slow / "models" / "rft").resolve() != (fast / "models" / "rft").resolve()
        cached = [json.loads((r / "toy_base" / "run.json").read_text()).get("cached", False)
                  for r in (slow, fast)]
        assert sorted(cached) == [False, True]  # the toy base was trained once per seed
    assert (_marker(out / "slow" / "seed0", "sample")["shared"]
            != _marker(out / "slow" / "seed1", "sample")["shared"])  # seeds never share
    assert len([p for p in (cache / "toy").iterdir() if p.is_dir()]) == 2  # one model a seed


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_study_shares_steps_reports_and_resumes(tmp_path, cli_env):
    path = _study(tmp_path)
    cli_env["BACKTRACK_CACHE"] = str(tmp_path / "cache")
    out = tmp_path / "out"
    runs = study.study_runs(study.load_study(path))
    dry = _cli(path, cli_env, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert not out.exists()  # a dry run writes nothing
    for run in runs:
        assert re.search(rf"{run.variant} +{run.seed}  {re.escape(run.output_dir)}", dry.stdout)
    planned = {where.removeprefix("shared/") for _, where in
               study_run.share_groups(study.load_study(path), runs) if "shared/" in where}
    assert len(planned) == 2 * (len(SHARED) + 2 * len(OWN))  # per seed: shared + per variant
    for seed in (0, 1):  # one line per shared step and seed, read by both variants
        for step in SHARED:
            assert re.search(rf"^  {step} +shared/{step}-\w+  <- slow/seed{seed}, "
                             rf"fast/seed{seed}$", dry.stdout, re.M), (step, dry.stdout)

    # shard 0/2 first: it runs its runs only, and leaves the report to whoever finishes
    mine = {r.name for r in study.select_runs(runs, "0/2")}
    assert 0 < len(mine) < len(runs)
    first = _cli(path, cli_env, "--shard", "0/2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert set(re.findall(r"\[study\] run \d/\d: (\S+)", first.stdout)) == mine
    assert "the study report waits for" in first.stdout and not (out / "report").exists()
    second = _cli(path, cli_env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"study report: {out / 'report' / 'study.md'}" in second.stdout

    assert {p.name for p in (out / "shared").iterdir()} == planned
    _assert_shared_once_per_seed(out, tmp_path / "cache")

    results = json.loads((out / "report" / "study.json").read_text())
    assert results["missing"] == []
    assert {v: sorted(cells) for v, cells in results["cells"].items()} == {
        "slow": ["base", "rft", "rft_bt"], "fast": ["base", "rft", "rft_bt"]}
    assert results["cells"]["slow"]["base"] == results["cells"]["fast"]["base"]  # one eval
    for run in runs:
        run_dir = tmp_path / run.output_dir
        assert yaml.safe_load((run_dir / "recipe.yaml").read_text()) == run.recipe
        info = json.loads((run_dir / "run.json").read_text())
        assert info["recipe"] == str(run_dir / "recipe.yaml")
        assert (run_dir / "report" / "report.md").is_file()

    again = _cli(path, cli_env)
    assert again.returncode == 0, again.stderr[-3000:]
    for run in runs:
        block = again.stdout.split(f": {run.name} in ")[1].split("[study]")[0]
        assert [f"[run] {s}: skipped (done)" for s in STEPS] == re.findall(
            r"\[run\] \S+: [^\n]*", block)[:len(STEPS)], block


@pytest.mark.parametrize("variants, seeds, message", [
    ("  a: {train: {no_such_key: 1}}\n", "[0, 1]",
     "variant 'a': unknown key 'no_such_key' in section 'train'"),
    ("  a: {}\n", "[]", "key 'seeds' is empty"),
    ("  a: {}\n  b: {}\n  a: {train: {epochs: 2}}\n", "[0]", "two variants named 'a'"),
])
def test_bad_study_exits_2_with_one_line_and_runs_nothing(tmp_path, cli_env, variants, seeds,
                                                          message):
    path = _study(tmp_path, variants, seeds)
    cli_env["BACKTRACK_CACHE"] = str(tmp_path / "cache")
    for extra in ([], ["--dry-run"]):
        result = _cli(path, cli_env, *extra)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "study.yaml" in lines[0], lines
        assert result.stdout == ""
        assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_share_off_and_report_only(tmp_path, cli_env):
    path = _study(tmp_path)
    path.write_text(path.read_text() + "share: false\n")
    dry = _cli(path, cli_env, "--dry-run", "--shard", "1/2")
    assert dry.returncode == 0, dry.stderr
    assert "share off" in dry.stdout and "shared/" not in dry.stdout
    assert "(not this process" in dry.stdout
    for step in ("sample", "backtrack", "build", "eval_base", "report"):
        assert re.search(rf"^  {step} +4 computation\(s\), each read by one run$", dry.stdout, re.M)
    assert re.search(r"^  toy_base +cache toy/\w+  <- slow/seed1, fast/seed1$", dry.stdout, re.M)
    nothing = _cli(path, cli_env, "--report-only")
    assert nothing.returncode == 2 and "no metrics.json in any run" in nothing.stderr
    both = _cli(path, cli_env, "--report-only", "--dry-run")
    assert both.returncode == 2 and "give one of them" in both.stderr
    assert not os.path.exists(tmp_path / "out")


def test_the_toy_study_lists_its_runs(cli_env):
    result = subprocess.run([*BACKTRACK_CMD, "study", "--config", "recipes/study-toy.yaml",
                             "--dry-run"], capture_output=True, text=True, env=cli_env,
                            timeout=120, cwd=study.Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert "9 runs (3 variant(s) x 3 seed(s))" in result.stdout
    assert "variant bases: seed_scope all" in result.stdout
    for variant in ("default", "masked", "bases"):
        for seed in (0, 1, 2):
            assert f"runs/study-toy/{variant}/seed{seed}" in result.stdout
    assert re.search(r"^  eval_budget_forcing +3 computation", result.stdout, re.M)
    for step in ("build", "train_rft_fix", "eval_rft"):  # bases/seed0 is default/seed0
        assert re.search(rf"^  {step} +shared/.*<- default/seed0, bases/seed0$", result.stdout,
                         re.M), step
    # masked changes only rft_bt's data: each seed's base evaluation is shared by both variants
    assert re.search(r"^  eval_rft_bt +7 more, each read by one run", result.stdout, re.M)
    # bases/seed0 is default/seed0 (base seed 0 either way); seeds 1 and 2 train their own base
    assert re.search(r"eval_base +shared/.*<- default/seed0, masked/seed0, bases/seed0$",
                     result.stdout, re.M)
    for seed in (1, 2):
        assert re.search(rf"eval_base +shared/.*<- default/seed{seed}, masked/seed{seed}$",
                         result.stdout, re.M), seed
    assert re.search(r"^  toy_base +cache toy/\w+  <- default/seed0, .*, bases/seed0$",
                     result.stdout, re.M)
    assert re.search(r"^  toy_base +2 more, each read by one run$", result.stdout, re.M)


def test_dry_run_lists_the_steps_another_studys_share_holds(tmp_path, cli_env):
    path = _study(tmp_path)
    plain = _cli(path, cli_env, "--dry-run")
    assert plain.returncode == 0, plain.stderr
    sample = sorted(set(re.findall(r"shared/(sample-\w+)", plain.stdout)))[0]
    other = tmp_path / "other" / "shared"
    (other / sample).mkdir(parents=True)
    (other / sample / "share.json").write_text("{}")
    path.write_text(path.read_text() + f"reuse_shares: [{other}]\n")
    dry = _cli(path, cli_env, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "1 shared step(s) found in reuse_shares" in dry.stdout
    assert f"  {sample} <- {other}" in dry.stdout
    assert not os.path.exists(tmp_path / "out")  # a dry run imports nothing
