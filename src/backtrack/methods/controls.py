"""`rft_fix`: the coverage control of verifiable backtracking.

rft_bt adds, for problems the model got wrong, traces that end in a verified right answer. A
gain over rft could then come from coverage (right solutions for exactly the hard problems)
rather than from the backtracking format. `rft_fix` adds the same right solutions without the
wrong attempt and the phrase: one clean solution per wrong-then-right trace that rft_bt keeps
(same traces, same order, so both arms hold as many examples for the same problems). rft_bt
beating rft_fix is the evidence that the format itself helps.

A clean solution is the trace's corrected continuation re-rendered as a complete answer:
- the continuation is the model's text after the phrase in the first round that checked right
  (`chain[r].completion`), taken as written, leading whitespace dropped;
- it is opened the way the model opened its own first attempt: that attempt's `<think>` and
  the whitespace after it (`<think>\\n` in the toy world; nothing when the attempt has no
  `<think>`, or when the continuation opens its own);
- so in the toy format `<think>\\n3 + 1 = 5\\n...</think>\\nThe answer is 10.` + phrase +
  `\\n3 + 1 = 4\\n4 * 2 = 8\\n</think>\\nThe answer is 8.` gives
  `<think>\\n3 + 1 = 4\\n4 * 2 = 8\\n</think>\\nThe answer is 8.`, the shape of a right first
  attempt. A continuation that redoes only the later steps gives a solution without the
  earlier ones: the control holds what the model wrote after the phrase, nothing more.
It is dropped (and counted) when it is not clean: it retries again (a retry phrase of the
eval's default backtrack pattern), it opens `<think>` but reasons nothing before `</think>`
(a bare answer is no solution), or it does not check right on its own.
"""

from __future__ import annotations

from backtrack.arms import Arm, register
from backtrack.build import Example, prompt_text, require_keys
from backtrack.formats import THINK_CLOSE, THINK_OPEN
from backtrack.methods.rft import build_rft, first_right_step, unique_traces

DROP_REASONS = ("retry", "no_reasoning", "not_right_alone")


def think_opening(attempt: str) -> str:
    """The attempt's `<think>` and the whitespace after it ("" when it has no `<think>`)."""
    start = attempt.find(THINK_OPEN)
    if start < 0:
        return ""
    end = start + len(THINK_OPEN)
    while end < len(attempt) and attempt[end].isspace():
        end += 1
    return attempt[start:end]


def clean_solution(record: dict, where: str) -> str | None:
    """The corrected continuation of a wrong-then-right record as a whole answer (see the
    module docstring); None when no round checked right."""
    step = first_right_step(record, where)
    if step is None:
        return None
    body = step["completion"].lstrip()
    opening = "" if body.startswith(THINK_OPEN) else think_opening(record["chain"][0]["completion"])
    return opening + body


def why_not_clean(text: str, answer: str, task) -> str | None:
    """The reason a clean-solution candidate is dropped (one of DROP_REASONS), or None."""
    from backtrack.metrics import count_backtracks

    if count_backtracks(text):
        return "retry"
    if text.startswith(THINK_OPEN):
        close = text.find(THINK_CLOSE)
        reasoning = text[len(THINK_OPEN):close if close >= 0 else len(text)]
        if not reasoning.strip():
            return "no_reasoning"
    if not task.check(text, answer).correct:
        return "not_right_alone"
    return None


def fix_examples(records: list[dict], tokenizer, task, where: str):
    """One clean solution per trace rft_bt keeps (identical clean texts are kept as often as
    their traces, so the two arms weight each problem alike)."""
    traces, _ = unique_traces(records, where)
    examples, dropped = [], dict.fromkeys(DROP_REASONS, 0)
    for record, _text, _wrong_end in traces:
        require_keys(record, ("answer",), where)
        text = clean_solution(record, where)
        reason = why_not_clean(text, str(record["answer"]), task)
        if reason:
            dropped[reason] += 1
            continue
        prompt = prompt_text(tokenizer, record["prompt"], where)
        examples.append(Example(str(record["problem_id"]), "fix", prompt, text))
    return examples, {"traces": len(traces), "dropped": dropped}


def build_rft_fix(context) -> tuple[list[Example], dict]:
    """The rft examples, then the clean corrected solution of every wrong-then-right trace."""
    examples, info = build_rft(context)
    fixes, fix_info = fix_examples(context.traces(), context.tokenizer, context.task(),
                                   str(context.layout.backtrack))
    return examples + fixes, {**info, "fix_examples": len(fixes),
                              "fix_traces": fix_info["traces"],
                              "fix_dropped": fix_info["dropped"]}


register(Arm("rft_fix", "rft plus each wrong -> right trace's correction as a clean solution "
             "(coverage control)", training="sft", build=build_rft_fix,
             reads=("sample", "backtrack"), compare_with=("rft_bt", "rft")))
