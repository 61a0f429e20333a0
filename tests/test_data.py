"""Tests for kvkd.data: every format against the shared data, bad rows, traces, fingerprints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kvkd.data import (
    FORMATS,
    DataError,
    Example,
    RowProblem,
    build_trace,
    dataset_fingerprint,
    find_numbers,
    load_examples,
    parse_number,
)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"shared data sets not found at {DATA} (clone shared/ beside the repo)"
)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _gsm8k_line(question: str, answer: str) -> str:
    return json.dumps({"question": question, "answer": answer})


# --------------------------------------------------------------------------- parse_number


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,200", "1200"),
        ("-3.50", "-3.5"),
        ("51.0", "51"),
        ("$1,000.25", "1000.25"),
        ("-$5", "-5"),
        ("$-5", "-5"),
        ("\u22127", "-7"),  # unicode minus
        ("+4", "4"),
        (".5", "0.5"),
        ("-0.0", "0"),
        ("007", "7"),
        ("1e3", "1000"),
        ("2.5e-3", "0.0025"),
        ("50%", "50"),
        ("it costs $ 3 each", "3"),  # SVAMP writes "$ 3"
        ("16-3-4=9", "16"),  # binary minus is not a sign
        ("3/4", "3"),  # fractions are not evaluated
        ("1,2000", "1"),  # not a thousands group
        ("3244047.0999999996", "3244047.0999999996"),  # gsm_hard precision kept
        ("9" * 60, "9" * 60),  # long integers stay plain
        ("no digits", None),
        ("", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_parse_number_strict_needs_one_number():
    assert parse_number(" 1,080 ", strict=True) == "1080"
    assert parse_number("$-12.50", strict=True) == "-12.5"
    assert parse_number("42 apples", strict=True) is None
    assert parse_number("forty", strict=True) is None
    assert parse_number("1,2000", strict=True) is None


def test_parse_number_huge_exponent_stays_scientific():
    assert parse_number("1e99") == "1E+99"


def test_find_numbers_in_order():
    assert find_numbers("Weng earns 12/60 = $0.2 per minute; -3 and 1,200.") == ["12", "60", "0.2", "-3", "1200"]


# --------------------------------------------------------------------------- formats vs normalised files


@needs_data
def test_gsm8k_orig_matches_normalised_first_500_rows():
    orig = load_examples(str(DATA / "gsm8k/orig/train.jsonl"), limit=500)
    norm = load_examples(str(DATA / "gsm8k/train.jsonl"), limit=500)
    assert (orig.fmt, norm.fmt) == ("gsm8k", "jsonl")
    assert len(orig.examples) == len(norm.examples) == 500
    assert orig.problems == []
    for o, n in zip(orig.examples, norm.examples):
        assert (o.question, o.cot, o.answer, o.equations) == (n.question, n.cot, n.answer, n.equations)
    first = orig.examples[0]
    assert first.id == "train-00000"
    assert first.cot == ("Natalia sold 48/2 = 24 clips in May.\n"
                         "Natalia sold 48+24 = 72 clips altogether in April and May.")
    assert first.equations == ("48/2=24", "48+24=72")
    assert first.answer == "72"


@needs_data
def test_gsm8k_thousands_answer_normalised():
    # Row 147 (1-based) of the GSM8K test split ends "#### 2,125" upstream.
    ex = load_examples(str(DATA / "gsm8k/orig/test.jsonl")).examples
    norm = {e.question: e.answer for e in load_examples(str(DATA / "gsm8k/test.jsonl")).examples}
    with_commas = [e for e in ex if norm[e.question] == "2125"]
    assert [e.answer for e in with_commas] == ["2125"]
    assert all("," not in e.answer for e in ex)


@needs_data
def test_window_selects_contiguous_rows_with_positional_ids():
    window = load_examples(str(DATA / "gsm8k/orig"), split="train", offset=100, limit=5)
    assert [e.id for e in window.examples] == [f"train-{i:05d}" for i in range(100, 105)]
    norm = load_examples(str(DATA / "gsm8k/train.jsonl"), offset=100, limit=5).examples
    assert [e.question for e in window.examples] == [e.question for e in norm]
    assert norm[0].id == "gsm8k-train-00100"
    assert load_examples(str(DATA / "gsm8k/test.jsonl"), offset=10_000).examples == []


@needs_data
@pytest.mark.parametrize(
    "orig, norm", [("test.txt", "test.jsonl"), ("valid.txt", "valid.jsonl"), ("train_noaug_formula.txt", "train_noaug.jsonl")]
)
def test_icot_matches_gsm8k_aug(orig, norm):
    icot = load_examples(str(DATA / "gsm8k_aug/orig" / orig), limit=300)
    ref = load_examples(str(DATA / "gsm8k_aug" / norm), limit=300)
    assert icot.fmt == "icot" and icot.problems == []
    for i, n in zip(icot.examples, ref.examples):
        assert (i.question, i.answer, i.equations) == (n.question, n.answer, n.equations)
        assert i.cot == ""
        # the normalised files keep the equation string as "cot"
        assert build_trace(i, "equations", allow_empty=True) == n.cot


@needs_data
def test_icot_rows_without_equations_are_kept():
    valid = load_examples(str(DATA / "gsm8k_aug/orig/valid.txt")).examples
    assert len(valid) == 500
    empty = [e for e in valid if not e.equations]
    assert len(empty) == 6  # upstream has 113 such rows over test/valid/train_noaug
    assert empty[0].answer == "9" and empty[0].question.startswith("Tracy has been collecting novels")
    with pytest.raises(DataError, match=rf"{empty[0].id}.*kind='nl'"):
        build_trace(empty[0], "equations")


@needs_data
def test_svamp_orig_matches_normalised():
    orig = load_examples(str(DATA / "svamp/orig/SVAMP.json"))
    norm = load_examples(str(DATA / "svamp/test.jsonl"))
    assert orig.fmt == "svamp" and len(orig.examples) == 1000
    assert orig.examples == norm.examples
    first = orig.examples[0]
    assert first == Example(
        "svamp-chal-1",
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack. "
        "How much do you have to pay to buy each pack?",
        "( 76.0 - 25.0 )",
        "51",
    )
    assert dataset_fingerprint(orig.examples) == dataset_fingerprint(norm.examples)


@needs_data
@pytest.mark.parametrize(
    "orig, norm, fmt, same_ids",
    [
        ("multiarith/orig/MultiArith.json", "multiarith/test.jsonl", "multiarith", True),
        ("math500/orig/test.jsonl", "math500/test.jsonl", "math", True),
        ("gsm_hard/orig/gsmhardv2.jsonl", "gsm_hard/test.jsonl", "gsmhard", False),
    ],
)
def test_other_upstream_formats_match_normalised(orig, norm, fmt, same_ids):
    a = load_examples(str(DATA / orig), limit=200)
    b = load_examples(str(DATA / norm), limit=200)
    assert a.fmt == fmt and len(a.examples) == 200
    for x, y in zip(a.examples, b.examples):
        assert (x.question, x.cot, x.answer) == (y.question, y.cot, y.answer)
        assert (x.id == y.id) == same_ids


@needs_data
def test_math_answers_kept_verbatim():
    ex = load_examples(str(DATA / "math500/test.jsonl"), limit=3).examples
    assert [e.answer for e in ex] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "p - q", "\\frac{14}{3}"]


@needs_data
def test_gsm_hard_negative_and_decimal_answers():
    ex = load_examples(str(DATA / "gsm_hard/orig/gsmhardv2.jsonl"), limit=2000).examples
    assert ex[0].answer == "-9867630"
    assert sum(e.answer.startswith("-") for e in ex) == 146
    assert "3244047.0999999996" in {e.answer for e in ex}


@needs_data
@pytest.mark.parametrize(
    "path, fmt",
    [
        ("gsm8k/train.jsonl", "jsonl"),
        ("gsm8k/orig/test.jsonl", "gsm8k"),
        ("gsm8k_aug/orig/valid.txt", "icot"),
        ("svamp/orig/SVAMP.json", "svamp"),
        ("multiarith/orig/MultiArith.json", "multiarith"),
        ("math500/orig/test.jsonl", "math"),
        ("gsm_hard/orig/gsmhardv2.jsonl", "gsmhard"),
    ],
)
def test_auto_detects_format(path, fmt):
    assert load_examples(str(DATA / path), limit=1).fmt == fmt


@needs_data
def test_directory_plus_split():
    res = load_examples(str(DATA / "gsm8k"), split="test", limit=2)
    assert Path(res.source).name == "test.jsonl" and res.examples[0].id == "gsm8k-test-00000"
    with pytest.raises(DataError, match=r"pick one with --split"):
        load_examples(str(DATA / "gsm8k"))
    with pytest.raises(DataError, match=r"no dev\.jsonl.*'test', 'train'"):
        load_examples(str(DATA / "gsm8k"), split="dev")


@needs_data
def test_gsm8k_and_icot_test_sets_share_a_fingerprint():
    # GSM8k-Aug's test split is the GSM8K test set: same ids (test-NNNNN), questions, answers.
    a = load_examples(str(DATA / "gsm8k/orig/test.jsonl")).examples
    b = load_examples(str(DATA / "gsm8k_aug/orig/test.txt")).examples
    assert dataset_fingerprint(a) == dataset_fingerprint(b)


# --------------------------------------------------------------------------- bad rows


def test_bad_rows_raise_with_file_and_row(tmp_path):
    good = _gsm8k_line("Q1?", "1+1 = <<1+1=2>>2\n#### 2")
    path = _write(tmp_path / "g.jsonl", [good, "", '{"question": "Q2?", "answer": ', good])
    with pytest.raises(DataError, match=rf"{path}, row 3 \(format gsm8k\): invalid JSON.*Fix the row$"):
        load_examples(str(path))


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"question": "Q?", "answer": ', "invalid JSON"),
        (_gsm8k_line("Q?", "no final answer here"), "no '####'"),
        (_gsm8k_line("Q?", "so\n#### forty"), "not a number: 'forty'"),
        (_gsm8k_line("Q?", "so\n#### 42 apples"), "not a number: '42 apples'"),
        (json.dumps({"answer": "#### 3"}), "missing field 'question'"),
        (_gsm8k_line("   ", "#### 3"), "field 'question' is empty"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_gsm8k_bad_row_reasons(tmp_path, line, reason):
    path = _write(tmp_path / "g.jsonl", [_gsm8k_line("Q0?", "#### 0"), line])
    with pytest.raises(DataError, match=r"row 2 .*" + reason.replace("(", r"\(")):
        load_examples(str(path), fmt="gsm8k")


def test_report_mode_skips_and_lists_bad_rows(tmp_path):
    rows = [
        _gsm8k_line("A?", "<<2*3=6>>6\n#### 6"),
        "not json",
        "",
        _gsm8k_line("B?", "#### seven"),
        _gsm8k_line("C?", "4-5 = <<4-5=-1>>-1\n#### -1"),
    ]
    res = load_examples(str(_write(tmp_path / "up.jsonl", rows)), fmt="gsm8k", on_bad_row="report")
    assert [(p.row, p.reason.split(" (")[0]) for p in res.problems] == [
        (2, "invalid JSON"),
        (4, "answer after '####' is not a number: 'seven'"),
    ]
    assert all(isinstance(p, RowProblem) for p in res.problems)
    # ids stay positional over all non-empty rows, bad ones included
    assert [(e.id, e.answer, e.equations) for e in res.examples] == [
        ("up-00000", "6", ("2*3=6",)),
        ("up-00003", "-1", ("4-5=-1",)),
    ]
    assert res.examples[1].cot == "4-5 = -1"


def test_icot_bad_rows(tmp_path):
    path = _write(tmp_path / "aug.txt", ["Q1?||<<1+1=2>> #### 2", "no separator #### 3", "Q3?||<<1+2=3>>"])
    res = load_examples(str(path), on_bad_row="report")
    assert res.fmt == "icot"
    assert [e.id for e in res.examples] == ["aug-00000"]
    assert [(p.row, p.reason) for p in res.problems] == [
        (2, "no '||' between question and equations"),
        (3, "no '####' final-answer marker"),
    ]


def test_jsonl_duplicate_id_and_missing_cot(tmp_path):
    row = {"id": "x-1", "question": "Q?", "cot": "a\nb", "answer": "3"}
    no_cot = {"id": "x-2", "question": "Q?", "answer": "3"}
    path = _write(tmp_path / "n.jsonl", [json.dumps(row), json.dumps(row), json.dumps(no_cot)])
    with pytest.raises(DataError, match=r"row 2 .*duplicate id 'x-1'"):
        load_examples(str(path), fmt="jsonl")
    res = load_examples(str(path), fmt="jsonl", on_bad_row="report")
    assert [p.row for p in res.problems] == [2, 3]
    assert "missing field 'cot'" in res.problems[1].reason


def test_jsonl_numeric_answer_is_normalised(tmp_path):
    path = _write(tmp_path / "n.jsonl", [json.dumps({"id": "a", "question": "Q?", "cot": "", "answer": 51.0})])
    assert load_examples(str(path)).examples[0].answer == "51"


def test_svamp_bad_item_reports_item_number(tmp_path):
    items = [
        {"ID": "a", "Body": "Tom had 3 apples", "Question": "How many?", "Equation": "( 3.0 )", "Answer": 3.0},
        {"ID": "b", "Body": "x", "Question": "y?", "Equation": "", "Answer": "many"},
    ]
    path = tmp_path / "SVAMP.json"
    path.write_text(json.dumps(items))
    with pytest.raises(DataError, match=r"row 2 \(format svamp\): field 'Answer' is not a number: 'many'"):
        load_examples(str(path))
    ok = load_examples(str(path), on_bad_row="report").examples
    assert ok == [Example("svamp-a", "Tom had 3 apples. How many?", "( 3.0 )", "3")]


def test_undecodable_line_is_a_bad_row(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_bytes(_gsm8k_line("Q?", "#### 1").encode() + b"\n\xff\xfe bad\n")
    res = load_examples(str(path), on_bad_row="report")
    assert res.problems[0].row == 2 and res.problems[0].reason.startswith("not UTF-8")


def test_source_and_argument_errors(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        load_examples("x.jsonl", fmt="csv")
    with pytest.raises(ValueError, match="on_bad_row"):
        load_examples("x.jsonl", on_bad_row="skip")
    with pytest.raises(ValueError, match="--offset and --limit"):
        load_examples("x.jsonl", offset=-1)
    odd = _write(tmp_path / "odd.jsonl", [json.dumps({"text": "hi"})])
    with pytest.raises(DataError, match=r"cannot detect the format.*\['text'\].*--format"):
        load_examples(str(odd))
    txt = _write(tmp_path / "plain.txt", ["just a line"])
    with pytest.raises(DataError, match="no '\\|\\|'"):
        load_examples(str(txt))


# --------------------------------------------------------------------------- Hugging Face


class _FakeHub:
    """Stands in for ``datasets.load_dataset``; returns a real in-memory ``datasets.Dataset``."""

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def __call__(self, path, name=None, split=None, **kwargs):
        import datasets

        self.calls.append((path, name, split))
        return datasets.Dataset.from_list(self.rows)


HF_ROWS = [
    {"question": "Natalia sold 48 clips ...?", "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 24"},
    {"question": "Weng earns $12 an hour ...?", "answer": "12/60 = $<<12/60=0.2>>0.2\n#### 1,000"},
    {"question": "Bad?", "answer": "no marker"},
]


def test_hf_loader_maps_gsm8k_columns(monkeypatch):
    datasets = pytest.importorskip("datasets")
    hub = _FakeHub(HF_ROWS)
    monkeypatch.setattr(datasets, "load_dataset", hub)
    res = load_examples("openai/gsm8k", split="train", limit=2)  # auto: not a path, looks like owner/name
    assert res.fmt == "hf" and res.source == "openai/gsm8k"
    assert hub.calls == [("openai/gsm8k", "main", "train")]
    assert res.examples == [
        Example("gsm8k-train-00000", "Natalia sold 48 clips ...?", "Natalia sold 48/2 = 24 clips.", "24", ("48/2=24",)),
        Example("gsm8k-train-00001", "Weng earns $12 an hour ...?", "12/60 = $0.2", "1000", ("12/60=0.2",)),
    ]
    with pytest.raises(DataError, match=r"openai/gsm8k, row 3 \(format hf\): no '####'"):
        load_examples("openai/gsm8k", split="train")
    load_examples("openai/gsm8k:socratic", split="test", fmt="hf", limit=1)
    assert hub.calls[-1] == ("openai/gsm8k", "socratic", "test")


@needs_data
def test_hf_rows_of_real_gsm8k_equal_the_normalised_file(monkeypatch):
    # Serve the upstream GSM8K test rows as the hub would; ids come out as the normalised ones.
    datasets = pytest.importorskip("datasets")
    lines = (DATA / "gsm8k/orig/test.jsonl").read_text(encoding="utf-8").splitlines()[:50]
    monkeypatch.setattr(datasets, "load_dataset", _FakeHub([json.loads(line) for line in lines]))
    hub = load_examples("openai/gsm8k", split="test")
    norm = load_examples(str(DATA / "gsm8k/test.jsonl"), limit=50)
    assert hub.examples == norm.examples
    assert dataset_fingerprint(hub.examples) == dataset_fingerprint(norm.examples)


def test_hf_loader_errors(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load .*hub unreachable.*local path"):
        load_examples("openai/gsm8k", split="test")
    with pytest.raises(DataError, match="needs a split: --split"):
        load_examples("openai/gsm8k", fmt="hf")
    monkeypatch.setattr(datasets, "load_dataset", _FakeHub([{"problem": "p", "solution": "s"}]))
    with pytest.raises(DataError, match="GSM8K-style 'question' and 'answer'"):
        load_examples("someone/math", split="test")


# --------------------------------------------------------------------------- traces


STEPS = Example("e1", "Q?", "Step one.\n\n  Step two.  \nStep three.", "3", ("1+1=2", "2+1=3"))


def test_build_trace_nl_and_equations():
    assert build_trace(STEPS) == "Step one.\nStep two.\nStep three."
    assert build_trace(STEPS, "equations") == "<<1+1=2>> <<2+1=3>>"


def test_build_trace_drop_last_step():
    assert build_trace(STEPS, drop_last_step=True) == "Step one.\nStep two."
    assert build_trace(STEPS, "equations", drop_last_step=True) == "<<1+1=2>>"
    one = Example("e2", "Q?", "Only step.", "1", ("1=1",))
    assert build_trace(one, drop_last_step=True) == "Only step."  # never emptied
    assert build_trace(one, "equations", drop_last_step=True) == "<<1=1>>"


def test_build_trace_empty_raises_unless_allowed():
    bare = Example("gsm-7", "Q?", "", "1")
    with pytest.raises(DataError, match=r"'gsm-7' has no 'nl' trace; try kind='equations'"):
        build_trace(bare)
    assert build_trace(bare, "equations", allow_empty=True) == ""
    with pytest.raises(ValueError, match="unknown trace kind"):
        build_trace(STEPS, "latent")


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_pinned_stable_order_sensitive_trace_insensitive():
    a, b = Example("1", "Q1", "x", "1"), Example("2", "Q2", "y", "2")
    fp = dataset_fingerprint([a, b])
    assert fp == dataset_fingerprint(iter([a, b]))  # any iterable
    # reference layout (v1): tag, then per row and field an 8-byte big-endian length and UTF-8 bytes
    ref = hashlib.sha256(b"kvkd.dataset_fingerprint.v1\x00")
    for field in ("1", "Q1", "1", "2", "Q2", "2"):
        ref.update(len(field.encode()).to_bytes(8, "big") + field.encode())
    assert fp == ref.hexdigest() == "dfbdd3385763c6a47bd332db2a97ebe9336033e6f8f4baeb0f789869ea6aa7e3"
    assert fp != dataset_fingerprint([b, a])
    assert fp != dataset_fingerprint([a])
    other_trace = [Example("1", "Q1", "other cot", "1", ("9=9",)), Example("2", "Q2", "", "2")]
    assert dataset_fingerprint(other_trace) == fp
    assert dataset_fingerprint([Example("1", "Q1", "", "2"), b]) != fp  # answer counts
    # length prefixes: moving text between fields changes the hash
    assert dataset_fingerprint([Example("ab", "c", "", "1")]) != dataset_fingerprint([Example("a", "bc", "", "1")])


def test_formats_listed():
    assert FORMATS == ("jsonl", "gsm8k", "icot", "svamp", "multiarith", "math", "gsmhard", "hf", "trace")  # trace: kvkd generate files


def test_a_new_format_is_one_registration(tmp_path):
    from kvkd.data import DATA_FORMATS, DataFormat, _RowError, register_format

    def parse(raw, example_id):
        q, _, a = raw.partition("=>")
        if not a.strip():
            raise _RowError("no '=>' answer")
        return Example(example_id, q.strip(), "", a.strip())

    register_format(DataFormat("arrow", parse, detect=lambda line: "=>" in line, suffix=".txt", priority=-1))
    try:
        f = tmp_path / "rows.txt"
        f.write_text("1 + 1 => 2\n2 + 3 => 5\n")
        res = load_examples(str(f))
        assert res.fmt == "arrow" and [(e.question, e.answer) for e in res.examples] == [("1 + 1", "2"), ("2 + 3", "5")]
    finally:
        DATA_FORMATS._items.pop("arrow")


def test_registry_suggests_the_closest_name():
    from kvkd.train.routers import ROUTERS

    with pytest.raises(KeyError, match=r"unknown router 'simlarity' \(did you mean 'similarity'\?\)"):
        ROUTERS.get("simlarity")
