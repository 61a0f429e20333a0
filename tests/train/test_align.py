"""Teacher -> student alignment: layer maps (hand-computed), projections that keep the
targets' geometry (no collapse, unlike a plain linear map), gradients, state round trips."""

import pytest
import torch
from torch import nn

from kvkd.train.align import Shape, TargetProjection, TeacherAligner, layer_map, layer_maps_per_teacher, parse_layer_map, principal_basis
from kvkd.train.losses import codi_loss


def test_layer_maps_by_hand():
    assert layer_map(6, 4) == [1, 2, 3, 5]  # round(1.5)=2, round(3)=3, round(4.5)=4, round(6)=6, minus 1
    assert layer_map(2, 4) == [0, 0, 1, 1]
    assert layer_map(4, 4) == [0, 1, 2, 3]
    assert layer_map(6, 4, "last") == [2, 3, 4, 5]
    assert layer_map(6, 4, [0, 0, 5, 5]) == [0, 0, 5, 5]
    assert layer_map(6, 4, explicit=[1, 2, 3, 4]) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="at least as many layers.*proportional"):
        layer_map(2, 4, "last")
    with pytest.raises(ValueError, match="4 teacher layers"):
        layer_map(6, 4, [0, 1, 2])
    with pytest.raises(ValueError, match=r"bad entries \[6\]"):
        layer_map(6, 4, [0, 1, 2, 6])
    with pytest.raises(ValueError, match="unknown layer map"):
        layer_map(6, 4, "first")


def test_layer_map_options():
    assert parse_layer_map("last") == "last"
    assert parse_layer_map("0, 2,4") == [0, 2, 4]
    assert parse_layer_map("[1, 3]") == [1, 3]
    with pytest.raises(ValueError, match="--layer-map"):
        parse_layer_map("deepest")
    assert layer_maps_per_teacher("last", 3) == ["last"] * 3
    assert layer_maps_per_teacher([0, 1], 3) == [[0, 1]] * 3  # one explicit map for every teacher
    assert layer_maps_per_teacher(["last", [0, 1], "0,1"], 3) == ["last", [0, 1], [0, 1]]
    with pytest.raises(ValueError, match="one per teacher"):
        layer_maps_per_teacher(["last", "proportional"], 3)


def test_principal_basis_finds_the_high_variance_directions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) * torch.tensor([0.01, 3.0, 0.01, 2.0, 0.01, 0.01]) + 5.0  # mean offset
    b = principal_basis(x, 6, 2)
    assert torch.allclose(b @ b.T, torch.eye(2), atol=1e-5)
    assert (b[:, [1, 3]] ** 2).sum(1).min() > 0.999  # spans the two high-variance axes (1 and 3)
    # too few samples for the rank: completed with orthonormal rows
    b = principal_basis(x[:2], 6, 4)
    assert torch.allclose(b @ b.T, torch.eye(4), atol=1e-5)


@pytest.mark.parametrize("n_in,n_out", [(8, 5), (5, 8), (6, 6)])
def test_projection_preserves_distances_whatever_it_learns(n_in, n_out):
    x = torch.randn(64, n_in) * torch.linspace(0.1, 2, n_in)
    p = TargetProjection(n_in, n_out, samples=x)
    with torch.no_grad():  # any value of the trained parameter is still an isometry on B's span
        p.rotation.parametrizations.weight.original.add_(torch.randn_like(p.rotation.parametrizations.weight.original))
    w = p.weight
    assert w.shape == (n_out, n_in)
    d_in = x[:32] - x[32:]
    expected = (d_in @ p.basis.T).norm(dim=-1)  # == ||d_in|| when n_in <= n_out
    assert torch.allclose(p(d_in).norm(dim=-1), expected, rtol=1e-4)
    if n_in <= n_out:
        assert torch.allclose(expected, d_in.norm(dim=-1), rtol=1e-5)


def _train_target_side(proj: nn.Module, teacher: torch.Tensor, student: torch.Tensor, steps: int = 300) -> float:
    """Minimise CODI's loss w.r.t. a target-side projection only; return the spread of the targets
    after training over their spread before (variance across samples, summed over dims)."""
    before = proj(teacher).detach().var(0).sum()
    opt = torch.optim.Adam(proj.parameters(), lr=0.05)
    for _ in range(steps):
        target = proj(teacher)[:, None]  # (B, 1, d_s): one "layer"
        loss = codi_loss(student[:, None], target, "mse", std_norm=True).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(proj(teacher).detach().var(0).sum() / before)


def test_target_side_projection_cannot_collapse_where_a_plain_linear_does():
    """The degenerate solution of the module docstring: teachers share a large mean component;
    a plain linear map keeps only it, matching a student that outputs a constant."""
    torch.manual_seed(0)
    teacher = torch.randn(64, 8)
    teacher[:, 0] = 4.0  # shared offset (massive-activation-like)
    student = torch.tensor([1.0, -2.0, 0.5, 3.0]).expand(64, 4)  # a constant student
    plain = nn.Linear(8, 4, bias=False)
    assert _train_target_side(plain, teacher, student) < 0.05  # collapsed: targets nearly constant
    ours = TargetProjection(8, 4, samples=teacher)
    assert _train_target_side(ours, teacher, student) == pytest.approx(1.0, rel=1e-3)  # spread kept exactly


def _rows(shape: Shape, n: int, m: int = 3):
    g = torch.Generator().manual_seed(shape.num_layers)
    kv = (n, shape.num_layers, shape.num_kv_heads, m, shape.head_dim)
    valid = torch.ones(kv[:-1], dtype=torch.bool)
    valid[0, ..., -1] = False  # a CoT shorter than M in example 0
    return {"keys": torch.randn(kv, generator=g), "values": torch.randn(kv, generator=g), "slot_valid": valid,
            "hidden": torch.randn(n, shape.num_layers + 1, shape.hidden_size, generator=g)}


@pytest.mark.parametrize("teacher", [Shape(2, 2, 16, 64), Shape(6, 4, 32, 96), Shape(4, 1, 64, 48)])
def test_aligner_shapes_gradients_and_state_round_trip(teacher):
    student = Shape(3, 2, 24, 80)
    rows = _rows(teacher, 6)
    a = TeacherAligner(teacher, student, layer_map(teacher.num_layers, 3), rows)
    k, v, h, mask = a.keys(rows["keys"]), a.values(rows["values"]), a.hidden(rows["hidden"]), a.slot_mask(rows["slot_valid"])
    assert k.shape == v.shape == (6, 3, 2, 3, 24) and h.shape == (6, 4, 80) and mask.shape == (6, 3, 2, 3)
    assert not mask[0, ..., -1].any() and mask[1].all()
    (k.square().mean() + v.abs().mean() + h.sin().mean()).backward()
    trained = [p for p in a.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    with torch.no_grad():
        for p in trained:
            p.add_(0.1 * torch.randn_like(p))
    b = TeacherAligner(teacher, student, layer_map(teacher.num_layers, 3), None)  # other (random) bases
    b.load_state_dict(a.state_dict())
    for fn in ("keys", "values"):
        assert torch.allclose(getattr(a, fn)(rows[fn]), getattr(b, fn)(rows[fn]), atol=1e-6)
    assert torch.allclose(a.hidden(rows["hidden"]), b.hidden(rows["hidden"]), atol=1e-6)
    info = a.describe()
    assert info["layer_map"] == layer_map(teacher.num_layers, 3) and info["trainable_parameters"] > 0


def test_matching_shapes_are_identity():
    s = Shape(2, 2, 16, 64)
    rows = _rows(s, 2)
    a = TeacherAligner(s, s, [0, 1])
    assert not list(a.parameters())
    assert torch.equal(a.keys(rows["keys"]), rows["keys"]) and torch.equal(a.hidden(rows["hidden"]), rows["hidden"])
    assert a.describe()["kv"] == "identity"
