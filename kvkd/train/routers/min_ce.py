"""``min-ce`` router: all weight on the teacher with the lowest cached gold-answer loss.

FuseLLM's MinCE (Wan et al., "Knowledge Fusion of Large Language Models", ICLR 2024,
the MinCE fusion function): per sample, fuse the teachers by keeping the distribution of the one whose
cross-entropy against the gold text is lowest. Here the cross-entropy is each teacher's
cached NLL of the whole gold answer (``RouterInputs.teacher_nll``, nats; whole-answer totals
are comparable across tokenizers, per-token means are not) and "keeping" means weight 1 on
that teacher's distillation losses. Ties (within ``tolerance`` nats) split the weight
equally. Needs no training and no state: blind only where the cached NLLs are.
"""

from __future__ import annotations

import torch

from kvkd.train.routers.base import ROUTERS, Router, RouterInputs


@ROUTERS.register("min-ce")
class MinCERouter(Router):
    """w[b, k] = 1/|T_b| if teacher k is in T_b = {k : nll[b, k] <= min_j nll[b, j] + tolerance}, else 0.

    Args:
        tolerance: nats; teachers within it of the lowest NLL share the weight (0 = exact ties only).
    Raises:
        ValueError: a negative tolerance; at a step, a non-finite cached NLL (names the rows).
    """

    def __init__(self, num_teachers: int, feature_dim: int, tolerance: float = 0.0):
        super().__init__(num_teachers, feature_dim)
        if tolerance < 0:
            raise ValueError(f"min-ce router: tolerance must be >= 0 nats, got {tolerance}")
        self.tolerance = float(tolerance)

    def forward(self, inputs: RouterInputs) -> torch.Tensor:
        nll = inputs.teacher_nll.detach().float()  # (B, K)
        if not bool(torch.isfinite(nll).all()):
            bad = torch.nonzero(~torch.isfinite(nll).all(-1)).flatten().tolist()
            rows = inputs.rows[bad].tolist() if inputs.rows is not None else bad
            raise ValueError(f"min-ce router: non-finite cached answer NLL in training rows {rows}: check those caches (kvkd cache verify)")
        best = (nll <= nll.min(-1, keepdim=True).values + self.tolerance).float()
        w = best / best.sum(-1, keepdim=True)
        self.stats = {"ties": float((best.sum(-1) > 1).float().mean())}
        return w
