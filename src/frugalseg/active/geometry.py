"""Regions to query and the graph that carries the geometric prior (Konyushkova, Sznitman, Fua 2015/2019).

Active learning for segmentation asks about *regions*, not pixels: an annotator answers "what is this
superpixel" far faster than 500 single-pixel questions, and neighbouring pixels are near-duplicates.
2D images are cut into SLIC superpixels, volumes into SLIC supervoxels (skimage's `slic` works on 3D
arrays with per-axis `spacing`, so anisotropic EM stacks get compact supervoxels in physical units).

`RegionGraph` joins regions that touch (share a face along an axis). Its edge weights fall with the
distance between centroids and with the difference of their mean appearance,

    w_ij = exp(-|c_i - c_j|² / 2σ_d²) · exp(-|a_i - a_j|² / 2σ_a²),

so that a random walk (`transition`, rows of W normalised to sum 1) mostly moves between near and
alike regions: those are the neighbours whose predictions should agree with a region's own under a
smoothness prior (`frugalseg.active.acquisition.geometric_probabilities`). σ_d and σ_a default to the
medians over the graph's edges, so the weights adapt to the superpixel size and the image contrast
instead of hiding a per-dataset constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import sparse

from frugalseg.errors import DataError

__all__ = ["RegionGraph", "region_graph", "region_means", "robust_scale", "superpixels", "supervoxels"]


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Contiguous ids 0..n-1 in the order of the old ids, int32 (SLIC can skip ids)."""
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int32)


def superpixels(image: np.ndarray, n_segments: int = 400, compactness: float | None = None,
                channel_axis: int | None = None) -> np.ndarray:
    """SLIC superpixels of a 2D image, ids 0..n-1 (int32, the image's H×W).

    `image`: (H, W) greyscale or (H, W, C) colour with `channel_axis=-1`. `compactness` trades colour
    for shape; None picks 0.1 for greyscale values in [0, 1] (skimage's default 10 assumes Lab colour
    in 0..100 and would give a square grid on [0, 1] EM sections) and 10 for colour images.
    """
    from skimage.segmentation import slic

    image = np.asarray(image)
    spatial = image.ndim - (1 if channel_axis is not None else 0)
    if spatial != 2:
        raise DataError(f"superpixels needs a 2D image (H, W) or (H, W, C), got shape {image.shape}.")
    if n_segments < 1:
        raise DataError(f"n_segments must be at least 1, got {n_segments}.")
    image = image.astype(np.float32)
    if compactness is None:
        compactness = 10.0 if channel_axis is not None else 0.1
    if channel_axis is None:
        image = _unit_range(image)
    labels = slic(image, n_segments=n_segments, compactness=compactness, channel_axis=channel_axis,
                  start_label=0, enforce_connectivity=True)
    return _relabel(labels)


def supervoxels(volume: np.ndarray, n_segments: int = 2000, compactness: float = 0.1,
                spacing: Sequence[float] | None = None) -> np.ndarray:
    """SLIC supervoxels of a greyscale (D, H, W) volume, ids 0..n-1 (int32).

    `spacing` (per axis, e.g. (4, 1, 1) for EM sections four times thicker than a pixel) makes SLIC
    measure distance in physical units, so supervoxels are not flattened along the thick axis.
    """
    from skimage.segmentation import slic

    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise DataError(f"supervoxels needs a (D, H, W) volume, got shape {volume.shape}.")
    if n_segments < 1:
        raise DataError(f"n_segments must be at least 1, got {n_segments}.")
    labels = slic(_unit_range(volume.astype(np.float32)), n_segments=n_segments, compactness=compactness,
                  channel_axis=None, spacing=None if spacing is None else np.asarray(spacing, float),
                  start_label=0, enforce_connectivity=True)
    return _relabel(labels)


def _unit_range(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def region_means(values: np.ndarray, labels: np.ndarray, n_regions: int | None = None) -> np.ndarray:
    """Per-region mean of `values`: (*S) → (n,), or (C, *S) → (n, C) (e.g. class probabilities)."""
    labels = np.asarray(labels)
    n = int(labels.max()) + 1 if n_regions is None else n_regions
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n).astype(np.float64)
    counts[counts == 0] = 1.0
    values = np.asarray(values)
    if values.shape == labels.shape:
        return np.bincount(flat, weights=values.ravel().astype(np.float64), minlength=n) / counts
    if values.shape[1:] != labels.shape:
        raise DataError(f"values of shape {values.shape} do not match regions of shape {labels.shape}.")
    sums = np.stack([np.bincount(flat, weights=v.ravel().astype(np.float64), minlength=n) for v in values], 1)
    return sums / counts[:, None]


def robust_scale(values: np.ndarray) -> float:
    """The median of non-negative differences, or the median of the non-zero ones when most are zero
    (quantised or flat images), or 1: a σ for edge weights that is never 0."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return 1.0
    med = float(np.median(values))
    if med > 0:
        return med
    nonzero = values[values > 0]
    return float(np.median(nonzero)) if nonzero.size else 1.0


@dataclass
class RegionGraph:
    """Regions of one image or volume and their weighted adjacency.

    labels: region id per pixel/voxel; sizes: pixels per region; centroids: (n, ndim) in physical units
    (`spacing` applied); appearance: (n, C) mean image value per region; edges: (m, 2) with i < j;
    weights: (m,) in (0, 1].
    """

    labels: np.ndarray
    sizes: np.ndarray
    centroids: np.ndarray
    appearance: np.ndarray
    edges: np.ndarray
    weights: np.ndarray

    @property
    def n_regions(self) -> int:
        return int(self.sizes.shape[0])

    def adjacency(self) -> sparse.csr_matrix:
        """Symmetric weighted adjacency W (n × n), zero diagonal."""
        n = self.n_regions
        i, j = self.edges[:, 0], self.edges[:, 1]
        w = sparse.coo_matrix((np.r_[self.weights, self.weights], (np.r_[i, j], np.r_[j, i])), shape=(n, n))
        return w.tocsr()

    def transition(self) -> sparse.csr_matrix:
        """Random-walk transition probabilities T = D⁻¹W; a region without neighbours stays on itself."""
        w = self.adjacency()
        degree = np.asarray(w.sum(axis=1)).ravel()
        lonely = degree <= 0
        if lonely.any():
            w = w + sparse.diags(lonely.astype(np.float64))
            degree = degree + lonely
        return sparse.diags(1.0 / degree) @ w

    def neighbours(self) -> list[np.ndarray]:
        """Each region's adjacent regions (unweighted)."""
        w = self.adjacency()
        return [w.indices[w.indptr[k]:w.indptr[k + 1]] for k in range(self.n_regions)]


def _touching_pairs(labels: np.ndarray) -> np.ndarray:
    """Unique (i, j), i < j, of regions sharing a face along any axis."""
    n = int(labels.max()) + 1
    keys = []
    for axis in range(labels.ndim):
        a = np.moveaxis(labels, axis, 0)
        lo, hi = a[:-1].ravel(), a[1:].ravel()
        differ = lo != hi
        i, j = np.minimum(lo[differ], hi[differ]), np.maximum(lo[differ], hi[differ])
        keys.append(i.astype(np.int64) * n + j)
    keys = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
    return np.stack([keys // n, keys % n], 1).astype(np.int64)


def region_graph(labels: np.ndarray, image: np.ndarray, spacing: Sequence[float] | None = None,
                 sigma_distance: float | None = None, sigma_appearance: float | None = None,
                 channel_axis: int | None = None) -> RegionGraph:
    """The adjacency graph of `labels` (from `superpixels` / `supervoxels`) over `image`.

    `image` has the labels' shape, or an extra channel axis given by `channel_axis`. Distances use
    `spacing` (default 1 per axis); σ's default to the medians over the edges (see the module doc).
    """
    labels = np.asarray(labels)
    image = np.asarray(image, dtype=np.float64)
    if channel_axis is not None:
        image = np.moveaxis(image, channel_axis, 0)
    else:
        image = image[None]
    if image.shape[1:] != labels.shape:
        raise DataError(f"image of shape {image.shape[1:]} does not match regions of shape {labels.shape}.")
    if labels.min() < 0:
        raise DataError("region ids must be non-negative (use superpixels / supervoxels).")
    n = int(labels.max()) + 1
    spacing = np.ones(labels.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (labels.ndim,):
        raise DataError(f"spacing needs one value per axis ({labels.ndim}), got {tuple(spacing)}.")
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=n)
    if (sizes == 0).any():
        raise DataError(f"region ids are not contiguous: {int((sizes == 0).sum())} ids have no pixel.")
    coords = np.indices(labels.shape, dtype=np.float64).reshape(labels.ndim, -1)
    centroids = np.stack([np.bincount(flat, weights=c, minlength=n) for c in coords], 1) / sizes[:, None]
    centroids *= spacing
    appearance = np.atleast_2d(region_means(image, labels, n))
    edges = _touching_pairs(labels)
    if len(edges):
        d2 = ((centroids[edges[:, 0]] - centroids[edges[:, 1]]) ** 2).sum(1)
        a2 = ((appearance[edges[:, 0]] - appearance[edges[:, 1]]) ** 2).sum(1)
        sd = sigma_distance if sigma_distance is not None else robust_scale(np.sqrt(d2))
        sa = sigma_appearance if sigma_appearance is not None else robust_scale(np.sqrt(a2))
        weights = np.exp(-d2 / (2 * max(sd, 1e-12) ** 2)) * np.exp(-a2 / (2 * max(sa, 1e-12) ** 2))
        weights = np.maximum(weights, 1e-12)  # touching regions stay connected, however different
    else:
        weights = np.zeros(0)
    return RegionGraph(labels=labels.astype(np.int32), sizes=sizes, centroids=centroids, appearance=appearance,
                       edges=edges, weights=weights)
