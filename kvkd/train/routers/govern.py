"""``govern`` router: GOVERN's gradient-orientation majority vote (Zhou et al., EMNLP 2024
Industry Track, "GOVERN: Gradient Orientation Vote Ensemble for Multi-Teacher Reinforced
Distillation").

GOVERN looks, per sample, at the orientation of each teacher's distillation gradient with
respect to the student's *output*; the teachers vote, the majority orientation wins, and the
minority teachers are dropped for that sample (the rest are averaged with equal weight). The
paper's output is one score per sample, so an orientation is a sign. Our outputs are vectors
(the student's KV entries at the latent positions and its boundary hidden states), so the vote
is taken per output element and then per teacher:

1. ``s[b, k, e] = sign(g[b, k, e])``: the orientation teacher k asks of element e.
2. ``maj[b, e] = sign(sum_k s[b, k, e])``: the majority orientation of element e.
3. Contested elements: those where some teachers ask for + and some for -, and the majority
   is not a tie (``maj != 0``). Unanimous elements say nothing about who is in the minority,
   tied ones have no majority. A zero gradient is an abstention, not a vote (an empty slot of
   one teacher, for instance): it neither contests an element nor counts against a teacher.
4. ``agree[b, k]`` = share of the contested elements teacher k votes on where it follows the
   majority.
   Teacher k is in the majority for sample b when ``agree[b, k] >= threshold`` (0.5: it sides
   with the majority on at least half of the contested elements).
5. ``w[b] = kept[b] / sum(kept[b])``.

Ties and degenerate cases, by design: a sample with no contested element (all teachers agree
everywhere, a single teacher, or two teachers that disagree element by element so that every
contested element is a tie) keeps every teacher (uniform weights); if no teacher reaches the
threshold (possible with K >= 4 and fragmented votes), every teacher is kept too. With K = 2
the vote can never drop a teacher: two opposite orientations are a tie.

Cost: activation-space gradients only (no extra backward pass through the student).
"""

from __future__ import annotations

import torch

from kvkd.train.routers.base import ROUTERS, Router, RouterInputs, _check_grad_space


def govern_weights(grads: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority-vote weights from per-teacher gradients.

    Args:
        grads: (B, K, P) float gradients of each teacher's loss w.r.t. the student's outputs.
            A zero entry is an abstention (e.g. a slot that is empty for that teacher).
        threshold: share of the contested elements it votes on that a teacher must side with
            the majority on.
    Returns:
        weights (B, K) float32 (uniform over the kept teachers), agreement (B, K) float32 in
        [0, 1] (1 where a teacher votes on no contested element).
    """
    s = torch.sign(grads.float())  # (B, K, P)
    pos, neg = (s > 0).sum(1), (s < 0).sum(1)  # (B, P) votes each way
    maj = torch.sign(pos - neg).float()  # (B, P); 0 = tie
    contested = (pos > 0) & (neg > 0) & (maj != 0)  # (B, P)
    voted = (s != 0) & contested[:, None]  # (B, K, P)
    n = voted.sum(-1).float()  # (B, K)
    follow = ((s == maj[:, None]) & voted).sum(-1).float()  # (B, K)
    agree = torch.where(n > 0, follow / n.clamp(min=1), torch.ones_like(follow))
    kept = (agree >= threshold).float()
    kept = torch.where(kept.sum(-1, keepdim=True) > 0, kept, torch.ones_like(kept))
    return kept / kept.sum(-1, keepdim=True), agree


@ROUTERS.register("govern")
class GovernRouter(Router):
    """GOVERN majority vote on gradient orientations (see the module docstring).

    Args:
        threshold: in (0, 1]; default 0.5.
        space: which student outputs vote: ``kv``, ``hidden`` or ``both`` (default).
    """

    needs_grads = "activation"

    def __init__(self, num_teachers: int, feature_dim: int, threshold: float = 0.5, space: str = "both"):
        super().__init__(num_teachers, feature_dim)
        if not 0 < threshold <= 1:
            raise ValueError(f"govern router: threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.grad_space = _check_grad_space("govern", space)

    def forward(self, inputs: RouterInputs) -> torch.Tensor:
        if inputs.grads is None:
            raise ValueError("govern router: no gradients given (the trainer passes them when needs_grads is set)")
        w, agree = govern_weights(inputs.grads, self.threshold)
        self.stats = {"dropped": float((w == 0).float().sum(-1).mean()), "agreement_min": float(agree.min())}
        return w
