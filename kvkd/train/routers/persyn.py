"""``persyn`` router: per sample, the teacher whose trace is both learnable and good.

In the spirit of PerSyn (Zhang et al., "Find Your Optimal Teacher: Personalized Data
Synthesis via Router-Guided Multi-Teacher Distillation", arXiv 2510.10925): each prompt goes
to the teacher that maximises a combined reward of *learnability* (how likely the student
finds that teacher's response) and *quality* (how good the response is). The rule here:

    L[n, k] = mean log-probability per token, under the student before training, of the
              trace teacher k read on row n, given the question (nats/token; computed once,
              :meth:`PerSynRouter.prepare_rows`)
    Q[n, k] = -(teacher k's cached NLL of row n's whole gold answer) (nats)
    r[n, k] = lam * z(L)[n, k] + (1 - lam) * z(Q)[n, k]

with ``z`` standardising each signal over all N x K training values (so nats/token and nats
of a whole answer combine on one scale). Weights: all on ``argmax_k r`` (ties split), as
PerSyn routes each prompt to one teacher; or ``softmax(r / temperature)`` with
``temperature > 0``.

What differs from the paper in kvkd's offline setting:

- PerSyn trains a router (a Bradley-Terry reward model over prompt-teacher pairs) so that it
  can route *before* generating; kvkd's teachers have already read their traces (the caches
  exist), so the reward is computed directly for every (row, teacher) and no router is trained.
- PerSyn scores quality with a reward model; here quality is the teacher's cached NLL of the
  gold answer after its trace (a confident teacher with a wrong trace scores badly).
- Learnability is the student's likelihood of the trace *text* the teacher read (rebuilt from
  the data file its cache records), not of a freshly generated response, and it is computed
  once with the untrained student (PerSyn's student is also fixed while routing).
"""

from __future__ import annotations

import torch

from kvkd.train.routers.base import ROUTERS, Router, RouterInputs
from kvkd.train.routers.learnability import teacher_traces, trace_stats


@ROUTERS.register("persyn")
class PerSynRouter(Router):
    """Learnability-and-quality routing (see the module docstring).

    Args:
        learnability_weight: lam in [0, 1]; 0 = quality only, 1 = learnability only.
        temperature: 0 = hard routing (argmax, ties split); > 0 = softmax(r / temperature).
    Raises:
        ValueError: lam outside [0, 1] or a negative temperature; at a step, rows not
            prepared (no ``prepare_rows``) or out of range.
    """

    needs_dataset_nll = True
    needs_training_rows = True

    def __init__(self, num_teachers: int, feature_dim: int, learnability_weight: float = 0.5, temperature: float = 0.0):
        super().__init__(num_teachers, feature_dim)
        if not 0.0 <= learnability_weight <= 1.0:
            raise ValueError(f"persyn router: learnability_weight must be in [0, 1], got {learnability_weight}")
        if temperature < 0:
            raise ValueError(f"persyn router: temperature must be >= 0, got {temperature}")
        self.lam, self.temperature = float(learnability_weight), float(temperature)
        # recomputed by prepare/prepare_rows on every (re)start, so not part of the checkpoint
        self.register_buffer("learnability", torch.zeros(0, num_teachers), persistent=False)  # (N, K) nats/token
        self.register_buffer("norms", torch.tensor([0.0, 1.0, 0.0, 1.0]), persistent=False)  # mean/std of L, then of Q

    @torch.no_grad()
    def prepare(self, teacher_nll: torch.Tensor) -> None:
        """Quality's mean and std over the training rows' (N, K) cached NLL (nats)."""
        q = -teacher_nll.float()
        self.norms[2], self.norms[3] = q.mean(), q.std().clamp(min=1e-6) if q.numel() > 1 else 1.0

    def prepare_rows(self, examples: list, student, metas: list[dict]) -> None:
        """The student's likelihood of every teacher's trace on every training row (once)."""
        questions = [ex.question for ex in examples]
        columns, seen = [], {}
        for meta in metas:
            traces = teacher_traces(examples, meta)
            key = tuple(traces)
            if key not in seen:  # teachers that read the same traces share one pass
                seen[key] = trace_stats(student, questions, traces)["loglik"]
            columns.append(seen[key])
        self.set_learnability(torch.stack(columns, 1))

    @torch.no_grad()
    def set_learnability(self, loglik: torch.Tensor) -> None:
        """Set L directly: (N, K) nats/token (tests, or a learnability computed elsewhere)."""
        loglik = loglik.float()
        if loglik.dim() != 2 or loglik.shape[1] != self.num_teachers:
            raise ValueError(f"persyn router: learnability must be (N, {self.num_teachers}), got {tuple(loglik.shape)}")
        self.learnability = loglik.clone()
        self.norms[0], self.norms[1] = loglik.mean(), loglik.std().clamp(min=1e-6) if loglik.numel() > 1 else 1.0

    def scores(self, inputs: RouterInputs) -> torch.Tensor:
        """(B, K) combined reward r of the module docstring."""
        if len(self.learnability) == 0:
            raise ValueError("persyn router: no learnability yet: the trainer calls prepare_rows before training (or call set_learnability)")
        rows = self.row_index(inputs).to(self.learnability.device)
        if int(rows.max()) >= len(self.learnability):
            raise ValueError(f"persyn router: learnability holds {len(self.learnability)} rows; row {int(rows.max())} asked")
        L = (self.learnability[rows] - self.norms[0]) / self.norms[1]
        Q = (-inputs.teacher_nll.detach().float().to(L.device) - self.norms[2]) / self.norms[3]
        return (self.lam * L + (1 - self.lam) * Q).to(inputs.losses.device)

    def forward(self, inputs: RouterInputs) -> torch.Tensor:
        r = self.scores(inputs)
        if self.temperature > 0:
            w = torch.softmax(r / self.temperature, -1)
        else:
            best = (r >= r.max(-1, keepdim=True).values - 1e-6).float()
            w = best / best.sum(-1, keepdim=True)
        self.stats = {"learnability": float(self.learnability[self.row_index(inputs).to(self.learnability.device)].mean())}
        return w
