"""Build the SFT datasets of the two arms from sample and backtrack records.

`rft` holds the correct first attempts; `rft_bt` adds every wrong-then-right trace as one
assistant turn in the model's own words (the cut wrong attempt, the phrase, the continuation).
Examples are stored pre-tokenised (`input_ids` + `completion_mask`) rather than as chat
messages: TRL's SFTTrainer would re-render a conversational prompt with its own generation
prompt and we need exact control over which tokens carry loss (`loss_on`). The prompt is the
chat template's generation prompt (what the model sees at inference) tokenised on its own, and
the completion ends with the template's end-of-turn token so the model learns to stop.

With `loss_on: masked_wrong` the phrase carries loss (with the newline the backtrack stage
inserted before it): like the [BACK] token of Physics of LMs 2.2, it is what the model must
learn to emit when it doubts its attempt; only the wrong attempt itself is masked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from backtrack.config import CommonConfig, option
from backtrack.errors import UserError

META_FILE = "backtrack_sft.json"  # tokenizer identity + build options, beside the arrow files
ARMS = ("rft", "rft_bt")


@dataclass
class BuildConfig(CommonConfig):
    """Build the `rft` and `rft_bt` SFT datasets under <output_dir>/sft/."""

    max_per_problem: int = option(
        0, "Cap on distinct correct first attempts kept per problem (0 = no cap).")
    loss_on: str = option(
        "all", "Tokens that carry loss in a backtrack trace: `all` = the whole assistant turn "
        "(as in the seed); `masked_wrong` = the wrong attempt is masked, the phrase, the "
        "continuation and the end-of-turn token carry loss (Physics of LMs 2.2 ablation).",
        choices=("all", "masked_wrong"))

    def validate(self) -> None:
        if self.max_per_problem < 0:
            raise UserError("option 'max_per_problem': must be 0 (no cap) or more")


@dataclass
class Example:
    """One SFT example before tokenisation; `loss_from` = first completion char with loss."""

    problem_id: str
    source: str  # "rft" or "bt"
    prompt: str
    completion: str
    loss_from: int = 0


def tokenizer_identity(tokenizer) -> dict:
    """Name and a hash of the vocabulary + special tokens: train refuses other tokenizers."""
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps([vocab, tokenizer.eos_token])
    return {"name_or_path": str(tokenizer.name_or_path),
            "vocab_hash": hashlib.sha256(payload.encode()).hexdigest()}


def end_of_turn_text(tokenizer) -> str:
    """The text the chat template puts right after assistant content (e.g. `<|im_end|>`).

    Read from the template itself because the end-of-turn marker is not always the
    tokenizer's eos (base vs instruct checkpoints); trailing newlines are not needed to stop.
    """
    marker = "BACKTRACK-END-OF-TURN-PROBE"
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # templates that cannot render a finished assistant turn
        rendered = ""
    suffix = rendered.split(marker, 1)[1] if marker in rendered else ""
    specials = [t for t in tokenizer.all_special_tokens if t and t in suffix]
    if specials:
        first = min(specials, key=suffix.index)
        return suffix[: suffix.index(first) + len(first)]
    if tokenizer.eos_token is None:
        raise UserError(f"tokenizer {tokenizer.name_or_path}: no eos token and no end-of-turn "
                        "token in its chat template")
    return tokenizer.eos_token


def read_records(folder: Path) -> list[dict]:
    """All records of a stage's record store (thin, so the store format lives in store.py)."""
    if not folder.is_dir():
        raise UserError(f"{folder}: record folder not found (run the stage that writes it first)")
    from backtrack.store import RecordStore

    return RecordStore.read(folder).records()


def _require(record: dict, keys: tuple, where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise UserError(f"{where}: record {record.get('problem_id')!r}/"
                        f"{record.get('sample_idx')!r} lacks key(s) {missing}")


def _prompt_text(tokenizer, prompt, where: str) -> str:
    """Sample records carry the rendered prompt string; a message list is rendered here."""
    if isinstance(prompt, list):
        from backtrack.chat import render_prompt

        return render_prompt(tokenizer, prompt)
    if not isinstance(prompt, str) or not prompt:
        raise UserError(f"{where}: record has an empty or invalid 'prompt'")
    return prompt


def rft_examples(records: list[dict], tokenizer, max_per_problem: int, where: str):
    """Correct first attempts, identical completions (up to surrounding whitespace) once,
    at most `max_per_problem` per problem in sample order."""
    by_problem: dict[str, list[dict]] = {}
    for record in records:
        _require(record, ("problem_id", "sample_idx", "prompt", "completion", "correct"), where)
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
            prompt = _prompt_text(tokenizer, record["prompt"], where)
            examples.append(Example(problem_id, "rft", prompt, text))
    return examples, {"duplicates_dropped": duplicates, "capped": capped}


def trace_text(record: dict, where: str) -> tuple[str, int] | None:
    """The assistant turn of a wrong-then-right trace and where its wrong part ends.

    The first correct round is taken as the model saw it: its `prefix` (the cut wrong text,
    earlier rounds included), then `phrase`, then the model's `completion`.
    """
    _require(record, ("problem_id", "prompt", "chain"), where)
    for step in record["chain"]:
        if step.get("round", 0) >= 1 and step.get("correct") is True:
            _require(step, ("prefix", "phrase", "completion"), where)
            text = step["prefix"] + step["phrase"] + step["completion"]
            return text, len(step["prefix"])
    return None


def bt_examples(records: list[dict], tokenizer, loss_on: str, where: str):
    """Every wrong-then-right trace (identical texts once), with the loss start chosen."""
    examples, seen, duplicates = [], set(), 0
    for record in sorted(records, key=lambda r: (str(r.get("problem_id")),
                                                 r.get("sample_idx", 0),
                                                 r.get("continuation_idx", 0))):
        found = trace_text(record, where)
        if found is None:
            continue
        text, wrong_end = found
        key = (str(record["problem_id"]), text.strip())
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        prompt = _prompt_text(tokenizer, record["prompt"], where)
        loss_from = wrong_end if loss_on == "masked_wrong" else 0
        examples.append(Example(str(record["problem_id"]), "bt", prompt, text, loss_from))
    return examples, {"duplicates_dropped": duplicates}


def tokenize_example(tokenizer, example: Example, end_of_turn: str) -> dict:
    """`input_ids` = prompt ids + completion ids; `completion_mask` marks loss tokens.

    The prompt is tokenised alone (as at inference). A completion token carries loss when it
    ends after `loss_from`, so a token straddling the wrong/phrase boundary is trained on.
    """
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    completion = example.completion + end_of_turn
    encoded = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
    mask = [1 if end > example.loss_from else 0 for _, end in encoded["offset_mapping"]]
    return {
        "problem_id": example.problem_id,
        "source": example.source,
        "prompt": example.prompt,
        "completion": completion,
        "prompt_length": len(prompt_ids),
        "input_ids": prompt_ids + list(encoded["input_ids"]),
        "completion_mask": [0] * len(prompt_ids) + mask,
    }


def arm_stats(rows: list[dict]) -> dict:
    """Examples, problems covered, mean lengths in tokens, share of backtracked examples."""
    n = max(len(rows), 1)
    return {
        "examples": len(rows),
        "problems": len({r["problem_id"] for r in rows}),
        "backtracked_share": sum(r["source"] == "bt" for r in rows) / n,
        "mean_tokens": sum(len(r["input_ids"]) for r in rows) / n,
        "mean_completion_tokens": sum(len(r["input_ids"]) - r["prompt_length"] for r in rows) / n,
        "mean_loss_tokens": sum(sum(r["completion_mask"]) for r in rows) / n,
    }


def resolve_base_model(name: str, output_dir: str) -> str:
    """Model folder for `name` (aliases resolved by models.py)."""
    from backtrack.models import resolve_model_path

    return resolve_model_path(name, output_dir)


def load_base_tokenizer(path: str):
    from backtrack.models import load_tokenizer

    try:
        return load_tokenizer(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from exc


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp folder into place; an older folder is removed only afterwards."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_arms(config: BuildConfig, tokenizer) -> tuple[dict[str, list[dict]], dict]:
    """Tokenised rows of each arm plus the input-side statistics."""
    out = Path(config.output_dir)
    samples_dir, backtrack_dir = out / "samples", out / "backtrack"
    samples = read_records(samples_dir)
    traces = read_records(backtrack_dir)
    rft, rft_info = rft_examples(samples, tokenizer, config.max_per_problem, str(samples_dir))
    if not rft:
        raise UserError(f"{samples_dir}: no correct samples among {len(samples)} records, so the "
                        "rft arm would be empty (sample more, or use an easier task or a stronger "
                        "model)")
    bt, bt_info = bt_examples(traces, tokenizer, config.loss_on, str(backtrack_dir))
    end_of_turn = end_of_turn_text(tokenizer)
    rft_rows = [tokenize_example(tokenizer, e, end_of_turn) for e in rft]
    bt_rows = [tokenize_example(tokenizer, e, end_of_turn) for e in bt]
    inputs = {
        "sample_records": len(samples),
        "correct_first_attempts": sum(r.get("correct") is True for r in samples),
        "rft_duplicates_dropped": rft_info["duplicates_dropped"],
        "rft_capped": rft_info["capped"],
        "backtrack_records": len(traces),
        "backtrack_final_correct": sum(trace_text(r, "") is not None for r in traces),
        "bt_duplicates_dropped": bt_info["duplicates_dropped"],
        "end_of_turn": end_of_turn,
    }
    return {"rft": rft_rows, "rft_bt": rft_rows + bt_rows}, inputs


def main(config: BuildConfig) -> None:
    """Write sft/rft, sft/rft_bt, sft/stats.json and sft/run.json, all or nothing."""
    from datasets import Dataset

    from backtrack.runinfo import write_run_info

    out = Path(config.output_dir)
    model_path = resolve_base_model(config.model, config.output_dir)
    tokenizer = load_base_tokenizer(model_path)
    arms, inputs = build_arms(config, tokenizer)
    meta = {"tokenizer": tokenizer_identity(tokenizer), "loss_on": config.loss_on,
            "max_per_problem": config.max_per_problem, "base_model": model_path}
    final = out / "sft"
    tmp = out / f".sft.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for arm, rows in arms.items():
            Dataset.from_list(rows).save_to_disk(str(tmp / arm))
            (tmp / arm / META_FILE).write_text(json.dumps({**meta, "arm": arm}, indent=2) + "\n")
        stats = {"arms": {arm: arm_stats(rows) for arm, rows in arms.items()},
                 "inputs": inputs, **meta}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        write_run_info(tmp, config, "build", inputs=[out / "samples", out / "backtrack"])
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for arm, s in stats["arms"].items():
        print(f"{arm}: {s['examples']} examples, {s['problems']} problems, "
              f"{s['mean_tokens']:.0f} tokens on average, "
              f"{100 * s['backtracked_share']:.0f}% backtracked -> {final / arm}")
