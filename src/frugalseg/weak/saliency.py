"""Unsupervised saliency, and the Bayesian rule that lets it complete mined object regions (MCOF).

Saliency here needs no training and no download: **graph-based manifold ranking** (GMR) of
Yang, Zhang, Lu, Ruan & Yang, "Saliency Detection via Graph-Based Manifold Ranking", CVPR 2013.
The image is cut into SLIC superpixels, which become the nodes of a graph: each node is joined to its
neighbours and to its neighbours' neighbours, and all image-border nodes are joined to each other (the
paper's "close-loop" graph). Edge weights are exp(-theta * d), d the Lab distance of the two superpixels'
mean colours min-max normalised over the edges (theta = 10, the paper's sigma^2 = 0.1). Ranking with
queries y is f = (D - alpha W)^-1 y (alpha = 0.99), with the diagonal of that matrix zeroed as in the
authors' code. Stage 1 ranks against each image border in turn (border superpixels as *background*
queries); a node's saliency is the product of the four (1 - normalised ranking). Stage 2 thresholds that
map at its mean and ranks again with the salient nodes as *foreground* queries. Values are in [0, 1].
The border prior is the method's known weakness: an object cut by the image border loses saliency where
it touches it.

`bayes_merge` is MCOF's saliency-guided refinement (Wang, You, Li & Ma, CVPR 2018, section 3): the
saliency map S is a prior for "object", colour likelihoods p(x|fg) and p(x|bg) are estimated from the
current object and background regions, and the posterior

    p(fg | x) = S p(x|fg) / (S p(x|fg) + (1 - S) p(x|bg))

decides which missed (non-discriminative) parts to add; the exact merge rule is documented on the
function. MCOF applies it in the **first round only** (later rounds start from segmentation-network
predictions that already cover whole objects, and the saliency prior would then mostly add clutter); the
caller chooses, e.g. `mine_round(..., use_saliency=(round == 0))`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage, sparse
from skimage.color import rgb2lab
from skimage.segmentation import slic

from frugalseg.data.labels import IGNORE_INDEX

__all__ = ["manifold_ranking_saliency", "bayes_posterior", "bayes_merge", "SALIENCY"]

# Lab ranges for quantising colours: L in [0, 100], a and b clipped to [-100, 100].
_LAB_LO = np.array([0.0, -100.0, -100.0])
_LAB_HI = np.array([100.0, 100.0, 100.0])


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be an RGB array (H, W, 3), got shape {image.shape}.")
    return image


def _lab(image: np.ndarray) -> np.ndarray:
    """CIE Lab (H, W, 3) float64 of an RGB image (uint8 0..255, or float 0..1)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image.astype(np.float64) / 255.0
    return rgb2lab(np.clip(image, 0.0, 1.0))


def _minmax(v: np.ndarray) -> np.ndarray:
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(v)
    return (v - lo) / (hi - lo)


def _adjacency(segments: np.ndarray, n: int) -> sparse.csr_matrix:
    """Symmetric boolean adjacency of superpixels sharing a 4-connected pixel edge (no self loops)."""
    a = np.concatenate([segments[:, :-1].ravel(), segments[:-1, :].ravel()])
    b = np.concatenate([segments[:, 1:].ravel(), segments[1:, :].ravel()])
    keep = a != b
    a, b = a[keep], b[keep]
    m = sparse.coo_matrix((np.ones(a.size), (a, b)), shape=(n, n)).tocsr()
    m = ((m + m.T) > 0).astype(np.float64)
    return m


def manifold_ranking_saliency(
    image: np.ndarray,
    segments: np.ndarray | None = None,
    *,
    n_segments: int = 200,
    compactness: float = 10.0,
    alpha: float = 0.99,
    theta: float = 10.0,
) -> np.ndarray:
    """Saliency (H, W) float32 in [0, 1] by graph-based manifold ranking (Yang et al., CVPR 2013).

    `segments`: a superpixel label map (H, W) to use instead of SLIC with `n_segments` (the paper uses
    about 200 SLIC superpixels). Each pixel takes its superpixel's value. An image whose superpixels all
    have the same mean colour (nothing to rank) gives all zeros. The final min-max normalisation, as in the
    paper, stretches whatever contrast there is: a nearly uniform image still gets values up to 1.
    """
    image = _check_image(image)
    h, w = image.shape[:2]
    if segments is None:
        segments = slic(image, n_segments=n_segments, compactness=compactness, start_label=0)
    segments = np.asarray(segments)
    if segments.shape != (h, w):
        raise ValueError(f"segments are {segments.shape} but the image is {(h, w)}; they must be the same size.")
    _, segments = np.unique(segments, return_inverse=True)  # contiguous 0..n-1
    segments = segments.reshape(h, w)
    n = int(segments.max()) + 1
    if n < 2:
        return np.zeros((h, w), dtype=np.float32)

    # Mean Lab colour per superpixel.
    lab = _lab(image).reshape(-1, 3)
    counts = np.bincount(segments.ravel(), minlength=n).astype(np.float64)
    colour = np.stack([np.bincount(segments.ravel(), lab[:, c], minlength=n) for c in range(3)], 1)
    colour /= counts[:, None]

    # Close-loop graph: neighbours, neighbours of neighbours, and a clique over the border superpixels.
    adj = _adjacency(segments, n)
    adj = ((adj + adj @ adj) > 0).astype(np.float64).tolil()
    border = np.unique(np.concatenate([segments[0], segments[-1], segments[:, 0], segments[:, -1]]))
    bb = np.ix_(border, border)
    adj[bb] = 1.0
    adj.setdiag(0.0)
    adj = adj.tocoo()
    i, j = adj.row, adj.col
    dist = np.linalg.norm(colour[i] - colour[j], axis=1)
    if not dist.size or dist.max() < 1e-6:  # one colour everywhere: the ranking would only echo the graph's shape
        return np.zeros((h, w), dtype=np.float32)
    weights = np.exp(-theta * _minmax(dist))
    W = sparse.coo_matrix((weights, (i, j)), shape=(n, n)).toarray()
    D = np.diag(W.sum(1))
    # A few hundred nodes: the dense inverse is cheap and matches the authors' `(D - alpha W) \ eye`.
    aff = np.linalg.solve(D - alpha * W + 1e-12 * np.eye(n), np.eye(n))
    np.fill_diagonal(aff, 0.0)

    def rank(query: np.ndarray) -> np.ndarray:
        return _minmax(aff @ query)

    sal = np.ones(n)
    for side in (segments[0], segments[-1], segments[:, 0], segments[:, -1]):
        y = np.zeros(n)
        y[np.unique(side)] = 1.0
        sal *= 1.0 - rank(y)
    sal = _minmax(sal)
    fg = (sal >= sal.mean()).astype(np.float64)
    final = rank(fg)
    return final[segments].astype(np.float32)


SALIENCY: dict[str, Callable[..., np.ndarray]] = {"gmr": manifold_ranking_saliency}


# ---- Bayesian refinement (MCOF) ------------------------------------------------------------------
def _quantise(lab: np.ndarray, bins: int) -> np.ndarray:
    """Per-channel bin index (N, 3) of Lab colours (N, 3)."""
    t = (lab - _LAB_LO) / (_LAB_HI - _LAB_LO)
    return np.clip((t * bins).astype(np.int64), 0, bins - 1)


def _likelihood(q: np.ndarray, mask: np.ndarray, bins: int, smoothing: float) -> np.ndarray:
    """p(x | region) per pixel: product over Lab channels of smoothed per-channel histograms of `mask`."""
    out = np.ones(q.shape[0])
    for c in range(3):
        hist = np.bincount(q[mask, c], minlength=bins).astype(np.float64) + smoothing
        hist /= hist.sum()
        out *= hist[q[:, c]]
    return out


def bayes_posterior(
    saliency: np.ndarray,
    fg_mask: np.ndarray,
    bg_mask: np.ndarray,
    image: np.ndarray,
    *,
    bins: int = 16,
    smoothing: float = 1.0,
) -> np.ndarray:
    """p(fg | x) (H, W) float32 = S p(x|fg) / (S p(x|fg) + (1 - S) p(x|bg)).

    The likelihoods are colour histograms of the pixels in `fg_mask` and `bg_mask`: each Lab channel in
    `bins` bins with `smoothing` added to every bin (Laplace), the channels treated as independent (a
    naive-Bayes product that stays well estimated from a few hundred pixels, where a joint 3-D histogram
    would be mostly empty). An empty mask gives a uniform likelihood (no colour evidence either way).
    """
    image = _check_image(image)
    shape = image.shape[:2]
    for name, arr in (("saliency", saliency), ("fg_mask", fg_mask), ("bg_mask", bg_mask)):
        if np.shape(arr) != shape:
            raise ValueError(f"{name} is {np.shape(arr)} but the image is {shape}; they must be the same size.")
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}.")
    if smoothing <= 0:
        raise ValueError(f"smoothing must be positive (it keeps unseen colours possible), got {smoothing}.")
    post, _, _ = _posterior_parts(saliency, fg_mask, bg_mask, image, bins, smoothing)
    return post.reshape(shape).astype(np.float32)


def _posterior_parts(saliency, fg_mask, bg_mask, image, bins, smoothing):
    """(posterior, p(x|fg), p(x|bg)), each flat (H*W,) float64."""
    s = np.clip(np.asarray(saliency, dtype=np.float64).ravel(), 0.0, 1.0)
    q = _quantise(_lab(image).reshape(-1, 3), bins)
    pf = _likelihood(q, np.asarray(fg_mask, bool).ravel(), bins, smoothing)
    pb = _likelihood(q, np.asarray(bg_mask, bool).ravel(), bins, smoothing)
    num = s * pf
    den = num + (1.0 - s) * pb
    post = np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)
    return post, pf, pb


def bayes_merge(
    saliency: np.ndarray,
    regions: np.ndarray,
    image: np.ndarray,
    *,
    background_index: int = 0,
    add_above: float = 0.5,
    remove_below: float = 0.05,
    bins: int = 16,
    smoothing: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Refine a region label map (H, W) with a saliency prior; returns a new uint8 map (MCOF, first round).

    `regions` holds `background_index`, object class ids, and `ignore_index` for unknown. The object
    likelihood p(x|fg) is estimated from all object pixels, p(x|bg) from the background pixels (from the
    unknown pixels too when there is no background pixel), and `bayes_posterior` gives p(fg|x). Then:

    - **adding**: the pixels with posterior > `add_above` form connected components (8-connected); in each
      component that touches an object pixel, every background or unknown pixel becomes the class of its
      nearest object pixel (Euclidean). A component touching no object region is left alone: saliency
      alone says nothing about *which* class it is, and it is often an untagged salient thing.
    - **removing**: an object or unknown pixel becomes background only when its posterior is below
      `remove_below` **and** its colour is likelier under background than under object
      (p(x|bg) > p(x|fg)), so both the saliency prior and the colour evidence must say "background". A low
      saliency alone (saliency misses objects at the image border) never deletes an object pixel.
      `remove_below=0` turns removal off.

    With no object pixel there is nothing to add to (the map is returned unchanged).
    """
    regions = np.asarray(regions)
    image = _check_image(image)
    if regions.ndim != 2 or regions.shape != image.shape[:2]:
        raise ValueError(f"regions are {regions.shape} but the image is {image.shape[:2]}; "
                         "they must be (H, W) of the same size.")
    if np.shape(saliency) != regions.shape:
        raise ValueError(f"saliency is {np.shape(saliency)} but regions are {regions.shape}; "
                         "they must be the same size.")
    if background_index is None:
        raise ValueError("bayes_merge needs a background class: saliency separates objects from background.")
    if not 0.0 <= remove_below <= add_above <= 1.0:
        raise ValueError(f"need 0 <= remove_below <= add_above <= 1, got {remove_below} and {add_above}.")
    if bins < 2 or smoothing <= 0:
        raise ValueError(f"need bins >= 2 and smoothing > 0, got {bins} and {smoothing}.")
    out = regions.astype(np.uint8, copy=True)
    unknown = regions == ignore_index
    bg = regions == background_index
    obj = ~unknown & ~bg
    if not obj.any():
        return out
    bg_source = bg if bg.any() else unknown
    parts = _posterior_parts(saliency, obj, bg_source, image, bins, smoothing)
    post, pf, pb = (v.reshape(regions.shape) for v in parts)

    # Adding: components of high posterior that overlap an object region.
    high = post > add_above
    comp, _ = ndimage.label(high, structure=np.ones((3, 3), bool))
    touched = np.unique(comp[high & obj])
    touched = touched[touched > 0]
    grow = np.isin(comp, touched) & ~obj
    if grow.any():
        _, (iy, ix) = ndimage.distance_transform_edt(~obj, return_indices=True)
        out[grow] = regions[iy[grow], ix[grow]]

    # Removing: low posterior and colour evidence for background.
    if remove_below > 0:
        drop = (obj | unknown) & ~grow & (post < remove_below) & (pb > pf)
        out[drop] = background_index
    return out
