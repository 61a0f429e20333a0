"""KaVa eviction score and slot selection against hand-computed values."""

import math

import pytest
import torch

from kvkd.pipeline.compress import gather_slots, select_slots, uniqueness


def _keys(rows):
    return torch.tensor(rows, dtype=torch.float32)[None, None, None]  # (1, 1, 1, T, D)


def test_uniqueness_hand_computed():
    # k0 = k1 (identical), k2 orthogonal to both.
    keys = _keys([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    r = uniqueness(keys, mask)[0, 0, 0]
    # mean cosine to the others: k0: (1 + 0)/2 = .5, k1: .5, k2: 0 -> softmax(-.5, -.5, 0)
    e = [math.exp(-0.5), math.exp(-0.5), 1.0]
    expected = torch.tensor([x / sum(e) for x in e])
    assert torch.allclose(r, expected, atol=1e-6)


def test_uniqueness_ignores_padding():
    keys = _keys([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    mask = torch.tensor([[True, True, False]])
    r = uniqueness(keys, mask)[0, 0, 0]
    assert r[2] == 0
    assert torch.allclose(r[:2], torch.tensor([0.5, 0.5]))


def test_select_slots_score_and_order():
    keys = _keys([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    importance = torch.tensor([0.1, 0.6, 0.1, 0.2])[None, None, None]
    lam = 0.5
    sel = select_slots(keys, importance, mask, budget=2, lam=lam)
    r = uniqueness(keys, mask)[0, 0, 0]
    score = lam * importance[0, 0, 0] + (1 - lam) * r
    top = sorted(score.topk(2).indices.tolist())
    assert sel.index[0, 0, 0].tolist() == top  # kept in original order
    assert sel.valid.all()
    assert torch.allclose(sel.score[0, 0, 0], score[top])
    assert torch.allclose(sel.importance[0, 0, 0], importance[0, 0, 0, top])
    # by hand: r = softmax(-[.5, .5+.707/3.., ...]); token 1 has highest importance and must be kept
    assert 1 in top


def test_lambda_one_is_pure_importance():
    keys = torch.randn(2, 3, 2, 7, 4)
    mask = torch.ones(2, 7, dtype=torch.bool)
    imp = torch.softmax(torch.randn(2, 3, 2, 7), -1)
    sel = select_slots(keys, imp, mask, budget=3, lam=1.0)
    expected = imp.topk(3, -1).indices.sort(-1).values
    assert torch.equal(sel.index, expected)


def test_short_cot_leaves_empty_slots_last():
    keys = torch.randn(2, 1, 1, 5, 4)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    imp = torch.full((2, 1, 1, 5), 0.2)
    sel = select_slots(keys, imp, mask, budget=4)
    assert sel.valid[0, 0, 0].tolist() == [True, True, False, False]
    assert sel.index[0, 0, 0, :2].tolist() == [0, 1]
    assert sel.valid[1].all()
    out = gather_slots(keys, sel)
    assert out.shape == (2, 1, 1, 4, 4)
    assert torch.equal(out[0, 0, 0, :2], keys[0, 0, 0, :2])
    assert torch.all(out[0, 0, 0, 2:] == 0)


def test_budget_larger_than_tokens():
    keys = torch.randn(1, 1, 1, 2, 4)
    sel = select_slots(keys, torch.full((1, 1, 1, 2), 0.5), torch.ones(1, 2, dtype=torch.bool), budget=5)
    assert sel.valid[0, 0, 0].tolist() == [True, True, False, False, False]
    assert gather_slots(keys, sel).shape == (1, 1, 1, 5, 4)


def test_select_slots_per_head_independent():
    keys = torch.randn(1, 2, 3, 9, 8)
    imp = torch.softmax(torch.randn(1, 2, 3, 9), -1)
    mask = torch.ones(1, 9, dtype=torch.bool)
    sel = select_slots(keys, imp, mask, budget=4)
    for layer in range(2):
        for head in range(3):
            one = select_slots(keys[:, layer : layer + 1, head : head + 1], imp[:, layer : layer + 1, head : head + 1], mask, budget=4)
            assert torch.equal(one.index[0, 0, 0], sel.index[0, layer, head])


@pytest.mark.parametrize("bad", [dict(budget=0), dict(budget=2, lam=1.5)])
def test_select_slots_rejects_bad_options(bad):
    with pytest.raises(ValueError):
        select_slots(torch.randn(1, 1, 1, 3, 2), torch.rand(1, 1, 1, 3), torch.ones(1, 3, dtype=torch.bool), **bad)
