"""``grad-cosine`` router: the plan's gradient-agreement weighting (kept apart from GOVERN,
which it is often mistaken for; docs/design.md, section 1).

Per teacher k a distillation gradient ``g_k``; the cosine-similarity matrix
``C[k, j] = cos(g_k, g_j)``; row sums ``r_k = sum_j C[k, j]`` (how much teacher k agrees with
the others, itself included); ``w = softmax(r / T)``; optional EMA momentum
``w <- beta * w_ema + (1 - beta) * w`` with ``w_ema`` the running mean of the batch-mean
weights (a buffer, saved in checkpoints).

With two teachers the weights are always uniform: the cosine matrix is symmetric, so both
row sums equal ``1 + cos(g_1, g_2)``. The router discriminates from K = 3 on.

Gradient space (``space``):
- ``activation`` (default, cheap): per sample, gradients w.r.t. the student's outputs (KV
  entries at the latent positions and/or boundary hidden states, ``outputs``); weights differ
  per sample.
- ``parameter`` (costly, the plan's original): gradients of each teacher's batch loss w.r.t.
  all trainable parameters, one extra backward pass through the student per teacher; one
  weight vector for the whole batch.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kvkd.train.routers.base import ROUTERS, Router, RouterInputs, _check_grad_space


def grad_cosine_weights(grads: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, K, P) gradients -> (N, K) ``softmax_k(sum_j cos(g_k, g_j) / T)`` (float32)."""
    g = F.normalize(grads.float(), dim=-1, eps=1e-12)  # (N, K, P)
    cos = g @ g.transpose(1, 2)  # (N, K, K)
    return torch.softmax(cos.sum(-1) / temperature, dim=-1)


@ROUTERS.register("grad-cosine")
class GradCosineRouter(Router):
    """Cosine-agreement router over per-teacher gradients.

    Args:
        temperature: T > 0 (default 1.0).
        momentum: EMA factor beta in [0, 1) (0 = off, the default).
        space: ``activation`` (default) or ``parameter``.
        outputs: for activation space, ``kv``, ``hidden`` or ``both`` (default).
    """

    def __init__(self, num_teachers: int, feature_dim: int, temperature: float = 1.0, momentum: float = 0.0, space: str = "activation", outputs: str = "both"):
        super().__init__(num_teachers, feature_dim)
        if temperature <= 0:
            raise ValueError(f"grad-cosine router: temperature must be > 0, got {temperature}")
        if not 0 <= momentum < 1:
            raise ValueError(f"grad-cosine router: momentum must be in [0, 1), got {momentum}")
        if space not in ("activation", "parameter"):
            raise ValueError(f"grad-cosine router: space must be 'activation' or 'parameter', got {space!r}")
        self.temperature, self.momentum = temperature, momentum
        self.needs_grads = space
        self.grad_space = _check_grad_space("grad-cosine", outputs)
        self.register_buffer("ema", torch.full((num_teachers,), 1.0 / num_teachers))
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))

    def forward(self, inputs: RouterInputs) -> torch.Tensor:
        if inputs.grads is None:
            raise ValueError("grad-cosine router: no gradients given (the trainer passes them when needs_grads is set)")
        B = inputs.losses.shape[0]
        w = grad_cosine_weights(inputs.grads, self.temperature).expand(B, -1)  # (B, K)
        if self.momentum > 0:
            if self.ema_steps > 0:
                w = self.momentum * self.ema[None] + (1 - self.momentum) * w
            if self.training:
                self.ema.copy_(w.mean(0))
                self.ema_steps += 1
        return w.clone()
