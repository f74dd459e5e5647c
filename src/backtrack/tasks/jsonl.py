"""`jsonl` task: questions and answers from any JSONL (or JSON list) file.

Field names are options. Train and test are disjoint by construction: with two files, train
drops every question that is also in test; with one file, a hash of the question decides the
split, so a question (and its duplicates) always lands on the same side.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from backtrack.errors import UserError
from backtrack.tasks import Problem, Task, register


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """("line N" / "row N", object) for each non-blank row of a JSONL file / JSON list."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: invalid JSON at line {exc.lineno} ({exc.msg})") from exc
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of objects")
        rows = [(f"row {n}", row) for n, row in enumerate(data, start=1)]
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: line {number}: malformed JSON ({exc.msg})") from exc
    for where, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{path}: {where}: expected a JSON object")
    return rows


def row_field(row: dict, name: str, path: Path | str, where: str) -> str:
    """A required, non-empty field of a row, as a string."""
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{path}: {where}: missing field '{name}'")
    if isinstance(value, (dict, list)):
        raise UserError(f"{path}: {where}: field '{name}' must be a string or number")
    return str(value)


def gold_and_solution(answer: str, path: Path | str, where: str) -> tuple[str, str | None]:
    """Canonical gold value and the reference solution of a GSM8K-style answer.

    GSM8K's `<<48/2=24>>` calculator annotations are removed from the solution: they are an
    artefact of how the data was written, not text a model should learn to produce.
    """
    from backtrack.checking import parse_gold

    try:
        gold = parse_gold(answer)
    except ValueError:
        raise UserError(f"{path}: {where}: cannot read a gold answer from "
                        f"{answer.strip()[-60:]!r}") from None
    solution = None
    if "####" in answer:
        solution = re.sub(r"<<[^<>]*>>", "", answer.rsplit("####", 1)[0]).strip() or None
    return gold, solution


def question_key(question: str) -> str:
    return " ".join(question.lower().split())


def in_test_split(question: str, test_fraction: float) -> bool:
    digest = hashlib.sha256(question_key(question).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


@register
class JsonlTask(Task):
    """Your own JSONL/JSON file(s) of questions with numeric answers; field names configurable."""

    name = "jsonl"

    def __init__(self, path: str | None = None, train_path: str | None = None,
                 test_path: str | None = None, question_field: str = "question",
                 answer_field: str = "answer", id_field: str | None = None,
                 test_fraction: float = 0.2, limit: int | None = None, **options):
        super().__init__(limit=limit, **options)
        if path and (train_path or test_path):
            raise UserError("task 'jsonl': give either 'path' or 'train_path'/'test_path'")
        if not path and not (train_path and test_path):
            raise UserError("task 'jsonl': option 'path' (one file, hash-split) or both "
                            "'train_path' and 'test_path' is required")
        if not 0 < float(test_fraction) < 1:
            raise UserError(f"task 'jsonl': option 'test_fraction' must be in (0, 1), "
                            f"got {test_fraction!r}")
        self.path, self.train_path, self.test_path = path, train_path, test_path
        self.question_field, self.answer_field = question_field, answer_field
        self.id_field, self.test_fraction = id_field, float(test_fraction)
        self._cache: dict[str, list[Problem]] = {}

    def load_split(self, split: str) -> list[Problem]:
        if split not in self._cache:
            self._cache[split] = self._load(split)
        return self._cache[split]

    def _load(self, split: str) -> list[Problem]:
        if self.path:
            problems = self.read_file(self.path, split)
            keep_test = split == "test"
            return [p for p in problems
                    if in_test_split(p.question, self.test_fraction) == keep_test]
        if split == "test":
            return self.read_file(self.test_path, "test")
        test_questions = {question_key(p.question) for p in self.load_split("test")}
        return [p for p in self.read_file(self.train_path, "train")
                if question_key(p.question) not in test_questions]

    def read_file(self, path: str | Path, split: str) -> list[Problem]:
        """All rows of one file as problems; ids are `<id_field>` or `jsonl-<split>-<line>`."""
        problems, seen = [], set()
        for where, row in read_rows(path):
            question = row_field(row, self.question_field, path, where)
            answer = row_field(row, self.answer_field, path, where)
            gold, solution = gold_and_solution(answer, path, where)
            if self.id_field:
                problem_id = row_field(row, self.id_field, path, where)
                if problem_id in seen:
                    raise UserError(f"{path}: {where}: duplicate id {problem_id!r}")
                seen.add(problem_id)
            else:
                problem_id = f"{self.name}-{split}-{int(where.split()[1]):05d}"
            problems.append(Problem(problem_id, question, gold, solution))
        return problems
