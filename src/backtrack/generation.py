"""The generation layer that sample, backtrack, eval (and RL) share.

`GenerationConfig` holds the generation options those stages all take (so they are declared
once), `open_engine` opens the engine they name, and `sample_problems` is the resumable loop:
fixed chunks of problems, one engine call per chunk (grouped by how many samples are missing),
records appended to a store after each chunk, run statistics and a progress bar.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

from backtrack.config import CommonConfig, option
from backtrack.engines import ENGINES, GenerationParams


@dataclass
class GenerationConfig(CommonConfig):
    """Options of every stage that generates with an engine."""

    temperature: float = option(0.8, "Sampling temperature (0 = greedy, needs one sample).")
    top_p: float = option(1.0, "Nucleus sampling threshold.")
    max_new_tokens: int = option(256, "Maximum new tokens per sample.")
    batch_size: int = option(16, "Problems (or traces) per engine call; records are saved "
                             "after each.", hashed=False)
    engine: str = option("hf", "Generation engine.", choices=ENGINES, in_store=False)
    engine_args: dict = option({}, "Engine options, e.g. {batch_size: 64, device: cuda} for hf "
                               "(sequences decoded together), {tensor_parallel_size: 2} for "
                               "vllm, {base_url: http://host:8000/v1, concurrency: 16} for "
                               "openai.", hashed=False)
    progress: bool = option(True, "Show a progress bar.", hashed=False)

    def generation_params(self, n: int) -> GenerationParams:
        return GenerationParams(n=n, temperature=self.temperature, top_p=self.top_p,
                                max_new_tokens=self.max_new_tokens, seed=self.seed)


def open_engine(config: GenerationConfig, model_path: str):
    """The engine named by `config.engine` with `config.engine_args`."""
    from backtrack.engines import make_engine

    return make_engine(config.engine, model_path, **dict(config.engine_args))


@dataclass
class RunStats:
    """What this process generated (resumed records excluded)."""

    samples: int = 0
    correct: int = 0
    new_tokens: int = 0
    engine_seconds: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    engine: dict = dataclasses.field(default_factory=dict)  # `Engine.describe()` of the engine
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
                "overhead_share": round(1 - self.engine_seconds / wall, 4) if wall else 0.0,
                **({"engine": self.engine} if self.engine else {})}


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, mininterval=0.5,
                dynamic_ncols=True)


def timed_generate(engine, prompts: list[str], params: GenerationParams, stats: RunStats):
    if not stats.engine:  # `Engine.describe()`; a protocol's wrapper passes on its engine's
        describe = getattr(engine, "describe", None)
        stats.engine = describe() if describe else {}
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    stats.engine_seconds += time.perf_counter() - start
    return outputs


def sample_record(task, problem, prompt: str, sample_idx: int, completion) -> dict:
    """A checked sample; fields a protocol attached to the completion (`extra`) are kept."""
    check = task.check(completion.text, problem.answer)
    return {"problem_id": problem.id, "sample_idx": sample_idx, "round": 0, "prompt": prompt,
            "completion": completion.text, "extracted": check.extracted,
            "correct": bool(check.correct), "new_tokens": completion.new_tokens,
            "finish_reason": completion.finish_reason, "answer": problem.answer,
            **(completion.extra or {})}


def sample_problems(engine, task, problems: list, prompts: dict[str, str], params, store,
                    k: int, batch_size: int, desc: str = "sample", progress: bool = True,
                    stats: RunStats | None = None, extra_fields: dict | None = None,
                    make_record: Callable = sample_record) -> RunStats:
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
                        record = make_record(task, problem, prompts[problem.id], idx, completion)
                        records.append({**record, **(extra_fields or {})})
            store.append(records)
            stats.samples += len(records)
            stats.correct += sum(r["correct"] for r in records)
            stats.new_tokens += sum(r["new_tokens"] for r in records)
            bar.update(len(records))
            bar.set_postfix(stats.postfix(), refresh=False)
    return stats.stop()
