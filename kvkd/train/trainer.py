"""``kvkd train``: the training recipe (one readable loop that owns checkpoints and logs).

    loss = CE(answer | Q, latents) + sum_k w[:, k] * (a1 * L_CODI_k + a2 * L_KV_k)  (+ router aux)

with ``w = router(signals)`` per sample (docs/design.md, section 4). Teachers are only ever read
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
from dataclasses import asdict, dataclass, field
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
from kvkd.train.options import FUSIONS, KV_WEIGHTINGS, TrainConfig
from kvkd.train.losses import cka_loss, codi_loss, kv_loss
from kvkd.train.routers import RouterInputs, build_router
from kvkd.train.student import LatentStudent, add_latent_tokens
from kvkd.train.teacher_records import describe_teachers, fit_samples, needs_fit


@dataclass
class StepLog:
    """One training step as logged (``log.jsonl``)."""

    step: int
    loss: float
    ce: float
    answer_nll: float
    codi: list[float]
    kv: list[float]
    cka: list[float]
    weights: list[float]
    fused: float | None
    router: dict
    lr: float
    step_s: float
    examples_per_s: float
    row_weights: dict | None = None  # --log-row-weights: {rows: [B], weights: [B][K]} (rank 0's rows)


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


class Trainee(torch.nn.Module):
    """Everything that trains: the latent student, one aligner per teacher, the router."""

    def __init__(self, student: LatentStudent, aligners: list[TeacherAligner], router):
        super().__init__()
        self.student = student
        self.aligners = torch.nn.ModuleList(aligners)
        self.router = router

    def forward(self, batch: dict, cfg: "TrainConfig", step: int):
        """:func:`distill_step` on this trainee (so an engine wrapping the whole trainee runs it)."""
        return distill_step(self, batch, cfg, step)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Trainable parameters + router buffers, by name (what a checkpoint stores)."""
        state = {f"student.{k}": v for k, v in self.student.trainable_state().items()}
        state.update({f"aligners.{k}": v for k, v in self.aligners.state_dict().items()})
        state.update({f"router.{k}": v for k, v in self.router.state_dict().items()})
        return {k: v.detach().contiguous().clone() for k, v in state.items()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        for k, v in state.items():
            if k.startswith("student."):
                if k not in own:
                    raise KeyError(f"checkpoint tensor {k} does not belong to this student (LoRA settings changed?)")
                with torch.no_grad():
                    own[k].copy_(v)
        self.aligners.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("aligners.")})
        self.router.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("router.")})


def _per_sample_grads(losses: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    """(B, K) per-teacher losses -> (B, K, P) gradients w.r.t. the student's outputs.

    A sample's loss depends only on that sample's outputs, so the gradient of the batch sum
    holds every sample's own gradient; one cheap backward through the loss graph per teacher.
    """
    B, K = losses.shape
    per_teacher = []
    for k in range(K):
        gs = torch.autograd.grad(losses[:, k].sum(), outputs, retain_graph=True, allow_unused=True)
        per_teacher.append(torch.cat([(torch.zeros_like(o) if g is None else g).reshape(B, -1) for g, o in zip(gs, outputs)], 1))
    return torch.stack(per_teacher, 1).float()


def _parameter_grads(losses: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """(B, K) per-teacher losses -> (1, K, P) gradients of each teacher's batch loss w.r.t. the
    trainable parameters (one backward pass through the student per teacher)."""
    per_teacher = []
    for k in range(losses.shape[1]):
        gs = torch.autograd.grad(losses[:, k].mean(), params, retain_graph=True, allow_unused=True)
        per_teacher.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)]))
    return torch.stack(per_teacher)[None].float()


def _fuse(tensors: list[torch.Tensor], weights: torch.Tensor, valid: list[torch.Tensor] | None = None):
    """Weighted target ``sum_k w_k T_k`` per sample.

    Args:
        tensors: K tensors (B, ...); weights: (B, K); valid: optional K bool masks broadcastable
            to the tensors (empty slots): weights are renormalised over the teachers with a valid
            entry there.
    Returns:
        (fused (B, ...), fused validity or None).
    """
    w = weights.float()
    shape = (-1,) + (1,) * (tensors[0].dim() - 1)
    if valid is None:
        return sum(w[:, k].view(shape) * t.float() for k, t in enumerate(tensors)), None
    wv = [w[:, k].view(shape[:-1]) * v.float() for k, v in enumerate(valid)]  # (B, L, H, M) each
    denom = sum(wv)
    fused = sum(x[..., None] * t.float() for x, t in zip(wv, tensors)) / denom.clamp(min=1e-12)[..., None]
    return fused, denom > 0


def distill_step(trainee: Trainee, batch: dict, cfg: TrainConfig, step: int):
    """Forward one batch; returns (loss, StepLog fields except timing).

    Per teacher k (after its aligner maps it into the student's space): ``L_CODI_k`` and
    ``L_KV_k`` per sample (the KV error optionally weighted by the cached slot importances),
    ``L_CKA_k`` per batch. The router weighs them (``w``, (B, K)); fusion ``loss`` trains on
    ``sum_k w_k (a1 L_CODI_k + a2 L_KV_k)`` and ``a3 sum_k mean_b(w_k) L_CKA_k``; fusion
    ``target`` fuses the projected teacher tensors ``sum_k w_k P_k(T_k)`` first and computes
    each loss once against the fused target.
    """
    out = trainee.student(batch["q_ids"], batch["q_mask"], batch["s_ids"], batch["s_mask"], batch["answer_start"])
    weighted = cfg.kv_weighting == "importance"
    hid, keys, vals, valid, slot_w = [], [], [], [], []
    codi_terms, kv_terms, cka_terms, feats, nlls = [], [], [], [], []
    for aligner, t in zip(trainee.aligners, batch["teachers"]):
        hid.append(aligner.hidden(t["hidden"]))  # (B, L_s+1, d_s)
        keys.append(aligner.keys(t["keys"]))  # (B, L_s, H_s, M, D_s)
        vals.append(aligner.values(t["values"]))
        valid.append(aligner.slot_mask(t["slot_valid"]))  # (B, L_s, H_s, M)
        slot_w.append(aligner.slot_weights(t["slot_importance"]) if weighted else None)
        codi_terms.append(codi_loss(out.hidden, hid[-1], cfg.hidden_loss, cfg.std_norm))
        kv_terms.append(kv_loss(out.keys, out.values, keys[-1], vals[-1], valid[-1], cfg.kv_loss, cfg.std_norm, slot_weights=slot_w[-1]))
        cka_terms.append(cka_loss(out.hidden, hid[-1]) if cfg.a3 else out.ce.new_zeros(()))
        feats.append(hid[-1][:, -1].detach())
        nlls.append(t["answer_nll"].float() * t["answer_len"].float())  # nats of the whole answer: comparable across tokenizers
    codi = torch.stack(codi_terms, 1)  # (B, K)
    kv = torch.stack(kv_terms, 1)  # (B, K)
    cka = torch.stack(cka_terms)  # (K,)
    distill = cfg.a1 * codi + cfg.a2 * kv  # (B, K)

    router = trainee.router
    grads = None
    if router.needs_grads and not distill.requires_grad:  # a1 = a2 = 0: no distillation gradient to look at
        grads = distill.new_zeros(distill.shape[0] if router.needs_grads == "activation" else 1, distill.shape[1], 1)
    elif router.needs_grads == "activation":
        outputs = {"kv": [out.keys, out.values], "hidden": [out.hidden], "both": [out.keys, out.values, out.hidden]}[router.grad_space]
        grads = _per_sample_grads(distill, outputs)
    elif router.needs_grads == "parameter":
        grads = _parameter_grads(distill, [p for p in trainee.student.parameters() if p.requires_grad])
    inputs = RouterInputs(out.features, torch.stack(feats, 1), distill, torch.stack(nlls, 1).float(), step, out.sample_ce.detach(), grads, rows=batch["index"])
    weights = router(inputs)  # (B, K)

    fused = None
    if cfg.fusion == "target":
        f_hidden, _ = _fuse(hid, weights)
        f_keys, f_valid = _fuse(keys, weights, valid)
        f_vals, _ = _fuse(vals, weights, valid)
        f_slot_w = _fuse([w.unsqueeze(-1) for w in slot_w], weights, valid)[0].squeeze(-1) if weighted else None
        fused_distill = cfg.a1 * codi_loss(out.hidden, f_hidden, cfg.hidden_loss, cfg.std_norm) + cfg.a2 * kv_loss(
            out.keys, out.values, f_keys, f_vals, f_valid, cfg.kv_loss, cfg.std_norm, slot_weights=f_slot_w
        )  # (B,)
        distill_term = fused_distill.mean()
        cka_term = cfg.a3 * cka_loss(out.hidden, f_hidden) if cfg.a3 else 0.0
        fused = float(fused_distill.detach().mean())
    else:
        distill_term = (weights * distill).sum(1).mean()
        cka_term = cfg.a3 * (weights.mean(0) * cka).sum() if cfg.a3 else 0.0
    loss = out.ce + distill_term + cka_term
    aux = router.aux_loss(weights, inputs)
    if aux is not None:
        loss = loss + aux
    logs = {
        "loss": float(loss.detach()),
        "ce": float(out.ce.detach()),
        "answer_nll": float(out.answer_nll.detach().mean()),
        "codi": codi.detach().mean(0).tolist(),
        "kv": kv.detach().mean(0).tolist(),
        "cka": cka.detach().tolist(),
        "weights": weights.detach().mean(0).tolist(),
        "fused": fused,
        "router": dict(router.stats),
    }
    if cfg.log_row_weights:  # per-sample weights, e.g. to score routing against a planted truth
        logs["row_weights"] = {"rows": batch["index"].tolist(), "weights": weights.detach().float().tolist()}
    return loss, logs


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
    if cfg.kv_weighting not in KV_WEIGHTINGS:
        raise ValueError(f"--kv-weighting {cfg.kv_weighting!r}: choose one of {KV_WEIGHTINGS}")
    for name in ("a1", "a2", "a3"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
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
    if trainee.router.needs_training_rows:  # e.g. oracle weights per row, the student's likelihood of each trace
        trainee.router.prepare_rows(examples, trainee.student, metas)
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
    dataset = DistillDataset(examples, tok, cfg.caches)
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
