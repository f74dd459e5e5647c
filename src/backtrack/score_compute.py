"""SCoRe's inference-compute comparison: self-correction against parallel sampling at equal
samples (Kumar et al. 2024, Fig. 1 right and Sec. 6).

SCoRe asks whether, for a budget of K samples per problem, it is better to sample K in
parallel and take the majority vote (self-consistency, maj@K) or to sample K/2 first attempts
and self-correct each once, then vote ("instead of sampling 2K solutions in parallel, it is
more compute-efficient to sample K solutions in parallel, then perform one round of
self-correction on each"; at 32 samples, +7.4 % over one sample for parallel, +10.5 % for
self-correction). For an arm evaluated under both the `single` and the `two_attempt` protocol:

- parallel: maj@K of its single-protocol samples;
- pairs: the majority vote over the K answers of K/2 (attempt 1, attempt 2) pairs of its
  two-attempt records (each pair is one self-corrected sample; both attempts vote);
- attempt 2 only: the vote over the K/2 attempt-2 answers alone (the paper does not say
  whether first attempts vote; this is the other reading, and maj@(K/2) of the two-attempt
  evaluation);

each the mean over subsets of the problem's samples or pairs (exact up to `max_subsets`, as
maj@k in `metrics`), votes and ties as there, with a 95 % bootstrap CI over problems and the
paired difference pairs - parallel. Tokens per problem are given too, since a second attempt
is not free of cost: K x tokens per single sample against K/2 x tokens per pair.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backtrack.metrics import (bootstrap_ci, group_by_problem, k_subsets, maj_at_k,
                               paired_bootstrap, vote_ids)


def _answer(value) -> str | None:
    from backtrack.checking import normalize_answer

    return None if value is None else normalize_answer(str(value))


def pairs_majority(pairs: list[dict], k: int, max_subsets: int = 1000, seed: int = 0) -> float:
    """Mean majority-vote accuracy over (k/2)-subsets of one problem's two-attempt records,
    every chosen pair casting two votes (its attempt-1 and its attempt-2 answer)."""
    half = k // 2
    answers = ([_answer(r["attempt1_extracted"]) for r in pairs]
               + [_answer(r["extracted"]) for r in pairs])
    correct = [bool(r["attempt1_correct"]) for r in pairs] + [bool(r["correct"]) for r in pairs]
    ids, id_correct = vote_ids(answers, correct)
    chosen = k_subsets(len(pairs), half, max_subsets, np.random.default_rng(seed))
    votes = np.concatenate([ids[chosen], ids[chosen + len(pairs)]], axis=1)  # (S, k)
    counts = np.zeros((votes.shape[0], len(id_correct)), dtype=np.int64)
    np.add.at(counts, (np.arange(votes.shape[0])[:, None], votes), 1)
    return float(id_correct[np.argmax(counts, axis=1)].mean())


def _mean_tokens(group: list[dict]) -> float:
    return float(np.mean([int(r.get("new_tokens") or 0) for r in group]))


def compare_records(two_attempt: list[dict], single: list[dict], n_boot: int = 1000,
                    max_subsets: int = 1000, seed: int = 0) -> dict | None:
    """The comparison at every even K (powers of two) both evaluations have samples for,
    over the problems both hold; None when there is no such K."""
    pairs, singles = group_by_problem(two_attempt), group_by_problem(single)
    common = sorted(set(pairs) & set(singles))
    if not common:
        return None
    n_pairs = min(len(pairs[p]) for p in common)
    n_single = min(len(singles[p]) for p in common)
    ks = [2 ** e for e in range(1, 16) if 2 ** e <= min(2 * n_pairs, n_single)]
    rows = []
    for k in ks:
        per = {"parallel": [], "pairs": [], "attempt2_only": []}
        for p in common:
            group = singles[p]
            per["parallel"].append(maj_at_k([_answer(r["extracted"]) for r in group],
                                            [bool(r["correct"]) for r in group], k,
                                            max_subsets, seed))
            per["pairs"].append(pairs_majority(pairs[p], k, max_subsets, seed))
            per["attempt2_only"].append(maj_at_k([_answer(r["extracted"]) for r in pairs[p]],
                                                 [bool(r["correct"]) for r in pairs[p]],
                                                 k // 2, max_subsets, seed))
        row = {"k": k}
        for name, values in per.items():
            value, low, high = bootstrap_ci(np.array(values), np.ones(len(values)), n_boot, seed)
            row[name] = {"value": value, "low": low, "high": high}
        row["pairs_minus_parallel"] = paired_bootstrap(np.array(per["pairs"]),
                                                       np.array(per["parallel"]), n_boot, seed)
        row["tokens_parallel"] = k * float(np.mean([_mean_tokens(singles[p]) for p in common]))
        row["tokens_pairs"] = k // 2 * float(np.mean([_mean_tokens(pairs[p]) for p in common]))
        rows.append(row)
    return {"problems": len(common), "pairs_per_problem": n_pairs,
            "singles_per_problem": n_single, "rows": rows} if rows else None


def figures(eval_folder, names: list[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """{two-attempt evaluation: comparison} for every arm of `names` evaluated under both
    protocols (records read from `eval_folder(name)`, a function giving the store folder)."""
    from backtrack.arms import parse_evaluation
    from backtrack.store import META_FILE, RecordStore

    parsed = {name: parse_evaluation(name) for name in names}
    out = {}
    for name, evaluation in parsed.items():
        single = next((other for other, e in parsed.items()
                       if e.arm.name == evaluation.arm.name and e.protocol == "single"), None)
        folders = [Path(eval_folder(name)), Path(eval_folder(single))] if single else []
        if evaluation.protocol != "two_attempt" or not all(
                (f / META_FILE).is_file() for f in folders):
            continue
        found = compare_records(RecordStore.read(folders[0]).records(),
                                RecordStore.read(folders[1]).records(), n_boot, seed=seed)
        if found:
            out[name] = {"single": single, **found}
    return out


def markdown(found: dict | None) -> list[str]:
    """The report section: one row per (arm, K)."""
    from backtrack.report import ci_cell as _cell  # report imports this module

    if not found:
        return []
    lines = ["## Self-correction against parallel sampling at equal samples (SCoRe)", "",
             "At K samples per problem: maj@K of K single attempts (parallel) against the vote "
             "over the K answers of K/2 (attempt 1, attempt 2) pairs (pairs), and over their "
             "K/2 attempt-2 answers alone. Δ = pairs - parallel with a paired bootstrap over "
             "problems; tokens are generated tokens per problem.", "",
             "| two-attempt arm | single arm | K | parallel | pairs | attempt 2 only | Δ pairs - "
             "parallel | tokens parallel / pairs |", "|---|---|---|---|---|---|---|---|"]
    for name, comparison in found.items():
        for row in comparison["rows"]:
            d = row["pairs_minus_parallel"]
            delta = (f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
                     + (" *" if d["significant"] else ""))
            lines.append(f"| {name} | {comparison['single']} | {row['k']} | "
                         f"{_cell(row['parallel'])} | {_cell(row['pairs'])} | "
                         f"{_cell(row['attempt2_only'])} | {delta} | "
                         f"{row['tokens_parallel']:.0f} / {row['tokens_pairs']:.0f} |")
    return lines + ["", "\\* the 95 % CI of Δ excludes 0.", ""]
