"""Fine-tune the base model on one SFT arm with TRL's SFTTrainer (full or LoRA).

Runs the same under `python -m backtrack.cli train` and `accelerate launch -m backtrack.cli
train` (DDP, DeepSpeed, FSDP configs in recipes/accelerate/): every process builds the
trainer and takes part in collective saves, only the main process writes final files.
Checkpoints go to `<output_dir>/checkpoints/<arm>/`; the final model is assembled in a temp
folder (LoRA merged with `merge_and_unload`, so it loads without PEFT) and renamed to
`<output_dir>/models/<arm>/`, so that folder is either absent or complete.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from backtrack.build import META_FILE, load_base_tokenizer, tokenizer_identity
from backtrack.config import CommonConfig, option
from backtrack.errors import UserError
from backtrack.fileio import replace_dir
from backtrack.layout import RunLayout, trained_model_done, trained_model_outputs
from backtrack.trackers import TRACKERS

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr",
              "inverse_sqrt", "polynomial")


@dataclass
class TrainConfig(CommonConfig):
    """Fine-tune the base model on one arm; writes <output_dir>/models/<arm>/."""

    arm: str = option("rft_bt", "Arm to train (an SFT arm of `backtrack arms`; its dataset is "
                      "<output_dir>/sft/<arm>/, its starting model its parent arm's).")
    use_lora: bool = option(False, "Train LoRA adapters (merged into the model at the end).")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA branch.")
    lora_target_modules: list[str] = option(
        ["all-linear"], "Modules given LoRA adapters (PEFT names; `all-linear` = every linear "
        "layer but the output head).")
    learning_rate: float = option(1e-5, "Peak learning rate (LoRA usually wants ~1e-4).")
    epochs: float = option(1.0, "Passes over the arm's dataset.")
    max_steps: int = option(-1, "Stop after this many optimizer steps (-1 = use `epochs`).")
    per_device_batch_size: int = option(8, "Examples per device per forward pass.")
    gradient_accumulation_steps: int = option(1, "Forward passes per optimizer step.")
    max_length: int = option(1024, "Longest example in tokens; longer ones are cut at the end.")
    warmup: float = option(0.03, "Warmup: a ratio of total steps if < 1, else a step count.")
    lr_scheduler: str = option("cosine", "Learning-rate schedule.", choices=SCHEDULERS)
    weight_decay: float = option(0.0, "AdamW weight decay.")
    gradient_checkpointing: bool = option(False, "Recompute activations to save memory.")
    group_by_length: bool = option(False, "Batch examples of similar length together "
                                          "(transformers' LengthGroupedSampler): less padding, "
                                          "other batches than random ones.")
    balance_lengths: bool = option(False, "Draw each optimizer step's per_device_batch_size x "
                                          "gradient_accumulation_steps examples at random, then "
                                          "split them into micro-batches of similar length "
                                          "(transformers' batch_rebalance sampler): the same "
                                          "examples and loss per step, less padding.")
    shared_prefix: bool = option(False, "Run the tokens every example of a micro-batch starts "
                                        "with (a system prompt, a chat header) once per "
                                        "micro-batch instead of once per row: the same loss "
                                        "and gradient, fewer FLOPs (shared_prefix_training.py; "
                                        "padded batches only, not padding_free).")
    save_steps: int = option(100, "Write a checkpoint every N optimizer steps.")
    save_total_limit: int = option(2, "Checkpoints kept on disk (oldest deleted).")
    logging_steps: int = option(10, "Log loss and learning rate every N steps.")
    resume: bool = option(False, "Continue from the last checkpoint of this arm; without it a "
                          "run starts at step 0 and removes the arm's old checkpoints.",
                          hashed=False)
    report_to: str = option("none", "Stream the loss to a tracker (transformers' integration; "
                            "tensorboard logs go to <output_dir>/logs/train_<arm>/).",
                            choices=TRACKERS, hashed=False)

    def validate(self) -> None:
        from backtrack.arms import get_arm

        if get_arm(self.arm).training != "sft":
            from backtrack.arms import ARMS

            raise UserError(f"option 'arm': '{self.arm}' is not trained with SFT (SFT arms: "
                            f"{[n for n, a in ARMS.items() if a.training == 'sft']})")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "max_length",
                     "save_steps", "logging_steps", "lora_r"):
            if getattr(self, name) < 1:
                raise UserError(f"option '{name}': must be at least 1")
        if self.balance_lengths and self.group_by_length:
            raise UserError("option 'balance_lengths': set group_by_length false with it "
                            "(each orders the examples its own way)")
        if self.shared_prefix and self.gradient_checkpointing:
            raise UserError("option 'shared_prefix': set gradient_checkpointing false with it "
                            "(checkpointed layers drop the shared prefix's cache)")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise UserError("option 'epochs': must be positive when max_steps is not set")


outputs = trained_model_outputs  # the pipeline reads a stage's outputs and done from here
done = trained_model_done


def load_arm_dataset(sft_dir: Path, arm: str, tokenizer):
    """The arm's dataset, refused when missing, empty or built with another tokenizer."""
    from datasets import load_from_disk

    path = sft_dir / arm
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{path}: SFT dataset not found (run `backtrack build` first)")
    meta = json.loads(meta_path.read_text())
    ours = tokenizer_identity(tokenizer)
    if meta.get("tokenizer", {}).get("vocab_hash") != ours["vocab_hash"]:
        raise UserError(
            f"{path}: built with tokenizer {meta.get('tokenizer', {}).get('name_or_path')!r}, "
            f"which differs from the base model's ({ours['name_or_path']!r}); rebuild it")
    try:
        state = json.loads((path / "state.json").read_text())
        # datasets writes a 0-row dataset it cannot load back, so look before loading
        dataset = load_from_disk(str(path)) if state.get("_data_files") != [] else []
    except (IndexError, ValueError, OSError) as exc:
        raise UserError(f"{path}: cannot load the dataset ({exc})") from exc
    if len(dataset) == 0:
        raise UserError(f"{path}: the dataset has no examples")
    missing = {"input_ids", "completion_mask"} - set(dataset.column_names)
    if missing:
        raise UserError(f"{path}: not a `backtrack build` dataset (no column(s) {sorted(missing)})")
    return dataset


def sft_args(config: TrainConfig, checkpoint_dir: Path):
    """TRL SFTConfig from the recipe; CPU/bf16 picked from the hardware."""
    import torch
    from trl import SFTConfig

    from backtrack.batching import sampling_strategy

    cuda = torch.cuda.is_available()
    # TRL defaults checkpointing to on; transformers 5 renamed the field.
    checkpointing = ("activation_checkpointing" if hasattr(SFTConfig, "activation_checkpointing")
                     else "gradient_checkpointing")
    return SFTConfig(
        **{checkpointing: config.gradient_checkpointing},
        output_dir=str(checkpoint_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        warmup_steps=config.warmup,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        completion_only_loss=True,  # labels from our `completion_mask` (see build.py)
        include_num_input_tokens_seen="non_padding",
        report_to=config.report_to,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        seed=config.seed,
        data_seed=config.seed,
        train_sampling_strategy=sampling_strategy(config.group_by_length, config.balance_lengths),
    )


def make_trainer(config: TrainConfig, model_path: str, tokenizer, dataset):
    """An SFTTrainer on the base model (a PEFT LoRA wrapper when `use_lora`)."""
    from trl import SFTTrainer

    from backtrack.batching import with_seeded_rebalance
    from backtrack.shared_prefix_training import with_shared_prefix

    trainer_class = with_seeded_rebalance(SFTTrainer)
    if config.shared_prefix:
        trainer_class = with_shared_prefix(trainer_class)
    peft_config = None
    if config.use_lora:
        from peft import LoraConfig

        targets = config.lora_target_modules
        peft_config = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=targets[0] if targets == ["all-linear"] else targets,
            task_type="CAUSAL_LM")
    checkpoint_dir = RunLayout.of(config).checkpoints(config.arm)
    return trainer_class(model=model_path, args=sft_args(config, checkpoint_dir),
                         train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)


def complete_checkpoints(checkpoint_dir: Path) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) `checkpoint-N` folders, complete ones sorted by step.

    Trainer writes a checkpoint in place and `trainer_state.json` last, so a run killed while
    saving leaves a folder without a readable state; resuming from it would fail.
    """
    complete, incomplete = [], []
    for path in checkpoint_dir.glob("checkpoint-*"):
        if not path.is_dir() or not path.name.split("-", 1)[1].isdigit():
            continue
        try:
            json.loads((path / "trainer_state.json").read_text())
            complete.append(path)
        except (OSError, ValueError):
            incomplete.append(path)
    return sorted(complete, key=lambda p: int(p.name.split("-", 1)[1])), incomplete


def loss_history(log_history: list[dict]) -> list[dict]:
    keys = ("step", "epoch", "loss", "learning_rate", "grad_norm", "num_input_tokens_seen")
    return [{k: e[k] for k in keys if k in e} for e in log_history if "loss" in e]


def plot_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def merge_lora(model_path: str, adapter_dir: Path, out_dir: Path, tokenizer) -> None:
    """Base model + saved adapter -> one plain HF folder (no PEFT needed to load it)."""
    from peft import PeftModel

    base = load_base_model(model_path)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def load_base_model(path: str):
    from backtrack.models import load_model

    return load_model(path)


def save_final(trainer, config: TrainConfig, model_path: str, tokenizer, extra: dict) -> Path:
    """Assemble models/<arm>/ in a temp folder on the main process, then rename it into place.

    `save_model` runs on every process: under ZeRO-3/FSDP it gathers sharded weights.
    """
    from backtrack.runinfo import write_run_info

    accelerator, main = trainer.accelerator, trainer.accelerator.is_main_process
    out = Path(config.output_dir)
    final = RunLayout.of(config).model(config.arm)
    tmp = final.with_name(f".{config.arm}.tmp")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    if config.use_lora:
        adapter_dir = RunLayout.of(config).checkpoints(config.arm) / "final-adapter"
        trainer.save_model(str(adapter_dir))
        accelerator.wait_for_everyone()
        if main:
            merge_lora(model_path, adapter_dir, tmp, tokenizer)
    else:
        trainer.save_model(str(tmp))
    if main:
        (tmp / "training_args.bin").unlink(missing_ok=True)  # keep a plain HF folder
        history = loss_history(trainer.state.log_history)
        (tmp / "loss.json").write_text(json.dumps(history, indent=1) + "\n")
        if history:
            plot_loss(history, tmp / "loss.png", f"{config.arm} ({Path(model_path).name})")
        write_run_info(tmp, config, "train", inputs=[out / "sft" / config.arm],
                       extra={"base_model": model_path, **extra})
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final


def _progress_at(checkpoint: str | None) -> tuple[int, int]:
    """(global step, input tokens seen) recorded in a checkpoint; zeros without one."""
    if checkpoint is None:
        return 0, 0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return int(state.get("global_step") or 0), int(state.get("num_input_tokens_seen") or 0)


def _warn_long_examples(dataset, max_length: int) -> None:
    too_long = sum(len(ids) > max_length for ids in dataset["input_ids"])
    if too_long:
        print(f"warning: {too_long}/{len(dataset)} examples exceed max_length={max_length} "
              "tokens and are cut (they lose their end-of-turn token)")


def _place_tensorboard_logs(trainer, folder: Path) -> None:
    """Tensorboard events in <output_dir>/logs/ (beside RL's), not inside the checkpoints
    that a fresh run deletes; the callback creates its writer at train start."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(folder)


def main(config: TrainConfig) -> None:
    """Train one arm; resumes from its last checkpoint when `resume` is set."""
    from backtrack.arms import parent_model_path
    from backtrack.trackers import require_tracker

    require_tracker(config.report_to)
    out = Path(config.output_dir)
    model_path = parent_model_path(config.arm, config.model, config.output_dir)
    tokenizer = load_base_tokenizer(model_path)
    dataset = load_arm_dataset(out / "sft", config.arm, tokenizer)
    checkpoint_dir = RunLayout.of(config).checkpoints(config.arm)
    complete, incomplete = complete_checkpoints(checkpoint_dir)
    resume_from = str(complete[-1]) if config.resume and complete else None
    trainer = make_trainer(config, model_path, tokenizer, dataset)
    _place_tensorboard_logs(trainer, out / "logs" / f"train_{config.arm}")
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        _warn_long_examples(dataset, config.max_length)
        if config.resume and resume_from is None:
            print(f"no checkpoint in {checkpoint_dir}: starting at step 0")
        if not config.resume and checkpoint_dir.exists():
            shutil.rmtree(checkpoint_dir)
        for path in incomplete if config.resume else []:
            print(f"removing incomplete checkpoint {path}")
            shutil.rmtree(path)
    accelerator.wait_for_everyone()
    start_step, start_tokens = _progress_at(resume_from)  # before rotation deletes it
    cpu_start = time.process_time()
    result = trainer.train(resume_from_checkpoint=resume_from)
    cpu_seconds = time.process_time() - cpu_start
    tokens = trainer.state.num_input_tokens_seen - start_tokens
    runtime = result.metrics.get("train_runtime") or 0.0
    extra = {"resumed_from": resume_from, "global_step": trainer.state.global_step,
             "steps_this_run": trainer.state.global_step - start_step,
             "train_metrics": result.metrics, "train_tokens": tokens,
             "train_tokens_per_second": tokens / runtime if runtime else None,
             "train_cpu_seconds": cpu_seconds,
             "world_size": accelerator.num_processes,
             "sft_dataset": json.loads((out / "sft" / config.arm / META_FILE).read_text())}
    final = save_final(trainer, config, model_path, tokenizer, extra)
    if accelerator.is_main_process:
        print(f"{config.arm}: {trainer.state.global_step} steps, final loss "
              f"{result.training_loss:.4f} -> {final}")
