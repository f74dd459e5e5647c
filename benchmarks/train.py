"""Training throughput: `backtrack train` against a plain TRL `SFTTrainer` script.

Both train the same toy-shaped model (random weights: throughput depends on shape and
sequence lengths only) on the same `rft_bt` dataset, built by `backtrack build` from records
of arith problems, with the same hyperparameters, on the CPU. Each runs in its own process,
alternately, `--repeats` times; the best run of each counts (the machine is shared). Tokens/s
is non-padding input tokens over the training loop's time, both wall-clock (the trainer's
`train_runtime`) and CPU time (steadier when other jobs share the machine); the fastest
whole-command wall time (imports, dataset checks, final save, plot) is shown beside it.
Target: the ratio of tokens/s within 10 %.

    python benchmarks/train.py
    python benchmarks/train.py --problems 256 --steps 40 --batch-size 8 --repeats 5
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
from datasets import load_from_disk
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

data_dir, model_dir, out_dir, steps, batch = sys.argv[1:6]
dataset = load_from_disk(data_dir)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
args = SFTConfig(output_dir=out_dir, max_steps=int(steps), per_device_train_batch_size=int(batch),
                 learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0.03,
                 max_length=1024, logging_steps=10, save_strategy="no", report_to="none",
                 use_cpu=True, bf16=False, gradient_checkpointing=False,
                 completion_only_loss=True, seed=0, data_seed=0)
trainer = SFTTrainer(model=model_dir, args=args, train_dataset=dataset, processing_class=tokenizer)
cpu_start = time.process_time()
result = trainer.train()
cpu_seconds = time.process_time() - cpu_start
trainer.save_model(out_dir + "/final")
print(json.dumps({"train_runtime": result.metrics["train_runtime"], "cpu": cpu_seconds}))
"""


def write_records(run_dir: Path, task, problems: list, tokenizer) -> None:
    """Two correct samples and one wrong-then-right trace per problem, as the stages store them."""
    from backtrack.backtracking import BACKTRACK_KEY, Chain, cut_point, insertion
    from backtrack.chat import render_prompt
    from backtrack.store import RecordStore

    samples, traces = [], []
    for p in problems:
        prompt = render_prompt(tokenizer, task.messages(p))
        right = f"<think>{p.solution}</think>\nThe answer is {p.answer}."
        wrong = f"<think>{p.solution} + 1</think>\nThe answer is {p.answer}1."
        for idx, (text, ok) in enumerate([(right, True), (right + " ", True), (wrong, False)]):
            samples.append({"problem_id": p.id, "sample_idx": idx, "round": 0, "prompt": prompt,
                            "completion": text, "extracted": None, "correct": ok,
                            "new_tokens": 0, "finish_reason": "stop", "answer": p.answer})
        chain = Chain.start(samples[-1], 0)
        prefix = wrong[:cut_point(wrong, "stop")]
        inserted = insertion(prefix, "Wait, that's not right...")
        continuation = f" {p.solution}</think>\nThe answer is {p.answer}."
        chain.steps.append({"round": 1, "prefix": prefix, "phrase": inserted,
                            "completion": continuation, "extracted": None, "correct": True,
                            "new_tokens": 0, "finish_reason": "stop"})
        chain.text = prefix + inserted + continuation
        traces.append(chain.record())
    with RecordStore(run_dir / "samples", {"bench": 1}) as store:
        store.append(samples)
    with RecordStore(run_dir / "backtrack", {"bench": 1}, key_fields=BACKTRACK_KEY) as store:
        store.append(traces)


def run_backtrack(run_dir: Path, model_dir: Path, steps: int, batch: int) -> dict:
    cmd = [sys.executable, "-m", "backtrack.cli", "train", "--output-dir", str(run_dir),
           "--model", str(model_dir), "--arm", "rft_bt", "--max-steps", str(steps),
           "--per-device-batch-size", str(batch), "--learning-rate", "1e-4",
           "--save-steps", str(steps + 1), "--logging-steps", "10"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    info = json.loads((run_dir / "models" / "rft_bt" / "run.json").read_text())
    return {"tokens": info["train_tokens"], "runtime": info["train_metrics"]["train_runtime"],
            "cpu": info["train_cpu_seconds"], "wall": wall}


def run_plain(run_dir: Path, model_dir: Path, steps: int, batch: int, tokens: int) -> dict:
    """The script a TRL user would write for this dataset (pre-tokenised, completion mask)."""
    out = tempfile.mkdtemp(prefix="bench-plain-")
    cmd = [sys.executable, "-c", PLAIN_TRL, str(run_dir / "sft" / "rft_bt"), str(model_dir),
           out, str(steps), str(batch)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"tokens": tokens, "runtime": result["train_runtime"], "cpu": result["cpu"],
            "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from backtrack.build import BuildConfig
    from backtrack.build import main as build
    from backtrack.tasks import get_task
    from backtrack.toy_base import save_untrained_model

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    task = get_task("arith", {})
    problems = task.problems("train", args.problems)
    model_dir = save_untrained_model(work / "model", problems)
    run_dir = work / "run"
    write_records(run_dir, task, problems, AutoTokenizer.from_pretrained(model_dir))
    build(BuildConfig(output_dir=str(run_dir), model=str(model_dir)))
    dataset = load_from_disk(str(run_dir / "sft" / "rft_bt"))
    mean = sum(map(len, dataset["input_ids"])) / len(dataset)
    print(f"dataset: {len(dataset)} examples of {mean:.0f} tokens on average; "
          f"{args.steps} steps of {args.batch_size} on the CPU")
    ours, plain = [], []
    for _ in range(args.repeats):
        ours.append(run_backtrack(run_dir, model_dir, args.steps, args.batch_size))
        plain.append(run_plain(run_dir, model_dir, args.steps, args.batch_size,
                               ours[-1]["tokens"]))
    report(ours, plain)


def report(ours: list[dict], plain: list[dict]) -> None:
    """Best run of each, by wall-clock and by CPU time of the training loop. Both see the same
    examples in the same order (same seed), so the token count of `backtrack train` (counted
    by Trainer) holds for the plain script too. CPU seconds are less sensitive than wall
    seconds to other jobs on a shared machine."""
    print(f"non-padding input tokens per run: {ours[0]['tokens']}")
    rates = {}
    for name, runs in (("backtrack train", ours), ("plain TRL script", plain)):
        wall = [r["tokens"] / r["runtime"] for r in runs]
        cpu = [r["tokens"] / r["cpu"] for r in runs]
        rates[name] = (max(wall), max(cpu))
        print(f"{name:17s}: {max(wall):7.0f} tokens/s wall, {max(cpu):7.0f} tokens/CPU-s "
              f"(runs: {', '.join(f'{w:.0f}' for w in wall)} wall; command "
              f"{min(r['wall'] for r in runs):.1f} s)")
    (wall_a, cpu_a), (wall_b, cpu_b) = rates.values()
    for label, ratio in (("wall", wall_a / wall_b), ("CPU", cpu_a / cpu_b)):
        verdict = "OK" if ratio >= 0.9 else "SLOWER THAN TARGET"
        print(f"ratio backtrack/plain ({label}): {ratio:.3f} (target >= 0.90: {verdict})")


if __name__ == "__main__":
    main()
