"""Regions, their graph, the uncertainty criteria and the batch selection of frugalseg.active."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from frugalseg.active.acquisition import (
    combined_probabilities, conditional_entropy, entropy, geometric_probabilities, least_confidence, margin,
    mc_dropout_probabilities, region_uncertainty, selection_entropy,
)
from frugalseg.active.geometry import region_graph, region_means, superpixels, supervoxels
from frugalseg.active.selection import random_regions, select_regions
from frugalseg.errors import ConfigError, DataError
from tests.conftest import data_path


def _blocks() -> np.ndarray:
    """A 4×6 grid of three regions: 0 | 1 | 2 side by side, each 4×2."""
    return np.repeat(np.array([[0, 0, 1, 1, 2, 2]]), 4, axis=0)


def test_graph_of_hand_made_regions():
    labels = _blocks()
    image = np.where(labels == 2, 1.0, 0.0)
    g = region_graph(labels, image, sigma_distance=2.0, sigma_appearance=1.0)
    assert g.n_regions == 3 and g.sizes.tolist() == [8, 8, 8]
    assert g.edges.tolist() == [[0, 1], [1, 2]]  # 0 and 2 do not touch
    np.testing.assert_allclose(g.centroids, [[1.5, 0.5], [1.5, 2.5], [1.5, 4.5]])
    # centroids 2 apart: exp(-4/8); appearance 0 vs 1 on the second edge: × exp(-1/2)
    np.testing.assert_allclose(g.weights, [np.exp(-0.5), np.exp(-0.5) * np.exp(-0.5)])
    t = g.transition().toarray()
    np.testing.assert_allclose(t.sum(1), 1.0)
    np.testing.assert_allclose(t[1, [0, 2]], np.array([1.0, np.exp(-0.5)]) / (1 + np.exp(-0.5)))
    assert t[0, 1] == 1.0 and t[2, 1] == 1.0 and t[1, 0] > t[1, 2]  # the alike neighbour is the likelier step


def test_geometric_and_combined_probabilities():
    labels = _blocks()
    g = region_graph(labels, np.zeros(labels.shape), sigma_distance=2.0, sigma_appearance=1.0)
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])
    pg = geometric_probabilities(p, g)
    np.testing.assert_allclose(pg[0], p[1])  # region 0's only neighbour is 1
    np.testing.assert_allclose(pg[1], [0.5, 0.5])  # equal weights to a 0.9 and a 0.1 neighbour
    pc = combined_probabilities(p, pg)
    np.testing.assert_allclose(pc[0], np.array([0.81, 0.01]) / 0.82)  # agreeing: sharper than either
    np.testing.assert_allclose(pc[2], [0.5, 0.5])  # 0.1·0.9 against 0.9·0.1: contradicted
    # region 2 is confident (feature entropy low) but contradicted by its neighbour: combined is higher
    q = np.array([[0.99, 0.01], [0.99, 0.01], [0.01, 0.99]])
    u_feat, u_comb = region_uncertainty(q, g, source="feature"), region_uncertainty(q, g, source="combined")
    np.testing.assert_allclose(u_comb[2], np.log(2))  # 0.01·0.99 vs 0.99·0.01: an even split
    assert u_comb[2] > 10 * u_feat[2] and u_comb[0] < u_feat[0]  # agreement lowers it
    with pytest.raises(ConfigError, match="needs the region graph"):
        region_uncertainty(p, None, source="geometry")
    with pytest.raises(ConfigError, match="unknown criterion 'bald'"):
        region_uncertainty(p, g, criterion="bald")


def test_multiclass_criteria_by_hand():
    p = np.array([[0.5, 0.3, 0.2], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.2, 0.2]])
    np.testing.assert_allclose(least_confidence(p), [0.5, 2 / 3, 0.4])
    np.testing.assert_allclose(margin(p), [0.8, 1.0, 0.6])
    h2 = lambda q: -(q * np.log(q) + (1 - q) * np.log(1 - q))  # noqa: E731
    np.testing.assert_allclose(selection_entropy(p), [h2(0.5), h2(1 / 3), h2(0.6)])
    np.testing.assert_allclose(conditional_entropy(p), [h2(0.5 / 0.8), np.log(2), h2(0.75)])
    np.testing.assert_allclose(entropy(np.array([[0.5, 0.5]])), [np.log(2)])
    # spread over unlikely classes: entropy ranks it above a two-way tie, the decision criteria do not
    spread, tie = np.array([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1]]), np.array([[0.5, 0.5, 0, 0, 0, 0]])
    assert entropy(spread)[0] > entropy(tie)[0]
    assert conditional_entropy(spread)[0] < conditional_entropy(tie)[0]
    assert margin(spread)[0] < margin(tie)[0]


def test_region_means_and_shapes():
    labels = _blocks()
    probs = np.stack([labels / 2.0, 1 - labels / 2.0])
    np.testing.assert_allclose(region_means(probs, labels), [[0, 1], [0.5, 0.5], [1, 0]])
    with pytest.raises(DataError, match="do not match regions"):
        region_means(np.zeros((2, 3, 3)), labels)
    with pytest.raises(DataError, match="does not match regions"):
        region_graph(labels, np.zeros((5, 5)))


def test_superpixels_on_an_isbi_section():
    root = data_path("isbi2012")
    image = np.asarray(Image.open(root / "train" / "image" / "0.png").convert("L"), np.float32)[:128, :128] / 255
    labels = superpixels(image, n_segments=64)
    n = int(labels.max()) + 1
    assert labels.shape == (128, 128) and 30 <= n <= 120
    assert sorted(np.unique(labels)) == list(range(n))
    g = region_graph(labels, image)
    assert g.n_regions == n and len(g.edges) >= n - 1
    assert (g.weights > 0).all() and (g.weights <= 1).all()
    with pytest.raises(DataError, match="needs a 2D image"):
        superpixels(np.zeros((4, 4, 4)))


def test_supervoxels_respect_spacing():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(8, 32, 32)).astype(np.float32) * 0.01
    vol[:, :, 16:] += 1.0
    labels = supervoxels(vol, n_segments=16, spacing=(4, 1, 1))
    assert labels.shape == vol.shape
    left, right = np.unique(labels[:, :, :16]), np.unique(labels[:, :, 16:])
    assert not set(left) & set(right)  # no supervoxel crosses the intensity step
    g = region_graph(labels, vol, spacing=(4, 1, 1))
    assert g.centroids[:, 0].max() <= 4 * 7  # z in physical units


def test_select_regions_keeps_neighbours_apart():
    labels = np.repeat(np.arange(6)[None], 3, axis=0)  # a row of 6 regions, each touching the next
    g = region_graph(labels, np.zeros(labels.shape))
    scores = [np.array([0.9, 1.0, 0.95, 0.1, 0.2, 0.3])]
    picked = select_regions(scores, [g], 3)
    assert [q.region for q in picked] == [1, 5, 3]  # 1 blocks 0 and 2; 5 blocks 4; then 3
    assert [q.region for q in select_regions(scores, [g], 3, diversity="none")] == [1, 2, 0]
    done = [np.array([False, True, False, False, False, False])]
    assert [q.region for q in select_regions(scores, [g], 2, labelled=done)] == [2, 0]
    assert len(select_regions(scores, [g], 6)) == 6  # fewer non-adjacent than asked: adjacent ones admitted
    two = select_regions(scores * 2, [g, g], 2)
    assert {(q.image, q.region) for q in two} == {(0, 1), (1, 1)}
    rnd = random_regions([g], 4, np.random.default_rng(0), labelled=done)
    assert len(rnd) == 4 and all(q.region != 1 for q in rnd)
    with pytest.raises(ConfigError, match="3 scores for 6 regions"):
        select_regions([np.zeros(3)], [g], 1)


def test_mc_dropout_mutual_information():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 1), torch.nn.Dropout2d(0.5), torch.nn.Conv2d(8, 3, 1))
    net.eval()
    x = torch.randn(2, 1, 5, 5)
    mean, mi = mc_dropout_probabilities(net, x, passes=6)
    assert mean.shape == (2, 3, 5, 5) and mi.shape == (2, 5, 5)
    torch.testing.assert_close(mean.sum(1), torch.ones(2, 5, 5))
    assert (mi >= 0).all() and mi.max() > 0 and not net.training and not net[1].training  # restored
    with pytest.raises(ConfigError, match="needs a model with dropout"):
        mc_dropout_probabilities(torch.nn.Conv2d(1, 2, 1), x)


def test_pixel_walk_follows_the_dark_line():
    # a dark vertical line on a bright background; the classifier calls the line "membrane" except one gap
    image = np.ones((7, 7), np.float32)
    image[:, 3] = 0.0
    p_mem = np.where(image == 0, 0.95, 0.05).astype(np.float32)
    p_mem[3, 3] = 0.05  # the gap: a dark pixel called cell
    probs = np.stack([1 - p_mem, p_mem])
    from frugalseg.active.acquisition import pixel_geometric_probabilities, pixel_uncertainty

    pg = pixel_geometric_probabilities(probs, image, sigma_appearance=0.1)
    assert pg[1, 3, 3] > 0.9  # its (dark) neighbours along the line say membrane, the bright ones barely count
    assert pg[1, 3, 0] < 0.1
    np.testing.assert_allclose(pg.sum(0), 1.0, rtol=1e-6)
    feat = pixel_uncertainty(probs, source="feature")
    comb = pixel_uncertainty(probs, image, source="combined", sigma_appearance=0.1)
    assert feat[3, 3] == pytest.approx(feat[0, 3], rel=1e-5)  # the classifier is as sure at the gap as anywhere
    assert comb[3, 3] > 3 * comb[0, 3] and comb.argmax() == 3 * 7 + 3  # the combined criterion finds the gap
    with pytest.raises(ConfigError, match="needs the image"):
        pixel_uncertainty(probs, None, source="combined")


def test_pixel_walk_keeps_an_isolated_pixel_own_prediction():
    from frugalseg.active.acquisition import pixel_geometric_probabilities, pixel_uncertainty

    image = np.zeros((5, 5), np.float32)
    image[2, 2] = 1.0  # unlike all its neighbours: every weight underflows at a tiny sigma
    probs = np.stack([np.full((5, 5), 0.99, np.float32), np.full((5, 5), 0.01, np.float32)])
    pg = pixel_geometric_probabilities(probs, image, sigma_appearance=1e-6)
    np.testing.assert_allclose(pg[:, 2, 2], probs[:, 2, 2], rtol=1e-6)  # no evidence is not disagreement
    comb = pixel_uncertainty(probs, image, source="combined", sigma_appearance=1e-6)
    assert comb[2, 2] < 0.1  # confident everywhere, so nowhere near ln 2
