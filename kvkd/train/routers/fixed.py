"""``fixed`` router: uniform weights, or weights given by the user (normalised)."""

from __future__ import annotations

import torch

from kvkd.train.routers.base import ROUTERS, Router, RouterInputs


@ROUTERS.register("fixed")
class FixedRouter(Router):
    """Constant teacher weights.

    Args:
        weights: K non-negative numbers (normalised to sum to 1); None = uniform 1/K.
    Raises:
        ValueError: wrong length, a negative weight, or all zero.
    """

    def __init__(self, num_teachers: int, feature_dim: int, weights: list[float] | None = None):
        super().__init__(num_teachers, feature_dim)
        w = torch.ones(num_teachers) if weights is None else torch.tensor([float(x) for x in weights])
        if w.shape != (num_teachers,):
            raise ValueError(f"fixed router: {len(w)} weights given for {num_teachers} teachers")
        if bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"fixed router: weights must be non-negative and not all zero, got {w.tolist()}")
        self.register_buffer("weights", w / w.sum())

    def forward(self, inputs: RouterInputs) -> torch.Tensor:
        B = inputs.losses.shape[0]
        return self.weights[None].expand(B, -1).clone()  # (B, K)
