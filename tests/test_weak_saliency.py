"""Manifold-ranking saliency and MCOF's Bayesian merge, on hand-made images with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from frugalseg.weak.saliency import SALIENCY, bayes_merge, bayes_posterior, manifold_ranking_saliency

RED, BLUE, GREEN = (210, 40, 40), (40, 60, 200), (40, 200, 60)
V = 255


def _scene(h=96, w=128, centre=None, radii=(22, 30), fg=RED, bg=(60, 140, 70), noise=6.0, seed=0):
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float64)
    img[:] = bg
    cy, cx = centre if centre is not None else (h / 2, w / 2)
    yy, xx = np.mgrid[:h, :w]
    blob = ((yy - cy) / radii[0]) ** 2 + ((xx - cx) / radii[1]) ** 2 < 1
    img[blob] = fg
    img += rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), blob


def _border(shape, width=8):
    b = np.zeros(shape, bool)
    b[:width] = b[-width:] = b[:, :width] = b[:, -width:] = True
    return b


# ---- saliency -------------------------------------------------------------------------------------
def test_centred_blob_is_salient_and_border_is_not():
    img, blob = _scene()
    s = manifold_ranking_saliency(img)
    assert s.shape == blob.shape and s.dtype == np.float32
    assert s.min() >= 0.0 and s.max() <= 1.0
    assert s[blob].mean() > 0.9
    assert s[_border(blob.shape)].mean() < 0.05
    assert s[~blob].mean() < 0.05
    # deterministic, and reachable through the name table
    np.testing.assert_array_equal(s, SALIENCY["gmr"](img))


def test_off_centre_blob_and_uniform_image():
    img, blob = _scene(centre=(30, 40), radii=(14, 18), fg=BLUE, seed=1)
    s = manifold_ranking_saliency(img, n_segments=150)
    assert s[blob].mean() > 0.8 and s[_border(blob.shape)].mean() < 0.05
    flat = np.full((40, 50, 3), 128, np.uint8)
    np.testing.assert_array_equal(manifold_ranking_saliency(flat), np.zeros((40, 50), np.float32))


def test_saliency_with_given_segments_and_shape_errors():
    img, blob = _scene()
    grid = (np.arange(96)[:, None] // 8) * 16 + np.arange(128)[None, :] // 8  # 12 x 16 blocks of 8 x 8
    s = manifold_ranking_saliency(img, segments=grid)
    assert s[blob].mean() > 0.7 and s[_border(blob.shape)].mean() < 0.1
    # constant on each given segment
    assert all(np.ptp(s[grid == k]) == 0 for k in (0, 37, 100))
    with pytest.raises(ValueError, match=r"segments are \(10, 10\) but the image is \(96, 128\)"):
        manifold_ranking_saliency(img, segments=np.zeros((10, 10), int))
    with pytest.raises(ValueError, match=r"RGB array \(H, W, 3\)"):
        manifold_ranking_saliency(img[..., 0])


def test_saliency_on_a_real_image_favours_the_object():
    from conftest import data_path
    from frugalseg.data import open_dataset

    data_path("msrc21")
    ds = open_dataset("msrc-objects", "train")
    image, mask = ds.read_pair(next(s for s in ds.samples if s.id == "12_34_s"))  # a car on a street
    s = manifold_ranking_saliency(image)
    obj, bg = (mask != 0) & (mask != V), mask == 0
    assert s[obj].mean() > 0.6 and s[bg].mean() < 0.2


# ---- Bayesian posterior and merge -----------------------------------------------------------------
def test_posterior_matches_the_formula_by_hand():
    # fg = the 2 red pixels, bg = the 2 blue pixels; 2 bins per Lab channel (L 0..50..100, a/b -100..0..100).
    # Red Lab ~ (46, 64, 43), blue ~ (34, 43, -74): same L and a bins, different b bins. Smoothed per-channel
    # histograms (count + 1) / (2 + 2): a shared bin is 3/4 under both, so only b decides:
    # p(red|fg) / p(red|bg) = (3/4) / (1/4) = 3 and p(blue|fg) / p(blue|bg) = 1/3, hence
    # posterior = S r / (S r + 1 - S) with r = 3 (red) or 1/3 (blue).
    img = np.array([[RED, RED, BLUE, BLUE]], np.uint8)
    fg = np.array([[1, 1, 0, 0]], bool)
    sal = np.array([[0.5, 0.2, 0.5, 0.9]])
    post = bayes_posterior(sal, fg, ~fg, img, bins=2, smoothing=1.0)
    np.testing.assert_allclose(post[0], [3 / 4, 3 / 7, 1 / 4, 3 / 4], rtol=1e-6)
    # an empty background mask gives a uniform p(x|bg): the posterior is then S p(x|fg) / (S p(x|fg) + (1 - S) / 8)
    post = bayes_posterior(sal, fg, np.zeros_like(fg), img, bins=2, smoothing=1.0)
    pf_red = (3 / 4) ** 3
    assert post[0, 0] == pytest.approx(0.5 * pf_red / (0.5 * pf_red + 0.5 / 8), rel=1e-6)


def _red_object_scene():
    """Blue background, a red square object; only its left part is labelled (class 3)."""
    img, _ = _scene(h=60, w=80, bg=BLUE, fg=BLUE, noise=5.0, seed=2)
    obj = np.zeros((60, 80), bool)
    obj[15:45, 20:60] = True
    rng = np.random.default_rng(3)
    img[obj] = np.clip(np.array(RED) + rng.normal(0, 5, (obj.sum(), 3)), 0, 255).astype(np.uint8)
    regions = np.zeros((60, 80), np.uint8)
    regions[15:45, 20:32] = 3  # the discriminative part only
    regions[15:45, 32:36] = V  # an unknown band
    sal = np.where(obj, 0.9, 0.1)
    return img, obj, regions, sal


def test_bayes_merge_completes_the_object_and_keeps_background():
    img, obj, regions, sal = _red_object_scene()
    out = bayes_merge(sal, regions, img, background_index=0)
    assert out.dtype == np.uint8
    assert (out[obj] == 3).all()  # the missing part (and the unknown band) became object
    assert (out[~obj] == 0).all()  # the blue background stayed background
    # the input is not modified
    assert (regions[15:45, 40:60] == 0).all()


def test_bayes_merge_needs_an_object_region_to_add_to():
    img, obj, regions, sal = _red_object_scene()
    # a salient green blob away from any object region stays background
    img[2:10, 2:10] = GREEN
    sal = sal.copy()
    sal[2:10, 2:10] = 0.95
    out = bayes_merge(sal, regions, img)
    assert (out[2:10, 2:10] == 0).all() and (out[obj] == 3).all()
    # no object at all: nothing changes
    empty = np.zeros_like(regions)
    np.testing.assert_array_equal(bayes_merge(sal, empty, img), empty)


def test_bayes_merge_gives_each_added_pixel_the_nearest_object_class():
    img, obj, regions, sal = _red_object_scene()
    regions[15:45, 48:60] = 7  # a second labelled part at the right end, another class
    out = bayes_merge(sal, regions, img)
    assert (out[15:45, 20:38] == 3).all() and (out[15:45, 42:60] == 7).all()
    assert set(np.unique(out[obj]).tolist()) == {3, 7} and (out[~obj] == 0).all()


def test_bayes_merge_removal_needs_low_posterior_and_background_colour():
    img, obj, regions, sal = _red_object_scene()
    regions = regions.copy()
    regions[50:58, 5:20] = 3  # a blue (background-coloured) patch wrongly labelled object, not salient
    sal = sal.copy()
    sal[50:58, 5:20] = 0.02
    sal[15:45, 20:26] = 0.02  # part of the red object is not salient: its colour keeps it
    out = bayes_merge(sal, regions, img)
    assert (out[50:58, 5:20] == 0).all()
    assert (out[15:45, 20:26] == 3).all()
    kept = bayes_merge(sal, regions, img, remove_below=0.0)  # removal off
    assert (kept[50:58, 5:20] == 3).all()


def test_bayes_merge_errors():
    img, obj, regions, sal = _red_object_scene()
    with pytest.raises(ValueError, match=r"saliency is \(10, 10\) but regions are \(60, 80\)"):
        bayes_merge(np.zeros((10, 10)), regions, img)
    with pytest.raises(ValueError, match=r"regions are \(60, 79\) but the image is \(60, 80\)"):
        bayes_merge(sal[:, :-1], regions[:, :-1], img)
    with pytest.raises(ValueError, match="needs a background class"):
        bayes_merge(sal, regions, img, background_index=None)
    with pytest.raises(ValueError, match="remove_below <= add_above"):
        bayes_merge(sal, regions, img, add_above=0.1, remove_below=0.2)
    with pytest.raises(ValueError, match=r"fg_mask is \(2, 2\)"):
        bayes_posterior(sal, np.zeros((2, 2), bool), obj, img)
