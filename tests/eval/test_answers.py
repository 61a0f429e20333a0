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


# Hand-made rows of issue 15: (gold, model output, mode, correct?). Before the fix, numeric
# mode read each gold answer as its first number (a "3" was right for "3:4") and math mode
# handed math-verify the whole "The answer is: ..." sentence.
HAND_MADE_ROWS = [
    ("3:4", "The answer is: 3", "numeric", False),
    ("3:4", "The answer is: 3:4", "numeric", True),
    ("3:4", "The answer is: 6:8", "numeric", False),  # ratios compare part by part
    ("3:30 p.m.", "The answer is: 3", "numeric", False),
    ("3:30 p.m.", "The answer is: 3:45 pm", "numeric", False),
    ("3:30 p.m.", "The answer is: 3:30 PM.", "numeric", True),
    ("3:30 p.m.", "The answer is: 15:30", "numeric", True),
    ("3:30 p.m.", "The answer is: 3:30 am", "numeric", False),
    ("6th", "The answer is: 6", "numeric", True),
    ("6th", "The answer is: 7th", "numeric", False),
    ("3/4", "The answer is: 3", "numeric", False),
    ("3/4", "The answer is: 0.75", "numeric", True),
    ("3/4", "The answer is: 6/8", "numeric", True),
    ("1 1/2", "The answer is: 1", "numeric", False),
    ("1 1/2", "The answer is: 3/2", "numeric", True),
    ("1 1/2", "The answer is: 1.5 cups", "numeric", True),
    ("-1 1/2", "The answer is: -1.5", "numeric", True),
    ("65", "The answer is: 18 + 47 = 65", "numeric", True),
    ("18", "The answer is: 18 + 47 = 65", "numeric", False),
    ("\\frac{14}{3}", "The answer is: 14", "numeric", False),
    ("\\frac{14}{3}", "The answer is: 14/3", "numeric", True),
    ("2, 3", "The answer is: 2, 3", "math", True),
    ("p - q", "The answer is: p - q", "math", True),
    ("\\text{Evelyn}", "The answer is: \\text{Evelyn}", "math", True),
    ("[2,5)", "The answer is: [2, 5).", "math", True),
    ("\\frac{14}{3}", "The answer is: \\frac{14}{5}", "math", False),
]


@pytest.mark.parametrize("gold, output, mode, expected", HAND_MADE_ROWS)
def test_hand_made_rows(gold, output, mode, expected):
    from kvkd.eval.answers import score_answer

    assert score_answer(output, gold, mode).correct is expected


@pytest.mark.parametrize(
    "text, kind, canonical, value",
    [
        ("1,200", "number", "1200", 1200),
        ("$-12.50.", "number", "-12.5", -12.5),
        ("50%", "number", "50", 50),
        ("3/4", "fraction", "3/4", 0.75),
        ("\\frac{14}{3}", "fraction", "14/3", 14 / 3),
        ("-3/4", "fraction", "-3/4", -0.75),
        ("1 1/2", "mixed", "1 1/2", 1.5),
        ("6th", "ordinal", "6th", 6),
        ("22nd", "ordinal", "22nd", 22),
        ("3:4", "ratio", "3:4", None),
        ("2 : 3 : 5", "ratio", "2:3:5", None),
        ("3:30 p.m.", "time", "3:30 pm", 15 * 60 + 30),
        ("12:05 AM", "time", "12:05 am", 5),
        ("13:30 pm", "other", "13:30 pm", None),  # no such 12-hour time
        ("3/0", "other", "3/0", None),
        ("18 + 47", "other", "18 + 47", None),
        ("\\text{Evelyn}", "other", "\\text{Evelyn}", None),
        ("x^2 + 1", "other", "x^2 + 1", None),
    ],
)
def test_parse_answer(text, kind, canonical, value):
    from kvkd.eval.answers import parse_answer

    a = parse_answer(text)
    assert (a.kind, a.text) == (kind, canonical)
    if value is not None:
        assert float(a.value) == pytest.approx(value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 3:4.", "3:4"),
        ("The answer is: 1 1/2 cups", "1 1/2"),
        ("The answer is: 3:30 p.m.", "3:30 pm"),
        ("He finished 6th. The answer is 6th", "6th"),
        ("The answer is: 18 + 47 = 65", "65"),
        ("The answer is 10. Then 3 + 4 = 7", "10"),  # the equation after the sentence is not the answer
        ("Step 1: 5 apples and 2 pears", "2"),  # "1: 5" is no ratio
        ("She ate 3/4 of it", "3/4"),
    ],
)
def test_extract_answer_keeps_answers_whole(text, expected):
    assert extract_answer(text) == expected


def test_answer_span_drops_the_prefix():
    from kvkd.eval.answers import answer_span

    assert answer_span("The answer is: 2, 3") == "2, 3"
    assert answer_span("so \\boxed{\\frac{1}{2}}. The answer is: 7") == "\\frac{1}{2}"
    assert answer_span("The answer is:\n  x = 5.") == "x = 5"
    assert answer_span("no marker here") == "no marker here"


def test_score_answer_statuses(monkeypatch):
    from kvkd.eval.answers import score_answer

    assert score_answer("The answer is: forty", "40").status == "no_answer"
    assert score_answer("The answer is: 40", "40") == score_answer("#### 40", "40.0")
    assert score_answer("", "\\frac{1}{2}", "math").status == "no_answer"
    assert score_answer("The answer is: \\frac{1}{2}", "0.5", "math").status == "compared"
    import math_verify

    monkeypatch.setattr(math_verify, "parse", lambda *a, **k: [])  # nothing parses: strings compared, and said so
    v = score_answer("The answer is: \\text{ Evelyn }", "Evelyn", "math")
    assert (v.correct, v.status) == (True, "unparsed")
    with pytest.raises(ValueError, match="mode='math'"):
        score_answer("The answer is: 3", "\\text{Evelyn}")  # never its first number
    with pytest.raises(ValueError, match="mode='math'"):
        score_answer("no answer", "\\text{Evelyn}")


def test_check_gold_answers_names_rows_before_generation():
    from kvkd.data import DataError
    from kvkd.eval.answers import check_gold_answers

    golds = [("a", "3/4"), ("b", "3:4"), ("c", "12"), ("d", "1 1/2"), ("e", "3:30 p.m."), ("f", "6th")]
    assert check_gold_answers(golds, "numeric") == {"number": 1, "fraction": 1, "mixed": 1, "ordinal": 1, "ratio": 1, "time": 1}
    bad = golds + [(f"m{i}", f"\\sqrt{{{i}}}") for i in range(7)]
    with pytest.raises(DataError, match=r"7 of 13 gold answers .* m0 \('\\\\sqrt\{0\}'\).* and 2 more.*--answer-check math"):
        check_gold_answers(bad, "numeric", "rows.jsonl")
    assert check_gold_answers(bad, "math")["other"] == 7  # math-verify reads them
