"""`backtrack verify`: a verification of each of the model's sample attempts (S²R's data).

S²R's SFT trajectories hold, after each attempt, a check that ends in a verdict
(`methods/s2r_data.py`). This stage writes one per distinct round-0 sample attempt (same
problem and text = one attempt), from one of two sources:
- `task`: the task's `verification` hook (`arith` re-solves the problem step by step); no
  engine is opened;
- `model`: the model's own check, as in S²R: the sample's prompt, its attempt and the verify
  cue, continued `tries` times; each try is cut at the end of its first verdict phrase, and the
  first try whose verdict agrees with the checker (and holds no cue) is kept: S²R's filter.
`auto` takes the task's hook when it has one (`Task.writes_verification`), else the model.

A record keeps every try's verdict, so summary.json says how often the model's own verdict
agrees with the checker, on right and on wrong attempts: whether the model can check itself
at all is what S²R's method rests on. The cues must be those of the S²R SFT data
(`build.s2r`): `backtrack run` passes them from there, and `build` refuses records written
with others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from backtrack.config import option, store_values
from backtrack.errors import UserError
from backtrack.formats import (S2R_RETRY_CUE, S2R_VERDICT_CORRECT, S2R_VERDICT_WRONG,
                               S2R_VERIFY_CUE)
from backtrack.generation import GenerationConfig
from backtrack.layout import RunLayout

VERIFY_KEY = ("problem_id", "sample_idx")
SOURCES = ("auto", "task", "model")
CUE_KEYS = ("verify_cue", "retry_cue", "verdict_correct", "verdict_wrong")


@dataclass
class VerifyConfig(GenerationConfig):
    """Write a verification of each distinct sample attempt: the task's or the model's own."""

    source: str = option("auto", "Who writes the verifications: `task` (the task's hook, e.g. "
                         "arith's re-solution), `model` (the model's own check, kept when its "
                         "verdict agrees with the checker) or `auto` (task if it has a hook).",
                         choices=SOURCES)
    tries: int = option(4, "Model source: checks sampled per attempt; the first whose verdict "
                        "agrees with the checker is kept (none agreeing: the attempt has none).")
    max_attempts: int = option(0, "Distinct attempts verified per problem, first by sample "
                               "index (0 = all).", in_store=False)
    verify_cue: str = option(S2R_VERIFY_CUE, "Text after an attempt that opens its check; "
                             "`backtrack run` sets it (and the three below) from build.s2r.")
    retry_cue: str = option(S2R_RETRY_CUE, "A try whose kept text holds it (or the verify "
                            "cue) is not kept: the SFT data would drop it.")
    verdict_correct: str = option(S2R_VERDICT_CORRECT, "Phrase ending a check that passes.")
    verdict_wrong: str = option(S2R_VERDICT_WRONG, "Phrase ending a check that fails.")
    shard: str = option("0/1", "i/N: this process handles shard i of N of the problems.",
                        in_store=False)

    def validate(self) -> None:
        from backtrack.store import parse_shard

        parse_shard(self.shard)
        for key in CUE_KEYS:
            if not getattr(self, key).strip():
                raise UserError(f"option '{key}': must not be empty")
        if self.tries < 1 or self.batch_size < 1:
            raise UserError("options 'tries' and 'batch_size' must be >= 1")
        if self.max_attempts < 0:
            raise UserError("option 'max_attempts': must be 0 (all) or more")
        self.generation_params(self.tries).validate()

    def cues(self):
        from backtrack.methods.s2r_data import Cues

        return Cues(self.verify_cue, self.retry_cue, self.verdict_correct, self.verdict_wrong)


def outputs(config: VerifyConfig) -> list[Path]:
    return [RunLayout.of(config).verify]


def plan_options(build_config, recipe: dict) -> dict:
    """The verify step's cues in `backtrack run`: those of the S²R data (`build.s2r`), so
    they are set once; a recipe's `verify` section that says otherwise is refused."""
    from backtrack.methods.s2r import data_config

    data = data_config(build_config)
    cues = {key: getattr(data, key) for key in CUE_KEYS}
    for key, value in (recipe.get("verify") or {}).items():
        if key in cues and value != cues[key]:
            raise UserError(f"key 'verify.{key}' ({value!r}) differs from build.s2r.{key} "
                            f"({cues[key]!r}); set it once, in build.s2r")
    return cues


# ------------------------------------------------------------------ prompts, verdicts, filter


def resolve_source(config: VerifyConfig, task) -> str:
    """`task` or `model`; `task` for a task without a hook is a one-line error."""
    if config.source == "auto":
        return "task" if task.writes_verification else "model"
    if config.source == "task" and not task.writes_verification:
        raise UserError(f"option 'source': task '{task.name}' has no verification hook; use "
                        "source 'model' (or 'auto') to have the model write its own")
    return config.source


def verify_prompt(prompt: str, attempt: str, verify_cue: str) -> str:
    """The sample's prompt, its attempt and the verify cue on a line of its own: the text an
    S²R trajectory holds before a verification (`s2r_data.render_trajectory`), so the model
    checks in the format it is then trained on."""
    from backtrack.methods.s2r_data import SEPARATOR

    return prompt + attempt.rstrip() + SEPARATOR + verify_cue.strip() + SEPARATOR


def cut_at_verdict(text: str, verdict_correct: str, verdict_wrong: str
                   ) -> tuple[str | None, str]:
    """(verdict, `text` up to the end of its first verdict phrase); (None, `text`) with none.
    What follows a verdict (a retry, a second opinion) is not part of the check."""
    from backtrack.methods.s2r_data import verdict_matches

    found = verdict_matches(text, verdict_correct, verdict_wrong)
    if not found:
        return None, text
    _, end, verdict = found[0]
    return verdict, text[:end]


def choose_try(tries: list[tuple[str | None, str | None]], correct: bool, cues) -> int | None:
    """S²R's filter: the first try whose verdict agrees with the checker and whose text holds
    no cue (the SFT data drops such a text); None when no try qualifies."""
    from backtrack.methods.s2r_data import cue_pattern

    cue = cue_pattern(cues.verify, cues.retry)
    truth = "correct" if correct else "wrong"
    return next((i for i, (verdict, text) in enumerate(tries)
                 if verdict == truth and text is not None and not cue.search(text)), None)


def distinct_attempts(samples: list[dict], max_attempts: int = 0) -> list[dict]:
    """Round-0 sample records, one per distinct (problem, attempt text) (the first by sample
    index), at most `max_attempts` per problem (0 = all); by problem, then sample index."""
    kept, seen, per_problem = [], set(), {}
    for record in sorted(samples, key=lambda r: (str(r["problem_id"]), r["sample_idx"])):
        key = (str(record["problem_id"]), record["completion"].strip())
        if record.get("round", 0) != 0 or not key[1] or key in seen:
            continue
        if max_attempts and per_problem.get(key[0], 0) >= max_attempts:
            continue
        seen.add(key)
        per_problem[key[0]] = per_problem.get(key[0], 0) + 1
        kept.append(record)
    return kept


def verify_record(sample: dict, source: str, tries: list, cues, new_tokens: int = 0) -> dict:
    """A verify record: the attempt, the checker's judgement, every try's verdict and the
    kept verification (None when no try passed the filter)."""
    kept = choose_try(tries, bool(sample["correct"]), cues)
    return {"problem_id": sample["problem_id"], "sample_idx": sample["sample_idx"],
            "attempt": sample["completion"], "correct": bool(sample["correct"]),
            "source": source, "verification": None if kept is None else tries[kept][1],
            "verdicts": [verdict for verdict, _ in tries], "kept_try": kept,
            "new_tokens": new_tokens}


# ------------------------------------------------------------------ the two sources


def task_tries(verify, chunk: list[dict], cues) -> list[tuple[list, int]]:
    """One try per attempt: the task hook's text (not cut: it is the task's) and verdict."""
    from backtrack.methods.s2r_data import parse_verdict

    out = []
    for sample in chunk:
        text = verify(str(sample["problem_id"]), sample["completion"])
        verdict = None if text is None else parse_verdict(text, cues.correct, cues.wrong)
        out.append(([(verdict, text)], 0))
    return out


def model_tries(engine, chunk: list[dict], config: VerifyConfig, stats) -> list[tuple[list, int]]:
    """`tries` checks per attempt in one engine call (n samples per prompt share its
    prefill), each cut at its first verdict; with the tokens generated."""
    from backtrack.engines import derive_seed
    from backtrack.generation import timed_generate

    prompts = []
    for sample in chunk:
        if not isinstance(sample.get("prompt"), str) or not sample["prompt"]:
            raise UserError(f"samples: record {sample['problem_id']!r}/{sample['sample_idx']!r} "
                            "has no rendered 'prompt' string")
        prompts.append(verify_prompt(sample["prompt"], sample["completion"], config.verify_cue))
    params = dataclasses.replace(config.generation_params(config.tries),
                                 seed=derive_seed(config.seed, "verify"))
    outputs = timed_generate(engine, prompts, params, stats)
    return [([cut_at_verdict(c.text, config.verdict_correct, config.verdict_wrong)
              for c in completions], sum(c.new_tokens for c in completions))
            for completions in outputs]


# ------------------------------------------------------------------ summary and stage


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def summarize_verify(records: list[dict], cues) -> dict:
    """Attempts, kept verifications (per source, per checker judgement) and how the tries'
    verdicts agree with the checker: agreement over tries that reached a verdict (overall, on
    right and on wrong attempts), precision of "wrong" verdicts, and recall of "wrong" over
    every try on a wrong attempt (no verdict counts as missed, as in `s2r_metrics`)."""
    tries = [(v, r["correct"]) for r in records for v in r["verdicts"]]
    given = [(v, ok) for v, ok in tries if v is not None]

    def agree(pairs):
        return sum((v == "correct") == ok for v, ok in pairs)

    on_right = [(v, ok) for v, ok in given if ok]
    on_wrong = [(v, ok) for v, ok in given if not ok]
    said_wrong = [ok for v, ok in given if v == "wrong"]
    wrong_tries = [v for v, ok in tries if not ok]
    sources = {}
    for r in records:
        entry = sources.setdefault(r["source"], {"attempts": 0, "verified": 0})
        entry["attempts"] += 1
        entry["verified"] += r["verification"] is not None
    kept = [r for r in records if r["verification"] is not None]
    return {"attempts": len(records), "verified": len(kept),
            "verified_right": sum(r["correct"] for r in kept),
            "verified_wrong": sum(not r["correct"] for r in kept),
            "problems": len({r["problem_id"] for r in records}), "sources": sources,
            "tries": len(tries), "verdicts": len(given), "verdict_rate": _rate(len(given),
                                                                             len(tries)),
            "agreement": _rate(agree(given), len(given)),
            "agreement_on_right": _rate(agree(on_right), len(on_right)),
            "agreement_on_wrong": _rate(agree(on_wrong), len(on_wrong)),
            "wrong_precision": _rate(sum(not ok for ok in said_wrong), len(said_wrong)),
            "wrong_recall": _rate(sum(v == "wrong" for v in wrong_tries), len(wrong_tries)),
            "cues": dataclasses.asdict(cues)}


def verify_fingerprint(config: VerifyConfig, source: str, samples_fingerprint) -> dict:
    """What shapes a record (the source as resolved), and the samples it checks."""
    return {"stage": "verify", **store_values(config), "source": source,
            "samples": samples_fingerprint}


def main(config: VerifyConfig) -> dict:
    from backtrack.fileio import write_json
    from backtrack.generation import RunStats, open_engine, progress_bar
    from backtrack.methods.s2r_data import task_verifier
    from backtrack.models import resolve_model_path
    from backtrack.runinfo import write_run_info
    from backtrack.store import RecordStore, parse_shard, shard_of
    from backtrack.tasks import get_task

    layout, cues = RunLayout.of(config), config.cues()
    task = get_task(config.task, config.task_args)
    source = resolve_source(config, task)
    samples = RecordStore.read(layout.samples)
    index, count = parse_shard(config.shard)
    mine = [r for r in distinct_attempts(samples.records(), config.max_attempts)
            if shard_of(r["problem_id"], count) == index]
    model_path = resolve_model_path(config.model, config.output_dir) if source == "model" \
        else None
    store = RecordStore(layout.verify, verify_fingerprint(config, source, samples.fingerprint),
                        shard=config.shard, key_fields=VERIFY_KEY)
    write_run_info(layout.verify, config, "verify", inputs=[layout.samples],
                   extra={"source": source, "model_path": model_path})
    done = store.done_keys()
    chunks = [chunk for chunk in ([r for r in mine[i:i + config.batch_size]
                                   if (r["problem_id"], r["sample_idx"]) not in done]
                                  for i in range(0, len(mine), config.batch_size)) if chunk]
    stats, engine, hook = RunStats(), None, None
    if chunks and source == "model":
        engine = open_engine(config, model_path)
    elif chunks:
        split = (samples.fingerprint or {}).get("split", "train")
        hook = task_verifier(task, task.problems(split), config)
    try:
        with progress_bar(sum(map(len, chunks)), "verify", config.progress) as bar:
            for chunk in chunks:
                tries = (model_tries(engine, chunk, config, stats) if engine is not None
                         else task_tries(hook, chunk, cues))
                records = [verify_record(s, source, t, cues, n) for s, (t, n) in zip(chunk, tries)]
                store.append(records)
                stats.samples += len(records)
                stats.correct += sum(r["verification"] is not None for r in records)
                stats.new_tokens += sum(n for _, n in tries)
                bar.update(len(records))
                bar.set_postfix(stats.postfix(), refresh=False)
        stats.stop()
    finally:
        if engine is not None:
            engine.close()
        store.close()
    summary = {**summarize_verify(store.records(), cues), "this_run": stats.as_dict()}
    write_json(layout.verify / "summary.json", summary)
    print(f"verify ({source}): {summary['attempts']} attempts, {summary['verified']} verified "
          f"({summary['verified_right']} right, {summary['verified_wrong']} wrong); verdicts on "
          f"{summary['verdicts']} of {summary['tries']} tries, agreement with the checker "
          f"{summary['agreement']} -> {layout.verify}")
    return summary


# ------------------------------------------------------------------ reading them (build)


def records_verifier(layout: RunLayout, data_config, task):
    """A `s2r_data.Verifier` over the verify records: an attempt's kept verification (by
    problem and text), None when it has none. Records written with other cues than the S²R
    data's (`data_config`), or from other samples, are refused. An attempt the records lack
    (a backtrack trace's) gets the task's hook when the records came from the hook, else None."""
    from backtrack.methods.s2r_data import task_verifier
    from backtrack.store import RecordStore

    store = RecordStore.read(layout.verify)
    made = store.fingerprint or {}
    for key in CUE_KEYS:
        if made.get(key) != getattr(data_config, key):
            raise UserError(f"{layout.verify}: verifications were written with verify.{key} "
                            f"{made.get(key)!r}, but build.s2r.{key} is "
                            f"{getattr(data_config, key)!r}; run `backtrack verify` with the "
                            "same cues")
    if made.get("samples") != RecordStore.read(layout.samples).fingerprint:
        raise UserError(f"{layout.verify}: verifications of other samples than those in "
                        f"{layout.samples}; run `backtrack verify` again")
    table = {(str(r["problem_id"]), r["attempt"].strip()): r["verification"]
             for r in store.records()}
    hook = None
    if made.get("source") == "task":
        hook = task_verifier(task, task.problems((made["samples"] or {}).get("split", "train")),
                             data_config)

    def verify(problem_id: str, attempt_text: str) -> str | None:
        key = (str(problem_id), attempt_text.strip())
        if key in table or hook is None:
            return table.get(key)
        return hook(problem_id, attempt_text)

    return verify
