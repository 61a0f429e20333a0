"""``learnable`` router: an MLP over the student's features -> softmax teacher weights,
trained with the student by the weighted distillation loss.

Minimising ``sum_k w_k L_k`` alone drives the weights onto the teacher with the smallest
loss; an entropy bonus (``entropy_weight``, default 0.01, added as ``-H(w)``) keeps the
router from collapsing early. The MLP's last layer starts at zero, so training starts from
uniform weights.
"""

from __future__ import annotations

import torch
from torch import nn

from kvkd.train.routers.base import ROUTERS, Router, RouterInputs


@ROUTERS.register("learnable")
class LearnableRouter(Router):
    """MLP router: (B, d) student features -> (B, K) weights.

    Args:
        hidden: width of the MLP's hidden layer.
        entropy_weight: weight of the entropy bonus in the training loss (>= 0).
    """

    def __init__(self, num_teachers: int, feature_dim: int, hidden: int = 64, entropy_weight: float = 0.01):
        super().__init__(num_teachers, feature_dim)
        if entropy_weight < 0:
            raise ValueError(f"learnable router: entropy_weight must be >= 0, got {entropy_weight}")
        self.entropy_weight = entropy_weight
        self.norm = nn.LayerNorm(feature_dim)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, num_teachers))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, inputs: RouterInputs) -> torch.Tensor:
        logits = self.mlp(self.norm(inputs.student_features.float()))  # (B, K)
        return torch.softmax(logits, dim=-1)

    def aux_loss(self, weights: torch.Tensor, inputs: RouterInputs) -> torch.Tensor | None:
        if self.entropy_weight == 0:
            return None
        entropy = -(weights * weights.clamp(min=1e-12).log()).sum(-1).mean()
        return -self.entropy_weight * entropy
