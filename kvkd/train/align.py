"""Teacher -> student alignment: layer maps and projections into the student's space.

Teachers may differ from the student in layers, KV heads (GQA), head dim and hidden size
(docs/design.md, section 4). Each teacher gets a :class:`TeacherAligner` that picks, for every
student layer, a teacher layer (:func:`layer_map`: proportional depth by default, ``last``,
or an explicit list) and maps its KV slots and hidden state into the student's shapes:
identity where shapes match, a learned :class:`TargetProjection` (trained with the student,
saved in checkpoints, never exported with the student) where they differ.

Why the projections are constrained (target collapse). A learned map on the *target* side
can lower the loss by degrading the targets instead of improving the student: an
unconstrained linear ``P`` can map every teacher vector onto a constant (teacher states
have a large shared mean component; ``P`` keeps only that and the student matches a
constant). Per-layer std normalisation removes the pure-scale shortcut but not this one
(``tests/train/test_align.py`` shows a plain ``nn.Linear`` collapsing there). A
:class:`TargetProjection` is therefore ``P = R B``:

- ``B`` (fixed, not trained): when the teacher space is larger than the student's, the
  teacher's top principal directions, fitted once on cached rows (PCA keeps the most
  per-example variance any rank-``n_out`` orthogonal projection can keep, Eckart-Young);
  otherwise an isometric embedding ``[I; 0]``.
- ``R`` (trained): a rotation of the student's space, kept exactly orthogonal by
  ``torch.nn.utils.parametrizations.orthogonal`` (Cayley map).

So ``||P t1 - P t2|| = ||B (t1 - t2)||`` at every step: distances between targets, hence
their spread, cannot shrink during training; the projection can only choose *how* the
teacher's geometry is oriented in the student's coordinates (the orthogonal-Procrustes
alignment used for embedding spaces, e.g. Smith et al. 2017; Conneau et al. 2018). The
price: the student must match the teacher's anisotropy up to rotation, not a re-scaled
version of it, and each step evaluates one Cayley map (a linear solve of ``n_out x n_out``)
per projected layer. The Cayley map rather than ``matrix_exp``: on CPU (torch 2.13, d = 896)
its forward + backward takes ~0.4 s against ~6 s for ``matrix_exp``, whose backward is slow;
it reaches every rotation without an eigenvalue -1, which is enough starting from the identity.

KV slots: the teacher compressed its cache per KV head, so slot ``m`` of different heads
may come from different CoT tokens; a KV projection maps the concatenation of all heads'
slot ``m`` (``H_kv_t * D_t``) to the student's (``H_kv_s * D_s``), shared over slots.
"""

from __future__ import annotations


import numpy as np
import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

# The model shape and the layer maps live with the models (``kvkd.models``); the names stay here for callers.
from kvkd.models import LAYER_MAPS, LayerMapSpec, ModelShape, layer_map, layer_maps_per_teacher, parse_layer_map  # noqa: E402,F401

Shape = ModelShape
"""Alias of :class:`kvkd.models.ModelShape` (L, H_kv, D, d of a model)."""


def _orthonormal_complement(rows: torch.Tensor, extra: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``extra`` random unit rows of length n, orthogonal to ``rows`` and to each other."""
    g = torch.randn(extra, n, generator=generator, dtype=torch.float64)
    if rows.shape[0]:
        g = g - (g @ rows.T) @ rows
    q, _ = torch.linalg.qr(g.T)  # (n, extra)
    return q.T


def principal_basis(samples: torch.Tensor | None, n_in: int, rank: int, seed: int = 0) -> torch.Tensor:
    """Orthonormal rows spanning the top-``rank`` principal subspace of ``samples``.

    Args:
        samples: (N, n_in) vectors (any float dtype) or None.
        n_in: vector size; rank: rows wanted (<= n_in).
        seed: seeds the random completion when the samples span fewer than ``rank`` directions.
    Returns:
        (rank, n_in) float32 with orthonormal rows: the right singular vectors of the centred
        samples, largest first, completed with random orthonormal rows when N - 1 < rank or
        ``samples`` is None.
    """
    gen = torch.Generator().manual_seed(seed)
    top = torch.zeros(0, n_in, dtype=torch.float64)
    if samples is not None and samples.shape[0] >= 2:
        x = samples.detach().to(torch.float64)
        x = x - x.mean(0, keepdim=True)
        _, s, vh = torch.linalg.svd(x, full_matrices=False)  # vh: (min(N, n_in), n_in)
        keep = int((s > s.max() * 1e-9).sum()) if s.numel() else 0
        top = vh[: min(keep, rank)]
    if top.shape[0] < rank:
        top = torch.cat([top, _orthonormal_complement(top, rank - top.shape[0], n_in, gen)])
    return top.float()


class TargetProjection(nn.Module):
    """A non-collapsing linear map of teacher vectors into the student's space, ``P = R B``.

    Args:
        n_in: teacher vector size; n_out: student vector size.
        samples: (N, n_in) teacher vectors to fit the fixed basis on (used when n_in > n_out).
        seed: seeds the basis completion.
    Shapes: (..., n_in) -> (..., n_out), dtype of the input.

    ``B`` (buffer ``basis``, (n_out, n_in), fixed): when n_in > n_out, orthonormal rows
    spanning the samples' top-n_out principal directions; otherwise ``[I; 0]`` (orthonormal
    columns, an isometric embedding). ``R`` (``rotation``, an ``nn.Linear(n_out, n_out)``
    under ``parametrizations.orthogonal`` with the Cayley map) starts as the identity and is
    trained; it stays exactly orthogonal for any value of its parameter (weight decay only
    pulls it back towards the identity). See the module docstring for why.
    """

    def __init__(self, n_in: int, n_out: int, samples: torch.Tensor | None = None, seed: int = 0):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        basis = principal_basis(samples, n_in, n_out, seed) if n_in > n_out else torch.eye(n_out, n_in)
        self.register_buffer("basis", basis)  # (n_out, n_in), saved in checkpoints
        rot = nn.Linear(n_out, n_out, bias=False)
        nn.init.eye_(rot.weight)
        self.rotation = orthogonal(rot, orthogonal_map="cayley")

    @property
    def weight(self) -> torch.Tensor:
        """The effective (n_out, n_in) matrix ``R B``."""
        return self.rotation.weight @ self.basis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype))


def _kv_rows(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(N, H, M, D) slots of one layer -> (n, H*D) rows of the slots valid in any head."""
    N, H, M, D = x.shape
    flat = x.permute(0, 2, 1, 3).reshape(N * M, H * D)  # (N*M, H*D)
    if valid is None:
        return flat
    return flat[valid.permute(0, 2, 1).reshape(N * M, H).any(1)]


class TeacherAligner(nn.Module):
    """Maps one teacher's cached tensors into the student's space.

    Args:
        teacher: the teacher's Shape; student: the student's Shape.
        mapping: student layer -> teacher layer (from :func:`layer_map`).
        samples: cached teacher rows to fit the projections' fixed bases on (only read where
            a projection shrinks a space): ``keys``/``values`` (N, L_t, H_t, M, D_t),
            ``slot_valid`` (N, L_t, H_t, M) and ``hidden`` (N, L_t+1, d_t), NumPy or torch
            (as ``CacheReader.read`` returns them). None: random orthonormal bases.
    Raises:
        ValueError: a mapping of the wrong length or out of range.
    """

    def __init__(self, teacher: Shape, student: Shape, mapping: list[int], samples: dict | None = None):
        super().__init__()
        if len(mapping) != student.num_layers or not all(0 <= i < teacher.num_layers for i in mapping):
            raise ValueError(f"layer map {mapping} must give {student.num_layers} teacher layers in [0, {teacher.num_layers})")
        self.teacher, self.student = teacher, student
        self.register_buffer("mapping", torch.tensor(mapping, dtype=torch.long), persistent=False)
        self.kv_identity = (teacher.num_kv_heads, teacher.head_dim) == (student.num_kv_heads, student.head_dim)
        self.hidden_identity = teacher.hidden_size == student.hidden_size
        s = {k: torch.as_tensor(np.asarray(v)) for k, v in (samples or {}).items()}
        n_t, n_s = teacher.num_kv_heads * teacher.head_dim, student.num_kv_heads * student.head_dim
        shrink_kv, shrink_h = n_t > n_s, teacher.hidden_size > student.hidden_size

        def kv_proj(name: str, seed: int) -> nn.ModuleList:
            projs = []
            for j, t in enumerate(mapping):
                rows = None
                if shrink_kv and name in s:
                    rows = _kv_rows(s[name][:, t], s["slot_valid"][:, t] if "slot_valid" in s else None)  # (n, H_t*D_t)
                projs.append(TargetProjection(n_t, n_s, rows, seed + j))
            return nn.ModuleList(projs)

        self.key_proj = None if self.kv_identity else kv_proj("keys", 0)
        self.value_proj = None if self.kv_identity else kv_proj("values", 10_000)
        hidden_idx = [0] + [t + 1 for t in mapping]  # hidden index 0 (embeddings) <- teacher index 0
        self.hidden_proj = None if self.hidden_identity else nn.ModuleList(
            TargetProjection(teacher.hidden_size, student.hidden_size, s["hidden"][:, t] if shrink_h and "hidden" in s else None, 20_000 + j)
            for j, t in enumerate(hidden_idx)
        )

    def describe(self) -> dict:
        """JSON summary for the run config: layer map, projection kinds, trained parameter count."""
        return {
            "layer_map": self.mapping.tolist(),
            "kv": "identity" if self.kv_identity else f"learned {self.teacher.num_kv_heads}x{self.teacher.head_dim} -> {self.student.num_kv_heads}x{self.student.head_dim} per layer",
            "hidden": "identity" if self.hidden_identity else f"learned {self.teacher.hidden_size} -> {self.student.hidden_size} per layer",
            "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
        }

    def _kv(self, x: torch.Tensor, projs) -> torch.Tensor:
        x = x.index_select(1, self.mapping)  # (B, L_s, H_t, M, D_t)
        if projs is None:
            return x
        B, L, H, M, D = x.shape
        flat = x.permute(0, 1, 3, 2, 4).reshape(B, L, M, H * D)  # (B, L_s, M, H_t*D_t)
        out = torch.stack([projs[j](flat[:, j]) for j in range(L)], 1)  # (B, L_s, M, H_s*D_s)
        return out.reshape(B, L, M, self.student.num_kv_heads, self.student.head_dim).permute(0, 1, 3, 2, 4)  # (B, L_s, H_s, M, D_s)

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
        h = hidden.index_select(1, idx)  # (B, L_s+1, d_t)
        if self.hidden_proj is None:
            return h
        return torch.stack([self.hidden_proj[j](h[:, j]) for j in range(h.shape[1])], 1)  # (B, L_s+1, d_s)
