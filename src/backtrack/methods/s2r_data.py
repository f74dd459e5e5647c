"""S²R behaviour-initialisation data: self-verifying, self-correcting trajectories.

S²R (Ma et al. 2025) first fine-tunes a model on trajectories in which it checks its own answer
and retries only when the check says wrong. A trajectory is one assistant turn:

    attempt  <verify cue>  verification ending in a verdict
    [<retry cue>  attempt  <verify cue>  verification ...]   until an attempt verified correct

Attempts are the model's own samples of the problem (wrong ones, then a right one to end);
verifications come from the `verify` stage (`verifying.py`: the task's `verification` hook,
with which `arith` re-solves the problem, or the model's own check prompted after its
attempt, as for GSM8K), and one whose verdict disagrees with the checker is dropped (S²R's
filter). As in S²R, harder problems get longer trajectories: the
number of wrong attempts grows with the share of the model's samples that were wrong.
Trajectories that stop after a first attempt verified correct teach the model to stop; their
share of the mix is `right_first_share`.

Each example carries `segments`: character spans of the completion (attempt, verify cue,
verification, retry cue) that tile it, with whether each attempt is right and each verdict
agrees with the checker, so the RL stage can give process-level rewards per segment.
`parse_trace` finds the same segments in generated text (used by `s2r_metrics`).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from backtrack.build import Example, prompt_text, require_keys, tokenize_example
from backtrack.methods.rft import trace_text
from backtrack.config import option
from backtrack.errors import UserError
from backtrack.formats import (S2R_RETRY_CUE, S2R_VERDICT_CORRECT, S2R_VERDICT_WRONG,
                               S2R_VERIFY_CUE)

SEPARATOR = "\n"  # around each cue: the toy corpus writes one thought per line
KINDS = ("attempt", "verify_cue", "verification", "retry_cue")


@dataclass(frozen=True)
class Cues:
    """The four strings that structure a trajectory (defaults in `backtrack.formats`)."""

    verify: str = S2R_VERIFY_CUE
    retry: str = S2R_RETRY_CUE
    correct: str = S2R_VERDICT_CORRECT
    wrong: str = S2R_VERDICT_WRONG


@dataclass
class S2RDataConfig:
    """How the `s2r` SFT set is built from sample (and optionally backtrack) records."""

    verify_cue: str = option(S2R_VERIFY_CUE, "Text after an attempt that opens its check.")
    retry_cue: str = option(S2R_RETRY_CUE, "Text after a `wrong` verdict that opens a retry.")
    verdict_correct: str = option(S2R_VERDICT_CORRECT, "Phrase ending a check that passes.")
    verdict_wrong: str = option(S2R_VERDICT_WRONG, "Phrase ending a check that fails.")
    right_first_share: float = option(
        0.5, "Share of trajectories whose first attempt is right and verified right (the "
        "model must learn to stop), in [0, 1]; 1 = only those, 0 = none. Capped by the "
        "problems that have a right attempt; stats give the share reached.")
    max_wrong_attempts: int = option(
        3, "Wrong attempts before the right one for a problem the model always fails; a "
        "problem gets ceil((1 - its sample accuracy) x this many), as S²R gives harder "
        "problems longer trajectories (fewer when it has fewer distinct wrong attempts).")
    max_trajectories: int = option(
        0, "Keep at most this many trajectories (0 = all), drawn at random with the right-"
        "first share kept. The SFT set's size, and with it the training time (S²R used 3.1k "
        "for 7B models).")
    backtrack_attempts: bool = option(
        False, "Also use the backtrack stage's traces (wrong sample, retry phrase, the "
        "model's continuation) as attempts. Off by default: such an attempt holds an in-turn "
        "retry without a check, the behaviour S²R replaces. The verify stage checks sample "
        "attempts only: these get the task's hook when verify used it, else stay unverified.")
    seed: int = option(0, "Seed for choosing attempts and the right-first problems.")

    def validate(self) -> None:
        for key in ("verify_cue", "retry_cue", "verdict_correct", "verdict_wrong"):
            if not getattr(self, key).strip():
                raise UserError(f"option '{key}': must not be empty")
        if self.verify_cue.strip().lower() == self.retry_cue.strip().lower():
            raise UserError("options 'verify_cue' and 'retry_cue' must differ")
        if self.verdict_correct.strip().lower() == self.verdict_wrong.strip().lower():
            raise UserError("options 'verdict_correct' and 'verdict_wrong' must differ")
        share = self.right_first_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise UserError(f"option 'right_first_share': must be in [0, 1], got {share!r}")
        if isinstance(self.max_trajectories, bool) or not isinstance(self.max_trajectories, int) \
                or self.max_trajectories < 0:
            raise UserError(f"option 'max_trajectories': must be 0 (all) or more, "
                            f"got {self.max_trajectories!r}")
        if self.max_wrong_attempts < 1:
            raise UserError(f"option 'max_wrong_attempts': must be 1 or more, "
                            f"got {self.max_wrong_attempts!r}")

    def cues(self) -> Cues:
        return Cues(self.verify_cue, self.retry_cue, self.verdict_correct, self.verdict_wrong)


class Segment(NamedTuple):
    """A character span of a completion; `correct`: the attempt is right / the verdict agrees
    with the checker (None for cues, and where not judged)."""

    start: int
    end: int
    kind: str  # one of KINDS
    correct: bool | None = None


@dataclass
class S2RExample(Example):
    """An `Example` (so `build.tokenize_example` applies) plus its segments."""

    segments: list[Segment] = field(default_factory=list)


# ------------------------------------------------------------------ format: parse and render


def cue_pattern(verify_cue: str, retry_cue: str) -> re.Pattern:
    """A cue with the whitespace around it (so segments start and end on text)."""
    return re.compile(rf"\s*(?:(?P<verify>{re.escape(verify_cue.strip())})"
                      rf"|(?P<retry>{re.escape(retry_cue.strip())}))\s*", re.IGNORECASE)


def parse_trace(text: str, verify_cue: str = S2R_VERIFY_CUE,
                retry_cue: str = S2R_RETRY_CUE) -> list[Segment]:
    """Segments of a trace: the text before the first cue is an attempt (even if empty), text
    after a verify cue a verification, text after a retry cue an attempt. Cue matches take the
    whitespace around them; back-to-back cues leave no empty segment between them."""
    segments, pos, kind = [], 0, "attempt"
    for match in cue_pattern(verify_cue, retry_cue).finditer(text):
        if match.start() > pos or not segments:
            segments.append(Segment(pos, match.start(), kind))
        cue = "verify_cue" if match.group("verify") is not None else "retry_cue"
        segments.append(Segment(match.start(), match.end(), cue))
        pos, kind = match.end(), "verification" if cue == "verify_cue" else "attempt"
    if pos < len(text) or not segments:
        segments.append(Segment(pos, len(text), kind))
    return segments


def verdict_matches(text: str, verdict_correct: str = S2R_VERDICT_CORRECT,
                    verdict_wrong: str = S2R_VERDICT_WRONG) -> list[tuple[int, int, str]]:
    """(start, end, "correct" | "wrong") of every verdict phrase in `text`, in order (case and
    final punctuation ignored, "correctly" is not "correct"; `end` takes the punctuation)."""
    found = []
    for name, phrase in (("correct", verdict_correct), ("wrong", verdict_wrong)):
        core = re.escape(phrase.strip().rstrip(".!"))
        found += [(m.start(), m.end(), name)
                  for m in re.finditer(rf"{core}(?!\w)[.!]*", text, flags=re.IGNORECASE)]
    return sorted(found)


def parse_verdict(text: str, verdict_correct: str = S2R_VERDICT_CORRECT,
                  verdict_wrong: str = S2R_VERDICT_WRONG) -> str | None:
    """"correct", "wrong" or None: the last verdict phrase in `text`."""
    found = verdict_matches(text, verdict_correct, verdict_wrong)
    return found[-1][2] if found else None


def render_trajectory(steps: list[tuple[str, str, bool]], config: S2RDataConfig):
    """(completion, segments) for a list of (attempt, verification, attempt_correct); every
    verification but the last says wrong (the builder guarantees it)."""
    parts: list[tuple[str, str, bool | None]] = []
    for i, (attempt, verification, correct) in enumerate(steps):
        if i:
            parts.append((SEPARATOR + config.retry_cue.strip() + SEPARATOR, "retry_cue", None))
        parts.append((attempt.strip() if i else attempt.rstrip(), "attempt", correct))
        parts.append((SEPARATOR + config.verify_cue.strip() + SEPARATOR, "verify_cue", None))
        parts.append((verification.strip(), "verification", True))
    segments, pos = [], 0
    for text, kind, correct in parts:
        segments.append(Segment(pos, pos + len(text), kind, correct))
        pos += len(text)
    return "".join(text for text, _, _ in parts), segments


# ------------------------------------------------------------------ attempts and their checks


@dataclass
class Attempt:
    text: str
    correct: bool  # the checker's judgement, from the record
    source: str  # "sample" or "backtrack"
    verification: str | None = None


Verifier = Callable[[str, str], "str | None"]  # (problem_id, attempt_text) -> verification


def task_verifier(task, problems, config: S2RDataConfig) -> Verifier:
    """The task's verification hook as a `Verifier` over `problems` (by id). A task without
    the hook fails here, on a probe, before any data is built."""
    by_id = {problem.id: problem for problem in problems}
    if by_id:
        task.verification(next(iter(by_id.values())), "", config.verdict_correct,
                          config.verdict_wrong)

    def verify(problem_id: str, attempt_text: str) -> str | None:
        if problem_id not in by_id:
            raise UserError(f"record of problem {problem_id!r}: not a problem of task "
                            f"'{task.name}' (were the records made with another task?)")
        return task.verification(by_id[problem_id], attempt_text, config.verdict_correct,
                                 config.verdict_wrong)

    return verify


def collect_attempts(samples: list[dict], backtracks: list[dict], use_backtracks: bool,
                     where: str, backtrack_where: str
                     ) -> tuple[dict[str, list[Attempt]], dict[str, float], dict]:
    """Distinct attempts per problem, the model's sample accuracy per problem, and prompts."""
    pools: dict[str, list[Attempt]] = {}
    seen: set[tuple[str, str]] = set()
    counts: dict[str, list[int]] = {}
    prompts: dict[str, object] = {}

    def add(pid: str, text: str, correct: bool, source: str) -> None:
        if (pid, text.strip()) not in seen and text.strip():
            seen.add((pid, text.strip()))
            pools.setdefault(pid, []).append(Attempt(text, correct, source))

    for record in sorted(samples, key=lambda r: (str(r.get("problem_id")),
                                                 r.get("sample_idx", 0))):
        require_keys(record, ("problem_id", "sample_idx", "prompt", "completion", "correct"), where)
        if record.get("round", 0) != 0:
            continue
        pid = str(record["problem_id"])
        prompts.setdefault(pid, record["prompt"])
        counts.setdefault(pid, [0, 0])
        counts[pid][0] += record["correct"] is True
        counts[pid][1] += 1
        add(pid, record["completion"], record["correct"] is True, "sample")
    for record in backtracks if use_backtracks else []:
        require_keys(record, ("problem_id", "prompt", "chain"), backtrack_where)
        if record.get("kind", "wrong") != "wrong":  # confirm traces: no wrong attempt in them
            continue
        found = trace_text(record, backtrack_where)
        pid = str(record["problem_id"])
        prompts.setdefault(pid, record["prompt"])
        if found is not None:
            add(pid, found[0], True, "backtrack")
        elif "completion" in record:
            add(pid, record["completion"], False, "backtrack")
    accuracy = {pid: c / n for pid, (c, n) in counts.items() if n}
    return pools, accuracy, prompts


def check_attempts(pools: dict[str, list[Attempt]], verify: Verifier,
                   config: S2RDataConfig) -> tuple[dict[str, list[Attempt]], dict]:
    """Attempts whose verification exists, agrees with the checker and holds no cue."""
    cue = cue_pattern(config.verify_cue, config.retry_cue)
    kept: dict[str, list[Attempt]] = {}
    stats = {"attempts": 0, "unverifiable": 0, "verdict_disagrees": 0, "cue_in_text": 0}
    for pid in sorted(pools):
        for attempt in pools[pid]:
            stats["attempts"] += 1
            if cue.search(attempt.text):
                stats["cue_in_text"] += 1
                continue
            verification = verify(pid, attempt.text)
            if verification is None:
                stats["unverifiable"] += 1
                continue
            if cue.search(verification):
                stats["cue_in_text"] += 1
                continue
            verdict = parse_verdict(verification, config.verdict_correct, config.verdict_wrong)
            if verdict != ("correct" if attempt.correct else "wrong"):
                stats["verdict_disagrees"] += 1
                continue
            attempt.verification = verification
            kept.setdefault(pid, []).append(attempt)
    return kept, stats


# ------------------------------------------------------------------ trajectories


def wrong_attempts_for(accuracy: float, max_wrong: int) -> int:
    """S²R's rule, harder problems get more trials: ceil((1 - accuracy) x max_wrong)."""
    return math.ceil(round((1 - accuracy) * max_wrong, 9))


def plan_trajectories(kept: dict[str, list[Attempt]], accuracy: dict[str, float],
                      config: S2RDataConfig) -> list[tuple[str, list[Attempt]]]:
    """(problem_id, attempts) for each trajectory: one wrong-first trajectory per problem that
    has a right and a wrong attempt (unless the share is 1), then right-first ones on randomly
    chosen problems, as many as the share asks for (at most one per problem)."""
    rng = random.Random(f"s2r:{config.seed}")
    share = float(config.right_first_share)
    plans, endings = [], {}
    for pid in sorted(kept):
        right = [a for a in kept[pid] if a.correct]
        wrong = [a for a in kept[pid] if not a.correct]
        if not right:
            continue
        endings[pid] = right
        n_wrong = min(len(wrong), wrong_attempts_for(accuracy.get(pid, 0.0),
                                                     config.max_wrong_attempts))
        if share < 1 and n_wrong:
            plans.append((pid, rng.sample(wrong, n_wrong) + [rng.choice(right)]))
    wanted = len(endings) if share == 1 else round(share / (1 - share) * len(plans))
    used = {pid: attempts[-1] for pid, attempts in plans}
    for pid in sorted(rng.sample(sorted(endings), min(wanted, len(endings)))):
        others = [a for a in endings[pid] if a is not used.get(pid)] or endings[pid]
        plans.append((pid, [rng.choice(others)]))
    if 0 < config.max_trajectories < len(plans):
        plans = _subsample(plans, config.max_trajectories, rng)
    return plans


def _subsample(plans: list, count: int, rng: random.Random) -> list:
    """`count` of the plans at random, right-first ones in their share; in the plans' order."""
    right = [i for i, (_, attempts) in enumerate(plans) if len(attempts) == 1]
    wrong = [i for i, (_, attempts) in enumerate(plans) if len(attempts) > 1]
    n_right = round(count * len(right) / len(plans))
    kept = rng.sample(right, n_right) + rng.sample(wrong, count - n_right)
    return [plans[i] for i in sorted(kept)]


def build_s2r_examples(samples: list[dict], backtracks: list[dict], verify: Verifier,
                       config: S2RDataConfig, tokenizer=None, where: str = "samples",
                       backtrack_where: str = "backtrack") -> tuple[list[S2RExample], dict]:
    """The `s2r` SFT examples (source "s2r", loss on the whole turn) and their statistics.

    `verify(problem_id, attempt_text)` writes a verification (see `task_verifier`); a
    `tokenizer` is needed only when record prompts are chat message lists; `where` and
    `backtrack_where` name the record folders in errors.
    """
    config.validate()
    pools, accuracy, prompts = collect_attempts(samples, backtracks, config.backtrack_attempts,
                                                where, backtrack_where)
    kept, check_stats = check_attempts(pools, verify, config)
    examples, histogram = [], {}
    for pid, attempts in plan_trajectories(kept, accuracy, config):
        steps = [(a.text, a.verification, a.correct) for a in attempts]
        completion, segments = render_trajectory(steps, config)
        prompt = prompt_text(tokenizer, prompts[pid], where)
        examples.append(S2RExample(pid, "s2r", prompt, completion, segments=segments))
        histogram[len(attempts) - 1] = histogram.get(len(attempts) - 1, 0) + 1
    right_first = histogram.get(0, 0)
    stats = {**check_stats,
             "problems": len(pools),
             "problems_with_right_attempt": sum(any(a.correct for a in v) for v in kept.values()),
             "trajectories": len(examples),
             "right_first": right_first,
             "right_first_share": right_first / len(examples) if examples else None,
             "wrong_attempts_histogram": dict(sorted(histogram.items())),
             "mean_attempts": (sum((k + 1) * v for k, v in histogram.items()) / len(examples)
                               if examples else None)}
    return examples, stats


def tokenize_s2r_example(tokenizer, example: S2RExample, end_of_turn: str) -> dict:
    """`build.tokenize_example`'s row plus `segments` (as dicts, for Arrow) and
    `token_segments`: the index of the segment each completion token ends in (the
    end-of-turn token belongs to the last segment, which it closes)."""
    row = tokenize_example(tokenizer, example, end_of_turn)
    encoded = tokenizer(example.completion + end_of_turn, add_special_tokens=False,
                        return_offsets_mapping=True)
    ends = [s.end for s in example.segments]
    row["segments"] = [s._asdict() for s in example.segments]
    row["token_segments"] = [_segment_at(ends, end) for _, end in encoded["offset_mapping"]]
    return row


def _segment_at(ends: list[int], char_end: int) -> int:
    """Index of the segment holding the character before `char_end` (last one past the end)."""
    for index, end in enumerate(ends):
        if char_end <= end:
            return index
    return len(ends) - 1
