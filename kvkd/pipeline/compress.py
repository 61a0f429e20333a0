"""KV-cache compression to M slots per (layer, KV head): KaVa's eviction score.

KaVa (Kuzina et al., 2025, "KaVa: Latent Reasoning via Compressed KV-Cache Distillation"),
building on R-KV (Cai et al., 2025): each CoT token of each (layer, KV head) gets

    S = lambda * I + (1 - lambda) * R

where I is its importance (answer -> CoT attention, see ``kvkd.pipeline.capture``) and R
its uniqueness (keys L2-normalised, pairwise cosine with the diagonal zeroed, negated,
averaged over the other tokens, softmax over the CoT). Padding gets the lowest score. The
top M survive, kept in their original order. Everything is vectorised over batch, layers
and heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_LAMBDA = 0.1


@dataclass
class SlotSelection:
    """Which CoT tokens each (example, layer, KV head) keeps.

    Attributes:
        index: (B, L, H_kv, M) int64 CoT token indices, ascending (original order).
        valid: (B, L, H_kv, M) bool; False for empty slots (CoT shorter than M).
        score: (B, L, H_kv, M) float32 eviction score S of each kept token (0 where empty).
        importance: (B, L, H_kv, M) float32 importance I of each kept token (0 where empty).
    """

    index: torch.Tensor
    valid: torch.Tensor
    score: torch.Tensor
    importance: torch.Tensor


def uniqueness(keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R-KV/KaVa redundancy score: softmax over tokens of minus the mean cosine to the others.

    Args:
        keys: (B, L, H_kv, T, D) pre-RoPE keys over the CoT (any float dtype; computed in fp32).
        mask: (B, T) bool, True where a CoT token is present.
    Returns:
        (B, L, H_kv, T) float32, summing to 1 over the valid tokens, 0 on padding.
    """
    k = torch.nn.functional.normalize(keys.float(), dim=-1)  # (B, L, H, T, D)
    cos = k @ k.transpose(-1, -2)  # (B, L, H, T, T)
    T = cos.shape[-1]
    pair = mask[:, :, None] & mask[:, None, :]  # (B, T, T)
    pair = pair & ~torch.eye(T, dtype=torch.bool, device=mask.device)
    pair = pair[:, None, None]  # (B, 1, 1, T, T)
    others = pair.sum(-1).clamp(min=1)  # (B, 1, 1, T)
    mean_cos = (cos * pair).sum(-1) / others  # (B, L, H, T)
    logits = (-mean_cos).masked_fill(~mask[:, None, None, :], float("-inf"))
    r = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(r, nan=0.0)  # a row with no valid token (empty CoT) -> 0


def select_slots(
    keys: torch.Tensor,
    importance: torch.Tensor,
    mask: torch.Tensor,
    budget: int,
    lam: float = DEFAULT_LAMBDA,
) -> SlotSelection:
    """Keep the ``budget`` highest-scoring CoT tokens per (example, layer, KV head) (KaVa Sec. 3).

    Args:
        keys: (B, L, H_kv, T, D) pre-RoPE keys over the CoT.
        importance: (B, L, H_kv, T) answer->CoT attention, summing to 1 over valid tokens.
        mask: (B, T) bool, True where a CoT token is present (padding at the end).
        budget: M, slots kept per (layer, head).
        lam: lambda, the weight of importance against uniqueness, in [0, 1].
    Returns:
        SlotSelection with (B, L, H_kv, M) tensors.
    Raises:
        ValueError: if budget < 1, lam outside [0, 1], or shapes disagree.
    """
    if budget < 1:
        raise ValueError(f"slot budget M must be >= 1, got {budget}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    B, L, H, T, _ = keys.shape
    if importance.shape != (B, L, H, T) or mask.shape != (B, T):
        raise ValueError(f"shape mismatch: keys {tuple(keys.shape)}, importance {tuple(importance.shape)}, mask {tuple(mask.shape)}")
    score = lam * importance.float() + (1.0 - lam) * uniqueness(keys, mask)  # (B, L, H, T)
    score = score.masked_fill(~mask[:, None, None, :], float("-inf"))
    if T < budget:  # pad so topk can always return M entries; padding scores -inf
        score = torch.nn.functional.pad(score, (0, budget - T), value=float("-inf"))
        importance = torch.nn.functional.pad(importance.float(), (0, budget - T))
    top = score.topk(budget, dim=-1).indices  # (B, L, H, M)
    chosen_valid = torch.gather(score, -1, top) > float("-inf")
    # Original order, empty slots last: sort valid indices ascending, push invalid to the end.
    order_key = torch.where(chosen_valid, top, top + score.shape[-1])
    order_key, perm = order_key.sort(dim=-1)
    index = torch.gather(top, -1, perm)
    valid = torch.gather(chosen_valid, -1, perm)
    kept_score = torch.gather(score, -1, index).masked_fill(~valid, 0.0)
    kept_importance = torch.gather(importance.float(), -1, index).masked_fill(~valid, 0.0)
    index = index.masked_fill(~valid, 0)
    return SlotSelection(index=index, valid=valid, score=kept_score, importance=kept_importance)


def gather_slots(x: torch.Tensor, selection: SlotSelection) -> torch.Tensor:
    """Gather kept slots and zero the empty ones.

    Args:
        x: (B, L, H_kv, T, D) keys or values over the CoT.
        selection: from :func:`select_slots`.
    Returns:
        (B, L, H_kv, M, D), same dtype as ``x``.
    """
    idx = selection.index[..., None].expand(*selection.index.shape, x.shape[-1])  # (B, L, H, M, D)
    out = torch.gather(x, 3, idx)
    return out * selection.valid[..., None].to(out.dtype)
