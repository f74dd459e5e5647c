"""`backtrack eval`: n samples per test problem for each arm, then every metric.

Arms: `base` (the recipe's model), `rft` and `rft_bt` (the fine-tuned folders under
`<output_dir>/models/`), and `budget_forcing`: the base model with s1's budget forcing at
inference (the first `</think>` it emits is replaced by "Wait" and generation goes on once,
with no checking). Records go to a resumable store per arm (`<output_dir>/eval/<arm>/`), so an
interrupted evaluation continues where it stopped; `metrics.json` is recomputed from the
records at the end.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from backtrack.config import CommonConfig, option
from backtrack.errors import UserError
from backtrack.metrics import DEFAULT_BACKTRACK_PATTERN

ARMS = ("base", "rft", "rft_bt", "budget_forcing")
THINK_CLOSE = "</think>"


@dataclass
class EvalConfig(CommonConfig):
    """Sample n answers per test problem for each arm and compute pass@k, maj@k and more."""

    arms: list = option(list(ARMS), f"Arms to evaluate, any of {', '.join(ARMS)}.")
    n: int = option(16, "Samples per test problem (pass@k and maj@k for k = 1, 2, 4, ..., n).")
    split: str = option("test", "Split to evaluate on; `train` with `skip` past the problems "
                        "the sample stage used gives a dev set for choosing settings without "
                        "touching the test split.", choices=("test", "train"))
    skip: int = option(0, "Leave out the first N problems of the split.")
    limit: int = option(0, "Evaluate N problems after `skip` (0 = the rest of the split).")
    temperature: float = option(0.8, "Sampling temperature.")
    top_p: float = option(1.0, "Nucleus sampling top_p.")
    max_new_tokens: int = option(256, "Longest answer in new tokens (budget forcing's "
                                 "continuation gets the same budget again).")
    engine: str = option("hf", "Generation engine.", choices=("hf", "vllm", "openai"))
    engine_args: dict = option({}, "Engine options, e.g. {batch_size: 64} for hf (sequences "
                               "decoded together), {base_url: ...} for openai.")
    batch_size: int = option(16, "Problems per engine call; records are saved after each.")
    forcing_phrase: str = option("Wait", "Budget forcing: text put in place of the first "
                                 "</think>.")
    backtrack_pattern: str = option(DEFAULT_BACKTRACK_PATTERN, "Regex (case-insensitive) of "
                                    "backtrack phrases; matches within a sentence count once.")
    n_boot: int = option(1000, "Bootstrap resamples over problems for the 95 % CIs.")
    max_subsets: int = option(1000, "maj@k: random k-subsets per problem when there are more.")
    progress: bool = option(True, "Show a progress bar.")

    def validate(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise UserError(f"option 'arms': unknown arm(s) {unknown} (known: {list(ARMS)})")
        for name in ("n", "max_new_tokens", "batch_size", "n_boot", "max_subsets"):
            if getattr(self, name) < 1:
                raise UserError(f"option '{name}': must be at least 1")
        if self.limit < 0 or self.skip < 0:
            raise UserError("options 'limit' and 'skip': must be >= 0")
        if self.split == "train" and not (self.skip and self.limit):
            raise UserError("option 'split': evaluating on train needs 'skip' (past the sampled "
                            "problems) and 'limit'")


def arm_model_path(config: EvalConfig, arm: str) -> str:
    """The model folder of an arm: the base model, or the arm's fine-tuned folder."""
    from backtrack.models import resolve_model_path

    if arm in ("base", "budget_forcing"):
        return resolve_model_path(config.model, config.output_dir)
    path = Path(config.output_dir) / "models" / arm
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no trained model for arm '{arm}'; run `backtrack train "
                        f"--arm {arm}` first")
    return str(path)


def _model_identity(model_path: str) -> str:
    """What tells one trained model from another in the same folder (cheap: no weight hashing).

    A fine-tuned folder's run.json (written by `backtrack train`, with its config and time)
    changes on every retraining; otherwise the config.json hash and the weights' size.
    """
    from backtrack.runinfo import hash_path

    folder = Path(model_path)
    if (folder / "run.json").is_file():
        return f"run.json:{hash_path(folder / 'run.json')}"
    if (folder / "config.json").is_file():
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        return f"{folder}:{hash_path(folder / 'config.json')}:{size}"
    return model_path


def fingerprint(config: EvalConfig, arm: str, model_path: str) -> dict:
    """What shapes an arm's records; a store written with another is refused. Not n or limit:
    raising them only adds the missing samples."""
    fp = {"arm": arm, "task": config.task, "task_args": config.task_args, "split": config.split,
          "model": _model_identity(model_path), "seed": config.seed,
          "temperature": config.temperature, "top_p": config.top_p,
          "max_new_tokens": config.max_new_tokens}
    if arm == "budget_forcing":
        fp["forcing_phrase"] = config.forcing_phrase
    return fp


def _engine(config: EvalConfig, model_path: str):
    from backtrack.sample import open_engine

    return open_engine(config, model_path)


class BudgetForcingEngine:
    """s1 budget forcing around any engine: cut each sample at its first `</think>`, put
    `phrase` there and continue once, with no checking.

    Wrapping the engine lets the eval stage reuse the sample stage's loop unchanged. Samples
    that never close their reasoning are kept as they are. The continuation gets the full
    token budget again (the point of forcing is more thinking); its new tokens are added to
    those of the kept prefix (re-tokenised, since only text crosses the engine API).
    """

    def __init__(self, engine, tokenizer, phrase: str):
        self.engine, self.tokenizer, self.phrase = engine, tokenizer, phrase

    def generate(self, prompts: list[str], params) -> list[list]:
        import dataclasses

        from backtrack.engines import Completion

        outputs = self.engine.generate(prompts, params)
        jobs = []  # (prompt index, sample index, partial text)
        for i, row in enumerate(outputs):
            for j, completion in enumerate(row):
                cut = completion.text.find(THINK_CLOSE)
                if cut >= 0:
                    jobs.append((i, j, completion.text[:cut] + self.phrase))
        if not jobs:
            return outputs
        cont_params = dataclasses.replace(params, n=1, seed=params.seed + 1)
        continued = self.engine.generate([prompts[i] + partial for i, _, partial in jobs],
                                         cont_params)
        for (i, j, partial), (completion,) in zip(jobs, continued):
            prefix = len(self.tokenizer(partial, add_special_tokens=False)["input_ids"])
            outputs[i][j] = Completion(partial + completion.text, prefix + completion.new_tokens,
                                       completion.finish_reason)
        return outputs

    def close(self) -> None:
        self.engine.close()


def sample_arm(config: EvalConfig, arm: str, task, problems, store) -> None:
    """Generate the missing samples of `problems` for `arm` into `store` (the sample loop)."""
    from backtrack.chat import render_prompt
    from backtrack.engines import GenerationParams
    from backtrack.models import load_tokenizer
    from backtrack.sample import sample_problems

    done = store.done_keys()
    if all((p.id, i, 0) in done for p in problems for i in range(config.n)):
        return
    model_path = arm_model_path(config, arm)
    tokenizer = load_tokenizer(model_path)
    engine = _engine(config, model_path)
    if arm == "budget_forcing":
        engine = BudgetForcingEngine(engine, tokenizer, config.forcing_phrase)
    prompts = {p.id: render_prompt(tokenizer, task.messages(p)) for p in problems}
    params = GenerationParams(n=config.n, temperature=config.temperature, top_p=config.top_p,
                              max_new_tokens=config.max_new_tokens, seed=config.seed)
    try:
        sample_problems(engine, task, problems, prompts, params, store, config.n,
                        config.batch_size, desc=f"eval {arm}", progress=config.progress,
                        extra_fields={"arm": arm})
    finally:
        engine.close()


def eval_dir(config: EvalConfig) -> Path:
    """`eval/` for the test split; a dev evaluation on train problems goes to `eval_dev/`,
    so it never mixes with (or is read by the report as) the test results."""
    return Path(config.output_dir) / ("eval" if config.split == "test" else "eval_dev")


def summarize_arm(config: EvalConfig, task, records: list[dict]) -> dict:
    from backtrack.checking import normalize_answer
    from backtrack.metrics import summarize

    return summarize(records, pattern=config.backtrack_pattern, normalize=normalize_answer,
                     check_first=lambda text, gold: task.check(text, gold).correct,
                     n_boot=config.n_boot, max_subsets=config.max_subsets, seed=config.seed)


def evaluate_arm(config: EvalConfig, arm: str) -> dict:
    """Sample (resuming), then write `<output_dir>/eval/<arm>/metrics.json`."""
    from backtrack.runinfo import write_run_info
    from backtrack.store import RecordStore
    from backtrack.tasks import get_task

    task = get_task(config.task, config.task_args)
    count = config.skip + config.limit if config.limit else None
    problems = task.problems(config.split, count)[config.skip:]
    if not problems:
        raise UserError(f"task '{config.task}': no {config.split} problems after skipping "
                        f"{config.skip}")
    folder = eval_dir(config) / arm
    model_path = arm_model_path(config, arm)
    with RecordStore(folder, fingerprint(config, arm, model_path)) as store:
        sample_arm(config, arm, task, problems, store)
        wanted = {p.id for p in problems}
        records = [r for r in store.records() if r["problem_id"] in wanted
                   and r["sample_idx"] < config.n]
    summary = {"arm": arm, "model_path": model_path, **summarize_arm(config, task, records)}
    tmp = folder / "metrics.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, folder / "metrics.json")
    write_run_info(folder, config, "eval", extra={"arm": arm, "model_path": model_path})
    return summary


def main(config: EvalConfig) -> dict:
    results = {}
    for arm in config.arms:
        summary = evaluate_arm(config, arm)
        m, ks = summary["metrics"], summary["ks"]
        top = max(ks)
        print(f"eval {arm}: pass@1 {m['pass@1']['value']:.3f}  pass@{top} "
              f"{m[f'pass@{top}']['value']:.3f}  maj@{top} {m[f'maj@{top}']['value']:.3f}  "
              f"backtracks/answer {m['backtracks_per_answer']['value']:.2f}  "
              f"-> {eval_dir(config) / arm / 'metrics.json'}", flush=True)
        results[arm] = summary
    return results
