"""Toy-base training speed against this machine's matmul speed, and what each speed lever gives.

Prints, from one run: the achieved training FLOP/s of `backtrack toy-base` (the real default
config and code path: corpus, tokenizer, HF Trainer; timed over steps `--warmup`..`--steps`),
this machine's fp32 matmul FLOP/s on large matrices (2048^3) and on the model's own shapes, and
the ratios. Model FLOPs per token follow PaLM's count: 6 x matmul parameters (lm_head included)
+ 12 x layers x hidden x context (attention scores and values), on real tokens only; "computed"
FLOPs count what the kernels do, padding included and a shared prefix once per micro-batch
(`shared_prefix`; so "model" FLOP/s, the transcripts' FLOPs, can exceed "computed" ones).
With `--levers`, each lever runs in its own process, one at a time, and is compared with the
baseline by tokens/s (real tokens per second) and by tokens per CPU-second of the process
(steadier when other jobs share the cores). Each process also times the 2048^3 product just
before and after its training ("% own large": the share of their mean), as a shared
machine's speed drifts between minutes (the parent's 2048^3 figure ranged 152-202 GFLOP/s
in one evening). Target: the default config (`micro4`) at 50 % of the 2048^3 rate (a last
line says whether it is met, by the parent's figure as before).

    python benchmarks/toy_base.py                      # baseline and matmul figures
    python benchmarks/toy_base.py --levers all         # every lever, 40 steps each
    python benchmarks/toy_base.py --levers pack256,compile --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]



def padded(**overrides) -> dict:
    """ToyBaseConfig overrides for the toy base as it was before micro-batches: one padded
    batch per step, each row running its whole transcript (no shared prefix)."""
    return {"micro_batches": 1, "shared_prefix": False, **overrides}


# name: (ToyBaseConfig overrides, TrainingArguments overrides)
LEVERS = {
    # One padded batch per step: the toy base before micro-batches (CORPUS_VERSION 3).
    "baseline": (padded(), {}),
    "pack256": (padded(pack_length=256), {}),
    "pack384": (padded(pack_length=384), {}),
    "batch32": (padded(batch_size=32), {}),
    "batch128": (padded(batch_size=128), {}),
    "compile": (padded(torch_compile=True), {}),
    "pack256+compile": (padded(pack_length=256, torch_compile=True), {}),
    "batch128+compile": (padded(batch_size=128, torch_compile=True), {}),
    # Batches of transcripts of similar length (transformers' LengthGroupedSampler): no
    # padding without packing's longer attention rows. Faster per token, but the tiny model
    # learns far worse from length-sorted batches (docs/SPEED.md), so it is not the default.
    "group": (padded(length_grouped=True), {}),
    "group+compile": (padded(length_grouped=True, torch_compile=True), {}),
    # Each random batch split into micro-batches of similar length (transformers'
    # batch_rebalance sampler + gradient accumulation): the same transcripts and loss per step.
    # micro4 is the default since CORPUS_VERSION 4 (with shared_prefix since 5).
    "micro2": ({"micro_batches": 2}, {}),
    "micro4": ({}, {}),
    # micro4 with every row running the shared system prefix itself (the default until
    # CORPUS_VERSION 5 ran each micro-batch's shared prefix once).
    "noshare": ({"shared_prefix": False}, {}),
    "micro8": ({"micro_batches": 8}, {}),
    "micro4+compile": ({"micro_batches": 4, "torch_compile": True}, {}),
    "adamw_loop": (padded(optimizer="adamw"), {"optim": "adamw_torch"}),  # AdamW: fused by default
    "threads1": (padded(threads=1), {}),
    "bf16": (padded(), {"bf16": True}),
    # bf16 autocast with the default micro-batches: fast only where the CPU has bf16
    # instructions (AVX512_BF16, AMX); elsewhere torch emulates it.
    "micro4+bf16": ({}, {"bf16": True}),
    # The default since CORPUS_VERSION 6 is Muon at lr 6e-3 (toy_base.optimizer); AdamW at its
    # lr 3e-3 was the default before, and Muon at AdamW's lr. A step costs the same with each:
    # what Muon buys is fewer of them (toy_base_learning.py compares held-out loss).
    "adamw": ({"optimizer": "adamw", "lr": 3e-3}, {}),
    "muon_lr3e-3": ({"lr": 3e-3}, {}),
    # Muon orthogonalising in torch's bfloat16 or in float32 (`toy_base.newton_schulz`; the
    # default, auto, takes bfloat16 only where the CPU multiplies it natively: on an AVX2 CPU
    # bf16 products run in ATen's scalar loop, docs/SPEED.md)
    "muon_ns_bfloat16": ({"newton_schulz": "bfloat16"}, {}),
    "muon_ns_float32": ({"newton_schulz": "float32"}, {}),
}


# The toy base's default config (ToyBaseConfig's defaults), and the share of the 2048^3 fp32
# matmul rate its training targets
DEFAULT_LEVER, TARGET_SHARE = "micro4", 0.50


def flops_per_token(model_config, context: int) -> float:
    """Training FLOPs for one token with `context` tokens of attention (PaLM's formula)."""
    d, layers = model_config.hidden_size, model_config.num_hidden_layers
    kv = model_config.num_key_value_heads * (d // model_config.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * model_config.intermediate_size
    matmul_params = layers * per_layer + d * model_config.vocab_size
    return 6 * matmul_params + 12 * layers * d * context


class CountingCollator:
    """Wraps the trainer's collator; records real and computed tokens and FLOPs per batch."""

    def __init__(self, collator, model_config, shared_prefix: bool = False):
        self.collator, self.model_config, self.batches = collator, model_config, []
        self.shared_prefix = shared_prefix

    def __call__(self, features):
        from backtrack.shared_prefix_training import shared_prefix_length

        batch = self.collator(features)
        rows, width = batch["input_ids"].shape
        lengths = [len(f["input_ids"]) for f in features]
        cut = (shared_prefix_length(batch["input_ids"], batch["attention_mask"], batch["labels"])
               if self.shared_prefix and "attention_mask" in batch else 0)
        computed = rows * width - (rows - 1) * cut  # a shared prefix runs once per batch
        self.batches.append({
            "real_tokens": sum(lengths), "computed_tokens": computed,
            "model_flops": sum(n * flops_per_token(self.model_config, n) for n in lengths),
            "computed_flops": computed * flops_per_token(self.model_config, width)})
        return batch


def step_timer(warmup: int, steps: int):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Times steps warmup+1..steps (end to end: batch, forward, backward, optimizer)."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.start, self.cpu = time.perf_counter(), time.process_time()
            if state.global_step == steps:
                self.seconds = time.perf_counter() - self.start
                self.cpu_seconds = time.process_time() - self.cpu
                control.should_training_stop = True

    return StepTimer()


def measure_training(lever: str, steps: int, warmup: int, threads: int) -> dict:
    """Train the default toy base for `steps` steps with one lever set; time the later ones."""
    from backtrack.tasks import get_task
    from backtrack.toy_base import (ToyBaseConfig, build_corpus, build_model, make_trainer,
                                    train_tokenizer)

    overrides, training_args = LEVERS[lever]
    config = ToyBaseConfig(**{"save_minutes": 0.0, "eval_problems": 0,
                              **({"threads": threads} if threads else {}), **overrides})
    task = get_task(config.task, config.task_args)
    corpus = build_corpus(task, config, config.corpus_size or config.steps * config.batch_size)
    tokenizer = train_tokenizer(task, corpus, config.vocab_size)
    model = build_model(tokenizer, config)
    with tempfile.TemporaryDirectory() as work:
        trainer = make_trainer(model, tokenizer, corpus, config, Path(work), **training_args)
        counter = CountingCollator(trainer.data_collator, model.config, config.shared_prefix)
        trainer.data_collator = counter
        timer = step_timer(warmup, steps)
        trainer.add_callback(timer)
        # the large-matmul rate just before and after the timed steps, in this process at its
        # threads: the same phase of a shared machine as the training (the parent's figure may
        # come from a faster or slower minute)
        around = [matmul_flops(2048, 2048, 2048, seconds=1.5)]
        trainer.train()
        around.append(matmul_flops(2048, 2048, 2048, seconds=1.5))
    per_step = config.micro_batches  # the collator sees each micro-batch
    timed = counter.batches[warmup * per_step:steps * per_step]
    total = {k: sum(b[k] for b in timed) for k in timed[0]}
    import torch
    return {"lever": lever, "threads": torch.get_num_threads(), "seconds": timer.seconds,
            "cpu_seconds": timer.cpu_seconds, **total,
            "tokens_per_s": total["real_tokens"] / timer.seconds,
            "model_flops_per_s": total["model_flops"] / timer.seconds,
            "computed_flops_per_s": total["computed_flops"] / timer.seconds,
            "mean_real_length": total["real_tokens"] / ((steps - warmup) * config.batch_size),
            "parameters": sum(p.numel() for p in model.parameters()),
            "large_flops_per_s_around": sum(around) / len(around)}


def matmul_flops(m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """fp32 FLOP/s of an (m x k) @ (k x n) product: the best of repeated timings."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def measure_matmul(rows: int, threads: int) -> dict:
    """Large-matrix FLOP/s, and FLOP/s over one training step's matmul shapes of the default
    model (forward, input gradient, weight gradient; FLOP-weighted) with `rows` tokens."""
    import torch

    from backtrack.toy_base import ToyBaseConfig

    config = ToyBaseConfig()
    torch.set_num_threads(threads or config.threads or max(1, min(os.cpu_count() or 1, 8)))
    d, inner, vocab = config.hidden, config.intermediate, config.vocab_size
    layer = [(d, d)] * 4 + [(d, inner)] * 2 + [(inner, d)]
    shapes = layer * config.layers + [(d, vocab)]
    flops = seconds = 0.0
    for k, n in set(shapes):
        count = shapes.count((k, n))
        for m, kk, nn in ((rows, k, n), (rows, n, k), (k, rows, n)):  # fwd, grad in, grad w
            work = 2 * m * kk * nn * count
            flops += work
            seconds += work / matmul_flops(m, kk, nn, seconds=0.5)
    return {"large_flops_per_s": matmul_flops(2048, 2048, 2048, seconds=3.0),
            "model_shapes_flops_per_s": flops / seconds, "rows": rows,
            "threads": torch.get_num_threads()}


def child(args) -> dict:
    if args.child == "matmul":
        return measure_matmul(args.rows, args.threads)
    return measure_training(args.child, args.steps, args.warmup, args.threads)


def run_child(what: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--rows", str(args.rows), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    from backtrack.runinfo import cpu_model

    return cpu_model()


def print_report(matmul: dict, results: list[dict]) -> None:
    g = 1e9
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"fp32 matmul, {matmul['threads']} threads: 2048^3 {matmul['large_flops_per_s'] / g:.1f}"
          f" GFLOP/s; model shapes ({matmul['rows']} rows) "
          f"{matmul['model_shapes_flops_per_s'] / g:.1f} GFLOP/s")
    base = results[0]
    print(f"{'lever':<16} {'tok/s':>7} {'x base':>7} {'x base cpu':>10} {'model GF/s':>10} "
          f"{'% large':>7} {'% shapes':>8} {'% own large':>11} {'computed GF/s':>13} "
          f"{'real/computed tok':>17}")
    per_cpu = base["real_tokens"] / base["cpu_seconds"]
    for r in results:
        model = r["model_flops_per_s"]
        print(f"{r['lever']:<16} {r['tokens_per_s']:>7.0f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:>7.2f} "
              f"{r['real_tokens'] / r['cpu_seconds'] / per_cpu:>10.2f} {model / g:>10.1f} "
              f"{100 * model / matmul['large_flops_per_s']:>6.1f}% "
              f"{100 * model / matmul['model_shapes_flops_per_s']:>7.1f}% "
              f"{100 * model / r['large_flops_per_s_around']:>10.1f}% "
              f"{r['computed_flops_per_s'] / g:>13.1f} "
              f"{r['real_tokens'] / r['computed_tokens']:>17.2f}")
    print(f"baseline: {base['parameters']:,} parameters, mean transcript "
          f"{base['mean_real_length']:.1f} tokens, {base['seconds'] / base['steps_timed']:.2f} s/step")
    default = next((r for r in results if r["lever"] == DEFAULT_LEVER), None)
    if default is not None:
        share = default["model_flops_per_s"] / matmul["large_flops_per_s"]
        own = default["model_flops_per_s"] / default["large_flops_per_s_around"]
        print(f"target: the default config ({DEFAULT_LEVER}) at {TARGET_SHARE:.0%} of the 2048^3 "
              f"rate: {share:.1%} ({own:.1%} of the rate around its steps): "
              f"{'met' if share >= TARGET_SHARE else 'not met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    parser.add_argument("--levers", default="", help="comma-separated, or 'all'")
    parser.add_argument("--rows", type=int, default=64 * 144,
                        help="tokens per matmul for the model-shape figure (batch x padded length)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for every run (0: the config's default)")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args)
        result["steps_timed"] = args.steps - args.warmup
        print(json.dumps(result))
        return
    names = list(LEVERS) if args.levers == "all" else ["baseline"] + [
        n for n in args.levers.split(",") if n and n != "baseline"]
    unknown = set(names) - set(LEVERS)
    if unknown:
        sys.exit(f"unknown levers {sorted(unknown)}; known: {', '.join(LEVERS)}")
    matmul = run_child("matmul", args)
    results = []
    for name in names:  # one at a time: the cores are shared
        results.append(run_child(name, args))
        print(f"  {name}: {results[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    print_report(matmul, results)
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul": matmul, "levers": results}, indent=1))


if __name__ == "__main__":
    main()
