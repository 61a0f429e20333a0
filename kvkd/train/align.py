"""Teacher -> student alignment: layer maps and projections into the student's space.

Teachers may differ from the student in layers, KV heads, head dim and hidden size
(DESIGN.md section 4). Each teacher gets a :class:`TeacherAligner` that picks, for every
student layer, a teacher layer (proportional depth by default) and maps its KV slots and
hidden state into the student's shapes: identity where shapes match, a learned linear map
(trained with the student, saved in checkpoints) where they differ.

Caveat: a learned map on the *target* side can shrink the targets to lower the loss; the
losses' per-layer std normalisation divides by the projected teacher's std, which removes
the pure-scale shortcut, but not every degenerate solution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LAYER_MAPS = ("proportional", "last")


@dataclass(frozen=True)
class Shape:
    """KV/hidden shape of a model: L layers, H_kv KV heads, D head dim, d hidden size."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int


def layer_map(num_teacher_layers: int, num_student_layers: int, kind: str = "proportional", explicit: list[int] | None = None) -> list[int]:
    """Teacher layer index for each student layer.

    Args:
        kind: ``proportional`` (student layer j <- teacher layer round((j+1) L_t / L_s) - 1)
            or ``last`` (the last L_s teacher layers; needs L_t >= L_s, else proportional).
        explicit: a user-given map of length L_s (overrides ``kind``).
    Returns:
        list of L_s teacher layer indices.
    Raises:
        ValueError: bad kind or an explicit map of the wrong length / out of range.
    """
    if explicit is not None:
        if len(explicit) != num_student_layers or not all(0 <= i < num_teacher_layers for i in explicit):
            raise ValueError(f"explicit layer map {explicit} must list {num_student_layers} teacher layers in [0, {num_teacher_layers})")
        return list(explicit)
    if kind == "last" and num_teacher_layers >= num_student_layers:
        return list(range(num_teacher_layers - num_student_layers, num_teacher_layers))
    if kind not in LAYER_MAPS:
        raise ValueError(f"unknown layer map {kind!r}; choose one of {LAYER_MAPS} or give an explicit list")
    return [max(0, round((j + 1) * num_teacher_layers / num_student_layers) - 1) for j in range(num_student_layers)]


def _linear(n_in: int, n_out: int) -> nn.Linear:
    lin = nn.Linear(n_in, n_out, bias=False)
    if n_in == n_out:
        nn.init.eye_(lin.weight)
    else:
        nn.init.orthogonal_(lin.weight)
    return lin


class TeacherAligner(nn.Module):
    """Maps one teacher's cached tensors into the student's space.

    Args:
        teacher: the teacher's Shape; student: the student's Shape.
        mapping: student layer -> teacher layer (from :func:`layer_map`).
    """

    def __init__(self, teacher: Shape, student: Shape, mapping: list[int]):
        super().__init__()
        self.teacher, self.student = teacher, student
        self.register_buffer("mapping", torch.tensor(mapping, dtype=torch.long), persistent=False)
        self.kv_identity = (teacher.num_kv_heads, teacher.head_dim) == (student.num_kv_heads, student.head_dim)
        self.hidden_identity = teacher.hidden_size == student.hidden_size
        n_t, n_s = teacher.num_kv_heads * teacher.head_dim, student.num_kv_heads * student.head_dim
        self.key_proj = None if self.kv_identity else nn.ModuleList(_linear(n_t, n_s) for _ in mapping)
        self.value_proj = None if self.kv_identity else nn.ModuleList(_linear(n_t, n_s) for _ in mapping)
        self.hidden_proj = None if self.hidden_identity else nn.ModuleList(
            _linear(teacher.hidden_size, student.hidden_size) for _ in range(len(mapping) + 1)
        )

    def _kv(self, x: torch.Tensor, projs) -> torch.Tensor:
        x = x.index_select(1, self.mapping)  # (B, L_s, H_t, M, D_t)
        if projs is None:
            return x
        B, L, H, M, D = x.shape
        flat = x.permute(0, 1, 3, 2, 4).reshape(B, L, M, H * D)  # (B, L_s, M, H_t*D_t)
        out = torch.stack([projs[j](flat[:, j]) for j in range(L)], 1)  # (B, L_s, M, H_s*D_s)
        return out.reshape(B, L, M, self.student.num_kv_heads, self.student.head_dim).permute(0, 1, 3, 2, 4)

    def keys(self, keys: torch.Tensor) -> torch.Tensor:
        """(B, L_t, H_t, M, D_t) -> (B, L_s, H_s, M, D_s)."""
        return self._kv(keys, self.key_proj)

    def values(self, values: torch.Tensor) -> torch.Tensor:
        """(B, L_t, H_t, M, D_t) -> (B, L_s, H_s, M, D_s)."""
        return self._kv(values, self.value_proj)

    def slot_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, L_t, H_t, M) -> (B, L_s, H_s, M): a student head's slot is valid if any teacher head's is."""
        m = mask.index_select(1, self.mapping)
        if self.kv_identity:
            return m
        return m.any(2, keepdim=True).expand(-1, -1, self.student.num_kv_heads, -1)

    def slot_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, L_t, H_t, M) per-slot weights (e.g. importances) -> (B, L_s, H_s, M); a student
        head gets the mean over the teacher's heads when head layouts differ."""
        w = weights.index_select(1, self.mapping)
        if self.kv_identity:
            return w
        return w.mean(2, keepdim=True).expand(-1, -1, self.student.num_kv_heads, -1)

    def hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, L_t+1, d_t) -> (B, L_s+1, d_s); index 0 (embeddings) maps to index 0."""
        idx = torch.cat([self.mapping.new_zeros(1), self.mapping + 1])
        h = hidden.index_select(1, idx)
        if self.hidden_proj is None:
            return h
        return torch.stack([self.hidden_proj[j](h[:, j]) for j in range(h.shape[1])], 1)
