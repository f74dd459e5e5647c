"""`backtrack eval`: n samples per test problem for each evaluation, then every metric.

An evaluation is an arm of the registry (`backtrack arms`) under a protocol (`single`,
`forcing`, `two_attempt`; see protocols.py): `rft` runs the rft model under its own protocol,
`base@two_attempt` runs the base model under SCoRe's two-attempt protocol. Records go to a
resumable store per evaluation (`<output_dir>/eval/<name>/`), so an interrupted evaluation
continues where it stopped; `metrics.json` is recomputed from the records at the end.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from backtrack.config import option, store_values
from backtrack.errors import UserError
from backtrack.fileio import write_json
from backtrack.formats import PHRASE_PRESETS, SCORE_INSTRUCTION, SECOND_ATTEMPT_FORMS
from backtrack.generation import GenerationConfig
from backtrack.layout import RunLayout
from backtrack.metrics import DEFAULT_BACKTRACK_PATTERN

DEFAULT_ARMS = ["base", "rft", "rft_bt", "budget_forcing"]


@dataclass
class EvalConfig(GenerationConfig):
    """Sample n answers per test problem for each arm and compute pass@k, maj@k and more."""

    arms: list = option(list(DEFAULT_ARMS), "Evaluations: arm names (`backtrack arms`), or "
                        "arm@protocol for an arm under another protocol (e.g. base@two_attempt).",
                        in_store=False)
    arm_models: dict = option({}, "Model folder of a trained arm, in place of "
                              "<output_dir>/models/<arm>/: {rft_bt: path}; `backtrack run` "
                              "sets it to an iterated arm's last round (iterations.py).",
                              hashed=False, in_store=False)
    n: int = option(16, "Samples per test problem (pass@k and maj@k for k = 1, 2, 4, ..., n).",
                    in_store=False)
    split: str = option("test", "Split to evaluate on; `train` with `skip` past the problems "
                        "the sample stage used gives a dev set for choosing settings without "
                        "touching the test split.", choices=("test", "train"))
    skip: int = option(0, "Leave out the first N problems of the split.", in_store=False)
    limit: int = option(0, "Evaluate N problems after `skip` (0 = the rest of the split).",
                        in_store=False)
    forcing_phrase: str = option("Wait", "Budget forcing: text put in place of the first "
                                 "</think>.", protocol="forcing")
    second_attempt: str = option("phrase", "two_attempt: how attempt 2 is asked for: `phrase` "
                                 "in place of </think> in the same turn, or `instruction` in a "
                                 "new user turn (SCoRe).", choices=SECOND_ATTEMPT_FORMS,
                                 protocol="two_attempt")
    second_attempt_phrase: str = option(PHRASE_PRESETS["mild"], "two_attempt, phrase form: the "
                                        "phrase.", protocol="two_attempt")
    second_attempt_instruction: str = option(SCORE_INSTRUCTION, "two_attempt, instruction "
                                             "form: the user turn.", protocol="two_attempt")
    backtrack_pattern: str = option(DEFAULT_BACKTRACK_PATTERN, "Regex (case-insensitive) of "
                                    "backtrack phrases; matches within a sentence count once.",
                                    in_store=False)
    n_boot: int = option(1000, "Bootstrap resamples over problems for the 95 % CIs.",
                         in_store=False)
    max_subsets: int = option(1000, "maj@k: random k-subsets per problem when there are more.",
                              in_store=False)

    def validate(self) -> None:
        from backtrack.arms import validate_evaluations

        validate_evaluations(self.arms)
        for name in ("n", "max_new_tokens", "batch_size", "n_boot", "max_subsets"):
            if getattr(self, name) < 1:
                raise UserError(f"option '{name}': must be at least 1")
        if self.limit < 0 or self.skip < 0:
            raise UserError("options 'limit' and 'skip': must be >= 0")
        if self.split == "train" and not (self.skip and self.limit):
            raise UserError("option 'split': evaluating on train needs 'skip' (past the sampled "
                            "problems) and 'limit'")


def outputs(config: EvalConfig) -> list[Path]:
    from backtrack.arms import parse_evaluation

    layout = RunLayout.of(config)
    return [layout.evaluation(parse_evaluation(e).name, config.split) for e in config.arms]


def eval_dir(config: EvalConfig) -> Path:
    return RunLayout.of(config).eval_root(config.split)


def model_identity(model_path: str) -> str:
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


def fingerprint(config: EvalConfig, evaluation, model_path: str) -> dict:
    """What shapes an evaluation's records; a store written with another is refused. Not n
    or limit: raising them only adds the missing samples."""
    return {"arm": evaluation.name, **store_values(config, evaluation.protocol),
            "model": model_identity(model_path)}


def protocol_options(config: EvalConfig, evaluation) -> dict:
    """Keyword options of the protocol's record maker and extra metrics for this evaluation."""
    from backtrack.protocols import get_protocol

    protocol = get_protocol(evaluation.protocol)
    return protocol.options(config, evaluation) if protocol.options else {}


def sample_evaluation(config: EvalConfig, evaluation, model_path: str, task, problems,
                      store) -> dict:
    """Generate the missing samples of `problems` into `store` under the protocol; the
    engine's `describe()` ({} when nothing was missing)."""
    from backtrack.chat import render_prompt
    from backtrack.generation import open_engine, sample_problems, sample_record
    from backtrack.models import load_tokenizer
    from backtrack.protocols import get_protocol

    done = store.done_keys()
    if all((p.id, i, 0) in done for p in problems for i in range(config.n)):
        return {}
    protocol = get_protocol(evaluation.protocol)
    options = protocol_options(config, evaluation)
    tokenizer = load_tokenizer(model_path)
    messages = {p.id: task.messages(p) for p in problems}
    prompts = {p.id: render_prompt(tokenizer, messages[p.id]) for p in problems}
    engine = open_engine(config, model_path)
    if protocol.wrap is not None:
        by_prompt = {prompts[pid]: m for pid, m in messages.items()}
        engine = protocol.wrap(engine, tokenizer, config, by_prompt)
    make_record = (functools.partial(protocol.make_record, **options)
                   if protocol.make_record else sample_record)
    try:
        stats = sample_problems(engine, task, problems, prompts,
                                config.generation_params(config.n), store, config.n,
                                config.batch_size, desc=f"eval {evaluation.name}",
                                progress=config.progress, extra_fields={"arm": evaluation.name},
                                make_record=make_record)
        return stats.engine
    finally:
        engine.close()


def summarize_arm(config: EvalConfig, task, records: list[dict]) -> dict:
    from backtrack.checking import normalize_answer
    from backtrack.metrics import summarize

    return summarize(records, pattern=config.backtrack_pattern, normalize=normalize_answer,
                     check_first=lambda text, gold: task.check(text, gold).correct,
                     n_boot=config.n_boot, max_subsets=config.max_subsets, seed=config.seed)


def evaluate_arm(config: EvalConfig, entry: str) -> dict:
    """Sample (resuming), then write `<output_dir>/eval/<name>/metrics.json`."""
    from backtrack.arms import model_path as arm_model_path
    from backtrack.arms import parse_evaluation
    from backtrack.protocols import get_protocol
    from backtrack.runinfo import write_run_info
    from backtrack.store import RecordStore
    from backtrack.tasks import get_task

    evaluation = parse_evaluation(entry)
    task = get_task(config.task, config.task_args)
    count = config.skip + config.limit if config.limit else None
    problems = task.problems(config.split, count)[config.skip:]
    if not problems:
        raise UserError(f"task '{config.task}': no {config.split} problems after skipping "
                        f"{config.skip}")
    folder = RunLayout.of(config).evaluation(evaluation.name, config.split)
    model_path = arm_model_path(evaluation.arm.name, config.model, config.output_dir,
                                config.arm_models)
    with RecordStore(folder, fingerprint(config, evaluation, model_path)) as store:
        engine = sample_evaluation(config, evaluation, model_path, task, problems, store)
        wanted = {p.id for p in problems}
        records = [r for r in store.records() if r["problem_id"] in wanted
                   and r["sample_idx"] < config.n]
    summary = {"arm": evaluation.name, "protocol": evaluation.protocol,
               "model_path": model_path, **summarize_arm(config, task, records)}
    extra = get_protocol(evaluation.protocol).extra_metrics
    if extra is not None:  # a protocol's own figures (e.g. S²R's verdict accuracy)
        more = extra(records, task, config, **protocol_options(config, evaluation))
        summary["metrics"].update(more["metrics"])
        summary["per_problem"].update(more["per_problem"])
    write_json(folder / "metrics.json", summary, indent=1)
    write_run_info(folder, config, "eval", extra={"arm": evaluation.name,
                                                  "protocol": evaluation.protocol,
                                                  "model_path": model_path,
                                                  **({"engine": engine} if engine else {})})
    return summary


def main(config: EvalConfig) -> dict:
    from backtrack.arms import parse_evaluation

    results = {}
    for entry in config.arms:
        name = parse_evaluation(entry).name
        summary = evaluate_arm(config, entry)
        m, ks = summary["metrics"], summary["ks"]
        top = max(ks)
        print(f"eval {name}: pass@1 {m['pass@1']['value']:.3f}  pass@{top} "
              f"{m[f'pass@{top}']['value']:.3f}  maj@{top} {m[f'maj@{top}']['value']:.3f}  "
              f"backtracks/answer {m['backtracks_per_answer']['value']:.2f}  "
              f"-> {eval_dir(config) / name / 'metrics.json'}", flush=True)
        results[name] = summary
    return results
