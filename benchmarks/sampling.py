"""Sampling throughput: the batched `hf` engine against a naive loop, and stage overhead.

For each model: new tokens/s of `sample_problems` with the hf engine (sorted, left-padded
batches, one prefill shared by a prompt's k samples), new tokens/s of a naive loop (one
`model.generate` call per sample), their ratio (target >= 5x), the share of the stage's wall
time spent outside engine calls (checking, records, fsync; target <= 5 %), and the engine time
with the prefill shared vs transformers' `num_return_sequences` (which prefills every copy).

Then, for each `--lever-models` model at the toy recipe's decode shape (32 problems x k = 4 =
batch 128, max_new_tokens 160), its compute bound and the share of it each engine option
reaches, all in this one run: the bound is this machine's fp32 matmul FLOP/s on the model's
own decode shapes ([batch x in] x [in x out] for every linear, lm_head included; best of
repeated timings) divided by 2 x matmul parameters FLOPs per new token. Each lever's
new tokens/s is the median of `--repeats` calls interleaved with the other levers', by wall
time and by CPU time of this process (steadier when other jobs share the cores); `occupancy`
is the share of decoded rows x steps that were new tokens (rows that finished early still
step until their batch's longest row ends). The bound is also timed briefly after each round
of calls (best of 20 ms per linear): a lever's `share_of_round_bound` is the median over
rounds of its call's rate over that round's bound, steady where the machine's speed drifts
between phases (a shared CPU's did by up to 20 % within minutes), which the one bound, a best
of the whole run against medians of calls, is not. Target: the toy recipe's engine
(`RECIPE_LEVER`) at >= 30 % of the bound at batch 128 (a last line says whether it is met).

With `--continuations`, budget forcing's n = 1 continuations of 32 x 16 samples are timed with
and without the `group_prefixes` engine option (greedy: are the completions identical?).

    python benchmarks/sampling.py                       # toy model and smollm2-135m
    python benchmarks/sampling.py --models /path/to/model --problems 32 --k 8
    python benchmarks/sampling.py --models toy --lever-models /path/to/toy --levers all
    python benchmarks/sampling.py --models --lever-models --continuations toy

`toy` is the model recorded by `backtrack toy-base` in `--output-dir`; when there is none, a
model of the toy architecture with random weights is built (throughput does not depend on the
weights, only on shape and output length).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

# name: hf engine options (compile pays its compile in an untimed first call, reported apart)
LEVERS = {
    "baseline": {},
    "dynamic": {"cache": "dynamic"},
    "eager": {"attn_implementation": "eager"},
    "attend_filled": {"attend_filled": True},
    "eager+attend_filled": {"attn_implementation": "eager", "attend_filled": True},
    "attend_filled+compile": {"attend_filled": True, "compile": True},
    "compact": {"cache": "dynamic", "decode": "compact"},
    "compact+eager": {"cache": "dynamic", "decode": "compact", "attn_implementation": "eager"},
    "compact+shared_prefix": {"cache": "dynamic", "decode": "compact", "shared_prefix": True},
    "compact+shared_prefix+compile": {"cache": "dynamic", "decode": "compact",
                                      "shared_prefix": True, "compile": True},
    # the toy recipe's engine: the decode attention in C++ (`engines/cpu_attention`; built in
    # the untimed first call when not cached)
    "compact+shared_prefix+cpu_kernel": {"cache": "dynamic", "decode": "compact",
                                         "shared_prefix": True, "cpu_kernel": True},
    # ... with the decode's keys and values held as float16 (half the memory the kernel
    # reads; rounded keys and values, so it reports how many sequences are the same)
    "compact+shared_prefix+cpu_kernel+float16_kv": {"cache": "dynamic", "decode": "compact",
                                                    "shared_prefix": True, "cpu_kernel": True,
                                                    "kv_cache_dtype": "float16"},
    # bf16 weights (fast where the CPU has bf16 instructions, e.g. AVX512_BF16); its share is
    # also given of its own bound, at the bf16 matmul rate (`share_of_own_bound`)
    "compact+shared_prefix+bf16": {"cache": "dynamic", "decode": "compact",
                                   "shared_prefix": True, "dtype": "bfloat16"},
    # The default as it was (`former_decode`), newest first; the C++ attention is always
    # today's (the kernel before its dim-major keys, 2026-12-07, is not kept). The recipe's
    # engine drawing torch.multinomial's tokens (`hf_decode.multinomial_one_cpu`, the CPU draw
    # before `inverse_cdf_draw`, 2026-12-07; other tokens, the same distribution)
    "float16_kv+multinomial": {"cache": "dynamic", "decode": "compact", "shared_prefix": True,
                               "cpu_kernel": True, "kv_cache_dtype": "float16"},
    # ... in float32 (its keys and values as the model computes them), as of bd5bf7f
    # (2026-12-07) but for the kernel: decoder layers called whole (before
    # `hf_step.plain_decoder_layers` and its C++ rotary) and each row's last prompt token run
    # by a decode step (before `hf.PREFILL_GIVES_FIRST_TOKEN`; the same tokens up to float
    # order)
    "cpu_kernel_as_of_bd5bf7f": {"cache": "dynamic", "decode": "compact",
                                 "shared_prefix": True, "cpu_kernel": True},
    # ... and without the C++ attention; each prompt prefilled whole (as
    # before `hf_prefill.common_start`, 2026-12-07; another float summation order, so other
    # tokens; the levers below give its tokens)
    "shared_prefix_whole_prompts": {"cache": "dynamic", "decode": "compact",
                                    "shared_prefix": True},
    # ... and each row's own cache sized for the whole generation, the rows always grouped by
    # scatter and gather (as before `hf_decode.CACHE_SLACK` and `SharedPrefix.full`,
    # 2026-12-07; the same tokens as the lever above)
    "shared_prefix_loose_cache": {"cache": "dynamic", "decode": "compact", "shared_prefix": True},
    # ... and the prompts prefilled in one batch, padded to the longest (as before
    # `hf_prefill.prefill_in_chunks`, 2026-12-03)
    "shared_prefix_one_prefill": {"cache": "dynamic", "decode": "compact", "shared_prefix": True},
    # ... and torch.multinomial, the model's full forward per step, fresh cache memory per
    # call (as before 2026-12-03)
    "shared_prefix_before": {"cache": "dynamic", "decode": "compact", "shared_prefix": True},
}
# The toy recipe's engine, and the share of its compute bound the toy world targets at batch 128
RECIPE_LEVER, TARGET_SHARE = "compact+shared_prefix+cpu_kernel+float16_kv", 0.30
FORMER = {"float16_kv+multinomial", "cpu_kernel_as_of_bd5bf7f", "shared_prefix_whole_prompts",
          "shared_prefix_loose_cache", "shared_prefix_one_prefill", "shared_prefix_before"}
DEFAULT_LEVERS = [name for name in LEVERS if "compile" not in name]


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


def decode_matmul(model, rows: int, seconds: float = 0.3) -> dict:
    """fp32 FLOP/s of the model's linears (lm_head included) at [rows x in] x [in x out]: the
    sum of their FLOPs over the sum of each one's best time, and 2 x their parameters."""
    import torch
    import torch.nn.functional as F

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    flops = best_seconds = 0.0
    with torch.inference_mode():
        for layer in linears:
            x = torch.randn(rows, layer.in_features, dtype=layer.weight.dtype)
            F.linear(x, layer.weight, layer.bias)
            best, deadline = float("inf"), time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                F.linear(x, layer.weight, layer.bias)
                best = min(best, time.perf_counter() - start)
            flops += 2 * rows * layer.in_features * layer.out_features
            best_seconds += best
    matmul_params = sum(m.in_features * m.out_features for m in linears)
    return {"decode_matmul_flops_per_s": flops / best_seconds, "matmul_params": matmul_params,
            "flops_per_new_token": 2 * matmul_params}


# The compact decode as it was (FORMER), newest first; each former lever undoes its own change
# and every newer one (the tokens of `shared_prefix_whole_prompts` and older differ from the
# default's in float summation order only; among themselves they are the same)
FORMER_ORDER = ["float16_kv+multinomial", "cpu_kernel_as_of_bd5bf7f",
                "shared_prefix_whole_prompts", "shared_prefix_loose_cache",
                "shared_prefix_one_prefill", "shared_prefix_before"]


def _undo(former: str, engine) -> dict:
    """(module, attribute) -> the value it had before `former`'s change."""
    from backtrack.engines import hf, hf_decode, hf_prefill, hf_prefix, hf_step

    index_rows = hf_prefix.SharedPrefix._index_rows

    def never_full(prefix):
        index_rows(prefix)
        prefix.full = False

    return {
        # 2026-12-07: one uniform per row (`hf_decode.inverse_cdf_draw`)
        "float16_kv+multinomial": {(hf_decode, "CPU_DRAW"): hf_decode.multinomial_one_cpu},
        # 2026-12-07: decoder layers' arithmetic in the step (`hf_step.plain_decoder_layers`),
        # the first token drawn from the prefill's logits (`hf.PREFILL_GIVES_FIRST_TOKEN`)
        "cpu_kernel_as_of_bd5bf7f": {(hf_step, "plain_decoder_layers"): lambda layers: False,
                                     (hf, "PREFILL_GIVES_FIRST_TOKEN"): False},
        # 2026-12-07: prompts' common start prefilled once (`hf_prefill.common_start`)
        "shared_prefix_whole_prompts": {(hf_prefill, "MIN_COMMON_START"): 1 << 30},
        # 2026-12-07: own cache kept near tight (`CACHE_SLACK`), rows grouped by reshape
        "shared_prefix_loose_cache": {(hf_decode, "CACHE_SLACK"): None,
                                      (hf_prefix.SharedPrefix, "_index_rows"): never_full},
        # 2026-12-03: prompts prefilled in chunks (`hf_prefill.prefill_in_chunks`)
        "shared_prefix_one_prefill": {(hf_prefill, "PREFILL_ROWS"): 1 << 30},
        # 2026-12-03: CPU sampler, the lean step, kept cache memory
        "shared_prefix_before": {
            (hf_step, "shared_prefix_step"): lambda model: None,
            (hf_decode, "CPU_DRAW"): lambda probs, generator: probs.multinomial(
                1, generator=generator).squeeze(1),
            (engine.buffers, "keep"): False},
    }[former]


@contextmanager
def former_decode(engine, former: str | None):
    """The compact decode as it was before `former`'s change and every newer one (FORMER)."""
    if former not in FORMER:
        yield
        return
    changes: dict = {}
    for older in FORMER_ORDER[:FORMER_ORDER.index(former) + 1]:
        changes.update(_undo(older, engine))
    saved = {key: getattr(*key) for key in changes}
    for (owner, name), value in changes.items():
        setattr(owner, name, value)
    if not engine.buffers.keep:
        engine.buffers.clear()
    try:
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


def timed_generate(engine, prompts: list[str], params, former: str | None = None) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    with former_decode(engine, former):
        rows = engine.generate(prompts, params)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = [c.new_tokens for row in rows for c in row]
    return {"tokens": sum(tokens), "wall": wall, "cpu": cpu,
            "ids": [c.token_ids for row in rows for c in row],
            "occupancy": sum(tokens) / (len(tokens) * max(tokens))}


def bench_levers(name: str, args) -> dict:
    """Compute bound at the decode shape and each lever's share of it, levers interleaved."""
    import statistics

    import torch

    from backtrack.chat import render_prompt
    from backtrack.engines import GenerationParams, make_engine
    from backtrack.models import resolve_model_path
    from backtrack.tasks import get_task

    path = toy_model_path(args.output_dir) if name == "toy" else resolve_model_path(name)
    rows = args.lever_problems * args.k
    base = make_engine("hf", path, batch_size=rows, num_threads=args.threads or None)
    bound = decode_matmul(base.model, rows)
    bound["bound_tokens_per_s"] = bound["decode_matmul_flops_per_s"] / bound["flops_per_new_token"]
    task = get_task(args.task, {})
    prompts = [render_prompt(base.tokenizer, task.messages(p))
               for p in task.problems("train", args.lever_problems)]
    params = GenerationParams(n=args.k, temperature=args.temperature, top_p=1.0,
                              max_new_tokens=args.lever_max_new_tokens, seed=0)
    engines, first_call_s, runs, first_ids, own_bounds = {}, {}, {}, {}, {}
    for lever in args.levers:
        options = LEVERS[lever]
        shared = {} if "dtype" in options else {"model": base.model, "tokenizer": base.tokenizer}
        engines[lever] = make_engine("hf", path, batch_size=rows, **shared, **options)
        if "dtype" in options:  # its own weights: its own bound too
            own = decode_matmul(engines[lever].model, rows)
            own_bounds[lever] = own["decode_matmul_flops_per_s"] / own["flops_per_new_token"]
        first = timed_generate(engines[lever], prompts, params, lever)
        first_call_s[lever], first_ids[lever] = first["wall"], first["ids"]
    round_bounds = []
    for _ in range(args.repeats):
        for lever in args.levers:
            runs.setdefault(lever, []).append(timed_generate(engines[lever], prompts, params,
                                                             lever))
        rate = decode_matmul(base.model, rows, seconds=0.02)["decode_matmul_flops_per_s"]
        round_bounds.append(rate / bound["flops_per_new_token"])
    bound["round_bound_tokens_per_s"] = statistics.median(round_bounds)
    levers = {}
    for lever, timed in runs.items():
        wall_rate = statistics.median(r["tokens"] / r["wall"] for r in timed)
        cpu_rate = statistics.median(r["tokens"] / r["cpu"] for r in timed)
        levers[lever] = {
            "tokens_per_s": round(wall_rate, 1), "tokens_per_cpu_s": round(cpu_rate, 1),
            "share_of_bound": round(wall_rate / bound["bound_tokens_per_s"], 4),
            "share_of_bound_cpu": round(cpu_rate / bound["bound_tokens_per_s"], 4),
            "share_of_round_bound": round(statistics.median(
                r["tokens"] / r["wall"] / b for r, b in zip(timed, round_bounds)), 4),
            "occupancy": round(statistics.median(r["occupancy"] for r in timed), 3),
            "first_call_s": round(first_call_s[lever], 1)}
        if lever in own_bounds:
            levers[lever]["own_bound_tokens_per_s"] = round(own_bounds[lever], 1)
            levers[lever]["share_of_own_bound"] = round(wall_rate / own_bounds[lever], 4)
    for lever in levers.values():
        baseline = levers.get("baseline", lever)
        lever["vs_baseline"] = round(lever["tokens_per_s"] / baseline["tokens_per_s"], 2)
        lever["vs_baseline_cpu"] = round(lever["tokens_per_cpu_s"] / baseline["tokens_per_cpu_s"], 2)
    newest_former = "shared_prefix_whole_prompts"  # the tokens of every older former lever
    # float16 keys and values against float32's; multinomial's draws against the inverse
    # CDF's (other tokens); bd5bf7f's step against today's (both draw multinomial's; the
    # float16 keys and values change tokens too)
    same_as = {"compact+shared_prefix+cpu_kernel+float16_kv": "compact+shared_prefix+cpu_kernel",
               "float16_kv+multinomial": "compact+shared_prefix+cpu_kernel+float16_kv",
               "cpu_kernel_as_of_bd5bf7f": "float16_kv+multinomial"}
    for other in FORMER | {"compact+shared_prefix+compile", *same_as}:
        reference = same_as.get(other, newest_former if other in FORMER
                                and newest_former in first_ids else "compact+shared_prefix")
        if other != reference and {other, reference} <= set(first_ids):
            pairs = list(zip(first_ids[other], first_ids[reference]))
            levers[other]["same_tokens"] = first_ids[other] == first_ids[reference]
            levers[other]["same_sequences"] = sum(a == b for a, b in pairs)
            levers[other]["same_tokens_as"] = reference
    return {"model": name, "path": path, "batch": rows, "threads": torch.get_num_threads(),
            "max_new_tokens": args.lever_max_new_tokens, "repeats": args.repeats,
            **{k: round(v, 1) for k, v in bound.items()}, "levers": levers}


def bench_continuations(name: str, args) -> dict:
    """`group_prefixes` on budget forcing's continuations: `--lever-problems` prompts x 16
    samples, each cut at its `</think>` + the phrase, continued with n = 1 by the plain engine
    and by the grouping one (the toy recipe's eval engine) in turn; greedy, their tokens are
    compared, sampled, their rates."""
    import statistics

    from backtrack.chat import render_prompt
    from backtrack.engines import GenerationParams, make_engine
    from backtrack.formats import PHRASE_PRESETS, THINK_CLOSE
    from backtrack.models import resolve_model_path
    from backtrack.tasks import get_task

    path = toy_model_path(args.output_dir) if name == "toy" else resolve_model_path(name)
    options = {"batch_size": 512, "cache": "dynamic", "decode": "compact", "shared_prefix": True}
    plain = make_engine("hf", path, num_threads=args.threads or None, **options)
    grouped = make_engine("hf", path, model=plain.model, tokenizer=plain.tokenizer,
                          group_prefixes=True, **options)
    task = get_task(args.task, {})
    prompts = [render_prompt(plain.tokenizer, task.messages(p))
               for p in task.problems("train", args.lever_problems)]
    first = plain.generate(prompts, GenerationParams(n=16, temperature=args.temperature,
                                                     max_new_tokens=args.lever_max_new_tokens))
    phrase = " " + PHRASE_PRESETS["mild"]
    continued = [prompts[i] + c.text[:c.text.find(THINK_CLOSE)] + phrase
                 for i, row in enumerate(first) for c in row if THINK_CLOSE in c.text]
    result = {"model": name, "continuations": len(continued)}
    for label, temperature in (("greedy", 0.0), ("sampled", args.temperature)):
        params = GenerationParams(n=1, temperature=temperature,
                                  max_new_tokens=args.lever_max_new_tokens, seed=1)
        runs = {"plain": [], "grouped": []}
        for _ in range(args.repeats):
            for engine, key in ((plain, "plain"), (grouped, "grouped")):
                runs[key].append(timed_generate(engine, continued, params))
        plain_s, grouped_s = (statistics.median(r["wall"] for r in runs[k]) for k in runs)
        result[label] = {"plain_s": round(plain_s, 2), "grouped_s": round(grouped_s, 2),
                         "speedup": round(plain_s / grouped_s, 2),
                         "tokens": [runs[k][0]["tokens"] for k in runs],
                         "same_completions": sum(a == b for a, b in zip(
                             runs["plain"][0]["ids"], runs["grouped"][0]["ids"]))}
    return result


def print_levers(r: dict) -> None:
    print(f"{r['model']} at batch {r['batch']} ({r['threads']} thread(s), max_new_tokens "
          f"{r['max_new_tokens']}): decode-shape matmul {r['decode_matmul_flops_per_s'] / 1e9:.1f} "
          f"GFLOP/s / {r['flops_per_new_token'] / 1e6:.2f} MFLOP per new token (2 x "
          f"{r['matmul_params']:,.0f} matmul params) -> compute bound "
          f"{r['bound_tokens_per_s']:,.0f} new tokens/s (timed between the rounds of calls: "
          f"median {r['round_bound_tokens_per_s']:,.0f})", flush=True)
    for lever, x in r["levers"].items():
        print(f"  {lever:<32} {x['tokens_per_s']:>8,.0f} tok/s = {100 * x['share_of_bound']:5.1f}% "
              f"of bound ({x['vs_baseline']:.2f}x baseline); {x['tokens_per_cpu_s']:>8,.0f} "
              f"tok/CPU-s = {100 * x['share_of_bound_cpu']:5.1f}% ({x['vs_baseline_cpu']:.2f}x); "
              f"{100 * x['share_of_round_bound']:.1f}% of its rounds' bounds; "
              f"occupancy {x['occupancy']:.2f}; first call {x['first_call_s']} s"
              + (f"; same tokens as {x['same_tokens_as']}: {x['same_tokens']} "
                 f"({x['same_sequences']} sequences the same)" if "same_tokens" in x else "")
              + (f"; {100 * x['share_of_own_bound']:.1f}% of its own bound "
                 f"({x['own_bound_tokens_per_s']:,.0f} tok/s)" if "share_of_own_bound" in x
                 else ""),
              flush=True)
    recipe = r["levers"].get(RECIPE_LEVER)
    if recipe:
        met = "met" if recipe["share_of_bound"] >= TARGET_SHARE else "not met"
        print(f"  target: the recipe's engine at {100 * TARGET_SHARE:.0f} % of the bound: "
              f"{100 * recipe['share_of_bound']:.1f} % ({100 * recipe['share_of_round_bound']:.1f}"
              f" % of its rounds' bounds): {met}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["toy", "smollm2-135m"])
    parser.add_argument("--output-dir", default="runs/default", help="where toy_base/run.json is")
    parser.add_argument("--task", default="arith")
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--naive-problems", type=int, default=1)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch default; 1 is fastest on a busy CPU)")
    parser.add_argument("--lever-models", nargs="*", default=["toy"],
                        help="models whose compute bound and levers are measured (none: skip)")
    parser.add_argument("--levers", nargs="+", default=DEFAULT_LEVERS,
                        help=f"from {', '.join(LEVERS)}, or 'all' (compile takes minutes)")
    parser.add_argument("--lever-problems", type=int, default=32)
    parser.add_argument("--lever-max-new-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--continuations", nargs="*", default=[],
                        help="models whose budget-forcing continuations are timed with and "
                             "without group_prefixes (e.g. toy)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    args.levers = list(LEVERS) if args.levers == ["all"] else args.levers
    unknown = sorted(set(args.levers) - set(LEVERS))
    if unknown:
        parser.error(f"unknown lever(s) {unknown}; known: {', '.join(LEVERS)}")
    results = []
    for name in args.models:
        r = bench_model(name, args)
        results.append(r)
        print(f"{r['model']}: batched {r['batched_tokens_per_s']} tok/s ({r['samples']} samples) "
              f"vs naive {r['naive_tokens_per_s']} tok/s ({r['naive_samples']} samples) -> "
              f"{r['speedup']}x; overhead outside the engine {100 * r['overhead_share']:.1f}% "
              f"of {r['stage_wall_s']} s; engine {r['engine_s']} s with shared prefill vs "
              f"{r['engine_s_num_return_sequences']} s with num_return_sequences", flush=True)
    for name in args.lever_models:
        r = bench_levers(name, args)
        results.append(r)
        print_levers(r)
    for name in args.continuations:
        r = bench_continuations(name, args)
        results.append(r)
        print(f"{r['model']}: {r['continuations']} budget-forcing continuations (n = 1), plain "
              f"engine vs group_prefixes:", flush=True)
        for label in ("greedy", "sampled"):
            x = r[label]
            print(f"  {label:<8} {x['plain_s']:.2f} s vs {x['grouped_s']:.2f} s -> "
                  f"{x['speedup']:.2f}x; new tokens {x['tokens'][0]:,} vs {x['tokens'][1]:,}; "
                  f"identical completions {x['same_completions']} of {r['continuations']}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
