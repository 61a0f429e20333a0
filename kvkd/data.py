"""Reasoning data sets: load rows from the normalised JSONL or the upstream formats.

Every loader turns a row into one :class:`Example` (id, question, CoT, normalised answer,
calculator equations). Formats (``fmt``):

- ``jsonl``: the normalised JSONL ``{"id", "question", "cot", "answer"[, "equations"]}``.
- ``gsm8k``: upstream GSM8K JSONL ``{"question", "answer"}``; the answer holds ``<<a=b>>``
  calculator notes and ends with ``#### 42``. CoT = the text without notes, as normalised.
- ``icot``: iCoT / GSM8k-Aug lines ``question||<<eq>> <<eq>> #### 42``. CoT = "" and the
  equations hold the steps (the normalised gsm8k_aug files put ``<<eq>> <<eq>>`` in ``cot``).
- ``svamp``: SVAMP.json, a list of ``{"ID", "Body", "Question", "Equation", "Answer"}``;
  CoT = the Equation, as normalised.
- ``multiarith``: MultiArith.json, a list of ``{"iIndex", "sQuestion", "lEquations", "lSolutions"}``.
- ``math``: PRM800K / MATH500 JSONL ``{"problem", "solution", "answer", "unique_id"}``.
- ``gsmhard``: PAL's GSM-Hard JSONL ``{"input", "code", "target"}`` (no CoT; ``code`` dropped).
- ``hf``: a Hugging Face ``datasets`` name with GSM8K-style columns, e.g. ``openai/gsm8k``.
- ``trace``: a trace file written by ``kvkd generate`` (format in :mod:`kvkd.traces`): the
  teacher's own traces as CoT, selected by ``keep``/``fallback``; ``offset``/``limit`` cut the
  file's rows before the selection.

Rows are counted in file order, ignoring empty lines; ``offset``/``limit`` cut a window of
rows *before* parsing, so a row's position (and any id built from it) does not depend on
whether other rows parse. Ids built from positions are 0-based (``train-00000``); row numbers
in error messages and :class:`RowProblem` are 1-based line (or list item) numbers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from kvkd.registry import Registry

__all__ = [
    "DATA_FORMATS", "DataFormat", "FORMATS", "TRACE_KINDS", "register_format", "DataError", "Example", "LoadResult", "RowProblem", "build_trace",
    "trace_steps",
    "dataset_fingerprint", "find_numbers", "load_examples", "parse_number",
]

TRACE_KINDS = ("nl", "equations")

_FILE_SUFFIXES = (".jsonl", ".json", ".txt")
_HF_NAME_RE = re.compile(r"^[\w.-]+/[\w.-]+(?::[\w.-]+)?$")
_HF_DEFAULT_CONFIGS = {"openai/gsm8k": "main", "gsm8k": "main"}
_NOTE_RE = re.compile(r"<<(.*?)>>")
# A number: optional sign (not a binary minus: no word char or closing bracket before it),
# optional currency, digits with optional thousands commas, optional decimals and exponent
# (at most 3 exponent digits, so no input can blow up the expansion).
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]}])(?P<sign>[-+\u2212]))?"
    r"(?:\\?[$\u20ac\u00a3]\s?)?"
    r"(?P<sign2>[-\u2212])?"
    r"(?<!\d)(?P<body>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:[eE](?P<exp>[-+]?\d{1,3})(?!\d))?"
)
_MAX_PLAIN_EXPONENT = 50


FIX_ROW = "Fix the row"  # the end of a bad-row message; commands that can skip bad rows name their flag after it


class DataError(ValueError):
    """A data source or row that cannot be read; the message says what and how to fix it."""


@dataclass(frozen=True)
class Example:
    """One reasoning problem.

    Attributes:
        id: unique within its data set.
        question: the problem text as given upstream.
        cot: natural-language reasoning ("" if the source has none).
        answer: final answer; numbers normalised by :func:`parse_number`, LaTeX kept verbatim.
        equations: calculator equations such as ``"48/2=24"`` (empty if unknown).
    """

    id: str
    question: str
    cot: str
    answer: str
    equations: tuple[str, ...] = ()


@dataclass(frozen=True)
class RowProblem:
    """A skipped row: ``row`` is its 1-based line (or list item) number in the source."""

    row: int
    reason: str


@dataclass
class LoadResult:
    """What :func:`load_examples` read: examples in source order plus skipped rows."""

    examples: list[Example]
    problems: list[RowProblem]
    source: str
    fmt: str


class _RowError(Exception):
    """Internal: why one row could not be parsed (turned into DataError or RowProblem)."""


# --------------------------------------------------------------------------- numbers


def _format_number(m: re.Match) -> str:
    body = m["body"].replace(",", "")
    value = Decimal(("0" + body if body.startswith(".") else body) + (f"e{m['exp']}" if m["exp"] else ""))
    if value == 0:
        return "0"
    negative = (m["sign"] in ("-", "\u2212")) != (m["sign2"] is not None)
    if m["exp"] and abs(value.adjusted()) > _MAX_PLAIN_EXPONENT:
        text = format(value, "E")  # "1e999" stays 1E+999 rather than a thousand digits
    else:
        text = format(value, "f")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
    return ("-" if negative else "") + text


def find_numbers(text: str) -> list[str]:
    """All numbers in ``text``, left to right, each normalised as by :func:`parse_number`."""
    return [_format_number(m) for m in _NUMBER_RE.finditer(text)]


def parse_number(text: str, *, strict: bool = False) -> str | None:
    """Normalise the first number in ``text`` to a plain decimal string.

    Keeps the sign and decimals, drops thousands commas, a currency sign ($, EUR, GBP, ``\\$``) and
    trailing zeros: ``"1,200"`` -> ``"1200"``, ``"-3.50"`` -> ``"-3.5"``, ``"51.0"`` -> ``"51"``,
    ``"$1,000.25"`` -> ``"1000.25"``, ``".5"`` -> ``"0.5"``, ``"-0"`` -> ``"0"``. A minus
    directly after a word character or closing bracket is an operator, not a sign
    (``"16-3"`` -> ``"16"``). Scientific notation is accepted and expanded (``"1e3"`` ->
    ``"1000"``, ``"2.5e-3"`` -> ``"0.0025"``) unless it would need more than 50 digits
    (``"1e99"`` -> ``"1E+99"``); at most 3 exponent digits are read.
    Fractions are not evaluated (``"3/4"`` -> ``"3"``): answers that may be fractions,
    ratios or times are read whole by :func:`kvkd.eval.answers.parse_answer`.

    Args:
        text: any string.
        strict: if True, ``text`` must be exactly one number (surrounding spaces allowed).
    Returns:
        The normalised number, or None if there is none (or, when strict, not only one).
    """
    if strict:
        m = _NUMBER_RE.fullmatch(text.strip())
    else:
        m = _NUMBER_RE.search(text)
    return _format_number(m) if m else None


def _number_field(value: Any, name: str) -> str:
    """Normalise a JSON answer field (number or numeric string); raises _RowError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _RowError(f"field {name!r} must be a number, got {type(value).__name__}")
    text = repr(value) if isinstance(value, float) else str(value)
    number = parse_number(text, strict=True)
    if number is None:
        raise _RowError(f"field {name!r} is not a number: {text!r}")
    return number


# --------------------------------------------------------------------------- row parsers


def _json_row(raw: Any) -> dict:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _RowError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(raw, dict):
        raise _RowError(f"expected a JSON object, got {type(raw).__name__}")
    return raw


def _text_field(row: dict, name: str, allow_empty: bool = False) -> str:
    if name not in row:
        raise _RowError(f"missing field {name!r} (row has {sorted(row)})")
    value = row[name]
    if not isinstance(value, str):
        raise _RowError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _RowError(f"field {name!r} is empty")
    return value


def _split_final(text: str) -> tuple[str, str]:
    """Split ``"... #### 1,200"`` into (body, "1200"); raises _RowError without ``####``."""
    body, sep, final = text.rpartition("####")
    if not sep:
        raise _RowError("no '####' final-answer marker")
    answer = parse_number(final, strict=True)
    if answer is None:
        raise _RowError(f"answer after '####' is not a number: {final.strip()!r}")
    return body, answer


def _gsm8k_example(row: Any, example_id: str) -> Example:
    """GSM8K ``{"question", "answer"}`` (a JSON line or a mapping) -> Example."""
    row = _json_row(row)
    question = _text_field(row, "question")
    body, answer = _split_final(_text_field(row, "answer"))
    cot = _NOTE_RE.sub("", body).strip()
    return Example(example_id, question, cot, answer, tuple(_NOTE_RE.findall(body)))


def _jsonl_example(raw: Any, example_id: str) -> Example:
    row = _json_row(raw)
    answer = row.get("answer")
    answer = _number_field(answer, "answer") if isinstance(answer, (int, float)) else _text_field(row, "answer")
    equations = row.get("equations", [])
    if not isinstance(equations, list) or not all(isinstance(e, str) for e in equations):
        raise _RowError("field 'equations' must be a list of strings")
    return Example(_text_field(row, "id"), _text_field(row, "question"),
                   _text_field(row, "cot", allow_empty=True), answer, tuple(equations))


def _icot_example(raw: Any, example_id: str) -> Example:
    question, sep, rest = raw.rpartition("||")
    if not sep:
        raise _RowError("no '||' between question and equations")
    if not question.strip():
        raise _RowError("empty question before '||'")
    body, answer = _split_final(rest)
    return Example(example_id, question, "", answer, tuple(_NOTE_RE.findall(body)))


def _svamp_example(raw: Any, example_id: str) -> Example:
    row = _json_row(raw)
    body = _text_field(row, "Body", allow_empty=True).strip()
    if body and body[-1] not in ".?!":
        body += "."  # upstream Body often lacks the full stop before Question
    question = f"{body} {_text_field(row, 'Question').strip()}".strip()
    sid = f"svamp-{row['ID']}" if "ID" in row else example_id
    cot = row.get("Equation", "")
    return Example(sid, question, cot if isinstance(cot, str) else "", _number_field(row.get("Answer"), "Answer"))


def _multiarith_example(raw: Any, example_id: str) -> Example:
    row = _json_row(raw)
    solutions = row.get("lSolutions")
    if not isinstance(solutions, list) or len(solutions) != 1:
        raise _RowError(f"field 'lSolutions' must hold exactly one number, got {solutions!r}")
    mid = f"multiarith-{row['iIndex']}" if "iIndex" in row else example_id
    equations = row.get("lEquations") or []
    return Example(mid, _text_field(row, "sQuestion").strip(), " ".join(map(str, equations)),
                   _number_field(solutions[0], "lSolutions[0]"))


def _math_example(raw: Any, example_id: str) -> Example:
    row = _json_row(raw)
    mid = row.get("unique_id") if isinstance(row.get("unique_id"), str) else example_id
    return Example(mid, _text_field(row, "problem"), _text_field(row, "solution", allow_empty=True),
                   _text_field(row, "answer"))


def _gsmhard_example(raw: Any, example_id: str) -> Example:
    row = _json_row(raw)
    return Example(example_id, _text_field(row, "input"), "", _number_field(row.get("target"), "target"))


@dataclass(frozen=True)
class DataFormat:
    """One data format: how its file is read, how a row is parsed, how it is recognised.

    Attributes:
        name: the ``--format`` value.
        parse: ``(raw row, fallback id) -> Example``; raises ``_RowError`` for a bad row.
        container: ``"lines"`` (one row per line: JSONL, TXT), ``"json-list"`` (one JSON list) or
            ``"trace-file"`` (a kvkd generate trace file, read whole by :mod:`kvkd.traces`).
        detect: ``first row -> bool`` for ``--format auto`` (a dict for JSON rows, the raw line
            for TXT); None = never detected (must be named).
        suffix: the file suffix detection applies to (``.jsonl``, ``.txt``, ``.json``).
        priority: detection order among formats of one suffix (lower first: a format whose
            keys are a superset of another's goes first).
    """

    name: str
    parse: Callable[[Any, str], Example]
    container: str = "lines"
    detect: Callable[[Any], bool] | None = None
    suffix: str = ".jsonl"
    priority: int = 0


DATA_FORMATS: Registry[DataFormat] = Registry("data format")


def register_format(fmt: DataFormat) -> DataFormat:
    """Add a data format: one call with its parser, container and detector."""
    return DATA_FORMATS.register(fmt.name)(fmt)


register_format(DataFormat("jsonl", _jsonl_example, detect=lambda row: {"id", "cot"} <= row.keys()))
register_format(DataFormat("gsm8k", _gsm8k_example, detect=lambda row: {"question", "answer"} <= row.keys(), priority=3))
register_format(DataFormat("icot", _icot_example, detect=lambda line: "||" in line, suffix=".txt"))
register_format(DataFormat("svamp", _svamp_example, "json-list", lambda row: {"Body", "Question"} <= row.keys(), ".json"))
register_format(DataFormat("multiarith", _multiarith_example, "json-list", lambda row: "sQuestion" in row, ".json", priority=1))
register_format(DataFormat("math", _math_example, detect=lambda row: {"problem", "solution", "answer"} <= row.keys(), priority=1))
register_format(DataFormat("gsmhard", _gsmhard_example, detect=lambda row: {"input", "target"} <= row.keys(), priority=2))
register_format(DataFormat("hf", _gsm8k_example))  # Hugging Face hub rows, GSM8K-style columns


def _trace_file_row(raw: Any, example_id: str) -> Example:  # pragma: no cover - the file is read whole
    raise _RowError("a trace file is read whole (kvkd.traces), not row by row")


# kvkd generate's trace files (kvkd.traces): read whole, their selection applied; a header line marks them.
register_format(DataFormat("trace", _trace_file_row, "trace-file", lambda row: "kvkd_traces" in row, priority=-1))
FORMATS = tuple(name for name, _ in DATA_FORMATS.items())


# --------------------------------------------------------------------------- sources


def _line_rows(path: Path) -> Iterator[tuple[int, str | _RowError]]:
    """Yield (1-based line number, line) for non-empty lines; undecodable ones as a _RowError."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield number, _RowError(f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if line.strip():
                yield number, line


def _json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable JSON file ({e}); fix the file or convert it to JSONL") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data


def _detect(path: Path) -> str:
    """Pick the format of a file from its suffix and first row (the registered detectors, in order)."""
    hint = f"give the format (--format): one of {', '.join(f for f in FORMATS if f != 'hf')}"
    if path.suffix == ".json":
        data = _json_list(path)
        first = data[0] if data and isinstance(data[0], dict) else {}
        what = f"a JSON list with keys {sorted(first)}"
    else:
        line = next(_line_rows(path), (0, None))[1]
        if line is None:
            raise DataError(f"{path}: the file has no rows, so its format cannot be detected")
        if path.suffix == ".txt":
            first, what = line, "a text file: its first line has no '||' (iCoT style)"
        else:
            try:
                first = json.loads(line) if isinstance(line, str) else None
            except json.JSONDecodeError:
                first = None
            if not isinstance(first, dict):
                raise DataError(f"{path}: cannot detect the format: first row is not a JSON object; {hint}")
            what = f"a JSONL file with keys {sorted(first)}"
    suffix = path.suffix if path.suffix in (".json", ".txt") else ".jsonl"
    for name, fmt in sorted(DATA_FORMATS.items(), key=lambda kv: kv[1].priority):
        if fmt.detect is not None and fmt.suffix == suffix and fmt.detect(first):
            return name
    raise DataError(f"{path}: cannot detect the format of {what}; {hint}")


def _resolve_path(source: str, split: str | None) -> Path:
    path = Path(source).expanduser()
    if not path.is_dir():
        return path
    if split is None:
        found = sorted(p for p in path.iterdir() if p.suffix in _FILE_SUFFIXES and p.is_file())
        if len(found) == 1:  # a folder with one split needs no split
            return found[0]
        raise DataError(f"{path} is a directory with splits {[p.stem for p in found]}: pick one with --split")
    for suffix in _FILE_SUFFIXES:
        if (path / f"{split}{suffix}").is_file():
            return path / f"{split}{suffix}"
    found = sorted(p.stem for p in path.iterdir() if p.suffix in _FILE_SUFFIXES)
    raise DataError(f"{path} has no {split}.jsonl/.json/.txt for --split {split}; splits there: {found}: pass --split "
                    + " or ".join(found or ["NAME"]))


def _hf_rows(name: str, split: str | None) -> Iterator[tuple[int, dict]]:
    if split is None:
        raise DataError(f"Hugging Face data set {name!r} needs a split: --split train or test")
    repo, _, config = name.partition(":")
    config = config or _HF_DEFAULT_CONFIGS.get(repo)
    try:
        import datasets
    except ImportError:
        raise DataError("fmt='hf' needs the 'datasets' package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # hub, network, cache and config errors all surface here
        raise DataError(
            f"could not load Hugging Face data set {repo!r} (config {config!r}, split {split!r}): {e}. "
            "No local file of that name exists either; without hub access, download the files "
            "and pass their local path."
        ) from e
    missing = {"question", "answer"} - set(ds.column_names)
    if missing:
        raise DataError(f"{repo!r} has columns {ds.column_names}; fmt='hf' needs GSM8K-style 'question' and 'answer'")
    return ((i, row) for i, row in enumerate(ds, start=1))


def load_examples(
    source: str,
    split: str | None = None,
    fmt: str = "auto",
    limit: int | None = None,
    offset: int = 0,
    on_bad_row: str = "raise",
    keep: str | None = None,
    fallback: str | None = None,
) -> LoadResult:
    """Load a reasoning data set from a file, a directory plus split, or the Hugging Face hub.

    Args:
        source: a file; a directory holding ``{split}.jsonl`` / ``.json`` / ``.txt``; or, with
            fmt "hf" (or "auto" when no such path exists), a data set name ``owner/name`` with
            an optional ``:config`` (``openai/gsm8k`` defaults to config "main").
        split: the split to read from a directory or the hub; ignored for a file. None reads
            a directory's only data file (and is an error when it has several).
        fmt: "auto" or one of :data:`FORMATS`. "auto" uses the suffix and the first row.
        limit: at most this many rows (None: all), counted before parsing.
        offset: rows to skip first (0-based), counted before parsing.
        on_bad_row: "raise" to stop at the first unparseable row or duplicate id, "report" to
            skip it and record a :class:`RowProblem`. Nothing is dropped silently.
        keep, fallback: the trace selection of a ``trace`` file (:class:`kvkd.traces.TraceSelection`;
            None = its defaults); refused for other formats.
    Returns:
        LoadResult with the examples in source order, the problems, the resolved source and fmt.
    Raises:
        ValueError: for an unknown fmt or on_bad_row, or a negative limit or offset.
        DataError: if the source is missing or unreadable, its format cannot be detected, or
            (with on_bad_row="raise") a row is bad; the message names the file and row.
    """
    if fmt != "auto" and fmt not in DATA_FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose 'auto' or one of {', '.join(FORMATS)}")
    if on_bad_row not in ("raise", "report"):
        raise ValueError(f"on_bad_row must be 'raise' or 'report', got {on_bad_row!r}")
    if offset < 0 or (limit is not None and limit < 0):
        raise ValueError(f"--offset and --limit must be >= 0, got {offset} and {limit}")

    looks_like_hub = (fmt == "auto" and _HF_NAME_RE.match(source) is not None
                      and not Path(source).expanduser().exists() and Path(source).suffix not in _FILE_SUFFIXES)
    if fmt == "hf" or looks_like_hub:
        fmt, where = "hf", source
        rows: Iterable[tuple[int, Any]] = _hf_rows(source, split)
        stem = f"{source.partition(':')[0].rsplit('/', 1)[-1]}-{split}"  # openai/gsm8k -> gsm8k-train
    else:
        path = _resolve_path(source, split)
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        fmt = _detect(path) if fmt == "auto" else fmt
        where, stem = str(path.resolve()), path.stem
        if DATA_FORMATS.get(fmt).container == "trace-file":
            from kvkd.traces import load_trace_examples

            return LoadResult(load_trace_examples(path, keep, fallback, offset, limit)[0], [], where, fmt)
        rows = enumerate(_json_list(path), start=1) if DATA_FORMATS.get(fmt).container == "json-list" else _line_rows(path)
    if keep is not None or fallback is not None:
        raise ValueError(f"keep/fallback select the traces of a trace file (kvkd generate); {source} is in format {fmt!r}")

    parse = DATA_FORMATS.get(fmt).parse
    examples: list[Example] = []
    problems: list[RowProblem] = []
    seen: set[str] = set()
    window = itertools.islice(rows, offset, None if limit is None else offset + limit)
    for index, (row, raw) in enumerate(window, start=offset):
        try:
            if isinstance(raw, _RowError):
                raise raw
            example = parse(raw, f"{stem}-{index:05d}")
            if example.id in seen:
                raise _RowError(f"duplicate id {example.id!r}")
        except _RowError as e:
            if on_bad_row == "raise":
                raise DataError(f"{where}, row {row} (format {fmt}): {e}. {FIX_ROW}") from None
            problems.append(RowProblem(row, str(e)))
            continue
        seen.add(example.id)
        examples.append(example)
    return LoadResult(examples, problems, where, fmt)


# --------------------------------------------------------------------------- traces


def trace_steps(example: Example, kind: str = "nl", drop_last_step: bool = False) -> list[str]:
    """The reasoning steps of a trace, in order (what :func:`build_trace` joins).

    ``"nl"``: the CoT's non-empty lines, stripped; ``"equations"``: ``"<<48/2=24>>"`` per
    calculator equation. ``drop_last_step`` removes the final step when there are at least two.

    Returns:
        the steps ([] when the example has no such trace).
    Raises:
        ValueError: for an unknown kind.
    """
    if kind == "nl":
        steps = [s.strip() for s in example.cot.split("\n") if s.strip()]
    elif kind == "equations":
        steps = [f"<<{e.strip()}>>" for e in example.equations if e.strip()]
    else:
        raise ValueError(f"unknown trace kind {kind!r}; choose one of {TRACE_KINDS}")
    if drop_last_step and len(steps) >= 2:
        steps = steps[:-1]
    return steps


def build_trace(example: Example, kind: str = "nl", drop_last_step: bool = False,
                allow_empty: bool = False) -> str:
    """Render the reasoning trace a teacher reads.

    ``"nl"``: the CoT split into steps on newlines (stripped, empty lines dropped), joined with
    ``"\\n"``. ``"equations"``: ``"<<48/2=24>> <<48+24=72>>"`` (iCoT / GSM8k-Aug style). For
    normalised GSM8k-Aug rows the ``cot`` already is that equation string (one "nl" step):
    use ``kind="equations"`` there to get steps.

    ``drop_last_step`` removes the final step, as CODI (Shen et al. 2025) does so the teacher
    cannot copy the answer. A trace of a single step is kept whole rather than emptied.

    Args:
        example: the row.
        kind: one of :data:`TRACE_KINDS`.
        drop_last_step: drop the last step when there are at least two.
        allow_empty: return "" instead of raising when the example has no such trace.
    Returns:
        The trace text.
    Raises:
        ValueError: for an unknown kind.
        DataError: if the trace is empty and allow_empty is False.
    """
    steps = trace_steps(example, kind, drop_last_step)
    if not steps and not allow_empty:
        other = "equations" if kind == "nl" else "nl"
        raise DataError(f"example {example.id!r} has no {kind!r} trace; try kind={other!r}, "
                        "or allow_empty=True to train it without a trace")
    return ("\n" if kind == "nl" else " ").join(steps)


def dataset_fingerprint(examples: Iterable[Example]) -> str:
    """SHA-256 over the ordered ``(id, question, answer)`` of every row.

    Each field is length-prefixed (8-byte big-endian byte count, then UTF-8), so no two
    different row lists hash alike by shifting text between fields. The CoT and equations are
    deliberately left out: teachers that read different traces of the same rows share one
    fingerprint, and a cache built from either matches the same training data.

    Returns:
        64 lowercase hex characters; changes with any row's text, the row order or count.
    """
    h = hashlib.sha256(b"kvkd.dataset_fingerprint.v1\x00")
    for ex in examples:
        for field in (ex.id, ex.question, ex.answer):
            data = field.encode("utf-8")
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
    return h.hexdigest()
