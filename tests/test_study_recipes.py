"""The issue-15 study files dry-run cleanly, and share the steps their headers say they share
(nothing runs: plans and step digests only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backtrack import study, study_run

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _groups(name: str) -> tuple[list, dict[str, dict[str, set[str]]]]:
    """The study's runs, and {step: {where it is kept: runs reading it}}."""
    config = study.load_study(RECIPES / name)
    runs = study.study_runs(config)
    groups: dict[str, dict[str, set[str]]] = {}
    for (step, where), names in study_run.share_groups(config, runs).items():
        groups.setdefault(step, {})[where] = set(names)
    return runs, groups


def _readers(groups: dict, step: str, run: str) -> set[str]:
    """The runs that read the same computation of `step` as `run`."""
    return next(names for names in groups[step].values() if run in names)


@pytest.mark.parametrize("name, runs", [("study-backtracking.yaml", 15),
                                        ("study-retry-pretraining.yaml", 21),
                                        ("study-s2r.yaml", 6)])
def test_study_file_dry_runs(name, runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the study's output_dir is relative; a dry run writes nothing
    study_run.run_study(RECIPES / name, dry_run=True)
    out = capsys.readouterr().out
    assert f"{runs} runs (" in out and "3 seed(s)" in out
    assert list(tmp_path.iterdir()) == []


def test_backtracking_variants_reuse_the_core_steps():
    runs, groups = _groups("study-backtracking.yaml")
    assert [r.variant for r in runs[::3]] == ["core", "masked", "strong", "lora", "rounds2"]
    for seed in (0, 1, 2):
        every = {f"{v}/seed{seed}" for v in ("core", "masked", "strong", "lora", "rounds2")}
        assert _readers(groups, "sample", f"core/seed{seed}") == every
        assert _readers(groups, "eval_base", f"core/seed{seed}") == every
        assert _readers(groups, "toy_base", f"core/seed{seed}") == every
        # one backtracking (with core's confirm traces) for all but the strong phrase
        assert _readers(groups, "backtrack", f"core/seed{seed}") == every - {f"strong/seed{seed}"}
        assert _readers(groups, "backtrack", f"strong/seed{seed}") == {f"strong/seed{seed}"}
    assert set().union(*groups["train_rft_bt_iter2"].values()) == {
        f"rounds2/seed{s}" for s in (0, 1, 2)}
    assert set(groups["train_rft_fix"]) and "train_rft_fix_iter2" not in groups


def test_retry_pretraining_cells_train_their_own_bases():
    _, groups = _groups("study-retry-pretraining.yaml")
    _, backtracking = _groups("study-backtracking.yaml")
    for seed in (0, 1, 2):
        pair = {f"no-retry/seed{seed}", f"no-retry-lora/seed{seed}"}
        for step in ("toy_base", "sample", "backtrack", "build", "eval_base"):
            assert _readers(groups, step, f"no-retry/seed{seed}") == pair, step
        bases = {where for where, names in groups["toy_base"].items()
                 if any(n.endswith(f"seed{seed}") for n in names)}
        assert len(bases) == 6  # no-retry, 0.05, 0.25, 0.5, errors unmasked, immediate
        # the default base is the toy recipe's, so the backtracking study's cache serves it
        default = next(w for w, n in groups["toy_base"].items() if f"retry0.25/seed{seed}" in n)
        assert f"core/seed{seed}" in backtracking["toy_base"][default]


def test_s2r_study_trains_one_phrases_base_and_shares_the_default_one():
    runs, groups = _groups("study-s2r.yaml")
    bases = {where for where, names in groups["toy_base"].items()}
    assert len(bases) == 2  # the default base and the loss-on-phrases base, each for 3 seeds
    assert _readers(groups, "toy_base", "phrases/seed1") == {f"phrases/seed{s}" for s in range(3)}
    assert _readers(groups, "train_s2r_sft", "phrases/seed0") == {"phrases/seed0"}
