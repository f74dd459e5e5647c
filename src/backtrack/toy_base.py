"""`backtrack toy-base`: train the toy world's tokenizer and tiny Llama from scratch, on CPU.

The corpus (`toy_corpus.py`) is chat transcripts of arith train problems, a configurable share
of them with a natural self-correction. The model is saved as a plain HF folder in
`$BACKTRACK_CACHE/toy/<config-hash>/`, reused when present, and `<output_dir>/toy_base/run.json`
records it as `model_dir`. While it trains, Trainer checkpoints go to `<config-hash>.work/` every
`save_minutes`; a killed run resumes from the last complete one (same corpus and tokenizer:
both are rebuilt from the seed and checked against the ones the checkpoints were made with;
`toy_base_checkpoints`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from backtrack.config import CommonConfig, hashed_values, option
from backtrack.errors import UserError
from backtrack.fileio import cache_root, read_json
from backtrack.layout import RunLayout
from backtrack.toy_base_checkpoints import (exclusive, identity, periodic_save_callback,
                                            resume_point, save_atomically, time_cap_callback)
from backtrack.toy_corpus import RETRY_PHRASES, TranscriptDataset, build_corpus, loss_kinds

log = logging.getLogger(__name__)

STEPS = 232  # the default training length (ToyBaseConfig.steps)

# Fields added after models were cached: part of the key only when not at their default, so
# the caches of configs that leave them alone stay valid.
HASHED_IF_SET = ("pack_length", "torch_compile", "length_grouped", "micro_batches",
                 "newton_schulz")


@dataclass
class ToyBaseConfig(CommonConfig):
    """Train the toy tokenizer and a tiny Llama from scratch on rendered transcripts.

    The model is cached by a hash of the fields declared `hashed` (see `config.option`)."""

    model: str = option("toy", "Not read by toy-base (it makes the `toy` model).", hashed=False)

    layers: int = option(4, "Transformer layers.")
    hidden: int = option(160, "Hidden size.")
    heads: int = option(4, "Attention heads (key/value heads too).")
    intermediate: int = option(432, "MLP inner size.")
    vocab_size: int = option(512, "Tokenizer vocabulary size (digits are single tokens).")
    steps: int = option(STEPS, "Optimizer steps (the training length; ~2 min on 2 Zen 4 "
                               "cores). Chosen on dev problems of 3 seeds for the band base "
                               "pass@1 35-55 %, pass@8 70-85 % (README).")
    max_minutes: float = option(0.0, "Optional cap on training minutes (0 = none); a capped "
                                     "model is weaker than its config says (run.json tells).",
                                hashed=False)
    batch_size: int = option(64, "Transcripts per optimizer step.")
    lr: float = option(6e-3, "Peak learning rate (warmup then cosine decay); AdamW's before "
                             "CORPUS_VERSION 6 was 3e-3 over 600 steps.")
    warmup_steps: int = option(20, "Linear warmup steps.")
    weight_decay: float = option(0.01, "Decoupled weight decay (Muon's and AdamW's).")
    optimizer: str = option("muon", "muon: torch.optim.Muon on the transformer blocks' "
                                    "matrices (Moonshot's AdamW-matched lr scaling, so lr and "
                                    "weight_decay mean the same) and AdamW on the embeddings "
                                    "and norms (optimizers.py); reaches AdamW's 600-step band in "
                                    f"{STEPS} steps (README). adamw: AdamW on everything (the "
                                    "default before CORPUS_VERSION 6).",
                            choices=("adamw", "muon"))
    newton_schulz: str = option("auto", "The dtype Muon orthogonalises in. auto: bfloat16 "
                                        "(torch's) where the CPU multiplies it natively "
                                        "(AVX512_BF16, AMX), float32 elsewhere, where bf16 "
                                        "products take ~16x float32's (AVX2: 2x the step "
                                        "time; optimizers.py). The choice is in run.json.",
                                choices=("auto", "bfloat16", "float32"))
    corpus_size: int = option(0, "Distinct transcripts in the corpus; 0 = steps x batch_size "
                                 "(one pass, no repeats).")
    correction_rate: float = option(0.25, "Share of transcripts with a self-correction (0-1).")
    late_share: float = option(0.8, "Share of self-corrections of the late kind (0-1).")
    retry_phrases: list = option(RETRY_PHRASES, "Retry phrases the corpus uses.")
    max_slip: int = option(3, "Largest amount a wrong result (or misread +/- operand) is off by.")
    slip_kinds: list = option(["result", "operand"], "Kinds of slips in corrections: result (`6 + 12 = 15`), "
                                          "operand (a misread number, computed from).")
    redo_from: str = option("start", "Where a late correction redoes the solution from: "
                            "the first wrong step, or the start.", choices=("first_wrong", "start"))
    loss_on_errors: bool = option(False, "Also train on wrong steps (teaches making slips).")
    loss_on_phrases: bool = option(False, "Also train on retry phrases (the base model then "
                                          "says them unprompted, often at the wrong place).")
    threads: int = option(0, "CPU threads for torch; 0 = $OMP_NUM_THREADS if set, else all "
                             "cores (up to 8).", hashed=False)
    pack_length: int = option(0, "Pack each batch's transcripts into rows of this many tokens "
                                 "(no padding; attention stays within a transcript); 0 = pad "
                                 "each batch to its longest transcript.")
    length_grouped: bool = option(False, "Batch transcripts of similar length together "
                                         "(transformers' LengthGroupedSampler): no padding, "
                                         "1.4x tokens/s, but the tiny model learns far worse "
                                         "from such batches (docs/SPEED.md); off = random batches.")
    micro_batches: int = option(4, "Split each random batch into this many micro-batches of "
                                   "similar length (transformers' batch_rebalance sampler, "
                                   "gradient accumulation): the same transcripts and loss per "
                                   "optimizer step with less padding, 1.5-1.7x tokens/s "
                                   "(benchmarks/toy_base.py); 1 = one padded batch.")
    shared_prefix: bool = option(True, "Run the prefix every transcript of a micro-batch shares "
                                       "(system turn, user header: 26 of ~105 tokens) once "
                                       "per micro-batch instead of once per row; the same "
                                       "loss and gradient (shared_prefix_training.py).")
    torch_compile: bool = option(False, "Compile the model with torch.compile (inductor; the first "
                                        "steps wait for the compiler).")
    save_minutes: float = option(2.0, "Write a resumable checkpoint every N minutes of training "
                                      "(0 = never); a re-run after a kill resumes from it.",
                                 hashed=False)
    eval_problems: int = option(64, "Test problems for the greedy accuracy logged at the end.",
                                hashed=False)

    def validate(self) -> None:
        for name in ("correction_rate", "late_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"toy_base.{name}: must be between 0 and 1")
        for name in ("layers", "hidden", "heads", "intermediate", "steps", "batch_size",
                     "micro_batches"):
            if getattr(self, name) < 1:
                raise UserError(f"toy_base.{name}: must be at least 1")
        if self.batch_size % self.micro_batches:
            raise UserError("toy_base.micro_batches: must divide toy_base.batch_size")
        if self.micro_batches > 1 and (self.pack_length or self.length_grouped):
            raise UserError("toy_base.micro_batches: set it to 1 with pack_length or "
                            "length_grouped (each lays out the batches its own way)")
        if self.hidden % self.heads:
            raise UserError("toy_base.hidden: must be a multiple of toy_base.heads")
        if self.correction_rate > 0 and not self.retry_phrases:
            raise UserError("toy_base.retry_phrases: needs at least one phrase")
        if not self.slip_kinds or set(self.slip_kinds) - {"result", "operand"}:
            raise UserError("toy_base.slip_kinds: give one or more of result, operand")


# Bump when the corpus or training code changes what a config produces (old caches then miss).
CORPUS_VERSION = 6  # 4: micro-batches by default; 5: shared prefix (other float sums); 6: Muon


def config_hash(config: ToyBaseConfig) -> str:
    defaults = ToyBaseConfig()
    values = {k: v for k, v in hashed_values(config).items()
              if not (k in HASHED_IF_SET and v == getattr(defaults, k))}
    values.pop("newton_schulz", None)  # keyed by what it resolves to: float32 changes weights
    if config.optimizer == "muon" and _newton_schulz(config) == "float32":
        values["newton_schulz"] = "float32"
    values["corpus_version"] = CORPUS_VERSION
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _newton_schulz(config: ToyBaseConfig) -> str:
    """The dtype Muon orthogonalises in on this machine (`optimizers.newton_schulz_dtype`)."""
    from backtrack.optimizers import newton_schulz_dtype

    return newton_schulz_dtype(config.newton_schulz)


def outputs(config: ToyBaseConfig) -> list[Path]:
    return [RunLayout.of(config).toy_base]


def done(config: ToyBaseConfig) -> bool:
    """Done while the cached model that toy_base/run.json names is still there."""
    info = read_json(RunLayout.of(config).toy_base / "run.json") or {}
    return (Path(info.get("model_dir", "/nonexistent")) / "config.json").is_file()



def train_tokenizer(task, corpus, vocab_size: int):
    from backtrack.toy_tokenizer import train_toy_tokenizer

    texts = []
    for messages, segments in corpus[:5000]:  # role names too, so they are single tokens
        turns = [f"{m['role']}\n{m['content']}" for m in messages]
        texts.append("\n".join(turns) + "\nassistant\n" + "".join(t for t, _ in segments))
    return train_toy_tokenizer(texts, vocab_size=vocab_size)


def build_model(tokenizer, config: ToyBaseConfig):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden, num_hidden_layers=config.layers,
        intermediate_size=config.intermediate, num_attention_heads=config.heads,
        num_key_value_heads=config.heads, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(model_config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        do_sample=True, temperature=0.8, max_new_tokens=256)
    return model


def save_untrained_model(out_dir: Path, problems: list, config: ToyBaseConfig | None = None) -> Path:
    """An untrained model of the toy base's shape, with a tokenizer trained on `problems`.

    Speed depends on shape and output length, not on weights, so benchmarks use this to
    measure the toy world without waiting for `backtrack toy-base`.
    """
    from backtrack.toy_tokenizer import train_toy_tokenizer

    texts = [f"{p.question} <think>{p.solution}</think>\nThe answer is {p.answer}."
             for p in problems]
    tokenizer = train_toy_tokenizer(texts, vocab_size=(config or ToyBaseConfig()).vocab_size)
    build_model(tokenizer, config or ToyBaseConfig()).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def make_trainer(model, tokenizer, corpus, config: ToyBaseConfig, work_dir: Path,
                 **training_args):
    """The HF Trainer for the toy base (`training_args` override TrainingArguments: the
    benchmark tries levers with them)."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from backtrack.batching import sampling_strategy, with_seeded_rebalance
    from backtrack.shared_prefix_training import with_shared_prefix
    from backtrack.toy_packing import PackingCollator

    trainer_class = with_seeded_rebalance(Trainer)
    if config.shared_prefix:
        trainer_class = with_shared_prefix(trainer_class)

    torch.set_num_threads(config.threads or int(os.environ.get("OMP_NUM_THREADS") or 0)
                          or max(1, min(os.cpu_count() or 1, 8)))
    tokenizer.padding_side = "right"  # training pads on the right; generation on the left
    args = TrainingArguments(**{
        "output_dir": str(work_dir / "trainer"),
        # With micro-batches, batch_rebalance draws batch_size transcripts per step at random and
        # splits them by length; Trainer normalises the loss by the tokens of the whole step.
        "per_device_train_batch_size": config.batch_size // config.micro_batches,
        "gradient_accumulation_steps": config.micro_batches,
        "max_steps": config.steps, "learning_rate": config.lr, "lr_scheduler_type": "cosine",
        "warmup_steps": config.warmup_steps, "weight_decay": config.weight_decay,
        "logging_steps": max(1, config.steps // 50), "save_strategy": "no",
        "save_total_limit": 1, "report_to": [], "use_cpu": True, "seed": config.seed,
        "dataloader_num_workers": 0, "disable_tqdm": True, "torch_compile": config.torch_compile,
        "train_sampling_strategy": sampling_strategy(config.length_grouped,
                                                     config.micro_batches > 1),
        **training_args})
    optimizers = (None, None)
    if config.optimizer == "muon":
        from backtrack.optimizers import muon_with_adamw

        optimizers = (muon_with_adamw(model, config.lr, config.weight_decay,
                                      config.newton_schulz), None)
    collator = (PackingCollator(tokenizer.pad_token_id, config.pack_length) if config.pack_length
                else DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    return trainer_class(
        model=model, args=args, data_collator=collator, optimizers=optimizers,
        train_dataset=TranscriptDataset(tokenizer, corpus, loss_kinds(config)),
        callbacks=([time_cap_callback(config.max_minutes)] if config.max_minutes > 0 else [])
        + ([periodic_save_callback(config.save_minutes)] if config.save_minutes > 0 else []))


def train(model, tokenizer, corpus, config: ToyBaseConfig, work_dir: Path,
          resume_from: Path | None = None) -> dict:
    """Run the HF Trainer (from `resume_from`, a checkpoint, if given); return the loss history,
    timing and the steps this run did."""
    trainer = make_trainer(model, tokenizer, corpus, config, work_dir)
    start = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    tokenizer.padding_side = "left"
    losses = [(e["step"], round(e["loss"], 4)) for e in trainer.state.log_history if "loss" in e]
    first = int(resume_from.name.split("-")[1]) if resume_from else 0
    return {"train_seconds": round(time.monotonic() - start, 1), "losses": losses,
            "steps_done": trainer.state.global_step,
            "resumed_from_step": first, "steps_this_run": trainer.state.global_step - first}


def train_and_save(task, config: ToyBaseConfig, model_dir: Path) -> dict:
    """Train (resuming from the work folder's last checkpoint), save to `model_dir`."""
    from backtrack.fileio import write_text

    work = model_dir.with_name(model_dir.name + ".work")
    size = config.corpus_size or config.steps * config.batch_size
    corpus = build_corpus(task, config, size)
    tokenizer = train_tokenizer(task, corpus, config.vocab_size)
    resume_from = resume_point(work, identity(corpus, tokenizer))
    model = build_model(tokenizer, config)
    extra = train(model, tokenizer, corpus, config, work, resume_from)
    extra["parameters"] = sum(p.numel() for p in model.parameters())
    if config.optimizer == "muon":
        extra["newton_schulz"] = _newton_schulz(config)
    save_atomically(model, tokenizer, model_dir)
    extra["greedy_accuracy"] = greedy_accuracy(model_dir, task, config.eval_problems)
    write_text(model_dir / "toy_base.json", json.dumps(extra, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return extra


def greedy_accuracy(model_dir: Path, task, n: int) -> float | None:
    """Greedy accuracy on the first `n` test problems: a quick sanity figure for run.json."""
    if n <= 0:
        return None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backtrack.chat import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    problems = task.problems("test", n)
    prompts = [render_prompt(tokenizer, task.messages(p)) for p in problems]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=256)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(task.check(t, p.answer).correct for t, p in zip(texts, problems)) / len(problems)


def main(config: ToyBaseConfig) -> Path:
    from backtrack.runinfo import write_run_info
    from backtrack.tasks import get_task

    task = get_task(config.task, config.task_args)
    if not hasattr(task, "iter_problems"):
        raise UserError(f"toy_base: task '{config.task}' cannot generate a training corpus "
                        f"(only generated tasks such as 'arith' can)")
    model_dir = cache_root() / "toy" / config_hash(config)
    extra: dict = {"model_dir": str(model_dir)}
    with exclusive(model_dir.with_name(model_dir.name + ".lock")):
        if (model_dir / "config.json").is_file():
            log.info("toy-base: cached model at %s", model_dir)
            info = model_dir / "toy_base.json"
            extra.update(json.loads(info.read_text()) if info.is_file() else {})
            extra["cached"] = True
            if extra.get("steps_done", config.steps) < config.steps:
                log.warning("toy-base: the cached model stopped at step %s of %s (time cap)",
                            extra["steps_done"], config.steps)
            shutil.rmtree(model_dir.with_name(model_dir.name + ".work"), ignore_errors=True)
        else:
            extra.update(train_and_save(task, config, model_dir))
    out = RunLayout.of(config).toy_base
    write_run_info(out, config, "toy-base", extra=extra)
    print(f"toy-base: model in {model_dir}")
    return model_dir
