"""Answer extraction and checking: numeric (GSM8K-style) and mathematical (MATH, via math-verify).

Typical use::

    pred = extract_answer(generation)          # "The answer is: 1,200." -> "1200"
    ok = answers_match(pred, example.answer)   # numeric: compared by value

    verdict = score_answer(generation, example.answer, mode="math")  # MATH: LaTeX equivalence

Numeric mode reads an answer as one of the kinds of :data:`ANSWER_KINDS` (see
:func:`parse_answer`): a number, a fraction ``3/4``, a mixed number ``1 1/2``, an ordinal
``6th``, a ratio ``3:4`` or a clock time ``3:30 p.m.``. Numbers, fractions, mixed numbers and
ordinals compare by value (``3/2`` == ``1 1/2`` == ``1.5``); a ratio only equals a ratio with
the same parts; a time equals the same time of day. A gold answer of none of these kinds
(``\\text{Evelyn}``, ``x^2``) is ``"other"``: numeric mode cannot represent it, so
:func:`check_gold_answers` refuses such a data set before any generation, and
:func:`answers_match` raises rather than compare its first number.

Generations should be cut at the decoder's stop strings first: a model that goes on to invent
the next few-shot question ("Question: ... The answer is 7") would otherwise be scored on it.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Iterable

from kvkd.data import DataError, parse_number

__all__ = [
    "ANSWER_KINDS", "MATCH_MODES", "NUMERIC_KINDS", "Answer", "Verdict", "answer_span", "answers_match",
    "check_gold_answers", "extract_answer", "extract_boxed", "parse_answer", "score_answer", "wilson_interval",
]

MATCH_MODES = ("numeric", "math")
ANSWER_KINDS = ("number", "fraction", "mixed", "ordinal", "ratio", "time", "other")
NUMERIC_KINDS = ("number", "fraction", "mixed", "ordinal")  # kinds compared by value

# "The answer is", "the final answer is:", "Answer:", "####" (GSM8K). The answer must follow on
# the same line (or the next non-empty one if the marker ends its line), before the next marker.
_ANCHOR_RE = re.compile(r"####|\banswer\s*(?:is\b[ \t]*:?|:)", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_NOISE_RE = re.compile(r"\\text\{[^{}]*\}|\\mbox\{[^{}]*\}|\^\{?\\circ\}?|\\[!,;: ]|\{,\}|\\%|%|\\left|\\right")
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_LATEX_SPACING_RE = re.compile(r"\\[!,;: ]|\\left|\\right|\s+|\$")
_SENTENCE_END_RE = re.compile(r"[.!?;](?=\s|$)")

# The pieces of an answer token (unsigned; the sign and a currency sign are read around them).
_NUM = r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
_NUM_E = rf"{_NUM}(?:[eE][-+]?\d{{1,3}}(?!\d))?"
_AMPM = r"[aApP]\.?\s?[mM]\.?(?![A-Za-z])"
_TIME = rf"\d{{1,2}}:\d{{2}}\s*{_AMPM}"
_RATIO = rf"{_NUM}(?:(?::|\s:\s){_NUM})+(?![\d,])"  # "3:4", "3 : 4"; not "Step 1: 5"
_MIXED = r"\d+\s+\d+\s*/\s*\d+(?![\d.])"
_FRACTION = rf"{_NUM}\s*/\s*{_NUM}(?![\d.])|\\[dt]?frac\{{{_NUM}\}}\{{{_NUM}\}}"
_ORDINAL = r"\d+(?:st|nd|rd|th)(?![A-Za-z])"
# One answer token in running text: a minus is a sign only when no word character or closing
# bracket stands before it (``16-3`` is an operator); longest kinds are tried first.
_TOKEN_RE = re.compile(
    r"(?:(?<![\w)\]}])(?P<sign>[-\u2212]))?(?:\\?[$\u20ac\u00a3]\s?)?(?P<sign2>[-\u2212])?(?<![\d.])"
    rf"(?P<body>{_TIME}|{_RATIO}|{_MIXED}|{_FRACTION}|{_ORDINAL}|{_NUM_E})"
)
_TIME_FULL = re.compile(rf"(\d{{1,2}}):(\d{{2}})\s*([aApP])\.?\s?[mM]\.?")
_MIXED_FULL = re.compile(r"(\d+)\s+(\d+)\s*/\s*(\d+)")
_FRACTION_FULL = re.compile(rf"({_NUM})\s*/\s*({_NUM})|\\[dt]?frac\{{({_NUM})\}}\{{({_NUM})\}}")
_ORDINAL_FULL = re.compile(r"(\d+)(?:st|nd|rd|th)")


@dataclass(frozen=True)
class Answer:
    """One answer as the numeric checker reads it.

    Attributes:
        kind: one of :data:`ANSWER_KINDS`.
        text: canonical form: ``"1200"``, ``"-3/4"``, ``"1 1/2"``, ``"6th"``, ``"3:4"``,
            ``"3:30 pm"``; the stripped input for ``"other"``.
        value: a ``Fraction`` (the numeric kinds), a tuple of ``Fraction`` (ratio), minutes
            after midnight as an int (time), or None (other).
    """

    kind: str
    text: str
    value: object = None


def _decimal(text: str) -> Fraction:
    return Fraction(Decimal(text.replace(",", "")))


def parse_answer(text: str) -> Answer:
    """Read a whole answer string (a gold answer, or an extracted prediction) as one answer.

    Accepts surrounding spaces, ``$...$``, a trailing full stop, a currency sign and a sign:
    ``"-1,200.50"`` -> number -1200.5; ``"3/4"`` / ``"\\frac{3}{4}"`` -> fraction 3/4;
    ``"1 1/2"`` -> mixed 3/2; ``"6th"`` -> ordinal 6; ``"3:4"`` (or ``"2:3:5"``) -> ratio
    (``"3:30"`` without a.m./p.m. also reads as a ratio); ``"3:30 p.m."`` -> time 15:30.
    Anything else (text, LaTeX, ``"18 + 47"``) is ``"other"``: never its first number.

    Args:
        text: the answer string.
    Returns:
        The :class:`Answer`; a zero denominator gives ``"other"``.
    """
    raw = text.strip()
    s = raw.strip("$").strip()
    s = s[:-1].rstrip() if s.endswith(".") and not _TIME_FULL.fullmatch(s) else s
    s = re.sub(r"\s*\\?%$", "", s)  # "50%": a percentage reads as its number
    m = _TOKEN_RE.fullmatch(s)
    if not m:
        return Answer("other", raw)
    negative = m["sign"] is not None or m["sign2"] is not None
    body = m["body"]
    sign = "-" if negative else ""
    if t := _TIME_FULL.fullmatch(body):
        hour, minute = int(t[1]), int(t[2])
        if negative or not 1 <= hour <= 12 or minute > 59:
            return Answer("other", raw)
        pm = t[3].lower() == "p"
        return Answer("time", f"{hour}:{minute:02d} {'pm' if pm else 'am'}", (hour % 12 + 12 * pm) * 60 + minute)
    if ":" in body:
        parts = re.split(r"\s*:\s*", body)
        return Answer("ratio", sign + ":".join(parse_number(p) for p in parts), tuple(_decimal(p) for p in parts))
    if f := _MIXED_FULL.fullmatch(body):
        whole, num, den = (int(x) for x in f.groups())
        if den == 0:
            return Answer("other", raw)
        value = whole + Fraction(num, den)
        return Answer("mixed", f"{sign}{whole} {num}/{den}", -value if negative else value)
    if f := _FRACTION_FULL.fullmatch(body):
        num, den = (f[1], f[2]) if f[1] is not None else (f[3], f[4])
        if _decimal(den) == 0:
            return Answer("other", raw)
        value = _decimal(num) / _decimal(den)
        return Answer("fraction", f"{sign}{parse_number(num)}/{parse_number(den)}", -value if negative else value)
    if f := _ORDINAL_FULL.fullmatch(body):
        return Answer("ordinal", body, Fraction(int(f[1])))
    number = parse_number(s, strict=True)
    if number is None:
        return Answer("other", raw)
    try:
        return Answer("number", number, Fraction(Decimal(number)))
    except (InvalidOperation, ValueError, OverflowError):
        return Answer("other", raw)


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


def _tokens(text: str) -> list[Answer]:
    """Every answer token of running text, left to right, parsed."""
    return [parse_answer(m.group(0)) for m in _TOKEN_RE.finditer(text)]


def _window_answer(window: str) -> Answer | None:
    """The answer a marker introduces: in its first sentence, the first token after the last
    ``=`` if there is one (``18 + 47 = 65`` -> 65), else the first token."""
    sentence = _SENTENCE_END_RE.split(window, 1)[0]
    head, eq, result = sentence.rpartition("=")
    found = _tokens(result) if eq else []
    found = found or _tokens(sentence)
    return found[0] if found else None


def _boxed_answer(content: str) -> Answer | None:
    """An answer from boxed LaTeX: plain (``\\$1,\\!200``, ``50\\%``), a fraction, a ratio ..."""
    cleaned = _BOXED_NOISE_RE.sub("", content).strip()
    whole = parse_answer(cleaned)
    if whole.kind != "other":
        return whole
    return _window_answer(cleaned)


def _marker_windows(text: str) -> list[tuple[int, str]]:
    """(position, text) after each answer marker: its line, or the next non-empty line if the
    marker ends its line, up to the next marker."""
    anchors = list(_ANCHOR_RE.finditer(text))
    out = []
    for k, m in enumerate(anchors):
        stop = anchors[k + 1].start() if k + 1 < len(anchors) else len(text)
        window = text[m.end():stop].split("\n", 1)[0]
        if window.strip() == "":  # "The answer is:\n42"
            window = text[m.end():stop].lstrip().split("\n", 1)[0]
        out.append((m.start(), window))
    return out


def extract_answer(text: str) -> str | None:
    """The final answer in a model's output, in the canonical form of :func:`parse_answer`.

    Prefers the answer introduced by the *last* answer marker: ``The answer is`` / ``answer:``
    / ``####`` (in the first sentence after it on its line, or on the next non-empty line if
    the marker ends its line: the result after the last ``=``, else the first answer token)
    or ``\\boxed{...}`` (its content). Without a usable marker, takes the last answer token
    in the text. A token is a number, fraction, mixed number, ordinal, ratio or clock time;
    numbers are normalised as by :func:`kvkd.data.parse_number`: ``"-1,200.50"`` ->
    ``"-1200.5"``, ``"42."`` -> ``"42"``; ``"3/4"``, ``"1 1/2"``, ``"3:4"`` and
    ``"3:30 p.m."`` are kept whole (``"3:30 pm"``), never cut to their first number.

    Args:
        text: a generation, ideally already cut at the stop strings.
    Returns:
        The canonical answer text, or None if the text holds no answer token.
    """
    candidates: list[tuple[int, Answer]] = []  # (position of the marker, answer)
    for pos, window in _marker_windows(text):
        found = _window_answer(window)
        if found is not None:
            candidates.append((pos, found))
    for m in _BOXED_RE.finditer(text):
        content = _braced(text, m.end())
        found = _boxed_answer(content) if content is not None else None
        if found is not None:
            candidates.append((m.start(), found))
    if candidates:
        return max(candidates, key=lambda c: c[0])[1].text
    found = _tokens(text)
    return found[-1].text if found else None


def answer_span(text: str) -> str:
    """The part of a generation that states the answer, for a LaTeX checker (math mode).

    The content of the last ``\\boxed{}`` if there is one; else the text after the last answer
    marker (its line, or the next non-empty line; a final full stop dropped); else the whole
    text. ``"The answer is: 2, 3"`` -> ``"2, 3"``: math-verify given the whole sentence
    would read the prefix as part of the expression.
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    windows = _marker_windows(text)
    if windows:
        span = windows[-1][1].strip()
        return span[:-1].rstrip() if span.endswith(".") else span
    return text.strip()


def _values_equal(a: Fraction, b: Fraction) -> bool:
    return a == b or math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)


def _clock_matches(pred: Answer, gold: Answer) -> bool:
    """A gold time against a prediction: the same time, or h:mm (a 2-part ratio) read as a
    24-hour time or as the gold's 12-hour time without a.m./p.m."""
    if pred.kind == "time":
        return pred.value == gold.value
    if pred.kind == "ratio" and len(pred.value) == 2 and all(p.denominator == 1 for p in pred.value):
        hour, minute = (int(p) for p in pred.value)
        gold_hour, gold_minute = divmod(gold.value, 60)
        return minute == gold_minute and hour in (gold_hour, gold_hour % 12 or 12)
    return False


def _numeric_match(pred: str, gold: str) -> bool:
    g = parse_answer(gold)
    if g.kind == "other":
        raise ValueError(f"gold answer {gold!r} is not a number, fraction, ratio or time; compare LaTeX answers with mode='math'")
    p = parse_answer(pred)
    if g.kind == "time":
        return _clock_matches(p, g)
    if g.kind == "ratio":
        return p.kind == "ratio" and len(p.value) == len(g.value) and all(map(_values_equal, p.value, g.value))
    return p.kind in NUMERIC_KINDS and _values_equal(p.value, g.value)


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


def _math_verdict(pred: str, gold: str) -> tuple[bool, bool]:
    """(match, compared symbolically); False as second value = math-verify could not parse
    one side and the normalised strings were compared instead."""
    from math_verify import parse, verify

    # math-verify times out with signal.alarm, which works only in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(_math_input(gold), parsing_timeout=timeout)
    pred_parsed = parse(_math_input(pred), parsing_timeout=timeout)
    if gold_parsed and pred_parsed:
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout)), True
    pred_text, gold_text = _normalise_latex(pred), _normalise_latex(gold)
    return bool(gold_text) and pred_text == gold_text, False


def answers_match(pred: str | None, gold: str, mode: str = "numeric") -> bool:
    """Whether a predicted answer equals the gold one.

    Args:
        pred: the prediction; None (nothing extracted) never matches. For ``"numeric"``, an
            extracted answer (:func:`extract_answer`), read whole by :func:`parse_answer`.
            For ``"math"``, a bare LaTeX answer (``\\frac{14}{3}``; see :func:`answer_span`)
            or text with ``$...$`` / ``\\boxed{}``, which math-verify searches itself.
        gold: the data set's answer string.
        mode: ``"numeric"``: numbers, fractions, mixed numbers and ordinals by value (exact,
            or within 1e-6 relative; 0 matches only 0), ratios part by part, times as times
            of day (see the module docstring). ``"math"``: symbolic equivalence with
            math-verify (``\\frac{1}{2}`` == ``0.5``, ordered tuples, intervals ...); if either
            side cannot be parsed, equality of whitespace- and ``\\left/\\right``-normalised
            strings.
    Returns:
        True if they match.
    Raises:
        ValueError: for an unknown mode, or (numeric) a gold answer of kind ``"other"``.
    """
    if mode not in MATCH_MODES:
        raise ValueError(f"unknown answer match mode {mode!r}; choose one of {MATCH_MODES}")
    if pred is None:
        return False
    if mode == "numeric":
        return _numeric_match(pred, gold)
    return _math_verdict(pred, gold)[0]


@dataclass(frozen=True)
class Verdict:
    """How one generation scored (:func:`score_answer`).

    Attributes:
        prediction: the extracted answer (numeric: canonical text; math: the answer span),
            or None.
        correct: whether it equals the gold answer.
        status: ``"compared"``; ``"no_answer"`` (nothing extracted); ``"unparsed"`` (math
            mode: math-verify could not read one side, normalised strings were compared).
    """

    prediction: str | None
    correct: bool
    status: str


def score_answer(output: str, gold: str, mode: str = "numeric") -> Verdict:
    """Extract the answer of a generation and check it against the gold answer.

    Numeric mode extracts with :func:`extract_answer`; math mode hands math-verify the
    :func:`answer_span` (the boxed content or the text after the answer marker), not the
    whole generation with its ``The answer is:`` prefix.

    Raises:
        ValueError: unknown mode; a numeric-mode gold of kind ``"other"``.
    """
    if mode not in MATCH_MODES:
        raise ValueError(f"unknown answer match mode {mode!r}; choose one of {MATCH_MODES}")
    if mode == "numeric":
        pred = extract_answer(output)
        if pred is None:
            _numeric_match("0", gold)  # still refuse a gold the checker cannot represent
            return Verdict(None, False, "no_answer")
        return Verdict(pred, _numeric_match(pred, gold), "compared")
    span = answer_span(output)
    if not span:
        return Verdict(None, False, "no_answer")
    ok, symbolic = _math_verdict(span, gold)
    return Verdict(span, ok, "compared" if symbolic else "unparsed")


def check_gold_answers(golds: Iterable[tuple[str, str]], mode: str, where: str = "the data set") -> dict[str, int]:
    """Check, before any generation, that every gold answer can be scored in ``mode``.

    Args:
        golds: ``(row id, gold answer)`` pairs.
        mode: ``"numeric"`` or ``"math"`` (math-verify reads anything; the kinds are counted).
        where: how the error names the data (e.g. its path).
    Returns:
        Row count per answer kind of :data:`ANSWER_KINDS` (kinds with no rows left out).
    Raises:
        DataError: numeric mode and some gold answers of kind ``"other"``; names the count,
            the first rows and the fix (``--answer-check math`` / ``auto``).
        ValueError: unknown mode.
    """
    if mode not in MATCH_MODES:
        raise ValueError(f"unknown answer match mode {mode!r}; choose one of {MATCH_MODES}")
    counts: Counter = Counter()
    other = []
    for row_id, gold in golds:
        kind = parse_answer(gold).kind
        counts[kind] += 1
        if kind == "other":
            other.append((row_id, gold))
    if mode == "numeric" and other:
        shown = ", ".join(f"{i} ({g!r})" for i, g in other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        raise DataError(f"{where}: {len(other)} of {sum(counts.values())} gold answers are not a number, fraction, ratio or time, "
                        f"so the numeric check cannot score them: {shown}. Use --answer-check math (math-verify) or auto, "
                        "or drop those rows")
    return {k: counts[k] for k in ANSWER_KINDS if counts[k]}


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
