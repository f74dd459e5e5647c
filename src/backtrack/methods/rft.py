"""RFT and RFT+BT: rejection-sampling fine-tuning, and the same plus verifiable backtracking.

`rft` trains on the model's correct first attempts; `rft_bt` adds every wrong-then-right trace
as one assistant turn in the model's own words (the cut wrong attempt, the phrase, the
continuation), which is the seed's method. With `build.loss_on: masked_wrong` the wrong attempt
carries no loss (Physics of LMs 2.2).
"""

from __future__ import annotations

from backtrack.arms import Arm, register
from backtrack.build import Example, prompt_text, require_keys
from backtrack.errors import UserError


def rft_examples(records: list[dict], tokenizer, max_per_problem: int, where: str):
    """Correct first attempts, identical completions (up to surrounding whitespace) once,
    at most `max_per_problem` per problem in sample order."""
    by_problem: dict[str, list[dict]] = {}
    for record in records:
        require_keys(record, ("problem_id", "sample_idx", "prompt", "completion", "correct"), where)
        if record.get("round", 0) == 0 and record["correct"] is True:
            by_problem.setdefault(str(record["problem_id"]), []).append(record)
    examples, duplicates, capped = [], 0, 0
    for problem_id in sorted(by_problem):
        seen: set[str] = set()
        for record in sorted(by_problem[problem_id], key=lambda r: r["sample_idx"]):
            text = record["completion"]
            if text.strip() in seen:
                duplicates += 1
                continue
            if max_per_problem and len(seen) >= max_per_problem:
                capped += 1
                continue
            seen.add(text.strip())
            prompt = prompt_text(tokenizer, record["prompt"], where)
            examples.append(Example(problem_id, "rft", prompt, text))
    return examples, {"duplicates_dropped": duplicates, "capped": capped}


def first_right_step(record: dict, where: str) -> dict | None:
    """The first round of a backtrack record whose continuation checked right (None if none)."""
    require_keys(record, ("problem_id", "prompt", "chain"), where)
    for step in record["chain"]:
        if step.get("round", 0) >= 1 and step.get("correct") is True:
            require_keys(step, ("prefix", "phrase", "completion"), where)
            return step
    return None


def trace_text(record: dict, where: str) -> tuple[str, int] | None:
    """The assistant turn of a wrong-then-right trace and where its wrong part ends.

    The first correct round is taken as the model saw it: its `prefix` (the cut wrong text,
    earlier rounds included), then `phrase`, then the model's `completion`.
    """
    step = first_right_step(record, where)
    if step is None:
        return None
    return step["prefix"] + step["phrase"] + step["completion"], len(step["prefix"])


def record_order(record: dict) -> tuple:
    return (str(record.get("problem_id")), record.get("sample_idx", 0),
            record.get("continuation_idx", 0))


def unique_traces(records: list[dict], where: str) -> tuple[list[tuple[dict, str, int]], int]:
    """The wrong-then-right traces rft_bt trains on, in record order: (record, text, wrong
    end) with identical texts of a problem once; confirm traces (`kind: confirm`, a right first
    attempt sent through the phrase) are not wrong-then-right and are left out."""
    kept, seen, duplicates = [], set(), 0
    for record in sorted(records, key=record_order):
        if record.get("kind", "wrong") != "wrong":
            continue
        found = trace_text(record, where)
        if found is None:
            continue
        key = (str(record["problem_id"]), found[0].strip())
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        kept.append((record, *found))
    return kept, duplicates


def bt_examples(records: list[dict], tokenizer, loss_on: str, where: str):
    """Every wrong-then-right trace (identical texts once), with the loss start chosen."""
    examples = []
    traces, duplicates = unique_traces(records, where)
    for record, text, wrong_end in traces:
        prompt = prompt_text(tokenizer, record["prompt"], where)
        loss_from = wrong_end if loss_on == "masked_wrong" else 0
        examples.append(Example(str(record["problem_id"]), "bt", prompt, text, loss_from))
    return examples, {"duplicates_dropped": duplicates}


def build_rft(context) -> tuple[list[Example], dict]:
    """Correct first attempts of the sample stage, capped per problem."""
    samples, where = context.samples(), str(context.layout.samples)
    examples, info = rft_examples(samples, context.tokenizer, context.config.max_per_problem,
                                  where)
    if not examples:
        raise UserError(f"{where}: no correct samples among {len(samples)} records, so the rft "
                        "arm would be empty (sample more, or use an easier task or a stronger "
                        "model)")
    return examples, info


def build_rft_bt(context) -> tuple[list[Example], dict]:
    """The rft examples, then every wrong-then-right trace of the backtrack stage."""
    examples, info = build_rft(context)
    bt, bt_info = bt_examples(context.traces(), context.tokenizer, context.config.loss_on,
                              str(context.layout.backtrack))
    return examples + bt, {**info, "bt_examples": len(bt),
                           "bt_duplicates_dropped": bt_info["duplicates_dropped"]}


register(Arm("rft", "SFT on the model's correct first attempts (rejection sampling)",
             training="sft", build=build_rft, reads=("sample",), compare_with=("base",)))
register(Arm("rft_bt", "rft plus wrong -> phrase -> right traces (verifiable backtracking)",
             training="sft", build=build_rft_bt, reads=("sample", "backtrack"),
             compare_with=("rft", "base")))
