"""min-ce (FuseLLM MinCE): hand-computed weights, ties, tolerance, refusals."""

import pytest
import torch

from kvkd.train.routers import RouterInputs, build_router


def _inp(nll, rows=None):
    nll = torch.tensor(nll)
    B, K = nll.shape
    return RouterInputs(torch.zeros(B, 2), torch.zeros(B, K, 2), torch.zeros(B, K), nll, rows=rows)


def test_all_weight_on_the_lowest_nll_and_ties_split():
    router = build_router("min-ce", 3, 2)
    w = router(_inp([[3.0, 1.0, 2.0], [0.5, 0.5, 4.0], [2.0, 2.0, 2.0]]))
    assert torch.equal(w, torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    assert router.stats["ties"] == pytest.approx(2 / 3)


def test_tolerance_widens_the_tie():
    w = build_router("min-ce", 2, 2, {"tolerance": 0.25})(_inp([[1.0, 1.2], [1.0, 1.3]]))
    assert torch.allclose(w, torch.tensor([[0.5, 0.5], [1.0, 0.0]]))


def test_refuses_negative_tolerance_and_non_finite_nll():
    with pytest.raises(ValueError, match="tolerance"):
        build_router("min-ce", 2, 2, {"tolerance": -1})
    with pytest.raises(ValueError, match=r"training rows \[7\]"):
        build_router("min-ce", 2, 2)(_inp([[1.0, 2.0], [float("nan"), 1.0]], rows=torch.tensor([3, 7])))
