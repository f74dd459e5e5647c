"""`retry_sft` and `gold_sft`: retry data in fine-tuning instead of pretraining.

Physics of LMs 2.2 compares retry data (a wrong step, a retry phrase, the redo) in pretraining
with the same data given only in fine-tuning, and finds that fine-tuning on it helps much less
(and LoRA on it not at all). In the toy world the pretraining corpus is ours, so the same
transcripts can be written for fine-tuning: `retry_sft` fine-tunes on the task's reference
solutions of the sampled train problems, a share of them rewritten with a self-correction by
the toy corpus's own writer (`toy_corpus.assistant_segments`, same slips, phrases, late/
immediate mix and masks), and `gold_sft` is its control: the same problems and solutions with
no correction. `retry_sft − gold_sft` is the effect of the retry data itself in fine-tuning,
beside `retry0.25 base − no-retry base` for pretraining (`recipes/study-retry-pretraining.yaml`).

Unlike rft these arms train on reference solutions, not on the model's own samples, so they
also tell how far plain supervised data moves the base. The problems are those of the sample
stage's records (the ones rft sees); the task must have step-wise solutions the corpus writer
can corrupt (arith).
"""

from __future__ import annotations

import random

from backtrack.arms import Arm, register
from backtrack.build import Example, prompt_text
from backtrack.errors import UserError

CORPUS_KEYS = ("correction_rate", "late_share", "retry_phrases", "max_slip", "slip_kinds",
               "redo_from", "loss_on_errors", "loss_on_phrases")
DEFAULT_PER_PROBLEM = 2


def corpus_config(options: dict, correction: bool):
    """The toy corpus options of `build.retry_data` (a ToyBaseConfig: same defaults and
    checks as `backtrack toy-base`), with no correction for the gold control."""
    from backtrack.config import resolve
    from backtrack.toy_base import ToyBaseConfig

    unknown = sorted(set(options) - set(CORPUS_KEYS) - {"per_problem"})
    if unknown:
        raise UserError(f"build.retry_data: unknown key(s) {unknown} (known: "
                        f"{sorted(CORPUS_KEYS + ('per_problem',))})")
    corpus = {key: options[key] for key in CORPUS_KEYS if key in options}
    if not correction:
        corpus["correction_rate"] = 0.0
    return resolve(ToyBaseConfig, {"toy_base": corpus}, "toy_base", source="build.retry_data")


def per_problem(options: dict) -> int:
    count = options.get("per_problem", DEFAULT_PER_PROBLEM)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"build.retry_data.per_problem: must be 1 or more, got {count!r}")
    return count


def sampled_problems(context) -> list:
    """The task's train problems that the sample records hold, in split order."""
    where = str(context.layout.samples)
    ids = {str(r.get("problem_id")) for r in context.samples() if r.get("round", 0) == 0}
    if not ids:
        raise UserError(f"{where}: no sample records to take the problems from")
    problems = [p for p in context.task().problems("train") if p.id in ids]
    if not problems:
        raise UserError(f"{where}: none of the sampled problems is in the task's train split")
    return problems


def transcript(problem, rng: random.Random, corpus) -> tuple[str, tuple, bool]:
    """The assistant turn the toy corpus would write for `problem`, its spans without loss,
    and whether it holds a self-correction."""
    from backtrack.toy_corpus import assistant_segments, loss_kinds

    segments = assistant_segments(problem.solution, str(problem.answer), rng, corpus)
    trained = loss_kinds(corpus)
    no_loss, position = [], 0
    for text, kind in segments:
        if kind not in trained:
            no_loss.append((position, position + len(text)))
        position += len(text)
    text = "".join(text for text, _kind in segments)
    return text, tuple(no_loss), any(kind == "phrase" for _text, kind in segments)


def retry_examples(context, correction: bool) -> tuple[list[Example], dict]:
    from backtrack.tasks.arith import parse_step

    options = context.config.retry_data
    corpus, copies = corpus_config(options, correction), per_problem(options)
    examples, corrected = [], 0
    for problem in sampled_problems(context):
        if not all(parse_step(line) for line in problem.solution.splitlines()):
            raise UserError(f"retry_sft/gold_sft: problem {problem.id} of task "
                            f"'{context.config.task}' has no step-wise solution to write a "
                            "retry transcript from (the arith task has)")
        prompt = prompt_text(context.tokenizer, context.task().messages(problem), problem.id)
        for copy in range(copies):
            rng = random.Random(f"retry-data:{context.config.seed}:{problem.id}:{copy}")
            text, no_loss, retried = transcript(problem, rng, corpus)
            corrected += retried
            examples.append(Example(problem.id, "retry" if retried else "gold", prompt, text,
                                    no_loss=no_loss))
    return examples, {"problems": len(examples) // copies, "per_problem": copies,
                      "with_correction": corrected, "correction_rate": corpus.correction_rate}


def build_retry_sft(context) -> tuple[list[Example], dict]:
    """Reference solutions, a share written with the toy corpus's self-corrections."""
    return retry_examples(context, correction=True)


def build_gold_sft(context) -> tuple[list[Example], dict]:
    """The same problems and reference solutions, none corrected (retry_sft's control)."""
    return retry_examples(context, correction=False)


register(Arm("retry_sft", "SFT on reference solutions with the toy corpus's self-corrections "
             "(Physics of LMs 2.2: retry data in fine-tuning, not pretraining)",
             training="sft", build=build_retry_sft, reads=("sample",),
             compare_with=("gold_sft", "rft_bt")))
register(Arm("gold_sft", "SFT on the same reference solutions without corrections "
             "(retry_sft's control)", training="sft", build=build_gold_sft, reads=("sample",),
             compare_with=("rft",)))
