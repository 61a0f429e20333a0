"""``oracle`` router: per-row weights read from a truth file ("what if routing were perfect").

For ablations and for checking a router against a known right answer: the weights of row n
are the truth file's (``kvkd.train.routers.truth``): the row's ``weights`` if given, else
uniform over the teachers marked good on it. Not a method anyone could use without the
answer key: an upper reference next to ``fixed``, the floor.
"""

from __future__ import annotations

import torch

from kvkd.train.routers.base import ROUTERS, Router, RouterInputs
from kvkd.train.routers.truth import read_truth


@ROUTERS.register("oracle")
class OracleRouter(Router):
    """Weights of each training row from a truth file, indexed by ``RouterInputs.rows``.

    Args:
        truth: path of the truth file (``--router-option truth=PATH``), one row per training
            row in cache order, K entries per row.
    Raises:
        ValueError: no ``truth`` given, a bad file, or one for another number of teachers;
            at :meth:`prepare_rows`, a file whose row ids differ from the training rows'.
        FileNotFoundError: the file does not exist.
    """

    needs_training_rows = True

    def __init__(self, num_teachers: int, feature_dim: int, truth: str | None = None):
        super().__init__(num_teachers, feature_dim)
        if not truth:
            raise ValueError("router 'oracle' needs its truth file: --router-option truth=PATH (format kvkd-router-truth/1)")
        self.truth_path = str(truth)
        self.truth = read_truth(truth)
        if self.truth.good.shape[1] != num_teachers:
            raise ValueError(f"truth file {truth} has {self.truth.good.shape[1]} teachers per row, the run {num_teachers} caches")
        # read from the file again on every load, so not part of the checkpoint
        self.register_buffer("row_weights", self.truth.weights.clone(), persistent=False)  # (N, K)

    def prepare_rows(self, examples: list, student, metas: list[dict]) -> None:
        """Check that the file lists exactly the training rows, in cache order (ids compared)."""
        ids = [ex.id for ex in examples]
        if ids != self.truth.ids:
            first = next((i for i, (a, b) in enumerate(zip(ids, self.truth.ids)) if a != b), min(len(ids), len(self.truth.ids)))
            raise ValueError(
                f"truth file {self.truth_path} lists {len(self.truth.ids)} rows, the training data {len(ids)}; "
                f"first difference at row {first}: write the truth for exactly the cached rows, in cache order"
            )

    def forward(self, inputs: RouterInputs) -> torch.Tensor:
        rows = self.row_index(inputs).to(self.row_weights.device)
        if int(rows.max()) >= len(self.row_weights):
            raise ValueError(f"truth file {self.truth_path} has {len(self.row_weights)} rows; row {int(rows.max())} asked")
        return self.row_weights[rows].to(inputs.losses.device).clone()  # (B, K)
