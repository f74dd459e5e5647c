"""`report_to`: the RL and SFT stages stream their logs to tensorboard (offline, read back)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_rl_stage import FAST, TASK
from test_train import FAST as SFT_FAST
from test_train import built_run, fresh_run  # noqa: F401  (fixture)

from backtrack.errors import UserError
from backtrack.trackers import require_tracker


def _scalars(folder, tag: str) -> list[tuple[int, float]]:
    pytest.importorskip("tensorboard", reason="report_to tensorboard needs `pip install tensorboard`")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(folder.rglob("events.out.tfevents.*"))
    assert events, f"no tensorboard events under {folder}"
    values = []
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return values


def test_rl_streams_its_log_to_tensorboard(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="report_to tensorboard needs `pip install tensorboard`")
    import json

    from backtrack.rl.stage import RLConfig, main

    torch.set_num_threads(1)
    out = tmp_path / "run"
    final = main(RLConfig(output_dir=str(out), model=str(tiny_model_dir), steps=3,
                          report_to="tensorboard", **TASK, **FAST))
    log = json.loads((final / "rl_log.json").read_text())
    reward = _scalars(out / "logs" / "rl_outcome_rl", "reward")
    assert [s for s, _ in reward] == [1, 2, 3]
    assert [v for _, v in reward] == pytest.approx([e["reward"] for e in log])
    assert [s for s, _ in _scalars(out / "logs", "kl")] == [1, 2, 3]


def test_sft_streams_its_loss_to_tensorboard(built_run, tiny_model_dir, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard", reason="report_to tensorboard needs `pip install tensorboard`")
    from backtrack.train import TrainConfig, main

    out = fresh_run(built_run, tmp_path)
    main(TrainConfig(output_dir=str(out), model=str(tiny_model_dir), arm="rft",
                     report_to="tensorboard", **SFT_FAST))
    loss = _scalars(out / "logs" / "train_rft", "train/loss")
    assert [s for s, _ in loss] == [1, 2, 3] and all(v > 0 for _, v in loss)


def test_a_tracker_without_its_package_is_a_user_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "tensorboard", "tensorboardX")
                        else real(name, *a))
    with pytest.raises(UserError, match="wandb needs the package wandb"):
        require_tracker("wandb")
    with pytest.raises(UserError, match="tensorboard needs the package tensorboard"):
        require_tracker("tensorboard")
    require_tracker("none")
