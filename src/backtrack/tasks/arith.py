"""The toy world's task: seeded multi-step arithmetic word problems.

A problem is a chain: a person starts with some objects, then a few events change the count (+,
-, x, exact /). The reference solution writes one step per line (`12 - 3 = 9`). The space of
problems is unlimited: train problems come from an endless seeded stream, whose first
`train_size` distinct problems are the train split the pipeline samples from (the toy base's
corpus is drawn from the rest of the stream); the test split is a fixed set. Train and test are
disjoint by construction: a hash of the arithmetic chain (start value and operations, not the
wording) puts every chain in exactly one split, and each split's stream skips the chains of the
other, so no test chain is ever seen in training, in any wording.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Iterator

from backtrack.errors import UserError
from backtrack.tasks import Problem, Task, register

NAMES = ["Tom", "Ann", "Sara", "Ben", "Mia", "Leo", "Max", "Eva", "Sam", "Lily", "Omar", "Zoe"]
OBJECTS = ["apples", "coins", "books", "pens", "cards", "marbles", "stickers", "shells"]
START = "{name} has {x} {obj}."
EVENTS = {
    "+": ["{name} buys {k} more {obj}.", "{name} finds {k} more {obj}.",
          "{name} gets {k} {obj} from {other}."],
    "-": ["{name} gives {k} {obj} to {other}.", "{name} loses {k} {obj}.",
          "{name} sells {k} {obj}."],
    "*": ["Then {name} has {k} times as many {obj} as before."],
    "/": ["{name} splits the {obj} into {k} equal piles and keeps one pile."],
}
QUESTION = "How many {obj} does {name} have now?"
STEP_RE = re.compile(r"^(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)$")
TEST_BUCKET_PERCENT = 10  # share of all chains that belong to the test split


def valid_step(x: int, op: str, k: int) -> bool:
    """Whether `x op k` stays in the task's world: counts never go below zero, division is
    exact, and operands are at least 1 (at least 2 for x and /)."""
    return k >= (1 if op in "+-" else 2) and not (op == "-" and k >= x) \
        and not (op == "/" and x % k)


def apply_op(x: int, op: str, k: int) -> int:
    if op == "+":
        return x + k
    if op == "-":
        return x - k
    if op == "*":
        return x * k
    return x // k


@dataclass(frozen=True)
class Chain:
    """A problem's arithmetic: start value and a list of (op, operand) steps."""

    start: int
    ops: tuple[tuple[str, int], ...]

    def values(self) -> list[int]:
        values = [self.start]
        for op, k in self.ops:
            values.append(apply_op(values[-1], op, k))
        return values

    def solution_lines(self) -> list[str]:
        values = self.values()
        return [f"{values[i]} {op} {k} = {values[i + 1]}" for i, (op, k) in enumerate(self.ops)]

    def key(self) -> str:
        return f"{self.start}" + "".join(f"|{op}{k}" for op, k in self.ops)

    def split(self) -> str:
        digest = hashlib.sha256(self.key().encode()).digest()
        return "test" if int.from_bytes(digest[:4], "big") % 100 < TEST_BUCKET_PERCENT else "train"


def parse_step(line: str) -> tuple[int, str, int, int] | None:
    """`'12 - 3 = 9'` -> (12, '-', 3, 9); None if the line is not a step."""
    match = STEP_RE.match(line.strip())
    if not match:
        return None
    a, op, b, c = match.groups()
    return int(a), op, int(b), int(c)


def step_runs(text: str) -> list[list[tuple[int, str, int, int]]]:
    """The groups of consecutive step lines in `text` (think tags on a line are ignored)."""
    runs: list[list[tuple[int, str, int, int]]] = []
    in_run = False
    for line in text.splitlines():
        step = parse_step(line.replace("<think>", "").replace("</think>", ""))
        if step is None:
            in_run = False
            continue
        if not in_run:
            runs.append([])
        runs[-1].append(step)
        in_run = True
    return runs


def _step_text(a: int, op: str, b: int, c: int) -> str:
    return f"{a} {op} {b} = {c}"


def compare_steps(reference: list[tuple], written: list[tuple],
                  offset: int) -> list[tuple[str, bool]]:
    """(line, matches) for each reference step set against the written step aligned with it
    (reference index = written index + offset): `18 - 3 = 15, not 16` for a wrong result,
    `..., not 17 - 3 = 14` for another operation, `..., missing` where nothing was written;
    written steps beyond the reference come out as `..., not needed`."""
    extra_before = [(_step_text(*step) + ", not needed", False)
                    for step in written[:max(0, -offset)]]
    lines = []
    for i, (a, op, b, c) in enumerate(reference):
        j, line, ok = i - offset, _step_text(a, op, b, c), True
        if 0 <= j < len(written):
            a2, op2, b2, c2 = written[j]
            if (a2, op2, b2) != (a, op, b):
                line, ok = line + ", not " + _step_text(a2, op2, b2, c2), False
            elif c2 != c:
                line, ok = line + f", not {c2}", False
        elif j >= len(written):
            line, ok = line + ", missing", False
        lines.append((line, ok))
    extra_after = [(_step_text(*step) + ", not needed", False)
                   for step in written[len(reference) - offset:]]
    return extra_before + lines + extra_after


def _steps_range(value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        lo = hi = value
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        lo, hi = value
    else:
        raise UserError(f"task 'arith': option 'steps' must be an integer or [min, max], "
                        f"got {value!r}")
    if not 1 <= lo <= hi:
        raise UserError(f"task 'arith': option 'steps' needs 1 <= min <= max, got {value!r}")
    return lo, hi


@register
class ArithTask(Task):
    """Synthetic multi-step arithmetic word problems (the toy world; unlimited train split)."""

    name = "arith"
    # Shorter than the default prompt: the toy model is trained from scratch on every token of
    # the transcript, and training cost on CPU is per token.
    system_prompt = 'Think step by step in <think> </think>, then write "The answer is N".'
    writes_verification = True

    def __init__(self, steps=(2, 3), max_start: int = 20, max_operand: int = 20,
                 max_factor: int = 3, max_value: int = 100, ops: str = "+-*/",
                 test_size: int = 500, train_size: int = 2000, seed: int = 0, **options):
        super().__init__(**options)
        self.min_steps, self.max_steps = _steps_range(list(steps) if isinstance(steps, tuple)
                                                      else steps)
        for key, value, low in (("max_start", max_start, 1), ("max_operand", max_operand, 1),
                                ("max_factor", max_factor, 2), ("max_value", max_value, 2),
                                ("test_size", test_size, 1), ("train_size", train_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"task 'arith': option '{key}' must be an integer >= {low}, "
                                f"got {value!r}")
        if not ops or set(ops) - set("+-*/"):
            raise UserError(f"task 'arith': option 'ops' must be letters of '+-*/', got {ops!r}")
        self.max_start, self.max_operand, self.max_factor = max_start, max_operand, max_factor
        self.max_value, self.ops = max(max_value, max_start), "".join(sorted(set(ops)))
        self.test_size, self.train_size, self.seed = test_size, train_size, seed

    def verification(self, problem: Problem, attempt_text: str, verdict_correct: str | None = None,
                     verdict_wrong: str | None = None) -> str | None:
        """Re-solve the problem step by step and set the attempt's steps against it.

        The toy world's stand-in for S²R's stronger verifier, in S²R's "problem-solving"
        style (re-solve, then compare) rather than a bare confirmation. The attempt's final
        solution is its last run of step lines; when an earlier run exists (an in-turn retry),
        that run is a redo of the end of the solution and is aligned to the end. The verdict
        is wrong if a step differs or the stated answer is not the result. None when the
        attempt holds no step line to check.
        """
        from backtrack.formats import S2R_VERDICT_CORRECT, S2R_VERDICT_WRONG

        reference = [parse_step(line) for line in (problem.solution or "").splitlines()]
        if not reference or not all(reference):
            raise ValueError(f"problem {problem.id}: no step-by-step reference solution")
        runs = step_runs(attempt_text)
        if not runs:
            return None
        written = runs[-1]
        offset = len(reference) - len(written) if len(runs) > 1 else 0
        compared = compare_steps(reference, written, offset)
        lines = [line for line, _ in compared]
        steps_ok = all(ok for _, ok in compared)
        result = self.check(attempt_text, problem.answer)
        if steps_ok and not result.correct:
            stated = result.extracted if result.extracted is not None else "nothing"
            lines.append(f"The steps give {problem.answer}, not {stated}.")
        ok = steps_ok and result.correct
        lines.append((verdict_correct or S2R_VERDICT_CORRECT) if ok
                     else (verdict_wrong or S2R_VERDICT_WRONG))
        return "\n".join(lines)

    # -- generation ------------------------------------------------------------------------
    def _random_chain(self, rng: random.Random) -> Chain:
        n_steps = rng.randint(self.min_steps, self.max_steps)
        while True:  # restart in the rare case no operation fits (e.g. ops "*/" at a prime)
            x = rng.randint(2, max(2, self.max_start))
            start, ops = x, []
            for _attempt in range(20 * n_steps):
                op = rng.choice(self.ops)
                k = rng.randint(1, self.max_operand) if op in "+-" else rng.randint(2, self.max_factor)
                if not valid_step(x, op, k) or apply_op(x, op, k) > self.max_value:
                    continue
                ops.append((op, k))
                x = apply_op(x, op, k)
                if len(ops) == n_steps:
                    return Chain(start, tuple(ops))

    def _render(self, chain: Chain, rng: random.Random) -> str:
        name, other = rng.sample(NAMES, 2)
        obj = rng.choice(OBJECTS)
        sentences = [START.format(name=name, x=chain.start, obj=obj)]
        for op, k in chain.ops:
            sentences.append(rng.choice(EVENTS[op]).format(name=name, k=k, obj=obj, other=other))
        sentences.append(QUESTION.format(name=name, obj=obj))
        return " ".join(sentences)

    def iter_problems(self, split: str) -> Iterator[Problem]:
        """An endless, seeded stream of problems of `split` (may repeat for tiny spaces)."""
        if split not in ("train", "test"):
            raise UserError(f"task 'arith': unknown split '{split}' (train or test)")
        rng = random.Random(f"arith:{self.seed}:{split}")
        index = 0
        while True:
            chain = self._random_chain(rng)
            if chain.split() != split:
                continue
            question = self._render(chain, rng)
            lines = chain.solution_lines()
            yield Problem(id=f"arith-{split}-{index}", question=question,
                          answer=str(chain.values()[-1]), solution="\n".join(lines))
            index += 1

    def problems(self, split: str, limit: int | None = None) -> list[Problem]:
        """The first `limit` distinct problems of `split`. Each split holds a fixed number
        (`test_size`, `train_size`): the train split is what the pipeline samples from, and the
        toy corpus leaves it out (`toy_corpus.corpus_problems`), so a larger `limit` is capped."""
        if split not in ("train", "test"):
            raise UserError(f"task 'arith': unknown split '{split}' (train or test)")
        size = self.test_size if split == "test" else self.train_size
        want = min(size, limit or size, self.limit or size)
        problems, seen, misses = [], set(), 0
        for problem in self.iter_problems(split):
            if problem.question in seen:
                misses += 1
                if misses > 100 * want + 10_000:
                    raise UserError(f"task 'arith': cannot find {want} distinct {split} "
                                    f"problems with these options; lower the size")
                continue
            seen.add(problem.question)
            problems.append(problem)
            if len(problems) >= want:
                break
        return problems
