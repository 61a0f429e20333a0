"""Routers: hand-computed weights, and the contract every registered router keeps."""

import math

import pytest
import torch

from kvkd.train.routers import ROUTERS, RouterInputs, build_router


def _inputs(B=3, K=2, d=4, seed=0, P=6):
    g = torch.Generator().manual_seed(seed)
    return RouterInputs(
        student_features=torch.randn(B, d, generator=g),
        teacher_features=torch.randn(B, K, d, generator=g),
        losses=torch.rand(B, K, generator=g),
        teacher_nll=torch.rand(B, K, generator=g),
        student_ce=torch.rand(B, generator=g),
        grads=torch.randn(B, K, P, generator=g),
    )


def test_fixed_uniform_and_given():
    inp = _inputs()
    assert torch.allclose(build_router("fixed", 2, 4)(inp), torch.full((3, 2), 0.5))
    w = build_router("fixed", 2, 4, {"weights": [3, 1]})(inp)
    assert torch.allclose(w, torch.tensor([[0.75, 0.25]] * 3))


@pytest.mark.parametrize("weights", [[1.0], [-1.0, 2.0], [0.0, 0.0]])
def test_fixed_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        build_router("fixed", 2, 4, {"weights": weights})


def test_similarity_hand_computed():
    inp = RouterInputs(
        student_features=torch.tensor([[1.0, 0.0]]),
        teacher_features=torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]),  # cos 1 and 0
        losses=torch.zeros(1, 2),
        teacher_nll=torch.zeros(1, 2),
    )
    w = build_router("similarity", 2, 2, {"temperature": 0.5})(inp)
    e1, e0 = math.exp(1 / 0.5), math.exp(0.0)
    assert torch.allclose(w, torch.tensor([[e1 / (e1 + e0), e0 / (e1 + e0)]]))


def test_learnable_starts_uniform_and_learns_toward_lower_loss():
    torch.manual_seed(0)
    router = build_router("learnable", 2, 4, {"entropy_weight": 0.0})
    inp = _inputs(B=8)
    assert torch.allclose(router(inp), torch.full((8, 2), 0.5))
    losses = torch.tensor([[1.0, 0.1]]).expand(8, 2)
    opt = torch.optim.SGD(router.parameters(), lr=1.0)
    for _ in range(20):
        w = router(inp)
        loss = (w * losses).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert router(inp)[:, 1].mean() > 0.8  # the lower-loss teacher wins


def test_learnable_entropy_bonus_value():
    router = build_router("learnable", 2, 4, {"entropy_weight": 0.1})
    w = torch.tensor([[0.5, 0.5]])
    assert torch.allclose(router.aux_loss(w, _inputs(B=1)), torch.tensor(-0.1 * math.log(2)))


@pytest.mark.parametrize("name", ROUTERS.names())
def test_router_contract(name, tmp_path):
    from safetensors.torch import load_file, save_file

    K = 3
    options = {}
    if name == "oracle":  # the one router that cannot run without a file
        from kvkd.train.routers.truth import write_truth

        options = {"truth": str(write_truth(tmp_path / "truth.json", [f"r{i}" for i in range(20)], [[i % 3 == k for k in range(K)] for i in range(20)], ["a", "b", "c"]))}
    router = build_router(name, K, 4, options)
    if router.needs_dataset_nll:
        router.prepare(torch.rand(20, K, generator=torch.Generator().manual_seed(1)))
    if hasattr(router, "set_learnability"):  # persyn: what prepare_rows computes with a student
        router.set_learnability(-torch.rand(20, K, generator=torch.Generator().manual_seed(2)))
    if hasattr(router, "set_rsr"):
        router.set_rsr(torch.rand(20, K, generator=torch.Generator().manual_seed(3)))
    for step in (0, 30):  # before and after any warm-up
        inp = _inputs(B=5, K=K)
        inp.step = step
        inp.rows = torch.tensor([0, 3, 7, 11, 19])
        w = router(inp)
        assert w.shape == (5, K)
        assert torch.isfinite(w).all() and torch.all(w >= 0)
        assert torch.allclose(w.sum(1), torch.ones(5), atol=1e-6)
    router.eval()  # no self-updates (EMA, policy) while comparing
    # state round-trips through a safetensors checkpoint
    with torch.no_grad():
        for p in router.parameters():
            p.add_(0.1)
    state = {k: v.contiguous() for k, v in router.state_dict().items()}
    if state:
        save_file(state, str(tmp_path / "r.safetensors"))
        other = build_router(name, K, 4, options).eval()
        other.load_state_dict(load_file(str(tmp_path / "r.safetensors")))
        assert torch.allclose(other(_inputs(B=5, K=K)), router(_inputs(B=5, K=K)))


def test_unknown_router_lists_known():
    with pytest.raises(KeyError, match="fixed"):
        build_router("nope", 2, 4)


def test_router_options_checked_before_any_model_loads():
    from kvkd.train.trainer import check_router_options

    with pytest.raises(ValueError, match=r"no option\(s\) \['every'\]; its options: \['hidden', 'lr', 'update_every', 'warmup_steps', 'seed'\]"):
        check_router_options("mtkd-rl", {"every": 1}, 2)
    with pytest.raises(ValueError, match="3 weights for 2 teacher caches"):
        check_router_options("fixed", {"weights": [1, 1, 1]}, 2)
    with pytest.raises(KeyError, match="fixed"):
        check_router_options("nope", None, 2)
    check_router_options("govern", {"threshold": 0.6, "space": "kv"}, 3)
