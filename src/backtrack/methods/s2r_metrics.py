"""Verification metrics of S²R-style traces: how often the model checks, and how well.

A trace is split into attempts and verifications by the cues (`s2r_data.parse_trace`). Each
attempt is judged on its own with the task's checker, and each verdict against the attempt
before it, so the figures say whether the model's own check tracks the truth:

- verdicts_per_answer: verifications that reach a verdict, per trace;
- verdict_accuracy: verdicts that agree with the checker on the attempt before them;
- wrong_precision: "wrong" verdicts given to attempts that are wrong;
- wrong_recall: wrong attempts whose (last) verdict is "wrong"; a wrong attempt the model did
  not check counts as missed;
- attempts_per_answer; attempt_acc_first / attempt_acc_final (first / last attempt right);
- attempt_delta_i2c / attempt_delta_c2i: first attempt wrong and last right, and the reverse;
- tokens_per_answer: generated tokens per trace.

The final answer of such a trace is its last attempt's (`final_attempt_text`): the checker
alone would read a number from a verification after a retracted answer statement. Figures are
per-problem numerators and denominators as in `metrics.problem_metrics`, so confidence
intervals come from `metrics.bootstrap_ci` (a bootstrap over problems).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from backtrack.methods.s2r_data import Cues, parse_trace, parse_verdict
from backtrack.metrics import group_by_problem, with_cis


@dataclass
class JudgedTrace:
    """Attempts judged by the checker; verdicts as (verdict, index of the attempt before)."""

    attempts: list[bool] = field(default_factory=list)
    verdicts: list[tuple[str | None, int]] = field(default_factory=list)


def final_attempt_text(text: str, cues: Cues = Cues()) -> str:
    """The last attempt of a trace, the one its final answer is read from."""
    last = [s for s in parse_trace(text, cues.verify, cues.retry) if s.kind == "attempt"][-1]
    return text[last.start:last.end]


def judge_trace(text: str, gold: str, check: Callable, cues: Cues = Cues()) -> JudgedTrace:
    """Check each attempt of `text` on its own (`check(text, gold).correct`) and read each
    verification's verdict."""
    judged = JudgedTrace()
    for segment in parse_trace(text, cues.verify, cues.retry):
        piece = text[segment.start:segment.end]
        if segment.kind == "attempt":
            judged.attempts.append(bool(check(piece, gold).correct))
        elif segment.kind == "verification":
            verdict = parse_verdict(piece, cues.correct, cues.wrong)
            judged.verdicts.append((verdict, len(judged.attempts) - 1))
    return judged


def step_rewards(text: str, gold: str, check: Callable, cues: Cues = Cues()
                 ) -> list[tuple[int, str, float | None]]:
    """S²R's process-level rewards of a trace: [(end character, RL segment, reward), ...]
    tiling `text`. An attempt gets +1 when right and -1 when wrong; a verification +1 when
    its verdict agrees with the checker on the attempt before it and -1 when it disagrees or
    reaches no verdict; cues get no reward (None). The first attempt is RL segment `attempt1`,
    later ones `reattempt` (S²R's round 1 and rounds 2..N)."""
    steps, last_right = [], None
    for segment in parse_trace(text, cues.verify, cues.retry):
        piece = text[segment.start:segment.end]
        if segment.kind == "attempt":
            last_right = bool(check(piece, gold).correct)
            name = "reattempt" if any(s[1] in ("attempt1", "reattempt") for s in steps) \
                else "attempt1"
            steps.append((segment.end, name, 1.0 if last_right else -1.0))
        elif segment.kind == "verification":
            verdict = parse_verdict(piece, cues.correct, cues.wrong)
            agrees = verdict is not None and (verdict == "correct") == last_right
            steps.append((segment.end, "verification", 1.0 if agrees else -1.0))
        else:
            steps.append((segment.end, segment.kind, None))
    return steps


def _trace_counts(judged: JudgedTrace) -> dict[str, int]:
    """One trace's contribution to each numerator and denominator."""
    given = [(v, i) for v, i in judged.verdicts if v is not None]
    last_verdict = {i: v for v, i in given}  # the last verdict each attempt got
    wrong_attempts = [i for i, ok in enumerate(judged.attempts) if not ok]
    first, last = judged.attempts[0], judged.attempts[-1]
    return {
        "verdicts": len(given),
        "agree": sum((v == "correct") == judged.attempts[i] for v, i in given),
        "wrong_verdicts": sum(v == "wrong" for v, _ in given),
        "wrong_verdicts_right": sum(v == "wrong" and not judged.attempts[i] for v, i in given),
        "wrong_attempts": len(wrong_attempts),
        "wrong_attempts_caught": sum(last_verdict.get(i) == "wrong" for i in wrong_attempts),
        "attempts": len(judged.attempts),
        "first_right": int(first), "last_right": int(last),
        "i2c": int(not first and last), "c2i": int(first and not last),
    }


def problem_metrics(groups: dict[str, list[dict]], check: Callable,
                    cues: Cues = Cues()) -> dict:
    """Per-problem numerators and denominators of every verification metric.

    `groups` as from `metrics.group_by_problem` (records with `completion`, `answer` (gold)
    and `new_tokens`); `check(text, gold)` is the task's checker.
    """
    ids = sorted(groups)
    rows: dict[str, list[tuple[float, float]]] = {}
    for pid in ids:
        group, total = groups[pid], {}
        for record in group:
            judged = judge_trace(record.get("completion") or "", record["answer"], check, cues)
            for key, value in _trace_counts(judged).items():
                total[key] = total.get(key, 0) + value
        n = len(group)
        tokens = sum(int(r.get("new_tokens") or 0) for r in group)
        for name, num, den in (
                ("verdicts_per_answer", total["verdicts"], n),
                ("verdict_accuracy", total["agree"], total["verdicts"]),
                ("wrong_precision", total["wrong_verdicts_right"], total["wrong_verdicts"]),
                ("wrong_recall", total["wrong_attempts_caught"], total["wrong_attempts"]),
                ("attempts_per_answer", total["attempts"], n),
                ("attempt_acc_first", total["first_right"], n),
                ("attempt_acc_final", total["last_right"], n),
                ("attempt_delta_i2c", total["i2c"], n),
                ("attempt_delta_c2i", total["c2i"], n),
                ("tokens_per_answer", tokens, n)):
            rows.setdefault(name, []).append((float(num), float(den)))
    arrays = {name: (np.array([v[0] for v in vals]), np.array([v[1] for v in vals]))
              for name, vals in rows.items()}
    return {"problems": ids, "arrays": arrays}


def summarize(records: Iterable[dict], check: Callable, cues: Cues = Cues(),
              n_boot: int = 1000, seed: int = 0) -> dict:
    """Every verification metric with a 95 % bootstrap CI over problems, JSON-ready, plus
    per-problem values (None where undefined) for paired comparisons, as `metrics.summarize`."""
    groups = group_by_problem(records)
    if not groups:
        raise ValueError("no records to summarise")
    table = problem_metrics(groups, check, cues)
    metrics, per_problem = with_cis(table["arrays"], n_boot, seed)
    return {"problems": len(groups), "metrics": metrics, "problem_ids": table["problems"],
            "per_problem": per_problem}
