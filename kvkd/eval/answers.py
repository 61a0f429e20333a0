"""Answer extraction and checking: numeric (GSM8K-style) and mathematical (MATH, via math-verify).

Typical use::

    pred = extract_answer(generation)          # "The answer is: 1,200." -> "1200"
    ok = answers_match(pred, example.answer)   # numeric, 1e-6 relative tolerance

    ok = answers_match(generation, example.answer, mode="math")  # MATH: LaTeX equivalence

Generations should be cut at the decoder's stop strings first: a model that goes on to invent
the next few-shot question ("Question: ... The answer is 7") would otherwise be scored on it.
"""

from __future__ import annotations

import math
import re
import threading
from decimal import Decimal, DivisionByZero, InvalidOperation

from kvkd.data import find_numbers, parse_number

__all__ = ["MATCH_MODES", "answers_match", "extract_answer", "extract_boxed", "wilson_interval"]

MATCH_MODES = ("numeric", "math")

# "The answer is", "the final answer is:", "Answer:", "####" (GSM8K). The number must follow on
# the same line (or the next non-empty one if the marker ends its line), before the next marker.
_ANCHOR_RE = re.compile(r"####|\banswer\s*(?:is\b|:)", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_NOISE_RE = re.compile(r"\\text\{[^{}]*\}|\\mbox\{[^{}]*\}|\^\{?\\circ\}?|\\[!,;: ]|\{,\}|\\%|%|\\left|\\right")
_FRACTION_RE = re.compile(r"(-?)\s*(?:\\[dt]?frac\{(\d+)\}\{(\d+)\}|(\d+)\s*/\s*(\d+))")
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_LATEX_SPACING_RE = re.compile(r"\\[!,;: ]|\\left|\\right|\s+|\$")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced.

    Returns:
        The LaTeX inside the braces, verbatim, or None if there is no complete box.
    """
    found = None
    for m in _BOXED_RE.finditer(text):
        content = _braced(text, m.end())
        found = content if content is not None else found
    return found


def _braced(text: str, start: int) -> str | None:
    """Text from ``start`` up to the brace closing the one just before it, or None."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def _boxed_number(content: str) -> str | None:
    """A number from boxed LaTeX: plain (``\\$1,\\!200``, ``50\\%``) or a simple fraction."""
    cleaned = _BOXED_NOISE_RE.sub("", content).strip()
    number = parse_number(cleaned, strict=True)
    if number is not None:
        return number
    m = _FRACTION_RE.fullmatch(cleaned)
    if m:
        num, den = (m[2], m[3]) if m[2] else (m[4], m[5])
        try:
            value = Decimal(num) / Decimal(den)
        except (DivisionByZero, InvalidOperation):
            return None
        return parse_number(("-" if m[1] else "") + format(value, "f"))
    numbers = find_numbers(cleaned)
    return numbers[0] if numbers else None


def extract_answer(text: str) -> str | None:
    """The final numeric answer in a model's output.

    Prefers the number introduced by the *last* answer marker: ``The answer is`` / ``answer:``
    / ``####`` (the first number after it on its line, or on the next non-empty line if the
    marker ends its line) or ``\\boxed{...}`` (its content; a simple ``\\frac{a}{b}`` or
    ``a/b`` there is evaluated). Without a usable marker, takes the last number in the text.
    Numbers are normalised as by :func:`kvkd.data.parse_number`: ``"-1,200.50"`` ->
    ``"-1200.5"``, ``"42."`` -> ``"42"``.

    Args:
        text: a generation, ideally already cut at the stop strings.
    Returns:
        The normalised number, or None if the text holds no number.
    """
    candidates: list[tuple[int, str]] = []  # (position of the marker, number)
    anchors = list(_ANCHOR_RE.finditer(text))
    for k, m in enumerate(anchors):
        stop = anchors[k + 1].start() if k + 1 < len(anchors) else len(text)
        window = text[m.end():stop].split("\n", 1)[0]
        if window.strip() == "":  # "The answer is:\n42"
            window = text[m.end():stop].lstrip().split("\n", 1)[0]
        numbers = find_numbers(window)
        if numbers:
            candidates.append((m.start(), numbers[0]))
    for m in _BOXED_RE.finditer(text):
        content = _braced(text, m.end())
        number = _boxed_number(content) if content is not None else None
        if number is not None:
            candidates.append((m.start(), number))
    if candidates:
        return max(candidates, key=lambda c: c[0])[1]
    numbers = find_numbers(text)
    return numbers[-1] if numbers else None


def _numeric_match(pred: str, gold: str) -> bool:
    gold_number = parse_number(gold)
    if gold_number is None:
        raise ValueError(f"gold answer {gold!r} is not a number; compare LaTeX answers with mode='math'")
    pred_number = parse_number(pred)
    if pred_number is None:
        return False
    a, b = float(pred_number), float(gold_number)
    return a == b or math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)


def _math_input(answer: str) -> str:
    """Wrap a bare LaTeX answer in ``$...$``: math-verify's parse misreads unwrapped LaTeX
    (``\\left( 3, \\frac{\\pi}{2} \\right)`` parses as 3, ``p - q`` not at all)."""
    if _UNESCAPED_DOLLAR_RE.search(answer) or any(t in answer for t in ("\\boxed", "\\(", "\\[")):
        return answer
    return f"${answer.strip()}$"


def _normalise_latex(answer: str) -> str:
    """Fallback form for string comparison: unwrap ``\\text{}``, drop spacing and ``$``."""
    text = _TEXT_WRAPPER_RE.sub(r"\1", answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    return _LATEX_SPACING_RE.sub("", text).rstrip(".")


def _math_match(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    # math-verify times out with signal.alarm, which works only in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(_math_input(gold), parsing_timeout=timeout)
    pred_parsed = parse(_math_input(pred), parsing_timeout=timeout)
    if gold_parsed and pred_parsed:
        return verify(gold_parsed, pred_parsed, timeout_seconds=timeout)
    pred_text, gold_text = _normalise_latex(pred), _normalise_latex(gold)
    return bool(gold_text) and pred_text == gold_text


def answers_match(pred: str | None, gold: str, mode: str = "numeric") -> bool:
    """Whether a predicted answer equals the gold one.

    Args:
        pred: the prediction; None (nothing extracted) never matches. For ``"numeric"``, an
            extracted number (its first number is used). For ``"math"``, a bare LaTeX answer
            (``\\frac{14}{3}``) or a whole generation with ``$...$`` / ``\\boxed{}``, which
            math-verify searches itself.
        gold: the data set's answer string.
        mode: ``"numeric"``: float equality within 1e-6 relative tolerance (``"3.0"`` ==
            ``"3"``; 0 matches only 0). ``"math"``: symbolic equivalence with math-verify
            (``\\frac{1}{2}`` == ``0.5``, ordered tuples, intervals ...); if either side cannot
            be parsed, equality of whitespace- and ``\\left/\\right``-normalised strings.
    Returns:
        True if they match.
    Raises:
        ValueError: for an unknown mode, or a gold answer without a number in numeric mode.
    """
    if mode not in MATCH_MODES:
        raise ValueError(f"unknown answer match mode {mode!r}; choose one of {MATCH_MODES}")
    if pred is None:
        return False
    if mode == "numeric":
        return _numeric_match(pred, gold)
    return _math_match(pred, gold)


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for an accuracy of ``correct / n`` (z = 1.96: 95 %).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 % or 100 %
    and for small ``n``.

    Args:
        correct: number of correct answers, 0 <= correct <= n.
        n: number of questions; n = 0 gives the uninformative (0.0, 1.0).
        z: standard-normal quantile of the two-sided level.
    Returns:
        (low, high) as fractions in [0, 1].
    Raises:
        ValueError: if the counts are negative or correct > n, or z <= 0.
    """
    if n < 0 or correct < 0 or correct > n:
        raise ValueError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if z <= 0:
        raise ValueError(f"z must be > 0, got {z}")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
