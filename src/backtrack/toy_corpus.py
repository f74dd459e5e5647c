"""The toy base's training corpus: chat transcripts of arith train problems with retry data.

Each transcript is system, user, then the assistant's `<think>` steps `</think>` and "The answer
is N.". A configurable share holds a natural self-correction, as web text sometimes does (the
"retry data" of Physics of LMs 2.2):
- immediate: a wrong step, a retry phrase, the step done right, then the rest;
- late: the solution runs on from a wrong step to its end, then a retry phrase where `</think>`
  would be, then the solution redone (from the start by default: the tiny model finds its own
  first slip poorly, and a whole redo gave more wrong-to-right continuations). This is the
  shape the method creates when it puts "Wait, that's not right..." in place of `</think>`.
Slips are off by a small amount (`6 + 12 = 15`), like the model's own arithmetic slips. Loss
goes on the assistant turn only; by default not on the wrong steps, so the model learns to fix
slips without learning to make them (its own slips come from its small capacity).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from backtrack.errors import UserError

if TYPE_CHECKING:
    from backtrack.toy_base import ToyBaseConfig

RETRY_PHRASES = [
    "Wait, that's not right...",
    "Wait, that's not right.",
    "Hmm, let me check that again.",
    "Wait, let me redo that.",
]


def _wrong_step(a: int, op: str, b: int, c: int, rng: random.Random,
                config: ToyBaseConfig) -> tuple[int, int]:
    """A plausible wrong (operand, result) for the step `a op b = c`: either the result is off
    by a small amount (`6 + 12 = 15`) or an operand is misread and the step computed from it."""
    from backtrack.tasks.arith import apply_op, valid_step

    kind = rng.choice(config.slip_kinds)
    while True:
        delta = rng.choice([-1, 1]) * rng.randint(1, max(1, config.max_slip))
        if kind == "operand":
            wrong_b = b + (delta if op in "+-" else (1 if delta > 0 else -1))
            if valid_step(a, op, wrong_b):
                return wrong_b, apply_op(a, op, wrong_b)
            kind = "result"  # no valid misread operand here
        elif c + delta >= 0:
            return b, c + delta


def _run_on(start: int, ops, first: int) -> list[str] | None:
    """Steps `first..` recomputed from a wrong `start`; None if a step becomes invalid."""
    from backtrack.tasks.arith import apply_op, valid_step

    lines, x = [], start
    for op, k in ops[first:]:
        if not valid_step(x, op, k):
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
    """The corpus tokenized once, in one batch call of the fast tokenizer (a third of the
    per-item cost), kept as compact arrays. Length-grouped batching reads every item's length
    before the first step, and per-step tokenization was ~3 % of a step."""

    def __init__(self, tokenizer, corpus, loss_kinds: frozenset):
        import numpy as np

        rendered = [render_example(tokenizer, messages, segments, loss_kinds)
                    for messages, segments in corpus]
        enc = tokenizer([text for text, _ in rendered], return_offsets_mapping=True,
                        add_special_tokens=False)
        self.input_ids, self.labels = [], []
        for ids, offsets, (_text, spans) in zip(enc["input_ids"], enc["offset_mapping"],
                                                rendered):
            starts = np.array([start for start, _end in offsets])
            in_loss = np.zeros(len(ids), dtype=bool)
            for lo, hi in spans:
                in_loss |= (starts >= lo) & (starts < hi)
            ids = np.array(ids, dtype=np.int32)
            self.input_ids.append(ids)
            self.labels.append(np.where(in_loss, ids, -100).astype(np.int32))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        ids = self.input_ids[index].tolist()
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": self.labels[index].tolist()}
