"""`backtrack report`: one Markdown report, plots and results.json from the eval outputs.

Reads `<output_dir>/eval/<arm>/metrics.json` (written by `backtrack eval`), the training loss
of each fine-tuned arm (`<output_dir>/models/<arm>/loss.json`) and the SFT data stats, and
writes `<output_dir>/report/`: `report.md`, `results.json` and PNG plots. Comparisons between
arms use a paired bootstrap over the problems both arms were evaluated on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backtrack import compute_matched, iterations, score_compute
from backtrack.config import CommonConfig, option
from backtrack.errors import UserError
from backtrack.evaluate import DEFAULT_ARMS
from backtrack.fileio import read_json, replace_dir
from backtrack.layout import RunLayout
from backtrack.metrics import paired_bootstrap
from backtrack.protocols import protocol_plots

DATA_FILES = {"sample": "samples/summary.json", "backtrack": "backtrack/summary.json",
              "sft": "sft/stats.json"}
SELF_VERIFY = [
    ("verdicts_per_answer", "verdicts/answer", False),
    ("verdict_accuracy", "verdict acc.", True),
    ("wrong_precision", "'wrong' precision", True),
    ("wrong_recall", "'wrong' recall", True),
    ("attempts_per_answer", "attempts/answer", False),
    ("attempt_delta_i2c", "Δ(i→c)", True),
    ("attempt_delta_c2i", "Δ(c→i)", True),
]
TWO_ATTEMPT = [
    ("acc_first", "Acc@t1", True),
    ("acc_final", "Acc@t2", True),
    ("delta_t1_t2", "Δ(t1,t2)", True),
    ("delta_i2c", "Δ(i→c)", True),
    ("delta_c2i", "Δ(c→i)", True),
]
SELF_CORRECTION = [
    ("backtracks_per_answer", "backtracks/answer", False),
    ("share_backtracked", ">=1 backtrack", True),
    ("share_backtracked_2plus", ">=2 backtracks", True),
    ("accuracy_backtracked", "acc. when backtracked", True),
    ("acc_first", "Acc@first", True),
    ("acc_final", "Acc@final", True),
    ("delta_i2c", "Δ(i→c)", True),
    ("delta_c2i", "Δ(c→i)", True),
    ("no_answer_share", "no answer", True),
    ("mean_new_tokens", "tokens/answer", False),
]


@dataclass
class ReportConfig(CommonConfig):
    """Write report.md, plots and results.json from the evaluation outputs."""

    arms: list = option(list(DEFAULT_ARMS), "Evaluations to report: arm or arm@protocol "
                        "(folders under <output_dir>/eval/).")
    compare_metrics: list = option(
        ["pass@1", "pass@4", "pass@n", "maj@n"],
        "Metrics for the significance sentences; 'n' means the largest k evaluated.")
    n_boot: int = option(10000, "Bootstrap resamples for the paired comparisons.")
    iterations: int = option(1, "On-policy rounds of the run (`backtrack run`'s); above 1 the "
                             "report records each round's model and yield.")


def outputs(config: ReportConfig) -> list[Path]:
    return [RunLayout.of(config).report]


def _load_arms(output_dir: Path, arms: list[str]) -> dict[str, dict]:
    found = {}
    for arm in arms:
        path = RunLayout(output_dir).evaluation(arm) / "metrics.json"
        if path.is_file():
            try:
                found[arm] = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: not valid JSON ({exc})") from exc
    if not found:
        raise UserError(f"{output_dir / 'eval'}: no metrics.json for any of the arms {arms}; "
                        f"run `backtrack eval` first")
    return found


def load_loss(path: Path) -> tuple[list[float], list[float]] | None:
    """(steps, losses) from a loss.json: a list of log entries or {steps, loss} lists."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if isinstance(data, dict) and "log_history" in data:
        data = data["log_history"]
    if isinstance(data, dict):
        steps = data.get("steps") or data.get("step")
        losses = data.get("loss") or data.get("losses")
        if isinstance(steps, list) and isinstance(losses, list):
            return [float(s) for s in steps], [float(v) for v in losses]
        return None
    points = []
    for i, entry in enumerate(data or []):
        if isinstance(entry, dict) and "loss" in entry:
            points.append((float(entry.get("step", i)), float(entry["loss"])))
        elif isinstance(entry, (list, tuple)) and len(entry) == 2:
            points.append((float(entry[0]), float(entry[1])))
    return ([p[0] for p in points], [p[1] for p in points]) if points else None


def _resolve_metric(name: str, ks: list[int]) -> str:
    return name.replace("@n", f"@{max(ks)}")


def comparison_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(evaluation, reference) pairs from each arm's `compare_with` in the registry; an
    evaluation under a non-default protocol is compared with the same arm under its own."""
    from backtrack.arms import parse_evaluation

    pairs = []
    for name in names:
        evaluation = parse_evaluation(name)
        refs = evaluation.arm.compare_with if name == evaluation.arm.name else (
            evaluation.arm.name,)
        pairs += [(name, ref) for ref in refs if ref in names]
    return pairs


def compare(arms: dict[str, dict], metric_names: list[str], n_boot: int, seed: int) -> list[dict]:
    """Paired bootstrap over common problems for each (arm, reference) pair and metric."""
    results = []
    for arm, ref in comparison_pairs(list(arms)):
        a, b = arms[arm], arms[ref]
        for raw in metric_names:
            metric = _resolve_metric(raw, a["ks"])
            if metric not in a["per_problem"] or metric not in b["per_problem"]:
                continue
            va = dict(zip(a["problem_ids"], a["per_problem"][metric]))
            vb = dict(zip(b["problem_ids"], b["per_problem"][metric]))
            common = sorted(p for p in set(va) & set(vb)
                            if va[p] is not None and vb[p] is not None)
            test = paired_bootstrap(np.array([va[p] for p in common]),
                                    np.array([vb[p] for p in common]), n_boot=n_boot, seed=seed)
            results.append({"arm": arm, "reference": ref, "metric": metric, **test})
    return results


def comparison_sentence(c: dict) -> str:
    if not c["problems"]:
        return f"- {c['arm']} vs {c['reference']} on {c['metric']}: no common problems."
    verdict = ("significant" if c["significant"] else "not significant") + " at the 95 % level"
    direction = "higher" if c["diff"] > 0 else "lower" if c["diff"] < 0 else "equal"
    p_text = "p < 0.001" if c["p_value"] < 0.001 else f"p = {c['p_value']:.3f}"
    return (f"- **{c['arm']} vs {c['reference']}** on {c['metric']}: {c['diff'] * 100:+.1f} points "
            f"({direction}; 95 % CI [{c['low'] * 100:+.1f}, {c['high'] * 100:+.1f}], {p_text}, "
            f"paired bootstrap over {c['problems']} problems): {verdict}.")


def verdict(comparisons: list[dict], arm: str, reference: str) -> str:
    """One plain sentence: does an arm beat its headline reference, and on what."""
    rows = [c for c in comparisons if c["arm"] == arm and c["reference"] == reference]
    if not rows:
        return f"**{arm} vs {reference}:** not both evaluated."
    better = [c["metric"] for c in rows if c["significant"] and c["diff"] > 0]
    worse = [c["metric"] for c in rows if c["significant"] and c["diff"] < 0]
    parts = []
    if better:
        parts.append(f"significantly better on {', '.join(better)}")
    if worse:
        parts.append(f"significantly worse on {', '.join(worse)}")
    if not parts:
        parts.append(f"no significant difference on {', '.join(c['metric'] for c in rows)}")
    beats = "beats" if better and not worse else "does not clearly beat"
    return f"**Does {arm} beat {reference}?** It {beats} it: {'; '.join(parts)}."


def headline_verdicts(comparisons: list[dict]) -> list[str]:
    """A verdict per evaluated arm against its first reference (its headline comparison)."""
    firsts: dict[str, str] = {}
    for c in comparisons:
        firsts.setdefault(c["arm"], c["reference"])
    return [verdict(comparisons, arm, ref) for arm, ref in firsts.items()]


def ci_cell(m: dict | None, percent: bool = True) -> str:
    """`value [low, high]` of a metric with its CI (percent: x100, one decimal); – when absent."""
    if not m or m["value"] is None or (isinstance(m["value"], float) and math.isnan(m["value"])):
        return "–"
    scale, fmt = (100, "{:.1f}") if percent else (1, "{:.2f}")
    value, low, high = (fmt.format(m[key] * scale) for key in ("value", "low", "high"))
    return f"{value} [{low}, {high}]"


def _table(arms: dict[str, dict], columns: list[tuple[str, str, bool]]) -> list[str]:
    lines = ["| arm | " + " | ".join(label for _, label, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for arm, data in arms.items():
        cells = [ci_cell(data["metrics"].get(key), pct) for key, _, pct in columns]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def _data_lines(data: dict) -> list[str]:
    """The training data behind the arms: sampling accuracy, backtrack yield, SFT sizes."""
    lines = []
    sample, bt, sft = data.get("sample"), data.get("backtrack"), data.get("sft")
    if sample:
        lines.append(f"- sampling (train split): {sample.get('problems')} problems, "
                     f"{sample.get('samples')} samples, accuracy {sample.get('accuracy')}")
    if bt:
        lines.append(f"- backtracking: {bt.get('continuations')} continuations of "
                     f"{bt.get('wrong_samples')} wrong samples, {bt.get('final_correct')} "
                     f"became right (wrong->right {bt.get('wrong_to_right')})")
    for arm, stats in ((sft or {}).get("arms") or {}).items():
        lines.append(f"- SFT arm {arm}: {stats.get('examples')} examples over "
                     f"{stats.get('problems')} problems, backtracked share "
                     f"{stats.get('backtracked_share')}")
    return ["## Training data", "", *lines, ""] if lines else []


def render_markdown(results: dict, plots: list[str]) -> str:
    arms = results["arms"]
    ks = max((a["ks"] for a in arms.values()), key=len)
    # accuracy and maj@1 equal pass@1 (the mean over samples), so they are not repeated
    accuracy_cols = ([(f"pass@{k}", f"pass@{k}", True) for k in ks]
                     + [(f"maj@{k}", f"maj@{k}", True) for k in ks if k > 1])
    first = next(iter(arms.values()))
    lines = [
        "# backtrack report", "",
        f"Task `{results['task']}`, base model `{results['model']}`, "
        f"output `{results['output_dir']}`. "
        f"{first['problems']} test problems x {first['samples_per_problem']} samples per arm. "
        "Values in % (tokens and backtracks as counts) with 95 % bootstrap CIs over problems.", "",
        "## Accuracy", "", *_table(arms, accuracy_cols), "",
        "## Self-correction", "",
        "Backtracks are phrase matches (pattern in results.json); Acc@first judges the answer "
        "stated before the first backtrack, Δ(i→c)/Δ(c→i) are the shares of all answers that "
        "went from wrong to right / right to wrong (SCoRe).", "",
        *_table(arms, SELF_CORRECTION), "",
        *_protocol_lines(arms),
        *compute_matched.markdown(results.get("compute_matched")),
        *score_compute.markdown(results.get("score_compute")),
        "## Comparisons", "",
        "Paired bootstrap over problems on the per-problem difference of the metric "
        "(two-sided; significant when the 95 % CI of the mean difference excludes 0).", "",
        *[line for v in headline_verdicts(results["comparisons"]) for line in (v, "")],
        *[comparison_sentence(c) for c in results["comparisons"]], "",
    ]
    if results.get("missing_arms"):
        lines += [f"Arms without evaluation output: {', '.join(results['missing_arms'])}.", ""]
    lines += _data_lines(results.get("data") or {})
    lines += iterations.markdown(results.get("iterations"))
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


PROTOCOL_TABLES = {
    "two_attempt": ("Two attempts (SCoRe)", "Attempt 2 follows attempt 1 (after the phrase or "
                    "the instruction); Δ(t1,t2) = Acc@t2 - Acc@t1; Δ(i→c)/Δ(c→i) are the "
                    "shares of samples that went from wrong to right / right to wrong.",
                    TWO_ATTEMPT),
    "self_verify": ("Self-verification (S²R)", "Verdicts parsed from each trace, each judged "
                    "against the checker on the attempt before it; Δ between the first and "
                    "the last attempt of a trace.", SELF_VERIFY),
}


def _protocol_lines(arms: dict[str, dict]) -> list[str]:
    """A table per protocol with figures of its own, for the evaluations run under it."""
    lines = []
    for protocol, (title, text, columns) in PROTOCOL_TABLES.items():
        rows = {name: data for name, data in arms.items() if data.get("protocol") == protocol}
        if rows:
            lines += [f"## {title}", "", text, "", *_table(rows, columns), ""]
    return lines


def _plot_curves(ax, arms: dict[str, dict], prefix: str) -> None:
    for arm, data in arms.items():
        ks = [k for k in data["ks"] if f"{prefix}@{k}" in data["metrics"]]
        cells = [data["metrics"][f"{prefix}@{k}"] for k in ks]
        ax.plot(ks, [c["value"] * 100 for c in cells], marker="o", label=arm)
        ax.fill_between(ks, [c["low"] * 100 for c in cells], [c["high"] * 100 for c in cells],
                        alpha=0.15)
    ax.set_xscale("log", base=2)
    all_ks = max((d["ks"] for d in arms.values()), key=len)
    ax.set_xticks(all_ks, [str(k) for k in all_ks])
    ax.set_xlabel("k")
    ax.set_ylabel(f"{prefix}@k (%)")
    ax.grid(alpha=0.3)
    ax.legend()


def _plot_histogram(ax, arms: dict[str, dict]) -> None:
    """Share of answers with 0, 1, 2, 3+ backtracks, one bar group per count."""
    buckets = ["0", "1", "2", "3+"]
    width = 0.8 / max(1, len(arms))
    for i, (arm, data) in enumerate(arms.items()):
        hist = {int(k): v for k, v in data["backtrack_histogram"].items()}
        total = max(1, sum(hist.values()))
        shares = [hist.get(0, 0), hist.get(1, 0), hist.get(2, 0),
                  sum(v for k, v in hist.items() if k >= 3)]
        ax.bar(np.arange(4) + i * width, [100 * s / total for s in shares], width, label=arm)
    ax.set_xticks(np.arange(4) + width * (len(arms) - 1) / 2, buckets)
    ax.set_xlabel("backtracks per answer")
    ax.set_ylabel("answers (%)")
    ax.legend()


def write_plots(folder: Path, arms: dict[str, dict], losses: dict,
                matched: dict | None = None) -> list[str]:
    """PNG plots into `folder`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    drawings = [("pass_at_k.png", lambda ax: _plot_curves(ax, arms, "pass")),
                ("maj_at_k.png", lambda ax: _plot_curves(ax, arms, "maj")),
                ("backtracks_hist.png", lambda ax: _plot_histogram(ax, arms))]
    drawings += [(f"{prefix}_vs_tokens.png",
                  lambda ax, p=prefix: compute_matched.plot_vs_tokens(ax, matched, p))
                 for prefix in ("pass", "maj") if matched]
    drawings += protocol_plots(arms)  # e.g. S²R's verdict accuracy
    for name, draw in drawings:
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        names.append(name)
    if losses:
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, (steps, values) in losses.items():
            ax.plot(steps, values, label=arm)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "training_loss.png", dpi=100)
        plt.close(fig)
        names.append("training_loss.png")
    return names


def _no_nan(value):
    """NaN (from metrics.json files of older runs) as null, so results.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def main(config: ReportConfig) -> Path:
    from backtrack.runinfo import write_run_info

    layout = RunLayout.of(config)
    output_dir = layout.output_dir
    arms = _load_arms(output_dir, list(config.arms))
    losses = {arm: load_loss(layout.model(arm) / "loss.json") for arm in config.arms}
    losses = {arm: curve for arm, curve in losses.items() if curve}
    data = {name: read_json(output_dir / path) for name, path in DATA_FILES.items()}
    results = {
        "task": config.task, "model": config.model, "output_dir": str(output_dir),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "arms": {arm: {k: v for k, v in d.items() if k not in ("per_problem", "problem_ids")}
                 for arm, d in arms.items()},
        "missing_arms": [a for a in config.arms if a not in arms],
        "comparisons": compare(arms, list(config.compare_metrics), config.n_boot, config.seed),
        "compute_matched": compute_matched.figures(arms),
        "score_compute": score_compute.figures(layout.evaluation, list(arms), config.n_boot,
                                               config.seed),
        "training_loss": {arm: {"steps": s, "loss": v} for arm, (s, v) in losses.items()},
        "data": {name: d for name, d in data.items() if d is not None},
        "iterations": iterations.summary(output_dir, list(config.arms), config.iterations),
    }
    target = layout.report
    tmp = output_dir / f".report.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plots = write_plots(tmp, results["arms"], losses, results["compute_matched"])
    from backtrack.rl import curves

    rl_plot = curves.plot(tmp, curves.load_logs(layout, list(config.arms)))
    plots += [rl_plot] if rl_plot else []
    (tmp / "results.json").write_text(json.dumps(_no_nan(results), indent=2, default=str) + "\n")
    (tmp / "report.md").write_text(render_markdown(results, plots))
    write_run_info(tmp, config, "report",
                   inputs=[layout.evaluation(arm) / "metrics.json" for arm in arms])
    replace_dir(tmp, target)
    print(f"report: {target / 'report.md'}")
    return target / "report.md"
