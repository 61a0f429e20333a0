"""One training step: the student's forward, its teachers aligned, every enabled distillation
term per teacher, the router's weights and the fused objective (docs/design.md, section 4)::

    loss = CE(answer | Q, latents) + sum_k w[:, k] * sum_{per-sample terms t} a_t L_t,k
           + sum_{per-batch terms t} a_t sum_k mean_b(w[:, k]) L_t,k  (+ router aux)

The terms are the plug-ins of :mod:`kvkd.train.losses` (``codi``, ``kv``, ``cka``, ``simcot``,
...); this module names none of them. :class:`Trainee` (what trains) lives here too, with the
gradient helpers the gradient-based routers use.
"""

from __future__ import annotations

import torch

from kvkd.train.align import TeacherAligner
from kvkd.train.losses import AlignedTeacher, TermInputs, terms
from kvkd.train.routers import RouterInputs
from kvkd.train.student import LatentStudent


class Trainee(torch.nn.Module):
    """Everything that trains: the latent student, one aligner per teacher, the router."""

    def __init__(self, student: LatentStudent, aligners: list[TeacherAligner], router):
        super().__init__()
        self.student = student
        self.aligners = torch.nn.ModuleList(aligners)
        self.router = router

    def forward(self, batch: dict, cfg, step: int):
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


def align_teachers(trainee: Trainee, batch: dict) -> list[AlignedTeacher]:
    """Each teacher's batch mapped into the student's space by its aligner.

    Args:
        batch: the collated batch; ``batch["teachers"]`` holds K dicts of (B, ...) tensors
            (``kvkd.train.loader.collate``).
    Returns:
        K :class:`AlignedTeacher`; fields the loader added for a term (e.g. ``step_ids``) are
        passed on in ``data``.
    """
    from kvkd.train.loader import TEACHER_FIELDS

    aligned = []
    for aligner, t in zip(trainee.aligners, batch["teachers"]):
        hidden = aligner.hidden(t["hidden"])  # (B, L_s+1, d_s)
        aligned.append(AlignedTeacher(
            hidden=hidden,
            keys=aligner.keys(t["keys"]),  # (B, L_s, H_s, M, D_s)
            values=aligner.values(t["values"]),
            valid=aligner.slot_mask(t["slot_valid"]),  # (B, L_s, H_s, M)
            slot_weights=aligner.slot_weights(t["slot_importance"]),
            features=hidden[:, -1].detach(),
            answer_nll=t["answer_nll"].float() * t["answer_len"].float(),  # nats of the whole answer: comparable across tokenizers
            data={k: v for k, v in t.items() if k not in TEACHER_FIELDS},
        ))
    return aligned


def fuse_teachers(teachers: list[AlignedTeacher], weights: torch.Tensor) -> AlignedTeacher:
    """The router-weighted target ``sum_k w_k T_k`` of every tensor (``--fusion target``).

    Hidden states are averaged with the weights; KV slots and their importances with the
    weights renormalised over the teachers whose slot is valid there (:func:`_fuse`).

    Args:
        teachers: K aligned teachers; weights: (B, K).
    Returns:
        the fused teacher (no ``features``, ``answer_nll`` or ``data``).
    """
    valid = [t.valid for t in teachers]
    keys, f_valid = _fuse([t.keys for t in teachers], weights, valid)
    return AlignedTeacher(
        hidden=_fuse([t.hidden for t in teachers], weights)[0],
        keys=keys,
        values=_fuse([t.values for t in teachers], weights, valid)[0],
        valid=f_valid,
        slot_weights=_fuse([t.slot_weights.unsqueeze(-1) for t in teachers], weights, valid)[0].squeeze(-1),
    )


def distill_step(trainee: Trainee, batch: dict, cfg, step: int):
    """Forward one batch; returns (loss, StepLog fields except timing).

    Every computed term (its weight > 0, or cheap and always logged) is evaluated per teacher k
    after its aligner maps it into the student's space: (B,) per sample or () per batch. The
    router weighs the teachers (``w``, (B, K)) from, among others, the per-sample weighted sum
    ``sum_t a_t L_t,k``. Fusion ``loss`` trains on ``sum_k w_k sum_t a_t L_t,k`` (per-batch
    terms weighted by ``mean_b(w_k)``); fusion ``target`` fuses the projected teacher tensors
    ``sum_k w_k P_k(T_k)`` first and computes each term that ``fuses_targets`` once against
    the fused target (the others keep loss fusion).

    Returns:
        (loss () with its graph, dict with ``loss``, ``ce``, ``answer_nll``, one list of K
        floats per registered term (batch means; zeros when not computed), ``terms`` (their
        names), ``weights``, ``fused`` (mean fused per-sample distillation term, or None),
        ``router`` (its stats)).
    """
    out = trainee.student(batch["q_ids"], batch["q_mask"], batch["s_ids"], batch["s_mask"], batch["answer_start"])
    teachers = align_teachers(trainee, batch)
    K = len(teachers)
    inputs_t = TermInputs(out, trainee.student, cfg)
    active = [(cls(), getattr(cfg, cls.weight)) for cls in terms() if cls.computed(cfg)]
    values = {}  # name -> (B, K) per sample or (K,) per batch
    for term, _ in active:
        per_teacher = [term(inputs_t, t) for t in teachers]
        values[term.name] = torch.stack(per_teacher, 1 if term.per_sample else 0)
    sample_terms = [(term, a) for term, a in active if term.per_sample]
    batch_terms = [(term, a) for term, a in active if not term.per_sample and a]
    distill = sum(a * values[term.name] for term, a in sample_terms) if sample_terms else out.sample_ce.new_zeros(out.sample_ce.shape[0], K)  # (B, K)

    router = trainee.router
    grads = None
    if router.needs_grads and not distill.requires_grad:  # every per-sample weight 0: no distillation gradient to look at
        grads = distill.new_zeros(distill.shape[0] if router.needs_grads == "activation" else 1, distill.shape[1], 1)
    elif router.needs_grads == "activation":
        outputs = {"kv": [out.keys, out.values], "hidden": [out.hidden], "both": [out.keys, out.values, out.hidden]}[router.grad_space]
        grads = _per_sample_grads(distill, outputs)
    elif router.needs_grads == "parameter":
        grads = _parameter_grads(distill, [p for p in trainee.student.parameters() if p.requires_grad])
    inputs = RouterInputs(out.features, torch.stack([t.features for t in teachers], 1), distill,
                          torch.stack([t.answer_nll for t in teachers], 1).float(), step, out.sample_ce.detach(), grads, rows=batch["index"])
    weights = router(inputs)  # (B, K)

    fused = None
    if cfg.fusion == "target":
        target = fuse_teachers(teachers, weights)
        fusable = [(term, a) for term, a in sample_terms if term.fuses_targets]
        fused_distill = sum(a * term(inputs_t, target) for term, a in fusable) if fusable else out.sample_ce.new_zeros(weights.shape[0])  # (B,)
        distill_term = fused_distill.mean()
        for term, a in sample_terms:
            if not term.fuses_targets:
                distill_term = distill_term + (weights * (a * values[term.name])).sum(1).mean()
        fused = float(fused_distill.detach().mean())
        batch_term = sum(a * term(inputs_t, target) if term.fuses_targets else a * (weights.mean(0) * values[term.name]).sum()
                         for term, a in batch_terms)
    else:
        distill_term = (weights * distill).sum(1).mean()
        batch_term = sum(a * (weights.mean(0) * values[term.name]).sum() for term, a in batch_terms)
    loss = out.ce + distill_term + batch_term
    aux = router.aux_loss(weights, inputs)
    if aux is not None:
        loss = loss + aux
    logs = {"loss": float(loss.detach()), "ce": float(out.ce.detach()), "answer_nll": float(out.answer_nll.detach().mean())}
    for cls in terms():
        v = values.get(cls.name)
        logs[cls.name] = [0.0] * K if v is None else (v.detach().mean(0) if cls.per_sample else v.detach()).tolist()
    logs.update({
        "terms": [cls.name for cls in terms()],
        "weights": weights.detach().mean(0).tolist(),
        "fused": fused,
        "router": dict(router.stats),
    })
    if getattr(cfg, "log_row_weights", False):  # per-sample weights, e.g. to score routing against a planted truth
        logs["row_weights"] = {"rows": batch["index"].tolist(), "weights": weights.detach().float().tolist()}
    return loss, logs
