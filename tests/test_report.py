"""The report stage on synthetic evaluation outputs: files, table, significance sentences."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backtrack import metrics, report
from backtrack.errors import UserError


def _records(accuracy: float, seed: int, problems: int = 40, n: int = 8) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(problems):
        for i in range(n):
            ok = bool(rng.random() < accuracy)
            text = "<think>1 + 1 = 2</think>\nThe answer is 2." if ok else \
                "<think>1 + 1 = 3\nWait, that's not right... 1 + 1 = 3</think>\nThe answer is 3."
            rows.append({"problem_id": f"p{p}", "sample_idx": i, "answer": "2",
                         "completion": text, "extracted": "2" if ok else "3", "correct": ok,
                         "new_tokens": 12, "finish_reason": "stop"})
    return rows


def _write_arm(output_dir, arm, records):
    folder = output_dir / "eval" / arm
    folder.mkdir(parents=True)
    summary = metrics.summarize(records, n_boot=200)
    (folder / "metrics.json").write_text(json.dumps(summary))


def test_report_writes_tables_plots_and_significance(tmp_path):
    base = _records(0.3, seed=0)
    _write_arm(tmp_path, "base", base)
    _write_arm(tmp_path, "rft", _records(0.35, seed=1))
    _write_arm(tmp_path, "rft_bt", _records(0.8, seed=2))
    _write_arm(tmp_path, "budget_forcing", base)  # identical to base: no difference
    (tmp_path / "models" / "rft").mkdir(parents=True)
    (tmp_path / "models" / "rft" / "loss.json").write_text(
        json.dumps([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]))
    config = report.ReportConfig(output_dir=str(tmp_path), n_boot=2000)
    path = report.main(config)
    text = path.read_text()
    folder = tmp_path / "report"
    for name in ("pass_at_k.png", "maj_at_k.png", "backtracks_hist.png", "training_loss.png",
                 "results.json", "run.json"):
        assert (folder / name).stat().st_size > 0, name
    for arm in report.DEFAULT_ARMS:
        assert f"| {arm} |" in text
    results = json.loads((folder / "results.json").read_text())
    assert set(results["arms"]) == set(report.DEFAULT_ARMS)
    by_pair = {(c["arm"], c["reference"], c["metric"]): c for c in results["comparisons"]}
    assert by_pair[("rft_bt", "base", "pass@1")]["significant"]
    assert by_pair[("rft_bt", "base", "pass@1")]["diff"] > 0.3
    same = by_pair[("budget_forcing", "base", "pass@1")]
    assert same["diff"] == 0 and not same["significant"]
    assert ("rft_bt", "rft", "pass@8") in by_pair and ("rft_bt", "rft", "maj@8") in by_pair
    assert "**rft_bt vs base** on pass@1" in text and ": significant at the 95 % level" in text
    assert "not significant" in text
    assert results["training_loss"]["rft"]["loss"] == [2.0, 1.5]
    assert not list(tmp_path.glob(".report.tmp-*"))


def test_report_without_eval_outputs_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no metrics.json"):
        report.main(report.ReportConfig(output_dir=str(tmp_path)))
    assert not (tmp_path / "report").exists()


def test_load_loss_accepts_log_history_and_lists(tmp_path):
    path = tmp_path / "loss.json"
    path.write_text(json.dumps({"log_history": [{"step": 5, "loss": 1.0}, {"step": 6}]}))
    assert report.load_loss(path) == ([5.0], [1.0])
    path.write_text(json.dumps({"steps": [1, 2], "loss": [3.0, 2.0]}))
    assert report.load_loss(path) == ([1.0, 2.0], [3.0, 2.0])
    path.write_text(json.dumps([[1, 0.5]]))
    assert report.load_loss(path) == ([1.0], [0.5])


def test_verdict_says_plainly_whether_rft_bt_beats_rft():
    row = {"arm": "rft_bt", "reference": "rft", "metric": "pass@1", "diff": 0.1,
           "significant": True}
    assert "It beats it: significantly better on pass@1" in report.verdict([row], "rft_bt", "rft")
    flat = {**row, "metric": "pass@16", "diff": 0.01, "significant": False}
    assert "does not clearly beat it: no significant difference on pass@16" in \
        report.verdict([flat], "rft_bt", "rft")
    worse = {**row, "diff": -0.1}
    assert "does not clearly beat" in report.verdict([worse, flat], "rft_bt", "rft")
    assert "not both evaluated" in report.verdict([], "rft_bt", "rft")


def test_report_compares_arms_at_equal_tokens(tmp_path):
    """An arm twice as long per sample gets, at a budget of k base samples, its pass@(k/2):
    with every problem right half of the time, pass@1 = 0.5 and pass@2 = 1 - C(4,2)/C(8,2)."""
    def records(tokens):
        return [{"problem_id": f"p{p}", "sample_idx": i, "answer": "2", "completion": "x",
                 "extracted": "2" if i % 2 else "3", "correct": bool(i % 2),
                 "new_tokens": tokens, "finish_reason": "stop"}
                for p in range(4) for i in range(8)]

    _write_arm(tmp_path, "base", records(10))
    _write_arm(tmp_path, "rft_bt", records(20))
    path = report.main(report.ReportConfig(output_dir=str(tmp_path), arms=["base", "rft_bt"],
                                           n_boot=100))
    found = json.loads((tmp_path / "report" / "results.json").read_text())["compute_matched"]
    assert found["reference"] == "base" and found["budgets"] == [10, 20, 40, 80]
    base, long = found["arms"]["base"], found["arms"]["rft_bt"]
    assert long["tokens_per_sample"] == 20 and base["pass_at_budget"][1] == pytest.approx(
        1 - 6 / 28)  # base pass@2 at 20 tokens
    assert long["pass_at_budget"][1] == pytest.approx(0.5)  # one long sample at 20 tokens
    assert long["pass_at_budget"][0] == pytest.approx(0.25)  # half a sample: 0.5 x pass@1
    assert long["pass_at_budget"][3] == pytest.approx(1 - 1 / 70)  # pass@4 at 80 tokens
    text = path.read_text()
    assert "equal samples" in text and "equal generated tokens" in text
    assert (tmp_path / "report" / "pass_vs_tokens.png").stat().st_size > 0


def test_report_plots_rl_curves_of_rl_arms(tmp_path):
    _write_arm(tmp_path, "base", _records(0.3, seed=0))
    _write_arm(tmp_path, "score@single", _records(0.4, seed=1))
    (tmp_path / "models" / "score").mkdir(parents=True)
    log = [{"step": s, "reward": 0.1 * s, "accuracy_attempt1": 0.2, "accuracy_attempt2": 0.3}
           for s in (1, 2, 3)]
    (tmp_path / "models" / "score" / "rl_log.json").write_text(json.dumps(log))
    text = report.main(report.ReportConfig(output_dir=str(tmp_path), n_boot=100,
                                           arms=["base", "score@single"])).read_text()
    assert "rl_curves.png" in text
    assert (tmp_path / "report" / "rl_curves.png").stat().st_size > 0
