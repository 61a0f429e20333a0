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
