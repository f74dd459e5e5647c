"""Why the hf engine keeps each row's own-token cache nearly tight on CPU (`CACHE_SLACK`).

A decode step's own-token attention is two batched matmuls over the cache's filled part: one
[T x dim] block per (row, head). The blocks sit `T + gap` slots apart in the cache buffer
(`gap`: its free slots). This times the two matmuls at the sampling benchmark's shape (128
rows x 4 heads x dim 40) for several gaps, out of cache (a 48 MB buffer is written between
runs, as the other layers' work evicts the cache in a real step), best of `--repeats` medians.

    python benchmarks/cache_gaps.py
    python benchmarks/cache_gaps.py --filled 12 30 --gaps 0 1 2 4 8 130
"""

from __future__ import annotations

import argparse
import statistics
import time


def own_matmuls_us(rows: int, heads: int, dim: int, filled: int, gap: int, runs: int) -> float:
    """Median microseconds of the scores and weighted-sum matmuls over a gapped cache."""
    import torch

    keys = torch.randn(rows, heads, filled + gap, dim)[:, :, :filled]
    values = torch.randn(rows, heads, filled + gap, dim)[:, :, :filled]
    query, weights = torch.randn(rows, heads, 1, dim), torch.rand(rows, heads, 1, filled)
    evict = torch.zeros(12 * 2 ** 20)
    times = []
    for _ in range(runs):
        evict.add_(1)
        start = time.perf_counter()
        torch.matmul(query, keys.transpose(2, 3))
        torch.matmul(weights, values)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=40)
    parser.add_argument("--filled", type=int, nargs="+", default=[12, 30])
    parser.add_argument("--gaps", type=int, nargs="+", default=[0, 1, 2, 3, 4, 6, 8, 16, 130])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(f"own-token matmuls, {args.rows} rows x {args.heads} heads x dim {args.dim}, out of "
          f"cache ({args.threads} thread(s)); microseconds by free slots between blocks")
    for filled in args.filled:
        best = {gap: min(own_matmuls_us(args.rows, args.heads, args.dim, filled, gap, args.runs)
                         for _ in range(args.repeats)) for gap in args.gaps}
        tight = best[min(args.gaps)]
        print(f"  {filled} tokens filled: " + ", ".join(
            f"gap {gap}: {us:.0f} us ({us / tight:.2f}x)" for gap, us in best.items()))


if __name__ == "__main__":
    main()
