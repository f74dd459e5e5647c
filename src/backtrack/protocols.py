"""Evaluation protocols as data: how an arm's answers are generated at test time.

- `single`: one trace per sample; backtracks inside it are counted by the metrics.
- `forcing`: s1 budget forcing; the first `</think>` is replaced by a phrase ("Wait") and
  generation goes on once, with no checking.
- `two_attempt`: attempt 1, then a second attempt, after a user turn with an instruction
  (SCoRe) or after a phrase in place of `</think>` in the same turn (verifiable backtracking's
  format). Records keep attempt 1, so the report gives SCoRe's Acc@t1, Acc@t2, Δ(t1,t2),
  Δ(i→c), Δ(c→i).

A protocol wraps any engine (`hf`, `vllm`, `openai`) in another object with the same
`generate(prompts, params)`, so the eval stage runs one sampling loop for all of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from backtrack.errors import UserError
from backtrack.formats import THINK_CLOSE, second_attempt_prompt


@dataclass(frozen=True)
class Protocol:
    name: str
    summary: str
    wrap: Callable | None = None  # wrap(engine, tokenizer, config, messages_by_prompt) -> engine
    make_record: Callable | None = None  # (task, problem, prompt, idx, completion) -> record
    extra_metrics: Callable | None = None  # (records, task, config) -> {metrics, per_problem}
    # (eval config, evaluation) -> keyword options for make_record and extra_metrics (e.g. the
    # S²R cues the evaluated model was trained with)
    options: Callable | None = None
    # (matplotlib axes, {evaluation: metrics.json}) -> None: the protocol's plot in the report,
    # drawn when an evaluation ran under it; `plot_file` names the PNG
    plot: Callable | None = None
    plot_file: str = ""


class BudgetForcingEngine:
    """s1 budget forcing around any engine: cut each sample at its first `</think>`, put
    `phrase` there and continue once, with no checking.

    Samples that never close their reasoning are kept as they are. The continuation gets the
    full token budget again (the point of forcing is more thinking); its new tokens are added
    to those of the kept prefix (re-tokenised, since only text crosses the engine API).
    """

    def __init__(self, engine, tokenizer, phrase: str):
        self.engine, self.tokenizer, self.phrase = engine, tokenizer, phrase

    def generate(self, prompts: list[str], params) -> list[list]:
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

    def describe(self) -> dict:
        return self.engine.describe()

    def close(self) -> None:
        self.engine.close()


class TwoAttemptEngine:
    """Attempt 1 from the engine, then one attempt 2 per sample (see `second_attempt_prompt`).

    The returned completion is the final answer as a reader sees it (phrase form: attempt 1's
    cut text + phrase + attempt 2; instruction form: attempt 2's turn) with `new_tokens` =
    tokens generated over both attempts, so compute-matched comparisons count both; attempt 1
    travels in `extra` to the record.
    """

    def __init__(self, engine, tokenizer, form: str, text: str, messages_by_prompt: dict):
        self.engine, self.tokenizer, self.form, self.text = engine, tokenizer, form, text
        self.messages = messages_by_prompt

    def generate(self, prompts: list[str], params) -> list[list]:
        from backtrack.engines import Completion

        outputs = self.engine.generate(prompts, params)
        jobs = []  # (prompt index, sample index, attempt-2 prompt, carried attempt-1 text)
        for i, row in enumerate(outputs):
            for j, first in enumerate(row):
                second, carried = second_attempt_prompt(
                    self.tokenizer, self.messages.get(prompts[i], []), prompts[i], first.text,
                    first.finish_reason, self.form, self.text)
                jobs.append((i, j, second, carried))
        cont_params = dataclasses.replace(params, n=1, seed=params.seed + 1)
        continued = self.engine.generate([second for _, _, second, _ in jobs], cont_params)
        for (i, j, _, carried), (attempt2,) in zip(jobs, continued):
            first = outputs[i][j]
            outputs[i][j] = Completion(
                carried + attempt2.text, first.new_tokens + attempt2.new_tokens,
                attempt2.finish_reason,
                extra={"attempt1": first.text, "attempt1_finish_reason": first.finish_reason,
                       "attempt1_new_tokens": first.new_tokens, "second_attempt": self.form})
        return outputs

    def describe(self) -> dict:
        return self.engine.describe()

    def close(self) -> None:
        self.engine.close()


def _forcing(engine, tokenizer, config, messages_by_prompt):
    return BudgetForcingEngine(engine, tokenizer, config.forcing_phrase)


def _two_attempt(engine, tokenizer, config, messages_by_prompt):
    text = (config.second_attempt_instruction if config.second_attempt == "instruction"
            else config.second_attempt_phrase)
    return TwoAttemptEngine(engine, tokenizer, config.second_attempt, text, messages_by_prompt)


def two_attempt_record(task, problem, prompt, sample_idx, completion) -> dict:
    """A sample record plus attempt 1's extracted answer and correctness."""
    from backtrack.generation import sample_record

    record = sample_record(task, problem, prompt, sample_idx, completion)
    check = task.check(record["attempt1"], problem.answer)
    record.update(attempt1_extracted=check.extracted, attempt1_correct=bool(check.correct))
    return record


PROTOCOLS: dict[str, Protocol] = {}


def register(protocol: Protocol) -> Protocol:
    PROTOCOLS[protocol.name] = protocol
    return protocol


register(Protocol("single", "one trace per sample; in-trace backtracks counted"))
register(Protocol("forcing", "s1 budget forcing: a phrase in place of the first </think>, "
                  "then generation goes on once", wrap=_forcing))
register(Protocol("two_attempt", "attempt 1, then attempt 2 after an instruction turn or a "
                  "phrase (SCoRe's Acc@t1, Acc@t2, Δ)", wrap=_two_attempt,
                  make_record=two_attempt_record))


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise UserError(f"unknown protocol '{name}' (known: {', '.join(PROTOCOLS)})")
    return PROTOCOLS[name]


def protocol_plots(evaluations: dict[str, dict]) -> list[tuple]:
    """(file name, draw(ax)) of each protocol's own report plot, over the evaluations (name ->
    metrics.json) run under it; protocols without a plot or without evaluations give none."""
    from backtrack.arms import load_methods

    load_methods()  # method modules register their protocols
    rows = {name: {e: d for e, d in evaluations.items() if d.get("protocol") == name}
            for name in PROTOCOLS}
    return [(p.plot_file, lambda ax, p=p: p.plot(ax, rows[p.name]))
            for p in PROTOCOLS.values() if p.plot and rows[p.name]]
