"""Locally adaptive learning loss: hand-computed windows, reductions to cross-entropy, 3D, void, options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from frugalseg.losses import LocallyAdaptiveLoss, chessboard_gaussian, lal_loss, segmentation_loss


def test_window_one_and_k_one_is_pixelwise_cross_entropy_2d_and_3d():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7, 9)
    target = torch.randint(0, 4, (2, 7, 9))
    target[0, :2] = 255
    ce = F.cross_entropy(logits, target, ignore_index=255)
    assert lal_loss(logits, target, window=1, stride=1, k=1).item() == pytest.approx(ce.item(), rel=1e-5)
    v, t = torch.randn(1, 3, 4, 5, 6), torch.randint(0, 3, (1, 4, 5, 6))
    assert lal_loss(v, t, window=1, stride=1, k=1).item() == pytest.approx(F.cross_entropy(v, t).item(), rel=1e-5)


def _naive_lal(probs, target, window, stride, sigma, k):
    """Reference: a loop over windows centred on pixels 0, stride, 2·stride, ... of each image, and over classes."""
    _, c, h, w = probs.shape
    r = window // 2
    costs = []
    for b in range(probs.shape[0]):
        for cy in range(0, h, stride):
            for cx in range(0, w, stride):
                for cls in range(c):
                    num = den = 0.0
                    for y in range(cy - r, cy - r + window):
                        for x in range(cx - r, cx - r + window):
                            if 0 <= y < h and 0 <= x < w and target[b, y, x] == cls:
                                d = max(abs(y - cy), abs(x - cx))
                                wt = math.exp(-d * d / (2 * sigma * sigma))
                                num += wt * float(probs[b, cls, y, x])
                                den += wt
                    if den > 0:
                        costs.append(-math.log(num / den))
    return (sum(v**k for v in costs) / len(costs)) ** (1 / k)


def test_windows_merge_each_class_with_chessboard_gaussian_weights_as_a_naive_loop_does():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 9, 11)
    target = torch.randint(0, 3, (2, 9, 11))
    target[1, 4:, 5:] = 255
    probs = torch.softmax(logits, 1)
    w = chessboard_gaussian(3, 1.0, 2)
    assert w[1, 1] == 1 and w[0, 0] == pytest.approx(math.exp(-0.5)) and w[0, 1] == w[0, 0]
    for window, stride, sigma, k in ((5, 2, 1.5, 1.0), (3, 3, 1.0, 5.0), (5, 3, 2.0, 2.0)):
        want = _naive_lal(probs, target, window, stride, sigma, k)
        got = lal_loss(logits, target, window=window, stride=stride, sigma=sigma, k=k)
        assert got.item() == pytest.approx(want, rel=1e-4), (window, stride, k)


def test_large_k_approaches_the_hardest_window_and_void_gives_zero_with_graph():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 16, 16, requires_grad=True)
    target = torch.randint(0, 3, (1, 16, 16))
    mean = lal_loss(logits, target, window=5, stride=4, k=1)
    hard = lal_loss(logits, target, window=5, stride=4, k=60)
    assert hard > mean
    hard.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    void = torch.full((1, 16, 16), 255)
    zero = lal_loss(logits, void)
    assert zero.item() == 0 and zero.requires_grad
    with pytest.raises(ValueError, match="window must be odd"):
        lal_loss(logits, target, window=4)
    with pytest.raises(ValueError, match="expected"):
        lal_loss(torch.randn(2, 3, 5), torch.zeros(2, 5, dtype=torch.long))


def test_loss_kind_carries_the_options_into_segmentation_loss():
    from frugalseg.stages.semi import SemiConfig
    from frugalseg.stages.train import TrainConfig

    cfg = TrainConfig(loss="lal", lal_window=5, lal_stride=2, lal_k=3.0)
    kind = cfg.loss_kind()
    assert kind == LocallyAdaptiveLoss(5, 2, None, 3.0)
    logits, target = torch.randn(1, 2, 8, 8), torch.randint(0, 2, (1, 8, 8))
    assert segmentation_loss(logits, target, kind).item() == pytest.approx(
        lal_loss(logits, target, 5, 2, None, 3.0).item())
    assert TrainConfig(loss="ce").loss_kind() == "ce"
    assert SemiConfig(loss="lal", lal_window=3).loss_kind() == LocallyAdaptiveLoss(3, 4, None, 5.0)


def test_lal_gradient_is_finite_when_every_window_is_perfect():
    target = torch.randint(0, 3, (2, 16, 16))
    logits = (torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 200).requires_grad_()
    loss = lal_loss(logits, target, 5, 2, None, 5.0)
    loss.backward()
    assert loss.item() < 1e-2 and torch.isfinite(logits.grad).all()


def test_a_window_below_the_floor_keeps_a_gradient_towards_its_class():
    """A confidently wrong window must still push: a clamped cost would dominate the k = 5 pool with no gradient."""
    from frugalseg.losses import LAL_FLOOR, lal_window_costs

    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 4:, 4:] = 1
    logits = torch.zeros(1, 2, 8, 8)
    logits[0, 0, 4:, 4:] = 40.0  # class 1's pixels say class 0 with p(1) ~ e^-40, far below the floor
    logits.requires_grad_()
    costs = lal_window_costs(logits, target, window=3, stride=4)
    assert costs.max().item() > -math.log(LAL_FLOOR) and costs.max().item() <= -math.log(LAL_FLOOR) + 1.001
    loss = lal_loss(logits, target, window=3, stride=4, k=5.0)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    wrong = logits.grad[0, :, 4:, 4:]
    assert wrong[0].max().item() > 0 and wrong[1].min().item() < 0  # descent lowers class 0, raises class 1 there
