"""IRN's network-free parts: pairs, affinity labels, path affinities, losses, the random walk and its read-out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from frugalseg.errors import ConfigError
from frugalseg.weak.irn import (
    affinity_labels, affinity_losses, displacement_losses, pair_offsets, path_affinity, random_walk,
    segment_points, walk_to_labels,
)


def test_pairs_are_one_of_each_direction_within_the_radius():
    offs = pair_offsets(5)
    as_set = {tuple(o) for o in offs}
    assert len(as_set) == len(offs)
    assert all((-dy, -dx) not in as_set for dy, dx in offs)
    # every offset with 0 < |o| < 5 is there up to sign: the disc has 2·K + 1 points
    assert 2 * len(offs) + 1 == sum(1 for y in range(-4, 5) for x in range(-4, 5) if y * y + x * x < 25)
    assert segment_points(0, 3) == ((0, 0), (0, 1), (0, 2), (0, 3))
    assert segment_points(2, -4) == ((0, 0), (0, -1), (1, -2), (2, -3), (2, -4))
    with pytest.raises(ConfigError, match="at least 2"):
        pair_offsets(1)


def test_affinity_labels_by_hand():
    lab = np.array([[0, 0, 1, 1],
                    [0, 255, 1, 2]])
    labels = affinity_labels(lab, radius=2)  # offsets (0, 1), (1, -1), (1, 0), (1, 1)
    offs = [tuple(o) for o in pair_offsets(2)]
    k = offs.index((0, 1))
    assert labels["bg"][0, k, 0, 0] and not labels["fg"][0, k, 0, 0]  # 0-0 at (0,0)-(0,1)
    assert labels["neg"][0, k, 0, 1]  # 0 | 1
    assert labels["fg"][0, k, 0, 2]  # 1-1
    assert not (labels["bg"][0, k, 1, 0] | labels["fg"][0, k, 1, 0] | labels["neg"][0, k, 1, 0])  # void end
    assert not labels["bg"][0, k, 0, 3]  # the partner falls outside
    down = offs.index((1, 0))
    assert labels["neg"][0, down, 0, 3] and labels["fg"][0, down, 0, 2]  # 1 above 2; 1 above 1


def test_path_affinity_is_cut_by_one_boundary_pixel():
    b = torch.zeros(1, 5, 7)
    b[0, :, 3] = 1.0  # a vertical wall
    aff = path_affinity(b, radius=3)
    offs = [tuple(o) for o in pair_offsets(3)]
    right2 = offs.index((0, 2))
    assert aff[0, right2, 2, 0] == 1.0  # (2,0)-(2,2): no wall between
    assert aff[0, right2, 2, 2] == 0.0  # (2,2)-(2,4): crosses the wall
    assert aff[0, right2, 2, 6] == 0.0  # leaves the image


def test_losses_prefer_affinities_that_follow_the_labels():
    lab = np.zeros((6, 6), np.int64)
    lab[:, 3:] = 1
    labels = affinity_labels(lab, radius=3)
    wall = torch.zeros(1, 6, 6)
    wall[0, :, 3] = 1.0
    good = affinity_losses(path_affinity(wall, 3), labels)["total"]
    none = affinity_losses(path_affinity(torch.zeros(1, 6, 6), 3), labels)["total"]
    assert good < none
    disp = torch.zeros(1, 2, 6, 6, requires_grad=True)
    dl = displacement_losses(disp, labels, radius=3)
    dl["total"].backward()
    assert dl["bg"] == 0 and dl["fg"] > 0 and disp.grad.abs().sum() > 0


def test_random_walk_stays_inside_the_boundary():
    h, w = 12, 12
    boundary = torch.zeros(h, w)
    boundary[:, 6] = 1.0  # a wall down the middle
    maps = torch.zeros(1, h, w)
    maps[0, 5, 2] = 1.0  # a seed on the left
    walked = random_walk(maps, boundary, beta=10, steps=64, radius=4)
    left, right = walked[0, :, :6], walked[0, :, 7:]
    assert left.sum() > 0 and left.min() > 0  # spread over the whole left side
    assert right.max() < 1e-6 * left.max()  # nothing crossed
    assert walked.max() <= maps.max() + 1e-6  # averaging never exceeds the input
    flat = random_walk(torch.ones(2, 8, 8), torch.zeros(8, 8), steps=5, radius=3)
    torch.testing.assert_close(flat, torch.ones(2, 8, 8))  # a constant stays constant
    with pytest.raises(ConfigError, match="same grid"):
        random_walk(torch.ones(1, 4, 4), torch.zeros(5, 5))


def test_walk_read_out():
    walked = torch.zeros(2, 3, 3)
    walked[0, 0, 0] = 1.0  # class key 4 strong top-left
    walked[1, 2, 2] = 0.2  # class key 7 weak bottom-right (below the background plane after normalising)
    lab = walk_to_labels(walked, [4, 7], (12, 12), bg_threshold=0.25)
    assert lab.shape == (12, 12) and lab[0, 0] == 4 and lab[11, 11] == 0 and 7 not in lab


def test_sparse_walk_equals_the_dense_transition_of_the_reference():
    torch.manual_seed(0)
    h, w, r = 5, 6, 3
    boundary = torch.rand(h, w) * 0.5
    maps = torch.rand(2, h, w)
    aff = path_affinity(boundary[None], r)[0] ** 10.0
    n = h * w
    a = torch.eye(n, dtype=torch.float64)
    for k, (dy, dx) in enumerate(pair_offsets(r)):
        for y in range(h):
            for x in range(w):
                yy, xx = y + int(dy), x + int(dx)
                if 0 <= yy < h and 0 <= xx < w:
                    a[y * w + x, yy * w + xx] = a[yy * w + xx, y * w + x] = float(aff[k, y, x])
    t = a / a.sum(0, keepdim=True)  # column-normalised, as the reference
    x = (maps * (1 - boundary)).reshape(2, -1).double()
    for _ in range(7):
        x = x @ t
    torch.testing.assert_close(random_walk(maps, boundary, beta=10.0, steps=7, radius=r).double(),
                               x.reshape(2, h, w), rtol=1e-5, atol=1e-6)


def test_irn_network_trains_its_branches_only():
    from frugalseg.models.irn import InterPixelNet
    from frugalseg.weak.irn import affinity_labels, affinity_losses, displacement_losses, path_affinity

    torch.manual_seed(0)
    net = InterPixelNet("tf_efficientnet_lite0", pretrained=False).train()
    assert not net.backbone.training  # frozen statistics even in train mode
    x = torch.rand(2, 3, 64, 48)
    boundary, disp = net(x)
    assert boundary.shape == (2, 1, 16, 12) and disp.shape == (2, 2, 16, 12)
    assert 0 <= float(boundary.detach().min()) and float(boundary.detach().max()) <= 1
    lab = torch.zeros(2, 16, 12, dtype=torch.long)
    lab[:, :, 6:] = 1
    labels = affinity_labels(lab, radius=4)
    loss = affinity_losses(path_affinity(boundary, 4), labels)["total"] + displacement_losses(disp, labels, 4)["total"]
    loss.backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(p.grad is not None for p in net.heads_parameters())


def test_irn_learns_a_boundary_between_two_confident_regions_and_walks_inside_it():
    from frugalseg.models.irn import InterPixelNet
    from frugalseg.weak.irn import boundary_map, irn_pseudo_mask, train_irn

    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(4):  # a bright square (class 3) on a dark background, the band around it unsure
        img = (rng.random((64, 64, 3)) * 40).astype(np.uint8)
        lab = np.zeros((64, 64), np.uint8)
        img[16:48, 16:48] += 180
        lab[18:46, 18:46] = 3
        lab[14:18, 14:50] = lab[46:50, 14:50] = 255
        lab[14:50, 14:18] = lab[14:50, 46:50] = 255
        pairs.append((img, lab))
    torch.manual_seed(0)
    net = InterPixelNet("tf_efficientnet_lite0", pretrained=False)
    losses = train_irn(net, pairs, epochs=12, batch_size=2, crop=64, scale=(0.9, 1.1), lr=0.1, radius=4)
    assert np.mean(losses[-4:]) < np.mean(losses[:4])  # it learns
    b = boundary_map(net, pairs[0][0])
    assert b.shape == (16, 16)
    cam = np.zeros((1, 64, 64), np.float32)
    cam[0, 28:36, 28:36] = 1.0  # a CAM that found only the square's centre
    mask = irn_pseudo_mask(b, cam, [3], background=0, steps=32, radius=3)
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 3}
    assert mask[32, 32] == 3 and mask[2, 2] == 0


def test_a_killed_irn_training_resumes_from_its_last_epoch_exactly(tmp_path):
    from frugalseg.models.irn import InterPixelNet
    from frugalseg.weak.irn import train_irn

    rng = np.random.default_rng(1)
    pairs = []
    for _ in range(4):
        img = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
        lab = np.zeros((48, 48), np.uint8)
        lab[12:36, 12:36] = 2
        pairs.append((img, lab))
    kw = dict(epochs=3, batch_size=2, crop=48, scale=(0.9, 1.1), radius=3, seed=5)

    def fresh():
        torch.manual_seed(0)
        return InterPixelNet("tf_efficientnet_lite0", pretrained=False)

    whole_net = fresh()
    whole = train_irn(whole_net, pairs, **kw)

    class Killed(Exception):
        pass

    def kill_in_epoch_three(step, total, loss):
        if step == 5:  # epoch 2 (steps 3-4) saved when epoch 3 began; step 5 is lost
            raise Killed

    ckpt = tmp_path / "irn_state.pt"
    with pytest.raises(Killed):
        train_irn(fresh(), pairs, **kw, progress=kill_in_epoch_three, checkpoint=ckpt)
    assert ckpt.exists()
    resumed_net = InterPixelNet("tf_efficientnet_lite0", pretrained=False)
    resumed = train_irn(resumed_net, pairs, **kw, checkpoint=ckpt)
    assert resumed == pytest.approx(whole, rel=1e-5) and not ckpt.exists()
    for a, b in zip(whole_net.state_dict().values(), resumed_net.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    with pytest.raises(Killed):  # a checkpoint of this 3-epoch training again ...
        train_irn(fresh(), pairs, **kw, progress=kill_in_epoch_three, checkpoint=ckpt)
    with pytest.raises(ConfigError, match="other settings"):  # ... is not resumed by a 2-epoch one
        train_irn(fresh(), pairs, **{**kw, "epochs": 2}, checkpoint=ckpt)
