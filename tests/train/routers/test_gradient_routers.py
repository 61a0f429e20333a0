"""The routers beyond fixed/similarity/learnable, against hand-computed values."""

import math

import pytest
import torch

from kvkd.train.routers import RouterInputs, build_router
from kvkd.train.routers.ae_kd import min_norm_weights
from kvkd.train.routers.govern import govern_weights
from kvkd.train.routers.mtkd_rl import policy_state


def _inp(grads=None, B=1, K=3, losses=None, nll=None, ce=None, step=0, d=2):
    return RouterInputs(
        student_features=torch.ones(B, d),
        teacher_features=torch.ones(B, K, d),
        losses=torch.zeros(B, K) if losses is None else losses,
        teacher_nll=torch.zeros(B, K) if nll is None else nll,
        step=step,
        student_ce=torch.zeros(B) if ce is None else ce,
        grads=grads,
    )


# ---------------------------------------------------------------------------- govern
def test_govern_majority_vote_hand_computed():
    g = torch.tensor([[[1.0, 1.0, -1.0, 2.0], [1.0, 2.0, -1.0, -1.0], [-1.0, -1.0, 1.0, 3.0]]])  # (1, 3, 4)
    # majority signs (+,+,-,+); every element contested; teacher 1 follows on 4/4, teacher 2 on 3/4, teacher 3 on 1/4
    w, agree = govern_weights(g)
    assert torch.allclose(agree, torch.tensor([[1.0, 0.75, 0.25]]))
    assert torch.equal(w, torch.tensor([[0.5, 0.5, 0.0]]))
    assert torch.equal(build_router("govern", 3, 2)(_inp(g)), w)


def test_govern_ties_and_unanimity_keep_everyone():
    two = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])  # K=2, opposite: every element a tie
    assert torch.equal(govern_weights(two)[0], torch.tensor([[0.5, 0.5]]))
    same = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.5, 0.1]]])  # unanimous: nothing contested
    assert torch.allclose(govern_weights(same)[0], torch.full((1, 3), 1 / 3))


def test_govern_zero_gradients_abstain():
    # teacher 1 has no opinion on element 1 (say, an empty slot): not a disagreement
    g = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert torch.equal(govern_weights(g)[0], torch.tensor([[0.5, 0.5]]))
    # three teachers: teacher 3 abstains on element 0, is outvoted on element 1 -> agreement 0
    g = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [0.0, -1.0]]])
    w, agree = govern_weights(g)
    assert torch.equal(agree, torch.tensor([[1.0, 1.0, 0.0]])) and torch.equal(w, torch.tensor([[0.5, 0.5, 0.0]]))


def test_govern_votes_per_sample_and_threshold():
    g = torch.tensor([
        [[1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]],  # teacher 3 in the minority
        [[-1.0, 1.0], [1.0, 1.0], [1.0, 1.0]],  # teacher 1 in the minority on element 0
    ])
    w, _ = govern_weights(g)
    assert torch.equal(w, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]))
    # contested elements of sample 0: both; teacher 3 follows on 0 of 2; threshold 0 is refused
    with pytest.raises(ValueError, match="threshold"):
        build_router("govern", 3, 2, {"threshold": 0.0})


def test_govern_needs_gradients():
    with pytest.raises(ValueError, match="gradients"):
        build_router("govern", 3, 2)(_inp(None))


# ---------------------------------------------------------------------------- grad-cosine
def test_grad_cosine_row_sums_softmax_hand_computed():
    g = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    r = [1 + 0 + 1 / math.sqrt(2), 1 + 0 + 1 / math.sqrt(2), 1 + 2 / math.sqrt(2)]  # row sums of the cosine matrix
    e = [math.exp(x / 0.5) for x in r]
    expected = torch.tensor([[x / sum(e) for x in e]])
    w = build_router("grad-cosine", 3, 2, {"temperature": 0.5})(_inp(g))
    assert torch.allclose(w, expected, atol=1e-6)


def test_grad_cosine_ema_momentum():
    router = build_router("grad-cosine", 2, 2, {"momentum": 0.5})
    g1 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # identical: uniform
    assert torch.allclose(router(_inp(g1, K=2)), torch.tensor([[0.5, 0.5]]))
    # a non-uniform batch is pulled halfway towards the EMA (0.5, 0.5)
    g = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    router3 = build_router("grad-cosine", 3, 2, {"momentum": 0.5})
    first = router3(_inp(g))  # no EMA yet: the raw weights
    raw = build_router("grad-cosine", 3, 2)(_inp(g))
    assert torch.allclose(first, raw)
    second = router3(_inp(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])))
    raw2 = build_router("grad-cosine", 3, 2)(_inp(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])))
    assert torch.allclose(second, 0.5 * raw + 0.5 * raw2, atol=1e-6)


def test_grad_cosine_parameter_space_one_row_for_the_batch():
    router = build_router("grad-cosine", 2, 2, {"space": "parameter"})
    assert router.needs_grads == "parameter"
    w = router(_inp(torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]]), B=4, K=2))
    assert w.shape == (4, 2) and torch.allclose(w, w[:1].expand(4, 2))


# ---------------------------------------------------------------------------- ae-kd
def test_ae_kd_min_norm_orthogonal_rescaled_by_norm():
    # unit gradients orthogonal: alpha = (1/2, 1/2); then w ∝ alpha / ||g|| = (1/2, 1/6) -> (3/4, 1/4)
    w = min_norm_weights(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    assert torch.allclose(w, torch.tensor([0.75, 0.25], dtype=torch.float64), atol=1e-6)


def test_ae_kd_tolerance_bound_caps_a_teacher():
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # no binding cap (nu = 0.6: cap 1/1.8): alpha3 = 1/2, alpha1 = alpha2 = 1/4
    assert torch.allclose(min_norm_weights(g, nu=0.6), torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64), atol=1e-5)
    # nu = 0.9: cap 1/2.7 binds on teacher 3; the rest is split evenly
    cap = 1 / 2.7
    expected = torch.tensor([(1 - cap) / 2, (1 - cap) / 2, cap], dtype=torch.float64)
    assert torch.allclose(min_norm_weights(g, nu=0.9), expected, atol=1e-5)
    # nu = 1 forces uniform weights (before the norm rescaling; norms are equal here)
    assert torch.allclose(min_norm_weights(g, nu=1.0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-5)


def test_ae_kd_router_uses_batch_mean_gradient():
    grads = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[1.0, 0.0], [0.0, 3.0]]])  # (B=2, K=2, P=2)
    w = build_router("ae-kd", 2, 2)(_inp(grads, B=2, K=2))
    assert torch.allclose(w, torch.tensor([[0.75, 0.25]] * 2), atol=1e-5)


# ---------------------------------------------------------------------------- ca-mkd
def test_ca_mkd_hand_computed():
    nll = torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
    p = [math.exp(x) / (math.e + math.e**2 + math.e**3) for x in (1, 2, 3)]
    expected = torch.tensor([[(1 - x) / 2 for x in p], [1 / 3] * 3])
    assert torch.allclose(build_router("ca-mkd", 3, 2)(_inp(nll=nll, B=2)), expected, atol=1e-6)
    assert torch.equal(build_router("ca-mkd", 1, 2)(_inp(nll=torch.tensor([[5.0]]), K=1)), torch.ones(1, 1))


# ---------------------------------------------------------------------------- difficulty
def _difficulty_router(**kw):
    router = build_router("difficulty", 2, 2, {"bins": 2, **kw})
    nll = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [3.0, 1.0], [3.0, 1.0], [3.0, 1.0]])
    router.prepare(nll)  # mean NLL 1.5 (x3) and 2.0 (x3): edge 1.75
    return router


def test_difficulty_prepare_bins_and_capability_from_nll():
    router = _difficulty_router()
    assert torch.allclose(router.edges, torch.tensor([1.75]))
    # C[level] = -(mean NLL per teacher in the level), centred per level
    assert torch.allclose(router.capability.detach(), torch.tensor([[0.5, -0.5], [-1.0, 1.0]]))
    assert torch.equal(router.difficulty_bin(torch.tensor([[1.0, 1.0], [4.0, 4.0]])), torch.tensor([0, 1]))


def test_difficulty_weights_and_estimator_loss_hand_computed():
    router = _difficulty_router()
    last = router.estimator[-1]
    with torch.no_grad():  # the estimator says "easy" with certainty
        last.weight.zero_()
        last.bias.copy_(torch.tensor([30.0, -30.0]))
    inp = _inp(K=2, nll=torch.tensor([[3.0, 3.0]]))  # a hard sample (bin 1)
    w = router(inp)
    e = [math.exp(0.5), math.exp(-0.5)]
    assert torch.allclose(w, torch.tensor([[e[0] / sum(e), e[1] / sum(e)]]), atol=1e-6)
    aux = router.aux_loss(w, inp)
    ce = 60.0  # cross-entropy of logits (30, -30) for target 1
    entropy = -sum(x / sum(e) * math.log(x / sum(e)) for x in e)
    assert torch.allclose(aux, torch.tensor(0.1 * ce - 0.01 * entropy), atol=1e-4)


# ---------------------------------------------------------------------------- mtkd-rl
def test_mtkd_rl_state_hand_computed():
    inp = RouterInputs(
        student_features=torch.tensor([[1.0, 0.0]]),
        teacher_features=torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]),
        losses=torch.tensor([[0.0, math.e - 1]]),
        teacher_nll=torch.tensor([[math.e**2 - 1, 0.0]]),
    )
    assert torch.allclose(policy_state(inp), torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]]), atol=1e-6)


def test_mtkd_rl_uniform_in_warm_up_then_policy():
    router = build_router("mtkd-rl", 2, 2, {"warmup_steps": 3})
    g = torch.Generator().manual_seed(0)
    inp = _inp(B=4, K=2, losses=torch.rand(4, 2, generator=g), ce=torch.rand(4, generator=g), step=1)
    assert torch.equal(router(inp), torch.full((4, 2), 0.5))
    with torch.no_grad():
        router.policy[-1].weight.fill_(0.3)
    inp.step = 3
    w = router.eval()(inp)
    assert torch.allclose(w, router.probabilities(inp).detach()) and not torch.allclose(w, torch.full((4, 2), 0.5))


def test_mtkd_rl_reinforce_accumulates_and_takes_one_adam_step():
    router = build_router("mtkd-rl", 2, 2, {"update_every": 2, "lr": 0.01, "warmup_steps": 0, "seed": 7})
    with torch.no_grad():
        router.policy[-1].weight.fill_(0.1)  # not uniform, so the score has a gradient
    inp = _inp(B=4, K=2, losses=torch.tensor([[0.1, 2.0], [0.2, 1.5], [0.1, 3.0], [0.3, 1.0]]), ce=torch.tensor([1.0, 1.1, 0.9, 1.0]))
    before = [p.detach().clone() for p in router.policy.parameters()]
    # the REINFORCE gradient, computed here from the same actions
    pi = router.probabilities(inp)
    gen = torch.Generator().manual_seed(7 * 1_000_003 + 0)
    actions = torch.multinomial(pi.detach(), 1, generator=gen).squeeze(1)
    b = torch.arange(4)
    r = -(inp.student_ce + inp.losses[b, actions])
    adv = (r - r.mean()) / r.std()
    expected = torch.autograd.grad(-(adv * pi[b, actions].log()).mean(), list(router.policy.parameters()))
    router(inp)  # step 0: accumulates only
    for i, g in enumerate(expected):
        assert torch.allclose(getattr(router, f"grad_acc_{i}"), g, atol=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(before, router.policy.parameters()))
    inp.step = 1
    router(inp)  # step 1: a second, different draw; then one Adam step
    assert int(router.updates) == 1 and int(router.acc_steps) == 0
    for p, q in zip(before, router.policy.parameters()):
        # Adam's first step moves each parameter by lr * g / (|g| + eps): at most lr
        assert torch.all((q.detach() - p).abs() <= 0.01 + 1e-7)
    moved = (router.policy[-1].weight.detach() - before[2]).abs()  # the output layer's weights have clear gradients
    assert torch.allclose(moved, torch.full_like(moved, 0.01), atol=1e-4)


def test_mtkd_rl_policy_learns_the_low_loss_teacher():
    torch.manual_seed(0)
    router = build_router("mtkd-rl", 3, 2, {"update_every": 1, "lr": 0.05, "warmup_steps": 0})
    g = torch.Generator().manual_seed(1)
    for step in range(150):
        losses = torch.rand(8, 3, generator=g) * 0.2 + torch.tensor([0.1, 0.2, 3.0])  # teacher 3 is bad
        router(_inp(B=8, K=3, losses=losses, ce=torch.rand(8, generator=g), step=step))
    w = router.eval()(_inp(B=8, K=3, losses=torch.tensor([[0.15, 0.25, 3.1]]).expand(8, 3), step=200))
    assert w[:, 2].mean() < 0.15
