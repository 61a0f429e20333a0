"""The distillation-term interface: one plug-in per loss, registered by name in :data:`LOSSES`.

A term (:class:`LossTerm`) compares the student with *one* teacher already mapped into the
student's space (:class:`AlignedTeacher`) and declares, in its own module:

- ``name``: the registry name, also its key in ``log.jsonl`` / :class:`StepLog` (one value
  per teacher) and in plots;
- ``Options``: a small dataclass of its options declared with :func:`kvkd.config.opt`, one of
  which (``weight``) is its weight in the objective (``a1`` for CODI, ...). ``kvkd train``'s
  option group ``losses`` (:class:`kvkd.train.options.LossArgs`) is built from every
  registered term's ``Options`` (:func:`loss_option_fields`), so the CLI flags, config-file
  keys and ``TrainConfig`` attributes follow without editing any other file;
- ``per_sample``: True if it returns (B,) values (router-weighted per sample), False if it
  returns one value per batch () (e.g. CKA, whose n is the batch), weighted by the batch
  mean of the router's weights;
- ``fuses_targets``: under ``--fusion target`` the term is computed once against the fused
  teacher (:func:`kvkd.train.step.fuse_teachers`); a term whose target cannot be averaged
  (token sequences) says False and is fused by its weighted per-teacher losses instead;
- ``always_computed``: computed and logged even when its weight is 0 (cheap terms the plots
  expect); other terms cost nothing at weight 0 (logged as zeros);
- :meth:`LossTerm.teacher_data`: per-teacher tensors the loader must deliver (e.g.
  SIM-CoT's tokenised reasoning steps), built once before training and only when the term is
  on.

Adding a loss = one module in ``kvkd/train/losses/`` with one ``@register_loss`` class: the
package imports each of its modules (like the routers' package), so nothing else is edited.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from kvkd.config import ConfigError, opt
from kvkd.registry import Registry

if TYPE_CHECKING:  # torch is imported where a loss is computed: the options import without it
    import torch

LOSSES: Registry = Registry("loss")

LOSS_KINDS = ("smooth_l1", "mse")
FUSIONS = ("loss", "target")


@dataclass
class SharedLossOptions:
    """Options every term may read (``std_norm``) and how teachers are fused (``fusion``)."""

    std_norm: bool = opt(True, help="Per-layer teacher-std normalisation of the distillation losses")
    fusion: str = opt("loss", help="Teacher fusion: loss (weighted per-teacher losses) or target (weighted projected targets, one loss)", choices=FUSIONS)


@dataclass
class AlignedTeacher:
    """One teacher's batch in the student's space (after its ``TeacherAligner``).

    Attributes:
        hidden: (B, L_s+1, d_s) float boundary hidden states (index 0 = embeddings).
        keys, values: (B, L_s, H_s, M, D_s) float pre-RoPE KV slots.
        valid: (B, L_s, H_s, M) bool, False for empty slots.
        slot_weights: (B, L_s, H_s, M) float cached answer->CoT importances of the slots.
        features: (B, d_s) last-layer boundary hidden state, detached (router input); None for
            a fused teacher.
        answer_nll: (B,) float32 the teacher's NLL of the whole gold answer, nats; None for a
            fused teacher.
        data: the loader's further tensors of this teacher (from :meth:`LossTerm.teacher_data`,
            e.g. ``step_ids``), unchanged.
    """

    hidden: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    slot_weights: torch.Tensor
    features: torch.Tensor | None = None
    answer_nll: torch.Tensor | None = None
    data: dict = field(default_factory=dict)


@dataclass
class TermInputs:
    """What a term may read besides its teacher: the student's forward, the student, the config.

    Attributes:
        out: the :class:`kvkd.train.student.StudentOutput` of the batch.
        student: the :class:`kvkd.train.student.LatentStudent` (e.g. to decode with it).
        cfg: the training config (each term reads its own options off it).
    """

    out: Any
    student: Any
    cfg: Any


class LossTerm:
    """Base class of a distillation term (see the module docstring for the class attributes).

    Subclasses set ``name``, ``weight``, ``Options`` and implement :meth:`__call__`.
    """

    name: ClassVar[str] = ""
    weight: ClassVar[str] = ""
    Options: ClassVar[type] = None  # type: ignore[assignment]
    per_sample: ClassVar[bool] = True
    fuses_targets: ClassVar[bool] = True
    always_computed: ClassVar[bool] = False

    def __call__(self, inputs: TermInputs, teacher: AlignedTeacher) -> torch.Tensor:
        """The term for one teacher: (B,) float32 if ``per_sample`` else () float32."""
        raise NotImplementedError

    @classmethod
    def computed(cls, cfg) -> bool:
        """Whether the step computes this term (its weight > 0, or ``always_computed``)."""
        return cls.always_computed or getattr(cfg, cls.weight) > 0

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse bad values of this term's options before anything heavy runs.

        Raises:
            ValueError: names the flag and the bad value.
        """
        if getattr(cfg, cls.weight) < 0:
            raise ValueError(f"--{cls.weight.replace('_', '-')} must be >= 0, got {getattr(cfg, cls.weight)}")

    def teacher_data(self, cfg, examples: list, meta: dict, tokenizer, num_latents: int) -> dict[str, torch.Tensor]:
        """Per-example tensors of one teacher the loader delivers (``{name: (N, ...)}``), built
        once before training when the term is computed; none by default."""
        return {}


def register_loss(cls: type[LossTerm]) -> type[LossTerm]:
    """Class decorator: register a :class:`LossTerm` under its ``name``.

    Raises:
        ValueError: the name is taken or not a Python identifier (it names a log column and a
            StepLog field), or ``weight`` is not a field of its ``Options``.
    """
    if not cls.name.isidentifier() or cls.Options is None or cls.weight not in {f.name for f in dataclasses.fields(cls.Options)}:
        raise ValueError(f"loss term {cls.__name__}: set name (an identifier), an Options dataclass and weight (one of its fields)")
    return LOSSES.register(cls.name)(cls)


def terms() -> list[type[LossTerm]]:
    """Every registered term, ordered by its weight option's name (``a1``, ``a2``, ...): the
    order of log columns and ``--help``."""
    return sorted((cls for _, cls in LOSSES.items()), key=lambda cls: (len(cls.weight), cls.weight))


def loss_option_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """``(name, type, Field)`` of every term's options (weights first, in registration order,
    then the other options), then :class:`SharedLossOptions`; for ``dataclasses``.

    Raises:
        ConfigError: two terms declare an option of the same name.
    """
    groups = [t.Options for t in terms()]
    weights = {t.weight for t in terms()}
    found: list[tuple[str, Any, dataclasses.Field]] = []
    owner: dict[str, str] = {}
    for cls in groups + [SharedLossOptions]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in owner:
                raise ConfigError(f"loss option {f.name!r} is declared by both {owner[f.name]} and {cls.__qualname__}")
            owner[f.name] = cls.__qualname__
            found.append((f.name, hints[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)))
    return sorted(found, key=lambda x: x[0] not in weights)  # stable: weights, then the rest


# --------------------------------------------------------------------------- helpers of terms
def elementwise(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Elementwise error: ``(s - t)^2`` (``mse``) or smooth-L1 with beta 1 (``smooth_l1``).

    Raises:
        ValueError: unknown kind.
    """
    from torch.nn import functional as F

    if kind == "mse":
        return (student - teacher) ** 2
    if kind == "smooth_l1":
        return F.smooth_l1_loss(student, teacher, reduction="none", beta=1.0)
    raise ValueError(f"unknown loss kind {kind!r}; choose one of {LOSS_KINDS}")


def layer_std(teacher: torch.Tensor, valid: torch.Tensor, layer_dim: int = 1) -> torch.Tensor:
    """Std of the teacher per layer over the batch's valid elements, detached, >= 1e-6.

    Args:
        teacher: (B, L, ...) float; valid: bool broadcastable to it.
    Returns:
        the std with ``teacher``'s rank, 1 in every dim but ``layer_dim``.
    """
    
    dims = [d for d in range(teacher.dim()) if d != layer_dim]
    w = valid.to(teacher.dtype).expand_as(teacher)
    n = w.sum(dim=dims, keepdim=True).clamp(min=2)
    mean = (teacher * w).sum(dim=dims, keepdim=True) / n
    var = (((teacher - mean) ** 2) * w).sum(dim=dims, keepdim=True) / (n - 1)
    return var.sqrt().clamp(min=1e-6).detach()


def teacher_extras(cfg, examples: list, metas: list[dict], tokenizer, num_latents: int) -> list[dict[str, torch.Tensor]] | None:
    """Per teacher, the per-example tensors the computed terms need from the loader.

    Args:
        cfg: the training config (``cfg.caches`` names the teachers in ``metas`` order).
        examples: the N training rows, in cache order; metas: each cache's metadata.
        tokenizer: the student's tokenizer; num_latents: M.
    Returns:
        K dicts ``{field: (N, ...) tensor}`` for ``kvkd.train.loader.DistillDataset``, or None
        when no computed term needs any (nothing is built for a term whose weight is 0).
    Raises:
        ValueError: a term cannot build its data from a cache (names the cache and the flag),
            or two terms deliver one field.
    """
    out: list[dict[str, torch.Tensor]] = [{} for _ in metas]
    for cls in terms():
        if not cls.computed(cfg):
            continue
        for k, meta in enumerate(metas):
            url = cfg.caches[k] if k < len(cfg.caches) else f"teacher {k}"
            try:
                data = cls().teacher_data(cfg, examples, meta, tokenizer, num_latents)
            except ValueError as err:
                raise ValueError(f"teacher cache {url} (--{cls.weight.replace('_', '-')}): {err}") from None
            taken = set(data) & set(out[k])
            if taken:
                raise ValueError(f"loss term {cls.name!r} delivers loader field(s) {sorted(taken)} that another term already does")
            out[k].update(data)
    return out if any(out) else None
