"""3D queries on one planar patch, found by branch-and-bound (Konyushkova, Sznitman, Fua; CVIU 2019 §5).

Scattered supervoxels are slow to annotate in a volume: the annotator has to find each one. A plane
through the volume, shown as one 2D slice at any orientation, is what a person labels fast. So the
query is the planar patch with the most uncertainty on it: the plane through a candidate supervoxel's
centroid c with unit normal n(θ, φ) = (sin θ cos φ, sin θ sin φ, cos θ), whose patch holds the
supervoxels s with |n · (x_s − c)| ≤ r (within r of the plane) and |x_s − c| ≤ R (the patch's extent),
and whose score is the summed uncertainty u_s of those supervoxels.

Orientations are a grid of n_θ × n_φ normals over θ ∈ (0, π), φ ∈ (0, π) (n and −n are the same
plane, so a half sphere of directions covers every plane). Exhaustive search scores every grid normal.
Branch-and-bound splits boxes of the grid and needs, per box, an **upper bound** on the score of any
normal in it:

- every normal of the box lies within an angle δ of the box's central normal n_c, with
  δ ≤ Δθ + max_box(sin θ)·Δφ (walk along the meridian, then along the parallel, whose arc is at least
  the great-circle distance); Δθ, Δφ are the box's half-widths;
- a supervoxel at v = x_s − c making angle α with n_c makes an angle β ∈ [α − δ, α + δ] with any normal
  of the box, so |n · v| = |v||cos β| ≥ |v| · min_{β in that range} |cos β| (0 if the range holds π/2);
- the bound sums u_s over the supervoxels whose smallest possible distance is ≤ r; it is valid (never
  below the score of any normal in the box), and it equals the exact score on a one-normal box.

Boxes are explored best bound first; a box whose bound cannot beat the best exact score found so far is
dropped. The result is the exhaustive search's optimum over the same grid (ties: the lowest grid index,
as `numpy.argmax`); `tests/test_active_planes.py` checks it, `benchmarks/active.py` counts the bounds
and exact scores it needs against n_θ · n_φ exact scores per candidate centre.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from frugalseg.errors import ConfigError

__all__ = [
    "PlaneQuery", "PlaneSearchStats", "branch_and_bound_plane", "best_planar_query", "exhaustive_plane",
    "orientation_grid", "patch_members", "plane_basis", "plane_normal", "plane_slice", "random_planar_query",
]

_TOL = 1e-9  # the bound admits points within r + _TOL: round-off never makes it invalid


def orientation_grid(n_theta: int = 36, n_phi: int = 36) -> tuple[np.ndarray, np.ndarray]:
    """Cell-centred angles θ_i = (i + ½)π/n_θ, φ_j = (j + ½)π/n_φ (5° steps by default)."""
    if n_theta < 1 or n_phi < 1:
        raise ConfigError(f"the orientation grid needs n_theta, n_phi ≥ 1, got {n_theta}, {n_phi}.")
    return (np.arange(n_theta) + 0.5) * math.pi / n_theta, (np.arange(n_phi) + 0.5) * math.pi / n_phi


def plane_normal(theta: float | np.ndarray, phi: float | np.ndarray) -> np.ndarray:
    """Unit normal(s) (…, 3) in (z, y, x) axis order of a (D, H, W) volume."""
    theta, phi = np.broadcast_arrays(np.asarray(theta, float), np.asarray(phi, float))
    return np.stack([np.cos(theta), np.sin(theta) * np.sin(phi), np.sin(theta) * np.cos(phi)], -1)


def patch_members(points: np.ndarray, center: np.ndarray, normal: np.ndarray, r: float,
                  radius: float) -> np.ndarray:
    """Boolean per point: within r of the plane and within `radius` of the centre."""
    v = np.asarray(points, float) - np.asarray(center, float)
    return (np.abs(v @ np.asarray(normal, float)) <= r) & ((v * v).sum(1) <= radius * radius)


@dataclass
class PlaneSearchStats:
    """What a search cost: bounds computed, exact plane scores computed, and what exhaustive search needs."""

    bounds: int = 0
    exact: int = 0
    exhaustive: int = 0
    candidates: int = 0
    candidates_pruned: int = 0

    def add(self, other: "PlaneSearchStats") -> None:
        self.bounds += other.bounds
        self.exact += other.exact
        self.exhaustive += other.exhaustive


@dataclass
class _Ball:
    """The points within `radius` of a centre (the only ones any plane's patch can hold)."""

    v: np.ndarray
    norm: np.ndarray
    u: np.ndarray

    @classmethod
    def around(cls, points: np.ndarray, u: np.ndarray, center: np.ndarray, radius: float) -> "_Ball":
        v = np.asarray(points, float) - np.asarray(center, float)
        keep = (v * v).sum(1) <= radius * radius
        v = v[keep]
        return cls(v=v, norm=np.sqrt((v * v).sum(1)), u=np.asarray(u, float)[keep])

    def exact(self, normals: np.ndarray, r: float, chunk: int = 2048) -> np.ndarray:
        """Scores of (k, 3) normals (in chunks: a fine grid times many points would not fit in memory)."""
        out = np.empty(len(normals))
        for a in range(0, len(normals), chunk):
            inside = np.abs(normals[a:a + chunk] @ self.v.T) <= r
            out[a:a + chunk] = np.where(inside, self.u[None], 0.0).sum(1)  # row sums: the same order for any k
        return out

    def bounds(self, n_c: np.ndarray, delta: np.ndarray, r: float) -> np.ndarray:
        """Upper bounds of k boxes at once: central normals (k, 3), angular radii (k,)."""
        safe = np.maximum(self.norm, 1e-300)
        alpha = np.arccos(np.clip((n_c @ self.v.T) / safe, -1.0, 1.0))
        lo = np.maximum(alpha - delta[:, None], 0.0)
        hi = np.minimum(alpha + delta[:, None], math.pi)
        min_cos = np.where((lo <= math.pi / 2) & (hi >= math.pi / 2), 0.0,
                           np.minimum(np.abs(np.cos(lo)), np.abs(np.cos(hi))))
        return np.where(self.norm * min_cos <= r + _TOL, self.u, 0.0).sum(1)


def exhaustive_plane(points: np.ndarray, u: np.ndarray, center: np.ndarray, r: float, radius: float,
                     n_theta: int = 36, n_phi: int = 36) -> tuple[tuple[int, int, float], PlaneSearchStats]:
    """((i, j, score) of the best grid normal through `center`, cost) by scoring all n_θ·n_φ of them."""
    thetas, phis = orientation_grid(n_theta, n_phi)
    ball = _Ball.around(points, u, center, radius)
    normals = plane_normal(thetas[:, None], phis[None, :]).reshape(-1, 3)
    scores = ball.exact(normals, r)
    best = int(np.argmax(scores))
    return (best // n_phi, best % n_phi, float(scores[best])), PlaneSearchStats(exact=scores.size,
                                                                              exhaustive=scores.size)


def branch_and_bound_plane(points: np.ndarray, u: np.ndarray, center: np.ndarray, r: float, radius: float,
                           n_theta: int = 36, n_phi: int = 36, lower: float = -math.inf, batch: int = 32,
                           ) -> tuple[tuple[int, int, float] | None, PlaneSearchStats]:
    """((i, j, score) of the exhaustive optimum over the same grid, cost), found by branch-and-bound.

    `lower`: a score already reached elsewhere (another centre); the result is None when no normal here
    beats it, which is how `best_planar_query` prunes whole candidates. u must be ≥ 0. Boxes are taken
    from the best-bound-first queue `batch` at a time and their children bounded in one vectorised call
    (the bound is the per-box work; Python's per-box overhead would otherwise dominate it).
    """
    u = np.asarray(u, float)
    if (u < 0).any():
        raise ConfigError("plane search needs non-negative uncertainties (the bound assumes it).")
    if batch < 1:
        raise ConfigError(f"batch must be at least 1, got {batch}.")
    thetas, phis = orientation_grid(n_theta, n_phi)
    ball = _Ball.around(points, u, center, radius)
    stats = PlaneSearchStats(exhaustive=n_theta * n_phi)

    def hopeless(b: float) -> bool:
        """Cannot beat the best: below it, or, before anything is found here, not above `lower` (a tie
        with another centre keeps that centre, as exhaustive search over the centres in turn does)."""
        return b < best_score or (best_index is None and b <= lower)

    def bound_boxes(boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
        stats.bounds += len(boxes)
        b = np.asarray(boxes, dtype=np.int64)
        t_lo, t_hi, p_lo, p_hi = thetas[b[:, 0]], thetas[b[:, 1]], phis[b[:, 2]], phis[b[:, 3]]
        s_max = np.where((t_lo <= math.pi / 2) & (t_hi >= math.pi / 2), 1.0,
                         np.maximum(np.sin(t_lo), np.sin(t_hi)))
        delta = np.minimum((t_hi - t_lo) / 2 + s_max * (p_hi - p_lo) / 2, math.pi)
        return ball.bounds(plane_normal((t_lo + t_hi) / 2, (p_lo + p_hi) / 2), delta, r)

    best_score, best_index = lower, None
    root = (0, n_theta - 1, 0, n_phi - 1)
    heap = [(-float(bound_boxes([root])[0]), 0, root)]
    counter = 1
    while heap:
        taken = []
        while heap and len(taken) < batch:
            neg, _, box = heapq.heappop(heap)
            if hopeless(-neg):
                heap.clear()  # best-first: nothing left can beat the best
                break
            taken.append((-neg, box))
        leaves, inner = [], []
        for b, (i0, i1, j0, j1) in taken:
            first = i0 * n_phi + j0
            if best_index is not None and (b < best_score or (b == best_score and first >= best_index)):
                continue  # cannot beat the best (or only tie it at a higher grid index: argmax keeps the lowest)
            (leaves if i0 == i1 and j0 == j1 else inner).append((i0, i1, j0, j1))
        if leaves:
            stats.exact += len(leaves)
            idx = np.array([i0 for i0, _, _, _ in leaves]), np.array([j0 for _, _, j0, _ in leaves])
            scores = ball.exact(plane_normal(thetas[idx[0]], phis[idx[1]]), r)
            for k in np.lexsort((idx[0] * n_phi + idx[1], -scores)):
                s, first = float(scores[k]), int(idx[0][k] * n_phi + idx[1][k])
                if best_index is None and s > lower or best_index is not None and (
                        s > best_score or (s == best_score and first < best_index)):
                    best_score, best_index = s, first
        children = []
        for i0, i1, j0, j1 in inner:
            if i1 - i0 >= j1 - j0:
                mid = (i0 + i1) // 2
                children += [(i0, mid, j0, j1), (mid + 1, i1, j0, j1)]
            else:
                mid = (j0 + j1) // 2
                children += [(i0, i1, j0, mid), (i0, i1, mid + 1, j1)]
        if children:
            for cb, box in zip(bound_boxes(children), children):
                if not hopeless(float(cb)):
                    heapq.heappush(heap, (-float(cb), counter, box))
                    counter += 1
    if best_index is None:
        return None, stats
    return (best_index // n_phi, best_index % n_phi, best_score), stats


@dataclass(frozen=True)
class PlaneQuery:
    """A planar patch to annotate: centre (physical units, (z, y, x)), unit normal, the regions on it."""

    center_region: int
    center: tuple[float, float, float]
    normal: tuple[float, float, float]
    theta: float
    phi: float
    score: float
    regions: tuple[int, ...]
    stats: PlaneSearchStats = field(default_factory=PlaneSearchStats, compare=False)


def best_planar_query(centroids: np.ndarray, u: np.ndarray, r: float, radius: float,
                      n_candidates: int = 10, n_theta: int = 36, n_phi: int = 36,
                      exclude: np.ndarray | None = None, exhaustive: bool = False) -> PlaneQuery:
    """The best planar patch through one of the `n_candidates` most uncertain supervoxels.

    centroids: (n, 3) supervoxel centres in physical units; u: (n,) uncertainties ≥ 0 (labelled
    supervoxels should carry 0: they add nothing); exclude: supervoxels that may not be centres.
    Candidates are tried in order of the uncertainty within their ball, so the first found plane is
    already good and later candidates are pruned by their ball sum or inside the search (`lower`).
    `exhaustive=True` scores every grid normal instead (the benchmark's reference).
    """
    centroids, u = np.asarray(centroids, float), np.asarray(u, float)
    if n_candidates < 1:
        raise ConfigError(f"n_candidates must be at least 1, got {n_candidates}.")
    if centroids.ndim != 2 or centroids.shape[1] != 3 or u.shape != (centroids.shape[0],):
        raise ConfigError(f"need (n, 3) centroids and (n,) uncertainties, got {centroids.shape}, {u.shape}.")
    allowed = np.ones(len(u), bool) if exclude is None else ~np.asarray(exclude, bool)
    if not allowed.any():
        raise ConfigError("every supervoxel is excluded: nothing left to query.")
    order = np.flatnonzero(allowed)[np.argsort(-u[allowed], kind="stable")][:n_candidates]
    d2 = ((centroids[order, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    ball_sums = ((d2 <= radius * radius) * u[None]).sum(1)
    stats = PlaneSearchStats(candidates=len(order))
    best: tuple[float, int, int, int] | None = None
    for k in np.argsort(-ball_sums, kind="stable"):
        c = order[k]
        lower = -math.inf if best is None else best[0]
        if not exhaustive and ball_sums[k] <= lower:
            stats.candidates_pruned += 1
            stats.exhaustive += n_theta * n_phi
            continue
        if exhaustive:
            found, st = exhaustive_plane(centroids, u, centroids[c], r, radius, n_theta, n_phi)
            found = found if found[2] > lower else None
        else:
            found, st = branch_and_bound_plane(centroids, u, centroids[c], r, radius, n_theta, n_phi, lower=lower)
        stats.add(st)
        if found is not None:
            best = (found[2], int(c), found[0], found[1])
    assert best is not None
    score, c, i, j = best
    thetas, phis = orientation_grid(n_theta, n_phi)
    normal = plane_normal(thetas[i], phis[j])
    members = np.flatnonzero(patch_members(centroids, centroids[c], normal, r, radius))
    return PlaneQuery(center_region=c, center=tuple(centroids[c]), normal=tuple(normal), theta=float(thetas[i]),
                      phi=float(phis[j]), score=score, regions=tuple(int(m) for m in members), stats=stats)


def random_planar_query(centroids: np.ndarray, r: float, radius: float, rng: np.random.Generator,
                        exclude: np.ndarray | None = None) -> PlaneQuery:
    """A plane through a random supervoxel with a uniformly random orientation (the baseline)."""
    centroids = np.asarray(centroids, float)
    allowed = np.flatnonzero(np.ones(len(centroids), bool) if exclude is None else ~np.asarray(exclude, bool))
    if not allowed.size:
        raise ConfigError("every supervoxel is excluded: nothing left to query.")
    c = int(rng.choice(allowed))
    normal = rng.normal(size=3)
    normal /= np.linalg.norm(normal)
    if normal[1] < 0:  # the grid's half of the directions: φ ∈ [0, π] means a (z, y, x) normal with y ≥ 0
        normal = -normal
    theta, phi = math.acos(float(np.clip(normal[0], -1, 1))), math.atan2(normal[1], normal[2])
    members = np.flatnonzero(patch_members(centroids, centroids[c], normal, r, radius))
    return PlaneQuery(center_region=c, center=tuple(centroids[c]), normal=tuple(normal), theta=theta, phi=phi,
                      score=0.0, regions=tuple(int(m) for m in members))


def plane_basis(normal: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(row direction, column direction): unit vectors spanning the plane ⊥ `normal`, the column direction as
    close to the volume's x axis as it can be, so an axial plane (normal along z) shows as the usual image,
    rows along y and columns along x."""
    n = np.asarray(normal, float)
    n = n / np.linalg.norm(n)
    ref = np.array([0.0, 0.0, 1.0]) if abs(n[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e_col = ref - (ref @ n) * n
    e_col /= np.linalg.norm(e_col)
    e_row = np.cross(n, e_col)
    if e_row @ np.array([0.0, 1.0, 0.0]) < 0 or (abs(e_row[1]) < 1e-12 and e_row[0] < 0):
        e_row = -e_row
    return e_row, e_col


def plane_slice(volume: np.ndarray, center: Sequence[float], normal: Sequence[float], half_size: float,
                spacing: Sequence[float] = (1.0, 1.0, 1.0), step: float | None = None, order: int = 1,
                cval: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The plane through `center` (physical units) resampled as a 2D image of side 2·half_size.

    Returns (slice (h, w), voxel coordinates (3, h, w) of its pixels: what an answer painted on the slice
    is written back to). `step` is the pixel size in physical units (default: the finest spacing);
    order 1 for images, 0 for label volumes; outside the volume is `cval`.
    """
    from scipy.ndimage import map_coordinates

    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ConfigError(f"plane_slice needs a (D, H, W) volume, got shape {volume.shape}.")
    spacing = np.asarray(spacing, float)
    step = float(spacing.min()) if step is None else float(step)
    e_row, e_col = plane_basis(normal)
    offsets = np.arange(-half_size, half_size + 1e-9, step)
    grid = (np.asarray(center, float)[:, None, None] + e_row[:, None, None] * offsets[None, :, None]
            + e_col[:, None, None] * offsets[None, None, :])
    coords = grid / spacing[:, None, None]
    values = map_coordinates(volume, coords, order=order, mode="constant", cval=cval)
    return values, coords
