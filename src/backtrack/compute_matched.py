"""Compute-matched figures for a run's report: accuracy at equal generated tokens.

pass@k at equal k is not equal cost: an arm that backtracks (or answers twice) writes more
tokens per sample. Following s1 and the test-time-compute literature, each arm's pass@k and
maj@k are also placed at their token cost (k x the arm's mean new tokens per sample), and
compared at equal token budgets (study_stats.budget_accuracy: the budget buys budget / T
samples of an arm with mean T tokens per sample; between two evaluated k the exact mixture).
Budgets are multiples of the reference arm's (base's, when evaluated) mean tokens per sample.
"""

from __future__ import annotations

import numpy as np

from backtrack.study_stats import budget_accuracy, cost_curve


def mean_tokens(summary: dict) -> float:
    return float(np.mean(summary["per_problem"]["mean_new_tokens"]))


def figures(arms: dict[str, dict]) -> dict | None:
    """Every compute-matched figure of a run (kept in results.json): per arm its tokens per
    sample, its pass@k / maj@k cost curves, and its accuracy at each budget (None beyond its
    n samples). Needs per-problem figures (metrics.json); None when they are missing."""
    if not arms or not all("mean_new_tokens" in a.get("per_problem", {})
                           for a in arms.values()):
        return None
    ref = "base" if "base" in arms else next(iter(arms))
    levels = [round(k * mean_tokens(arms[ref]), 1) for k in arms[ref]["ks"]]
    out = {"reference": ref, "budgets": levels, "arms": {}}
    for name, summary in arms.items():
        out["arms"][name] = {
            "tokens_per_sample": mean_tokens(summary),
            **{f"{prefix}_curve": cost_curve(summary, prefix) for prefix in ("pass", "maj")},
            **{f"{prefix}_at_budget": [budget_accuracy(summary, b, prefix) for b in levels]
               for prefix in ("pass", "maj")}}
    return out


def budget_table(found: dict, prefix: str = "pass") -> list[str]:
    """Markdown rows: arm x budget, `prefix` accuracy in % ('–' beyond the arm's n samples)."""
    header = " | ".join(f"{b:.0f} tok" for b in found["budgets"])
    lines = [f"| arm | tokens/sample | {header} |",
             "|---|---|" + "---|" * len(found["budgets"])]
    for name, arm in found["arms"].items():
        cells = ["–" if v is None else f"{100 * v:.1f}" for v in arm[f"{prefix}_at_budget"]]
        lines.append(f"| {name} | {arm['tokens_per_sample']:.1f} | " + " | ".join(cells) + " |")
    return lines


def markdown(found: dict | None) -> list[str]:
    """The report section: what is compared at equal samples and what at equal tokens."""
    if not found:
        return []
    return ["## Compute-matched (equal generated tokens)", "",
            "The tables above compare arms at **equal samples** (k). Here they are compared at "
            "**equal generated tokens per problem**: a budget of B tokens buys B / T samples "
            "of an arm that writes T tokens per sample (between two evaluated k, the mixture "
            "that spends exactly B on average). Budgets are k x "
            f"{found['reference']}'s tokens per sample.",
            "", "pass at equal tokens (%):", "", *budget_table(found, "pass"), "",
            "maj at equal tokens (%):", "", *budget_table(found, "maj"), ""]


def plot_vs_tokens(ax, found: dict, prefix: str) -> None:
    """`prefix`@k of each arm against its token cost."""
    for name, arm in found["arms"].items():
        points = arm[f"{prefix}_curve"]
        ax.plot([p["tokens"] for p in points], [100 * p["value"] for p in points], marker="o",
                label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("generated tokens per problem (k x tokens per sample)")
    ax.set_ylabel(f"{prefix}@k (%)")
    ax.grid(alpha=0.3)
    ax.legend()
