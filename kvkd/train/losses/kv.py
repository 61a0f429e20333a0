"""KaVa's KV-matching term (Kuzina et al., 2025), weight ``--a2``.

``L_KV = 1/(2M) (||sg(K_t) - K_s||_p + ||sg(V_t) - V_s||_p)``, p = 1 (smooth-L1) or 2 (MSE),
optional per-layer std normalisation, optional per-slot weights (``--kv-weighting
importance``: the cached answer->CoT attention importance of each slot). Errors are averaged
over every valid element (layers, heads, slots, head dims), so the scale does not grow with L,
H_kv, M or D; empty slots (a CoT shorter than M) are masked out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvkd.config import opt
from kvkd.train.losses.base import LOSS_KINDS, AlignedTeacher, LossTerm, TermInputs, elementwise, layer_std, register_loss

if TYPE_CHECKING:  # torch is imported where a loss is computed: the options import without it
    import torch

KV_WEIGHTINGS = ("none", "importance")


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
    import torch

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
            std = layer_std(t, valid[..., None])  # (1, L, 1, 1, 1)
            s, t = s / std, t / std
        err = elementwise(s, t, kind) * m  # (B, L, H, M, D)
        count = (valid.sum(dim=(1, 2, 3)) * s.shape[-1]).clamp(min=1)
        total = total + err.sum(dim=(1, 2, 3, 4)) / count
    return 0.5 * total


@register_loss
class KVTerm(LossTerm):
    """``L_KV`` per sample and teacher (:func:`kv_loss`), optionally importance-weighted."""

    name = "kv"
    weight = "a2"
    always_computed = True

    @dataclass
    class Options:
        a2: float = opt(1.0, help="Weight of KaVa's KV loss")
        kv_loss: str = opt("smooth_l1", help="KV loss: smooth_l1 (p=1) or mse (p=2)", choices=LOSS_KINDS)
        kv_weighting: str = opt("none", help="KV loss per-slot weights: none or importance (cached answer->CoT attention)", choices=KV_WEIGHTINGS)

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.kv_weighting not in KV_WEIGHTINGS:
            raise ValueError(f"--kv-weighting {cfg.kv_weighting!r}: choose one of {KV_WEIGHTINGS}")

    def __call__(self, inputs: TermInputs, teacher: AlignedTeacher) -> torch.Tensor:
        cfg, out = inputs.cfg, inputs.out
        slot_w = teacher.slot_weights if cfg.kv_weighting == "importance" else None
        return kv_loss(out.keys, out.values, teacher.keys, teacher.values, teacher.valid, cfg.kv_loss, cfg.std_norm, slot_weights=slot_w)
