"""CODI's hidden-state distillation term (Shen et al., 2025), weight ``--a1``.

Smooth-L1 (or MSE) between the student's and the teacher's hidden states at the token before
the answer, each layer divided by the teacher's std of that layer; averaged over layers and
hidden units, so the scale does not grow with L or d.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvkd.config import opt
from kvkd.train.losses.base import LOSS_KINDS, AlignedTeacher, LossTerm, TermInputs, elementwise, layer_std, register_loss

if TYPE_CHECKING:  # torch is imported where a loss is computed: the options import without it
    import torch


def codi_loss(s_hidden: torch.Tensor, t_hidden: torch.Tensor, kind: str = "smooth_l1", std_norm: bool = True) -> torch.Tensor:
    """CODI hidden-state distillation loss per sample (Shen et al., 2025).

    Args:
        s_hidden: (B, L+1, d) student hidden states at the token before the answer.
        t_hidden: (B, L+1, d) teacher hidden states there, in the student's space (cached
            constants; a learned projection applied to them receives gradients).
        kind: ``smooth_l1`` or ``mse``.
        std_norm: divide each layer's error by the teacher's std of that layer (over the batch).
    Returns:
        (B,) float32, mean over layers and hidden units.
    Raises:
        ValueError: on shape mismatch or unknown kind.
    """
    import torch

    if s_hidden.shape != t_hidden.shape:
        raise ValueError(f"student hidden {tuple(s_hidden.shape)} and teacher hidden {tuple(t_hidden.shape)} differ in shape")
    t = t_hidden.float()
    s = s_hidden.float()
    if std_norm:
        std = layer_std(t, torch.ones_like(t, dtype=torch.bool))  # (1, L+1, 1)
        s, t = s / std, t / std
    return elementwise(s, t, kind).mean(dim=(1, 2))


@register_loss
class CodiTerm(LossTerm):
    """``L_CODI`` per sample and teacher (:func:`codi_loss`)."""

    name = "codi"
    weight = "a1"
    always_computed = True

    @dataclass
    class Options:
        a1: float = opt(10.0, help="Weight of CODI's hidden-state loss")
        hidden_loss: str = opt("smooth_l1", help="CODI loss: smooth_l1 or mse", choices=LOSS_KINDS)

    def __call__(self, inputs: TermInputs, teacher: AlignedTeacher) -> torch.Tensor:
        return codi_loss(inputs.out.hidden, teacher.hidden, inputs.cfg.hidden_loss, inputs.cfg.std_norm)
