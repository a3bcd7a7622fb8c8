"""New mask layouts: a statistical shape model of the training masks' objects, and how novel its draws are.

Re-rendering the training masks with a GAN gives new textures on old layouts. Bailo et al. synthesise the
masks too; here the masks come from a shape model in the tradition of level-set shape priors (Leventon et
al. 2000): each object (a connected component of non-background pixels, e.g. a white cell) is cut out on a
fixed window centred on its centroid and described by the signed distance maps of its nested class layers
(layer c = pixels of class >= c: the cell, then the nucleus inside it). PCA of those maps over the training
objects (with their 8 rotations/reflections: a cell on a slide has no preferred orientation) gives a mean
shape and modes; a new object is the mean plus Gaussian coefficients on the modes, thresholded at zero,
each layer kept inside the one before, rotated by a random angle and placed where it overlaps no other
object. Object counts per image and image sizes are drawn from the training masks.

Assumption (stated, checked in `fit`): class ids are nested by order inside an object (cytoplasm 1 around
nucleus 2). Masks whose objects are not nested still fit, but a layer then covers the classes above it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from frugalseg.data.labels import IGNORE_INDEX

__all__ = ["ShapeModel", "aligned_nearest", "nearest_mask_iou", "signed_distance", "void_far_background"]


def signed_distance(region: np.ndarray, clip: float) -> np.ndarray:
    """Signed Euclidean distance to the region's boundary, negative inside, clipped to ±clip (pixels).
    Clipping keeps the far field (which says nothing about the shape) from dominating the PCA."""
    if not region.any():
        return np.full(region.shape, clip, dtype=np.float32)
    if region.all():
        return np.full(region.shape, -clip, dtype=np.float32)
    inside = ndimage.distance_transform_edt(region)
    outside = ndimage.distance_transform_edt(~region)
    return np.clip(outside - inside, -clip, clip).astype(np.float32)


def void_far_background(mask: np.ndarray, beyond: float, background: int = 0) -> np.ndarray:
    """The mask with background pixels farther than `beyond` pixels (Euclidean) from every object pixel made void.

    What the masks do not label (the red blood cells around a white cell) the generator has nothing to draw by, so
    its backgrounds are flatter than real ones; voided, they no longer teach a segmenter what background looks
    like, while the ring of background within `beyond` pixels still teaches the objects' borders. A mask without
    objects is returned unchanged."""
    objects = (mask != background) & (mask != IGNORE_INDEX)
    if not objects.any():
        return mask
    far = (mask == background) & (ndimage.distance_transform_edt(~objects) > beyond)
    return np.where(far, np.uint8(IGNORE_INDEX), mask).astype(mask.dtype)


def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    """The k-th (0..7) of the 8 rotations/reflections of the last two axes."""
    a = np.rot90(a, k % 4, axes=(-2, -1))
    return np.flip(a, -1) if k >= 4 else a


@dataclass
class ShapeModel:
    """PCA shape model of mask objects. Make with `ShapeModel.fit(masks, num_classes)`; draw with `sample`."""

    num_classes: int
    window: int  # side of the square window an object is described on (pixels)
    clip: float
    mean: np.ndarray  # (layers * window * window,)
    modes: np.ndarray  # (n_modes, layers * window * window), orthonormal rows
    sd: np.ndarray  # (n_modes,) standard deviation of the coefficient on each mode
    counts: np.ndarray  # objects per training image
    sizes: np.ndarray  # (n_images, 2) training image sizes
    background: int = 0

    @property
    def layers(self) -> int:
        return self.num_classes - 1

    # ---- fitting --------------------------------------------------------------------------------
    @classmethod
    def fit(cls, masks: list[np.ndarray], num_classes: int, background: int = 0, variance_kept: float = 0.98,
            margin: float = 1.25) -> "ShapeModel":
        """Fit on 2D class-id masks (void = 255 counts as background). Needs at least one object."""
        if background != 0:
            raise ValueError("the shape model expects background to be class 0 (layers are classes >= 1)")
        if not masks:
            raise ValueError("no masks to fit a shape model on")
        objects, counts, sizes = [], [], []
        for m in masks:
            if m.ndim != 2:
                raise ValueError(f"2D masks only, got shape {m.shape}")
            m = np.where(m == IGNORE_INDEX, 0, m)
            comps, n = ndimage.label(m > 0, structure=np.ones((3, 3), dtype=bool))
            counts.append(n)
            sizes.append(m.shape)
            for sl in ndimage.find_objects(comps):
                objects.append((m, comps, sl))
        if not objects:
            raise ValueError("the training masks hold no object (every pixel is background)")
        extent = max(max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) for _, _, sl in objects)
        window = int(np.ceil(extent * margin / 2)) * 2 + 1  # odd: the centroid sits on the centre pixel
        clip = window / 4
        vectors = []
        for m, comps, sl in objects:
            obj_id = int(np.bincount(comps[sl].ravel())[1:].argmax()) + 1  # the component this box was found for
            own = np.where(comps == obj_id, m, 0)
            patch = _centred_window(own, window)
            layers = np.stack([signed_distance(patch >= c, clip) for c in range(1, num_classes)])
            for k in range(8):
                vectors.append(_dihedral(layers, k).ravel())
        x = np.stack(vectors).astype(np.float64)
        mean = x.mean(0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        var = s**2 / max(len(x) - 1, 1)
        keep = int(np.searchsorted(np.cumsum(var) / max(var.sum(), 1e-12), variance_kept) + 1)
        keep = max(1, min(keep, len(var)))
        return cls(num_classes=num_classes, window=window, clip=float(clip), mean=mean.astype(np.float32),
                   modes=vt[:keep].astype(np.float32), sd=np.sqrt(var[:keep]).astype(np.float32),
                   counts=np.asarray(counts), sizes=np.asarray(sizes), background=background)

    # ---- drawing --------------------------------------------------------------------------------
    def draw_object(self, rng: np.random.Generator, temperature: float = 1.0, truncate: float = 2.5) -> np.ndarray:
        """One object as a (window, window) class-id patch (0 outside it)."""
        for _ in range(20):
            z = np.clip(rng.standard_normal(len(self.sd)), -truncate, truncate) * self.sd * temperature
            sdf = (self.mean + z @ self.modes).reshape(self.layers, self.window, self.window)
            sdf = ndimage.rotate(sdf, rng.uniform(0, 360), axes=(1, 2), reshape=False, order=1, mode="nearest")
            patch = np.zeros((self.window, self.window), dtype=np.uint8)
            inside = np.ones_like(patch, dtype=bool)
            for c in range(1, self.num_classes):
                region = (sdf[c - 1] < 0) & inside
                if c == 1:
                    region = _largest_component(region)
                region = ndimage.binary_fill_holes(region) & inside
                patch[region] = c
                inside = region
            if (patch > 0).any():
                return patch
        raise RuntimeError("the shape model drew empty objects 20 times in a row; fit it on masks with objects")

    def sample(self, rng: np.random.Generator, temperature: float = 1.0, max_tries: int = 200) -> np.ndarray:
        """A new (H, W) uint8 mask: image size and object count drawn from the training masks, objects from the
        shape model placed at random where they overlap no other object and stay inside the image."""
        h, w = (int(v) for v in self.sizes[rng.integers(len(self.sizes))])
        count = int(self.counts[rng.integers(len(self.counts))])
        mask = np.zeros((h, w), dtype=np.uint8)
        for _ in range(count):
            patch = self.draw_object(rng, temperature)
            ys, xs = np.nonzero(patch)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            obj = patch[y0:y1, x0:x1]
            oh, ow = obj.shape
            if oh > h or ow > w:
                continue
            # a one-pixel gap around every object: touching objects would merge into one component
            grown = ndimage.binary_dilation(mask > 0, iterations=1)
            for _ in range(max_tries):
                ty, tx = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
                if not (grown[ty:ty + oh, tx:tx + ow] & (obj > 0)).any():
                    view = mask[ty:ty + oh, tx:tx + ow]
                    view[obj > 0] = obj[obj > 0]
                    break
        return mask

    # ---- persistence ----------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"num_classes": np.asarray(self.num_classes), "window": np.asarray(self.window),
                "clip": np.asarray(self.clip), "mean": self.mean, "modes": self.modes, "sd": self.sd,
                "counts": self.counts, "sizes": self.sizes, "background": np.asarray(self.background)}

    @classmethod
    def from_arrays(cls, a) -> "ShapeModel":
        return cls(num_classes=int(a["num_classes"]), window=int(a["window"]), clip=float(a["clip"]),
                   mean=np.asarray(a["mean"]), modes=np.asarray(a["modes"]), sd=np.asarray(a["sd"]),
                   counts=np.asarray(a["counts"]), sizes=np.asarray(a["sizes"]), background=int(a["background"]))


def _centred_window(mask: np.ndarray, window: int) -> np.ndarray:
    """The (window, window) patch of `mask` centred on the centroid of its non-zero pixels (zero-padded)."""
    cy, cx = (int(round(v)) for v in ndimage.center_of_mass(mask > 0))
    r = window // 2
    padded = np.pad(mask, r)
    return padded[cy:cy + window, cx:cx + window]


def _largest_component(region: np.ndarray) -> np.ndarray:
    comps, n = ndimage.label(region)
    if n <= 1:
        return region
    return comps == (np.bincount(comps.ravel())[1:].argmax() + 1)


def _mean_iou(a: np.ndarray, b: np.ndarray, classes: range) -> float:
    ious = []
    for c in classes:
        x, y = a == c, b == c
        union = (x | y).sum()
        if union:
            ious.append((x & y).sum() / union)
    return float(np.mean(ious)) if ious else 1.0


def nearest_mask_iou(mask: np.ndarray, training: list[np.ndarray], num_classes: int) -> float:
    """Mean foreground-class IoU with the most similar training mask of the same size, as placed (1.0: a
    training mask drawn again)."""
    same = [t for t in training if t.shape == mask.shape]
    return max((_mean_iou(mask, t, range(1, num_classes)) for t in same), default=0.0)


def aligned_nearest(mask: np.ndarray, training: list[np.ndarray], num_classes: int, window: int) -> tuple[float, int]:
    """(IoU, index) of the most similar training mask with position and orientation factored out: both masks
    centred on their objects' centroid and the training mask in its best of 8 rotations/reflections. A new
    *shape*, not just a new place, scores below 1 here. (0.0, -1) for an empty mask. Made for masks of one
    object each (a blood-smear crop around one cell): with several objects the whole layout is centred on their
    common centroid, which measures the layout rather than each shape."""
    if not (mask > 0).any():
        return 0.0, -1
    a = _centred_window(mask, window)
    best, best_i = 0.0, -1
    for i, t in enumerate(training):
        if not (t > 0).any():
            continue
        b = _centred_window(np.where(t == IGNORE_INDEX, 0, t), window)
        iou = max(_mean_iou(a, _dihedral(b, k), range(1, num_classes)) for k in range(8))
        if iou > best:
            best, best_i = iou, i
    return best, best_i
