"""Metrics against hand-computed golden cases (tests/golden/metrics.json) and properties."""

from __future__ import annotations

import json
import math
import re
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from backtrack import metrics

GOLDEN = json.loads((Path(__file__).parent / "golden" / "metrics.json").read_text())


@pytest.mark.parametrize("case", GOLDEN["pass_at_k"], ids=lambda c: f"n{c['n']}c{c['c']}k{c['k']}")
def test_pass_at_k_golden(case):
    assert metrics.pass_at_k(case["n"], case["c"], case["k"]) == pytest.approx(case["expected"])


def test_pass_at_k_matches_binomial_form():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert metrics.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        metrics.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        metrics.pass_at_k(4, 1, 5)


@pytest.mark.parametrize("case", GOLDEN["maj_at_k"], ids=lambda c: f"{c['answers']}k{c['k']}")
def test_maj_at_k_golden(case):
    value = metrics.maj_at_k(case["answers"], case["correct"], case["k"])
    assert value == pytest.approx(case["expected"]), case["why"]


def test_maj_at_k_sampled_subsets_approximate_exact_average():
    rng = np.random.default_rng(1)
    answers = [str(a) for a in rng.integers(0, 4, size=16)]
    correct = [a == "2" for a in answers]
    exact = np.mean([metrics.majority_correct([answers[i] for i in s], [correct[i] for i in s])
                     for s in combinations(range(16), 5)])
    sampled = metrics.maj_at_k(answers, correct, 5, max_subsets=2000, seed=3)
    assert math.comb(16, 5) > 2000  # the sampled path is the one under test
    assert sampled == pytest.approx(exact, abs=0.03)
    assert sampled == metrics.maj_at_k(answers, correct, 5, max_subsets=2000, seed=3)


def test_maj_at_1_equals_accuracy():
    answers = ["1", "2", None, "1", "3"]
    correct = [True, False, False, True, False]
    assert metrics.maj_at_k(answers, correct, 1) == pytest.approx(0.4)


@pytest.mark.parametrize("case", GOLDEN["backtracks"], ids=lambda c: c["text"][:30])
def test_backtrack_counting_golden(case):
    assert metrics.count_backtracks(case["text"]) == case["expected"]
    assert metrics.first_attempt_text(case["text"]) == case["first_answer_text"]


def test_backtrack_pattern_is_configurable():
    text = "3 + 4 = 8\nOops, redo. 3 + 4 = 7"
    assert metrics.count_backtracks(text) == 0
    assert metrics.count_backtracks(text, r"\boops\b") == 1


def _last_number_check(text: str, gold: str) -> bool:
    numbers = re.findall(r"-?\d+", text)
    return bool(numbers) and numbers[-1] == gold


def test_summary_golden():
    case = GOLDEN["summary"]
    result = metrics.summarize(case["records"], check_first=_last_number_check, n_boot=200)
    assert result["ks"] == [1, 2]
    for name, expected in case["expected"].items():
        assert result["metrics"][name]["value"] == pytest.approx(expected), name
    expected_hist = {int(k): v for k, v in case["expected_histogram"].items()}
    assert result["backtrack_histogram"] == expected_hist
    assert result["problem_ids"] == ["p1", "p2"]
    assert result["per_problem"]["pass@1"] == [1.0, 0.0]
    json.dumps(result)  # JSON-ready


def test_power_of_two_ks():
    assert metrics.power_of_two_ks(16) == [1, 2, 4, 8, 16]
    assert metrics.power_of_two_ks(6) == [1, 2, 4, 6]
    assert metrics.power_of_two_ks(1) == [1]


def test_bootstrap_ci_brackets_mean_and_shrinks_with_more_problems():
    rng = np.random.default_rng(0)
    small = rng.random(20)
    large = rng.random(2000)
    point, low, high = metrics.bootstrap_ci(small, np.ones_like(small), seed=1)
    assert low < point < high and point == pytest.approx(small.mean())
    _, low2, high2 = metrics.bootstrap_ci(large, np.ones_like(large), seed=1)
    assert high2 - low2 < (high - low) / 3


def test_bootstrap_ci_of_ratio_skips_empty_denominators():
    point, low, high = metrics.bootstrap_ci(np.array([1, 0, 0]), np.array([2, 0, 0]), seed=0)
    assert point == 0.5 and low == 0.5 and high == 0.5
    assert all(math.isnan(x) for x in metrics.bootstrap_ci(np.zeros(3), np.zeros(3)))


def test_paired_bootstrap_detects_real_difference_only():
    rng = np.random.default_rng(0)
    base = rng.random(200)
    better = np.clip(base + 0.1, 0, 1)
    assert metrics.paired_bootstrap(better, base, n_boot=2000)["significant"]
    noise = base + rng.normal(0, 0.01, 200)
    result = metrics.paired_bootstrap(noise, base, n_boot=2000, seed=1)
    assert result["low"] < 0 < result["high"] and not result["significant"]
    same = metrics.paired_bootstrap(base, base, n_boot=500)
    assert same["diff"] == 0 and not same["significant"] and same["p_value"] == 1.0


def test_undefined_metrics_are_null_not_nan():
    records = [{"problem_id": "p", "sample_idx": 0, "completion": "The answer is 3.",
                "extracted": "3", "correct": True, "new_tokens": 4}]
    result = metrics.summarize(records, n_boot=20)
    assert result["metrics"]["accuracy_backtracked"] == {"value": None, "low": None, "high": None}
    json.loads(json.dumps(result), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
