"""Does a toy-base speed lever keep what the model learns? Held-out loss after N steps, A/B.

A lever that changes which transcripts share a batch (length grouping) or how they are laid out
can be faster per token and still teach the model less. This trains the default toy base for
`--steps` steps (`--warmup` steps) once per lever on the same corpus, then prints the mean
loss on `--held-out` transcripts the runs never trained on, and the seconds each took.

    python benchmarks/toy_base_learning.py --levers baseline,group --steps 150
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from toy_base import LEVERS  # noqa: E402  (benchmarks/ is the script's folder)


def held_out_loss(model, tokenizer, transcripts, config) -> float:
    import torch
    from transformers import DataCollatorForSeq2Seq

    from backtrack.toy_corpus import TranscriptDataset, loss_kinds

    dataset = TranscriptDataset(tokenizer, transcripts, loss_kinds(config))
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), 64):
            batch = collate([dataset[i] for i in range(start, min(start + 64, len(dataset)))])
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * tokens
            count += tokens
    return total / count


def run_lever(lever: str, steps: int, warmup: int, held: int) -> dict:
    from backtrack.tasks import get_task
    from backtrack.toy_base import (ToyBaseConfig, build_corpus, build_model, make_trainer,
                                    train_tokenizer)

    overrides, training_args = LEVERS[lever]
    config = ToyBaseConfig(**{"save_minutes": 0.0, "eval_problems": 0, "steps": steps,
                              "warmup_steps": warmup, **overrides})
    task = get_task(config.task, config.task_args)
    corpus = build_corpus(task, config, config.batch_size * steps + held)
    train, held_out = corpus[:-held], corpus[-held:]
    tokenizer = train_tokenizer(task, corpus, config.vocab_size)
    model = build_model(tokenizer, config)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        make_trainer(model, tokenizer, train, config, Path(work), logging_steps=10 ** 6,
                     **training_args).train()
    seconds = time.perf_counter() - start
    return {"lever": lever, "seconds": seconds,
            "held_out_loss": held_out_loss(model, tokenizer, held_out, config)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", default="baseline,group", help="comma-separated")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--held-out", type=int, default=512)
    args = parser.parse_args()
    results = [run_lever(name, args.steps, args.warmup, args.held_out) for name in args.levers.split(",")]
    base = results[0]
    print(f"{'lever':<18} {'held-out loss':>13} {'seconds':>8} {'x base speed':>12}")
    for r in results:
        print(f"{r['lever']:<18} {r['held_out_loss']:>13.3f} {r['seconds']:>8.0f} "
              f"{base['seconds'] / r['seconds']:>12.2f}")


if __name__ == "__main__":
    main()
