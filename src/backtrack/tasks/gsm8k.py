"""`gsm8k` task: grade-school math word problems (Cobbe et al., 2021).

Rows have `question` and `answer`, a worked solution that ends in `#### N`. Data comes from a
local folder with `train.jsonl` and `test.jsonl` (the official files) or, when online, from
the `openai/gsm8k` hub dataset (config `main`). Ids are `gsm8k-<split>-<row:05d>` (0-based
row of the official file), so they are stable across runs and machines.
"""

from __future__ import annotations

from pathlib import Path

from backtrack.errors import UserError
from backtrack.tasks import Problem, Task, register
from backtrack.tasks.jsonl import gold_and_solution, question_key, read_rows, row_field

HUB_ID = "openai/gsm8k"


@register
class Gsm8kTask(Task):
    """GSM8K grade-school math (local train/test.jsonl folder or the openai/gsm8k hub dataset)."""

    name = "gsm8k"

    def __init__(self, path: str = HUB_ID, limit: int | None = None, **options):
        super().__init__(limit=limit, **options)
        self.path = str(path)
        self._cache: dict[str, list[Problem]] = {}

    def load_split(self, split: str) -> list[Problem]:
        if split not in self._cache:
            problems = self._read(split)
            if split == "train":  # disjoint by construction, even if a copy of the data is not
                test = {question_key(p.question) for p in self.load_split("test")}
                problems = [p for p in problems if question_key(p.question) not in test]
            self._cache[split] = problems
        return self._cache[split]

    def _read(self, split: str) -> list[Problem]:
        folder = Path(self.path).expanduser()
        if folder.is_dir():
            file = folder / f"{split}.jsonl"
            if not file.is_file():
                raise UserError(f"{file}: file not found (task 'gsm8k' needs train.jsonl and "
                                f"test.jsonl in {folder})")
            rows = [(where, row, file) for where, row in read_rows(file)]
        elif self.path == HUB_ID:
            rows = [(f"row {i + 1}", row, f"{HUB_ID}:{split}")
                    for i, row in enumerate(_hub_rows(split))]
        else:
            raise UserError(f"task 'gsm8k': path '{self.path}' is not a folder "
                            f"(nor the hub dataset {HUB_ID})")
        problems = []
        for index, (where, row, source) in enumerate(rows):
            question = row_field(row, "question", source, where)
            answer = row_field(row, "answer", source, where)
            gold, solution = gold_and_solution(answer, source, where)
            problems.append(Problem(f"gsm8k-{split}-{index:05d}", question, gold, solution))
        return problems


def _hub_rows(split: str) -> list[dict]:
    """Rows of the hub dataset; a one-line error when it cannot be reached."""
    try:
        from datasets import load_dataset

        return list(load_dataset(HUB_ID, "main", split=split))
    except Exception as exc:  # offline, no cache, hub down: all user-fixable
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"task 'gsm8k': cannot load {HUB_ID} from the hub ({first}); "
                        "set task_args.path to a folder with train.jsonl and test.jsonl") from exc
