"""``kvkd extract``: run one teacher over a data set and write its compressed cache.

The loop works shard by shard: every pending shard of the store (see
``kvkd.cache.writer``) is filled in memory, batch by batch (examples sorted by length
inside the shard to cut padding), then written in one go; a shard whose flags are not set
is redone on the next call, so an interrupted run resumes where it stopped.

Parallel extraction (``extraction_part``): N processes — ranks of ``torchrun``/``deepspeed``
(``RANK``/``WORLD_SIZE``) or independent jobs (``--num-shards N --shard-index i``) — open the
same store and each writes the shards ``s % N == i``, without talking to each other. Each part
resumes on its own (its pending shards are those whose flags are unset). A part holds a claim
file on a shard while computing it (``kvkd.cache.claims``), so a second writer of that shard
fails loudly instead of overwriting it. Every part writes its flags before it checks them all,
so the part that finishes last marks the cache complete.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable

import numpy as np
import torch

from kvkd.cache.codecs import Compressor
from kvkd.cache.errors import CacheError
from kvkd.cache.schema import CacheLayout
from kvkd.cache.store import AUTO, CacheStore, StoreArgs, is_name
from kvkd.cache.writer import VOLATILE_KEYS, CacheWriter
from kvkd.config import DataSelection, RuntimeArgs, opt, override
from kvkd.data import FIX_ROW, TRACE_KINDS, DataError, Example, LoadResult, build_trace, dataset_fingerprint, load_examples
from kvkd.models import LoadedModel, key_module, decoder_layers, load_model, resolve_device, tokenizer_identity
from kvkd.pipeline.capture import Capture, TeacherBatch, capture_batch
from kvkd.pipeline.compress import DEFAULT_LAMBDA, gather_slots, select_slots
from kvkd.prompts import PromptTemplate, token_span
from kvkd.traces import TraceSelection, load_trace_examples, row_set


ON_BAD_ROW = ("error", "skip")
TOO_LONG = ("error", "skip")


def _codec_names() -> list[str]:
    from kvkd.cache.codecs import codec_choices

    return codec_choices()


@dataclass
class ExtractConfig(DataSelection, RuntimeArgs, TraceSelection, StoreArgs):
    """Options of ``kvkd extract`` (defaults live here and in the groups, only there).

    Attributes (besides the data selection and runtime groups):
        model: teacher spec: ``smollm2``, a .gguf file, a model folder or a hub id.
        out: output cache path or fsspec URL (one Zarr v3 group per teacher), or a name of the
            cache root (``cache_root``; a bare name without slash, or ``auto`` for one made of
            teacher + data): a complete cache with the same key there is reused, not recomputed
            (see ``kvkd.cache.store``). An existing local path wins over a name.
        trace: CoT the teacher reads: ``nl`` (natural language), ``equations``, or a trace file
            of ``kvkd generate`` (the teacher's own traces, selected by ``keep``/``fallback``;
            its questions and gold answers are the data, so ``data`` stays empty).
        drop_last_step: drop the last CoT step (CODI) so the teacher cannot copy the answer.
        trace_fallback: trace used for rows whose ``trace`` is empty (e.g. GSM8K rows without
            calculator notes have no equation trace); None = such a row is an error. The rows
            that fell back are listed in the cache metadata (``dataset.trace_fallback_ids``).
        slots: M, KV entries kept per (layer, KV head).
        lam: lambda of the KaVa eviction score (importance weight).
        batch_size: examples per teacher forward.
        dtype: dtype the teacher runs in.
        codec: storage codecs: a preset of ``kvkd.cache.codecs.PRESETS`` (per-array codecs:
            ``fp16``, ``int8``, ``int4``) or a name of ``kvkd.cache.codecs.CODECS`` (one codec
            for keys, values and hidden; ``float16`` is the ``fp16`` preset).
        compressor: byte compressor, ``zstd:LEVEL``, ``blosc:LEVEL:SHUFFLE`` or ``none``.
        examples_per_shard: examples per shard file (0 = about 32 MB per shard).
        overwrite: replace an existing store at ``out``.
        num_shards: split the cache's shards over this many independent parts (jobs of an
            array, ranks): part i writes the shards s with ``s % num_shards == i``. 0 = take
            the rank and world size from the launcher (``RANK``/``WORLD_SIZE`` of torchrun or
            deepspeed), or one part when they are not set.
        shard_index: this part's index i in ``[0, num_shards)`` (with ``num_shards``).
        on_bad_row: ``error`` stops at an unparseable data row; ``skip`` leaves such rows out
            (listed in ``ExtractSummary.problems`` and ``dataset.bad_rows`` of the metadata).
        too_long: rows whose teacher text is longer than the teacher's
            ``max_position_embeddings``: ``error`` refuses the run before anything is written,
            ``skip`` leaves them out (``ExtractSummary.too_long`` and ``dataset.too_long_ids``).
    """

    offset: int | None = override(DataSelection, "offset", 0, "")
    model: str = opt("smollm2", help="Teacher: smollm2 (packaged GGUF), a .gguf file, a model folder or a hub id")
    out: str = opt("", help="Output cache: a path or fsspec URL (Zarr v3 group), or NAME / auto: a cache of --cache-root named so (auto: after teacher + data), reused if a complete one with the same settings is there")
    trace: str = opt("nl", help="CoT the teacher reads: nl (natural language), equations, or a trace file of kvkd generate (FILE.jsonl; its rows are the data)")
    drop_last_step: bool = opt(True, cli="drop-last-step/keep-last-step", help="Drop the CoT's last step (CODI) so the teacher cannot copy the answer")
    trace_fallback: str | None = opt(None, help="Trace for rows whose --trace is empty (e.g. nl for GSM8K rows without equations); none = such a row is an error", choices=TRACE_KINDS)
    slots: int = opt(6, help="M: KV slots kept per (layer, KV head)")
    lam: float = opt(DEFAULT_LAMBDA, cli="lambda", help="KaVa eviction score weight of importance vs uniqueness, in [0, 1]")
    batch_size: int = opt(8, help="Examples per teacher forward")
    dtype: str = opt("float32", help="Teacher dtype: float32, bfloat16 or float16", choices=("float32", "bfloat16", "float16"))
    codec: str = opt("int8", help="Storage codecs of keys/values/hidden: a preset (fp16; int8 = keys int8 per channel, values int8 per token, hidden int8 with fp16 outliers, within 1% error; int4 the same at 4 bits) or one codec for all three", choices=_codec_names)
    compressor: str = opt("zstd:3", help="Byte compressor: zstd:LEVEL, blosc:LEVEL:byte|bit|none, or none")
    examples_per_shard: int = opt(0, help="Examples per shard file (0 = about 32 MB of data per shard)")
    overwrite: bool = opt(False, cli="overwrite/no-overwrite", help="Replace an existing cache at --out instead of resuming it")
    num_shards: int = opt(0, help="Parallel jobs writing this cache: job i takes the shards s with s % N == i (0 = RANK/WORLD_SIZE of torchrun/deepspeed, or one job)")
    shard_index: int | None = opt(None, help="This job's index in [0, --num-shards)")
    on_bad_row: str = opt("error", help="A data row that cannot be parsed: error (stop, naming file and row) or skip (leave it out, listed in the summary and the cache metadata)", choices=ON_BAD_ROW)
    too_long: str = opt("error", help="A row longer than the teacher's context (max_position_embeddings): error (refuse the run, naming the rows) or skip (leave them out, counted in a warning and recorded in the cache metadata)", choices=TOO_LONG)


@dataclass
class ExtractProgress:
    """Progress of an extraction, passed to the ``on_progress`` callback."""

    done: int
    total: int
    tokens: int
    elapsed_s: float


@dataclass
class ExtractSummary:
    """What an extraction did (the CLI prints it)."""

    path: str
    examples: int
    examples_written: int
    shards_written: int
    shards_skipped: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    examples_per_s: float
    bytes_stored: int
    bytes_per_example: float
    complete: bool
    part: list = field(default_factory=lambda: [0, 1])
    problems: list = field(default_factory=list)
    too_long: list = field(default_factory=list)
    """ids of the rows left out as longer than the teacher's context (``too_long="skip"``)."""
    key: str | None = None
    """the cache store key (``--out NAME|auto``), else None."""
    name: str | None = None
    """the store name it was written or found under."""
    reused: dict | None = None
    """a complete cache with this key was found and nothing computed: ``made_by``, ``made_at``, ``kvkd_version``."""


class ExtractInterrupted(KeyboardInterrupt):
    """Extraction stopped by Ctrl-C or SIGTERM (the CLI turns SIGTERM into this too).

    Every shard written before is kept (flags set); the shard being computed is redone by the
    next run with the same options. Attributes: ``out`` (the cache), ``shard`` (the shard being
    computed, or None when no shard had started).
    """

    def __init__(self, out: str, shard: int | None):
        super().__init__(f"interrupted at shard {shard}" if shard is not None else "interrupted")
        self.out, self.shard = out, shard


def parse_compressor(text: str) -> Compressor:
    """``zstd:3`` / ``blosc:5:bit`` / ``none`` -> Compressor (see ``Compressor.parse``)."""
    return Compressor.parse(text)


def extraction_part(cfg: ExtractConfig, env: dict | None = None) -> tuple[int, int]:
    """This process's part ``(index, count)`` of a parallel extraction.

    ``--num-shards/--shard-index`` win; else ``RANK``/``WORLD_SIZE`` from the launcher's
    environment (torchrun, deepspeed); else ``(0, 1)``.

    Raises:
        ValueError: an index outside ``[0, count)``, an index without a count, or ``overwrite``
            with more than one part (each part would delete the others' work).
    """
    env = os.environ if env is None else env
    if cfg.num_shards:
        if cfg.shard_index is None:
            raise ValueError(f"--num-shards {cfg.num_shards} needs --shard-index (0..{cfg.num_shards - 1}) for this job")
        part = (cfg.shard_index, cfg.num_shards)
    elif cfg.shard_index is not None:
        raise ValueError("--shard-index needs --num-shards (the number of parallel jobs)")
    elif int(env.get("WORLD_SIZE", "1")) > 1:
        part = (int(env.get("RANK", "0")), int(env["WORLD_SIZE"]))
    else:
        part = (0, 1)
    if part[1] < 1 or not 0 <= part[0] < part[1]:
        raise ValueError(f"shard index {part[0]} is not in [0, {part[1]}): pass --shard-index between 0 and --num-shards - 1")
    if part[1] > 1 and cfg.overwrite:
        raise ValueError("--overwrite cannot be used by parallel parts (each would delete the others' shards); delete the store once, then start the parts")
    return part


def tokenize_teacher(tokenizer, examples: list[Example], traces: list[str], template: PromptTemplate) -> TeacherBatch:
    """Tokenize teacher texts (right-padded) and locate the CoT and answer token spans.

    Raises:
        ValueError: naming the example whose CoT or answer has no token.
    """
    texts, cot_spans, ans_spans = [], [], []
    for ex, trace in zip(examples, traces):
        text, cot_chars, ans_chars = template.teacher_text(ex.question, trace, ex.answer)
        texts.append(text)
        cot_spans.append(cot_chars)
        ans_spans.append(ans_chars)
    enc = tokenizer(texts, return_offsets_mapping=True, padding=False)
    ids, cots, answers = [], [], []
    for ex, row_ids, offsets, cot_chars, ans_chars in zip(examples, enc["input_ids"], enc["offset_mapping"], cot_spans, ans_spans):
        cot = token_span(offsets, cot_chars)
        ans = token_span(offsets, ans_chars)
        if cot[1] <= cot[0] or ans[1] <= ans[0] or ans[0] < 1:
            raise ValueError(f"example {ex.id}: its CoT or answer has no token after tokenization")
        if cot[1] > ans[0]:  # a token straddles CoT and answer: keep the CoT strictly before it
            cot = (cot[0], ans[0])
        ids.append(row_ids)
        cots.append(cot)
        answers.append(ans)
    T = max(len(r) for r in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(ids), T), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), T), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return TeacherBatch(input_ids, mask, torch.tensor(cots), torch.tensor(answers))


def resolve_traces(examples: list[Example], cfg: ExtractConfig) -> tuple[list[str], list[str]]:
    """The trace of every example, with ``cfg.trace_fallback`` for empty ones.

    Raises:
        DataError: a row has an empty trace and no fallback is set (names the row and the fix).
    """
    traces, fallback_ids = [], []
    kind = cfg.trace if cfg.trace in TRACE_KINDS else "nl"  # a trace file's examples hold their trace as the CoT
    for ex in examples:
        trace = build_trace(ex, kind, drop_last_step=cfg.drop_last_step, allow_empty=True)
        if not trace.strip():
            if cfg.trace_fallback is None:
                raise DataError(
                    f"example {ex.id!r} has an empty {cfg.trace!r} trace; pass --trace-fallback nl to let such rows "
                    f"read another trace (recorded in the cache), or pick rows that have one"
                )
            trace = build_trace(ex, cfg.trace_fallback, drop_last_step=cfg.drop_last_step)
            fallback_ids.append(ex.id)
        traces.append(trace)
    return traces, fallback_ids


def load_rows(cfg: ExtractConfig) -> tuple[LoadResult, dict]:
    """The rows to extract: the data set, or a trace file's selected examples (``cfg.trace``).

    Returns:
        (LoadResult, extra ``dataset`` metadata: for a trace file its identity, selection and row set).
    Raises:
        ValueError: ``--trace`` is neither a trace kind nor a file, or a trace file with ``--data``.
        kvkd.data.DataError: unreadable data or trace file.
    """
    if cfg.trace in TRACE_KINDS:
        if cfg.keep != TraceSelection.keep or cfg.fallback != TraceSelection.fallback:
            raise ValueError("--keep/--fallback select the traces of a trace file: pass --trace FILE.jsonl (from kvkd generate)")
        return select_rows(cfg), {}
    if not os.path.isfile(cfg.trace):
        raise ValueError(f"--trace {cfg.trace!r} is neither {' nor '.join(TRACE_KINDS)} nor an existing trace file (write one with kvkd generate)")
    if cfg.data:
        raise ValueError("--trace FILE holds its rows (questions and gold answers): leave out --data (use --offset/--limit to pick rows)")
    examples, counts, tf = load_trace_examples(cfg.trace, cfg.keep, cfg.fallback, cfg.offset or 0, cfg.limit)
    if not examples:
        raise ValueError(f"--trace {cfg.trace}: no examples selected (--offset {cfg.offset}, --limit {cfg.limit}, --keep {cfg.keep}, --fallback {cfg.fallback})")
    data = LoadResult(examples, [], str(os.path.abspath(cfg.trace)), "trace")
    extra = {"trace_file": tf.identity(), "trace_selection": {"keep": cfg.keep, "fallback": cfg.fallback}, "limit": cfg.limit,
             "row_set": row_set(counts, cfg.keep, cfg.fallback), "trace_fallback_ids": counts["gold_ids"], "trace_skipped_ids": counts["skipped_ids"],
             "questions_from": tf.header.get("data")}
    return data, extra


def _dataset_selection(cfg: ExtractConfig, data: LoadResult, fallback_ids) -> dict:
    """What the selected rows are, known before the teacher loads (compared on resume first)."""
    return {
        "source": data.source,
        "format": data.fmt,
        "split": cfg.split,
        "offset": cfg.offset or 0,
        "selected_rows": len(data.examples) + len(data.problems),
        "selected_fingerprint": dataset_fingerprint(data.examples),
        "on_bad_row": cfg.on_bad_row,
        "bad_rows": [p.row for p in data.problems],
        "trace": cfg.trace,
        "drop_last_step": cfg.drop_last_step,
        "trace_fallback": cfg.trace_fallback,
        "too_long": cfg.too_long,
    }


def early_metadata(cfg: ExtractConfig, data: LoadResult, template: PromptTemplate, trace_meta: dict | None = None) -> dict:
    """The part of the cache metadata known before the teacher is loaded (for ``CacheWriter.precheck``)."""
    dataset = _dataset_selection(cfg, data, [])
    if trace_meta:
        dataset.update(trace="file", trace_fallback="gold" if trace_meta["trace_fallback_ids"] else None, **trace_meta)
    return {
        "dataset": dataset,
        "prompt": template.to_json(),
        "compression": {"method": "kava", "slots": cfg.slots, "lambda": cfg.lam},
    }


def cache_metadata(cfg: ExtractConfig, loaded: LoadedModel, data: LoadResult, template: PromptTemplate, frame: str,
                   fallback_ids: list[str] = (), examples: list[Example] | None = None, too_long_ids: list[str] = (),
                   trace_meta: dict | None = None) -> dict:
    """The JSON metadata of a teacher cache (docs/design.md, section 3).

    ``dataset.rows``/``fingerprint`` describe the cached examples (``examples``, default all
    loaded rows); ``selected_rows`` the rows read from the source (before bad or too-long rows
    were left out, listed in ``bad_rows`` (source row numbers) and ``too_long_ids``).
    ``provenance`` records library versions and the device; ``trace_meta`` (from :func:`load_rows`)
    a trace file's identity, selection and row set.
    """
    examples = data.examples if examples is None else examples
    meta = {
        "teacher": loaded.info,
        "tokenizer": tokenizer_identity(loaded.tokenizer),
        "dataset": {
            **_dataset_selection(cfg, data, fallback_ids),
            "rows": len(examples),
            "fingerprint": dataset_fingerprint(examples),
            "trace_fallback_ids": list(fallback_ids),
            "too_long_ids": list(too_long_ids),
        },
        "prompt": template.to_json(),
        "compression": {"method": "kava", "slots": cfg.slots, "lambda": cfg.lam, "key_frame": frame},
        "provenance": provenance(resolve_device(cfg.device)),
    }
    if trace_meta:
        meta["dataset"].update(trace="file", trace_fallback="gold" if trace_meta["trace_fallback_ids"] else None, **trace_meta)
    return meta


def provenance(device) -> dict:
    """Library versions (python, torch, transformers, peft, zarr, numcodecs, deepspeed, kvkd) and the device.

    Volatile in the sense of ``kvkd.cache.writer.VOLATILE_KEYS``: a resumed extraction may run
    with other versions; the stored record is the first run's.
    """
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import kvkd

    versions = {"python": platform.python_version(), "kvkd": kvkd.__version__}
    for name in ("torch", "transformers", "peft", "zarr", "numcodecs", "deepspeed"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    dev = {"type": device.type, "name": "cpu"}
    if device.type == "cuda":
        dev["name"] = torch.cuda.get_device_name(device)
    else:
        dev["name"] = platform.processor() or platform.machine()
    return {"versions": versions, "device": dev, "host": platform.node()}


def check_options(cfg: ExtractConfig) -> tuple[int, int]:
    """Refuse invalid options before anything is loaded or created; return the part.

    Returns:
        This process's part ``(index, count)`` (see ``extraction_part``).
    Raises:
        ValueError: naming the option (its CLI flag) and the fix.
    """

    if not cfg.out:
        raise ValueError("no output cache given: pass --out PATH")
    if cfg.slots < 1:
        raise ValueError(f"--slots must be >= 1 (KV slots kept per layer and head), got {cfg.slots}")
    if not 0.0 <= cfg.lam <= 1.0:
        raise ValueError(f"--lambda must be in [0, 1] (weight of importance vs uniqueness), got {cfg.lam}")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.examples_per_shard < 0:
        raise ValueError(f"--examples-per-shard must be >= 0 (0 = about 32 MB per shard), got {cfg.examples_per_shard}")
    if cfg.codec not in _codec_names():
        raise ValueError(f"--codec {cfg.codec!r} is not one of {', '.join(_codec_names())}")
    try:
        Compressor.parse(cfg.compressor)
    except ValueError as e:
        raise ValueError(f"--compressor: {e}") from None
    if cfg.trace not in TRACE_KINDS and not os.path.isfile(cfg.trace):
        raise ValueError(f"--trace {cfg.trace!r} is neither {' nor '.join(TRACE_KINDS)} nor an existing trace file (write one with kvkd generate)")
    for flag, value, allowed in (("--on-bad-row", cfg.on_bad_row, ON_BAD_ROW), ("--too-long", cfg.too_long, TOO_LONG)):
        if value not in allowed:
            raise ValueError(f"{flag} {value!r} is not one of {', '.join(allowed)}")
    if cfg.trace_fallback is not None and cfg.trace_fallback not in TRACE_KINDS:
        raise ValueError(f"--trace-fallback {cfg.trace_fallback!r} is not one of {', '.join(TRACE_KINDS)}")
    if (cfg.offset or 0) < 0 or (cfg.limit is not None and cfg.limit < 0):
        raise ValueError(f"--offset and --limit must be >= 0, got --offset {cfg.offset} --limit {cfg.limit}")
    part = extraction_part(cfg)
    check_output_path(CacheStore(cfg.cache_root).root if store_name(cfg) else cfg.out)
    return part


def store_name(cfg: ExtractConfig) -> str | None:
    """The cache-root name ``--out`` gives (``auto`` included), or None for a path/URL (an existing
    local path of that name wins)."""
    return cfg.out if is_name(cfg.out) and not os.path.exists(cfg.out) else None


KEY_IGNORED = ("out", "cache_root", "batch_size", "device", "num_threads", "trust_remote_code", "num_shards", "shard_index", "overwrite")
"""ExtractConfig fields that never change the bytes written, so not the store key (every other
field reaches it through the key material: the teacher, the selected rows and their traces, the
metadata, codecs, compressor, shard size)."""
_KEY_LOCATIONS = VOLATILE_KEYS | {"path", "questions_from"}
"""Where files are (not what they hold): left out of the key, so two users' copies share it."""


def _without(d, names):
    if isinstance(d, dict):
        return {k: _without(v, names) for k, v in d.items() if k not in names}
    return d


def store_key_material(cfg: ExtractConfig, data: LoadResult, traces: list[str], template: PromptTemplate, trace_meta: dict | None = None) -> dict:
    """Everything that changes the bytes of this extraction, known before the teacher loads
    (hashed by ``kvkd.cache.store.cache_key``).

    Returns:
        JSON: ``teacher`` (``kvkd.models.teacher_identity``: GGUF hash / folder weights and files
        hashes / hub id + revision, and dtype), ``dataset`` (the selection as the cache records it:
        rows fingerprint, offset, split, bad and fallback rows, trace kind or trace file hash and
        selection, too-long policy; file locations left out), ``traces_sha256`` (the CoT texts the
        teacher reads, which the rows fingerprint leaves out), ``prompt`` (template), ``compression``
        (M, lambda), ``codecs``, ``compressor``, ``examples_per_shard`` and ``schema_version``.
        The key frame follows from the teacher.
    Raises:
        kvkd.models.ModelLoadError: the teacher's files are missing.
    """
    import hashlib

    from kvkd.cache.codecs import get_codecs
    from kvkd.cache.schema import SCHEMA_VERSION
    from kvkd.models import teacher_identity

    early = early_metadata(cfg, data, template, trace_meta)
    h = hashlib.sha256(b"kvkd.traces.v1\x00")
    for t in traces:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "big") + b)
    return {
        "teacher": teacher_identity(cfg.model, cfg.dtype),
        "dataset": _without(early["dataset"], _KEY_LOCATIONS),
        "traces_sha256": h.hexdigest(),
        "prompt": early["prompt"],
        "compression": early["compression"],
        "codecs": get_codecs(cfg.codec).to_json(),
        "compressor": Compressor.parse(cfg.compressor).to_json(),
        "examples_per_shard": cfg.examples_per_shard,
        "schema_version": SCHEMA_VERSION,
    }


def auto_name(cfg: ExtractConfig, data: LoadResult, key: str) -> str:
    """``--out auto``: ``TEACHER-DATA-KEY8``, e.g. ``smollm2-gsm8k-train-3f2a9c1d`` (teacher: the alias,
    file/folder stem or hub id; data: the trace file's stem, or the data file's folder and stem, or
    the data set and split)."""
    import re

    local = cfg.model.endswith(".gguf") or os.path.exists(cfg.model)
    teacher = Path(cfg.model.rstrip("/")).stem if local else cfg.model.replace("/", "--")
    if cfg.trace not in TRACE_KINDS:
        what = [Path(cfg.trace).stem]
    else:
        src = Path(str(data.source))
        what = [src.parent.name, src.stem] if src.suffix else [src.name, cfg.split or ""]
    label = re.sub(r"[^A-Za-z0-9._+-]+", "_", "-".join(x for x in [teacher, *what] if x)).strip("._-")[:100]
    return f"{label}-{key[:8]}" if label else key


def _store_target(cfg: ExtractConfig, name: str, data: LoadResult, traces: list[str], template: PromptTemplate, trace_meta: dict | None):
    """The store entry for ``--out NAME|auto``, and an ExtractSummary if a complete cache with its key is there.

    Raises:
        CacheError: the name points at another key (naming the setting), or the found cache is damaged.
    """
    from kvkd.cache.reader import CacheReader

    start = time.perf_counter()
    store = CacheStore(cfg.cache_root)
    entry = store.prepare(name, store_key_material(cfg, data, traces, template, trace_meta), lambda key: auto_name(cfg, data, key))
    name = entry.names[0]
    if cfg.overwrite:
        return entry, name, None
    try:
        reader = CacheReader.open(entry.url)
    except CacheError:  # none yet, or incomplete: written or resumed
        return entry, name, None
    reader.check_shards()  # a deleted or truncated shard file is refused, not reused
    meta, info = reader.metadata, reader.info()
    wall = time.perf_counter() - start
    reused = {"made_by": entry.record.get("created_by", "?"), "made_at": meta.get("completed") or meta.get("created"), "kvkd_version": meta.get("kvkd_version")}
    return entry, name, ExtractSummary(
        path=entry.url, examples=len(reader), examples_written=0, shards_written=0, shards_skipped=reader.layout.num_shards, tokens=0,
        wall_s=wall, tokens_per_s=0.0, examples_per_s=0.0, bytes_stored=info["stored_bytes"], bytes_per_example=info["bytes_per_example"],
        complete=True, part=[0, 1], problems=[asdict(p) for p in data.problems], too_long=list(meta.get("dataset", {}).get("too_long_ids", [])),
        key=entry.key, name=name, reused=reused)


def check_output_path(out: str) -> None:
    """Refuse a local ``--out`` that cannot be written (read-only folder, a file in the way).

    Raises:
        ValueError: naming the path and the fix. Remote URLs are not checked here.
    """
    if "://" in out and not out.startswith(("file://", "local://")) or "::" in out:
        return
    path = Path(out.split("://", 1)[-1]).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out}: a file is in the way (a cache is a folder); choose another path")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"--out {out}: {probe} is a file, not a folder; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: folder {probe} is not writable (read-only or no permission); choose another --out")


def select_rows(cfg: ExtractConfig) -> LoadResult:
    """The selected data rows (shared by ``extract`` and ``kvkd.plan``); ``--on-bad-row skip``
    leaves unparseable ones out (listed in ``problems``).

    Raises:
        kvkd.data.DataError: a bad row (naming the file, row and ``--on-bad-row``).
        ValueError: no rows selected.
    """
    try:
        data = load_examples(cfg.data, split=cfg.split, fmt=cfg.data_format, limit=cfg.limit, offset=cfg.offset or 0,
                             on_bad_row="report" if cfg.on_bad_row == "skip" else "raise")
    except DataError as e:  # name the CLI flag, not the library argument
        msg = str(e)
        if msg.endswith(FIX_ROW):
            msg += " (or pass --on-bad-row skip to leave bad rows out and list them)"
        raise DataError(msg) from None
    if not data.examples:
        raise ValueError(f"{cfg.data}: no examples selected (--offset {cfg.offset}, --limit {cfg.limit})")
    return data


def teacher_lengths(tokenizer, examples: list[Example], traces: list[str], template: PromptTemplate) -> list[int]:
    """Tokens of each example's teacher text (question, CoT, answer), as ``tokenize_teacher`` makes it."""
    texts = [template.teacher_text(ex.question, trace, ex.answer)[0] for ex, trace in zip(examples, traces)]
    return [len(ids) for ids in tokenizer(texts, padding=False)["input_ids"]]


def apply_too_long(cfg: ExtractConfig, examples: list[Example], traces: list[str], lengths: list[int], max_positions: int | None):
    """Keep the rows that fit the teacher's context (``--too-long``).

    Returns:
        ``(examples, traces, lengths, too_long_ids)`` with the long rows left out (skip), or
        unchanged when every row fits or the model declares no context length.
    Raises:
        ValueError: with ``--too-long error``, naming how many rows are too long and the longest.
    """
    if not max_positions:
        return examples, traces, lengths, []
    long = [i for i, n in enumerate(lengths) if n > max_positions]
    if not long:
        return examples, traces, lengths, []
    worst = max(long, key=lambda i: lengths[i])
    if cfg.too_long == "error":
        raise ValueError(
            f"{len(long)} of {len(examples)} rows are longer than the teacher's context of {max_positions} tokens "
            f"(max_position_embeddings; longest: {examples[worst].id!r}, {lengths[worst]} tokens); pass --too-long skip "
            "to leave them out (recorded in the cache), or select other rows"
        )
    keep = [i for i in range(len(examples)) if lengths[i] <= max_positions]
    if not keep:
        raise ValueError(f"every selected row is longer than the teacher's context of {max_positions} tokens")
    return [examples[i] for i in keep], [traces[i] for i in keep], [lengths[i] for i in keep], [examples[i].id for i in long]


def extract(
    cfg: ExtractConfig,
    loaded: LoadedModel | None = None,
    on_progress: Callable[[ExtractProgress], None] | None = None,
    template: PromptTemplate = PromptTemplate(),
) -> ExtractSummary:
    """Extract one teacher's compressed cache (KaVa) into a Zarr v3 store; resumable.

    Order: every option is checked, the data read and an existing cache at ``out`` compared
    with this run (data, compression, codec) before the teacher is loaded; rows too long for
    the teacher are handled (``too_long``) before anything is created. With ``out`` a name of
    the cache root (or ``auto``) the store key is computed first (``store_key_material``): a
    complete cache with that key is returned as is (``ExtractSummary.reused``; the teacher is
    not loaded, nothing is written), an incomplete one is resumed.

    Args:
        cfg: the options (see ExtractConfig).
        loaded: an already loaded teacher (tests, benchmarks); loaded from ``cfg.model`` if None.
        on_progress: called after every batch.
        template: prompt layout (recorded in the cache).
    Returns:
        ExtractSummary.
    Raises:
        kvkd.data.DataError: unreadable rows or empty traces.
        kvkd.cache.errors.CacheMismatchError: ``out`` holds a cache of other data/teacher/options.
        kvkd.cache.errors.CacheError: a store name pointing at a cache of other settings (naming the
            first that differs), or a damaged complete cache under the key.
        kvkd.cache.errors.CacheError: no space left on the device (the message names the path;
            rerunning resumes), or another writer holds a shard.
        ExtractInterrupted: Ctrl-C (or SIGTERM turned into KeyboardInterrupt by the caller).
        ValueError: invalid options (naming the flag), rows too long for the teacher.
    """
    part = check_options(cfg)
    data, trace_meta = load_rows(cfg)
    traces, fallback_ids = resolve_traces(data.examples, cfg)
    key = name = None
    if store_name(cfg):
        entry, name, reused = _store_target(cfg, store_name(cfg), data, traces, template, trace_meta)
        if reused is not None:
            return reused
        key, cfg = entry.key, replace(cfg, out=entry.url)
    if not cfg.overwrite:
        CacheWriter.precheck(cfg.out, early_metadata(cfg, data, template, trace_meta), codec=cfg.codec,
                             compressor=Compressor.parse(cfg.compressor))
    loaded = loaded or load_model(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    tok = loaded.tokenizer
    examples, traces, lengths, too_long = apply_too_long(
        cfg, data.examples, traces, teacher_lengths(tok, data.examples, traces, template), loaded.info.get("max_positions"))
    fallback_ids = [i for i in fallback_ids if i not in set(too_long)]
    device = resolve_device(cfg.device)
    model = loaded.model.to(device)
    info = loaded.info
    frame = key_module(decoder_layers(model)[0])[1]
    layout = CacheLayout(
        num_examples=len(examples),
        num_layers=info["num_layers"],
        num_kv_heads=info["num_kv_heads"],
        head_dim=info["head_dim"],
        hidden_size=info["hidden_size"],
        slots=cfg.slots,
        examples_per_shard=cfg.examples_per_shard,
    )
    meta = cache_metadata(cfg, loaded, data, template, frame, fallback_ids, examples=examples, too_long_ids=too_long, trace_meta=trace_meta)
    shard = None
    try:
        writer = CacheWriter.open(cfg.out, layout, meta, codec=cfg.codec, compressor=Compressor.parse(cfg.compressor), overwrite=cfg.overwrite)
        layout = writer.layout
        pending = writer.pending_shards(part=part)  # this part's unwritten shards: a part resumes on its own
        skipped = len(range(part[0], layout.num_shards, part[1])) - len(pending)
        total = sum(layout.shard_range(s)[1] - layout.shard_range(s)[0] for s in pending)
        start_time = time.perf_counter()
        done = tokens = 0
        for shard in pending:
            lo, hi = layout.shard_range(shard)
            with writer.claim(shard):  # held while computing: a second writer of this shard fails here (CacheError)
                if shard not in writer.pending_shards(part=part):
                    raise CacheError(
                        f"shard {shard} of {cfg.out} was written by another writer while part {part[0]} of {part[1]} was running; "
                        "two jobs were given the same part: give each job its own --shard-index"
                    )
                rows, n_tokens = compute_shard(model, tok, examples, traces, lengths, range(lo, hi), layout, cfg, template, device,
                                               on_batch=None if on_progress is None else lambda k, t: on_progress(
                                                   ExtractProgress(done + k, total, tokens + t, time.perf_counter() - start_time)))
                done += hi - lo
                tokens += n_tokens
                writer.write_shard(shard, rows)
        shard = None
        # Every part sets its flags before it checks all of them, so the part that writes last sees
        # every flag set and marks the cache complete (several may; the result is the same).
        complete = writer.finalize(sole_writer=part[1] == 1)
    except KeyboardInterrupt:
        raise ExtractInterrupted(cfg.out, shard) from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            where = f" (shard {shard})" if shard is not None else ""
            raise CacheError(f"no space left on the device writing {cfg.out}{where}: free space, then rerun the same command to resume "
                             "(written shards are kept)") from None
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise CacheError(f"cannot write {cfg.out}: {e.strerror} ({getattr(e, 'filename', None) or cfg.out}); choose another --out") from None
        raise
    wall = time.perf_counter() - start_time
    stored = writer.stored_bytes()
    return ExtractSummary(
        path=cfg.out,
        examples=layout.num_examples,
        examples_written=done,
        shards_written=len(pending),
        shards_skipped=skipped,
        tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        examples_per_s=done / wall if wall > 0 else 0.0,
        bytes_stored=stored,
        bytes_per_example=stored / layout.num_examples,
        complete=complete,
        part=list(part),
        problems=[asdict(p) for p in data.problems],
        too_long=too_long,
        key=key,
        name=name,
    )


def compute_shard(model, tokenizer, examples: list[Example], traces: list[str], lengths: list[int], where: range,
                  layout: CacheLayout, cfg: ExtractConfig, template: PromptTemplate, device, on_batch=None) -> tuple[dict[str, np.ndarray], int]:
    """Rows of examples ``where`` (one shard), batch by batch, sorted by length to cut padding.

    Returns:
        ``(rows, tokens)``: the shard's rows as ``CacheWriter.write_shard`` takes them, and the
        tokens the teacher read. ``on_batch(examples_done, tokens_done)`` after each batch.
    """
    lo = where.start
    rows = _empty_rows(layout, len(where))
    order = sorted(where, key=lambda i: lengths[i])  # less padding per batch
    done = tokens = 0
    for b in range(0, len(order), cfg.batch_size):
        idx = order[b : b + cfg.batch_size]
        batch = tokenize_teacher(tokenizer, [examples[i] for i in idx], [traces[i] for i in idx], template)
        cap = capture_batch(model, TeacherBatch(*(t.to(device) for t in astuple_shallow(batch))))
        _fill_rows(rows, [i - lo for i in idx], Capture(*(t.cpu() for t in astuple_shallow(cap))), cfg)  # compressed on CPU
        done += len(idx)
        tokens += batch.num_tokens
        if on_batch:
            on_batch(done, tokens)
    return rows, tokens


def astuple_shallow(obj) -> tuple:
    """A dataclass's field values in order, without copying (``dataclasses.astuple`` deep-copies)."""
    return tuple(getattr(obj, f.name) for f in fields(obj))


def _empty_rows(layout: CacheLayout, n: int) -> dict[str, np.ndarray]:
    L, H, M, D, d = layout.num_layers, layout.num_kv_heads, layout.slots, layout.head_dim, layout.hidden_size
    return {
        "keys": np.zeros((n, L, H, M, D), np.float32),
        "values": np.zeros((n, L, H, M, D), np.float32),
        "hidden": np.zeros((n, L + 1, d), np.float32),
        "slot_pos": np.full((n, L, H, M), -1, np.int32),
        "slot_importance": np.zeros((n, L, H, M), np.float32),
        "slot_score": np.zeros((n, L, H, M), np.float32),
        "slot_valid": np.zeros((n, L, H, M), bool),
        "cot_len": np.zeros((n,), np.int32),
        "answer_len": np.zeros((n,), np.int32),
        "answer_nll": np.zeros((n,), np.float32),
    }


def _fill_rows(rows: dict[str, np.ndarray], where: list[int], cap, cfg: ExtractConfig) -> None:
    """Compress a capture to M slots and place it at rows ``where`` of the shard buffer."""
    sel = select_slots(cap.keys, cap.importance, cap.cot_mask, cfg.slots, cfg.lam)
    rows["keys"][where] = gather_slots(cap.keys, sel).numpy()
    rows["values"][where] = gather_slots(cap.values, sel).numpy()
    rows["hidden"][where] = cap.hidden.numpy()
    rows["slot_pos"][where] = sel.index.masked_fill(~sel.valid, -1).numpy().astype(np.int32)
    rows["slot_importance"][where] = sel.importance.numpy()
    rows["slot_score"][where] = sel.score.numpy()
    rows["slot_valid"][where] = sel.valid.numpy()
    rows["cot_len"][where] = cap.cot_len.numpy().astype(np.int32)
    rows["answer_len"][where] = cap.answer_len.numpy().astype(np.int32)
    rows["answer_nll"][where] = cap.answer_nll.numpy()
