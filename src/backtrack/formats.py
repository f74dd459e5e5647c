"""The output format in one place: think tags, retry phrases, second-attempt prompts, S²R cues.

Every method writes or reads the same few strings (the `</think>` a wrong trace is cut at, the
phrase put in its place, SCoRe's correction instruction, S²R's verify and retry cues), so they
live here rather than in each stage. Two ways to ask for a second attempt exist:
- `phrase`: the first attempt is cut where it ended its reasoning and a retry phrase goes in
  place of `</think>`, in the same assistant turn (verifiable backtracking's own format, which
  the toy corpus holds);
- `instruction`: the first attempt stays a finished assistant turn and a user turn carrying an
  instruction follows (SCoRe's format for instruct models).
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Tokens that end an assistant turn in common chat templates (ChatML, Llama 3, Gemma, GPT-2).
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>",
                       "<end_of_turn>", "</s>")

PHRASE_PRESETS = {"mild": "Wait, that's not right...", "strong": "Wait, that's definitely wrong..."}

SCORE_INSTRUCTION = (
    "There might be an error in the solution above because of lack of understanding of the "
    "question. Please correct the error, if any, and rewrite the solution.")

# S²R (Ma et al. 2025): a verification after each attempt, then a retry when it says wrong.
S2R_VERIFY_CUE = "Wait, let me recheck my solution."
S2R_VERDICT_WRONG = "So the answer is wrong."
S2R_VERDICT_CORRECT = "So the answer is correct."
S2R_RETRY_CUE = "Let me try again."

SECOND_ATTEMPT_FORMS = ("phrase", "instruction")


def cut_point(text: str, finish_reason: str) -> int:
    """Where a trace is cut to retry it: before its last `</think>`; else, if generation was
    truncated, after its last complete line; else before the final answer statement (at the end
    when there is none). Spaces before a tag or answer go with the cut-off part, so the kept
    text ends where a token ends and the phrase starts a fresh token."""
    close = text.rfind(THINK_CLOSE)
    if close < 0 and finish_reason == "length":
        return text.rfind("\n") + 1
    if close >= 0:
        cut = close
    else:
        from backtrack.checking import final_answer_span

        span = final_answer_span(text)
        cut = span[0] if span else len(text)
    while cut > 0 and text[cut - 1] in " \t":
        cut -= 1
    return cut


def insertion(prefix: str, phrase: str) -> str:
    """The text inserted after the cut: the phrase, on a new line unless the prefix already
    ends in whitespace (or is empty), so it reads as the model's next thought."""
    return phrase if not prefix or prefix[-1].isspace() else "\n" + phrase


def phrase_retry_text(attempt: str, finish_reason: str, phrase: str) -> str:
    """Assistant text that asks for a second attempt in the same turn: the first attempt cut
    where it ended its reasoning, then the phrase."""
    prefix = attempt[:cut_point(attempt, finish_reason)]
    return prefix + insertion(prefix, phrase)


def second_attempt_prompt(tokenizer, messages: list[dict], prompt: str, attempt: str,
                          finish_reason: str, form: str, text: str) -> tuple[str, str]:
    """(prompt for attempt 2, the attempt-1 part that prompt carries after `prompt`).

    `prompt` is the rendered attempt-1 prompt; `text` is the phrase (`form="phrase"`) or the
    user instruction (`form="instruction"`). In the phrase form attempt 2 continues the same
    assistant turn, so the final answer is attempt 1's cut text + phrase + attempt 2.
    """
    if form == "phrase":
        carried = phrase_retry_text(attempt, finish_reason, text)
        return prompt + carried, carried
    if form == "instruction":
        from backtrack.chat import render_prompt

        turns = messages + [{"role": "assistant", "content": attempt},
                            {"role": "user", "content": text}]
        return render_prompt(tokenizer, turns), ""
    raise ValueError(f"second attempt form must be one of {SECOND_ATTEMPT_FORMS}, got {form!r}")
