"""Build the SFT dataset of every selected arm that trains with SFT, from the stages' records.

What goes into an arm's data is the arm's own `build` function (see `backtrack/methods/`, e.g.
`rft` = correct first attempts, `rft_bt` = those plus wrong-then-right traces); this stage gives
each the records it reads and writes every dataset the same way, in one all-or-nothing swap.
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
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from backtrack.config import CommonConfig, option
from backtrack.errors import UserError
from backtrack.fileio import replace_dir
from backtrack.layout import RunLayout

META_FILE = "backtrack_sft.json"  # tokenizer identity + build options, beside the arrow files


@dataclass
class BuildConfig(CommonConfig):
    """Build the SFT datasets of the selected arms under <output_dir>/sft/<arm>/."""

    arms: list = option(["rft", "rft_bt"], "Arms whose SFT data to build (those of the recipe's "
                        "`arms` that train with SFT, and their parents).")

    max_per_problem: int = option(
        0, "Cap on distinct correct first attempts kept per problem (0 = no cap).")
    loss_on: str = option(
        "all", "Tokens that carry loss in a backtrack trace: `all` = the whole assistant turn "
        "(as in the seed); `masked_wrong` = the wrong attempt is masked, the phrase, the "
        "continuation and the end-of-turn token carry loss (Physics of LMs 2.2 ablation).",
        choices=("all", "masked_wrong"))
    s2r: dict = option({}, "S²R data options for the s2r arms (`methods/s2r_data.py` "
                       "S2RDataConfig), e.g. {right_first_share: 0.5, max_wrong_attempts: 3}.",
                       arms=("s2r_sft",))
    retry_data: dict = option(
        {}, "retry_sft / gold_sft: how the task's reference solutions are written with "
        "self-corrections, as the toy corpus writes them (`methods/retry_data.py`): the toy "
        "corpus options correction_rate, late_share, retry_phrases, max_slip, slip_kinds, "
        "redo_from, loss_on_errors, loss_on_phrases (defaults: `backtrack toy-base`'s), and "
        "per_problem (transcripts per problem, default 2).", arms=("retry_sft", "gold_sft"))
    confirm_share: float = option(
        0.5, "rft_bt_confirm: share of confirm traces (a right first attempt, the phrase, the "
        "same answer confirmed) among its examples that carry the phrase; 0.5 = as many as "
        "wrong-then-right traces (fewer when the backtrack stage kept fewer).",
        arms=("rft_bt_confirm",))

    def validate(self) -> None:
        if self.max_per_problem < 0:
            raise UserError("option 'max_per_problem': must be 0 (no cap) or more")
        if not 0 <= self.confirm_share < 1:
            raise UserError("option 'confirm_share': must be at least 0 and below 1")
        sft_arms(self.arms)


def sft_arms(names: list) -> list:
    """The registry entries of `names` that build SFT data (others are a one-line error)."""
    from backtrack.arms import get_arm

    arms = [get_arm(name) for name in names]
    wrong = [arm.name for arm in arms if arm.build is None]
    if wrong:
        raise UserError(f"option 'arms': {wrong} build no SFT data (SFT arms: "
                        f"{[a for a in _all_sft_arms()]})")
    return arms


def _all_sft_arms() -> list[str]:
    from backtrack.arms import ARMS, load_methods

    load_methods()
    return [name for name, arm in ARMS.items() if arm.build is not None]


def outputs(config: BuildConfig) -> list[Path]:
    return [RunLayout.of(config).sft]


class BuildContext:
    """What an arm's `build` function reads: records (loaded once), tokenizer, options."""

    def __init__(self, config: BuildConfig, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.layout = RunLayout.of(config)
        self._cache: dict[str, list[dict]] = {}
        self._task = None

    def task(self):
        """The recipe's task (its checker re-checks texts an arm derives from records)."""
        if self._task is None:
            from backtrack.tasks import get_task

            self._task = get_task(self.config.task, self.config.task_args)
        return self._task

    def samples(self) -> list[dict]:
        return self._read(self.layout.samples)

    def traces(self) -> list[dict]:
        return self._read(self.layout.backtrack)

    def _read(self, folder: Path) -> list[dict]:
        if str(folder) not in self._cache:
            self._cache[str(folder)] = read_records(folder)
        return self._cache[str(folder)]


@dataclass
class Example:
    """One SFT example before tokenisation; `loss_from` = first completion char with loss,
    `no_loss` = further (start, end) character spans of the completion without loss."""

    problem_id: str
    source: str  # "rft", "bt" (wrong -> right), "fix" (clean corrected), "confirm" (right -> right)
    prompt: str
    completion: str
    loss_from: int = 0
    no_loss: tuple = ()


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


def require_keys(record: dict, keys: tuple, where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise UserError(f"{where}: record {record.get('problem_id')!r}/"
                        f"{record.get('sample_idx')!r} lacks key(s) {missing}")


def prompt_text(tokenizer, prompt, where: str) -> str:
    """Sample records carry the rendered prompt string; a message list is rendered here."""
    if isinstance(prompt, list):
        from backtrack.chat import render_prompt

        return render_prompt(tokenizer, prompt)
    if not isinstance(prompt, str) or not prompt:
        raise UserError(f"{where}: record has an empty or invalid 'prompt'")
    return prompt


def tokenize_example(tokenizer, example: Example, end_of_turn: str) -> dict:
    """`input_ids` = prompt ids + completion ids; `completion_mask` marks loss tokens.

    The prompt is tokenised alone (as at inference). A completion token carries loss when it
    ends after `loss_from`, so a token straddling the wrong/phrase boundary is trained on, and
    does not start inside a `no_loss` span (the toy corpus's rule for its masked pieces).
    """
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    completion = example.completion + end_of_turn
    encoded = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
    mask = [1 if end > example.loss_from
            and not any(lo <= start < hi for lo, hi in example.no_loss) else 0
            for start, end in encoded["offset_mapping"]]
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
        "sources": {s: sum(r["source"] == s for r in rows) for s in sorted({r["source"]
                                                                           for r in rows})},
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


def build_arms(config: BuildConfig, tokenizer) -> tuple[dict[str, list[dict]], dict]:
    """Tokenised rows of each arm plus what each arm's build reported."""
    context = BuildContext(config, tokenizer)
    end_of_turn = end_of_turn_text(tokenizer)
    rows, info = {}, {}
    for arm in sft_arms(config.arms):
        examples, info[arm.name] = arm.build(context)
        rows[arm.name] = [tokenize_example(tokenizer, e, end_of_turn) for e in examples]
    inputs = {"end_of_turn": end_of_turn, "per_arm": info}
    if str(context.layout.samples) in context._cache:
        samples = context.samples()
        inputs.update(sample_records=len(samples),
                      correct_first_attempts=sum(r.get("correct") is True for r in samples))
    if str(context.layout.backtrack) in context._cache:
        traces = context.traces()
        inputs.update(backtrack_records=len(traces),
                      backtrack_final_correct=sum(bool(r.get("final_correct")) for r in traces))
    return rows, inputs


def main(config: BuildConfig) -> None:
    """Write sft/rft, sft/rft_bt, sft/stats.json and sft/run.json, all or nothing."""
    from datasets import Dataset

    from backtrack.runinfo import write_run_info

    layout = RunLayout.of(config)
    out = layout.output_dir
    model_path = resolve_base_model(config.model, config.output_dir)
    tokenizer = load_base_tokenizer(model_path)
    arms, inputs = build_arms(config, tokenizer)
    meta = {"tokenizer": tokenizer_identity(tokenizer), "loss_on": config.loss_on,
            "max_per_problem": config.max_per_problem, "base_model": model_path}
    final = layout.sft
    tmp = out / f".sft.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for arm, rows in arms.items():
            Dataset.from_list(rows).save_to_disk(str(tmp / arm))
            (tmp / arm / META_FILE).write_text(json.dumps({**meta, "arm": arm}, indent=2) + "\n")
        stats = {"arms": {arm: arm_stats(rows) for arm, rows in arms.items()},
                 "inputs": inputs, **meta}
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        write_run_info(tmp, config, "build", inputs=[p for p in (layout.samples, layout.backtrack)
                                                      if p.is_dir()])
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for arm, s in stats["arms"].items():
        print(f"{arm}: {s['examples']} examples, {s['problems']} problems, "
              f"{s['mean_tokens']:.0f} tokens on average, "
              f"{100 * s['backtracked_share']:.0f}% backtracked -> {final / arm}")
