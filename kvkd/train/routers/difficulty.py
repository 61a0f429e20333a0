"""``difficulty`` router: the plan's sample-wise difficulty router.

This follows the project plan, **not a verified paper**: the plan cites "Multi-Teacher KD
with Adaptive Routing, NeurIPS 2023", which could not be found (docs/design.md, section 1).

- A difficulty estimator (LayerNorm -> Linear -> GELU -> Linear) maps the student's boundary
  hidden state ``s_b`` (B, d) to a distribution over ``bins`` difficulty levels,
  ``p_b = softmax(f(s_b))`` (B, bins).
- A teacher capability matrix ``C`` (bins, K) says how good each teacher is at each level.
  ``w_b = softmax_k(p_b @ C / T)``.
- Difficulty labels: a sample's difficulty is the teachers' mean cached NLL of its gold
  answer; the bin edges are that quantity's quantiles over the training rows
  (:meth:`DifficultyRouter.prepare`). The estimator learns to predict the bin from the
  student's state by cross-entropy (an auxiliary loss, weight ``estimator_weight``), so at
  evaluation/inference time it needs no teacher.
- ``C`` is initialised from the caches (``init="nll"``, the default): ``C[b, k] = -(mean NLL
  of teacher k on the training rows of bin b)``, i.e. teachers with lower NLL on a level get
  more weight there; or uniform (``init="zeros"``). With ``learnable_capability`` (default
  True) ``C`` is a parameter trained by the weighted distillation loss; an entropy bonus
  (``entropy_weight``) keeps it from collapsing onto the teacher with the smallest loss.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kvkd.train.routers.base import ROUTERS, Router, RouterInputs


@ROUTERS.register("difficulty")
class DifficultyRouter(Router):
    """Difficulty estimator x teacher capability matrix (see the module docstring).

    Args:
        bins: number of difficulty levels (>= 1).
        hidden: width of the estimator's hidden layer.
        temperature: T > 0 of the softmax over teachers.
        init: ``nll`` (capabilities from the cached NLL per bin) or ``zeros``.
        learnable_capability: train C with the student.
        estimator_weight: weight of the estimator's cross-entropy in the training loss.
        entropy_weight: weight of the entropy bonus on the teacher weights.
    """

    needs_dataset_nll = True

    def __init__(
        self,
        num_teachers: int,
        feature_dim: int,
        bins: int = 3,
        hidden: int = 64,
        temperature: float = 1.0,
        init: str = "nll",
        learnable_capability: bool = True,
        estimator_weight: float = 0.1,
        entropy_weight: float = 0.01,
    ):
        super().__init__(num_teachers, feature_dim)
        if bins < 1:
            raise ValueError(f"difficulty router: bins must be >= 1, got {bins}")
        if temperature <= 0:
            raise ValueError(f"difficulty router: temperature must be > 0, got {temperature}")
        if init not in ("nll", "zeros"):
            raise ValueError(f"difficulty router: init must be 'nll' or 'zeros', got {init!r}")
        if estimator_weight < 0 or entropy_weight < 0:
            raise ValueError("difficulty router: estimator_weight and entropy_weight must be >= 0")
        self.bins, self.temperature, self.init = bins, temperature, init
        self.estimator_weight, self.entropy_weight = estimator_weight, entropy_weight
        self.estimator = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, bins))
        self.capability = nn.Parameter(torch.zeros(bins, num_teachers), requires_grad=learnable_capability)
        self.register_buffer("edges", torch.zeros(max(bins - 1, 0)))  # difficulty bin edges (nats per answer)
        self._logits: torch.Tensor | None = None

    def difficulty_bin(self, teacher_nll: torch.Tensor) -> torch.Tensor:
        """(B, K) cached teacher NLL -> (B,) int64 difficulty bin of each sample."""
        return torch.bucketize(teacher_nll.float().mean(-1), self.edges)

    @torch.no_grad()
    def prepare(self, teacher_nll: torch.Tensor) -> None:
        """Set the bin edges from the training rows' (N, K) cached NLL, and C when ``init="nll"``."""
        d = teacher_nll.float().mean(-1)  # (N,)
        if self.bins > 1:
            self.edges.copy_(torch.quantile(d, torch.linspace(0, 1, self.bins + 1)[1:-1]))
        if self.init == "nll":
            b = self.difficulty_bin(teacher_nll)
            for level in range(self.bins):
                rows = teacher_nll[b == level].float()
                if len(rows):
                    self.capability[level] = -rows.mean(0)
            # C only matters up to a per-level shift; centre it so it starts near zero
            self.capability -= self.capability.mean(-1, keepdim=True)

    def forward(self, inputs: RouterInputs) -> torch.Tensor:
        self._logits = self.estimator(inputs.student_features.float())  # (B, bins)
        p = torch.softmax(self._logits, -1)
        w = torch.softmax(p @ self.capability / self.temperature, dim=-1)  # (B, K)
        self.stats = {"difficulty": float((p.detach() * torch.arange(self.bins, device=p.device)).sum(-1).mean())}
        return w

    def aux_loss(self, weights: torch.Tensor, inputs: RouterInputs) -> torch.Tensor | None:
        terms = []
        if self.estimator_weight > 0 and self._logits is not None:
            target = self.difficulty_bin(inputs.teacher_nll)
            terms.append(self.estimator_weight * F.cross_entropy(self._logits, target))
        if self.entropy_weight > 0 and self.capability.requires_grad:
            entropy = -(weights * weights.clamp(min=1e-12).log()).sum(-1).mean()
            terms.append(-self.entropy_weight * entropy)
        return sum(terms) if terms else None
