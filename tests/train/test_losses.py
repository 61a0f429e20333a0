"""KV and CODI losses against hand-computed values."""

import torch

from kvkd.train.losses import codi_loss, kv_loss


def test_kv_loss_mse_hand_computed_without_std_norm():
    s_k = torch.zeros(1, 1, 1, 2, 2)
    t_k = torch.tensor([[[[[1.0, 1.0], [2.0, 0.0]]]]])  # squared errors: 1,1,4,0 -> mean 1.5
    s_v = torch.zeros(1, 1, 1, 2, 2)
    t_v = torch.zeros(1, 1, 1, 2, 2)
    valid = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    loss = kv_loss(s_k, s_v, t_k, t_v, valid, kind="mse", std_norm=False)
    assert torch.allclose(loss, torch.tensor([0.5 * (1.5 + 0.0)]))


def test_kv_loss_masks_empty_slots_and_smooth_l1():
    s = torch.zeros(1, 1, 1, 2, 1)
    t = torch.tensor([[[[[0.5], [100.0]]]]])  # slot 1 is empty: ignored
    valid = torch.tensor([[[[True, False]]]])
    loss = kv_loss(s, s, t, t, valid, kind="smooth_l1", std_norm=False)
    # smooth-L1(0.5) = 0.5 * 0.5^2 = 0.125 for keys and values -> 0.5 * (0.125 + 0.125)
    assert torch.allclose(loss, torch.tensor([0.125]))


def test_kv_loss_slot_weights_keep_scale():
    s = torch.zeros(1, 1, 1, 2, 1)
    t = torch.tensor([[[[[1.0], [3.0]]]]])
    valid = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    uniform = kv_loss(s, s, t, t, valid, "mse", False, slot_weights=torch.ones(1, 1, 1, 2))
    plain = kv_loss(s, s, t, t, valid, "mse", False)
    assert torch.allclose(uniform, plain)
    weighted = kv_loss(s, s, t, t, valid, "mse", False, slot_weights=torch.tensor([[[[3.0, 1.0]]]]))
    # weights -> mean 1: (1.5, 0.5); errors (1, 9) -> (1.5*1 + 0.5*9)/2 = 3
    assert torch.allclose(weighted, torch.tensor([3.0]))


def test_kv_loss_std_norm_divides_by_teacher_std():
    t = torch.tensor([0.0, 2.0, 4.0, 6.0]).reshape(1, 1, 1, 4, 1)
    s = torch.zeros_like(t)
    valid = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    std = torch.tensor([0.0, 2.0, 4.0, 6.0]).std()
    expected = ((t / std) ** 2).mean()
    assert torch.allclose(kv_loss(s, s, t, t, valid, "mse", True), expected, atol=1e-6)


def test_losses_zero_when_equal_and_gradients_reach_student():
    t = torch.randn(3, 2, 2, 4, 8)
    valid = torch.ones(3, 2, 2, 4, dtype=torch.bool)
    assert torch.allclose(kv_loss(t.clone(), t.clone(), t, t, valid), torch.zeros(3))
    h = torch.randn(3, 5, 16)
    assert torch.allclose(codi_loss(h.clone(), h), torch.zeros(3))
    s = torch.zeros(3, 2, 2, 4, 8, requires_grad=True)
    kv_loss(s, s, t, t, valid).sum().backward()
    assert s.grad.abs().sum() > 0
    t.requires_grad_(True)
    # a learned projection of the (constant) teacher tensors is trained through the loss
    proj = torch.nn.Linear(8, 8)
    kv_loss(s.detach(), s.detach(), proj(t), proj(t), valid).sum().backward()
    assert proj.weight.grad.abs().sum() > 0


def test_codi_loss_hand_computed():
    t = torch.tensor([[[1.0, -1.0]], [[3.0, 1.0]]])  # (B=2, L+1=1, d=2)
    s = torch.zeros_like(t)
    std = t.std()
    expected = torch.nn.functional.smooth_l1_loss(s / std, t / std, reduction="none").mean(dim=(1, 2))
    assert torch.allclose(codi_loss(s, t, "smooth_l1", True), expected)
    assert torch.allclose(codi_loss(s, t, "mse", False), torch.tensor([1.0, 5.0]))


# ---------------------------------------------------------------------------- CKA
from kvkd.train.losses import cka_loss, linear_cka  # noqa: E402


def _hsic_cka(x, y):
    """Reference: CKA from the HSIC of linear Gram matrices (Kornblith et al., 2019)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = x.double() @ x.double().T, y.double() @ y.double().T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h) / (n - 1) ** 2  # noqa: E731
    return hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_))


def test_cka_is_one_for_identical_features():
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(linear_cka(x, x), torch.tensor(1.0), atol=1e-6)


def test_cka_invariant_to_orthogonal_maps_and_isotropic_scaling():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 6, generator=g), torch.randn(20, 9, generator=g)
    q1, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(9, 9, generator=g))
    base = linear_cka(x, y)
    assert torch.allclose(linear_cka(x @ q1, y), base, atol=1e-5)
    assert torch.allclose(linear_cka(x, y @ q2), base, atol=1e-5)
    assert torch.allclose(linear_cka(3.5 * x, 0.2 * y), base, atol=1e-5)
    assert torch.allclose(linear_cka(x + 4.0, y), base, atol=1e-5)  # centring removes shifts


def test_cka_equals_hsic_form_on_random_inputs():
    g = torch.Generator().manual_seed(2)
    for n, d1, d2 in [(8, 3, 5), (30, 12, 4), (5, 40, 40)]:
        x, y = torch.randn(n, d1, generator=g), torch.randn(n, d2, generator=g)
        assert torch.allclose(linear_cka(x, y).double(), _hsic_cka(x, y), atol=1e-5)


def test_cka_loss_over_layers_skips_embeddings_and_batches():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 3, 8, generator=g, requires_grad=True)  # (B, L+1, d_s)
    t = torch.randn(6, 3, 5, generator=g)  # (B, L+1, d_t): dims differ
    loss = cka_loss(s, t)
    expected = 1 - (linear_cka(s[:, 1], t[:, 1]) + linear_cka(s[:, 2], t[:, 2])) / 2
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert s.grad[:, 1:].abs().sum() > 0 and s.grad[:, 0].abs().sum() == 0
    assert torch.allclose(cka_loss(t, t), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(cka_loss(s[:1], t[:1]), torch.tensor(1.0))  # one sample: no signal
