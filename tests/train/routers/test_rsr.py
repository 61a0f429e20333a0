"""rsr (Rank-Surprisal Ratio): hand-computed routing on a given RSR table; refusals. The RSR
values themselves are checked against a direct computation in test_persyn.py (trace_stats)."""

import pytest
import torch

from kvkd.train.routers import RouterInputs, build_router


def _inp(rows, K=3):
    rows = torch.tensor(rows)
    B = len(rows)
    return RouterInputs(torch.zeros(B, 2), torch.zeros(B, K, 2), torch.zeros(B, K), torch.zeros(B, K), rows=rows)


def test_lowest_rsr_wins_ties_split():
    router = build_router("rsr", 3, 2)
    router.set_rsr(torch.tensor([[2.0, 1.0, 3.0], [0.5, 0.5, 0.9], [1.0, 1.1, 1.2]]))
    assert torch.equal(router(_inp([1, 0, 2])), torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    wide = build_router("rsr", 3, 2, {"tolerance": 0.15})
    wide.set_rsr(torch.tensor([[1.0, 1.1, 1.2]]))
    assert torch.allclose(wide(_inp([0])), torch.tensor([[0.5, 0.5, 0.0]]))


def test_refusals():
    with pytest.raises(ValueError, match="max_rank"):
        build_router("rsr", 2, 2, {"max_rank": 0})
    with pytest.raises(ValueError, match="no RSR yet"):
        build_router("rsr", 3, 2)(_inp([0]))
    router = build_router("rsr", 3, 2)
    router.set_rsr(torch.ones(2, 3))
    with pytest.raises(ValueError, match="row 5"):
        router(_inp([5]))
