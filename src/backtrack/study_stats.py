"""Statistics of a study: many trained models (seeds) evaluated on the same test problems.

Pure numpy, like `metrics.py`, whose per-problem values (the `per_problem` lists of an arm's
`metrics.json`) are the input here. Two sources of variance matter: which training run we got
(seed) and which test problems we drew. A bootstrap over problems of one trained model sees
only the second, so a "significant" gap can be one lucky training run.

The hierarchical bootstrap resamples seeds, then problems. The test problems are the same for
every seed (one fixed test split), so the design is crossed, not nested: one draw of problems
is applied to every drawn seed. Resampling problems independently per seed would let a hard
problem's effect average out across seeds and understate the problem variance. Hence every
seed must hold the same problem ids (checked; a study evaluates every run on the same split).

With S seeds the seed level is an S-point bootstrap: with 3 seeds it underestimates the seed
variance by (S-1)/S and is coarse, which is why the per-seed values are always reported next
to the interval.

Compute matching: an arm that writes t new tokens per sample pays k*t tokens for pass@k or
maj@k. Curves are drawn against that cost, and accuracy at a token budget B uses the rule in
`budget_values`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from backtrack.metrics import summarize

LEVEL = 0.95


def seed_matrix(per_seed: Mapping[object, Mapping[str, float]]) -> tuple[list, list, np.ndarray]:
    """(seeds, problem ids, values[seed, problem]) from {seed: {problem_id: value}}.

    Every seed must hold the same problem ids (see the module doc) and no undefined value.
    """
    seeds = list(per_seed)
    if not seeds:
        raise ValueError("no seeds to aggregate")
    ids = sorted(per_seed[seeds[0]])
    if not ids:
        raise ValueError(f"seed {seeds[0]!r} has no problems")
    rows = []
    for seed in seeds:
        values = per_seed[seed]
        if sorted(values) != ids:
            extra = sorted(set(values) ^ set(ids))[:3]
            raise ValueError(f"seed {seed!r} was evaluated on other problems than seed "
                             f"{seeds[0]!r} (e.g. {extra}); a study needs one test set")
        row = [values[pid] for pid in ids]
        if any(v is None for v in row):
            raise ValueError(f"seed {seed!r}: undefined per-problem values")
        rows.append(row)
    return seeds, ids, np.asarray(rows, dtype=float)


def per_problem(summary: dict, metric: str) -> dict[str, float]:
    """{problem_id: value} of one metric from an arm's `metrics.json` (`summarize` output)."""
    values = summary["per_problem"].get(metric)
    if values is None:
        raise KeyError(f"metric '{metric}' not in this summary (has "
                       f"{sorted(summary['per_problem'])})")
    return dict(zip(map(str, summary["problem_ids"]), values))


def _counts(n_boot: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of `size` items is drawn in each of `n_boot` resamples with replacement."""
    draws = rng.integers(0, size, size=(n_boot, size)) + size * np.arange(n_boot)[:, None]
    return np.bincount(draws.ravel(), minlength=n_boot * size).reshape(n_boot, size).astype(float)


def hierarchical_replicates(matrix: np.ndarray, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Bootstrap replicates of the grand mean: resample seeds (rows), then problems (columns).

    The mean over drawn seeds of the mean over drawn problems equals
    seed_counts @ matrix @ problem_counts / (S * P), so no replicate is built explicitly.
    """
    matrix = np.asarray(matrix, dtype=float)
    n_seeds, n_problems = matrix.shape
    rng = np.random.default_rng(seed)
    seed_counts = _counts(n_boot, n_seeds, rng)
    problem_counts = _counts(n_boot, n_problems, rng)
    return np.einsum("bs,sp,bp->b", seed_counts, matrix, problem_counts) / (n_seeds * n_problems)


def _interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    low, high = np.quantile(replicates, [alpha, 1 - alpha])
    return float(low), float(high)


def hierarchical_mean(per_seed: Mapping[object, Mapping[str, float]], n_boot: int = 2000,
                      seed: int = 0, level: float = LEVEL) -> dict:
    """Mean over seeds of each seed's mean over problems, with a seeds-then-problems CI.

    Returns {mean, low, high, per_seed: {seed: mean}, seeds, problems}.
    """
    seeds, ids, matrix = seed_matrix(per_seed)
    low, high = _interval(hierarchical_replicates(matrix, n_boot, seed), level)
    return {"mean": float(matrix.mean()), "low": low, "high": high,
            "per_seed": {str(s): float(v) for s, v in zip(seeds, matrix.mean(axis=1))},
            "seeds": len(seeds), "problems": len(ids)}


def paired_difference(a: Mapping[object, Mapping[str, float]],
                      b: Mapping[object, Mapping[str, float]], n_boot: int = 2000,
                      seed: int = 0, level: float = LEVEL) -> dict:
    """Arm a minus arm b, paired within each seed and problem, aggregated across seeds.

    Only seeds both arms have are used. `seeds_agree` counts the seeds whose own mean
    difference has the sign of the overall mean (a zero difference agrees with nothing);
    `significant` means the hierarchical CI excludes zero.
    """
    common = [s for s in a if s in b]
    if not common:
        raise ValueError("the two arms share no seed")
    diffs = {}
    for s in common:
        if sorted(a[s]) != sorted(b[s]):
            raise ValueError(f"seed {s!r}: the two arms were evaluated on different problems")
        diffs[s] = {pid: None if a[s][pid] is None or b[s][pid] is None
                    else a[s][pid] - b[s][pid] for pid in a[s]}
    result = hierarchical_mean(diffs, n_boot, seed, level)
    sign = np.sign(result["mean"])
    per_seed = result["per_seed"].values()
    result["seeds_agree"] = int(sum(sign != 0 and np.sign(v) == sign for v in per_seed))
    result["significant"] = bool(result["low"] > 0 or result["high"] < 0)
    return result


# ---- compute-matched curves ------------------------------------------------------------

def summary_from_records(records: Sequence[dict], **options) -> dict:
    """`metrics.summarize` of sample records with every k = 1..n (for curves at every k)."""
    groups: dict[str, int] = {}
    for record in records:
        groups[str(record["problem_id"])] = groups.get(str(record["problem_id"]), 0) + 1
    n = min(groups.values()) if groups else 0
    return summarize(records, ks=list(range(1, n + 1)), **options)


def _tokens(summary: dict) -> np.ndarray:
    return np.asarray(summary["per_problem"]["mean_new_tokens"], dtype=float)


def cost_curve(summary: dict, prefix: str = "pass") -> list[dict]:
    """pass@k (prefix "pass") or maj@k against its token cost, one point per evaluated k.

    tokens = mean over problems of k * t_p, where t_p is the mean new tokens per sample of
    problem p (so k times the arm's mean tokens per sample); value = mean of `prefix@k`.
    """
    t = _tokens(summary)
    return [{"k": k, "tokens": float(np.mean(k * t)),
             "value": float(np.mean(summary["per_problem"][f"{prefix}@{k}"]))}
            for k in summary["ks"] if f"{prefix}@{k}" in summary["per_problem"]]


def budget_values(summary: dict, budget: float, prefix: str = "pass") -> list[float] | None:
    """Per-problem accuracy of an arm at an expected budget of `budget` new tokens per problem.

    Rule: with T the arm's mean new tokens per sample, the budget buys k* = budget / T samples.
    Between the two evaluated ks around k* (k = 0 scores 0 at no cost), take the mixture
    that runs k_lo samples with probability w and k_hi otherwise, w = (k_hi - k*)/(k_hi - k_lo):
    it spends exactly the budget in expectation and scores exactly w*acc(k_lo) + (1-w)*acc(k_hi)
    on every problem, so the value is achievable, not a guess between points. Taking the
    largest k that fits instead would waste up to half the budget on a power-of-two k grid and
    make the ranking depend on where the grid falls for each arm's length. T is the arm's mean,
    not each problem's own t_p: t_p is only known after sampling and is longer where samples
    go wrong, so a per-problem k would be an oracle allocation. pass@k is concave in k, so the
    mixture never overstates pass@k at k*. None when k* exceeds the largest evaluated k.
    """
    t_mean = float(np.mean(_tokens(summary)))
    ks = [k for k in summary["ks"] if f"{prefix}@{k}" in summary["per_problem"]]
    if budget < 0 or not ks or t_mean <= 0:
        raise ValueError(f"budget_values needs budget >= 0 and samples with tokens "
                         f"(budget {budget}, mean tokens {t_mean})")
    k_star = budget / t_mean
    if k_star > ks[-1] + 1e-9:
        return None
    points = [0] + ks
    hi = next(i for i, k in enumerate(points) if k >= k_star - 1e-9)
    k_hi = points[hi]
    acc = {k: np.asarray(summary["per_problem"][f"{prefix}@{k}"], dtype=float) for k in ks}
    acc[0] = np.zeros_like(acc[ks[0]])
    if hi == 0 or abs(k_hi - k_star) < 1e-9:
        return acc[k_hi].tolist()
    k_lo = points[hi - 1]
    w = (k_hi - k_star) / (k_hi - k_lo)
    return (w * acc[k_lo] + (1 - w) * acc[k_hi]).tolist()


def budget_accuracy(summary: dict, budget: float, prefix: str = "pass") -> float | None:
    """Mean over problems of `budget_values` (None when the budget is beyond n samples)."""
    values = budget_values(summary, budget, prefix)
    return None if values is None else float(np.mean(values))


def budget_per_seed(summaries: Mapping[object, dict], budget: float,
                    prefix: str = "pass") -> dict | None:
    """{seed: {problem_id: accuracy at the budget}} from {seed: summary}; each seed uses its
    own model's mean tokens per sample. None when any seed cannot reach the budget within its
    n samples (a mean over the other seeds would be biased towards the short-writing ones)."""
    per_seed = {}
    for s, summary in summaries.items():
        values = budget_values(summary, budget, prefix)
        if values is None:
            return None
        per_seed[s] = dict(zip(map(str, summary["problem_ids"]), values))
    return per_seed


def study_budget(summaries: Mapping[object, dict], budget: float, prefix: str = "pass",
                 n_boot: int = 2000, seed: int = 0) -> dict | None:
    """Accuracy at a token budget across seeds: hierarchical mean and CI (None: see
    `budget_per_seed`)."""
    per_seed = budget_per_seed(summaries, budget, prefix)
    return None if per_seed is None else hierarchical_mean(per_seed, n_boot, seed)
