"""`backtrack toy-base`: train the toy world's tokenizer and tiny Llama from scratch, on CPU.

The corpus is chat transcripts of the task's train problems (system, user, then the assistant's
`<think>` steps `</think>` and "The answer is N."). A configurable share of transcripts holds a
natural self-correction, as web text sometimes does (the "retry data" of Physics of LMs 2.2):
- immediate: a wrong step, a retry phrase, the step done right, then the rest;
- late: the solution runs on from a wrong step to its end, then a retry phrase where `</think>`
  would be, then the solution redone (from the start by default: the tiny model finds its own
  first slip poorly, and a whole redo gave more wrong-to-right continuations). This is the
  shape the method creates when it puts "Wait, that's not right..." in place of `</think>`.
Slips are off by a small amount (`6 + 12 = 15`), like the model's own arithmetic slips. Loss
goes on the assistant turn only; by default not on the wrong steps, so the model learns to fix
slips without learning to make them (its own slips come from its small capacity).

The model is saved as a plain HF folder in `$BACKTRACK_CACHE/toy/<config-hash>/`, reused when
present, and `<output_dir>/toy_base/run.json` records it as `model_dir`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from backtrack.config import CommonConfig, option
from backtrack.errors import UserError

log = logging.getLogger(__name__)

RETRY_PHRASES = [
    "Wait, that's not right...",
    "Wait, that's not right.",
    "Hmm, let me check that again.",
    "Wait, let me redo that.",
]
# Fields that do not change the trained model (so not part of the cache key).
NOT_HASHED = ("output_dir", "model", "max_minutes", "eval_problems", "threads")


@dataclass
class ToyBaseConfig(CommonConfig):
    """Train the toy tokenizer and a tiny Llama from scratch on rendered transcripts."""

    layers: int = option(4, "Transformer layers.")
    hidden: int = option(160, "Hidden size.")
    heads: int = option(4, "Attention heads (key/value heads too).")
    intermediate: int = option(432, "MLP inner size.")
    vocab_size: int = option(512, "Tokenizer vocabulary size (digits are single tokens).")
    steps: int = option(750, "Optimizer steps (the training length; ~8 min on 2 idle cores).")
    max_minutes: float = option(0.0, "Optional cap on training minutes (0 = none); a capped "
                                     "model is weaker than its config says (run.json tells).")
    batch_size: int = option(64, "Transcripts per optimizer step.")
    lr: float = option(3e-3, "Peak learning rate (AdamW, warmup then cosine decay).")
    warmup_steps: int = option(100, "Linear warmup steps.")
    weight_decay: float = option(0.01, "AdamW weight decay.")
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
    threads: int = option(0, "CPU threads for torch; 0 = all cores.")
    eval_problems: int = option(64, "Test problems for the greedy accuracy logged at the end.")

    def validate(self) -> None:
        for name in ("correction_rate", "late_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"toy_base.{name}: must be between 0 and 1")
        for name in ("layers", "hidden", "heads", "intermediate", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"toy_base.{name}: must be at least 1")
        if self.hidden % self.heads:
            raise UserError("toy_base.hidden: must be a multiple of toy_base.heads")
        if self.correction_rate > 0 and not self.retry_phrases:
            raise UserError("toy_base.retry_phrases: needs at least one phrase")
        if not self.slip_kinds or set(self.slip_kinds) - {"result", "operand"}:
            raise UserError("toy_base.slip_kinds: give one or more of result, operand")


# Bump when the corpus or training code changes what a config produces (old caches then miss).
CORPUS_VERSION = 3


def config_hash(config: ToyBaseConfig) -> str:
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_HASHED}
    values["corpus_version"] = CORPUS_VERSION
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("BACKTRACK_CACHE", Path.home() / ".cache" / "backtrack"))


# -- corpus ------------------------------------------------------------------------------------
def _wrong_step(a: int, op: str, b: int, c: int, rng: random.Random,
                config: ToyBaseConfig) -> tuple[int, int]:
    """A plausible wrong (operand, result) for the step `a op b = c`: either the result is off
    by a small amount (`6 + 12 = 15`) or an operand is misread and the step computed from it."""
    from backtrack.tasks.arith import apply_op

    kind = rng.choice(config.slip_kinds)
    while True:
        delta = rng.choice([-1, 1]) * rng.randint(1, max(1, config.max_slip))
        if kind == "operand":
            wrong_b = b + (delta if op in "+-" else (1 if delta > 0 else -1))
            if wrong_b >= (1 if op in "+-" else 2) and not (op == "/" and a % wrong_b) \
                    and not (op == "-" and wrong_b >= a):
                return wrong_b, apply_op(a, op, wrong_b)
            kind = "result"  # no valid misread operand here
        elif c + delta >= 0:
            return b, c + delta


def _run_on(start: int, ops, first: int) -> list[str] | None:
    """Steps `first..` recomputed from a wrong `start`; None if a step becomes invalid."""
    from backtrack.tasks.arith import apply_op

    lines, x = [], start
    for op, k in ops[first:]:
        if (op == "/" and x % k) or (op == "-" and k >= x):
            return None
        y = apply_op(x, op, k)
        lines.append(f"{x} {op} {k} = {y}")
        x = y
    return lines


def assistant_segments(solution: str, answer: str, rng: random.Random,
                       config: ToyBaseConfig) -> list[tuple[str, bool]]:
    """The assistant turn as (text, kind) pieces, kind "ok", "error" (a wrong step or run of
    steps) or "phrase" (a retry phrase), with a self-correction at the set rate.
    An immediate correction redoes the wrong step; a late one redoes from `config.redo_from`."""
    from backtrack.tasks.arith import parse_step

    lines = solution.splitlines()
    steps = [parse_step(line) for line in lines]
    body: list[tuple[str, str]] = [(line + "\n", "ok") for line in lines]
    if not (steps and all(steps) and rng.random() < config.correction_rate):
        return [("<think>\n", "ok")] + body + [(f"</think>\nThe answer is {answer}.", "ok")]
    ops = [(op, b) for _a, op, b, _c in steps]
    j = rng.randrange(len(steps))
    a, op, b, c = steps[j]
    phrase = rng.choice(config.retry_phrases)
    late = rng.random() < config.late_share
    for _try in range(10):
        wrong_b, wrong_c = _wrong_step(a, op, b, c, rng, config)
        run_on = _run_on(wrong_c, ops, j + 1) if late else []
        if run_on is not None:
            break
    else:  # no slip keeps the later steps valid: make it an immediate correction
        run_on, late = [], False
    wrong_run = "".join(line + "\n" for line in [f"{a} {op} {wrong_b} = {wrong_c}"] + run_on)
    redo = body if late and config.redo_from == "start" else body[j:]
    # The newline after the phrase carries loss even when the phrase does not: a model must
    # learn to go on after a phrase that someone else (the method) wrote.
    body = body[:j] + [(wrong_run, "error"), (phrase, "phrase"), ("\n", "ok")] + redo
    return [("<think>\n", "ok")] + body + [(f"</think>\nThe answer is {answer}.", "ok")]


def loss_kinds(config: ToyBaseConfig) -> frozenset:
    """Which kinds of assistant-turn pieces carry loss."""
    return frozenset({"ok"} | ({"error"} if config.loss_on_errors else set())
                     | ({"phrase"} if config.loss_on_phrases else set()))


def render_example(tokenizer, messages: list[dict], segments: list[tuple[str, str]],
                   loss_kinds: frozenset) -> tuple[str, list[tuple[int, int]]]:
    """Full chat text and the character spans that carry loss (assistant turn, end marker)."""
    from backtrack.chat import render_prompt

    prompt = render_prompt(tokenizer, messages)
    content = "".join(text for text, _ in segments)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": content}],
                                         tokenize=False)
    if not full.startswith(prompt + content):
        raise RuntimeError("chat template does not render the assistant turn verbatim")
    spans, pos = [], len(prompt)
    for text, kind in segments:
        if kind in loss_kinds:
            spans.append((pos, pos + len(text)))
        pos += len(text)
    end = full.index(tokenizer.eos_token, pos) + len(tokenizer.eos_token)
    spans.append((pos, end))
    return full, spans


def corpus_problems(task):
    """The task's train stream minus every chain of its train split (`task.problems("train")`).

    The pipeline samples, backtracks and fine-tunes on that split, so the base model must not
    have seen those problems, in any wording: they are as new to it as the test split, which
    the train stream never holds. (A solution fixes the chain: start value and steps.)
    """
    held_out = {problem.solution for problem in task.problems("train")}
    misses = 0
    for problem in task.iter_problems("train"):
        if problem.solution not in held_out:
            misses = 0
            yield problem
            continue
        misses += 1
        if misses > 100_000:
            raise UserError("toy_base: the task's train split holds nearly every possible "
                            "problem, so none is left for the corpus; lower train_size")


def build_corpus(task, config: ToyBaseConfig, size: int) -> list[tuple[str, list]]:
    rng = random.Random(f"toy-corpus:{config.seed}")
    stream = corpus_problems(task)
    corpus = []
    for _ in range(size):
        problem = next(stream)
        corpus.append((task.messages(problem),
                       assistant_segments(problem.solution, problem.answer, rng, config)))
    return corpus


class TranscriptDataset:
    """Tokenizes transcripts on the fly (cheap next to a training step; no upfront pass)."""

    def __init__(self, tokenizer, corpus, loss_kinds: frozenset):
        self.tokenizer, self.corpus, self.loss_kinds = tokenizer, corpus, loss_kinds

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, index: int) -> dict:
        messages, segments = self.corpus[index]
        text, spans = render_example(self.tokenizer, messages, segments, self.loss_kinds)
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        labels = [tok if any(lo <= start < hi for lo, hi in spans) else -100
                  for tok, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"])]
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": labels}


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


def _time_cap_callback(max_minutes: float):
    from transformers import TrainerCallback

    class TimeCap(TrainerCallback):
        """Stops training when the time cap is reached (a safety net, not the schedule)."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if time.monotonic() - self.start > 60 * max_minutes:
                log.warning("toy-base: time cap of %.1f min reached at step %d",
                            max_minutes, state.global_step)
                control.should_training_stop = True

    return TimeCap()


def train(model, tokenizer, corpus, config: ToyBaseConfig, work_dir: Path) -> dict:
    """Run the HF Trainer; return the loss history and timing."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    torch.set_num_threads(config.threads or max(1, min(os.cpu_count() or 1, 8)))
    tokenizer.padding_side = "right"  # training pads on the right; generation on the left
    args = TrainingArguments(
        output_dir=str(work_dir / "trainer"), per_device_train_batch_size=config.batch_size,
        max_steps=config.steps, learning_rate=config.lr, lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
        logging_steps=max(1, config.steps // 50), save_strategy="no", report_to=[],
        use_cpu=True, seed=config.seed, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(
        model=model, args=args,
        train_dataset=TranscriptDataset(tokenizer, corpus, loss_kinds(config)),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[_time_cap_callback(config.max_minutes)] if config.max_minutes > 0 else [])
    start = time.monotonic()
    trainer.train()
    tokenizer.padding_side = "left"
    losses = [(e["step"], round(e["loss"], 4)) for e in trainer.state.log_history if "loss" in e]
    return {"train_seconds": round(time.monotonic() - start, 1), "losses": losses,
            "steps_done": trainer.state.global_step}


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


def _save(model, tokenizer, target: Path) -> None:
    """Save to a temporary folder beside `target`, then rename (no half-written model)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another run finished the same config first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)


def main(config: ToyBaseConfig) -> Path:
    from backtrack.runinfo import write_run_info
    from backtrack.tasks import get_task

    task = get_task(config.task, config.task_args)
    if not hasattr(task, "iter_problems"):
        raise UserError(f"toy_base: task '{config.task}' cannot generate a training corpus "
                        f"(only generated tasks such as 'arith' can)")
    model_dir = cache_root() / "toy" / config_hash(config)
    extra: dict = {"model_dir": str(model_dir)}
    if (model_dir / "config.json").is_file():
        log.info("toy-base: cached model at %s", model_dir)
        info = model_dir / "toy_base.json"
        extra.update(json.loads(info.read_text()) if info.is_file() else {})
        extra["cached"] = True
        if extra.get("steps_done", config.steps) < config.steps:
            log.warning("toy-base: the cached model stopped at step %s of %s (time cap)",
                        extra["steps_done"], config.steps)
    else:
        size = config.corpus_size or config.steps * config.batch_size
        corpus = build_corpus(task, config, size)
        tokenizer = train_tokenizer(task, corpus, config.vocab_size)
        model = build_model(tokenizer, config)
        with tempfile.TemporaryDirectory() as work:
            extra.update(train(model, tokenizer, corpus, config, Path(work)))
        extra["parameters"] = sum(p.numel() for p in model.parameters())
        _save(model, tokenizer, model_dir)
        extra["greedy_accuracy"] = greedy_accuracy(model_dir, task, config.eval_problems)
        (model_dir / "toy_base.json").write_text(json.dumps(extra, indent=1) + "\n")
    out = Path(config.output_dir) / "toy_base"
    write_run_info(out, config, "toy-base", extra=extra)
    print(f"toy-base: model in {model_dir}")
    return model_dir
