"""``rsr`` router: per sample, the teacher whose trace has the lowest Rank-Surprisal Ratio.

Yang et al., "Which Reasoning Trajectories Teach Students to Reason Better? A Simple Metric of
Informative Alignment", arXiv 2601.14249 (2026): a trajectory suits a student when its tokens
are informative (high surprisal -log p under the student) yet aligned (high-ranked among the
student's choices); RSR = mean token rank / mean surprisal, lower is better, and the paper
uses it to pick one trajectory per problem among teachers'. Here the trajectories are the
traces the teachers read (rebuilt from the caches' recorded data), scored once before
training with the untrained student (``kvkd.train.routers.learnability.trace_stats``), and
the weight of a sample goes to its lowest-RSR teacher (ties split). The paper's refinements
(surprisal-weighted averaging, its rank clipping value) are not reproduced: ranks are clipped
at ``max_rank`` and averaged plainly. RSR ignores whether the trace is *right*: it measures
suitability, not correctness.
"""

from __future__ import annotations

import torch

from kvkd.train.routers.base import ROUTERS, Router, RouterInputs
from kvkd.train.routers.learnability import teacher_traces, trace_stats


@ROUTERS.register("rsr")
class RSRRouter(Router):
    """w[b, k] = 1/|T_b| for k in T_b = argmin_k RSR[row_b, k] (within ``tolerance``), else 0.

    Args:
        max_rank: clip of each token's rank before averaging (>= 1).
        tolerance: RSR units; teachers within it of the lowest share the weight.
    Raises:
        ValueError: max_rank < 1 or a negative tolerance; at a step, no RSR prepared or a
            row out of range.
    """

    needs_training_rows = True

    def __init__(self, num_teachers: int, feature_dim: int, max_rank: int = 100, tolerance: float = 0.0):
        super().__init__(num_teachers, feature_dim)
        if max_rank < 1 or tolerance < 0:
            raise ValueError(f"rsr router: max_rank must be >= 1 and tolerance >= 0, got {max_rank} and {tolerance}")
        self.max_rank, self.tolerance = int(max_rank), float(tolerance)
        self.register_buffer("rsr", torch.zeros(0, num_teachers), persistent=False)  # (N, K), recomputed on every (re)start

    def prepare_rows(self, examples: list, student, metas: list[dict]) -> None:
        """RSR of every teacher's trace on every training row, with the untrained student."""
        questions, columns, seen = [ex.question for ex in examples], [], {}
        for meta in metas:
            traces = tuple(teacher_traces(examples, meta))
            if traces not in seen:
                seen[traces] = trace_stats(student, questions, list(traces), max_rank=self.max_rank)["rsr"]
            columns.append(seen[traces])
        self.set_rsr(torch.stack(columns, 1))

    @torch.no_grad()
    def set_rsr(self, rsr: torch.Tensor) -> None:
        """Set the (N, K) RSR table directly (tests, or scores computed elsewhere)."""
        if rsr.dim() != 2 or rsr.shape[1] != self.num_teachers:
            raise ValueError(f"rsr router: RSR must be (N, {self.num_teachers}), got {tuple(rsr.shape)}")
        self.rsr = rsr.float().clone()

    def forward(self, inputs: RouterInputs) -> torch.Tensor:
        if len(self.rsr) == 0:
            raise ValueError("rsr router: no RSR yet: the trainer calls prepare_rows before training (or call set_rsr)")
        rows = self.row_index(inputs).to(self.rsr.device)
        if int(rows.max()) >= len(self.rsr):
            raise ValueError(f"rsr router: RSR holds {len(self.rsr)} rows; row {int(rows.max())} asked")
        r = self.rsr[rows]  # (B, K)
        best = (r <= r.min(-1, keepdim=True).values + self.tolerance).float()
        self.stats = {"rsr": float(r.mean())}
        return (best / best.sum(-1, keepdim=True)).to(inputs.losses.device)
