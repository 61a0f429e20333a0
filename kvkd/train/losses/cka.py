"""Linear-CKA term between student and teacher boundary hidden states, weight ``--a3``.

"Rethinking Centered Kernel Alignment in Knowledge Distillation" (IJCAI 2024), feature-space
form ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on centred features, in float32; a batch
quantity (one value per teacher, not per sample), weighted by the batch mean of the router's
weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvkd.config import opt
from kvkd.train.losses.base import AlignedTeacher, LossTerm, TermInputs, register_loss

if TYPE_CHECKING:  # torch is imported where a loss is computed: the options import without it
    import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Linear CKA of two feature sets over the same n samples, feature-space form.

    ``CKA(X, Y) = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` with X_c, Y_c the
    column-centred features (Kornblith et al., 2019; the form used by "Rethinking Centered
    Kernel Alignment in Knowledge Distillation", IJCAI 2024). Cost O(n d^2), not O(n^2).
    Invariant to orthogonal transforms and isotropic scaling of either side; 1 for identical
    features. Computed in float32 whatever the input dtype.

    Args:
        x: (..., n, d1) features; y: (..., n, d2) features (d1 and d2 may differ).
    Returns:
        (...) float32 in [0, 1]; 0 when either side has no variance (e.g. n = 1).
    """
    import torch

    x = x.float() - x.float().mean(-2, keepdim=True)
    y = y.float() - y.float().mean(-2, keepdim=True)
    cross = (y.transpose(-1, -2) @ x).pow(2).sum((-2, -1))
    nx = torch.linalg.matrix_norm(x.transpose(-1, -2) @ x)
    ny = torch.linalg.matrix_norm(y.transpose(-1, -2) @ y)
    return cross / (nx * ny).clamp(min=eps)


def cka_loss(s_hidden: torch.Tensor, t_hidden: torch.Tensor) -> torch.Tensor:
    """CKA distillation loss over the batch: ``1 - mean_l CKA(S_l, T_l)``.

    Args:
        s_hidden: (B, L+1, d_s) student boundary hidden states (index 0 = embeddings).
        t_hidden: (B, L+1, d_t) teacher boundary hidden states for the same (mapped) layers.
    Returns:
        () float32. Layers 1..L count (the embedding output is left out: the two sides embed
        different tokens). The B samples of the batch are CKA's n; B = 1 gives 1 (no signal,
        no gradient).
    Raises:
        ValueError: if the batch or layer counts differ.
    """
    if s_hidden.shape[:2] != t_hidden.shape[:2]:
        raise ValueError(f"student hidden {tuple(s_hidden.shape)} and teacher hidden {tuple(t_hidden.shape)} differ in batch or layers")
    s = s_hidden[:, 1:].transpose(0, 1)  # (L, B, d_s)
    t = t_hidden[:, 1:].transpose(0, 1)  # (L, B, d_t)
    return 1 - linear_cka(s, t).mean()


@register_loss
class CKATerm(LossTerm):
    """``L_CKA`` per batch and teacher (:func:`cka_loss`); off (not computed) at ``a3 = 0``."""

    name = "cka"
    weight = "a3"
    per_sample = False

    @dataclass
    class Options:
        a3: float = opt(0.0, help="Weight of the CKA loss on boundary hidden states (0 = off)")

    def __call__(self, inputs: TermInputs, teacher: AlignedTeacher) -> torch.Tensor:
        return cka_loss(inputs.out.hidden, teacher.hidden)
