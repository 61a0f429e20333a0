"""Trace files: the reasoning a teacher wrote itself (``kvkd generate``), one JSONL file.

Format (version 1), UTF-8 JSON Lines, every line ending in ``\\n``:

1. **Header** (first line)::

       {"kvkd_traces": 1,
        "teacher": {"spec", "source", "file_sha256"?, "architecture", "num_layers", ...},
        "engine": {"name": "hf" | "vllm", "version": "transformers 5.24.0", "dtype"},
        "sampling": {"temperature", "top_p", "max_new_tokens", "samples", "seed", "stop", "batch_size"},
        "prompt": {"template": "...{question}...", "chat_template": true, "answer_check": "numeric" | "math"},
        "data": {"source", "format", "split", "offset", "rows", "fingerprint"}}

   ``data.fingerprint`` is :func:`kvkd.data.dataset_fingerprint` of the questions' rows.
   The header holds no time stamp: the same seed and engine give a byte-identical file.

2. **One line per (row, sample)**, rows in data order, samples 0..N-1 within a row::

       {"row": 0, "id": "train-00000", "sample": 0, "question": "...", "gold": "72",
        "gold_cot": "...", "completion": "<the raw text, cut at the stop strings>",
        "trace": "<the reasoning: the completion before its final-answer statement>",
        "answer": "72" | null, "correct": true, "finish": "stop" | "length",
        "prompt_tokens": 87, "tokens": 54}

   ``row`` is the 0-based position in the data set (``offset`` included); ``answer`` is what
   kvkd's answer checker extracted, ``correct`` its verdict against ``gold`` (numeric, or math
   equivalence with ``answer_check: math``); ``tokens`` counts the generated tokens.

3. **Footer** (last line, written once every line is there)::

       {"kvkd_traces_end": {"lines": 200, "rows": 100, "samples": 2}}

A file without the footer is *incomplete* (``kvkd generate`` was interrupted): readers refuse
it and ``kvkd generate`` with the same options continues it. A last line without its newline
is an interrupted write; it is never read as a trace (the writer cuts it off on resume).

Selection (:class:`TraceSelection`, applied when a file is read for extraction):
``keep`` = ``first-correct`` (per row, the first correct sample), ``correct`` (every correct
sample) or ``all`` (every sample); ``fallback`` = ``gold`` (a row without a kept trace reads
the data set's own CoT) or ``skip`` (the row is dropped). The selected examples keep the row's
id for its first example and get ``{id}#s{sample}`` for further ones, so their fingerprint
(over id, question, gold answer) equals the data set's exactly when the row set is the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kvkd.cache.errors import CacheMismatchError
from kvkd.config import group, opt
from kvkd.data import DataError, Example

TRACE_FORMAT_VERSION = 1
KEEP_CHOICES = ("first-correct", "correct", "all")
FALLBACK_CHOICES = ("gold", "skip")
HEADER_KEY, FOOTER_KEY = "kvkd_traces", "kvkd_traces_end"
LINE_FIELDS = ("row", "id", "sample", "question", "gold", "gold_cot", "completion", "trace", "answer", "correct", "finish", "prompt_tokens", "tokens")


@group("trace selection")
class TraceSelection:
    """Which traces of a trace file become examples (``kvkd generate`` reports it, ``kvkd extract --trace FILE`` applies it).

    Attributes:
        keep: ``first-correct``, ``correct`` or ``all`` (see the module docstring).
        fallback: ``gold`` or ``skip``: what a row without a kept trace becomes.
    """

    keep: str = opt("first-correct", help="Traces kept per row: first-correct, correct (every correct sample) or all", choices=KEEP_CHOICES)
    fallback: str = opt("gold", help="A row without a kept trace: gold (reads the data set's CoT) or skip (dropped: another row set)", choices=FALLBACK_CHOICES)


@dataclass
class TraceFile:
    """A trace file as read: header, the complete lines and whether the footer is there.

    Attributes:
        path: the file.
        header: the header dict.
        lines: the (row, sample) lines in file order.
        complete: True when the footer is present.
        good_bytes: byte length of the readable prefix (header and complete lines, footer
            included); anything after it is an interrupted write.
    """

    path: str
    header: dict
    lines: list[dict] = field(default_factory=list)
    complete: bool = False
    good_bytes: int = 0

    def identity(self) -> dict:
        """What a cache records about the file: its content hash, teacher, engine, sampling, prompt."""
        return {
            "path": str(Path(self.path).resolve()),
            "sha256": file_digest(self.path),
            "teacher": self.header.get("teacher", {}).get("spec"),
            "teacher_sha256": self.header.get("teacher", {}).get("file_sha256"),
            "engine": self.header.get("engine"),
            "sampling": self.header.get("sampling"),
            "prompt": self.header.get("prompt"),
        }


def file_digest(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_trace_file(path: str | Path, *, require_complete: bool = True) -> TraceFile:
    """Read a trace file (format in the module docstring).

    Args:
        path: the JSONL file.
        require_complete: refuse a file without its footer (an interrupted ``kvkd generate``).
    Returns:
        TraceFile; with ``require_complete=False`` an interrupted last line is left out and
        ``good_bytes`` says where it starts.
    Raises:
        DataError: missing file, no header, a line that is not JSON or lacks a field, a
            duplicate (row, sample), a footer that disagrees with the lines, or (when
            required) no footer; each names the file, the line and the fix.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"trace file {p} does not exist; write it with `kvkd generate --out {p}`")
    raw = p.read_bytes()
    header, lines, footer, good, seen = None, [], None, 0, set()
    pos, number = 0, 0
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        if end < 0:  # interrupted write: the last line has no newline
            break
        number += 1
        try:
            obj = json.loads(raw[pos:end].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"trace file {p}, line {number}: not a JSON line ({err}); the file is damaged: regenerate it with `kvkd generate --overwrite`") from None
        if not isinstance(obj, dict):
            raise DataError(f"trace file {p}, line {number}: expected a JSON object")
        if number == 1:
            if obj.get(HEADER_KEY) != TRACE_FORMAT_VERSION:
                raise DataError(f"{p} is not a kvkd trace file (its first line has no \"{HEADER_KEY}\": {TRACE_FORMAT_VERSION} header); write one with `kvkd generate`")
            header = obj
        elif FOOTER_KEY in obj:
            footer = obj[FOOTER_KEY]
        elif footer is not None:
            raise DataError(f"trace file {p}, line {number}: a trace after the end marker; the file is damaged: regenerate it with `kvkd generate --overwrite`")
        else:
            missing = [k for k in LINE_FIELDS if k not in obj]
            if missing:
                raise DataError(f"trace file {p}, line {number}: missing field(s) {missing}")
            key = (obj["row"], obj["sample"])
            if key in seen:
                raise DataError(f"trace file {p}, line {number}: row {key[0]} sample {key[1]} appears twice")
            seen.add(key)
            lines.append(obj)
        pos = good = end + 1
    if header is None:
        raise DataError(f"trace file {p} is empty or has no complete header line; rerun `kvkd generate --overwrite`")
    if footer is not None and footer.get("lines") != len(lines):
        raise DataError(f"trace file {p}: its end marker counts {footer.get('lines')} traces but the file holds {len(lines)}; regenerate it with `kvkd generate --overwrite`")
    tf = TraceFile(str(p), header, lines, footer is not None, good)
    if require_complete and not tf.complete:
        rows = len({ln["row"] for ln in lines})
        raise DataError(f"trace file {p} is incomplete ({len(lines)} traces of {rows} rows, no end marker): `kvkd generate` was interrupted; "
                        "rerun it with the same options to finish the file")
    return tf


def select_examples(tf: TraceFile, keep: str = "first-correct", fallback: str = "gold") -> tuple[list[Example], dict]:
    """Turn a trace file's lines into training examples (the teacher's trace as ``cot``).

    Args:
        tf: a read trace file.
        keep: one of :data:`KEEP_CHOICES`; fallback: one of :data:`FALLBACK_CHOICES`.
    Returns:
        (examples in row order, then sample order; counts ``{"rows", "own", "gold", "skipped",
        "examples", "skipped_ids", "gold_ids"}``).
    Raises:
        ValueError: unknown keep/fallback.
        DataError: a gold fallback for a row whose data set has no CoT (names the row; use
            ``--fallback skip``).
    """
    if keep not in KEEP_CHOICES or fallback not in FALLBACK_CHOICES:
        raise ValueError(f"--keep must be one of {KEEP_CHOICES} and --fallback one of {FALLBACK_CHOICES}, got {keep!r}, {fallback!r}")
    by_row: dict[int, list[dict]] = {}
    for ln in tf.lines:
        by_row.setdefault(ln["row"], []).append(ln)
    examples: list[Example] = []
    counts = {"rows": len(by_row), "own": 0, "gold": 0, "skipped": 0, "examples": 0, "skipped_ids": [], "gold_ids": []}
    for row in sorted(by_row):
        samples = sorted(by_row[row], key=lambda ln: ln["sample"])
        first = samples[0]
        if keep == "all":
            kept = samples
        else:
            kept = [ln for ln in samples if ln["correct"] and ln["trace"].strip()]
            kept = kept[:1] if keep == "first-correct" else kept
        if kept:
            counts["own"] += 1
            for k, ln in enumerate(kept):
                eid = first["id"] if k == 0 else f"{first['id']}#s{ln['sample']}"
                examples.append(Example(eid, ln["question"], ln["trace"], ln["gold"]))
        elif fallback == "gold":
            if not first["gold_cot"].strip():
                raise DataError(f"trace file {tf.path}: row {row} ({first['id']}) has no correct trace and its data set has no CoT to fall back to; "
                                "pass --fallback skip to drop such rows")
            counts["gold"] += 1
            counts["gold_ids"].append(first["id"])
            examples.append(Example(first["id"], first["question"], first["gold_cot"], first["gold"]))
        else:
            counts["skipped"] += 1
            counts["skipped_ids"].append(first["id"])
    counts["examples"] = len(examples)
    return examples, counts


def row_set(counts: dict, keep: str, fallback: str) -> str:
    """One phrase saying which rows a selection holds, for cache metadata and error messages."""
    if counts["skipped"] == 0 and counts["examples"] == counts["rows"]:
        return f"all {counts['rows']} rows (keep {keep}, fallback {fallback})"
    return (f"{counts['examples']} examples from {counts['rows'] - counts['skipped']} of {counts['rows']} rows "
            f"(keep {keep}, fallback {fallback}: {counts['skipped']} rows without a correct trace dropped)")


# ----------------------------------------------------------------------------- writing
class TraceWriter:
    """Append-only writer of a trace file that resumes an interrupted one.

    A new file's header is written to a temporary file and renamed into place (never a file
    without a whole header). Each batch of lines is written with one ``write`` and fsynced;
    on resume, an interrupted last line is cut off first. :meth:`finish` writes the footer.
    """

    def __init__(self, path: str | Path, header: dict, *, overwrite: bool = False):
        """Open ``path`` for writing ``header``'s traces.

        Raises:
            DataError: the file holds traces written with another header (names the differing
                fields; pass --overwrite or another --out), or is damaged.
        """
        self.path = Path(path)
        self.done: dict[tuple[int, int], dict] = {}
        self.complete = False
        if self.path.exists() and not overwrite:
            tf = read_trace_file(self.path, require_complete=False)
            diff = [k for k in sorted(set(header) | set(tf.header)) if header.get(k) != tf.header.get(k)]
            if diff:
                detail = "; ".join(f"{k}: file {json.dumps(tf.header.get(k))[:200]} vs now {json.dumps(header.get(k))[:200]}" for k in diff)
                raise DataError(f"{self.path} holds traces written with other settings ({detail}); pass --overwrite to replace it, or another --out")
            self.done = {(ln["row"], ln["sample"]): ln for ln in tf.lines}
            self.complete = tf.complete
            if tf.good_bytes < self.path.stat().st_size:
                with open(self.path, "r+b") as fh:
                    fh.truncate(tf.good_bytes)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(header, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)

    def append(self, lines: list[dict]) -> None:
        """Append (row, sample) lines in one write, then flush them to disk."""
        if not lines:
            return
        blob = "".join(json.dumps({k: ln[k] for k in LINE_FIELDS}, ensure_ascii=False) + "\n" for ln in lines)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        for ln in lines:
            self.done[(ln["row"], ln["sample"])] = ln

    def finish(self, rows: int, samples: int) -> None:
        """Write the footer once every (row, sample) line is there.

        Raises:
            DataError: lines are missing (a bug; nothing is written).
        """
        if self.complete:
            return
        if len(self.done) != rows * samples:
            raise DataError(f"{self.path}: {len(self.done)} traces of {rows * samples} written; not marking it complete")
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({FOOTER_KEY: {"lines": len(self.done), "rows": rows, "samples": samples}}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.complete = True


def load_trace_examples(path: str | Path, keep: str | None = None, fallback: str | None = None, offset: int = 0, limit: int | None = None) -> tuple[list[Example], dict, TraceFile]:
    """Examples of a complete trace file: rows ``[offset, offset + limit)`` of the file (in row
    order), then :func:`select_examples` (``None`` = :class:`TraceSelection`'s defaults).

    Returns:
        (examples, selection counts, the TraceFile with only the windowed lines).
    Raises:
        DataError: see :func:`read_trace_file` and :func:`select_examples`.
    """
    keep = keep or TraceSelection.keep
    fallback = fallback or TraceSelection.fallback
    tf = read_trace_file(path)
    rows = sorted({ln["row"] for ln in tf.lines})
    window = set(rows[offset: None if limit is None else offset + limit])
    tf = TraceFile(tf.path, tf.header, [ln for ln in tf.lines if ln["row"] in window], tf.complete, tf.good_bytes)
    examples, counts = select_examples(tf, keep, fallback)
    return examples, counts, tf


def check_same_rows(caches: list[tuple[str, dict]]) -> None:
    """Refuse teacher caches over different row sets, saying which rows each holds.

    Training compares the teachers example by example, so every cache must hold the same rows
    (``dataset.fingerprint``). A trace file read with ``--fallback skip`` (or several traces per
    row) yields another row set than the data set; this names it.

    Args:
        caches: ``(name or url, cache metadata)`` pairs.
    Raises:
        CacheMismatchError: field ``dataset.fingerprint``, when the fingerprints differ and a
            cache was extracted over a trace file (other mismatches are left to
            :func:`kvkd.cache.compat.check_compatible`); lists each cache's rows and the fix.
    """
    prints = {name: meta.get("dataset", {}).get("fingerprint") for name, meta in caches}
    if len(set(prints.values())) <= 1 or not any(meta.get("dataset", {}).get("row_set") for _, meta in caches):
        return
    listing = "; ".join(f"{name}: {_rows_phrase(meta.get('dataset', {}))}" for name, meta in caches)
    raise CacheMismatchError(f"the teacher caches hold different rows ({listing}). Training compares teachers row by row: extract every teacher over the same rows "
                    "(a trace file with --fallback gold keeps the data set's rows; --fallback skip or --keep correct/all make another row set)",
                             "dataset.fingerprint", prints)


def _rows_phrase(ds: dict) -> str:
    if ds.get("row_set"):
        return f"{ds['row_set']} of trace file {ds.get('source')}"
    return f"{ds.get('rows')} rows of {ds.get('source')} (offset {ds.get('offset', 0)}, {ds.get('trace')} CoT)"
