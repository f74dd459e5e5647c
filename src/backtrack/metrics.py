"""Evaluation metrics: pass@k, maj@k, bootstrap CIs and self-correction statistics.

Pure numpy (plus `re`), so the report can recompute figures without torch. Everything is
computed per problem and then averaged over problems, so confidence intervals come from a
bootstrap over problems (the unit that was sampled), never over correlated samples.

Conventions (documented because results depend on them):
- A sample with no extracted answer (`None`) is wrong. In a majority vote it is a vote for the
  "no answer" bucket, which counts as wrong if it wins.
- Vote ties are broken deterministically and independently of sample order: the tied answer
  with the smallest canonical string wins, and "no answer" sorts after every real answer.
- A backtrack is a run of phrase matches inside one sentence: "Wait, that's not right..." is
  one backtrack, "Wait, that's not right... Hmm, let me check that again." is two.
- The first answer of a trace is the answer stated in the text before its first backtrack
  (the last number of that text when no answer marker is present); without a backtrack, the
  first answer is the final answer. Under the two_attempt protocol it is attempt 1, checked
  when it was generated (`attempt1_correct`), so acc_first / acc_final / delta_* are SCoRe's
  Acc@t1 / Acc@t2 / Δi→c / Δc→i, and delta_t1_t2 = Acc@t2 - Acc@t1.
"""

from __future__ import annotations

import math
import re
from itertools import combinations
from typing import Callable, Iterable, Sequence

import numpy as np

DEFAULT_BACKTRACK_PATTERN = (
    r"\bwait\b|\bhmm+\b|\bthat(?:'s| is) (?:not right|wrong|incorrect|not correct)"
    r"|\bthis is (?:not right|wrong|incorrect)|\blet me (?:re-?)?(?:check|verify|think|"
    r"recalculate|reconsider|redo)\b|\bi made an? (?:mistake|error)\b|\bon second thought\b"
    r"|\bactually,? no\b|\bdefinitely wrong\b"
)
SENTENCE_END = re.compile(r"[.!?\n]")
THINK_TAGS = re.compile(r"</?think>")


def power_of_two_ks(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n, plus n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if n >= 1 and ks[-1] != n:
        ks.append(n)
    return ks


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021 from n samples with c correct.

    1 - C(n-c, k) / C(n, k), in the product form 1 - prod_{i=n-c+1}^{n} (1 - k/i), which
    avoids huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def vote_ids(answers: Sequence[str | None], correct: Sequence[bool]):
    """Map answers to ids ordered by tie-break priority; return ids and per-id correctness."""
    keys = sorted({a for a in answers if a is not None})
    has_none = any(a is None for a in answers)
    index = {a: i for i, a in enumerate(keys)}
    none_id = len(keys)
    ids = np.array([none_id if a is None else index[a] for a in answers], dtype=np.int64)
    id_correct = np.zeros(len(keys) + int(has_none), dtype=bool)
    for answer_id, ok in zip(ids, correct):
        if answer_id != none_id:
            id_correct[answer_id] |= bool(ok)
    return ids, id_correct


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the majority vote over these samples is right (conventions in the module doc)."""
    ids, id_correct = vote_ids(answers, correct)
    counts = np.bincount(ids, minlength=len(id_correct))
    return bool(id_correct[int(np.argmax(counts))])  # argmax: first (smallest id) of ties


def k_subsets(n: int, k: int, max_subsets: int, rng: np.random.Generator) -> np.ndarray:
    """All k-subsets of range(n) when there are at most `max_subsets`, else a random sample."""
    if math.comb(n, k) <= max_subsets:
        return np.array(list(combinations(range(n), k)), dtype=np.int64).reshape(-1, k)
    return np.argsort(rng.random((max_subsets, n)), axis=1)[:, :k]


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool], k: int,
             max_subsets: int = 1000, seed: int = 0) -> float:
    """Mean majority-vote accuracy over k-subsets of the n samples of one problem.

    Exact (every subset) when C(n, k) <= max_subsets, otherwise `max_subsets` random subsets
    drawn with `seed`.
    """
    n = len(answers)
    if not 1 <= k <= n:
        raise ValueError(f"maj_at_k needs 1 <= k <= n, got n={n} k={k}")
    ids, id_correct = vote_ids(answers, correct)
    chosen = ids[k_subsets(n, k, max_subsets, np.random.default_rng(seed))]  # (S, k)
    counts = np.zeros((chosen.shape[0], len(id_correct)), dtype=np.int64)
    np.add.at(counts, (np.arange(chosen.shape[0])[:, None], chosen), 1)
    return float(id_correct[np.argmax(counts, axis=1)].mean())


def bootstrap_ci(num: np.ndarray, den: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Ratio sum(num)/sum(den) over problems with a percentile bootstrap CI over problems.

    A per-problem mean is the case den = 1; a pooled rate (e.g. accuracy of the answers that
    backtracked) uses per-problem counts. Resamples with an empty denominator are dropped.
    """
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if den.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    point = float(num.sum() / den.sum())
    idx = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))
    boot_den = den[idx].sum(axis=1)
    keep = boot_den > 0
    stats = num[idx].sum(axis=1)[keep] / boot_den[keep]
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return point, float(low), float(high)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Paired bootstrap over problems on the per-problem difference a - b.

    Returns the mean difference, its percentile CI and a two-sided bootstrap p-value
    (twice the smaller tail share of resampled means on either side of zero).
    """
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(diff) == 0:
        return {"diff": None, "low": None, "high": None, "p_value": None,
                "significant": False, "problems": 0}
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(n_boot, len(diff)))
    means = diff[idx].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    p_value = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))
    return {"diff": float(diff.mean()), "low": float(low), "high": float(high),
            "p_value": float(p_value), "significant": bool(low > 0 or high < 0),
            "problems": int(len(diff))}


def backtrack_spans(text: str, pattern: str = DEFAULT_BACKTRACK_PATTERN) -> list[tuple[int, int]]:
    """Character spans of backtracks: phrase matches merged while in the same sentence."""
    spans: list[list[int]] = []
    for match in re.finditer(pattern, text, flags=re.IGNORECASE):
        if spans and not SENTENCE_END.search(text, spans[-1][1], match.start()):
            spans[-1][1] = match.end()
        else:
            spans.append([match.start(), match.end()])
    return [(s, e) for s, e in spans]


def count_backtracks(text: str, pattern: str = DEFAULT_BACKTRACK_PATTERN) -> int:
    return len(backtrack_spans(text, pattern))


def first_attempt_text(text: str, pattern: str = DEFAULT_BACKTRACK_PATTERN) -> str | None:
    """The text before the first backtrack with think tags removed, or None if none.

    The tags are removed so an answer stated (or only computed) inside the reasoning before
    the backtrack counts as the first answer rather than as an unclosed-think non-answer.
    """
    spans = backtrack_spans(text, pattern)
    if not spans:
        return None
    return THINK_TAGS.sub("\n", text[: spans[0][0]])


def group_by_problem(records: Iterable[dict]) -> dict[str, list[dict]]:
    """Records grouped by problem id, each group sorted by sample index."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(str(record["problem_id"]), []).append(record)
    return {pid: sorted(rs, key=lambda r: r.get("sample_idx", 0)) for pid, rs in groups.items()}


def _self_correction(group: list[dict], pattern: str, check_first: Callable | None):
    """Per-sample backtrack counts and first-answer correctness for one problem."""
    counts, first_ok = [], []
    for record in group:
        text = record.get("completion") or ""
        counts.append(count_backtracks(text, pattern))
        if "attempt1_correct" in record:  # two_attempt protocol: attempt 1 was checked
            first_ok.append(bool(record["attempt1_correct"]))
            continue
        first = first_attempt_text(text, pattern)
        if first is None or check_first is None:
            first_ok.append(bool(record["correct"]))
        else:
            first_ok.append(bool(check_first(first, record.get("answer"))))
    return np.array(counts), np.array(first_ok, dtype=bool)


def problem_metrics(groups: dict[str, list[dict]], ks: Sequence[int],
                    pattern: str = DEFAULT_BACKTRACK_PATTERN,
                    normalize: Callable[[str], str | None] | None = None,
                    check_first: Callable[[str, str], bool] | None = None,
                    max_subsets: int = 1000, seed: int = 0) -> dict:
    """Per-problem numerators and denominators of every metric, plus the backtrack histogram.

    `normalize` maps an extracted answer to its canonical form for voting (identity if None);
    `check_first(text, gold)` judges the first attempt of a trace that backtracked.
    """
    ids = sorted(groups)
    rows: dict[str, list[tuple[float, float]]] = {}
    hist: dict[int, int] = {}

    def add(name: str, num: float, den: float) -> None:
        rows.setdefault(name, []).append((float(num), float(den)))

    for pid in ids:
        group = groups[pid]
        n = len(group)
        correct = np.array([bool(r["correct"]) for r in group])
        answers = [None if r.get("extracted") is None else
                   (normalize(r["extracted"]) if normalize else str(r["extracted"]))
                   for r in group]
        add("accuracy", correct.sum(), n)
        for k in ks:
            add(f"pass@{k}", pass_at_k(n, int(correct.sum()), min(k, n)), 1)
        for k in ks:
            add(f"maj@{k}", maj_at_k(answers, correct, min(k, n), max_subsets, seed), 1)
        counts, first_ok = _self_correction(group, pattern, check_first)
        for c in counts:
            hist[int(c)] = hist.get(int(c), 0) + 1
        backtracked = counts >= 1
        add("backtracks_per_answer", counts.sum(), n)
        add("share_backtracked", backtracked.sum(), n)
        add("share_backtracked_2plus", (counts >= 2).sum(), n)
        add("accuracy_backtracked", (correct & backtracked).sum(), backtracked.sum())
        add("acc_first", first_ok.sum(), n)
        add("acc_final", correct.sum(), n)
        add("delta_i2c", (~first_ok & correct).sum(), n)
        add("delta_c2i", (first_ok & ~correct).sum(), n)
        add("delta_t1_t2", correct.sum() - first_ok.sum(), n)
        add("no_answer_share", sum(a is None for a in answers), n)
        add("truncated_share", sum(r.get("finish_reason") == "length" for r in group), n)
        add("mean_new_tokens", sum(int(r.get("new_tokens") or 0) for r in group), n)
    arrays = {name: (np.array([v[0] for v in vals]), np.array([v[1] for v in vals]))
              for name, vals in rows.items()}
    return {"problems": ids, "arrays": arrays, "histogram": dict(sorted(hist.items()))}


def with_cis(arrays: dict, n_boot: int, seed: int) -> tuple[dict, dict]:
    """(metric -> {value, low, high}, metric -> per-problem values) from per-problem
    (numerator, denominator) arrays; undefined figures (no denominator) are None (JSON null)."""
    metrics, per_problem = {}, {}
    for name, (num, den) in arrays.items():
        point, low, high = bootstrap_ci(num, den, n_boot=n_boot, seed=seed)
        metrics[name] = {k: None if math.isnan(v) else v
                         for k, v in (("value", point), ("low", low), ("high", high))}
        per_problem[name] = [None if d == 0 else float(x / d) for x, d in zip(num, den)]
    return metrics, per_problem


def summarize(records: Iterable[dict], ks: Sequence[int] | None = None,
              pattern: str = DEFAULT_BACKTRACK_PATTERN,
              normalize: Callable[[str], str | None] | None = None,
              check_first: Callable[[str, str], bool] | None = None,
              n_boot: int = 1000, max_subsets: int = 1000, seed: int = 0) -> dict:
    """Every metric of one arm with 95 % bootstrap CIs, as a JSON-ready dict.

    `per_problem` holds each metric's per-problem value (None where undefined), which the
    report uses for paired comparisons between arms.
    """
    groups = group_by_problem(records)
    if not groups:
        raise ValueError("no records to summarise")
    n_min = min(len(g) for g in groups.values())
    ks = list(ks) if ks else power_of_two_ks(n_min)
    table = problem_metrics(groups, ks, pattern, normalize, check_first, max_subsets, seed)
    metrics, per_problem = with_cis(table["arrays"], n_boot, seed)
    total = sum(len(g) for g in groups.values())
    return {"problems": len(groups), "samples": total, "samples_per_problem": n_min,
            "ks": ks, "metrics": metrics, "backtrack_histogram": table["histogram"],
            "backtrack_pattern": pattern, "problem_ids": table["problems"],
            "per_problem": per_problem}
