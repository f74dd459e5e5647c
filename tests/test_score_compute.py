"""SCoRe's inference-compute comparison: votes over (attempt 1, attempt 2) pairs against maj@K
of single attempts, on hand-made records (golden) and through the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backtrack import metrics, report, score_compute
from backtrack.store import RecordStore

GOLDEN = json.loads((Path(__file__).parent / "golden" / "score_compute.json").read_text())


def test_comparison_golden():
    found = score_compute.compare_records(GOLDEN["two_attempt"], GOLDEN["single"], n_boot=200)
    expected = GOLDEN["expected"]
    for key in ("problems", "pairs_per_problem", "singles_per_problem"):
        assert found[key] == expected[key], key
    assert [r["k"] for r in found["rows"]] == [r["k"] for r in expected["rows"]]
    for row, want in zip(found["rows"], expected["rows"]):
        for name in ("parallel", "pairs", "attempt2_only"):
            assert row[name]["value"] == pytest.approx(want[name]), (row["k"], name)
            assert row[name]["low"] <= row[name]["value"] <= row[name]["high"]
        assert row["pairs_minus_parallel"]["diff"] == pytest.approx(want["pairs_minus_parallel"])
        assert row["pairs_minus_parallel"]["problems"] == 2
        assert row["tokens_parallel"] == pytest.approx(want["tokens_parallel"])
        assert row["tokens_pairs"] == pytest.approx(want["tokens_pairs"])


def test_pair_votes_count_both_attempts():
    # one pair: attempt 1 right, attempt 2 wrong -> a tie the smaller answer wins
    pair = [{"attempt1_extracted": "2", "attempt1_correct": True, "extracted": "9",
             "correct": False}]
    assert score_compute.pairs_majority(pair, 2) == 1.0
    pair[0]["attempt1_extracted"], pair[0]["extracted"] = "9", "2"
    pair[0]["attempt1_correct"], pair[0]["correct"] = False, True
    assert score_compute.pairs_majority(pair, 2) == 1.0
    pair[0]["extracted"], pair[0]["correct"] = None, False  # no answer never wins a tie
    assert score_compute.pairs_majority(pair, 2) == 0.0


def _store(folder: Path, records: list[dict]) -> None:
    with RecordStore(folder, {"test": 1}) as store:
        store.append([{**r, "round": 0} for r in records])
    (folder / "metrics.json").write_text(json.dumps(metrics.summarize(records, n_boot=50)))


def test_report_holds_the_comparison(tmp_path):
    _store(tmp_path / "eval" / "score", GOLDEN["two_attempt"])
    _store(tmp_path / "eval" / "score@single", GOLDEN["single"])
    _store(tmp_path / "eval" / "base", GOLDEN["single"])  # no two-attempt records: no row
    text = report.main(report.ReportConfig(output_dir=str(tmp_path), n_boot=100,
                                           arms=["base", "score", "score@single"])).read_text()
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    found = results["score_compute"]
    assert list(found) == ["score"] and found["score"]["single"] == "score@single"
    assert [r["k"] for r in found["score"]["rows"]] == [2, 4]
    assert found["score"]["rows"][1]["pairs"]["value"] == pytest.approx(5 / 12)
    assert "## Self-correction against parallel sampling at equal samples (SCoRe)" in text
    assert "| score | score@single | 4 | 0.0 [0.0, 0.0] | 41.7 [" in text
