"""Answer checking: find a completion's final answer and compare it with the gold value.

This is the reward behind "verifiable" backtracking, so it must agree with a careful human
grader on real model outputs. The rules, in order:

1. Only the final part of a completion counts: the text after the last `</think>`; text after
   an unclosed `<think>` (a truncated trace) is not a final answer; an end-of-turn token or a
   hallucinated next question ("\\n\\nQuestion: ...", typical of few-shot base models) ends it.
2. Answer statements (`#### N`, `\\boxed{N}`, "The (final) answer is N", "Answer: N", "A: N",
   with markdown bold / LaTeX / currency around them) win over prose; the LAST one counts, so a
   trace that backtracks ("The answer is 12. Wait, ... The answer is 14.") is graded on 14. A
   statement directly followed by a retraction ("Wait, that's not right") no longer counts.
3. Without a statement, the last number of the final text is the answer (step numbers and list
   markers are skipped).

Numbers compare exactly as fractions, so "18.00" = "18", "0.5" = "1/2", "$1,080." = "1080".
math-verify handles what this module's small number grammar does not (LaTeX expressions in
`\\boxed{}` and non-numeric LaTeX gold values); plain GSM8K numbers never reach it, which keeps
checking fast and deterministic. No library extracts GSM8K-style final answers with these
rules (math-verify's own extraction takes the first match and has no think/retraction logic),
hence the hand-written extraction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from backtrack.answer_values import (
    LEAD_RE, NUMBER_RE, WORD_RE, canonical, eval_arithmetic, latex_number, latex_parse,
    math_verify_timeout, parse_number, strip_latex, surface,
)
from backtrack.formats import END_OF_TURN_MARKERS

_ANSWER_RE = re.compile(
    r"(?<![\w])(?:(?:final|correct|right)\s+)?answer"
    r"(?:\s+to\s+(?:the|this)\s+(?:question|problem))?(?:\s*(?:\*\*|__))?\s*"
    r"(?:(?:is|would\s+be|will\s+be|should\s+be|must\s+be|comes\s+(?:out\s+)?to)\b\s*:?|[:=])",
    re.IGNORECASE)
_A_LABEL_RE = re.compile(r"(?m)^[ \t]*(?:\*\*|__)?A(?:\*\*|__)?[ \t]*:")
_HASHES_RE = re.compile(r"(?<!#)####(?!#)")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NEXT_TURN_RE = re.compile(
    r"\n\s*(?:Q:|Question\s*\d*:|Problem\s*\d*:|Human:|User:|#+\s*(?:Question|Problem|Instruction)"
    r"|<\|(?:user|im_start)\|>)", re.IGNORECASE)
_END_OF_TURN_RE = re.compile("|".join(map(re.escape, END_OF_TURN_MARKERS)))
_RETRACT_RE = re.compile(
    r"[\s.!*$}]*(?:(?:but )?wait\b|hmm+\b|oops\b|actually\b|hold on\b|scratch that|no,"
    r"|(?:that|this)(?:'s| is) (?:not right|not correct|wrong|incorrect)"
    r"|i made an? (?:mistake|error)|let me re-?(?:calculate|compute|do|think|consider|evaluate))",
    re.IGNORECASE)
_STEP_RE = re.compile(r"(?:step|part|case|question|problem|option)\s*#?$", re.IGNORECASE)
_LIST_ITEM_RE = re.compile(r"[.)][ \t]+[A-Za-z*]")
_BOLD_RE = re.compile(r"\*\*(?:[A-Za-z ]{1,20}:\s*)?([^*\n]{1,40})\*\*")
_FOLLOW_RE = re.compile(r"[ \t]*(?:[-+*/×÷^=]|\\times|\\cdot|x[ \t]*\$?\d)")
_EXPRESSION_RE = re.compile(r"[-+*/×÷x\d.,()$ ]+")
_SENTENCE_END_RE = re.compile(r"[.!?](?=\s)|\n")


@dataclass(frozen=True)
class CheckResult:
    extracted: str | None  # the final answer found in the completion, or None
    correct: bool


@dataclass(frozen=True)
class _Found:
    value: str  # surface form of the answer, e.g. "1,080" or "\frac{1}{2}"
    start: int  # where the answer statement starts (sentence start)
    end: int  # where it ends


# ---------------------------------------------------------------- extraction


def _final_region(text: str) -> tuple[int, int]:
    """Span of `text` that may hold the final answer (see rule 1 in the module docstring)."""
    close = text.rfind("</think>")
    start = close + len("</think>") if close >= 0 else 0
    opened = text.find("<think>", start)
    end = opened if opened >= 0 else len(text)
    stop = _END_OF_TURN_RE.search(text, start, end)
    return start, stop.start() if stop else end


def _sentence_start(text: str, pos: int, floor: int) -> int:
    start = floor
    for match in _SENTENCE_END_RE.finditer(text, floor, pos):
        start = match.end()
    while start < pos and text[start].isspace():
        start += 1
    return start


def _marker_value(text: str, pos: int, hashes: bool = False) -> tuple[str, int] | None:
    """The number right after an answer marker ending at `pos`: (surface, end) or None."""
    lead = LEAD_RE.match(text, pos)
    at = lead.end() if lead else pos
    match = NUMBER_RE.match(text, at)
    if match is None and text.startswith("(", at):  # "(16 - 3 - 4) * 2"
        expr = _EXPRESSION_RE.match(text, at).group(0).rstrip(" .,")
        value = eval_arithmetic(expr)
        return (canonical(value), at + len(expr)) if value is not None else None
    if match is None:
        word = WORD_RE.match(text, at)
        if word and not re.match(r"[- ]?\w", text[word.end():word.end() + 2]):
            return word.group("word"), word.end()
        return None
    line_start = text.rfind("\n", 0, match.start()) + 1
    listy = hashes or not text[line_start:match.start()].strip()
    if listy and _LIST_ITEM_RE.match(text, match.end()):
        return None  # "1. First, ..." is a list item, not an answer
    if _FOLLOW_RE.match(text, match.end()):  # "9 * 2 = 18": the value is after the last "="
        line_end = text.find("\n", match.end())
        line = text[match.end(): line_end if line_end >= 0 else len(text)]
        cut = re.search(r"[.!?](?:\s|$)", line)
        line = line[: cut.start()] if cut else line
        if "=" in line:
            return _marker_value(text, match.end() + line.rindex("=") + 1)
        expr = _EXPRESSION_RE.match(text, match.start()).group(0).rstrip(" .,")
        value = eval_arithmetic(expr) if re.search(r"[*×x÷+]", expr) else None
        if value is not None:  # "The answer is 9 * 2." ("-" alone may be a range: 10-15)
            return canonical(value), match.start() + len(expr)
    return surface(match), match.end()


def _boxed_candidates(text: str) -> list[_Found]:
    boxes = list(_BOXED_RE.finditer(text))
    if not boxes:
        return []
    closing, stack = {}, []  # one pass pairs every "{" with its "}" (linear on any input)
    for pos, char in enumerate(text):
        if char == "{":
            stack.append(pos)
        elif char == "}" and stack:
            closing[stack.pop()] = pos
    found = []
    for match in boxes:
        end = closing.get(match.end() - 1)
        if end is None:
            continue  # unclosed box: truncated output
        content = text[match.end(): end].strip()
        number = NUMBER_RE.search(strip_latex(content))
        if number and parse_number(content):  # "\$1,080" -> "1,080"
            content = surface(number)
        if content:
            found.append(_Found(content, match.start(), end + 1))
    return found


def _marker_candidates(text: str) -> list[_Found]:
    """Every answer statement in `text` whose value can be read."""
    found = _boxed_candidates(text)
    for regex, hashes in ((_ANSWER_RE, False), (_A_LABEL_RE, False), (_HASHES_RE, True)):
        for match in regex.finditer(text):
            rest = text[match.end(): match.end() + 12].lower().lstrip(" *:")
            if rest.startswith(("not ", "n't")):
                continue
            value = _marker_value(text, match.end(), hashes)
            if value is not None:
                found.append(_Found(value[0], match.start(), value[1]))
    return sorted(found, key=lambda f: (f.end, f.start))


def _prose_candidate(text: str, floor: int = 0) -> _Found | None:
    """The answer of prose without a statement: in the last sentence that holds a number, the
    number after its last "=" ("... 10 x 5 = 50 miles for 5 days."), else its last number.
    Step numbers, list markers and ordinals ("the 3rd day") are skipped."""
    numbers = []
    for match in NUMBER_RE.finditer(text, floor):
        before = text[max(0, match.start() - 12): match.start()]
        if _STEP_RE.search(before.rstrip()):
            continue
        line_start = text.rfind("\n", 0, match.start()) + 1
        if not text[line_start:match.start()].strip() and _LIST_ITEM_RE.match(text, match.end()):
            continue
        numbers.append(match)
    if not numbers:
        return None
    sentence = _sentence_start(text, numbers[-1].start(), floor)
    chosen = numbers[-1]
    equals = text.rfind("=", sentence, chosen.start())
    if equals >= 0:
        chosen = next(m for m in numbers if m.start() > equals)
    return _Found(surface(chosen), max(sentence, floor), chosen.end())


def _bold_candidate(text: str) -> _Found | None:
    """A bold number ("Janet makes **$18** a day.") in the final paragraph, unless a later
    "=" shows the reasoning went on; it beats the last number of a trailing remark."""
    numbers = list(NUMBER_RE.finditer(text))
    if not numbers:
        return None
    last = numbers[-1].start()
    breaks = [m.start() for m in re.finditer(r"\n\s*\n", text) if m.start() < last]
    threshold = max(text.rfind("="), breaks[-1] if breaks else -1)
    for match in reversed(list(_BOLD_RE.finditer(text))):
        if match.end() <= threshold:
            return None
        number = NUMBER_RE.search(match.group(1))
        if number and parse_number(match.group(1)[number.start():]) is not None:
            return _Found(surface(number), match.start(), match.end())
    return None


def _find_final(text: str) -> _Found | None:
    start, end = _final_region(text)
    region = text[start:end]
    markers = _marker_candidates(region)
    if markers:  # drop a hallucinated next question (few-shot base models) and what follows
        cut = _NEXT_TURN_RE.search(region, markers[0].end)
        if cut:
            region = region[: cut.start()]
            markers = [m for m in markers if m.end <= cut.start()]
    found = markers[-1] if markers else (_bold_candidate(region) or _prose_candidate(region))
    if markers and _RETRACT_RE.match(region, found.end):
        found = _prose_candidate(region, _RETRACT_RE.match(region, found.end).end())
    if found is None:
        return None
    sentence = _sentence_start(region, found.start, 0)
    return _Found(found.value, sentence + start, found.end + start)


# ---------------------------------------------------------------- public API


def extract_answer(text: str) -> str | None:
    """The completion's final answer as written (e.g. "1,080"), or None when it gives none."""
    found = _find_final(text or "")
    return found.value if found else None


def final_answer_span(text: str) -> tuple[int, int] | None:
    """Character span of the last answer statement (e.g. "The answer is 12."), or None."""
    found = _find_final(text or "")
    if found is None:
        return None
    end = found.end
    while end < len(text) and text[end] in "$}*.!)":
        end += 1
    return found.start, end


def _numeric_value(text: str) -> str | None:
    """Canonical number read from plain text or, failing that, from LaTeX."""
    parsed = parse_number(text)
    if parsed is not None:
        return canonical(parsed[0])
    if "\\" in text or "^" in text:
        value = latex_number(text)
        if value is not None:
            return canonical(value)
    return None


def normalize_answer(text: str | None) -> str | None:
    """Canonical form of an answer for equality and majority vote ("$18.00" -> "18")."""
    if text is None:
        return None
    value = _numeric_value(text)
    if value is not None:
        return value
    cleaned = " ".join(strip_latex(text).split()).strip(" .").lower()
    return cleaned or None


def parse_gold(answer: str) -> str:
    """Canonical gold value from a GSM8K solution ("... #### 72") or a bare value.

    Raises ValueError when no value can be read (e.g. empty, "#### ", or plain words).
    """
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    text = text.strip()
    value = _numeric_value(text)
    if value is not None:
        return value
    if ("\\" in text or "^" in text) and latex_parse(text):
        return text  # a non-numeric LaTeX answer such as \sqrt{2}
    raise ValueError(f"cannot read a gold answer from {answer!r}")


def answers_match(extracted: str | None, gold: str) -> bool:
    """Whether an extracted answer equals a canonical gold value (see `parse_gold`)."""
    if extracted is None:
        return False
    pred = parse_number(extracted)
    if pred is None and ("\\" in extracted or "^" in extracted):
        value = latex_number(extracted)
        pred = (value, False) if value is not None else None
    gold_value = parse_number(gold)
    if pred is not None and gold_value is not None:
        # "25%" is right for a gold of 25 (GSM8K's percent questions) and of 0.25;
        # "$4 million" is right for a gold of 4 (in millions) and of 4000000.
        options = {pred[0]}
        plain = parse_number(re.sub(r"(?i)\s(?:thousand|million|billion)\b", "", extracted))
        if plain is not None:
            options.add(plain[0])
        if pred[1]:
            options |= {value / 100 for value in options}
        return gold_value[0] in options
    if normalize_answer(extracted) == normalize_answer(gold):
        return True
    if gold_value is None and "\\" in gold:
        from math_verify import verify

        return bool(verify(latex_parse(gold), latex_parse(extracted),
                           timeout_seconds=math_verify_timeout()))
    return False


def check_answer(completion: str, gold: str) -> CheckResult:
    """Grade a completion against a gold answer (GSM8K solution or bare value)."""
    gold_value = parse_gold(gold)
    extracted = extract_answer(completion)
    return CheckResult(extracted=extracted, correct=answers_match(extracted, gold_value))
