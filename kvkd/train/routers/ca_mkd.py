"""``ca-mkd`` router: confidence-aware teacher weights (Zhang et al., ICASSP 2022,
"Confidence-Aware Multi-Teacher Knowledge Distillation").

Per sample, ``w_k = (1 - softmax_k(CE_k)) / (K - 1)`` with ``CE_k`` teacher k's loss on the
ground truth. Here ``CE_k`` is the teacher's NLL of the whole gold answer from its cache
(nats; the per-token mean times the answer's token count, so teachers with different
tokenizers compare), so a teacher that would have answered the sample badly gets less weight. With a
single teacher the weight is 1.
"""

from __future__ import annotations

import torch

from kvkd.train.routers.base import ROUTERS, Router, RouterInputs


def ca_mkd_weights(teacher_ce: torch.Tensor) -> torch.Tensor:
    """(B, K) teacher CE -> (B, K) float32 weights ``(1 - softmax_k(CE)) / (K - 1)``."""
    K = teacher_ce.shape[-1]
    if K == 1:
        return torch.ones_like(teacher_ce, dtype=torch.float32)
    return (1 - torch.softmax(teacher_ce.float(), dim=-1)) / (K - 1)


@ROUTERS.register("ca-mkd")
class CAMKDRouter(Router):
    """CA-MKD router: weights from the cached teacher answer NLL (no options)."""

    def forward(self, inputs: RouterInputs) -> torch.Tensor:
        return ca_mkd_weights(inputs.teacher_nll)
