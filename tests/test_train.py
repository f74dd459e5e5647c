"""`backtrack train`: both arms, full and LoRA, TRL loss spans, accelerate, resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BACKTRACK_CMD
from test_build import PHRASE, build, make_run

from backtrack.errors import UserError
from backtrack.train import TrainConfig, main

REPO = Path(__file__).resolve().parents[1]
FAST = {"max_steps": 3, "per_device_batch_size": 2, "learning_rate": 1e-3, "warmup": 0.0,
        "logging_steps": 1, "save_steps": 100}


@pytest.fixture(scope="module")
def built_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A run folder whose sft/ datasets are built from records (loss on the whole turn)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = make_run(tmp_path_factory.mktemp("train") / "run", tokenizer)
    build(out, tiny_model_dir)
    return out


def fresh_run(built_run: Path, tmp_path: Path) -> Path:
    """A private copy of the built run, so tests do not see each other's outputs."""
    out = tmp_path / "run"
    shutil.copytree(built_run, out)
    return out


def _weights(path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_trained_model(folder: Path, base_dir: Path) -> None:
    """A plain HF folder: loads without PEFT, differs from the base, generates, has a curve."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert not list(folder.glob("adapter_*"))
    base, tuned = _weights(base_dir), _weights(folder)
    assert base.keys() == tuned.keys()
    changed = [k for k in base if not (base[k] == tuned[k]).all()]
    assert len(changed) > len(base) // 2
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    inputs = tokenizer("Tom has 3 apples.", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    history = json.loads((folder / "loss.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3]
    assert (folder / "loss.png").stat().st_size > 1000
    info = json.loads((folder / "run.json").read_text())
    assert info["stage"] == "train" and info["global_step"] == 3


@pytest.mark.parametrize("arm", ["rft", "rft_bt"])
def test_full_finetune_each_arm(built_run, tiny_model_dir, tmp_path, arm):
    out = fresh_run(built_run, tmp_path)
    main(TrainConfig(output_dir=str(out), model=str(tiny_model_dir), arm=arm, **FAST))
    _assert_trained_model(out / "models" / arm, tiny_model_dir)
    assert [p.name for p in (out / "models").iterdir()] == [arm]  # no temp folder left


def test_lora_is_merged_into_a_plain_folder(built_run, tiny_model_dir, tmp_path):
    out = fresh_run(built_run, tmp_path)
    config = TrainConfig(output_dir=str(out), model=str(tiny_model_dir), arm="rft_bt",
                         use_lora=True, lora_r=4, lora_alpha=8, **{**FAST, "learning_rate": 5e-2})
    main(config)
    folder = out / "models" / "rft_bt"
    _assert_trained_model(folder, tiny_model_dir)
    assert not any("lora" in k for k in _weights(folder))
    assert (out / "checkpoints" / "rft_bt" / "final-adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("loss_on", ["all", "masked_wrong"])
def test_trl_labels_follow_the_completion_mask(tmp_path, tiny_model_dir, loss_on):
    """The labels SFTTrainer trains on carry loss on exactly the tokens build chose."""
    from transformers import AutoTokenizer

    from backtrack.build import load_base_tokenizer
    from backtrack.train import load_arm_dataset, make_trainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = make_run(tmp_path / "run", tokenizer)
    build(out, tiny_model_dir, loss_on=loss_on)
    config = TrainConfig(output_dir=str(out), model=str(tiny_model_dir), arm="rft_bt", **FAST)
    tokenizer = load_base_tokenizer(str(tiny_model_dir))
    dataset = load_arm_dataset(out / "sft", "rft_bt", tokenizer)
    trainer = make_trainer(config, str(tiny_model_dir), tokenizer, dataset)
    prepared = {tuple(r["input_ids"]): r["labels"] for r in trainer.train_dataset}
    wrong = "<think>3 + 1 = 5"
    right = "\n" + PHRASE + " 3 + 1 = 4</think>\nThe answer is 4.<|im_end|>"
    for row in dataset:
        labels = prepared[tuple(row["input_ids"])]
        trained = tokenizer.decode([t for t in labels if t != -100])
        if row["source"] == "rft":
            assert trained == row["completion"]
        else:
            assert trained == (right if loss_on == "masked_wrong" else wrong + right)
        assert labels[-1] == tokenizer.eos_token_id


def _train_cmd(out: Path, model: Path, *extra: str) -> list[str]:
    return ["--output-dir", str(out), "--model", str(model), "--arm", "rft_bt",
            "--per-device-batch-size", "2", "--learning-rate", "1e-3", "--logging-steps", "1",
            *extra]


@pytest.mark.parametrize("shared_prefix", ["false", "true"])  # true: DDP over two forwards
def test_two_cpu_processes_through_accelerate(built_run, tiny_model_dir, tmp_path, cli_env,
                                              shared_prefix):
    out = fresh_run(built_run, tmp_path)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / "cpu_2proc.yaml"), "-m", "backtrack.cli",
           "train", *_train_cmd(out, tiny_model_dir, "--max-steps", "3",
                                "--shared-prefix", shared_prefix)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "models" / "rft_bt" / "run.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == 3
    _assert_trained_model(out / "models" / "rft_bt", tiny_model_dir)


def test_sigkill_then_resume_continues_from_the_checkpoint(built_run, tiny_model_dir, tmp_path,
                                                           cli_env):
    out = fresh_run(built_run, tmp_path)
    args = _train_cmd(out, tiny_model_dir, "--max-steps", "16", "--save-steps", "4")
    checkpoints = out / "checkpoints" / "rft_bt"
    proc = subprocess.Popen(BACKTRACK_CMD + ["train", *args], env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (checkpoints / "checkpoint-4" / "trainer_state.json").is_file():
            assert proc.poll() is None and time.time() < deadline, "no checkpoint written"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "models" / "rft_bt").exists()
    resumed = subprocess.run(BACKTRACK_CMD + ["train", *args, "--resume", "true"],
                             capture_output=True, text=True, env=cli_env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads((out / "models" / "rft_bt" / "run.json").read_text())
    start = int(Path(info["resumed_from"]).name.split("-")[1])
    assert start >= 4 and start % 4 == 0 and start < 16
    assert info["global_step"] == 16 and info["steps_this_run"] == 16 - start


def test_dataset_from_another_tokenizer_is_refused(built_run, tiny_model_dir, tmp_path, cli_env):
    from transformers import AutoTokenizer

    out = fresh_run(built_run, tmp_path)
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra-token>"])
    tokenizer.save_pretrained(other)
    proc = subprocess.run(BACKTRACK_CMD + ["train", *_train_cmd(out, other, "--max-steps", "1")],
                          capture_output=True, text=True, env=cli_env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "differs from the base model" in proc.stderr
    assert str(out / "sft" / "rft_bt") in proc.stderr
    assert not (out / "models").exists() and not (out / "checkpoints").exists()


def test_missing_model_and_empty_dataset_are_refused(built_run, tiny_model_dir, tmp_path):
    from datasets import Dataset

    from backtrack.build import META_FILE

    out = fresh_run(built_run, tmp_path)
    with pytest.raises(UserError, match="no-such-model"):
        main(TrainConfig(output_dir=str(out), model=str(tmp_path / "no-such-model"), **FAST))
    arm_dir = out / "sft" / "rft"
    meta = (arm_dir / META_FILE).read_text()
    shutil.rmtree(arm_dir)
    Dataset.from_dict({"input_ids": [], "completion_mask": []}).save_to_disk(str(arm_dir))
    (arm_dir / META_FILE).write_text(meta)
    with pytest.raises(UserError, match="no examples"):
        main(TrainConfig(output_dir=str(out), model=str(tiny_model_dir), arm="rft", **FAST))
    shutil.rmtree(out / "sft")
    with pytest.raises(UserError, match="run `backtrack build` first"):
        main(TrainConfig(output_dir=str(out), model=str(tiny_model_dir), **FAST))
    assert not (out / "models").exists() and not (out / "checkpoints").exists()


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED",
                "fsdp": "FSDP", "cpu_2proc": "MULTI_GPU"}
    for name, kind in expected.items():
        config = load_config_from_file(str(REPO / "recipes" / "accelerate" / f"{name}.yaml"))
        assert str(config.distributed_type).endswith(kind), name
    zero3 = load_config_from_file(str(REPO / "recipes" / "accelerate" / "zero3.yaml"))
    assert zero3.deepspeed_config["zero_stage"] == 3


def test_group_by_length_reaches_the_trainer_sampler(tmp_path):
    from backtrack.train import TrainConfig, sft_args

    assert sft_args(TrainConfig(), tmp_path).train_sampling_strategy == "random"
    grouped = sft_args(TrainConfig(group_by_length=True), tmp_path)
    assert grouped.train_sampling_strategy == "group_by_length"


def test_balance_lengths_splits_random_steps_by_length_and_trains(built_run, tiny_model_dir,
                                                                  tmp_path):
    from transformers import AutoTokenizer
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    from backtrack.train import load_arm_dataset, make_trainer

    out = fresh_run(built_run, tmp_path)
    config = TrainConfig(output_dir=str(out), model=str(tiny_model_dir), arm="rft_bt", seed=5,
                         **{**FAST, "gradient_accumulation_steps": 2, "balance_lengths": True})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dataset = load_arm_dataset(out / "sft", "rft_bt", tokenizer)
    sampler = make_trainer(config, str(tiny_model_dir), tokenizer, dataset)._get_train_sampler()
    assert isinstance(sampler, BatchRebalanceSampler) and sampler.seed == 5  # not transformers' 42
    groups = list(sampler)
    steps = [groups[i] + groups[i + 1] for i in range(0, len(groups) - 1, 2)]
    assert all(len(set(step)) == 4 for step in steps)  # per_device 2 x 2 accumulation steps
    lengths = [len(row) for row in dataset["input_ids"]]
    first, second = groups[0], groups[1]
    assert min(lengths[i] for i in first) >= max(lengths[i] for i in second)  # split by length
    main(config)
    _assert_trained_model(out / "models" / "rft_bt", tiny_model_dir)
    with pytest.raises(UserError, match="group_by_length"):
        TrainConfig(balance_lengths=True, group_by_length=True).validate()


def _loss_and_grads(trainer, inputs: dict, items: int):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=items)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]


def test_shared_prefix_gives_the_plain_loss_and_gradient(built_run, tiny_model_dir, tmp_path):
    """SFT with `shared_prefix`: each micro-batch's common prompt tokens run once, yet the loss
    and every gradient equal those of the plain forward over the same batch."""
    import torch
    from transformers import AutoTokenizer

    from backtrack.shared_prefix_training import shared_prefix_length
    from backtrack.train import load_arm_dataset, make_trainer

    out = fresh_run(built_run, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dataset = load_arm_dataset(out / "sft", "rft_bt", tokenizer)
    results = []
    for shared in (False, True):
        config = TrainConfig(output_dir=str(out), model=str(tiny_model_dir), arm="rft_bt",
                             **{**FAST, "per_device_batch_size": 4, "shared_prefix": shared})
        trainer = make_trainer(config, str(tiny_model_dir), tokenizer, dataset)
        trainer.model.train()
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        cut = shared_prefix_length(inputs["input_ids"], inputs["attention_mask"],
                                   inputs["labels"])
        assert cut >= 4  # the batch does share a prompt prefix, so the shared path runs
        items = int((inputs["labels"][:, 1:] != -100).sum())
        results.append(_loss_and_grads(trainer, inputs, items))
    (plain_loss, plain), (shared_loss, grads) = results
    assert shared_loss == pytest.approx(plain_loss, rel=1e-5)
    assert len(grads) == len(plain)
    for a, b in zip(plain, grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    with pytest.raises(UserError, match="gradient_checkpointing"):
        TrainConfig(shared_prefix=True, gradient_checkpointing=True).validate()
