"""Study statistics against hand-computed golden cases (tests/golden/study.json) and properties."""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path

import numpy as np
import pytest

from backtrack import study_stats

GOLDEN = json.loads((Path(__file__).parent / "golden" / "study.json").read_text())


@pytest.mark.parametrize("case", GOLDEN["hierarchical_mean"], ids=lambda c: c["why"][:30])
def test_hierarchical_mean_golden(case):
    result = study_stats.hierarchical_mean(case["per_seed"], n_boot=4000)
    assert result["mean"] == pytest.approx(case["mean"]), case["why"]
    assert result["per_seed"] == pytest.approx(case["seed_means"])
    assert result["seeds"] == len(case["per_seed"]) and result["problems"] == 3
    assert result["low"] <= result["mean"] <= result["high"]
    if "low" in case:
        assert (result["low"], result["high"]) == pytest.approx((case["low"], case["high"]))


@pytest.mark.parametrize("case", GOLDEN["paired_difference"], ids=lambda c: c["why"][:30])
def test_paired_difference_golden(case):
    result = study_stats.paired_difference(case["a"], case["b"], n_boot=4000)
    assert result["mean"] == pytest.approx(case["mean"]), case["why"]
    assert result["per_seed"] == pytest.approx(case["seed_means"])
    assert result["seeds_agree"] == case["seeds_agree"]
    assert result["significant"] is case["significant"]
    if "low" in case:
        assert (result["low"], result["high"]) == pytest.approx((case["low"], case["high"]))
    else:
        assert result["low"] < 0 < result["high"]


def test_replicates_match_the_exact_bootstrap_distribution():
    """2 seeds x 3 problems: all 4 x 27 equally likely (seed draw, problem draw) pairs,
    enumerated independently, against the vectorised sampler."""
    matrix = np.array([[1.0, 0.5, 0.0], [1.0, 1.0, 0.25]])
    exact = [np.mean([matrix[s, p] for s in seeds for p in probs])
             for seeds in product(range(2), repeat=2) for probs in product(range(3), repeat=3)]
    replicates = study_stats.hierarchical_replicates(matrix, n_boot=40000, seed=1)
    assert replicates.mean() == pytest.approx(np.mean(exact), abs=0.003)
    assert replicates.std() == pytest.approx(np.std(exact), rel=0.02)


def test_interval_accounts_for_seeds_and_problems():
    """Wider than a bootstrap over problems alone when seeds differ, and than one over
    seeds alone when problems differ."""
    rng = np.random.default_rng(0)
    difficulty = rng.random(100)
    seed_shift = rng.normal(0, 0.08, size=8)
    matrix = difficulty[None, :] + seed_shift[:, None]
    per_seed = {s: {f"p{i}": v for i, v in enumerate(row)} for s, row in enumerate(matrix)}
    both = study_stats.hierarchical_mean(per_seed, n_boot=3000)
    problems_only = study_stats.hierarchical_replicates(matrix.mean(axis=0, keepdims=True), 3000)
    seeds_only = study_stats.hierarchical_replicates(matrix.mean(axis=1, keepdims=True), 3000)
    width = both["high"] - both["low"]
    assert width > np.subtract(*np.quantile(problems_only, [0.975, 0.025])) * 1.2
    assert width > np.subtract(*np.quantile(seeds_only, [0.975, 0.025])) * 1.2


def test_seeds_must_share_problems_and_values_must_be_defined():
    with pytest.raises(ValueError, match="other problems"):
        study_stats.hierarchical_mean({0: {"p1": 1.0}, 1: {"p2": 1.0}})
    with pytest.raises(ValueError, match="undefined"):
        study_stats.hierarchical_mean({0: {"p1": None}})
    with pytest.raises(ValueError, match="share no seed"):
        study_stats.paired_difference({0: {"p1": 1.0}}, {1: {"p1": 1.0}})


def test_problem_order_does_not_matter():
    a = study_stats.hierarchical_mean({0: {"x": 1.0, "y": 0.0}, 1: {"y": 0.5, "x": 0.0}})
    b = study_stats.hierarchical_mean({0: {"y": 0.0, "x": 1.0}, 1: {"x": 0.0, "y": 0.5}})
    assert a == b


def _records(arm: dict, answers: dict) -> list[dict]:
    records = []
    for pid, samples in arm.items():
        for i, (extracted, correct, tokens) in enumerate(samples):
            records.append({"problem_id": pid, "sample_idx": i, "round": 0,
                            "completion": f"The answer is {extracted}.", "extracted": extracted,
                            "correct": correct, "new_tokens": tokens, "finish_reason": "stop",
                            "answer": answers[pid]})
    return records


TOKENS = GOLDEN["token_budget"]
SUMMARIES = {name: study_stats.summary_from_records(_records(arm, TOKENS["answers"]), n_boot=10)
             for name, arm in TOKENS["arms"].items()}


@pytest.mark.parametrize("arm", sorted(TOKENS["arms"]))
@pytest.mark.parametrize("prefix", ["pass", "maj"])
def test_cost_curves_golden(arm, prefix):
    curve = study_stats.cost_curve(SUMMARIES[arm], prefix)
    got = [x for p in curve for x in (p["k"], p["tokens"], p["value"])]
    expected = [x for point in TOKENS["curves"][arm][prefix] for x in point]
    assert got == pytest.approx(expected), TOKENS["why"]


@pytest.mark.parametrize("arm", sorted(TOKENS["arms"]))
@pytest.mark.parametrize("prefix", ["pass", "maj"])
def test_budget_accuracy_golden(arm, prefix):
    for budget, expected in TOKENS["budgets"][arm].get(prefix, []):
        got = study_stats.budget_accuracy(SUMMARIES[arm], budget, prefix)
        if expected is None:
            assert got is None, (arm, budget)
        else:
            assert got == pytest.approx(expected), (arm, prefix, budget)


def test_equal_samples_and_equal_tokens_rank_arms_differently():
    short, long = SUMMARIES["short"], SUMMARIES["long"]
    assert long["metrics"]["pass@1"]["value"] > short["metrics"]["pass@1"]["value"]
    assert study_stats.budget_accuracy(short, 30) > study_stats.budget_accuracy(long, 30)


def test_budget_accuracy_never_exceeds_the_concave_pass_curve():
    """The mixture between evaluated ks lies on or under pass@k at every integer k."""
    rng = np.random.default_rng(3)
    records = [{"problem_id": f"p{p}", "sample_idx": i, "correct": bool(rng.random() < 0.3 + p / 20),
                "extracted": "1", "new_tokens": int(rng.integers(5, 50)), "completion": "",
                "answer": "1"} for p in range(8) for i in range(8)]
    full = study_stats.summary_from_records(records, n_boot=10)
    grid = {**full, "ks": [1, 2, 4, 8]}
    t_mean = np.mean(full["per_problem"]["mean_new_tokens"])
    for k in range(1, 9):
        exact = np.mean(full["per_problem"][f"pass@{k}"])
        assert study_stats.budget_accuracy(grid, k * t_mean) <= exact + 1e-12
        assert study_stats.budget_accuracy(full, k * t_mean) == pytest.approx(exact)


def test_study_budget_uses_each_seeds_own_length():
    result = study_stats.study_budget({0: SUMMARIES["short"], 1: SUMMARIES["long"]}, 30, n_boot=500)
    assert result["per_seed"] == pytest.approx({"0": 1.0, "1": 0.75})
    assert study_stats.study_budget({0: SUMMARIES["short"], 1: SUMMARIES["long"]}, 45) is None
