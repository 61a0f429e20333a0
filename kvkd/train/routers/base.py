"""The router interface: per-teacher, per-sample signals -> teacher weights ``w[B, K]``.

A router is one module registered by name in :data:`ROUTERS`; ``kvkd train --router NAME``
builds it with :func:`build_router`. Routers are ``nn.Module``s, so their parameters train
with the student (when they have any) and their state is saved in checkpoints through
``state_dict``. Contract (tested for every registered router): weights are non-negative,
sum to 1 per sample, and the state round-trips through a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvkd.registry import Registry

ROUTERS: Registry = Registry("router")


@dataclass
class RouterInputs:
    """Signals a router may use (K teachers, B samples).

    Attributes:
        student_features: (B, d) student's last-layer hidden state at the answer boundary, detached.
        teacher_features: (B, K, d) each teacher's last-layer boundary hidden state in the
            student's space, detached.
        losses: (B, K) per-teacher distillation loss of each sample (a1*L_CODI + a2*L_KV).
        teacher_nll: (B, K) each teacher's cached NLL of the gold answer, nats/token.
        step: the optimiser step (0-based).
    """

    student_features: torch.Tensor
    teacher_features: torch.Tensor
    losses: torch.Tensor
    teacher_nll: torch.Tensor
    step: int = 0


class Router(nn.Module):
    """Base class: subclasses implement :meth:`forward`.

    Args:
        num_teachers: K.
        feature_dim: d, the student's hidden size.
    """

    def __init__(self, num_teachers: int, feature_dim: int):
        super().__init__()
        if num_teachers < 1:
            raise ValueError(f"a router needs at least one teacher, got {num_teachers}")
        self.num_teachers = num_teachers
        self.feature_dim = feature_dim

    def forward(self, inputs: RouterInputs) -> torch.Tensor:  # pragma: no cover - interface
        """Return (B, K) non-negative weights summing to 1 per sample."""
        raise NotImplementedError

    def aux_loss(self, weights: torch.Tensor) -> torch.Tensor | None:
        """Optional extra loss term added to the training loss (e.g. an entropy bonus)."""
        return None


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
