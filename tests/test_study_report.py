"""The study report on synthetic metrics.json files written by the real `metrics.summarize`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from backtrack import study, study_report
from backtrack.errors import UserError
from backtrack.metrics import summarize

RECIPE = "task: arith\nmodel: toy\ntoy_base: {steps: 5}\neval: {n: 4}\n"
PROBLEMS = 30
EASE = np.linspace(0.1, 0.7, PROBLEMS)  # per-problem chance that a base sample is right


def arm_records(seed: int, lift: float, tokens: int) -> list[dict]:
    """4 samples per problem; `lift` raises every problem's chance of a right sample."""
    rng = np.random.default_rng(seed * 100 + int(lift * 10))
    records = []
    for p in range(PROBLEMS):
        for i in range(4):
            right = bool(rng.random() < min(1.0, EASE[p] + lift))
            answer = "7" if right else str(10 + int(rng.integers(0, 3)))
            records.append({"problem_id": f"q{p:02d}", "sample_idx": i, "round": 0,
                            "completion": f"The answer is {answer}.", "extracted": answer,
                            "correct": right, "new_tokens": tokens, "finish_reason": "stop",
                            "answer": "7"})
    return records


def write_study(root, seeds: str, arms: str, variants: str):
    """A study file over the tiny recipe in `root`; (config, runs)."""
    (root / "base.yaml").write_text(RECIPE)
    (root / "study.yaml").write_text(
        f"recipe: base.yaml\nseeds: {seeds}\noutput_dir: {root / 'out'}\n"
        f"arms: {arms}\nvariants: {variants}\n")
    config = study.load_study(root / "study.yaml")
    return config, study.study_runs(config)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """2 variants x 3 seeds; rft is right far more often (+0.35, variant b +0.5) but writes
    3x the tokens."""
    root = tmp_path_factory.mktemp("study")
    config, runs = write_study(root, "[0, 1, 2]", "[base, rft]",
                               "{a: {}, b: {eval: {temperature: 0.6}}}")
    for run in runs:
        rft_lift = 0.35 if run.variant == "a" else 0.5
        for arm, lift, tokens in (("base", 0.0, 20), ("rft", rft_lift, 60)):
            if (run.name, arm) == ("b/seed2", "rft"):
                continue  # not evaluated yet: the report lists it and uses the other seeds
            folder = root / run.output_dir / "eval" / arm
            folder.mkdir(parents=True)
            summary = summarize(arm_records(run.seed, lift, tokens), n_boot=50)
            (folder / "metrics.json").write_text(json.dumps(summary))
    study_report.write_study_report(config, runs)
    return root


def test_writes_markdown_json_and_plots(study_dir):
    report = study_dir / "out" / "report"
    names = {p.name for p in report.iterdir()}
    assert {"study.md", "study.json", "pass_at_k.png", "maj_at_k.png", "pass_vs_tokens.png",
            "maj_vs_tokens.png"} <= names
    assert all((report / n).read_bytes()[:4] == b"\x89PNG" for n in names if n.endswith(".png"))
    assert not list((study_dir / "out").glob(".report.tmp-*"))


def test_cells_hold_mean_over_seeds_and_per_seed_values(study_dir):
    results = json.loads((study_dir / "out" / "report" / "study.json").read_text())
    for variant in ("a", "b"):
        for arm in ("base", "rft"):
            cell = results["cells"][variant][arm]
            seeds = [0, 1] if (variant, arm) == ("b", "rft") else [0, 1, 2]
            assert cell["seeds"] == seeds and cell["ks"] == [1, 2, 4]
            per_seed = [json.loads((study_dir / "out" / variant / f"seed{s}" / "eval" / arm /
                                    "metrics.json").read_text())["metrics"]["pass@1"]["value"]
                        for s in seeds]
            stat = cell["metrics"]["pass@1"]
            assert list(stat["per_seed"].values()) == pytest.approx(per_seed)
            assert stat["mean"] == pytest.approx(np.mean(per_seed))
            assert stat["low"] < stat["mean"] < stat["high"]
    assert results["missing"] == ["b/seed2/rft"]
    assert results["cells"]["a"]["rft"]["tokens_per_sample"] == pytest.approx(60)
    assert results["budgets"]["tokens"] == [20, 40, 80] and results["budgets"]["reference"] == "a/base"


def _row(results, a, b, metric):
    (row,) = [r for r in results["comparisons"]
              if (r["a"], r["b"], r["metric"]) == (a, b, metric)]
    return row


def test_equal_samples_and_equal_tokens_disagree_and_both_are_reported(study_dir):
    results = json.loads((study_dir / "out" / "report" / "study.json").read_text())
    samples = _row(results, "a/rft", "a/base", "pass@1")
    assert samples["basis"] == "equal samples"
    assert samples["mean"] > 0.2 and samples["significant"] and samples["seeds_agree"] == 3
    # 20 tokens buy one base sample but a third of an rft sample: base wins at equal tokens
    tokens = _row(results, "a/rft", "a/base", "pass at 20 tokens")
    assert tokens["basis"] == "equal tokens" and tokens["mean"] < 0 and tokens["significant"]
    # the largest budget both reach (80 tokens: 1.3 rft samples) is compared too
    assert _row(results, "a/rft", "a/base", "pass at 80 tokens")["seeds"] == 3
    across = _row(results, "b/rft", "a/rft", "pass@1")
    assert across["seeds"] == 2 and across["mean"] > 0  # paired on the seeds both have
    md = (study_dir / "out" / "report" / "study.md").read_text()
    assert "**Equal samples**" in md and "**Equal tokens**" in md
    assert "### At equal samples" in md and "### At equal tokens" in md
    assert "| a/rft − a/base | pass@1 |" in md and "| yes |" in md
    assert "Missing (not evaluated yet): b/seed2/rft" in md


def test_budget_beyond_n_samples_is_left_empty(study_dir):
    results = json.loads((study_dir / "out" / "report" / "study.json").read_text())
    rft = {p["budget"]: p["mean"] for p in results["cells"]["a"]["rft"]["budgets"]["pass"]}
    base = {p["budget"]: p["mean"] for p in results["cells"]["a"]["base"]["budgets"]["pass"]}
    assert base[80] is not None and rft[80] is not None  # 80 / 60 = 1.3 of 4 samples
    assert rft[20] == pytest.approx(results["cells"]["a"]["rft"]["metrics"]["pass@1"]["mean"] / 3)


def test_bad_or_missing_metrics_are_user_errors(tmp_path):
    (tmp_path / "base.yaml").write_text(RECIPE)
    (tmp_path / "study.yaml").write_text(
        f"recipe: base.yaml\nseeds: [0]\noutput_dir: {tmp_path / 'out'}\narms: [base]\n")
    config = study.load_study(tmp_path / "study.yaml")
    with pytest.raises(UserError, match="no metrics.json in any run"):
        study_report.write_study_report(config)
    bad = tmp_path / "out" / "default" / "seed0" / "eval" / "base" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{torn")
    with pytest.raises(UserError, match="metrics.json: not valid JSON"):
        study_report.write_study_report(config)
    assert not (tmp_path / "out" / "report").exists()


def test_runs_on_different_test_problems_are_refused(tmp_path):
    (tmp_path / "base.yaml").write_text(RECIPE)
    (tmp_path / "study.yaml").write_text(
        f"recipe: base.yaml\nseeds: [0, 1]\noutput_dir: {tmp_path / 'out'}\narms: [base]\n")
    config = study.load_study(tmp_path / "study.yaml")
    for seed, records in ((0, arm_records(0, 0.0, 20)), (1, arm_records(1, 0.0, 20)[:-8])):
        folder = tmp_path / "out" / "default" / f"seed{seed}" / "eval" / "base"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(summarize(records, n_boot=10)))
    with pytest.raises(UserError, match="cannot be compared: seed 1 was evaluated on other"):
        study_report.write_study_report(config)


def test_one_seed_never_holds_across_seeds():
    from backtrack.study_report import _verdict

    row = {"significant": True, "seeds_agree": 1, "seeds": 1}
    assert _verdict(row) == "CI only (1 seed)"
    assert _verdict({**row, "significant": False}) == "no"
    assert _verdict({**row, "seeds_agree": 2, "seeds": 2}) == "yes"


def backtracking_records(seed: int, switches: int) -> list[dict]:
    """4 samples per problem; the first `switches` samples of each problem state 12, back
    track and end at 7 (wrong -> right); seed 1 also turns one right answer wrong."""
    records = []
    for p in range(PROBLEMS):
        for i in range(4):
            if i < switches:
                text, answer = "The answer is 12. Wait, that's not right... The answer is 7.", "7"
            elif seed == 1 and i == 3:
                text, answer = "The answer is 7. Wait, that's not right... The answer is 9.", "9"
            else:
                text, answer = "The answer is 7.", "7"
            records.append({"problem_id": f"q{p:02d}", "sample_idx": i, "round": 0,
                            "completion": text, "extracted": answer, "correct": answer == "7",
                            "new_tokens": 20, "finish_reason": "stop", "answer": "7"})
    return records


def test_self_correction_shares_are_aggregated_over_seeds(tmp_path):
    config, runs = write_study(tmp_path, "[0, 1]", "[rft_bt]", "{a: {}}")
    for run, switches in zip(runs, (1, 2)):
        folder = tmp_path / run.output_dir / "eval" / "rft_bt"
        folder.mkdir(parents=True)
        summary = summarize(backtracking_records(run.seed, switches), n_boot=20,
                            check_first=lambda text, gold: re.findall(r"\d+", text)[-1] == gold)
        (folder / "metrics.json").write_text(json.dumps(summary))
    study_report.write_study_report(config, runs)
    report = tmp_path / "out" / "report"
    metrics = json.loads((report / "study.json").read_text())["cells"]["a"]["rft_bt"]["metrics"]
    # seed 0: 1 of 4 answers wrong -> right; seed 1: 2 of 4 wrong -> right, 1 right -> wrong
    assert metrics["delta_i2c"]["per_seed"] == pytest.approx({"0": 0.25, "1": 0.5})
    assert metrics["delta_c2i"]["per_seed"] == pytest.approx({"0": 0.0, "1": 0.25})
    assert metrics["share_backtracked"]["mean"] == pytest.approx((0.25 + 0.75) / 2)
    assert metrics["acc_first"]["per_seed"] == pytest.approx({"0": 0.75, "1": 0.5})
    text = (report / "study.md").read_text()
    assert "## Self-correction, across seeds" in text
    assert "| a | rft_bt | 50.0 [25.0, 75.0] |" in text  # ≥1 backtrack: seeds 25 and 75 %
