"""``kvkd train``: the training recipe (one readable loop that owns checkpoints and logs).

    loss = CE(answer | Q, latents) + sum_k w[:, k] * sum_t a_t L_t,k  (+ router aux)

with ``w = router(signals)`` per sample (docs/design.md, section 4) and the distillation terms t
the plug-ins of ``kvkd.train.losses`` (``codi`` a1, ``kv`` a2, ``cka`` a3, ``simcot`` a4, ...);
one step is ``kvkd.train.step.distill_step``. Teachers are only ever read
from their caches. The run folder holds ``config.json`` (resolved options), ``log.jsonl``
(one line per step: every loss term per teacher, router weights, lr, timing),
``checkpoints/step-N/`` (safetensors weights + optimiser state + ``state.json``) and
``summary.json``. A run resumes from its newest checkpoint.

The optimiser step, device placement and checkpoint files belong to an engine
(``kvkd.train.engines``): one process, or DeepSpeed ZeRO over ranks (``--deepspeed``), where
each rank reads its rows of every global batch and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, make_dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from kvkd.cache.compat import check_compatible, check_same_tokenizer, get_field
from kvkd.cache.errors import CacheMismatchError
from kvkd.cache.reader import CacheReader
from kvkd.data import dataset_fingerprint, load_examples
from kvkd.models import load_model, tokenizer_identity
from kvkd.prompts import PromptTemplate
from kvkd.train.align import Shape, TeacherAligner, layer_map, layer_maps_per_teacher
from kvkd.train.engines import build_engine, check_batches_split, rank_rows, to_device
from kvkd.train.loader import DistillDataset, collate
from kvkd.train.losses import FUSIONS, teacher_extras, terms
from kvkd.train.options import TrainConfig
from kvkd.train.routers import build_router
from kvkd.train.step import Trainee, _fuse, _parameter_grads, _per_sample_grads, align_teachers, distill_step, fuse_teachers  # noqa: F401  (re-exported)
from kvkd.train.student import LatentStudent, add_latent_tokens
from kvkd.train.teacher_records import describe_teachers, fit_samples, needs_fit


def _step_log_class():
    """:class:`StepLog` with one field per registered distillation term (its name: a list of K
    per-teacher batch means), so ``log.jsonl`` keeps one flat key per term (``codi``, ``kv``,
    ``cka``, ...) and a new term needs no edit here."""
    names = [cls.name for cls in terms()]
    fields = [("step", int), ("loss", float), ("ce", float), ("answer_nll", float), *[(n, list[float]) for n in names],
              ("terms", list[str]), ("weights", list[float]), ("fused", float | None), ("router", dict), ("lr", float),
              ("step_s", float), ("examples_per_s", float)]
    doc = ("One training step as logged (``log.jsonl``): the total loss and CE, the gold-answer NLL (nats/token), one list "
           f"of per-teacher values per distillation term ({', '.join(names)}; zeros when a term is off), ``terms`` (those "
           "names), the router's mean weights, the fused term under --fusion target, router stats, lr and timing.")
    cls = make_dataclass("StepLog", fields, namespace={"__doc__": doc})
    cls.__module__ = __name__
    return cls


StepLog = _step_log_class()


@dataclass
class TrainSummary:
    """What a run did (the CLI prints it); ``examples_per_s`` = examples / summed step time."""

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


def build_student(spec: str, latents: int, cfg: TrainConfig, template: PromptTemplate = PromptTemplate()) -> LatentStudent:
    """Load the student, add ``<bot>/<eot>``, wrap with LoRA (peft) and build the latent model."""
    loaded = load_model(spec, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    lm, tok = loaded.model, loaded.tokenizer
    tokenizer_before = tokenizer_identity(tok)  # the teachers' caches know it without <bot>/<eot>
    add_latent_tokens(lm, tok)
    if cfg.use_lora:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
        lm = get_peft_model(lm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM"))
    else:
        for p in lm.parameters():
            p.requires_grad_(True)
    student = LatentStudent(lm, tok, latents, template)
    student.model_info = loaded.info
    student.tokenizer_identity = tokenizer_before
    return student


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
    named = [(url, r.metadata) for url, r in zip(cfg.caches, readers)]
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


def load_training_examples(cfg: TrainConfig, meta: dict):
    """The training rows: ``cfg.data`` if given, else the data set recorded in the cache;
    refused unless their fingerprint equals the caches'."""
    ds = meta["dataset"]
    source = cfg.data or ds["source"]
    res = load_examples(
        source,
        split=cfg.split if cfg.data else ds.get("split"),
        fmt=cfg.data_format if cfg.data else ds.get("format", "auto"),
        offset=cfg.offset if cfg.offset is not None else ds.get("offset", 0),
        limit=cfg.limit if cfg.limit is not None else ds["rows"],
    )
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
    found = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "state.json").is_file()) if (run / "checkpoints").is_dir() else []
    return found[-1] if found else None


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
    if cfg.fusion not in FUSIONS:
        raise ValueError(f"--fusion {cfg.fusion!r}: choose one of {FUSIONS}")
    for term in terms():  # each term checks its own options (weight >= 0, choices)
        term.check(cfg)
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be >= 1, got {cfg.steps} and {cfg.batch_size}")
    check_router_options(cfg.router, cfg.router_options, len(cfg.caches))


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


def train(cfg: TrainConfig, on_step: Callable[[StepLog], None] | None = None) -> TrainSummary:
    """Train a latent student against teacher caches; resumes from the newest checkpoint.

    With ``cfg.deepspeed`` every rank runs this function (launched by ``deepspeed`` or
    ``torchrun``): each reads only its rows of every global batch; rank 0 alone writes the
    config, the log, the summary and calls ``on_step`` (logged values are means over the
    global batch).

    Raises:
        kvkd.cache.errors.CacheMismatchError: caches disagree with each other or the data.
        ValueError: bad options (no caches, no run folder, latents != M, batch not splittable
            over the ranks, a checkpoint of the other engine).
    """
    if not cfg.out:
        raise ValueError("no run folder given: pass --out RUN_DIR")
    check_options(cfg)
    torch.manual_seed(cfg.seed)
    run = Path(cfg.out)
    readers, metas = open_teachers(cfg)
    examples = load_training_examples(cfg, metas[0])
    trainee = build_trainee(cfg, metas)  # same seed on every rank: identical initial weights
    tok = trainee.student.tokenizer
    if trainee.router.needs_dataset_nll:  # e.g. difficulty bins: cached NLL of every training row
        trainee.router.prepare(torch.stack([torch.from_numpy(r.column("answer_nll") * r.column("answer_len")) for r in readers], 1))
    engine = build_engine(trainee, cfg)
    check_batches_split(len(examples), cfg.batch_size, engine.world_size)
    lead = engine.rank == 0
    if lead:
        run.mkdir(parents=True, exist_ok=True)
        resolved = asdict(cfg)
        resolved["teachers"] = trainee.teachers  # shapes, layer maps, projections, tokenizer shared or not
        resolved["student_shape"] = {"num_layers": trainee.student.num_layers, "num_kv_heads": trainee.student.num_kv_heads, "head_dim": trainee.student.head_dim, "hidden_size": trainee.student.hidden_size}
        resolved["student_tokenizer"] = {k: trainee.student.tokenizer_identity.get(k) for k in ("source", "vocab_size", "hash")}
        resolved["latents"] = trainee.student.num_latents
        resolved["layer_maps"] = [a.mapping.tolist() for a in trainee.aligners]
        resolved["engine"] = asdict(engine.info)
        (run / "config.json").write_text(json.dumps(resolved, indent=2))
    engine.barrier()

    start = 0
    ckpt = latest_checkpoint(run)
    if ckpt is not None:
        start = engine.load(ckpt)
    dataset = DistillDataset(examples, tok, cfg.caches, teacher_extras=teacher_extras(cfg, examples, metas, tok, trainee.student.num_latents))
    global_batches = list(_batches(len(dataset), cfg.batch_size, cfg.seed, start, cfg.steps))
    shares = [rank_rows(rows, engine.rank, engine.world_size) for rows in global_batches]  # this rank's rows
    loader = DataLoader(
        dataset,
        batch_sampler=[rows for rows, _ in shares],
        collate_fn=functools.partial(collate, pad_id=tok.pad_token_id),  # picklable for spawn/forkserver workers
        num_workers=cfg.num_workers,
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
        persistent_workers=False,
    )
    engine.module.train()
    t0 = time.perf_counter()
    last = time.perf_counter()
    step_times, logs, seen = [], None, 0
    log_path = run / "log.jsonl"
    if lead and log_path.exists():  # keep the steps the checkpoint covers; later ones are redone
        kept = [line for line in log_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start]
        log_path.write_text("".join(line + "\n" for line in kept))
    weight_sums = torch.zeros(len(cfg.caches))
    with open(log_path, "a") if lead else contextlib.nullcontext() as log:
        for step, batch, (_, scale) in zip(range(start, cfg.steps), loader, shares):
            torch.manual_seed(cfg.seed * 100003 + step)  # dropout etc. reproducible on resume
            with engine.autocast():
                loss, logs = engine(to_device(batch, engine.device), cfg, step)
            lr = engine.lr()  # the rate this step uses
            engine.backward_step(loss * scale)
            logs = _global_logs(engine, logs, len(batch["index"]))
            now = time.perf_counter()
            entry = StepLog(step=step + 1, lr=lr, step_s=now - last, examples_per_s=len(global_batches[step - start]) / (now - last), **logs)
            last = now
            step_times.append(entry.step_s)
            seen += len(global_batches[step - start])
            weight_sums += torch.tensor(entry.weights)
            if lead:
                log.write(json.dumps(asdict(entry)) + "\n")
                log.flush()
                if on_step and (entry.step % cfg.log_every == 0 or entry.step == cfg.steps):
                    on_step(entry)
            if cfg.save_every and entry.step % cfg.save_every == 0 and entry.step < cfg.steps:
                engine.save(run, entry.step, cfg.keep_checkpoints)
    if cfg.steps > start:
        engine.save(run, cfg.steps, cfg.keep_checkpoints)
    summary = TrainSummary(
        run_dir=str(run),
        steps=cfg.steps,
        resumed_from=start,
        wall_s=time.perf_counter() - t0,
        final_loss=logs["loss"] if logs else float("nan"),
        final_ce=logs["ce"] if logs else float("nan"),
        mean_step_s=sum(step_times) / len(step_times) if step_times else 0.0,
        examples_per_s=seen / sum(step_times) if step_times else 0.0,
        teachers=list(cfg.caches),
        mean_weights=(weight_sums / max(1, len(step_times))).tolist(),
    )
    if lead:
        (run / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    engine.barrier()
    return summary


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


def load_run(run_dir: str | Path):
    """Rebuild a run's trained student (for ``kvkd eval``) from its config and newest checkpoint.

    Only the student is rebuilt: the checkpoint's ``aligners.*`` (teacher projections) and
    ``router.*`` tensors are training-only and are not part of the exported student; no
    cache is opened, so a run evaluates without its teachers' caches.

    Returns:
        (LatentStudent in eval mode, resolved config dict).
    Raises:
        FileNotFoundError: no config.json or no checkpoint in the folder.
    """
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run} has no config.json: is it a `kvkd train` run folder?")
    resolved = json.loads((run / "config.json").read_text())
    known = {f for f in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(**{k: v for k, v in resolved.items() if k in known})
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"{run} has no checkpoint yet (checkpoints/step-*): train first")
    student = build_student(cfg.student, resolved["latents"], cfg)
    state = load_file(str(ckpt / "trainable.safetensors"))
    own = dict(student.named_parameters())
    for name, value in state.items():
        if name.startswith("student."):
            with torch.no_grad():
                own[name[len("student."):]].copy_(value)
    student.eval()
    return student, resolved
