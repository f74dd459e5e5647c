"""Tasks: problems with checkable answers.

A `Task` bundles its data (problems with a stable id, question, gold answer and optional
reference solution), the chat prompt that asks for `<think>...</think>` then "The answer is N",
and the answer check used as the reward. Stages only talk to tasks through this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from backtrack.checking import CheckResult  # noqa: F401  (part of the Task API)
from backtrack.errors import UserError

SYSTEM_PROMPT = (
    "Solve the problem. First reason step by step inside <think> ... </think>. "
    "Then give the final answer on its own line as \"The answer is N\"."
)


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str  # normalised gold value, e.g. "18" or "-3/4"
    solution: str | None = None  # reference solution, if the task has one


class Task:
    """Base class. Subclasses implement `load_split`; checking defaults to numeric answers."""

    name = "task"
    system_prompt = SYSTEM_PROMPT
    # Whether `verification` is implemented: the verify stage's `source: auto` asks this
    # instead of calling the hook (the model writes the verifications of a task without one).
    writes_verification = False

    def __init__(self, limit: int | None = None, **options):
        if options:
            raise UserError(f"task '{self.name}': unknown option(s) {sorted(options)}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise UserError(f"task '{self.name}': option 'limit' must be a positive integer, "
                            f"got {limit!r}")
        self.limit = limit  # a cap on every split, e.g. a small GSM8K subset

    def problems(self, split: str, limit: int | None = None) -> list[Problem]:
        if self.limit and (limit is None or limit > self.limit):
            limit = self.limit
        if split not in ("train", "test"):
            raise UserError(f"task '{self.name}': unknown split '{split}' (train or test)")
        problems = self.load_split(split)
        return problems[:limit] if limit else problems

    def load_split(self, split: str) -> list[Problem]:
        raise NotImplementedError

    def messages(self, problem: Problem) -> list[dict]:
        """The chat prompt for a problem, without the assistant turn."""
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": problem.question},
        ]

    def check(self, completion: str, gold: str) -> CheckResult:
        from backtrack.checking import check_answer

        return check_answer(completion, gold)

    def reward(self, completion: str, gold: str) -> float:
        return 1.0 if self.check(completion, gold).correct else 0.0

    def verification(self, problem: Problem, attempt_text: str, verdict_correct: str | None = None,
                     verdict_wrong: str | None = None) -> str | None:
        """A check of `attempt_text` that ends in a verdict phrase (S²R's self-verification
        data), or None when this attempt cannot be checked. The verdict phrases default to
        `formats.S2R_VERDICT_CORRECT` / `S2R_VERDICT_WRONG`. A task that implements it sets
        `writes_verification = True`; for the others (GSM8K) the model writes them."""
        raise UserError(f"task '{self.name}' has no verification hook; use verify.source "
                        "'model' (or 'auto') to have the model write its own verifications")


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def _load_builtin_tasks() -> None:
    # Imported for their @register side effect.
    from backtrack.tasks import arith, gsm8k, jsonl  # noqa: F401


def get_task(name: str, options: dict | None = None) -> Task:
    _load_builtin_tasks()
    if name not in TASKS:
        raise UserError(f"unknown task '{name}' (available: {', '.join(sorted(TASKS))})")
    return TASKS[name](**(options or {}))


def task_names() -> list[str]:
    _load_builtin_tasks()
    return sorted(TASKS)
