"""`backtrack backtrack`: send each wrong sample back with a phrase in place of `</think>`.

Step 2 of the method. A wrong trace is cut where the model ended its reasoning (at the last
`</think>`; with no tag, just before the final answer; if generation was truncated, after the
last complete line), a phrase such as "Wait, that's not right..." is appended, and the model
continues from exactly that text. The continuation is checked; a still-wrong one can be cut and
sent back again, up to `rounds` times. Each record keeps the whole chain of rounds.

Two options add work without touching the wrong traces' records or the store's fingerprint:
- `confirm`: some right first attempts go through the same phrase once too ("confirm traces",
  `kind: confirm` in the same store): SCoRe's point that a model trained only on wrong -> right
  learns to drop right answers; the `rft_bt_confirm` arm trains on those that keep their answer;
- `compare_phrases`: every wrong sample is continued once with each phrase, in a store of its
  own (`backtrack/phrase_yield/`), for the wrong -> right yield per phrase (phrase_yield.py).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from backtrack.config import option, store_values
from backtrack.engines import GenerationParams, derive_seed
from backtrack.errors import UserError
from backtrack.formats import PHRASE_PRESETS as PRESETS
from backtrack.formats import cut_point, insertion
from backtrack.generation import GenerationConfig, timed_generate
from backtrack.layout import RunLayout

BACKTRACK_KEY = ("problem_id", "sample_idx", "continuation_idx")
_PRESET_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass
class BacktrackConfig(GenerationConfig):
    """Cut wrong samples, append a phrase, continue, and check the continuation."""

    phrase: list = option(["mild"], "Phrase preset (mild, strong) or custom text; a list is "
                          "spread over traces by a stable hash. A lowercase word names a preset.")
    rounds: int = option(1, "Times a still-wrong continuation is cut and sent back (R).")
    continuations: int = option(1, "Continuations per wrong sample (m).", in_store=False)
    confirm: int = option(
        0, "Confirm traces: this many right first attempts (the same ones on every shard, by a "
        "stable hash) are also cut, sent through the phrase and continued once (`continuations` "
        "each), recorded with `kind: confirm`; rft_bt_confirm trains on those that keep their "
        "answer. 0 = none.", in_store=False)
    compare_phrases: list = option(
        [], "Phrase strength: every wrong sample is also continued once with each of these "
        "phrases (presets or text), stored in backtrack/phrase_yield/; summary.json gets each "
        "phrase's wrong->right yield on the same samples with a 95 % CI and its paired "
        "difference from the first phrase (bootstrap over samples).", in_store=False)
    shard: str = option("0/1", "i/N: this process handles shard i of N of the problems.",
                        in_store=False)

    def validate(self) -> None:
        from backtrack.store import parse_shard

        parse_shard(self.shard)
        resolve_phrases(self.phrase)
        if self.compare_phrases:
            resolve_phrases(self.compare_phrases)
        if self.rounds < 1 or self.continuations < 1 or self.batch_size < 1:
            raise UserError("options 'rounds', 'continuations' and 'batch_size' must be >= 1")
        if self.confirm < 0:
            raise UserError("option 'confirm': must be 0 (none) or more")
        self.generation_params(self.continuations).validate()


def outputs(config: BacktrackConfig) -> list[Path]:
    return [RunLayout.of(config).backtrack]


# ------------------------------------------------------------------ cutting and phrases


def resolve_phrases(spec: list | str) -> list[str]:
    """Preset names replaced by their text; custom phrases kept as written."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise UserError("option 'phrase': give a preset (mild, strong) or a phrase")
    phrases = []
    for item in items:
        item = str(item)
        if _PRESET_NAME.match(item):
            if item not in PRESETS:
                raise UserError(f"option 'phrase': unknown preset '{item}' (presets: "
                                f"{', '.join(PRESETS)}; custom phrases are any other text)")
            item = PRESETS[item]
        if not item.strip():
            raise UserError("option 'phrase': a phrase must not be empty")
        phrases.append(item)
    return phrases


def choose_phrase(phrases: list[str], problem_id: str, sample_idx: int,
                  continuation_idx: int, round_: int) -> str:
    """A phrase per (trace, round), fixed across runs and shards."""
    if len(phrases) == 1:
        return phrases[0]
    return phrases[derive_seed(0, problem_id, sample_idx, continuation_idx, round_) % len(phrases)]


# ------------------------------------------------------------------ chains


@dataclass
class Chain:
    """One sample being sent back: a wrong one round after round until right, or a right one
    (`kind="confirm"`) once."""

    source: dict  # the sample record
    continuation_idx: int
    steps: list[dict]
    text: str  # the whole assistant text so far
    finish_reason: str
    kind: str = "wrong"  # "wrong" | "confirm"

    @classmethod
    def start(cls, record: dict, continuation_idx: int, kind: str = "wrong") -> Chain:
        first = {"round": 0, "prefix": "", "phrase": "", "completion": record["completion"],
                 "extracted": record["extracted"], "correct": record["correct"],
                 "new_tokens": record["new_tokens"], "finish_reason": record["finish_reason"]}
        return cls(record, continuation_idx, [first], record["completion"],
                   record["finish_reason"], kind)

    def wants_round(self, round_: int) -> bool:
        if self.kind == "confirm":
            return round_ == 1
        return not self.steps[-1]["correct"]

    def key(self) -> tuple:
        return (self.source["problem_id"], self.source["sample_idx"], self.continuation_idx)

    def record(self) -> dict:
        steps = self.steps
        record = {"problem_id": self.source["problem_id"], "sample_idx": self.source["sample_idx"],
                  "continuation_idx": self.continuation_idx, "round": len(steps) - 1,
                  "prompt": self.source["prompt"], "phrase": steps[1]["phrase"].lstrip("\n"),
                  "answer": self.source["answer"], "chain": steps,
                  "final_correct": bool(steps[-1]["correct"]), "completion": self.text}
        if self.kind != "wrong":  # wrong traces keep the record shape they always had
            record["kind"] = self.kind
        return record


def backtrack_round(engine, task, chains: list[Chain], phrases: list[str], round_: int,
                    params: GenerationParams, stats) -> None:
    """Cut every still-wrong chain, append its phrase, continue and check (in place).

    Identical continuation prompts (e.g. the m continuations of one trace) go to the engine as
    one prompt with n samples, so they share its prefill.
    """
    requests: dict[str, list] = {}
    for chain in chains:
        prefix = chain.text[:cut_point(chain.text, chain.finish_reason)]
        phrase = choose_phrase(phrases, *chain.key(), round_)
        inserted = insertion(prefix, phrase)
        # The sample's own prompt + its text: render_continuation semantics without re-rendering.
        prompt = chain.source["prompt"] + prefix + inserted
        requests.setdefault(prompt, []).append((chain, prefix, inserted))
    by_count: dict[int, list[str]] = {}
    for prompt, members in requests.items():
        by_count.setdefault(len(members), []).append(prompt)
    seed = derive_seed(params.seed, "backtrack", round_)
    for n, prompts in sorted(by_count.items()):
        outputs = timed_generate(engine, prompts, dataclasses.replace(params, n=n, seed=seed),
                                 stats)
        for prompt, completions in zip(prompts, outputs):
            for (chain, prefix, inserted), completion in zip(requests[prompt], completions):
                text = prefix + inserted + completion.text
                check = task.check(text, chain.source["answer"])
                chain.steps.append({
                    "round": round_, "prefix": prefix, "phrase": inserted,
                    "completion": completion.text, "extracted": check.extracted,
                    "correct": bool(check.correct), "new_tokens": completion.new_tokens,
                    "finish_reason": completion.finish_reason})
                chain.text, chain.finish_reason = text, completion.finish_reason
                stats.new_tokens += completion.new_tokens


def run_chains(engine, task, chains: list[Chain], phrases: list[str], rounds: int,
               params: GenerationParams, stats) -> None:
    for round_ in range(1, rounds + 1):
        active = [c for c in chains if c.wants_round(round_)]
        if not active:
            break
        backtrack_round(engine, task, active, phrases, round_, params, stats)


# ------------------------------------------------------------------ stage



def confirm_samples(records: list[dict], count: int) -> list[dict]:
    """`count` right first attempts, first in a stable hash order: the same ones on every
    shard and run, and raising `count` only adds to them."""
    right = [r for r in records if r.get("round", 0) == 0 and r["correct"]]
    right.sort(key=lambda r: (derive_seed(0, "confirm", r["problem_id"], r["sample_idx"]),
                              str(r["problem_id"]), r["sample_idx"]))
    return right[:count]


def confirms(record: dict) -> bool:
    """Whether a confirm trace kept its answer: the continuation checked right and its final
    answer is the first attempt's."""
    from backtrack.checking import normalize_answer

    chain = record["chain"]
    if len(chain) < 2 or chain[1].get("correct") is not True:
        return False
    first = normalize_answer(chain[0].get("extracted"))
    return first is not None and first == normalize_answer(chain[1].get("extracted"))


def backtrack_fingerprint(config: BacktrackConfig, samples_fingerprint) -> dict:
    """What shapes a record, and the samples it continues."""
    return {"stage": "backtrack", **store_values(config),
            "phrase": resolve_phrases(config.phrase), "samples": samples_fingerprint}


def summarize_backtrack(records: list[dict], wrong_samples: int) -> dict:
    """Wrong samples, continuations and the wrong->right rate of each round (wrong traces
    only); confirm traces, when there are any, in `confirm`."""
    confirm = [r for r in records if r.get("kind") == "confirm"]
    records = [r for r in records if r.get("kind", "wrong") == "wrong"]
    per_round = []
    max_round = max((r["round"] for r in records), default=0)
    for round_ in range(1, max_round + 1):
        tried = [r for r in records if r["round"] >= round_]
        right = sum(bool(r["chain"][round_]["correct"]) for r in tried)
        per_round.append({"round": round_, "continuations": len(tried), "right": right,
                          "wrong_to_right": round(right / len(tried), 4) if tried else 0.0})
    final = sum(r["final_correct"] for r in records)
    summary = {"wrong_samples": wrong_samples,
               "traces_sent_back": len({(r["problem_id"], r["sample_idx"]) for r in records}),
               "continuations": len(records), "final_correct": final,
               "wrong_to_right": round(final / len(records), 4) if records else 0.0,
               "rounds": per_round}
    if confirm:
        kept = sum(confirms(r) for r in confirm)
        summary["confirm"] = {
            "continuations": len(confirm), "confirmed": kept,
            "confirm_rate": round(kept / len(confirm), 4),
            "right_to_wrong": round(sum(not r["final_correct"] for r in confirm) / len(confirm),
                                    4)}
    return summary


def make_chunks(sources: list[tuple[dict, str]], config: BacktrackConfig, done: set) -> list:
    """Chains still to run, in fixed slices of the sources (so a resumed chunk is the same
    batch): each (sample, kind) gives `continuations` chains."""
    chunks = []
    for i in range(0, len(sources), config.batch_size):
        chunk = [chain for record, kind in sources[i:i + config.batch_size]
                 for chain in (Chain.start(record, j, kind) for j in range(config.continuations))
                 if chain.key() not in done]
        if chunk:
            chunks.append(chunk)
    return chunks


def run_chunks(engine, task, chunks: list, store, phrases: list[str], rounds: int, params,
               stats, progress: bool, desc: str = "backtrack") -> None:
    from backtrack.generation import progress_bar

    with progress_bar(sum(map(len, chunks)), desc, progress) as bar:
        for chunk in chunks:
            run_chains(engine, task, chunk, phrases, rounds, params, stats)
            store.append([c.record() for c in chunk])
            stats.samples += len(chunk)
            stats.correct += sum(c.steps[-1]["correct"] for c in chunk)
            bar.update(len(chunk))
            bar.set_postfix(stats.postfix(), refresh=False)


def main(config: BacktrackConfig) -> dict:
    from backtrack.fileio import write_json
    from backtrack.generation import RunStats, open_engine
    from backtrack.models import resolve_model_path
    from backtrack.phrase_yield import phrase_yield_work, run_phrase_yield
    from backtrack.runinfo import write_run_info
    from backtrack.store import RecordStore, parse_shard, shard_of
    from backtrack.tasks import get_task

    layout = RunLayout.of(config)
    samples_dir, out_dir = layout.samples, layout.backtrack
    samples = RecordStore.read(samples_dir)
    index, count = parse_shard(config.shard)
    all_records = samples.records()
    all_wrong = [r for r in all_records if r.get("round", 0) == 0 and not r["correct"]]
    mine = [(r, kind) for rs, kind in ((all_wrong, "wrong"),
                                       (confirm_samples(all_records, config.confirm), "confirm"))
            for r in rs if shard_of(r["problem_id"], count) == index]
    task = get_task(config.task, config.task_args)
    model_path = resolve_model_path(config.model, config.output_dir)
    store = RecordStore(out_dir, backtrack_fingerprint(config, samples.fingerprint),
                        shard=config.shard, key_fields=BACKTRACK_KEY)
    write_run_info(out_dir, config, "backtrack", inputs=[samples_dir],
                   extra={"model_path": model_path})
    chunks = make_chunks(mine, config, store.done_keys())
    wrong = [r for r, kind in mine if kind == "wrong"]
    yield_work = phrase_yield_work(config, samples.fingerprint, wrong)
    params, stats = config.generation_params(1), RunStats()
    engine = open_engine(config, model_path) if chunks or yield_work.pending else None
    try:
        run_chunks(engine, task, chunks, store, resolve_phrases(config.phrase), config.rounds,
                   params, stats, config.progress)
        phrase_yield = run_phrase_yield(engine, task, yield_work, config, params, stats)
        stats.stop()
    finally:
        if engine is not None:
            engine.close()
        store.close()
        yield_work.close()
    summary = {**summarize_backtrack(store.records(), len(all_wrong)), "this_run": stats.as_dict()}
    if phrase_yield is not None:
        summary["phrase_yield"] = phrase_yield
    write_json(out_dir / "summary.json", summary)
    rates = ", ".join(f"round {r['round']}: {r['wrong_to_right']:.3f}" for r in summary["rounds"])
    print(f"backtrack: {summary['wrong_samples']} wrong samples, {summary['continuations']} "
          f"continuations, wrong->right {summary['wrong_to_right']:.3f} ({rates or 'none'}) "
          f"-> {out_dir}")
    return summary
