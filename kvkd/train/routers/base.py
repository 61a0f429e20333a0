"""The router interface: per-teacher, per-sample signals -> teacher weights ``w[B, K]``.

A router is one module registered by name in :data:`ROUTERS`; ``kvkd train --router NAME``
builds it with :func:`build_router`. Routers are ``nn.Module``s, so their parameters train
with the student (when they have any) and their state (parameters, EMA buffers, a policy and
its optimiser moments) is saved in checkpoints through ``state_dict``. Contract (tested for
every registered router): weights are finite, non-negative, sum to 1 per sample, and the
state round-trips through a checkpoint.

What a router may ask the trainer for (class attributes, so the trainer only pays for what
is used):

- ``needs_grads``: ``None`` (default), ``"activation"`` or ``"parameter"``. With
  ``"activation"`` the trainer passes each teacher's distillation gradient with respect to
  the student's *outputs* (its KV entries at the latent positions and its boundary hidden
  states), per sample: cheap, the graph from outputs to losses is only the loss itself. With
  ``"parameter"`` it passes the gradient of each teacher's batch loss with respect to the
  trainable parameters (K extra backward passes through the student: costly).
- ``grad_space``: for activation gradients, which outputs: ``"kv"``, ``"hidden"`` or
  ``"both"`` (the default).
- ``trains_itself``: the router updates its own parameters (e.g. a REINFORCE policy with its
  own optimiser) and the trainer leaves them out of the student's optimiser.
- ``needs_dataset_nll``: the router wants every training row's cached teacher NLL once
  before training (:meth:`Router.prepare`), e.g. to set difficulty bins.
- ``needs_training_rows``: the router wants the training rows themselves once before training
  (:meth:`Router.prepare_rows`: the examples in cache order, the student, the caches'
  metadata), e.g. per-row oracle weights checked against the row ids, or the student's
  likelihood of each teacher's trace. Such routers index their per-row data by
  ``RouterInputs.rows``.

Weights a router returns carry gradients only when the router is trained by the weighted
loss (``learnable``, ``difficulty`` with a learnable capability matrix); gradient- and
statistics-based routers return detached weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvkd.registry import Registry

ROUTERS: Registry = Registry("router")

GRAD_SPACES = ("kv", "hidden", "both")


@dataclass
class RouterInputs:
    """Signals a router may use (K teachers, B samples).

    Attributes:
        student_features: (B, d) student's last-layer hidden state at the answer boundary, detached.
        teacher_features: (B, K, d) each teacher's last-layer boundary hidden state in the
            student's space, detached.
        losses: (B, K) per-teacher distillation loss of each sample (the weighted sum of the
            per-sample terms, e.g. a1*L_CODI + a2*L_KV + a4*L_SIM-CoT),
            with its graph (routers must not backpropagate through it unless they mean to).
        teacher_nll: (B, K) each teacher's cached NLL of the whole gold answer, in nats (the
            cached per-token mean times the answer's token count: teachers with different
            tokenizers split the answer differently, so only the total is comparable).
        step: the optimiser step (0-based).
        student_ce: (B,) the student's own answer-text cross-entropy per sample, detached
            (nats/token); None when the trainer has none.
        grads: per-teacher distillation gradients when the router asked for them
            (``needs_grads``), float32: (B, K, P) in activation space (P = flattened student
            outputs of one sample), (1, K, P) in parameter space (one gradient of the batch
            loss per teacher); None otherwise.
        rows: (B,) int64 index of each sample among the training rows (= its cache row);
            None when the caller has none.
    """

    student_features: torch.Tensor
    teacher_features: torch.Tensor
    losses: torch.Tensor
    teacher_nll: torch.Tensor
    step: int = 0
    student_ce: torch.Tensor | None = None
    grads: torch.Tensor | None = None
    rows: torch.Tensor | None = None


class Router(nn.Module):
    """Base class: subclasses implement :meth:`forward`.

    Args:
        num_teachers: K.
        feature_dim: d, the student's hidden size.
    """

    needs_grads: str | None = None
    grad_space: str = "both"
    trains_itself: bool = False
    needs_dataset_nll: bool = False
    needs_training_rows: bool = False

    def __init__(self, num_teachers: int, feature_dim: int):
        super().__init__()
        if num_teachers < 1:
            raise ValueError(f"a router needs at least one teacher, got {num_teachers}")
        self.num_teachers = num_teachers
        self.feature_dim = feature_dim
        self.stats: dict[str, float] = {}  # router-specific diagnostics of the last call, logged per step

    def forward(self, inputs: RouterInputs) -> torch.Tensor:  # pragma: no cover - interface
        """Return (B, K) non-negative weights summing to 1 per sample."""
        raise NotImplementedError

    def aux_loss(self, weights: torch.Tensor, inputs: RouterInputs) -> torch.Tensor | None:
        """Optional extra loss term added to the training loss (e.g. an entropy bonus)."""
        return None

    def prepare(self, teacher_nll: torch.Tensor) -> None:
        """Called once before training when ``needs_dataset_nll``: (N, K) cached NLL of every
        training row's whole gold answer (nats). Must be deterministic: a resumed run calls it again."""

    def prepare_rows(self, examples: list, student, metas: list[dict]) -> None:
        """Called once before training when ``needs_training_rows``.

        Args:
            examples: the N training rows (``kvkd.data.Example``) in cache order: row i of
                every cache, and ``RouterInputs.rows`` indexes them.
            student: the ``LatentStudent`` before training.
            metas: the K caches' metadata (``dataset`` records where each teacher's traces came from).
        Must be deterministic: a resumed run calls it again.
        """

    def row_index(self, inputs: RouterInputs) -> torch.Tensor:
        """(B,) int64 training-row index of each sample, for routers with per-row data.

        Raises:
            ValueError: the caller gave no ``rows``.
        """
        if inputs.rows is None:
            raise ValueError(f"router {type(self).__name__} needs RouterInputs.rows (each sample's training-row index)")
        return inputs.rows.long()

    def uniform(self, batch: int, device=None) -> torch.Tensor:
        """(B, K) uniform weights."""
        return torch.full((batch, self.num_teachers), 1.0 / self.num_teachers, device=device)


def _check_grad_space(name: str, space: str) -> str:
    if space not in GRAD_SPACES:
        raise ValueError(f"router {name!r}: space must be one of {GRAD_SPACES}, got {space!r}")
    return space


def build_router(name: str, num_teachers: int, feature_dim: int, options: dict | None = None) -> Router:
    """Build a registered router by name.

    Raises:
        KeyError: unknown name (lists the known ones).
        TypeError: an option the router does not take (names it).
    """
    cls = ROUTERS.get(name)
    try:
        return cls(num_teachers=num_teachers, feature_dim=feature_dim, **(options or {}))
    except TypeError as err:
        raise TypeError(f"router {name!r}: bad options {options}: {err}") from err
