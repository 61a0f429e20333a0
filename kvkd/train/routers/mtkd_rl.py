"""``mtkd-rl`` router: teacher weights from a policy trained by reinforcement learning
(Yang et al., AAAI 2025, "Multi-Teacher Knowledge Distillation with Reinforcement Learning").

- State, per sample b and teacher k (3 numbers): the cosine similarity of the student's and
  the teacher's boundary features, ``log1p`` of the teacher's distillation loss on the sample
  (the student-teacher divergence), and ``log1p`` of the teacher's cached gold-answer NLL (its
  CE).
- Policy: a small MLP (shared over teachers) scores each (b, k); ``pi_b = softmax_k(score)``.
  The distillation weights are ``pi_b`` (detached: the student's loss does not train the
  policy). The last layer starts at zero, so the policy starts uniform.
- Action and reward: per sample an action (a teacher) ``a_b ~ pi_b`` is drawn; the reward is
  minus the student's loss under that action, ``r_b = -(CE_b + L_distill[b, a_b])``,
  normalised in the batch (``(r - mean) / std``).
- Update (REINFORCE): every step the policy gradient of ``-mean_b r_b log pi_b(a_b)`` is
  accumulated; every ``update_every`` steps the policy takes one Adam step (its own
  optimiser, learning rate ``lr``) on the accumulated mean. The policy, the accumulator and
  Adam's moments are buffers/parameters of this module, so checkpoints hold them all.
- Warm-up: for the first ``warmup_steps`` steps the weights are uniform (the policy already
  collects experience and learns).
Batches of one sample give no normalised reward and no update.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kvkd.train.routers.base import ROUTERS, Router, RouterInputs


def policy_state(inputs: RouterInputs) -> torch.Tensor:
    """(B, K, 3) float32 state: [cos(s, t_k), log1p(L_k), log1p(CE_k)] (losses detached)."""
    cos = F.cosine_similarity(inputs.student_features.float()[:, None, :], inputs.teacher_features.float(), dim=-1)
    loss = inputs.losses.detach().float().clamp(min=0).log1p()
    nll = inputs.teacher_nll.float().clamp(min=0).log1p()
    return torch.stack([cos, loss, nll], -1)


@ROUTERS.register("mtkd-rl")
class MTKDRLRouter(Router):
    """REINFORCE-trained teacher-weighting policy (see the module docstring).

    Args:
        hidden: policy MLP width.
        lr: the policy's Adam learning rate.
        update_every: steps between policy updates (N >= 1).
        warmup_steps: steps of uniform weights at the start.
        seed: seed of the action sampling (with the step, so a resumed run draws the same actions).
    """

    trains_itself = True
    BETAS = (0.9, 0.999)

    def __init__(self, num_teachers: int, feature_dim: int, hidden: int = 32, lr: float = 1e-2, update_every: int = 4, warmup_steps: int = 10, seed: int = 0):
        super().__init__(num_teachers, feature_dim)
        if update_every < 1 or warmup_steps < 0 or lr <= 0:
            raise ValueError(f"mtkd-rl router: need update_every >= 1, warmup_steps >= 0, lr > 0 (got {update_every}, {warmup_steps}, {lr})")
        self.lr, self.update_every, self.warmup_steps, self.seed = lr, update_every, warmup_steps, seed
        self.policy = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.policy[-1].weight)
        nn.init.zeros_(self.policy[-1].bias)
        for i, p in enumerate(self.policy.parameters()):
            self.register_buffer(f"grad_acc_{i}", torch.zeros_like(p))
            self.register_buffer(f"adam_m_{i}", torch.zeros_like(p))
            self.register_buffer(f"adam_v_{i}", torch.zeros_like(p))
        self.register_buffer("acc_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def probabilities(self, inputs: RouterInputs) -> torch.Tensor:
        """(B, K) policy probabilities (with the policy's graph)."""
        return torch.softmax(self.policy(policy_state(inputs)).squeeze(-1), dim=-1)

    def forward(self, inputs: RouterInputs) -> torch.Tensor:
        with torch.enable_grad():
            pi = self.probabilities(inputs)
            if self.training:
                self._reinforce(pi, inputs)
        pi = pi.detach()
        if inputs.step < self.warmup_steps:
            return self.uniform(pi.shape[0], pi.device)
        return pi

    def _reinforce(self, pi: torch.Tensor, inputs: RouterInputs) -> None:
        B = pi.shape[0]
        if B < 2 or inputs.student_ce is None:
            return
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + inputs.step)
        actions = torch.multinomial(pi.detach().cpu(), 1, generator=gen).squeeze(1).to(pi.device)  # (B,)
        b = torch.arange(B, device=pi.device)
        reward = -(inputs.student_ce.float() + inputs.losses.detach().float()[b, actions])
        adv = (reward - reward.mean()) / reward.std().clamp(min=1e-8)
        surrogate = -(adv * pi[b, actions].clamp(min=1e-12).log()).mean()
        grads = torch.autograd.grad(surrogate, list(self.policy.parameters()))
        with torch.no_grad():
            for i, g in enumerate(grads):
                getattr(self, f"grad_acc_{i}").add_(g)
            self.acc_steps += 1
            self.stats = {"reward_mean": float(reward.mean()), "policy_updates": float(self.updates)}
            if int(self.acc_steps) >= self.update_every:
                self._adam_step()

    @torch.no_grad()
    def _adam_step(self) -> None:
        self.updates += 1
        t = float(self.updates)
        b1, b2 = self.BETAS
        for i, p in enumerate(self.policy.parameters()):
            g = getattr(self, f"grad_acc_{i}") / float(self.acc_steps)
            m, v = getattr(self, f"adam_m_{i}"), getattr(self, f"adam_v_{i}")
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.sub_(self.lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + 1e-8))
            getattr(self, f"grad_acc_{i}").zero_()
        self.acc_steps.zero_()
