"""RL throughput: `backtrack rl` (outcome method) against TRL `GRPOTrainer` (use_vllm=False).

Both train the same toy-shaped model (random weights: throughput depends on shape and
lengths only; an untrained model writes every answer to `--max-new-tokens`, so both generate
the same number of tokens) on arith train problems, with the same batch (`--problems` x
`--group`), KL weight, loss aggregation ("dapo"), reward (the task's checker), sampling
settings and torch threads, on the CPU. Each runs in its own process, alternately,
`--repeats` times; the best run of each counts (the machine is shared). Rollouts/s is over
the training loop (TRL's `train_runtime`; ours: the sum of the step times in `run.json`), by
wall clock and by CPU time. Target: ratio ours / TRL >= 1.0.

    python benchmarks/rl.py
    python benchmarks/rl.py --steps 5 --problems 16 --group 8 --max-new-tokens 100 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def run_ours(work: Path, model_dir: Path, args) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ours-", dir=work))
    engine = f"{{num_threads: {args.threads}, batch_size: {args.problems * args.group}}}"
    cmd = [sys.executable, "-m", "backtrack.cli", "rl", "--output-dir", str(out),
           "--model", str(model_dir), "--method", "outcome", "--steps", str(args.steps),
           "--problems-per-step", str(args.problems), "--group-size", str(args.group),
           "--max-new-tokens", str(args.max_new_tokens), "--temperature", "0.8",
           "--lr", "1e-5", "--kl", "0.05", "--loss-type", "dapo", "--scale-std", "true",
           "--save-steps", str(args.steps + 1), "--engine-args", engine]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    info = json.loads((out / "models" / "outcome_rl" / "run.json").read_text())
    return {"rollouts": info["rollouts"], "runtime": info["seconds_total"],
            "cpu": info["cpu_seconds"], "wall": wall, "share_other": info["share_other"]}


def run_trl(work: Path, model_dir: Path, args) -> dict:
    out = tempfile.mkdtemp(prefix="trl-", dir=work)
    cmd = [sys.executable, "-c", PLAIN_TRL, str(model_dir), out, str(args.steps),
           str(args.problems), str(args.group), str(args.max_new_tokens), str(args.threads)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "wall": wall}


def report(ours: list[dict], trl: list[dict]) -> None:
    rates = {}
    for name, runs in (("backtrack rl", ours), ("TRL GRPOTrainer", trl)):
        wall = [r["rollouts"] / r["runtime"] for r in runs]
        cpu = [r["rollouts"] / r["cpu"] for r in runs]
        rates[name] = (max(wall), max(cpu))
        print(f"{name:15s}: {max(wall):6.2f} rollouts/s wall, {max(cpu):6.2f} rollouts/CPU-s "
              f"(runs: {', '.join(f'{w:.2f}' for w in wall)}; command "
              f"{min(r['wall'] for r in runs):.1f} s)")
    print(f"backtrack rl: share of loop time outside generation + forward/backward: "
          f"{min(r['share_other'] for r in ours):.3f}")
    (wall_a, cpu_a), (wall_b, cpu_b) = rates.values()
    for label, ratio in (("wall", wall_a / wall_b), ("CPU", cpu_a / cpu_b)):
        verdict = "OK" if ratio >= 1.0 else "SLOWER THAN TARGET"
        print(f"ratio backtrack/TRL rollouts/s ({label}): {ratio:.3f} (target >= 1.0: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from backtrack.tasks import get_task
    from backtrack.toy_base import save_untrained_model

    work = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    model_dir = save_untrained_model(work / "model", get_task("arith", {}).problems("train", 256))
    print(f"{args.steps} steps of {args.problems} problems x {args.group} rollouts, "
          f"{args.max_new_tokens} new tokens, {args.threads} torch thread(s), CPU")
    ours, trl = [], []
    for _ in range(args.repeats):
        ours.append(run_ours(work, model_dir, args))
        trl.append(run_trl(work, model_dir, args))
    report(ours, trl)


if __name__ == "__main__":
    main()
