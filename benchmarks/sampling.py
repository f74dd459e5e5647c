"""Sampling throughput: the batched `hf` engine against a naive loop, and stage overhead.

For each model: new tokens/s of `sample_problems` with the hf engine (sorted, left-padded
batches, one prefill shared by a prompt's k samples), new tokens/s of a naive loop (one
`model.generate` call per sample), their ratio (target >= 5x), the share of the stage's wall
time spent outside engine calls (checking, records, fsync; target <= 5 %), and the engine time
with the prefill shared vs transformers' `num_return_sequences` (which prefills every copy).

    python benchmarks/sampling.py                       # toy model and smollm2-135m
    python benchmarks/sampling.py --models /path/to/model --problems 32 --k 8

`toy` is the model recorded by `backtrack toy-base` in `--output-dir`; when there is none, a
model of the toy architecture with random weights is built (throughput does not depend on the
weights, only on shape and output length).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def toy_model_path(output_dir: str) -> str:
    from backtrack.errors import UserError
    from backtrack.models import resolve_model_path

    try:
        return resolve_model_path("toy", output_dir)
    except UserError:
        return build_random_toy(Path(tempfile.mkdtemp(prefix="bench-toy-")))


def build_random_toy(out_dir: Path) -> str:
    from backtrack.tasks import get_task
    from backtrack.toy_base import save_untrained_model

    return str(save_untrained_model(out_dir, get_task("arith", {}).problems("train", 300)))


def naive_loop(engine, prompts: list[str], k: int, params) -> tuple[int, float]:
    """One `generate` call per sample: the baseline the batched engine must beat."""
    import torch

    tokens, start = 0, time.perf_counter()
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([engine.encode(prompt)], device=engine.device)
        for j in range(k):
            torch.manual_seed(1000 * i + j)
            with torch.inference_mode():
                out = engine.model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=True,
                    temperature=params.temperature, top_p=params.top_p, top_k=0,
                    max_new_tokens=params.max_new_tokens, eos_token_id=engine.eos_ids,
                    pad_token_id=engine.pad_id)
            new = out[0, ids.shape[1]:].tolist()
            end = next((n for n, t in enumerate(new) if t in engine.eos_ids), None)
            tokens += len(new) if end is None else end + 1
    return tokens, time.perf_counter() - start


def bench_model(name: str, args) -> dict:
    from backtrack.chat import render_prompt
    from backtrack.engines import GenerationParams, make_engine
    from backtrack.models import resolve_model_path
    from backtrack.sample import sample_problems
    from backtrack.store import RecordStore
    from backtrack.tasks import get_task

    path = toy_model_path(args.output_dir) if name == "toy" else resolve_model_path(name)
    engine = make_engine("hf", path, batch_size=args.problems * args.k,
                         num_threads=args.threads or None)
    task = get_task(args.task, {})
    problems = task.problems("train", args.problems)
    prompts = {p.id: render_prompt(engine.tokenizer, task.messages(p)) for p in problems}
    params = GenerationParams(n=args.k, temperature=args.temperature, top_p=1.0,
                              max_new_tokens=args.max_new_tokens, seed=0)
    # Warm-up at full batch shape: the first large batch pays for memory allocation.
    engine.generate(list(prompts.values()), GenerationParams(n=args.k, max_new_tokens=16))
    with tempfile.TemporaryDirectory() as tmp:
        store = RecordStore(tmp, {"bench": name})
        stats = sample_problems(engine, task, problems, prompts, params, store, args.k,
                                batch_size=args.problems, progress=False)
        store.close()
    engine.share_prefill = False
    start = time.perf_counter()
    engine.generate(list(prompts.values()), params)
    copied_seconds = time.perf_counter() - start
    engine.share_prefill = True
    naive_prompts = [prompts[p.id] for p in problems[:args.naive_problems]]
    naive_tokens, naive_seconds = naive_loop(engine, naive_prompts, args.k, params)
    batched_rate = stats.new_tokens / stats.wall_seconds
    naive_rate = naive_tokens / naive_seconds
    return {"model": name, "path": path, "samples": stats.samples,
            "new_tokens": stats.new_tokens, "batched_tokens_per_s": round(batched_rate, 1),
            "naive_tokens_per_s": round(naive_rate, 1), "naive_samples": len(naive_prompts) * args.k,
            "speedup": round(batched_rate / naive_rate, 2),
            "stage_wall_s": round(stats.wall_seconds, 2),
            "engine_s": round(stats.engine_seconds, 2),
            "overhead_share": round(1 - stats.engine_seconds / stats.wall_seconds, 4),
            "engine_s_num_return_sequences": round(copied_seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["toy", "smollm2-135m"])
    parser.add_argument("--output-dir", default="runs/default", help="where toy_base/run.json is")
    parser.add_argument("--task", default="arith")
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--naive-problems", type=int, default=1)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch default; 1 is fastest on a busy CPU)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    results = []
    for name in args.models:
        r = bench_model(name, args)
        results.append(r)
        print(f"{r['model']}: batched {r['batched_tokens_per_s']} tok/s ({r['samples']} samples) "
              f"vs naive {r['naive_tokens_per_s']} tok/s ({r['naive_samples']} samples) -> "
              f"{r['speedup']}x; overhead outside the engine {100 * r['overhead_share']:.1f}% "
              f"of {r['stage_wall_s']} s; engine {r['engine_s']} s with shared prefill vs "
              f"{r['engine_s_num_return_sequences']} s with num_return_sequences", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
