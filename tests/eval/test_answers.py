"""Tests for kvkd.eval.answers: extraction from generations, numeric and LaTeX matching, Wilson CI."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kvkd.eval.answers import answers_match, extract_answer, extract_boxed, wilson_interval

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"shared data sets not found at {DATA} (clone shared/ beside the repo)"
)


@pytest.mark.parametrize(
    "text, expected",
    [
        # CODI-style student output
        ("The answer is: 72", "72"),
        # CoT with intermediate numbers, answer marker last
        ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\nThe answer is: 72", "72"),
        # GSM8K-style, then a hallucinated next question: "####" wins over the later numbers
        ("16 - 3 - 4 = 9 eggs, 9 * 2 = $18.\n#### 18\n\nQuestion: Tom has 3 apples and 5 pears.", "18"),
        ("The answer is: 1,200.", "1200"),
        ("So the total is $1,000.25. The answer is $1,000.25.", "1000.25"),
        ("#### -5", "-5"),
        ("He lost money, so the change is -5.", "-5"),
        ("The answer is 3.50 dollars", "3.5"),
        ("answer is 2.0", "2"),
        ("Final Answer: 42.", "42"),
        ("the answer is:\n\n42", "42"),
        ("The final answer is $\\boxed{\\frac{1}{2}}$.", "1/2"),
        ("Therefore the answer is \\boxed{1,\\!200}.", "1200"),
        ("The answer is \\boxed{50\\%}", "50"),
        ("Self-correction: the answer is 5. Wait, 2 + 4 = 6. The answer is 6.", "6"),
        # no marker: last number
        ("Weng earns 12/60 = $0.2 per minute. Working 50 minutes, she earned 0.2 x 50 = $10.", "10"),
        ("The temperature fell from 3 to -4", "-4"),
        ("16-3-4=9", "9"),
        # a marker without a number falls back to the last number
        ("I think the answer is forty, not 30", "30"),
        ("I think the answer is forty.", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_boxed_balances_braces_and_takes_last():
    assert extract_boxed("first \\boxed{1} then \\boxed{\\frac{14}{3}} done") == "\\frac{14}{3}"
    assert extract_boxed("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert extract_boxed("\\boxed{unclosed") is None
    assert extract_boxed("no box") is None


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("3.0", "3", True),
        ("3", "3.0", True),
        ("1,200", "1200", True),
        ("-5", "-5", True),
        ("-5", "5", False),
        ("72", "73", False),
        ("1000000.5", "1000000", True),  # within 1e-6 relative
        ("1000002", "1000000", False),  # 2e-6 relative
        ("0.1", "0.1000000001", True),
        ("0", "0", True),
        ("1e-9", "0", False),  # 0 matches only 0
        ("forty", "40", False),
        (None, "40", False),
    ],
)
def test_answers_match_numeric(pred, gold, expected):
    assert answers_match(pred, gold) is expected


def test_answers_match_errors():
    with pytest.raises(ValueError, match="mode='math'"):
        answers_match("3", "\\text{Evelyn}")  # numeric mode needs a numeric gold
    with pytest.raises(ValueError, match="unknown answer match mode"):
        answers_match("3", "3", mode="exact")


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("\\frac{14}{3}", "\\frac{14}{3}", True),
        ("\\dfrac{14}{3}", "\\frac{14}{3}", True),
        ("14/3", "\\frac{14}{3}", True),
        ("4.666667", "\\frac{14}{3}", True),
        ("\\frac{14}{5}", "\\frac{14}{3}", False),
        ("0.5", "\\frac12", True),
        ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        # unwrapped, math-verify would read the gold tuple as just 3
        ("3", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
        ("p-q", "p - q", True),
        ("q-p", "p - q", False),
        ("Evelyn", "\\text{Evelyn}", True),
        ("\\text{Bob}", "\\text{Evelyn}", False),
        ("3\\sqrt{13}", "\\sqrt{117}", True),
        ("\\$32,348", "\\$32,\\!348", True),
        ("The answer is $\\boxed{\\frac{1}{2}}$.", "0.5", True),
        (None, "\\frac{1}{2}", False),
    ],
)
def test_answers_match_math(pred, gold, expected):
    assert answers_match(pred, gold, mode="math") is expected


def test_answers_match_math_falls_back_to_strings(monkeypatch):
    import math_verify

    monkeypatch.setattr(math_verify, "parse", lambda *args, **kwargs: [])  # nothing parses
    assert answers_match("\\left( 3, 4 \\right)", "(3,4)", mode="math")
    assert answers_match("\\text{ Evelyn }", "Evelyn", mode="math")
    assert not answers_match("(3,5)", "(3,4)", mode="math")
    assert not answers_match("", "", mode="math")


def test_answers_match_math_outside_main_thread():
    # math-verify's timeout uses signal.alarm, which raises outside the main thread.
    results = []
    worker = threading.Thread(target=lambda: results.append(answers_match("14/3", "\\frac{14}{3}", mode="math")))
    worker.start()
    worker.join()
    assert results == [True]


@needs_data
def test_math500_solutions_match_their_answers():
    from kvkd.data import load_examples

    rows = load_examples(str(DATA / "math500/test.jsonl"), limit=25).examples
    for row in rows:
        assert answers_match(extract_boxed(row.cot), row.answer, mode="math"), row.id
        assert answers_match(row.cot, row.answer, mode="math"), row.id  # whole solution text
    # a row's answer against the next row's: all differ except "5" vs "x=5" (rows 23-24), which
    # math-verify treats as equal (it unwraps the assignment x=5 to its value)
    same = [(a.answer, b.answer) for a, b in zip(rows, rows[1:]) if answers_match(a.answer, b.answer, mode="math")]
    assert same == [("5", "x=5")]


@needs_data
def test_gsm8k_gold_cot_extracts_its_answer():
    from kvkd.data import load_examples

    rows = load_examples(str(DATA / "gsm8k/test.jsonl"), limit=200).examples
    hits = sum(answers_match(extract_answer(f"{r.cot}\nThe answer is: {r.answer}"), r.answer) for r in rows)
    assert hits == 200
    # without the marker, the last number of the gold CoT is the answer in all but 3 rows,
    # which end like "... 9 + 6 = 15 liters of water out of the 24 liters."
    last = sum(answers_match(extract_answer(r.cot), r.answer) for r in rows)
    assert last == 197


def test_wilson_interval_values():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490157, abs=1e-6) and high == pytest.approx(0.943319, abs=1e-6)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.277540, abs=1e-6))
    assert wilson_interval(10, 10) == (pytest.approx(0.722460, abs=1e-6), 1.0)
    low, high = wilson_interval(565, 1000)  # ~ KaVa's 56.5 % on a 1000-question set
    assert (low, high) == (pytest.approx(0.534082, abs=1e-6), pytest.approx(0.595421, abs=1e-6))
    # symmetry: the interval of the errors mirrors the interval of the hits
    assert wilson_interval(3, 17)[0] == pytest.approx(1 - wilson_interval(14, 17)[1])
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_errors():
    with pytest.raises(ValueError, match="0 <= correct <= n"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="0 <= correct <= n"):
        wilson_interval(-1, 10)
    with pytest.raises(ValueError, match="z must be > 0"):
        wilson_interval(1, 10, z=0)
