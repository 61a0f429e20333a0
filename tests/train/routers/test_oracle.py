"""oracle: weights read back from a truth file, per training row; bad files refused."""

import json
from types import SimpleNamespace

import pytest
import torch

from kvkd.train.routers import RouterInputs, build_router
from kvkd.train.routers.truth import read_truth, routing_accuracy, write_truth


def _inp(rows, K):
    B = len(rows)
    return RouterInputs(torch.zeros(B, 2), torch.zeros(B, K, 2), torch.zeros(B, K), torch.zeros(B, K), rows=torch.tensor(rows))


def _truth(tmp_path, good, ids=None):
    ids = ids or [f"r{i}" for i in range(len(good))]
    return str(write_truth(tmp_path / "truth.json", ids, good, [f"t{k}" for k in range(len(good[0]))], "test"))


def test_weights_are_the_truth_per_row_and_score_one(tmp_path):
    good = [[True, False, False], [True, True, False], [False, False, True], [False, False, False]]
    router = build_router("oracle", 3, 2, {"truth": _truth(tmp_path, good)})
    router.prepare_rows([SimpleNamespace(id=f"r{i}") for i in range(4)], None, [])
    w = router(_inp([2, 0, 1, 3], 3))
    assert torch.allclose(w, torch.tensor([[0, 0, 1.0], [1.0, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]]))
    acc = routing_accuracy(w, torch.tensor(good)[[2, 0, 1, 3]])
    assert torch.equal(acc[:3], torch.ones(3)) and torch.isnan(acc[3])  # no good teacher: undefined


def test_explicit_row_weights_win_over_good(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": "kvkd-router-truth/1", "teachers": ["a", "b"],
                                "rows": [{"id": "x", "good": [True, False], "weights": [3, 1]}]}))
    assert torch.allclose(read_truth(path).weights, torch.tensor([[0.75, 0.25]]))


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="truth=PATH"):
        build_router("oracle", 2, 2)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_router("oracle", 2, 2, {"truth": str(tmp_path / "missing.json")})
    with pytest.raises(ValueError, match="2 teachers per row, the run 3 caches"):
        build_router("oracle", 3, 2, {"truth": _truth(tmp_path, [[True, False]])})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "kvkd-router-truth/1", "teachers": ["a", "b"], "rows": [{"id": "x", "good": [1, 0]}]}))
    with pytest.raises(ValueError, match="row 0.*2 booleans"):
        read_truth(bad)
    router = build_router("oracle", 2, 2, {"truth": _truth(tmp_path, [[True, False], [False, True]])})
    with pytest.raises(ValueError, match="first difference at row 1"):
        router.prepare_rows([SimpleNamespace(id="r0"), SimpleNamespace(id="zz")], None, [])
    with pytest.raises(ValueError, match="RouterInputs.rows"):
        router(RouterInputs(torch.zeros(1, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2), torch.zeros(1, 2)))


def test_fixed_scores_the_share_of_good_teachers():
    good = torch.tensor([[True, False, False], [True, True, False], [True, True, True]])
    w = build_router("fixed", 3, 2)(_inp([0, 1, 2], 3))
    assert torch.allclose(routing_accuracy(w, good), torch.tensor([1 / 3, 2 / 3, 1.0]))
