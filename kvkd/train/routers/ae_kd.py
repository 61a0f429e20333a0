"""``ae-kd`` router: AE-KD's min-norm teacher weights in gradient space (Du et al., NeurIPS
2020, "Agree to Disagree: Adaptive Ensemble Knowledge Distillation in Gradient Space").

AE-KD treats distillation from K teachers as multi-objective optimisation and weights the
teachers by the min-norm point of the convex hull of their gradients with respect to the
student's output (MGDA), with a tolerance bound so that no teacher takes over:

    alpha = argmin_alpha || sum_k alpha_k g_k_hat ||^2  s.t.  sum_k alpha_k = 1,
            0 <= alpha_k <= C_max,  C_max = 1 / (K * nu)

where ``g_k_hat`` is teacher k's batch-mean gradient scaled to unit norm; then, as in the
authors' code (AnTuo1998/AE-KD, helper/optimization.py, which solves the same QP as a
one-class SVM dual with parameter nu, default 0.6), ``w_k ∝ alpha_k / ||g_k||``. One weight
vector per batch, as in the paper. ``nu`` is clipped to [1/K, 1] (``nu = 1/K`` is plain MGDA,
no bound; ``nu = 1`` forces uniform weights).

The QP is solved by projected gradient descent onto the capped simplex (K is small: at most
500 iterations in float64 on the host, exact projection by bisection), deterministic and
dependency-free.

Note the method's intent: the min-norm point favours teachers whose (normalised) gradients
are not already covered by others, and the ``1/||g||`` rescaling favours teachers the
student is already close to. A teacher that conflicts with the others is *not* dropped
(that is GOVERN's job); it is balanced.
"""

from __future__ import annotations

import numpy as np
import torch

from kvkd.train.routers.base import ROUTERS, Router, RouterInputs, _check_grad_space


def _project_capped_simplex(v: np.ndarray, cap: float) -> np.ndarray:
    """Euclidean projection of (K,) v onto {x : sum x = 1, 0 <= x <= cap} (bisection on the shift)."""
    lo, hi = float(v.min()) - 1.0, float(v.max())
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if np.clip(v - mid, 0, cap).sum() > 1:
            lo = mid
        else:
            hi = mid
    return np.clip(v - 0.5 * (lo + hi), 0, cap)


def min_norm_weights(grads: torch.Tensor, nu: float = 0.6, iters: int = 500, tol: float = 1e-12) -> torch.Tensor:
    """AE-KD weights for one batch.

    Args:
        grads: (K, P) per-teacher gradients (batch means), any float dtype.
        nu: tolerance parameter; the cap is 1 / (K * nu), nu clipped to [1/K, 1].
        iters: projected-gradient iterations at most (stops earlier once alpha moves < tol).
    Returns:
        (K,) float64 weights, non-negative, summing to 1.
    """
    K = grads.shape[0]
    g = grads.double()
    norms = g.norm(dim=-1).clamp(min=1e-12)  # (K,)
    if K == 1:
        return torch.ones(1, dtype=torch.float64)
    nu = min(max(nu, 1.0 / K), 1.0)
    cap = 1.0 / (K * nu)
    gh = g / norms[:, None]
    G = (gh @ gh.T).cpu().numpy()  # (K, K) Gram of unit gradients: the QP is tiny, solve it on the host
    step = 1.0 / max(float(np.linalg.eigvalsh(G).max()), 1e-12)
    alpha = np.full(K, 1.0 / K)
    for _ in range(iters):
        new = _project_capped_simplex(alpha - step * (G @ alpha), cap)
        done = np.abs(new - alpha).max() < tol
        alpha = new
        if done:
            break
    w = torch.from_numpy(alpha).to(norms.device) / norms
    return w / w.sum()


@ROUTERS.register("ae-kd")
class AEKDRouter(Router):
    """AE-KD min-norm router (see the module docstring).

    Args:
        nu: tolerance parameter of the bound C_max = 1/(K nu) (default 0.6, the authors').
        space: student outputs whose gradients count: ``kv``, ``hidden`` or ``both`` (default).
    """

    needs_grads = "activation"

    def __init__(self, num_teachers: int, feature_dim: int, nu: float = 0.6, space: str = "both"):
        super().__init__(num_teachers, feature_dim)
        if nu <= 0:
            raise ValueError(f"ae-kd router: nu must be > 0, got {nu}")
        self.nu = nu
        self.grad_space = _check_grad_space("ae-kd", space)

    def forward(self, inputs: RouterInputs) -> torch.Tensor:
        if inputs.grads is None:
            raise ValueError("ae-kd router: no gradients given (the trainer passes them when needs_grads is set)")
        B = inputs.losses.shape[0]
        w = min_norm_weights(inputs.grads.mean(0), self.nu).float()  # (K,)
        return w[None].expand(B, -1).clone()
