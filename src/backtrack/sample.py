"""`backtrack sample`: k think-then-answer samples per problem, each checked (step 1 of the method).

Records go to a resumable store in `<output_dir>/samples/`, one chunk of problems per write, so
a killed run loses at most one chunk. The loop itself lives in generation.py (eval shares it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from backtrack.config import option, store_values
from backtrack.errors import UserError
from backtrack.fileio import write_json
from backtrack.generation import GenerationConfig, open_engine, sample_problems
from backtrack.layout import RunLayout


@dataclass
class SampleConfig(GenerationConfig):
    """Sample k solutions per problem of a split and check each one."""

    split: str = option("train", "Split to sample from.", choices=("train", "test"))
    k: int = option(4, "Samples per problem.", in_store=False)
    limit: int | None = option(None, "Use only the first N problems (all when unset).",
                               in_store=False)
    shard: str = option("0/1", "i/N: this process handles shard i of N of the problems.",
                        in_store=False)

    def validate(self) -> None:
        from backtrack.store import parse_shard

        parse_shard(self.shard)
        if self.k < 1 or self.batch_size < 1:
            raise UserError("options 'k' and 'batch_size' must be >= 1")
        self.generation_params(self.k).validate()


def outputs(config: SampleConfig) -> list[Path]:
    return [RunLayout.of(config).samples]


def summarize_samples(records: list[dict]) -> dict:
    """Problems, samples, accuracy and truncation over every record of the store."""
    problems = {r["problem_id"] for r in records}
    solved = {r["problem_id"] for r in records if r["correct"]}
    n = len(records)
    return {"problems": len(problems), "samples": n,
            "correct": sum(r["correct"] for r in records),
            "accuracy": round(sum(r["correct"] for r in records) / n, 4) if n else 0.0,
            "problems_solved": len(solved),
            "truncated": sum(r["finish_reason"] == "length" for r in records),
            "mean_new_tokens": round(sum(r["new_tokens"] for r in records) / n, 1) if n else 0.0}


def sample_fingerprint(config: SampleConfig) -> dict:
    """What shapes a record (a store written with another is refused)."""
    return {"stage": "sample", **store_values(config)}


def main(config: SampleConfig) -> dict:
    from backtrack.chat import render_prompt
    from backtrack.models import load_tokenizer, resolve_model_path
    from backtrack.runinfo import write_run_info
    from backtrack.store import RecordStore, select_shard
    from backtrack.tasks import get_task

    out_dir = RunLayout.of(config).samples
    task = get_task(config.task, config.task_args)
    model_path = resolve_model_path(config.model, config.output_dir)
    store = RecordStore(out_dir, sample_fingerprint(config), shard=config.shard)
    write_run_info(out_dir, config, "sample", extra={"model_path": model_path})
    problems = select_shard(task.problems(config.split, config.limit), config.shard)
    tokenizer = load_tokenizer(model_path)
    prompts = {p.id: render_prompt(tokenizer, task.messages(p)) for p in problems}
    params = config.generation_params(config.k)
    engine = open_engine(config, model_path)
    try:
        stats = sample_problems(engine, task, problems, prompts, params, store, config.k,
                                config.batch_size, progress=config.progress)
    finally:
        engine.close()
        store.close()
    summary = {**summarize_samples(store.records()), "this_run": stats.as_dict()}
    write_json(out_dir / "summary.json", summary)
    print(f"sample: {summary['problems']} problems, {summary['samples']} samples, "
          f"accuracy {summary['accuracy']:.3f}, {summary['truncated']} truncated; "
          f"{stats.new_tokens / max(stats.wall_seconds, 1e-9):.0f} new tokens/s -> {out_dir}")
    return summary
