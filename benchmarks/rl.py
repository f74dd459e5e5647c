"""RL throughput: `backtrack rl` (outcome method) against TRL `GRPOTrainer` (use_vllm=False).

Both train the same toy-shaped model (by default random weights: throughput depends on shape
and lengths only, and an untrained model writes nearly every answer to `--max-new-tokens`, so
both generate about the same number of tokens; `--model DIR` takes a trained one, e.g. the
toy base) on arith train problems, with the same batch (`--problems` x `--group`), KL weight,
loss aggregation ("dapo"), reward (the task's checker), sampling settings and torch threads,
on the CPU. Each runs in its own process, alternately, `--repeats` times; the best run of
each counts (the machine is shared). Rollouts/s is over the training loop (TRL's
`train_runtime`; ours: the sum of the step times in `run.json`, which includes writing the
log and a checkpoint every `--save-steps`, which TRL is not asked to do), by wall clock and by
CPU time. Also printed: where our loop's time goes, and the share outside generation, forward
and backward (target <= 10 %). Target: ratio ours / TRL >= 1.0.

    python benchmarks/rl.py --threads 1
    python benchmarks/rl.py --threads 1 --with-plain   # + ours with the per-row forward
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("generation", "forward_backward", "other", "total")
OURS, TRL, PLAIN = "backtrack rl", "TRL GRPOTrainer", "backtrack rl, per-row forward"

PLAIN_TRL = """
import json, sys, time
import torch
model_dir, out_dir, steps, problems, group, max_new, threads = sys.argv[1:8]
steps, problems, group, max_new = int(steps), int(problems), int(group), int(max_new)
torch.set_num_threads(int(threads))
from datasets import Dataset
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer
from backtrack.chat import render_prompt
from backtrack.tasks import get_task

task = get_task("arith", {})
tokenizer = AutoTokenizer.from_pretrained(model_dir)
chosen = task.problems("train", steps * problems)
dataset = Dataset.from_dict({"prompt": [render_prompt(tokenizer, task.messages(p)) for p in chosen],
                             "answer": [p.answer for p in chosen]})

def correct(completions, answer, **kwargs):
    return [task.reward(c, a) for c, a in zip(completions, answer)]

args = GRPOConfig(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=problems * group,
                  num_generations=group, max_completion_length=max_new, temperature=0.8, top_p=1.0,
                  learning_rate=1e-5, beta=0.05, loss_type="dapo", scale_rewards="group",
                  use_vllm=False, use_cpu=True, bf16=False, gradient_checkpointing=False,
                  logging_steps=1, save_strategy="no", report_to="none", seed=0)
trainer = GRPOTrainer(model=model_dir, reward_funcs=correct, args=args, train_dataset=dataset,
                      processing_class=tokenizer)
cpu_start = time.process_time()
result = trainer.train()
print(json.dumps({"runtime": result.metrics["train_runtime"],
                  "cpu": time.process_time() - cpu_start, "rollouts": steps * problems * group}))
"""


def run_ours(work: Path, model_dir: Path, args, share: bool = True) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ours-", dir=work))
    engine = f"{{num_threads: {args.threads}, batch_size: {args.problems * args.group}}}"
    cmd = [sys.executable, "-m", "backtrack.cli", "rl", "--output-dir", str(out),
           "--model", str(model_dir), "--method", "outcome", "--steps", str(args.steps),
           "--problems-per-step", str(args.problems), "--group-size", str(args.group),
           "--max-new-tokens", str(args.max_new_tokens), "--temperature", "0.8",
           "--lr", "1e-5", "--kl", "0.05", "--loss-type", "dapo", "--scale-std", "true",
           "--save-steps", str(args.save_steps), "--engine-args", engine,
           "--share-prompt-forward", str(share).lower()]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    info = json.loads((out / "models" / "outcome_rl" / "run.json").read_text())
    return {"rollouts": info["rollouts"], "runtime": info["seconds_total"],
            "cpu": info["cpu_seconds"], "wall": wall, "share_other": info["share_other"],
            "phases": {k: info[f"seconds_{k}"] for k in PHASES}}


def run_trl(work: Path, model_dir: Path, args) -> dict:
    out = tempfile.mkdtemp(prefix="trl-", dir=work)
    cmd = [sys.executable, "-c", PLAIN_TRL, str(model_dir), out, str(args.steps),
           str(args.problems), str(args.group), str(args.max_new_tokens), str(args.threads)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "wall": wall}


def report(sides: dict[str, list[dict]]) -> None:
    rates = {}
    for name, runs in sides.items():
        wall = [r["rollouts"] / r["runtime"] for r in runs]
        cpu = [r["rollouts"] / r["cpu"] for r in runs]
        rates[name] = (max(wall), max(cpu))
        print(f"{name:28s}: {max(wall):6.2f} rollouts/s wall, {max(cpu):6.2f} rollouts/CPU-s "
              f"(runs: {', '.join(f'{w:.2f}' for w in wall)}; command "
              f"{min(r['wall'] for r in runs):.1f} s)")
        if "phases" in runs[0]:
            best = max(runs, key=lambda r: r["rollouts"] / r["runtime"])
            print(f"{'':28s}  loop (best run): " + ", ".join(
                f"{k} {v:.1f} s" for k, v in best["phases"].items()))
    share = max(r["share_other"] for r in sides[OURS])
    print(f"{OURS}: share of loop time outside generation + forward/backward (worst run): "
          f"{share:.3f} (target <= 0.10: {'OK' if share <= 0.10 else 'ABOVE TARGET'})")
    for label, k in (("wall", 0), ("CPU", 1)):
        ratio = rates[OURS][k] / rates[TRL][k]
        verdict = "OK" if ratio >= 1.0 else "SLOWER THAN TARGET"
        print(f"ratio backtrack/TRL rollouts/s ({label}): {ratio:.3f} (target >= 1.0: {verdict})")
    if PLAIN in rates:
        print(f"ratio shared/per-row prompt forward rollouts/s (wall, CPU): "
              f"{rates[OURS][0] / rates[PLAIN][0]:.3f}, {rates[OURS][1] / rates[PLAIN][1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--save-steps", type=int, default=2, help="our checkpoint cadence")
    parser.add_argument("--model", default="", help="a model folder (default: an untrained "
                        "toy-shaped model)")
    parser.add_argument("--with-plain", action="store_true", help="also run ours with the "
                        "per-row forward (share_prompt_forward false), to measure that lever")
    args = parser.parse_args()

    from backtrack.tasks import get_task
    from backtrack.toy_base import save_untrained_model

    work = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    model_dir = Path(args.model) if args.model else save_untrained_model(
        work / "model", get_task("arith", {}).problems("train", 256))
    print(f"{args.steps} steps of {args.problems} problems x {args.group} rollouts, "
          f"{args.max_new_tokens} new tokens, {args.threads} torch thread(s), CPU, model "
          f"{args.model or 'untrained toy-shaped'}")
    sides: dict[str, list[dict]] = {OURS: [], TRL: []} | ({PLAIN: []} if args.with_plain else {})
    try:
        for _ in range(args.repeats):
            sides[OURS].append(run_ours(work, model_dir, args))
            sides[TRL].append(run_trl(work, model_dir, args))
            if args.with_plain:
                sides[PLAIN].append(run_ours(work, model_dir, args, share=False))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(sides)


if __name__ == "__main__":
    main()
