"""The string layer of grading: canonical spelling of answers and the verdicts it settles.

Runs in process in microseconds, so the common cases (equal strings, exact numbers, text answers,
choice letters) never reach sympy; anything it cannot settle goes to the math-verify worker
(``tir_envs.grading.worker``) as the normalized strings made here.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import NamedTuple

from tir_envs.protocol import last_boxed

__all__ = ["Verdict", "normalize_answer", "string_verdict"]


class Verdict(NamedTuple):
    """A grading decision and the layer that made it (for logs, debugging and tests)."""

    correct: bool
    method: str
    """One of: empty, too_long, exact, number, text, math_verify, timeout, worker_error."""


_SPACING = re.compile(r"(?<!\\)\\[!,;:> ]|\\q?quad\b|~")  # not the row break ``\\ ``
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])|\\displaystyle")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")
_TEXT_WRAPPER = r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)"
_TRAILING_TEXT_UNIT = re.compile(
    rf"(?<=\S)\s*{_TEXT_WRAPPER}\{{\s*[a-zA-Z][a-zA-Z .]*\}}(\^\{{?\d\}}?)?$"
)
_PLAIN_NUMBER = r"[+-]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)"
_TRAILING_UNIT_WORDS = re.compile(
    rf"^({_PLAIN_NUMBER})\s+([a-zA-Z]{{2,}}(?:\s+[a-zA-Z]+)*)\.?(\^\d)?$"
)
_MATH_WORDS = frozenset(
    ("pi", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "inf", "infty")
    + ("oo", "nan", "i", "e", "arcsin", "arccos", "arctan")
)
_PERCENT = re.compile(r"(?<!\\)%")
# ``4.5 \times 10^{33}`` is Minerva's ``4.5e33``: one spelling, so the exact layer compares them.
_SCIENTIFIC = re.compile(r"^([+-]?\d+(?:\.\d+)?)\s*(?:\\times|\\cdot)\s*10\^\{?([+-]?\d{1,2})\}?$")
# Symbols models print outside LaTeX; the trailing space keeps ``πr`` from becoming ``\pir``.
_UNICODE_MATH = {
    "\u2212": "-",
    "\u2013": "-",
    "\u221e": "\\infty ",
    "\u03c0": "\\pi ",
    "\u00d7": "\\times ",
}


def normalize_answer(text: str) -> str:
    """Canonical spelling of an answer: no ``\\boxed``, ``$``, ``\\left``, spacing, units, degrees.

    Used for the cheap exact-match layer and as the text sent to math-verify; it never changes
    the value of an answer, only its spelling.
    """
    s = text.replace("\x00", "").strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed.strip()
    for symbol, latex in _UNICODE_MATH.items():
        s = s.replace(symbol, latex)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LEFT_RIGHT.sub("", s)
    s = _SPACING.sub(" ", s)
    s = _DEGREES.sub("", s)
    s = _PERCENT.sub(r"\\%", s)
    s = _TRAILING_TEXT_UNIT.sub("", s.strip())
    s = _SCIENTIFIC.sub(r"\1e\2", s)
    words = _TRAILING_UNIT_WORDS.match(s)
    if words and words.group(2).split()[0].lower() not in _MATH_WORDS:
        s = words.group(1)
    s = s.strip().rstrip(".").strip()
    # Drop whitespace except where it separates a command from a letter (``\pi r`` != ``\pir``).
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\x00", s)
    return re.sub(r"\s+", "", s).replace("\x00", " ")


_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d{1,2})?")
_INT_RATIO = re.compile(r"([+-]?)(\d{1,50})/(\d{1,50})")
_LATEX_FRAC = re.compile(r"([+-]?)\\frac(?:\{(\d{1,50})\}|(\d))(?:\{(\d{1,50})\}|(\d))")
_ASSIGNMENT = re.compile(r"([a-zA-Z])=(.+)")


def _exact_number(s: str) -> tuple[Fraction, bool] | None:
    """``(value, is_decimal)`` for a plain number, ``a/b`` or ``\\frac{a}{b}``; ``None`` otherwise.

    Exponents are capped at two digits so ``1e999999999`` cannot make us build a huge integer.
    """
    if len(s) > 120:
        return None
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _DECIMAL.fullmatch(s):
        try:
            return Fraction(Decimal(s)), not s.lstrip("+-").isdigit()
        except (InvalidOperation, ValueError):
            return None
    ratio = _INT_RATIO.fullmatch(s)
    if ratio:
        sign, numerator, denominator = ratio.groups()
    else:
        frac = _LATEX_FRAC.fullmatch(s)
        if not frac:
            return None
        sign, numerator, denominator = frac[1], frac[2] or frac[3], frac[4] or frac[5]
    if int(denominator) == 0:
        return None
    value = Fraction(int(numerator), int(denominator))
    return (-value if sign == "-" else value), False


def _text_answer(s: str, *, strict: bool) -> str | None:
    """Lower-cased words of a text answer (``\\text{Evelyn}`` -> ``evelyn``; ``(C)`` -> ``c``).

    ``strict`` (used for the gold side) only accepts what is clearly text: a ``\\text``-like
    wrapper, a parenthesized choice letter, or a bare word of 3+ letters that is not a math name.
    The predicted side is read leniently, so ``C`` matches a gold ``\\text{(C)}``.
    """
    inner, wrapped = s, False
    while True:
        match = re.fullmatch(rf"{_TEXT_WRAPPER}\{{(.*)\}}", inner)
        if not match:
            break
        inner, wrapped = match.group(1).strip(), True
    inner = inner.strip().rstrip(".")
    choice = re.fullmatch(r"\(([A-Za-z])\)|([A-Za-z])\)?", inner)
    if choice and (wrapped or inner.startswith("(") or not strict):
        return (choice.group(1) or choice.group(2)).lower()
    if not re.fullmatch(r"[A-Za-z][A-Za-z .'\-]*", inner):  # ``Mrs. Hilt``
        return None
    words = inner.lower()
    if strict and not wrapped and (len(words) < 3 or words in _MATH_WORDS):
        return None
    return re.sub(r"[\s\-]+", " ", words)


def string_verdict(pred: str, gold: str) -> Verdict | None:
    """Decide from normalized strings when that is conclusive; ``None`` defers to math-verify."""
    if pred == gold:
        return Verdict(True, "exact")
    gold_text = _text_answer(gold, strict=True)
    if gold_text is not None:
        return Verdict(_text_answer(pred, strict=False) == gold_text, "text")
    pred_assign, gold_assign = _ASSIGNMENT.fullmatch(pred), _ASSIGNMENT.fullmatch(gold)
    if pred_assign and gold_assign and pred_assign[1] != gold_assign[1]:
        return None  # different variable names: let math-verify judge the relation
    pred_value = _exact_number(pred_assign[2] if pred_assign else pred)
    gold_value = _exact_number(gold_assign[2] if gold_assign else gold)
    if pred_value is None or gold_value is None:
        return None
    if pred_value[0] == gold_value[0]:
        return Verdict(True, "number")
    if not pred_value[1] and not gold_value[1]:
        return Verdict(False, "number")  # two exact rationals that differ: conclusive
    return None  # a decimal against another value: math-verify's rounding policy decides
