"""The eval stage: records and metrics per arm on a tiny model, resume, budget forcing."""

from __future__ import annotations

import json
import pytest

from backtrack import evaluate
from backtrack.errors import UserError


def _config(tmp_path, model_dir, **kw):
    base = dict(model=str(model_dir), output_dir=str(tmp_path), n=4, limit=3,
                max_new_tokens=12, batch_size=2, n_boot=100, progress=False)
    return evaluate.EvalConfig(**{**base, **kw})


def test_eval_writes_records_and_metrics_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
    config = _config(tmp_path, tiny_model_dir, arms=["base", "budget_forcing"])
    results = evaluate.main(config)
    for arm in ("base", "budget_forcing"):
        folder = tmp_path / "eval" / arm
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["problems"] == 3 and metrics["samples"] == 12
        assert metrics["ks"] == [1, 2, 4]
        assert {"pass@4", "maj@4", "backtracks_per_answer", "delta_i2c"} <= set(metrics["metrics"])
        engine = json.loads((folder / "run.json").read_text())["engine"]
        assert engine == {"device": "cpu", "dtype": "float32", "cpu_kernel": False,
                          "kv_cache_dtype": "float32"}
        rows = [json.loads(line) for f in folder.glob("records-*.jsonl")
                for line in f.read_text().splitlines()]
        assert len(rows) == 12 and all(r["new_tokens"] >= 1 and r["arm"] == arm for r in rows)
        assert results[arm]["metrics"]["pass@1"]["value"] == metrics["metrics"]["pass@1"]["value"]

    def no_engine(*args, **kwargs):
        raise AssertionError("a finished evaluation must not generate again")

    monkeypatch.setattr("backtrack.engines.make_engine", no_engine)
    again = evaluate.main(config)
    assert again["base"]["per_problem"] == results["base"]["per_problem"]


def test_eval_refuses_store_of_other_config(tmp_path, tiny_model_dir):
    evaluate.main(_config(tmp_path, tiny_model_dir, arms=["base"], n=2, limit=1))
    with pytest.raises(UserError, match="different config"):
        evaluate.main(_config(tmp_path, tiny_model_dir, arms=["base"], n=2, limit=1,
                              temperature=0.5))


def test_missing_trained_arm_is_a_user_error(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="models/rft"):
        evaluate.main(_config(tmp_path, tiny_model_dir, arms=["rft"]))
    with pytest.raises(UserError, match="unknown arm"):
        evaluate.EvalConfig(arms=["nope"]).validate()


def test_self_correction_stats_use_the_task_checker():
    from backtrack.tasks import get_task

    task = get_task("arith")
    records = [
        {"problem_id": "p", "sample_idx": 0, "answer": "7", "new_tokens": 5,
         "completion": "<think>3 + 4 = 8\nWait, that's not right... 3 + 4 = 7</think>\n"
                       "The answer is 7.", "extracted": "7", "correct": True},
        {"problem_id": "p", "sample_idx": 1, "answer": "7", "new_tokens": 5,
         "completion": "<think>3 + 4 = 7\nHmm, let me check that again. 3 + 4 = 6</think>\n"
                       "The answer is 6.", "extracted": "6", "correct": False},
    ]
    summary = evaluate.summarize_arm(evaluate.EvalConfig(n_boot=50), task, records)
    m = summary["metrics"]
    assert m["acc_first"]["value"] == 0.5 and m["acc_final"]["value"] == 0.5
    assert m["delta_i2c"]["value"] == 0.5 and m["delta_c2i"]["value"] == 0.5
    assert m["backtracks_per_answer"]["value"] == 1.0


def test_dev_split_skips_the_sampled_train_problems(tmp_path, tiny_model_dir):
    from backtrack.tasks import get_task

    config = _config(tmp_path, tiny_model_dir, arms=["base"], n=1, split="train", skip=5,
                     limit=2)
    summary = evaluate.main(config)["base"]
    train_ids = [p.id for p in get_task("arith").problems("train", 7)]
    assert summary["problem_ids"] == sorted(train_ids[5:7])
    assert (tmp_path / "eval_dev" / "base" / "metrics.json").is_file()
    assert not (tmp_path / "eval").exists()
    with pytest.raises(UserError, match="skip"):
        evaluate.EvalConfig(split="train").validate()
