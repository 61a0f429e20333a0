"""Distillation losses, per sample so that routers can weight teachers per example.

- :func:`kv_loss`: KaVa's KV-matching term (Kuzina et al., 2025),
  ``L_KV = 1/(2M) (||sg(K_t) - K_s||_p + ||sg(V_t) - V_s||_p)``, p = 1 (smooth-L1) or
  2 (MSE), optional per-layer std normalisation.
- :func:`codi_loss`: CODI's hidden-state distillation (Shen et al., 2025): smooth-L1 (or
  MSE) between the student's and the teacher's hidden states at the token before the
  answer, each layer divided by the teacher's std of that layer.

Normalisation: errors are averaged over every valid element (layers, heads, slots, head
dims), so the loss scale does not grow with L, H_kv, M or D; empty slots (a CoT shorter
than M) are masked out.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

LOSS_KINDS = ("smooth_l1", "mse")


def _elementwise(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return (student - teacher) ** 2
    if kind == "smooth_l1":
        return F.smooth_l1_loss(student, teacher, reduction="none", beta=1.0)
    raise ValueError(f"unknown loss kind {kind!r}; choose one of {LOSS_KINDS}")


def _layer_std(teacher: torch.Tensor, valid: torch.Tensor, layer_dim: int = 1) -> torch.Tensor:
    """Std of the teacher per layer over the batch's valid elements, detached, >= 1e-6."""
    dims = [d for d in range(teacher.dim()) if d != layer_dim]
    w = valid.to(teacher.dtype).expand_as(teacher)
    n = w.sum(dim=dims, keepdim=True).clamp(min=2)
    mean = (teacher * w).sum(dim=dims, keepdim=True) / n
    var = (((teacher - mean) ** 2) * w).sum(dim=dims, keepdim=True) / (n - 1)
    return var.sqrt().clamp(min=1e-6).detach()


def kv_loss(
    s_keys: torch.Tensor,
    s_values: torch.Tensor,
    t_keys: torch.Tensor,
    t_values: torch.Tensor,
    valid: torch.Tensor,
    kind: str = "smooth_l1",
    std_norm: bool = True,
    slot_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """KaVa KV-matching loss per sample.

    Args:
        s_keys, s_values: (B, L, H_kv, M, D) student pre-RoPE keys/values at z_1..z_M.
        t_keys, t_values: (B, L, H_kv, M, D) teacher slots, already in the student's space.
            Cached teacher tensors are constants (the stop-gradient of KaVa's sg(.)); the
            only gradient on this side reaches a learned teacher->student projection.
        valid: (B, L, H_kv, M) bool, False for empty slots.
        kind: ``smooth_l1`` (p = 1) or ``mse`` (p = 2).
        std_norm: divide each layer's error by the teacher's std in that layer.
        slot_weights: optional (B, L, H_kv, M) non-negative per-slot weights (e.g. cached
            importances); rescaled to mean 1 over valid slots so the loss scale is unchanged.
    Returns:
        (B,) float32: 0.5 * (mean key error + mean value error) over valid elements.
    Raises:
        ValueError: on shape mismatch or unknown kind.
    """
    if s_keys.shape != t_keys.shape or s_values.shape != t_values.shape:
        raise ValueError(f"student KV {tuple(s_keys.shape)} and teacher KV {tuple(t_keys.shape)} differ in shape")
    m = valid[..., None].float()  # (B, L, H, M, 1)
    if slot_weights is not None:
        w = slot_weights.float() * valid
        w = w / (w.sum(dim=(1, 2, 3), keepdim=True) / valid.sum(dim=(1, 2, 3), keepdim=True).clamp(min=1)).clamp(min=1e-12)
        m = w[..., None]
    total = 0.0
    for s, t in ((s_keys, t_keys), (s_values, t_values)):
        t = t.float()
        s = s.float()
        if std_norm:
            std = _layer_std(t, valid[..., None])  # (1, L, 1, 1, 1)
            s, t = s / std, t / std
        err = _elementwise(s, t, kind) * m  # (B, L, H, M, D)
        count = (valid.sum(dim=(1, 2, 3)) * s.shape[-1]).clamp(min=1)
        total = total + err.sum(dim=(1, 2, 3, 4)) / count
    return 0.5 * total


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
    """
    if s_hidden.shape != t_hidden.shape:
        raise ValueError(f"student hidden {tuple(s_hidden.shape)} and teacher hidden {tuple(t_hidden.shape)} differ in shape")
    t = t_hidden.float()
    s = s_hidden.float()
    if std_norm:
        std = _layer_std(t, torch.ones_like(t, dtype=torch.bool))  # (1, L+1, 1)
        s, t = s / std, t / std
    return _elementwise(s, t, kind).mean(dim=(1, 2))
