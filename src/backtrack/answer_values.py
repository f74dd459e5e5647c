"""Numbers in model answers: a small grammar for how people write them, exact values, and
canonical strings.

Grading compares exact fractions, so "18.00" = "18", "0.5" = "1/2", "$1,080." = "1080",
"3 1/2" = "3.5", "\\frac{3}{4}" = "0.75". The grammar covers currency signs, thousands
separators (also LaTeX `{,}` and `\\,`), percentages, "million", number words up to
ninety-nine, mixed numbers and simple arithmetic ("9 * 2"). LaTeX beyond that goes to
math-verify, whose parser this module wraps (see `math_verify_timeout`).
"""

from __future__ import annotations

import ast
import operator
import re
import threading
from decimal import Decimal, localcontext
from fractions import Fraction

CURRENCY = r"(?:\\\$|\$|€|£|¥|₹|USD[ ]?|EUR[ ]?|Rs\.?[ ]?)"
NUMBER_RE = re.compile(r"""
    (?<![\w.,/]) (?P<sign>[-−])? [ ]? """ + CURRENCY + r"""? [ ]? (?P<sign2>-)?
    (?: (?P<latex>\\[dt]?frac\s*\{\s*(?P<ln>-?\d+(?:\.\d+)?)\s*\}
                              \s*\{\s*(?P<ld>\d+(?:\.\d+)?)\s*\})
      | (?P<time>\d{1,2}:\d{2}) (?![\d:])                       # 3:00 pm
      | (?: (?P<whole>\d{1,3}) [ ] (?=\d{1,2}/\d{1,2}(?![\d/]|\.\d)) )?   # mixed: 3 1/2
        (?P<num> \d{1,3}(?:(?:,|\{,\}|\\,)\d{3})+(?!\d)(?:\.\d+)?        # 1,080  1{,}080
               | \d+(?:\.\d+)? | \.\d+ )
        (?: [ ]?/[ ]? (?P<den>\d+(?:\.\d+)?) (?![\d,/]) )?      # 1/2
    ) (?!\d|st\b|nd\b|rd\b|th\b)                                # not "13th"
    (?P<pct>[ ]?(?:\\?%|percent\b))?
    (?P<mult>[ ](?:thousand|million|billion)\b)?
    """, re.IGNORECASE | re.VERBOSE)
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
          "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
WORD_RE = re.compile(r"(?P<word>(?:%s)(?:[- ](?:%s))?|%s)\b" % (
    "|".join(_TENS), "|".join(_WORDS[1:10]), "|".join(_WORDS)), re.IGNORECASE)
_MULTIPLIERS = {"thousand": 1000, "million": 10**6, "billion": 10**9}
# What may sit between an answer marker and its value.
LEAD_RE = re.compile(
    r"(?:\s+|\*\*|__|[:=≈~]|\\[(\[]|\$|\\boxed\s*\{|\\(?:text|textbf|mathbf|mathrm)\s*\{"
    r"|(?:approximately|approx\.|about|around|roughly|exactly|only|just|a total of|total of"
    r"|equal to|equals|that|therefore|thus|then|simply|clearly|indeed|actually|now)\b)*",
    re.IGNORECASE)


def fraction_of(match: re.Match) -> Fraction | None:
    """The value of a `NUMBER_RE` match (a time like 3:30 has none; 3:00 is 3)."""
    if match.group("latex"):
        num, den = Fraction(match.group("ln")), Fraction(match.group("ld"))
    elif match.group("time"):
        hours, minutes = match.group("time").split(":")
        if minutes != "00":
            return None
        num, den = Fraction(int(hours)), Fraction(1)
    else:
        num = Fraction(re.sub(r"[^\d.]", "", match.group("num")))
        den = Fraction(match.group("den")) if match.group("den") else Fraction(1)
    if den == 0:
        return None
    value = num / den + int(match.group("whole") or 0)  # "3 1/2" is 3.5
    if match.group("mult"):
        value *= _MULTIPLIERS[match.group("mult").strip().lower()]
    if match.group("sign") or match.group("sign2"):
        value = -value
    return value


def surface(match: re.Match) -> str:
    """A number as written, without its currency sign: "-$1,080" -> "-1,080"."""
    return re.sub(CURRENCY + r"[ ]?", "", match.group(0).strip(), count=1).replace(" -", "-")


def _word_value(word: str) -> Fraction:
    parts = re.split(r"[- ]", word.lower())
    total = 0
    for part in parts:
        total += _WORDS.index(part) if part in _WORDS else 20 + 10 * _TENS.index(part)
    return Fraction(total)


def canonical(value: Fraction) -> str:
    """'18', '-2.5' (terminating decimals) or '1/3' (others): one string per number."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    with localcontext() as ctx:
        ctx.prec = 60
        text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def parse_number(text: str) -> tuple[Fraction, bool] | None:
    """(value, is_percent) when `text` is one number (currency, units and LaTeX allowed)."""
    text = strip_latex(text.strip()).strip().rstrip(".!").strip()
    lead = LEAD_RE.match(text)
    pos = lead.end() if lead else 0
    match = NUMBER_RE.match(text, pos)
    if match is None:
        word = WORD_RE.fullmatch(text, pos)
        return (_word_value(word.group("word")), False) if word else None
    rest = text[match.end():].strip()
    if rest and not re.fullmatch(r"[A-Za-z][A-Za-z .'/-]{0,40}|\(.{0,40}\)", rest):
        return None  # more than a unit word after the number: not a single value
    value = fraction_of(match)
    return (value, bool(match.group("pct"))) if value is not None else None


def strip_latex(text: str) -> str:
    text = re.sub(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}", r" \1 ", text)
    text = re.sub(r"\\boxed\s*\{(.*)\}", r"\1", text)
    text = text.replace("{,}", ",").replace("\\,", "").replace("\\!", "").replace("\\ ", " ")
    text = re.sub(r"\\[()\[\]]|\$(?=\s*$)|^\s*\$(?=\s*[\\\d-])", "", text)
    return text.replace("−", "-")


def math_verify_timeout() -> int | None:
    """math-verify times out with signal.alarm, which only works on the main thread; elsewhere
    (e.g. a thread pool in a server) we pass None and rely on inputs being short."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def latex_parse(text: str) -> list:
    from math_verify import parse

    latex = text if "$" in text or "\\boxed" in text else f"${text}$"
    return parse(latex, parsing_timeout=math_verify_timeout())


def latex_number(text: str) -> Fraction | None:
    """A LaTeX expression's exact rational value via math-verify (e.g. 2^{3}, \\dfrac{9}{3})."""
    import sympy

    if len(text) > 300:  # an answer, not a derivation; keeps sympy's simplify bounded
        return None
    for item in latex_parse(text):
        if isinstance(item, sympy.Basic) and item.is_number:
            value = sympy.nsimplify(item) if item.is_Float else sympy.simplify(item)
            if value.is_Rational:
                return Fraction(int(value.p), int(value.q))
    return None


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv}
_ARITHMETIC_RE = re.compile(r"[-+*/×÷x\d.,() ]+")


def eval_arithmetic(text: str) -> Fraction | None:
    """Exact value of plain arithmetic such as "9 * 2" or "(16 - 3 - 4) x $2", else None.

    Walks Python's own expression tree, allowing only numbers and + - * /, so nothing is
    executed; an answer written as a sum ("The answer is 9 * 2.") is graded on its value.
    """
    expr = re.sub(CURRENCY, "", text).replace("×", "*").replace("÷", "/").replace("x", "*")
    if not _ARITHMETIC_RE.fullmatch(expr) or len(expr) > 200:
        return None
    expr = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expr)

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError("not arithmetic")

    try:
        return value(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None
