"""`backtrack sample`: k think-then-answer samples per problem, each checked (step 1 of the method).

Records go to a resumable store in `<output_dir>/samples/`, one chunk of problems per write, so
a killed run loses at most one chunk. `sample_problems` is reused by the eval stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from backtrack.config import CommonConfig, option
from backtrack.engines import ENGINES, GenerationParams
from backtrack.errors import UserError


@dataclass
class SampleConfig(CommonConfig):
    """Sample k solutions per problem of a split and check each one."""

    split: str = option("train", "Split to sample from.", choices=("train", "test"))
    k: int = option(4, "Samples per problem.")
    limit: int | None = option(None, "Use only the first N problems (all when unset).")
    temperature: float = option(0.8, "Sampling temperature (0 = greedy, needs k = 1).")
    top_p: float = option(1.0, "Nucleus sampling threshold.")
    max_new_tokens: int = option(256, "Maximum new tokens per sample.")
    batch_size: int = option(16, "Problems per engine call; records are saved after each.")
    engine: str = option("hf", "Generation engine.", choices=ENGINES)
    engine_args: dict = option({}, "Engine options, e.g. {batch_size: 64, device: cuda} for hf, "
                               "{tensor_parallel_size: 2} for vllm, {base_url: "
                               "http://host:8000/v1, concurrency: 16} for openai.")
    shard: str = option("0/1", "i/N: this process handles shard i of N of the problems.")
    progress: bool = option(True, "Show a progress bar.")

    def validate(self) -> None:
        from backtrack.store import parse_shard

        parse_shard(self.shard)
        if self.k < 1 or self.batch_size < 1:
            raise UserError("options 'k' and 'batch_size' must be >= 1")
        GenerationParams(n=self.k, temperature=self.temperature, top_p=self.top_p,
                         max_new_tokens=self.max_new_tokens).validate()


@dataclass
class RunStats:
    """What this process generated (resumed records excluded)."""

    samples: int = 0
    correct: int = 0
    new_tokens: int = 0
    engine_seconds: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    ended: float | None = None  # set by `stop()`; until then wall time runs on

    @property
    def wall_seconds(self) -> float:
        return (self.ended or time.perf_counter()) - self.started

    def stop(self) -> RunStats:
        self.ended = time.perf_counter()
        return self

    def postfix(self) -> dict:
        wall = max(self.wall_seconds, 1e-9)
        return {"tok/s": f"{self.new_tokens / wall:.0f}",
                "acc": f"{self.correct / max(self.samples, 1):.3f}"}

    def as_dict(self) -> dict:
        wall = self.wall_seconds
        return {"generated": self.samples, "new_tokens": self.new_tokens,
                "wall_seconds": round(wall, 3), "engine_seconds": round(self.engine_seconds, 3),
                "tokens_per_second": round(self.new_tokens / max(wall, 1e-9), 1),
                "overhead_share": round(1 - self.engine_seconds / wall, 4) if wall else 0.0}


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, mininterval=0.5,
                dynamic_ncols=True)


def timed_generate(engine, prompts: list[str], params: GenerationParams, stats: RunStats):
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    stats.engine_seconds += time.perf_counter() - start
    return outputs


def sample_problems(engine, task, problems: list, prompts: dict[str, str], params, store,
                    k: int, batch_size: int, desc: str = "sample", progress: bool = True,
                    stats: RunStats | None = None, extra_fields: dict | None = None) -> RunStats:
    """Sample the missing `sample_idx < k` of each problem into `store`, one chunk at a time.

    `prompts` maps problem id -> rendered prompt; `extra_fields` are added to every record.
    Chunks are fixed slices of `problems`, so a resumed run regenerates an interrupted chunk
    with the same batch and seed as before.
    """
    stats = stats or RunStats()
    done = store.done_keys()
    missing = {p.id: [i for i in range(k) if (p.id, i, 0) not in done] for p in problems}
    total = sum(len(v) for v in missing.values())
    with progress_bar(total, desc, progress) as bar:
        for start in range(0, len(problems), batch_size):
            chunk = [p for p in problems[start:start + batch_size] if missing[p.id]]
            by_count: dict[int, list] = {}
            for problem in chunk:
                by_count.setdefault(len(missing[problem.id]), []).append(problem)
            records = []
            for n, group in sorted(by_count.items()):
                outputs = timed_generate(engine, [prompts[p.id] for p in group],
                                         dataclasses.replace(params, n=n), stats)
                for problem, completions in zip(group, outputs):
                    for idx, completion in zip(missing[problem.id], completions):
                        records.append({**sample_record(task, problem, prompts[problem.id],
                                                        idx, completion), **(extra_fields or {})})
            store.append(records)
            stats.samples += len(records)
            stats.correct += sum(r["correct"] for r in records)
            stats.new_tokens += sum(r["new_tokens"] for r in records)
            bar.update(len(records))
            bar.set_postfix(stats.postfix(), refresh=False)
    return stats.stop()


def sample_record(task, problem, prompt: str, sample_idx: int, completion) -> dict:
    check = task.check(completion.text, problem.answer)
    return {"problem_id": problem.id, "sample_idx": sample_idx, "round": 0, "prompt": prompt,
            "completion": completion.text, "extracted": check.extracted,
            "correct": bool(check.correct), "new_tokens": completion.new_tokens,
            "finish_reason": completion.finish_reason, "answer": problem.answer}


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


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def open_engine(config, model_path: str):
    """The engine named by `config.engine` with `config.engine_args`."""
    from backtrack.engines import make_engine

    return make_engine(config.engine, model_path, **dict(config.engine_args))


def sample_fingerprint(config: SampleConfig) -> dict:
    """Fields that change what a record holds (not limit, k, batching, engine or shard)."""
    return {"stage": "sample", "model": config.model, "task": config.task,
            "task_args": config.task_args, "split": config.split, "seed": config.seed,
            "temperature": config.temperature, "top_p": config.top_p,
            "max_new_tokens": config.max_new_tokens}


def main(config: SampleConfig) -> dict:
    from backtrack.chat import render_prompt
    from backtrack.models import load_tokenizer, resolve_model_path
    from backtrack.runinfo import write_run_info
    from backtrack.store import RecordStore, select_shard
    from backtrack.tasks import get_task

    out_dir = Path(config.output_dir) / "samples"
    task = get_task(config.task, config.task_args)
    model_path = resolve_model_path(config.model, config.output_dir)
    store = RecordStore(out_dir, sample_fingerprint(config), shard=config.shard)
    write_run_info(out_dir, config, "sample", extra={"model_path": model_path})
    problems = select_shard(task.problems(config.split, config.limit), config.shard)
    tokenizer = load_tokenizer(model_path)
    prompts = {p.id: render_prompt(tokenizer, task.messages(p)) for p in problems}
    params = GenerationParams(n=config.k, temperature=config.temperature, top_p=config.top_p,
                              max_new_tokens=config.max_new_tokens, seed=config.seed)
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
