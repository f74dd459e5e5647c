"""Phrase strength: the wrong -> right yield of each phrase on the same wrong samples.

The seed claims "Wait, that's definitely wrong..." corrects more answers than "Wait, that's not
right...". The backtrack stage's own records cannot say: a phrase list is spread over traces by a
hash, so each phrase sees other samples. With `backtrack backtrack --compare-phrases '[mild,
strong]'` every wrong sample is continued once with every phrase (`continuations` each, the
same sampling seed), so the yields are paired: each phrase's yield gets a percentile bootstrap
CI over wrong samples, and each phrase's difference from the first a paired bootstrap over the
same samples (`metrics.bootstrap_ci` / `metrics.paired_bootstrap`). Records go to their own
store, `backtrack/phrase_yield/`, keyed by phrase, so the main store (and what build reads from
it) is untouched and the measurement resumes like any stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from backtrack.config import store_values

PHRASE_KEY = ("phrase", "problem_id", "sample_idx", "continuation_idx")
FOLDER = "phrase_yield"


@dataclass
class PhraseYieldWork:
    """The phrases to compare, their store, and the chains still to run per phrase."""

    phrases: list[str] = field(default_factory=list)
    store: object = None
    chunks: list[tuple[str, list]] = field(default_factory=list)  # (phrase, chains)

    @property
    def pending(self) -> bool:
        return bool(self.chunks)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def phrase_yield_fingerprint(config, samples_fingerprint) -> dict:
    """The main store's fingerprint minus what only the main records depend on."""
    values = {k: v for k, v in store_values(config).items() if k not in ("phrase", "rounds")}
    return {"stage": "backtrack-phrase-yield", **values, "samples": samples_fingerprint}


def phrase_yield_work(config, samples_fingerprint, wrong: list[dict]) -> PhraseYieldWork:
    """Open the phrase-yield store and list the chains not yet on disk (none when the option
    is off)."""
    from backtrack.backtracking import Chain, resolve_phrases
    from backtrack.layout import RunLayout
    from backtrack.store import RecordStore

    if not config.compare_phrases:
        return PhraseYieldWork()
    phrases = resolve_phrases(config.compare_phrases)
    store = RecordStore(RunLayout.of(config).backtrack / FOLDER,
                        phrase_yield_fingerprint(config, samples_fingerprint),
                        shard=config.shard, key_fields=PHRASE_KEY)
    done = store.done_keys()
    chunks = []
    for phrase in phrases:
        for i in range(0, len(wrong), config.batch_size):
            chains = [Chain.start(r, j) for r in wrong[i:i + config.batch_size]
                      for j in range(config.continuations)]
            chains = [c for c in chains if (phrase.lstrip("\n"), *c.key()) not in done]
            if chains:
                chunks.append((phrase, chains))
    return PhraseYieldWork(phrases, store, chunks)


def run_phrase_yield(engine, task, work: PhraseYieldWork, config, params, stats) -> dict | None:
    """Run the missing continuations (one round each) and summarise every phrase's yield."""
    from backtrack.backtracking import backtrack_round
    from backtrack.generation import progress_bar

    if not work.phrases:
        return None
    total = sum(len(chains) for _, chains in work.chunks)
    with progress_bar(total, "phrase yield", config.progress) as bar:
        for phrase, chains in work.chunks:
            backtrack_round(engine, task, chains, [phrase], 1, params, stats)
            work.store.append([c.record() for c in chains])
            bar.update(len(chains))
    return phrase_yield_summary(work.store.records(), work.phrases, seed=config.seed)


def phrase_yield_summary(records: list[dict], phrases: list[str], n_boot: int = 1000,
                         seed: int = 0) -> dict:
    """Per phrase: continuations, right, yield with a 95 % CI over wrong samples, and (after the
    first) the paired difference from the first phrase. Only samples continued with every
    phrase count, so all phrases are measured on the same samples."""
    import numpy as np

    from backtrack.metrics import bootstrap_ci, paired_bootstrap

    texts = [p.lstrip("\n") for p in phrases]
    counts: dict[tuple, dict[str, list[int]]] = {}
    for r in records:
        if r["phrase"] in texts:
            tally = counts.setdefault((r["problem_id"], r["sample_idx"]), {}).setdefault(
                r["phrase"], [0, 0])  # [right, continuations]
            tally[0] += bool(r["chain"][1]["correct"])
            tally[1] += 1
    samples = sorted((k for k, v in counts.items() if len(v) == len(texts)),
                     key=lambda k: (str(k[0]), k[1]))
    rows, first_rate = [], None
    for phrase in texts:
        num = np.array([counts[k][phrase][0] for k in samples], dtype=float)
        den = np.array([counts[k][phrase][1] for k in samples], dtype=float)
        point, low, high = bootstrap_ci(num, den, n_boot=n_boot, seed=seed)
        row = {"phrase": phrase, "continuations": int(den.sum()), "right": int(num.sum()),
               "wrong_to_right": point, "low": low, "high": high}
        rate = num / np.maximum(den, 1)
        if first_rate is None:
            first_rate = rate
        else:
            row["vs_first"] = paired_bootstrap(rate, first_rate, n_boot=n_boot, seed=seed)
        rows.append(row)
    return {"samples": len(samples), "baseline": texts[0], "phrases": rows}
