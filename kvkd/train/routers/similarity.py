"""``similarity`` router: per sample, softmax over the cosine similarity of the student's
features with each teacher's (teachers closer to the student get more weight).

``w[b, k] = softmax_k(cos(s_b, t_{b,k}) / tau)`` with s the student's and t the teachers'
last-layer hidden states at the answer boundary, in the student's space (detached).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kvkd.train.routers.base import ROUTERS, Router, RouterInputs


@ROUTERS.register("similarity")
class SimilarityRouter(Router):
    """Cosine-similarity router.

    Args:
        temperature: tau > 0; lower is sharper. Default 0.1.
    """

    def __init__(self, num_teachers: int, feature_dim: int, temperature: float = 0.1):
        super().__init__(num_teachers, feature_dim)
        if temperature <= 0:
            raise ValueError(f"similarity router: temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, inputs: RouterInputs) -> torch.Tensor:
        s = inputs.student_features.float()[:, None, :]  # (B, 1, d)
        t = inputs.teacher_features.float()  # (B, K, d)
        cos = F.cosine_similarity(s, t, dim=-1)  # (B, K)
        return torch.softmax(cos / self.temperature, dim=-1)
