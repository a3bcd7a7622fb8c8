"""3D planar queries: branch-and-bound returns the exhaustive optimum, with fewer evaluations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from frugalseg.active.geometry import region_graph, supervoxels
from frugalseg.active.planes import (
    best_planar_query, branch_and_bound_plane, exhaustive_plane, orientation_grid, patch_members, plane_basis,
    plane_normal, plane_slice, random_planar_query,
)
from frugalseg.errors import ConfigError


@pytest.mark.parametrize("seed", range(12))
def test_branch_and_bound_finds_the_exhaustive_optimum(seed):
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 20, size=(300, 3)) * np.array([2.0, 1.0, 1.0])  # anisotropic, as EM stacks
    u = rng.exponential(size=300) * (rng.random(300) < 0.5)  # many zeros: ties and flat regions
    center = points[rng.integers(300)]
    (i, j, s), ex = exhaustive_plane(points, u, center, r=1.5, radius=10.0, n_theta=18, n_phi=20)
    (bi, bj, bs), st = branch_and_bound_plane(points, u, center, r=1.5, radius=10.0, n_theta=18, n_phi=20)
    assert (bi, bj, bs) == (i, j, s)
    assert ex.exact == 18 * 20 and st.exhaustive == 18 * 20
    assert st.exact < ex.exact and st.bounds < ex.exact


def test_exhaustive_scores_by_hand():
    # points on the plane z = 0 through the origin, one far above it; the grid's nearest normal is 10° off z
    points = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 1.0], [5.0, 0.0, 0.0]])
    u = np.array([1.0, 2.0, 3.0, 10.0])
    (i, j, s), _ = exhaustive_plane(points, u, np.zeros(3), r=0.3, radius=3.0, n_theta=9, n_phi=8)
    thetas, _ = orientation_grid(9, 8)
    assert s == 6.0 and abs(thetas[i]) < math.pi / 9  # the normal nearest to z; the far point is outside R
    assert patch_members(points, np.zeros(3), np.array([1.0, 0, 0]), 0.1, 3.0).tolist() == [True] * 3 + [False]


def test_pruning_with_a_lower_score_from_elsewhere():
    rng = np.random.default_rng(1)
    points = rng.uniform(0, 10, size=(100, 3))
    u = rng.random(100)
    (_, _, s), _ = exhaustive_plane(points, u, points[0], 1.0, 6.0, 12, 12)
    found, st = branch_and_bound_plane(points, u, points[0], 1.0, 6.0, 12, 12, lower=s + 1e-9)
    assert found is None and st.exact <= 1
    with pytest.raises(ConfigError, match="non-negative"):
        branch_and_bound_plane(points, -u, points[0], 1.0, 6.0)


def test_best_planar_query_over_candidates_matches_exhaustive():
    rng = np.random.default_rng(3)
    points = rng.uniform(0, 30, size=(500, 3))
    u = rng.exponential(size=500)
    q = best_planar_query(points, u, r=2.0, radius=12.0, n_candidates=8, n_theta=16, n_phi=16)
    qe = best_planar_query(points, u, r=2.0, radius=12.0, n_candidates=8, n_theta=16, n_phi=16, exhaustive=True)
    assert q.score == pytest.approx(qe.score, rel=1e-12) and q.center_region == qe.center_region
    assert q.stats.bounds + q.stats.exact < qe.stats.exact == 8 * 16 * 16
    members = patch_members(points, points[q.center_region], np.array(q.normal), 2.0, 12.0)
    assert np.flatnonzero(members).tolist() == list(q.regions)
    assert sum(u[list(q.regions)]) == pytest.approx(q.score)
    excluded = np.zeros(500, bool)
    excluded[q.center_region] = True
    assert best_planar_query(points, u, 2.0, 12.0, n_candidates=8, n_theta=8, n_phi=8,
                             exclude=excluded).center_region != q.center_region
    rq = random_planar_query(points, 2.0, 12.0, np.random.default_rng(0))
    assert abs(np.linalg.norm(rq.normal) - 1) < 1e-12 and rq.center_region in rq.regions


def test_plane_on_real_supervoxels_and_its_slice():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(12, 40, 40)).astype(np.float32)
    labels = supervoxels(vol, n_segments=60, spacing=(2, 1, 1))
    g = region_graph(labels, vol, spacing=(2, 1, 1))
    u = rng.random(g.n_regions)
    q = best_planar_query(g.centroids, u, r=3.0, radius=15.0, n_candidates=5, n_theta=10, n_phi=10)
    assert q.regions and q.score > 0
    # an axial plane (normal along z) shows the section itself
    img, coords = plane_slice(vol, center=(2 * 5.0, 20.0, 20.0), normal=(1.0, 0, 0), half_size=10, spacing=(2, 1, 1))
    assert img.shape == (21, 21)
    np.testing.assert_allclose(img, vol[5, 10:31, 10:31], atol=1e-5)
    np.testing.assert_allclose(coords[0], 5.0)
    e_row, e_col = plane_basis(plane_normal(0.7, 1.1))
    assert abs(e_row @ e_col) < 1e-12 and abs(e_row @ plane_normal(0.7, 1.1)) < 1e-12


def test_ties_between_centres_keep_the_first_as_exhaustive_search():
    cluster = np.array([[0.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]])
    points = np.concatenate([cluster, cluster + 100.0])  # two identical clusters far apart
    u = np.ones(len(points))
    q = best_planar_query(points, u, r=0.5, radius=3.0, n_candidates=8, n_theta=6, n_phi=6)
    qe = best_planar_query(points, u, r=0.5, radius=3.0, n_candidates=8, n_theta=6, n_phi=6, exhaustive=True)
    assert (q.center_region, q.theta, q.phi, q.score) == (qe.center_region, qe.theta, qe.phi, qe.score)
    found, _ = branch_and_bound_plane(points, u, points[4], 0.5, 3.0, 6, 6, lower=qe.score)
    assert found is None  # a tie with a score reached elsewhere is not an improvement


def test_random_plane_angles_match_its_normal():
    rng = np.random.default_rng(5)
    points = rng.uniform(0, 10, size=(50, 3))
    for _ in range(30):
        q = random_planar_query(points, 1.0, 5.0, rng)
        np.testing.assert_allclose(plane_normal(q.theta, q.phi), q.normal, atol=1e-12)
        assert 0 <= q.phi <= math.pi
