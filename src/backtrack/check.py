"""`backtrack check`: score completions in a JSONL file against gold answers.

Each input row has `completion` and `answer` (a GSM8K solution ending in `#### N`, or a bare
value) and optionally `id`; each output row is the input plus `extracted` (string or null)
and `correct` (bool). Every row is validated before anything is written, the output is
written atomically, and `run.json` goes beside it (named `<out>.run.json` so that checking
several files into one folder keeps one record per output).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from backtrack.config import CommonConfig, option
from backtrack.errors import UserError


@dataclass
class CheckConfig(CommonConfig):
    """Score completions in a JSONL file against gold answers."""

    task: str = option("gsm8k", "Task whose answer check is used (see `backtrack tasks`).")
    file: str = option("", "Input JSONL: rows with `completion` and `answer` (optional `id`).")
    out: str = option("", "Output JSONL: the input rows plus `extracted` and `correct`.")

    def validate(self) -> None:
        if not self.file:
            raise UserError("option '--file' is required")
        if not self.out:
            raise UserError("option '--out' is required")


def score_rows(task, path: Path) -> list[dict]:
    """The scored rows of `path`; a UserError names the first bad row."""
    from backtrack.tasks.jsonl import read_rows

    scored = []
    for where, row in read_rows(path):
        for name in ("completion", "answer"):
            if name not in row or row[name] is None:
                raise UserError(f"{path}: {where}: missing field '{name}'")
        if not isinstance(row["completion"], str):
            raise UserError(f"{path}: {where}: field 'completion' must be a string")
        if isinstance(row["answer"], (dict, list, bool)):
            raise UserError(f"{path}: {where}: field 'answer' must be a string or number")
        try:
            result = task.check(row["completion"], str(row["answer"]))
        except ValueError:
            raise UserError(f"{path}: {where}: cannot read a gold answer from "
                            f"{str(row['answer'])[-60:]!r}") from None
        scored.append({**row, "extracted": result.extracted, "correct": result.correct})
    return scored


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(config: CheckConfig) -> float:
    from backtrack.runinfo import write_run_info
    from backtrack.tasks import get_task

    task = get_task(config.task, config.task_args)
    source, target = Path(config.file), Path(config.out)
    if source.resolve() == target.resolve():
        raise UserError(f"{target}: --out must differ from --file")
    rows = score_rows(task, source)
    if not rows:
        raise UserError(f"{source}: no rows to check")
    accuracy = sum(row["correct"] for row in rows) / len(rows)
    write_jsonl_atomic(target, rows)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        extra = {"rows": len(rows), "accuracy": accuracy, "output": str(target)}
        info = write_run_info(tmp, config, "check", inputs=[source], extra=extra)
        os.replace(info, target.parent / f"{target.name}.run.json")
    print(f"accuracy {accuracy:.4f} ({sum(r['correct'] for r in rows)}/{len(rows)}) -> {target}")
    return accuracy
