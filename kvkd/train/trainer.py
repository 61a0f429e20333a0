"""``kvkd train``: the training recipe (one readable loop that owns checkpoints and logs).

    loss = CE(answer | Q, latents) + sum_k w[:, k] * sum_t a_t L_t,k  (+ router aux)

with ``w = router(signals)`` per sample (docs/design.md, section 4) and the distillation terms t
the plug-ins of ``kvkd.train.losses`` (``codi`` a1, ``kv`` a2, ``cka`` a3, ``simcot`` a4, ...);
one step is ``kvkd.train.step.distill_step``. Teachers are only ever read from their caches.
A run is :func:`prepare` (check options, lock the folder, build the trainee and engine, load the
newest checkpoint) then :func:`fit` (the loop); :func:`train` is both.
The run folder (:class:`kvkd.train.rundir.RunDir`) holds ``config.json`` (resolved options and
provenance), ``log.jsonl`` (one line per step: every loss term per teacher, router weights, lr,
timing), ``checkpoints/step-N/`` (safetensors weights + optimiser state + ``state.json``) and
``summary.json`` (from the whole log). A run resumes from its newest checkpoint, with the
options it was started with (``--steps`` may grow); ``--fresh`` starts it over.

The optimiser step, device placement and checkpoint files belong to an engine
(``kvkd.train.engines``): one process, or DeepSpeed ZeRO over ranks (``--deepspeed``), where
each rank reads its rows of every global batch and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, make_dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from kvkd.cache.compat import check_compatible, check_same_tokenizer, get_field
from kvkd.cache.errors import CacheError
from kvkd.cache.errors import CacheMismatchError
from kvkd.cache.reader import CacheReader
from kvkd.cache.store import resolve_cache
from kvkd.data import dataset_fingerprint, load_examples
from kvkd.traces import check_same_rows
from kvkd.eval.overlap import refuse_overlap
from kvkd.eval.validation import Validator
from kvkd.models import load_model, tokenizer_identity
from kvkd.prompts import PromptTemplate
from kvkd.train.align import Shape, TeacherAligner, layer_map, layer_maps_per_teacher
from kvkd.train.engines import build_engine, check_batches_split, rank_rows, to_device
from kvkd.train.loader import DistillDataset, collate
from kvkd.train.losses import FUSIONS, teacher_extras, terms
from kvkd.train.options import TrainConfig
from kvkd.train.routers import build_router
from kvkd.train.sinks import LatentNorms, Sinks, parse_report_to
from kvkd.train.rundir import RESUMABLE_OPTIONS, NonFiniteError, RunDir, RunFolderError, changed_options, copy_state, provenance, record_provenance, resume_point  # noqa: F401
from kvkd.train.rundir import check_resume as check_run_options
from kvkd.train.step import Trainee, _fuse, _parameter_grads, _per_sample_grads, align_teachers, distill_step, fuse_teachers  # noqa: F401  (re-exported)
from kvkd.train.student import LatentStudent, add_latent_tokens, make_trainable
from kvkd.train.teacher_records import describe_teachers, fit_samples, needs_fit


def _step_log_class():
    """:class:`StepLog` with one field per registered distillation term (its name: a list of K
    per-teacher batch means), so ``log.jsonl`` keeps one flat key per term (``codi``, ``kv``,
    ``cka``, ...) and a new term needs no edit here."""
    names = [cls.name for cls in terms()]
    fields = [("step", int), ("loss", float), ("ce", float), ("answer_nll", float), *[(n, list[float]) for n in names],
              ("terms", list[str]), ("weights", list[float]), ("fused", float | None), ("router", dict), ("lr", float),
              ("step_s", float), ("examples_per_s", float),
              ("skipped", str | None, field(default=None)),  # "non-finite loss" / "non-finite gradient": no update this step
              ("latent_norm", float | None, field(default=None)),  # mean L2 norm of this step's latent thoughts z (this rank's)
              ("embedding_norm", float | None, field(default=None)),  # mean L2 norm of the token-embedding rows (for comparison)
              ("valid_nll", float | None, field(default=None)),  # --valid-data: validation gold-answer NLL after this step
              ("row_weights", dict | None, field(default=None))]  # --log-row-weights: {rows: [B], weights: [B][K]} (rank 0's rows)
    doc = ("One training step as logged (``log.jsonl``): the total loss and CE, the gold-answer NLL (nats/token), one list "
           f"of per-teacher values per distillation term ({', '.join(names)}; zeros when a term is off), ``terms`` (those "
           "names), the router's mean weights, the fused term under --fusion target, router stats, lr and timing.")
    cls = make_dataclass("StepLog", fields, namespace={"__doc__": doc})
    cls.__module__ = __name__
    return cls


StepLog = _step_log_class()


@dataclass
class TrainSummary:
    """What a run did (the CLI prints it), computed from the whole log (resumes included):
    ``steps`` done, ``final_loss``/``final_ce`` of the last updating step, ``mean_weights`` per
    teacher and ``mean_step_s`` over every step, ``examples_per_s`` = examples / summed step
    time (``train_s``); ``steps_run`` = steps this call trained (0: the run was finished),
    ``resumed_from`` = steps done before it; ``wall_s`` = this call's wall time."""

    run_dir: str
    steps: int
    resumed_from: int
    wall_s: float
    final_loss: float
    final_ce: float
    mean_step_s: float
    examples_per_s: float
    teachers: list[str]
    mean_weights: list[float]
    steps_run: int = 0
    skipped_steps: int = 0
    train_s: float = 0.0


def build_student(spec: str, latents: int, cfg: TrainConfig, template: PromptTemplate = PromptTemplate()) -> LatentStudent:
    """Load the student, add ``<bot>/<eot>``, wrap with LoRA (peft) and build the latent model."""
    loaded = load_model(spec, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    lm, tok = loaded.model, loaded.tokenizer
    tokenizer_before = tokenizer_identity(tok)  # the teachers' caches know it without <bot>/<eot>
    add_latent_tokens(lm, tok)
    lm = make_trainable(lm, cfg)  # LoRA (peft) or all weights
    student = LatentStudent(lm, tok, latents, template)
    student.model_info = loaded.info
    student.tokenizer_identity = tokenizer_before
    return student


def repeated_caches(caches: list[str]) -> dict[str, list[int]]:
    """Caches given more than once: location -> the 0-based teacher indices it fills.

    Local paths are compared after resolving ``~``, ``.``/``..``, trailing slashes and links;
    URLs as written, less a trailing slash. Two copies of one cache in two places are not
    found (they are two locations). A repeated cache is allowed (a planted benchmark may want
    two identical teachers) but counts as that many teachers: it gets that share of ``fixed``'s
    weight and votes that many times in agreement routers (``govern``, ``grad-cosine``).
    """
    seen: dict[str, list[int]] = {}
    for k, url in enumerate(caches):
        key = url.rstrip("/") if "://" in url or "::" in url else os.path.realpath(os.path.expanduser(url))
        seen.setdefault(key, []).append(k)
    return {loc: ks for loc, ks in seen.items() if len(ks) > 1}


def open_teachers(cfg: TrainConfig) -> tuple[list[CacheReader], list[dict]]:
    """Open and cross-check the teacher caches.

    They must agree on the data-set fingerprint (over text, so teachers with different
    tokenizers combine), the slot budget M and the prompt layout; each must hold keys in a
    position-free (pre-RoPE) frame, which may differ between families (``k_proj`` output,
    or after a key norm). With ``require_same_tokenizer`` their tokenizer hashes must agree
    too (the student's is checked in :func:`build_trainee`).

    Raises:
        kvkd.cache.errors.CacheMismatchError: names the field and every cache's value.
        ValueError: no cache given.
    """
    if not cfg.caches:
        raise ValueError("no teacher cache given: pass --cache PATH (repeat it for several teachers)")
    readers = [CacheReader.open(url) for url in cfg.caches]
    for reader in readers:
        reader.check_shards()  # deleted/emptied/truncated shard files refused before anything is created
    named = [(url, r.metadata) for url, r in zip(cfg.caches, readers)]
    check_same_rows(named)  # caches over a trace file's other row set: say which rows each holds
    check_compatible(named, fields=("dataset.fingerprint", "compression.slots", "prompt"))
    if cfg.require_same_tokenizer:
        check_same_tokenizer((f"first teacher {named[0][0]}", named[0][1].get("tokenizer", {})), named[1:], "--require-same-tokenizer")
    frames = {url: get_field(meta, "compression.key_frame") for url, meta in named}
    moving = {url: f for url, f in frames.items() if not str(f).startswith("pre_rope")}
    if moving:
        raise CacheMismatchError(
            f"teacher cache(s) hold keys in a position-dependent frame: {moving}; KV distillation compares keys before RoPE. Re-extract them with this kvkd",
            "compression.key_frame",
            frames,
        )
    return readers, [r.metadata for r in readers]


def open_training_data(cfg: TrainConfig) -> tuple[list[CacheReader], list[dict], list]:
    """Every check ``kvkd train`` makes of its caches and rows before it creates anything, read-only:
    the caches open as complete, every written shard's objects match its checksums record (by size
    and index), the caches agree with each other (rows, fingerprint, M, prompt, key frame, the
    tokenizer with ``--require-same-tokenizer``), and the training rows match their fingerprint.
    ``kvkd sweep`` runs it for every cell before starting any.

    Returns:
        (readers, metadata per cache, training examples).
    Raises:
        kvkd.cache.errors.CacheError: a cache that is incomplete or damaged (names array and shard).
        kvkd.cache.errors.CacheMismatchError: caches that disagree (names the field and the cause).
        kvkd.data.DataError: training rows that cannot be read or do not match the caches.
    """
    readers, metas = open_teachers(cfg)
    return readers, metas, load_training_examples(cfg, metas[0])


def load_training_examples(cfg: TrainConfig, meta: dict):
    """The training rows: ``cfg.data`` if given, else the data set recorded in the cache;
    refused unless their fingerprint equals the caches'."""
    ds = meta["dataset"]
    source = cfg.data or ds["source"]
    trace_file = ds.get("format") == "trace"  # a kvkd generate trace file: its row window and selection (kvkd.traces)
    res = load_examples(
        source,
        split=cfg.split if cfg.data else ds.get("split"),
        fmt=cfg.data_format if cfg.data else ds.get("format", "auto"),
        offset=cfg.offset if cfg.offset is not None else ds.get("offset", 0),
        limit=cfg.limit if cfg.limit is not None else (ds["limit"] if trace_file else ds.get("selected_rows", ds["rows"])),
        **(ds["trace_selection"] if trace_file and not cfg.data else {}),
        on_bad_row="report" if ds.get("on_bad_row") == "skip" else "raise",  # the rows extraction skipped
    )
    left_out = set(ds.get("too_long_ids", []))  # rows extraction left out as too long for the teacher
    res.examples = [ex for ex in res.examples if ex.id not in left_out]
    if dataset_fingerprint(res.examples) != ds["fingerprint"]:
        raise CacheMismatchError(
            f"dataset.fingerprint: the training rows ({source}, offset {cfg.offset if cfg.offset is not None else ds.get('offset', 0)}, "
            f"{len(res.examples)} rows) are not the rows the caches hold ({ds['source']}, split {ds.get('split')}, offset "
            f"{ds.get('offset', 0)}, {ds['rows']} rows). Training uses exactly the cached rows: leave out --data/--offset/--limit, "
            "or extract caches of the rows you want",
            "dataset.fingerprint",
            {"caches": ds["fingerprint"], "training data": dataset_fingerprint(res.examples)},
        )
    return res.examples


def _batches(n: int, batch_size: int, seed: int, start_step: int, steps: int):
    """Deterministic shuffled batches: epoch e uses randperm(n) seeded by seed + e."""
    per_epoch = math.ceil(n / batch_size)
    for step in range(start_step, steps):
        epoch, pos = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        yield perm[pos * batch_size : (pos + 1) * batch_size]


def latest_checkpoint(run: Path) -> Path | None:
    """Newest complete checkpoint folder of a run (``state.json`` is written last), or None."""
    return RunDir(run).latest_checkpoint()


def build_trainee(cfg: TrainConfig, metas: list[dict]) -> Trainee:
    """Student + one aligner per teacher + router for a config and its caches' metadata.

    Each teacher gets its layer map (``cfg.layer_map``, one for all or one per teacher) and,
    where its shapes differ from the student's, projections whose fixed bases are fitted on
    its first ``cfg.align_fit_rows`` cached rows. ``trainee.teachers`` holds the per-teacher
    record written into ``config.json``.

    Raises:
        ValueError: latents != M, or a layer map that does not fit a teacher (names it).
        kvkd.cache.errors.CacheMismatchError: ``require_same_tokenizer`` and a teacher whose
            tokenizer differs from the student's (names the teacher and what differs).
    """
    latents = cfg.latents or metas[0]["compression"]["slots"]
    if latents != metas[0]["compression"]["slots"]:
        raise ValueError(f"--latents {latents} differs from the caches' slot budget M={metas[0]['compression']['slots']}")
    student = build_student(cfg.student, latents, cfg)
    urls = list(cfg.caches)
    if cfg.require_same_tokenizer:
        check_same_tokenizer((f"student {cfg.student}", student.tokenizer_identity), list(zip(urls, metas)), "--require-same-tokenizer")
    s_shape = Shape(student.num_layers, student.num_kv_heads, student.head_dim, student.hidden_size)
    specs = layer_maps_per_teacher(cfg.layer_map, len(metas))
    aligners = []
    for url, meta, spec in zip(urls, metas, specs):
        t_shape = Shape.from_layout(meta["layout"])
        try:
            mapping = layer_map(t_shape.num_layers, s_shape.num_layers, spec)
        except ValueError as err:
            raise ValueError(f"teacher {url}: {err}") from None
        samples = fit_samples(CacheReader.open(url), cfg.align_fit_rows) if needs_fit(t_shape, s_shape) else None
        aligners.append(TeacherAligner(t_shape, s_shape, mapping, samples))
    router = build_router(cfg.router, len(metas), student.hidden_size, cfg.router_options)
    trainee = Trainee(student, aligners, router)
    trainee.teachers = describe_teachers(urls, metas, student.tokenizer_identity, aligners, specs)
    return trainee


def check_options(cfg: TrainConfig) -> None:
    """Refuse bad option values before anything heavy runs.

    Raises:
        ValueError: names the option, the bad value and the choices.
    """
    from kvkd.train.engines import check_deepspeed_launch

    check_deepspeed_launch(cfg)
    if cfg.fusion not in FUSIONS:
        raise ValueError(f"--fusion {cfg.fusion!r}: choose one of {FUSIONS}")
    for term in terms():  # each term checks its own options (weight >= 0, choices)
        term.check(cfg)
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ValueError(f"--steps, --batch-size and --grad-accum must be >= 1, got {cfg.steps}, {cfg.batch_size} and {cfg.grad_accum}")
    check_router_options(cfg.router, cfg.router_options, len(cfg.caches))
    parse_report_to(cfg.report_to)


def check_router_options(name: str, options: dict | None, num_teachers: int) -> None:
    """Refuse an unknown router, an option it does not take, or fixed weights of the wrong count,
    before any model loads.

    Raises:
        KeyError: unknown router (lists the known ones).
        ValueError: unknown option (lists the router's options) or a bad weight count.
    """
    import inspect

    from kvkd.train.routers import ROUTERS

    cls = ROUTERS.get(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "num_teachers", "feature_dim")]
    unknown = sorted(set(options or {}) - set(accepted))
    if unknown:
        raise ValueError(f"router {name!r} has no option(s) {unknown}; its options: {accepted or 'none'} (--router-option KEY=VALUE)")
    weights = (options or {}).get("weights")
    if weights is not None and num_teachers and len(weights) != num_teachers:
        raise ValueError(f"--router-weights gives {len(weights)} weights for {num_teachers} teacher caches: give one per --cache")


@dataclass
class Run:
    """A prepared run (:func:`prepare`), what :func:`fit` trains.

    Attributes:
        cfg: the options (local paths made absolute).
        dir: the run folder.
        start: steps already done (the newest checkpoint's step; 0 for a new run).
        finished: the folder already holds ``cfg.steps`` or more steps; :func:`fit` only reports it
            (no model was loaded: ``trainee``, ``engine`` and ``dataset`` are None).
        validator: scores ``--valid-data`` rows during :func:`fit` (does nothing without them).
    """

    cfg: TrainConfig
    dir: RunDir
    start: int
    finished: bool
    trainee: Trainee | None = None
    engine: object | None = None
    dataset: DistillDataset | None = None
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    validator: Validator | None = None

    def close(self) -> None:
        """Release the run folder's lock (:func:`fit` does it when it ends)."""
        self.stack.close()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _is_local(spec: str) -> bool:
    return bool(spec) and "://" not in spec and Path(spec).expanduser().exists()


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with every local path (student, caches, data, DeepSpeed config, run folder) made
    absolute, and cache names/keys resolved through the cache root (``kvkd.cache.store``), so a
    run folder is usable (eval, export, resume) from any working directory.

    Raises:
        kvkd.cache.errors.CacheError: an unknown cache name (naming the closest ones).
    """
    absolute = lambda s: str(Path(s).expanduser().resolve()) if _is_local(s) else s  # noqa: E731
    return dataclasses.replace(
        cfg,
        student=cfg.student if cfg.student == "smollm2" else absolute(cfg.student),
        caches=[absolute(resolve_cache(c, cfg.cache_root)) for c in cfg.caches],
        data=absolute(cfg.data),
        deepspeed=absolute(cfg.deepspeed),
        out=str(Path(cfg.out).expanduser().resolve()) if cfg.out and "://" not in cfg.out else cfg.out,
    )


def check_resume(recorded: dict, cfg: TrainConfig) -> None:
    """Refuse to resume a run with options that define another run (:func:`kvkd.train.rundir.check_resume`;
    ``--latents 0`` means the caches' M, which ``config.json`` records as the number).

    Raises:
        kvkd.train.rundir.RunFolderError: names each differing option with both values.
    """
    current = asdict(cfg)
    if not cfg.latents:
        current.pop("latents")
    check_run_options(recorded, cfg, current)


def _record(cfg: TrainConfig, trainee: Trainee, engine, recorded: dict | None, done: int) -> dict:
    """``config.json``: the resolved options, what the run derived from them, and provenance
    (library versions and device; a resume appends its own to ``resumes``)."""
    resolved = asdict(cfg)
    resolved.pop("fresh")
    resolved["teachers"] = trainee.teachers  # shapes, layer maps, projections, tokenizer shared or not
    resolved["student_shape"] = {"num_layers": trainee.student.num_layers, "num_kv_heads": trainee.student.num_kv_heads, "head_dim": trainee.student.head_dim, "hidden_size": trainee.student.hidden_size}
    resolved["student_tokenizer"] = {k: trainee.student.tokenizer_identity.get(k) for k in ("source", "vocab_size", "hash")}
    resolved["latents"] = trainee.student.num_latents
    resolved["effective_batch"] = cfg.batch_size * cfg.grad_accum  # examples per optimiser step
    resolved["layer_maps"] = [a.mapping.tolist() for a in trainee.aligners]
    resolved["engine"] = asdict(engine.info)
    record_provenance(resolved, recorded, done, cfg.steps, engine.device)
    return resolved


def prepare(cfg: TrainConfig) -> Run:
    """Everything before the first step: check the options, lock the run folder, compare a
    resume's options with ``config.json``, open the caches, build the trainee and engine, write
    ``config.json`` and load the newest checkpoint.

    A folder whose newest checkpoint already has ``cfg.steps`` steps is *finished*: nothing
    is loaded and :func:`fit` reports it from its log. With ``cfg.fresh`` the folder's run is
    deleted first. Rank 0 holds the folder's lock until :func:`fit` ends (or ``Run.close``).

    Raises:
        kvkd.train.rundir.RunFolderError: the folder is locked by another process, or holds a
            run with other options (names each).
        kvkd.cache.errors.CacheMismatchError: caches disagree with each other or the data.
        ValueError: bad options (no caches, no run folder, latents != M, batch not splittable
            over the ranks, a checkpoint of the other engine).
    """
    if not cfg.out:
        raise ValueError("no run folder given: pass --out RUN_DIR")
    check_options(cfg)
    cfg = absolute_paths(cfg)
    rundir = RunDir(cfg.out)
    stack = contextlib.ExitStack()
    try:
        lead = _rank() == 0
        if lead and rundir.path.is_dir():  # an existing folder: refuse a second trainer before any work
            stack.enter_context(rundir.lock())
        readers, metas, examples = open_training_data(cfg)  # read-only: a damaged cache is refused before a new run folder exists
        refuse_overlap(examples, cfg.eval_data)  # eval questions among the training rows: refuse before training
        validator = Validator(cfg, examples, rundir.path)  # --valid-data: held-out rows (overlaps refused), scored in fit
        if lead and not rundir.path.is_dir():
            stack.enter_context(rundir.lock())  # creates the folder
        recorded, done = resume_point(rundir, cfg, lead, check_resume)
        if done >= cfg.steps:
            return Run(cfg, rundir, done, True, stack=stack)
        torch.manual_seed(cfg.seed)
        trainee = build_trainee(cfg, metas)  # same seed on every rank: identical initial weights
        if trainee.router.needs_dataset_nll:  # e.g. difficulty bins: cached NLL of every training row
            trainee.router.prepare(torch.stack([torch.from_numpy(r.column("answer_nll") * r.column("answer_len")) for r in readers], 1))
        if trainee.router.needs_training_rows:  # e.g. oracle weights per row, the student's likelihood of each trace
            trainee.router.prepare_rows(examples, trainee.student, metas)
        engine = build_engine(trainee, cfg)
        check_batches_split(len(examples), cfg.batch_size, engine.world_size)
        if engine.world_size > 1 and cfg.grad_accum > 1:  # the last micro-batch of an epoch must split over the ranks too
            check_batches_split(len(examples) % (cfg.batch_size * cfg.grad_accum) or cfg.batch_size, cfg.batch_size, engine.world_size)
        if engine.rank == 0:
            rundir.write_config(_record(cfg, trainee, engine, recorded, done))
        engine.barrier()
        ckpt = rundir.latest_checkpoint()
        start = engine.load(ckpt) if ckpt is not None else 0
        tok = trainee.student.tokenizer
        dataset = DistillDataset(examples, tok, cfg.caches, teacher_extras=teacher_extras(cfg, examples, metas, tok, trainee.student.num_latents))
        return Run(cfg, rundir, start, False, trainee, engine, dataset, stack, validator)
    except BaseException:
        stack.close()
        raise


def summarise(run: Run, entries: list[dict], wall_s: float, steps_run: int) -> TrainSummary:
    """The run's summary from its whole log (every step since step 1, resumes included); skipped
    (non-finite) steps count in the time but not in the loss or the weights."""
    good = [e for e in entries if not e.get("skipped")]
    K = len(run.cfg.caches)
    step_s = [e["step_s"] for e in entries]
    examples = sum(e["examples_per_s"] * e["step_s"] for e in entries)
    return TrainSummary(
        run_dir=str(run.dir.path),
        steps=max([e["step"] for e in entries] + [run.start]),
        resumed_from=run.start,
        wall_s=wall_s,
        final_loss=good[-1]["loss"] if good else float("nan"),
        final_ce=good[-1]["ce"] if good else float("nan"),
        mean_step_s=sum(step_s) / len(step_s) if step_s else float("nan"),
        examples_per_s=examples / sum(step_s) if step_s else float("nan"),
        teachers=list(run.cfg.caches),
        mean_weights=[sum(e["weights"][k] for e in good) / len(good) for k in range(K)] if good else [float("nan")] * K,
        steps_run=steps_run,
        skipped_steps=len(entries) - len(good),
        train_s=sum(step_s),
    )


def fit(run: Run, on_step: Callable[[StepLog], None] | None = None) -> TrainSummary:
    """Train a prepared run to ``cfg.steps`` (or report a finished one), then release its folder.

    Each step logs one line (``log.jsonl``); a step whose loss or gradient is NaN/inf updates
    nothing and is logged with ``skipped``; after more than ``cfg.max_nonfinite_steps`` of them
    training stops (never checkpointing the diverged weights). With DeepSpeed every rank runs
    this; rank 0 alone writes the log and summary and calls ``on_step`` (values are means over
    the global batch).

    Raises:
        kvkd.train.rundir.NonFiniteError: too many non-finite steps, or weights that turned
            NaN/inf at a checkpoint (nothing written for that step).
        kvkd.train.rundir.RunFolderError: a write failed (e.g. disk full; names the path).
    """
    try:
        return _fit(run, on_step)
    finally:
        run.close()


def _fit(run: Run, on_step) -> TrainSummary:
    cfg, rundir = run.cfg, run.dir
    t0 = time.perf_counter()
    if run.finished:
        entries = rundir.read_log() if _rank() == 0 else []
        summary = summarise(run, entries, time.perf_counter() - t0, steps_run=0)
        if _rank() == 0:
            rundir.write_summary(summary)
        return summary
    engine, start = run.engine, run.start
    lead = engine.rank == 0
    entries = rundir.truncate_log(start) if lead else []  # the steps the checkpoint covers; later ones are redone
    skipped = sum(1 for e in entries if e.get("skipped"))
    tok = run.trainee.student.tokenizer
    global_batches = list(_batches(len(run.dataset), cfg.batch_size * cfg.grad_accum, cfg.seed, start, cfg.steps))  # rows per optimiser step
    micro = [micro_batches(rows, cfg.batch_size, engine.rank, engine.world_size) for rows in global_batches]  # this rank's micro-batches
    loader = DataLoader(
        run.dataset,
        batch_sampler=[rows for step in micro for rows, _ in step],
        collate_fn=functools.partial(collate, pad_id=tok.pad_token_id),  # picklable for spawn/forkserver workers
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
        persistent_workers=False,
    )
    engine.module.train()
    last, saved = time.perf_counter(), start
    norms = LatentNorms(run.trainee.student)
    run.stack.callback(norms.close)
    sinks = Sinks(parse_report_to(cfg.report_to) if lead else [], rundir.path, rundir.read_config() if lead else None)
    run.stack.callback(sinks.close)
    validator = run.validator
    with rundir.log_writer() if lead else contextlib.nullcontext(lambda entry: None) as write:
        batches = iter(loader)
        for step, shares in zip(range(start, cfg.steps), micro):
            torch.manual_seed(cfg.seed * 100003 + step)  # dropout etc. reproducible on resume
            lr = engine.lr()  # the rate this step uses
            parts, why = [], None
            for k, (_, scale) in enumerate(shares):  # gradient accumulation: one backward per micro-batch
                batch = next(batches)
                with engine.autocast():
                    loss, part = engine(to_device(batch, engine.device), cfg, step)
                last_micro = k == len(shares) - 1
                if why is None and not engine.all_finite(loss):
                    why = "non-finite loss"
                if why is None:
                    if not engine.backward_step(loss * scale, step=last_micro):
                        why = "non-finite gradient"
                else:  # no update this step; drops any gradient accumulated in it, keeps the engine's counters in step
                    engine.drop_micro_batch(loss * scale, step=last_micro)
                parts.append((_global_logs(engine, part, len(batch["index"])), scale))
            logs = _mean_logs(parts)
            now = time.perf_counter()
            latent_norm, embedding_norm = norms.pop()
            entry = StepLog(step=step + 1, lr=lr, step_s=now - last, examples_per_s=len(global_batches[step - start]) / (now - last), skipped=why,
                            latent_norm=latent_norm, embedding_norm=embedding_norm, **logs)
            last = now
            if not why and validator.due(entry.step):
                entry.valid_nll = validator(entry.step, run.trainee.student, engine)
                last = time.perf_counter()  # validation time is not step time
            if lead:
                write(asdict(entry))
                entries.append(asdict(entry))
                sinks.log(asdict(entry))
            if why:
                skipped += 1
                if skipped > cfg.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"step {entry.step}: {why} (loss {entry.loss}, lr {lr:.3g}); {skipped} non-finite step(s), more than "
                        f"--max-nonfinite-steps {cfg.max_nonfinite_steps}: training stopped, the newest checkpoint is step {saved}. "
                        "The run diverged: lower --lr (or raise --warmup-steps) and start over with --fresh"
                    )
            if lead and on_step and (entry.step % cfg.log_every == 0 or entry.step == cfg.steps):
                on_step(entry)
            if cfg.save_every and entry.step % cfg.save_every == 0 and entry.step < cfg.steps:
                engine.save(rundir.path, entry.step, cfg.keep_checkpoints)
                saved = entry.step
    engine.save(rundir.path, cfg.steps, cfg.keep_checkpoints)
    summary = summarise(run, entries, time.perf_counter() - t0, steps_run=cfg.steps - start)
    if lead:
        rundir.write_summary(summary)
    engine.barrier()
    return summary


def train(cfg: TrainConfig, on_step: Callable[[StepLog], None] | None = None) -> TrainSummary:
    """Train a latent student against teacher caches: :func:`prepare` then :func:`fit`.

    A run folder with checkpoints resumes from the newest (with the same options; ``--steps``
    may grow); a finished one is reported, not retrained. With ``cfg.deepspeed`` every rank
    runs this function (launched by ``deepspeed`` or ``torchrun``): each reads only its rows of
    every global batch; rank 0 alone writes the config, the log, the summary and calls
    ``on_step`` (logged values are means over the global batch).

    A run folder this call created is removed again when a damaged cache stops training
    before its first checkpoint (nothing half-made is left that reads as a run).

    Raises:
        see :func:`prepare` and :func:`fit`.
    """
    created = bool(cfg.out) and _rank() == 0 and not Path(cfg.out).expanduser().exists()
    run = prepare(cfg)
    try:
        return fit(run, on_step)
    except CacheError:
        if created and run.dir.latest_checkpoint() is None:
            shutil.rmtree(run.dir.path, ignore_errors=True)
        raise


def micro_batches(rows: list[int], batch_size: int, rank: int, world: int) -> list[tuple[list[int], float]]:
    """One optimiser step's rows as this rank's micro-batches and their loss scales.

    The step's rows are cut into chunks of ``batch_size`` (the global micro-batch; the last
    chunk of an epoch may be shorter); each chunk is shared over the ranks (:func:`rank_rows`).
    A micro-batch's per-example-mean loss times its scale, summed over the chunks and averaged
    over the ranks, is the per-example mean over all the step's rows, so ``batch 8 x 2
    accumulation steps`` and ``batch 16`` make the same update.

    Returns:
        [(this rank's rows of chunk k, scale_k)] with scale_k = rank scale x len(chunk_k) / len(rows).
    """
    out = []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        mine, scale = rank_rows(chunk, rank, world)
        out.append((mine, scale * len(chunk) / len(rows)))
    return out


def _mean_logs(parts: list[tuple[dict, float]]) -> dict:
    """One step's logs from its micro-batches' (logs, weight): floats and float lists are
    weighted means (weights = the micro-batches' shares of the step's rows); other entries
    (router statistics) are the last micro-batch's."""
    if len(parts) == 1:
        return parts[0][0]
    total = sum(w for _, w in parts)
    out = dict(parts[-1][0])
    for key, value in out.items():
        if isinstance(value, float):
            out[key] = sum(p[key] * w for p, w in parts) / total
        elif isinstance(value, list) and value and all(isinstance(x, float) for x in value):
            out[key] = [sum(p[key][i] * w for p, w in parts) / total for i in range(len(value))]
    return out


def _global_logs(engine, logs: dict, rows: int) -> dict:
    """Step logs as means over the global batch: every float and list of floats is averaged over
    the ranks, each weighted by its rows; other entries (router stats) are rank 0's."""
    if engine.world_size == 1:
        return logs
    keys = [k for k, v in logs.items() if isinstance(v, float) or (isinstance(v, list) and all(isinstance(x, float) for x in v))]
    sizes = [len(logs[k]) if isinstance(logs[k], list) else 1 for k in keys]
    flat = torch.tensor([x for k in keys for x in (logs[k] if isinstance(logs[k], list) else [logs[k]])], dtype=torch.float64)
    mean = engine.all_mean(flat, float(rows)).tolist()
    out, i = dict(logs), 0
    for k, n in zip(keys, sizes):
        out[k] = mean[i : i + n] if isinstance(logs[k], list) else mean[i]
        i += n
    return out


def load_run(run_dir: str | Path, trust_remote_code: bool = False):
    """Rebuild a run's trained student (for ``kvkd eval``/``kvkd export``) from its config and
    newest checkpoint.

    Only the student is rebuilt: the checkpoint's ``aligners.*`` (teacher projections) and
    ``router.*`` tensors are training-only and are not part of the exported student; no
    cache is opened, so a run evaluates without its teachers' caches.

    Args:
        run_dir: a ``kvkd train`` run folder.
        trust_remote_code: let the student's checkpoint run its own Python code. Only the
            caller decides: a ``trust_remote_code`` recorded in the folder's ``config.json`` is
            ignored (a folder received from someone else must not run code by itself).
    Returns:
        (LatentStudent in eval mode, resolved config dict).
    Raises:
        FileNotFoundError: no config.json or no checkpoint in the folder.
        kvkd.train.rundir.NonFiniteError: the checkpoint holds NaN/inf weights.
    """
    rundir = RunDir(run_dir)
    resolved = rundir.read_config()
    if resolved is None:
        raise FileNotFoundError(f"{rundir.path} has no config.json: is it a `kvkd train` run folder?")
    known = {f for f in TrainConfig.__dataclass_fields__} - {"trust_remote_code"}
    cfg = TrainConfig(**{k: v for k, v in resolved.items() if k in known}, trust_remote_code=trust_remote_code)
    state, step = rundir.load_student_state()  # refused before any model loads if NaN/inf
    student = build_student(cfg.student, resolved["latents"], cfg)
    copy_state(dict(student.named_parameters()), state, f"the student {cfg.student} of {rundir.path} (was it moved or changed?)")
    student.eval()
    resolved["checkpoint_step"] = step
    return student, resolved
