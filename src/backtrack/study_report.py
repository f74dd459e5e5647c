"""The study report: every (variant, arm) over seeds, at equal samples and at equal tokens.

Reads `<run>/eval/<arm>/metrics.json` of every run of a study (written by `backtrack eval`;
`metrics.summarize` format) and writes `<study output_dir>/report/`: `study.md`, `study.json`
and PNG plots. Intervals are hierarchical bootstraps over seeds then test problems
(`study_stats`), so they hold the variance of training as well as of the test set; per-seed
values are always listed beside them. Paired differences are taken within each seed and
problem, then aggregated across seeds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from backtrack import study_stats
from backtrack.errors import UserError
from backtrack.fileio import replace_dir, write_json, write_text
from backtrack.report import comparison_pairs
from backtrack.study import Run, StudyConfig, study_runs

N_BOOT = 2000
BUDGET_RULE = ("budget B buys k* = B / T samples (T: the arm's mean new tokens per sample "
               "in that seed); between the evaluated ks around k* the mixture of k_lo and "
               "k_hi samples that spends B in expectation (k = 0 scores 0); empty when k* is "
               "beyond the n samples evaluated. maj@k is not monotone in k (ties at even k), "
               "so maj at a budget is what voting with that budget gives, not its best use")
# Self-correction statistics (`metrics.summarize`'s per-problem shares) the study report
# aggregates over seeds like accuracy: they say whether an arm retries at all and whether its
# retries turn wrong answers right (Δ(i→c)) more often than right ones wrong (Δ(c→i)).
SELF_CORRECTION = {"share_backtracked": "≥1 backtrack", "share_backtracked_2plus":
                   "≥2 backtracks", "acc_first": "Acc@first", "acc_final": "Acc@final",
                   "delta_i2c": "Δ(i→c)", "delta_c2i": "Δ(c→i)"}


def run_arms(run: Run, arms: list[str]) -> list[str]:
    """The evaluations a run reports: its recipe's top-level `arms` (where the study's `arms`
    and a variant's own are put), else `arms`, else the pipeline's default."""
    from backtrack.arms import parse_evaluation
    from backtrack.config import resolve
    from backtrack.pipeline import RunConfig

    if "arms" not in run.recipe and arms:
        return list(arms)
    return [parse_evaluation(e).name for e in resolve(RunConfig, run.recipe, "run").arms]


def load_metrics(runs: list[Run], arms: list[str]) -> tuple[dict, list[str]]:
    """({variant: {arm: {seed: summary}}}, missing `variant/seedK/arm` names)."""
    found: dict[str, dict[str, dict[int, dict]]] = {}
    missing = []
    for run in runs:
        for arm in run_arms(run, arms):
            path = Path(run.output_dir) / "eval" / arm / "metrics.json"
            if not path.is_file():
                missing.append(f"{run.name}/{arm}")
                continue
            try:
                summary = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: not valid JSON ({exc})") from exc
            found.setdefault(run.variant, {}).setdefault(arm, {})[run.seed] = summary
    return found, missing


def common_ks(summaries: dict) -> list[int]:
    """The ks every seed evaluated (seeds may differ in n only if resumed differently)."""
    sets = [set(s["ks"]) for s in summaries.values()]
    return sorted(set.intersection(*sets))


def _per_seed(summaries: dict, metric: str) -> dict:
    return {seed: study_stats.per_problem(s, metric) for seed, s in summaries.items()}


def cell_stats(summaries: dict, budgets: list[float], seed: int) -> dict:
    """Every figure of one (variant, arm) across its seeds."""
    ks = common_ks(summaries)
    metrics = {}
    names = [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in ks] + ["mean_new_tokens"]
    for name in names + [m for m in SELF_CORRECTION if _numeric_everywhere(summaries, m)]:
        metrics[name] = study_stats.hierarchical_mean(_per_seed(summaries, name), N_BOOT, seed)
    tokens = float(np.mean([np.mean(s["per_problem"]["mean_new_tokens"])
                            for s in summaries.values()]))
    curves = {prefix: [{"k": k, "tokens": k * tokens, **metrics[f"{prefix}@{k}"]} for k in ks]
              for prefix in ("pass", "maj")}
    at_budget = {prefix: [{"budget": b, **(study_stats.study_budget(
        _with_ks(summaries, ks), b, prefix, N_BOOT, seed) or {"mean": None})} for b in budgets]
        for prefix in ("pass", "maj")}
    return {"seeds": sorted(summaries), "ks": ks, "tokens_per_sample": tokens,
            "metrics": metrics, "curves": curves, "budgets": at_budget}


def _numeric_everywhere(summaries: dict, metric: str) -> bool:
    """Whether every seed has a number for `metric` on every problem (older metrics files
    and arms without a figure, e.g. accuracy when backtracked, are left out)."""
    columns = [s["per_problem"].get(metric) for s in summaries.values()]
    return all(col is not None and all(isinstance(v, (int, float)) for v in col)
               for col in columns)


def _with_ks(summaries: dict, ks: list[int]) -> dict:
    return {seed: {**s, "ks": ks} for seed, s in summaries.items()}


def budget_grid(found: dict) -> tuple[list[float], str]:
    """Token budgets: k times the reference cell's mean tokens per sample, for its ks.

    The reference is the first variant's `base` arm (else its first arm), so a budget reads
    as "the cost of k reference samples"."""
    variant = next(iter(found))
    arm = "base" if "base" in found[variant] else next(iter(found[variant]))
    summaries = found[variant][arm]
    unit = float(np.mean([np.mean(s["per_problem"]["mean_new_tokens"])
                          for s in summaries.values()]))
    return [round(k * unit, 1) for k in common_ks(summaries)], f"{variant}/{arm}"


def _pairs(found: dict) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Arm pairs within each variant (each arm's `compare_with` in the registry), then each
    arm of every other variant against the same arm of the first variant."""
    pairs = [((v, a), (v, b)) for v, arms in found.items()
             for a, b in comparison_pairs(list(arms))]
    first = next(iter(found))
    pairs += [((v, arm), (first, arm)) for v in list(found)[1:] for arm in found[v]
              if arm in found[first]]
    return pairs


def _compare(a: dict, b: dict, pair, metric: str, basis: str, seed: int) -> dict | None:
    if a is None or b is None:
        return None
    result = study_stats.paired_difference(a, b, N_BOOT, seed)
    (va, aa), (vb, ab) = pair
    return {"a": f"{va}/{aa}", "b": f"{vb}/{ab}", "metric": metric, "basis": basis, **result}


def comparisons(found: dict, budgets: list[float], seed: int) -> list[dict]:
    """Paired differences at equal samples (pass@1, pass@n, maj@n) and at equal tokens
    (pass and maj at the smallest and the largest budget of the grid both arms reach)."""
    rows = []
    for pair in _pairs(found):
        (va, aa), (vb, ab) = pair
        sa, sb = found[va][aa], found[vb][ab]
        ks = sorted(set(common_ks(sa)) & set(common_ks(sb)))
        for metric in dict.fromkeys(["pass@1", f"pass@{ks[-1]}", f"maj@{ks[-1]}"]):
            rows.append(_compare(_per_seed(sa, metric), _per_seed(sb, metric), pair, metric,
                                 "equal samples", seed))
        reach = [b for b in budgets if all(study_stats.budget_per_seed(
            _with_ks(s, ks), b) is not None for s in (sa, sb))]
        for budget in dict.fromkeys(reach[:1] + reach[-1:]):
            for prefix in ("pass", "maj"):
                rows.append(_compare(
                    study_stats.budget_per_seed(_with_ks(sa, ks), budget, prefix),
                    study_stats.budget_per_seed(_with_ks(sb, ks), budget, prefix), pair,
                    f"{prefix} at {budget:g} tokens", "equal tokens", seed))
    return [row for row in rows if row is not None]


def study_results(config: StudyConfig, runs: list[Run], seed: int = 0) -> dict:
    """The study report's data (what `study.json` holds)."""
    found, missing = load_metrics(runs, list(config.arms))
    if not found:
        raise UserError(f"{config.output_dir}: no metrics.json in any run of the study; run "
                        "the study first")
    budgets, reference = budget_grid(found)
    try:
        cells = {v: {arm: cell_stats(s, budgets, seed) for arm, s in arms.items()}
                 for v, arms in found.items()}
        rows = comparisons(found, budgets, seed)
    except ValueError as exc:  # e.g. runs evaluated on different test problems
        raise UserError(f"{config.output_dir}: the runs cannot be compared: {exc}") from exc
    return {"study": dict(vars(config)), "missing": missing,
            "budgets": {"tokens": budgets, "reference": reference, "rule": BUDGET_RULE},
            "cells": cells, "comparisons": rows}


# ---- rendering -------------------------------------------------------------------------

def _pct(stat: dict | None, scale: float = 100, digits: int = 1) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return (f"{stat['mean'] * scale:.{digits}f} [{stat['low'] * scale:.{digits}f}, "
            f"{stat['high'] * scale:.{digits}f}]")


def _seeds(stat: dict | None, scale: float = 100, sign: str = "") -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return " / ".join(f"{v * scale:{sign}.1f}" for v in stat["per_seed"].values())


def _label(results: dict, variant: str, arm: str) -> str:
    return arm if len(results["cells"]) == 1 else f"{variant}/{arm}"


def _samples_table(results: dict) -> list[str]:
    lines = ["| variant | arm | seeds | pass@1 | pass@n | maj@n | n | tokens/sample | "
             "pass@1 per seed |", "|---|---|---|---|---|---|---|---|---|"]
    for variant, arms in results["cells"].items():
        for arm, cell in arms.items():
            m, n = cell["metrics"], cell["ks"][-1]
            lines.append(f"| {variant} | {arm} | {len(cell['seeds'])} | {_pct(m['pass@1'])} | "
                         f"{_pct(m[f'pass@{n}'])} | {_pct(m[f'maj@{n}'])} | {n} | "
                         f"{_pct(m['mean_new_tokens'], 1)} | {_seeds(m['pass@1'])} |")
    return lines


def _self_correction_table(results: dict) -> list[str]:
    """Each cell's self-correction shares over seeds (points of all answers), or nothing
    when no cell has them."""
    cells = [(v, a, c) for v, arms in results["cells"].items() for a, c in arms.items()
             if "share_backtracked" in c["metrics"]]
    if not cells:
        return []
    names = [n for n in SELF_CORRECTION if all(n in c["metrics"] for _, _, c in cells)]
    lines = ["| variant | arm | " + " | ".join(SELF_CORRECTION[n] for n in names) +
             " | ≥1 backtrack per seed |", "|---|---|" + "---|" * (len(names) + 1)]
    for variant, arm, cell in cells:
        m = cell["metrics"]
        lines.append(f"| {variant} | {arm} | " + " | ".join(_pct(m[n]) for n in names) +
                     f" | {_seeds(m['share_backtracked'])} |")
    return lines


def _tokens_table(results: dict, prefix: str) -> list[str]:
    budgets = results["budgets"]["tokens"]
    lines = ["| variant | arm | " + " | ".join(f"{b:g}" for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for variant, arms in results["cells"].items():
        for arm, cell in arms.items():
            cells = [_pct(point) for point in cell["budgets"][prefix]]
            lines.append(f"| {variant} | {arm} | " + " | ".join(cells) + " |")
    return lines


# Fewer seeds than this cannot show that a difference holds across training runs: with one
# seed the interval covers the test problems only, and "every seed agrees" is trivially true.
MIN_SEEDS_TO_HOLD = 2


def _verdict(row: dict) -> str:
    if row["seeds"] < MIN_SEEDS_TO_HOLD:
        return f"CI only ({row['seeds']} seed)" if row["significant"] else "no"
    if row["significant"] and row["seeds_agree"] == row["seeds"]:
        return "yes"
    return "CI only (seeds split)" if row["significant"] else "no"


def _comparison_table(rows: list[dict]) -> list[str]:
    lines = ["| a − b | metric | Δ points [95 % CI] | per seed | seeds agreeing | holds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['a']} − {r['b']} | {r['metric']} | {_pct(r)} | "
                     f"{_seeds(r, sign='+')} | {r['seeds_agree']}/{r['seeds']} | "
                     f"{_verdict(r)} |")
    return lines


def _own_scopes(study: dict) -> str:
    own = {name: o["seed_scope"] for name, o in study["variants"].items()
           if isinstance(o, dict) and "seed_scope" in o}
    return "".join(f"; variant `{n}` has seed scope `{s}`" for n, s in own.items())


def render_markdown(results: dict, plots: list[str]) -> str:
    study, budgets = results["study"], results["budgets"]
    rows = results["comparisons"]
    lines = [
        f"# Study report: {study['source']}", "",
        f"Recipe `{study['recipe']}`, seeds {study['seeds']} (seed scope `{study['seed_scope']}`), "
        f"variants {list(study['variants'])}{_own_scopes(study)}.",
        "Intervals: 95 % hierarchical bootstrap, resampling seeds and then test problems (the "
        "same problems for every seed), so they hold training variance as well as test-set "
        "variance. With few seeds the seed level is coarse: read the per-seed values too.", "",
        "**Equal samples** (pass@k, maj@k at the same k): an arm that writes longer answers "
        "spends more tokens for the same k. **Equal tokens**: accuracy at a budget of B new "
        f"tokens per problem; budgets are k times the mean tokens per sample of "
        f"`{budgets['reference']}`; rule: {budgets['rule']}.", ""]
    if results["missing"]:
        lines += [f"Missing (not evaluated yet): {', '.join(results['missing'])}.", ""]
    lines += ["## Per variant and arm, at equal samples", "", *_samples_table(results), ""]
    correction = _self_correction_table(results)
    if correction:
        lines += ["## Self-correction, across seeds", "",
                  "Shares of all answers (%): answers with a backtrack (phrase matches), "
                  "accuracy of the answer before the first backtrack and of the final one, "
                  "and answers a backtrack turned wrong → right (Δ(i→c)) or right → wrong "
                  "(Δ(c→i)).", "", *correction, ""]
    for prefix in ("pass", "maj"):
        lines += [f"## {prefix}@budget, at equal tokens (columns: tokens per problem)", "",
                  *_tokens_table(results, prefix), ""]
    lines += ["## Paired differences within each seed, across seeds", "",
              "`holds`: yes when the CI excludes 0 and every seed has the same sign, with at "
              f"least {MIN_SEEDS_TO_HOLD} seeds; with one seed the CI covers test problems "
              "only, not training variance.", ""]
    for basis in ("equal samples", "equal tokens"):
        chosen = [r for r in rows if r["basis"] == basis]
        if chosen:
            lines += [f"### At {basis}", "", *_comparison_table(chosen), ""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plot_cell(ax, x, cell_points: list[dict], label: str, color) -> None:
    means = [p["mean"] * 100 for p in cell_points]
    ax.plot(x, means, marker="o", label=label, color=color)
    ax.fill_between(x, [p["low"] * 100 for p in cell_points],
                    [p["high"] * 100 for p in cell_points], alpha=0.15, color=color)
    for seed in cell_points[0]["per_seed"]:
        ax.plot(x, [p["per_seed"][seed] * 100 for p in cell_points], color=color, alpha=0.3,
                linewidth=0.8)


def write_plots(folder: Path, results: dict) -> list[str]:
    """pass@k and maj@k against k (equal samples) and against tokens (equal tokens); bands
    are the hierarchical CIs, thin lines the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(v, a, c) for v, arms in results["cells"].items() for a, c in arms.items()]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = []
    for name, prefix, by_tokens in [("pass_at_k.png", "pass", False),
                                    ("maj_at_k.png", "maj", False),
                                    ("pass_vs_tokens.png", "pass", True),
                                    ("maj_vs_tokens.png", "maj", True)]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (variant, arm, cell) in enumerate(cells):
            points = cell["curves"][prefix]
            x = [p["tokens"] if by_tokens else p["k"] for p in points]
            _plot_cell(ax, x, points, _label(results, variant, arm), colors[i % len(colors)])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("new tokens per problem (k × tokens/sample)" if by_tokens else "k")
        ax.set_ylabel(f"{prefix}@k (%)")
        ax.set_title("equal tokens" if by_tokens else "equal samples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


def write_study_report(config: StudyConfig, runs: list[Run] | None = None,
                       seed: int = 0) -> Path:
    """Write `<study output_dir>/report/` (study.md, study.json, PNGs) atomically."""
    runs = study_runs(config) if runs is None else runs
    results = study_results(config, runs, seed)
    target = Path(config.output_dir) / "report"
    tmp = Path(config.output_dir) / f".report.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plots = write_plots(tmp, results)
    write_json(tmp / "study.json", results)
    write_text(tmp / "study.md", render_markdown(results, plots))
    replace_dir(tmp, target)
    print(f"study report: {target / 'study.md'}", flush=True)
    return target / "study.md"
