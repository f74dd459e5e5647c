"""`backtrack probe`: AUROC and its CI, the logistic probe, and the stage on the tiny model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from backtrack.errors import UserError
from backtrack.probe import (ProbeConfig, auroc, auroc_ci, average_ranks, fit_logistic, main,
                             probe_inputs)
from backtrack.store import RecordStore


def test_auroc_and_ranks():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1, 2, 3], [0, 1, 1]) == 1.0 and auroc([3, 2, 1], [0, 1, 1]) == 0.0
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5  # ties count half
    assert np.isnan(auroc([1, 2], [1, 1]))
    assert average_ranks([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_logistic_probe_separates_signal_and_not_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 20))
    signal = (x[:, 3] - 0.5 * x[:, 7] > 0).astype(float)
    noise = rng.integers(0, 2, 400).astype(float)
    train, test = slice(0, 300), slice(300, 400)
    assert auroc(fit_logistic(x[train], signal[train], 1.0)(x[test]), signal[test]) > 0.97
    assert abs(auroc(fit_logistic(x[train], noise[train], 1.0)(x[test]), noise[test]) - 0.5) < 0.15
    # a heavy penalty shrinks the weights: scores of all points close together
    spread = lambda l2: np.ptp(fit_logistic(x[train], signal[train], l2)(x[test]))  # noqa: E731
    assert spread(1e4) < 0.2 * spread(1.0)


def test_auroc_ci_resamples_problems():
    scores = [0.9, 0.8, 0.2, 0.1, 0.7, 0.3]
    labels = [1, 1, 0, 0, 1, 0]
    ci = auroc_ci(scores, labels, ["a", "a", "b", "b", "c", "c"], n_boot=300, seed=0)
    assert ci["value"] == 1.0 and ci["low"] == ci["high"] == 1.0
    # a resample of problem "a" alone holds one class: skipped, not counted as nan
    assert 0 < ci["resamples"] < 300
    mixed = auroc_ci([0.9, 0.2, 0.8, 0.3, 0.4, 0.6], labels, ["a", "a", "b", "b", "c", "c"],
                     n_boot=300, seed=0)
    assert mixed["low"] < mixed["value"] < 1 and mixed["high"] <= 1


def test_probe_inputs_cut_where_the_phrase_goes():
    records = [{"problem_id": "p", "sample_idx": 0, "round": 0, "prompt": "<P>",
                "completion": "<think>\n3 + 1 = 4\n</think>\nThe answer is 4.", "correct": True},
               {"problem_id": "p", "sample_idx": 1, "round": 0, "prompt": "<P>",
                "completion": "<think>\n3 + 1 = 5\n5 *", "correct": False,
                "finish_reason": "length"},
               {"problem_id": "p", "sample_idx": 2, "round": 1, "prompt": "<P>",
                "completion": "x", "correct": False}]
    rows = sorted(probe_inputs(records, 10, "w"), key=lambda r: r["sample_idx"])
    assert [r["text"] for r in rows] == ["<P><think>\n3 + 1 = 4\n", "<P><think>\n3 + 1 = 5\n"]
    assert len(probe_inputs(records, 1, "w")) == 1
    with pytest.raises(UserError, match="lacks key"):
        probe_inputs([{"problem_id": "p", "sample_idx": 0}], 10, "w")


def _write_samples(out, tokenizer, label) -> None:
    """60 problems x 4 samples; the label of each sample is `label(last digit, rng)`."""
    from backtrack.chat import render_prompt

    rng = np.random.default_rng(1)
    records = []
    for i in range(60):
        prompt = render_prompt(tokenizer, [{"role": "user", "content": f"Ann has {i} pens."}])
        for j in range(4):
            value = int(rng.integers(0, 100))
            records.append({"problem_id": f"p{i}", "sample_idx": j, "round": 0, "prompt": prompt,
                            "completion": f"<think>\n{i} + 2 = {value}</think>\n"
                                          f"The answer is {value}.",
                            "correct": bool(label(value % 10, rng)), "finish_reason": "stop"})
    with RecordStore(out / "samples", {"test": 1}) as store:
        store.append(records)


def _config(tmp_path, model, **kw) -> ProbeConfig:
    return ProbeConfig(output_dir=str(tmp_path), model=str(model), progress=False,
                       n_boot=200, **kw)


@pytest.mark.parametrize("kind", ["signal", "noise"])
def test_probe_stage_on_the_tiny_model(tmp_path, tiny_model_dir, kind):
    """Right = the cut text (before `</think>`) ends in an even digit: the state at the last kept token shows it
    (AUROC near 1). Right at random: the CI holds 0.5."""
    import torch

    from backtrack.models import load_tokenizer

    torch.set_num_threads(1)
    if kind == "signal":
        label = lambda digit, rng: digit % 2 == 0  # noqa: E731
    else:
        label = lambda digit, rng: rng.random() < 0.5  # noqa: E731
    _write_samples(tmp_path, load_tokenizer(str(tiny_model_dir)), label)
    result = main(_config(tmp_path, tiny_model_dir))
    saved = json.loads((tmp_path / "probe" / "base" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["train"]["samples"] + saved["heldout"]["samples"] == 240
    assert saved["train"]["problems"] + saved["heldout"]["problems"] == 60
    assert saved["samples_from"] == str(tmp_path / "samples") and saved["hidden_size"] == 32
    a = saved["auroc"]
    assert a["low"] <= a["value"] <= a["high"]
    if kind == "signal":
        assert a["value"] > 0.9 and a["low"] > 0.75
    else:
        assert a["low"] < 0.5 < a["high"]
    assert (tmp_path / "probe" / "base" / "run.json").is_file()


def test_trained_arm_samples_itself_and_bad_input(tmp_path, tiny_model_dir):
    """A trained arm's model samples the train split into probe/<arm>/samples; a random model
    gets none right, which is a one-line error naming that folder."""
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "rft")
    config = _config(tmp_path, tiny_model_dir, arm="rft", limit=3, k=2, max_new_tokens=5,
                     engine_args={"num_threads": 1})
    with pytest.raises(UserError, match="needs right and wrong samples") as err:
        main(config)
    folder = tmp_path / "probe" / "rft" / "samples"
    assert str(folder) in str(err.value) and "\n" not in str(err.value)
    assert len(RecordStore.read(folder).records()) == 6
    with pytest.raises(UserError, match="unknown arm"):
        _config(tmp_path, tiny_model_dir, arm="nope").validate()
    with pytest.raises(UserError, match="heldout_share"):
        _config(tmp_path, tiny_model_dir, heldout_share=1.0).validate()
