"""Distillation losses, per sample so that routers can weight teachers per example.

- :func:`kv_loss`: KaVa's KV-matching term (Kuzina et al., 2025),
  ``L_KV = 1/(2M) (||sg(K_t) - K_s||_p + ||sg(V_t) - V_s||_p)``, p = 1 (smooth-L1) or
  2 (MSE), optional per-layer std normalisation.
- :func:`codi_loss`: CODI's hidden-state distillation (Shen et al., 2025): smooth-L1 (or
  MSE) between the student's and the teacher's hidden states at the token before the
  answer, each layer divided by the teacher's std of that layer.
- :func:`linear_cka` / :func:`cka_loss`: linear CKA between student and teacher features
  ("Rethinking Centered Kernel Alignment in Knowledge Distillation", IJCAI 2024), feature-space
  form ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on centred features, in float32; a batch
  quantity (one value per teacher, not per sample).

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
        w = torch.where(valid, slot_weights.float(), torch.zeros((), device=valid.device))  # empty slots may hold anything
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
