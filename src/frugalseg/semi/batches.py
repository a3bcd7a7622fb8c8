"""The labelled + unlabelled data module every semi-supervised method shares (2D and 3D).

One data module for all semi-supervised methods (SSL4MIS's `TwoStreamBatchSampler` idea, without one
script per method): the methods (`dtc`, `cotrain`, `meanteacher`, `supervised_only`) differ only in
their loss/step module (`frugalseg.semi.step.SemiStep`). Each batch is a dict

    image    (B, C, *patch) float   labelled samples first, then unlabelled ones
    mask     (B, *patch) int64      class ids; 255 (void) for every unlabelled sample
    labelled (B,) bool              True for the labelled samples (the first ones), False after
    stream   (B,) int64             which labelled stream a labelled sample came from (-1: unlabelled)
    index    (B,) int64             position of the sample in the training dataset
    sdf      (B, K-1, *patch) float only with `sdf_classes=K` (DTC): ground-truth signed distance maps
                                    of the augmented masks, zeros on unlabelled rows

A batch has one block of `labelled_batch_size` samples per labelled *stream* (mean teacher, DTC, the
supervised-only baseline: one stream, the labelled set; co-training: one stream per model, its view of
the labelled set), then one block of `unlabelled_batch_size` unlabelled samples (0 for the
supervised-only baseline). Unlabelled samples never carry their ground truth into training: only their
image is read.

Patches. 2D samples (slices) are augmented at their own size and resized to `patch_size` (SSL4MIS zooms
ACDC slices to 256×256). 3D samples (volumes) are augmented, zero-padded where smaller than the patch,
and randomly cropped to `patch_size` (UA-MT/DTC: 112×112×80 on LA). Augmentation (`augment`):

- "ssl4mis" (default): 2D, SSL4MIS's RandomGenerator: rot90 + flip with p 0.5, else a rotation by
  ±20° with p 0.5 (nearest neighbour, corners filled with 0 as the reference); 3D, DTC's RandomRotFlip
  (rot90 k∈0..3 in the first two axes, flip along one of them) before the random crop;
- "rotflip": rot90 + horizontal flip (p 0.5) in 2D (what this module did before DTC joined it), the
  RandomRotFlip in 3D;
- "crop" (natural images, 2D): the OCR/DeepLab recipe of `data.transforms.CropTransform`: random
  rescale in `scale`, pad (image 0, mask void) to the patch, random crop of the (square) patch, flip;
- "none": resize (2D) or centre crop (3D) only.

`jitter` > 0 adds `image_strong` to each batch: the same patches, the unlabelled ones colour-jittered
(`data.transforms.ColourJitter` at that strength), the labelled ones as they are: the student's view of
natural images (the mean teacher's teacher sees `image`).

`SemiBatches` is an `IterableDataset` that yields whole batches (use `DataLoader(..., batch_size=None)`).
Batch b of epoch e is a pure function of (seed, e, rank, b): each stream walks through seeded
permutations of its samples (every labelled sample once per pass, as the TwoStreamBatchSampler), and
the augmentation of each slot is seeded by its position. So a run is reproducible whatever the worker
count, workers split the batches of an epoch between them, DDP ranks draw different batches, and a
resumed run draws exactly the batches the uninterrupted run would have (the stage's Lightning module
restores the epoch from the checkpoint).

Also here: the labelled-set selection (`select_labelled`: first N patients as SSL4MIS/DTC, a seeded
fraction of patients, or listed ids; clear errors when the choice selects nothing), `patch_shape` and
`split_batch`. The configuration every method shares (`SemiConfig`) and the data preparation of a run
(`open_semi_data`: label budget, unlabelled indices, validation cases) are in `frugalseg.stages.semi`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import rotate
from torch.utils.data import IterableDataset, get_worker_info

from frugalseg.data.hdf5 import patient_of
from frugalseg.data.samples import SegDataset
from frugalseg.data.transforms import ColourJitter, CropTransform, to_tensor_image
from frugalseg.errors import ConfigError, DataError
from frugalseg.semi.sdf import compute_sdf

__all__ = ["AUGMENTATIONS", "SemiBatches", "choice", "patch_shape", "select_labelled", "split_batch"]

AUGMENTATIONS = ("ssl4mis", "rotflip", "crop", "none")


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        shown = ", ".join(str(a) for a in allowed if a is not None)
        raise ConfigError(f"{name} must be one of {shown}, got '{value}'.")


def patch_shape(patch_size: int | Sequence[int], dims: int) -> list[int]:
    """`dims` sizes from one size (square / cube) or `dims` sizes."""
    sizes = [int(s) for s in _as_list(patch_size)]
    if len(sizes) == 1:
        sizes = sizes * dims
    if len(sizes) != dims:
        raise ConfigError(f"patch_size {list(_as_list(patch_size))} must give 1 or {dims} sizes for {dims}D data.")
    return sizes


# ---- labelled-set selection -------------------------------------------------------------------------
def select_labelled(
    ds: SegDataset,
    *,
    patients: int | None = None,
    fraction: float | None = None,
    ids: Sequence[str] | None = None,
    seed: int = 0,
    group: Callable[[str], str] | None = None,
) -> tuple[str, ...]:
    """Ids of the labelled samples, in dataset order; raises a clear error when the choice selects nothing.

    Give exactly one of:
    - `patients=N`: every sample of the first N patients of the list (the SSL4MIS / DTC protocol);
    - `fraction=f`: round(f × number of patients) patients drawn at random (`seed`), all their samples,
      so no patient has both labelled and unlabelled samples;
    - `ids`: exactly these samples.
    Patients are `group(id)` (default `data.hdf5.patient_of`: ACDC patients; a volume or image is its own).
    """
    given = [n for n, v in (("labelled_patients", patients), ("labelled_fraction", fraction), ("labelled_ids", ids))
             if v is not None]
    if len(given) != 1:
        raise ConfigError(f"Choose the labelled set with exactly one of labelled_patients, labelled_fraction, "
                          f"labelled_ids (got {', '.join(given) or 'none'}).")
    group = group or patient_of
    with_mask = {s.id for s in ds.samples if s.mask is not None}
    if not with_mask:
        raise DataError(f"{ds.name}: no sample has a mask; semi-supervised training draws its labelled set from "
                        "masked samples.")
    order: list[str] = []
    for s in ds.samples:
        p = group(s.id)
        if p not in order:
            order.append(p)
    if ids is not None:
        if not ids:
            raise ConfigError("labelled_ids is empty: it selects no image to train on.")
        known = {s.id for s in ds.samples}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ConfigError(f"labelled_ids names slices not in {ds.name}: {unknown[:5]}.")
        chosen_ids = set(ids)
        out = tuple(s.id for s in ds.samples if s.id in chosen_ids)
    elif patients is not None:
        if patients < 1:
            raise ConfigError(f"labelled_patients must be >= 1, got {patients}.")
        if patients > len(order):
            raise DataError(f"{ds.name}: asked for {patients} labelled patients but the list has only {len(order)}.")
        chosen = set(order[:patients])
        out = tuple(s.id for s in ds.samples if group(s.id) in chosen)
    else:
        if not 0 < fraction <= 1:
            raise ConfigError(f"labelled_fraction must be in (0, 1], got {fraction}.")
        n = int(round(fraction * len(order)))
        if n == 0:
            raise ConfigError(
                f"labelled_fraction={fraction} of the {len(order)} patients of {ds.name} selects no patient "
                f"(round({fraction} × {len(order)}) = 0); use at least {0.5 / len(order):.3g} or labelled_patients=1."
            )
        chosen = set(np.random.default_rng(seed).permutation(sorted(order))[:n].tolist())
        out = tuple(s.id for s in ds.samples if group(s.id) in chosen)
    if not out:
        raise ConfigError(f"The labelled-set choice selects no image of {ds.name}.")
    unmasked = [i for i in out if i not in with_mask]
    if unmasked:
        raise DataError(f"{ds.name}: labelled samples without a mask: {unmasked[:5]}.")
    return out


# ---- batches ---------------------------------------------------------------------------------------
def _permutation_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class SemiBatches(IterableDataset):
    """Whole labelled + unlabelled batches over one 2D or 3D `SegDataset` (see the module docstring).

    `streams` are lists of dataset indices (labelled samples), `unlabelled` the indices of unlabelled
    samples; `steps` batches make one epoch. `patch_size`: one size (square / cube) or one per axis.
    `sdf_classes=K` adds the ground-truth signed distance maps of the K-1 foreground classes (DTC),
    computed in the loader (workers). Decoded samples are cached per process (`cache`).
    """

    def __init__(
        self,
        ds: SegDataset,
        streams: Sequence[Sequence[int]],
        unlabelled: Sequence[int],
        *,
        labelled_batch_size: int,
        unlabelled_batch_size: int,
        steps: int,
        patch_size: int | Sequence[int] = 256,
        augment: str | bool = "ssl4mis",
        sdf_classes: int | None = None,
        seed: int = 0,
        cache: bool = True,
        scale: Sequence[float] = (0.5, 2.0),
        base_size: int | None = None,
        jitter: float = 0.0,
    ):
        if ds.ndim not in (2, 3):
            raise DataError(f"{ds.name}: semi-supervised training needs 2D slices or 3D volumes, got {ds.ndim}D.")
        if not streams or any(len(s) == 0 for s in streams):
            raise DataError("Every labelled stream needs at least one sample.")
        if labelled_batch_size < 1 or unlabelled_batch_size < 0 or steps < 1:
            raise ConfigError("labelled_batch_size and steps must be >= 1, unlabelled_batch_size >= 0.")
        if len(unlabelled) == 0 and unlabelled_batch_size > 0:
            raise DataError(f"{ds.name}: no unlabelled sample to train on (every sample is labelled).")
        if isinstance(augment, bool):
            augment = "ssl4mis" if augment else "none"
        choice("augment", augment, AUGMENTATIONS)
        if sdf_classes is not None and sdf_classes < 2:
            raise ConfigError(f"sdf_classes must be >= 2 (background + a class), got {sdf_classes}.")
        self.ds = ds
        self.dims = ds.ndim
        self.streams = [list(map(int, s)) for s in streams]
        self.unlabelled = list(map(int, unlabelled))
        self.labelled_batch_size = int(labelled_batch_size)
        self.unlabelled_batch_size = int(unlabelled_batch_size)
        self.steps = int(steps)
        self.patch = tuple(patch_shape(patch_size, self.dims))
        self.augment = augment
        if augment == "crop":
            if self.dims != 2 or self.patch[0] != self.patch[1]:
                raise ConfigError(f"augment 'crop' takes square 2D patches, got {list(self.patch)} for "
                                  f"{self.dims}D data.")
            self.crop = CropTransform(crop=self.patch[0], scale=tuple(scale), base_size=base_size)
        if jitter < 0:
            raise ConfigError(f"jitter must be >= 0, got {jitter}.")
        self.jitter = ColourJitter(strength=jitter) if jitter > 0 else None
        self.sdf_classes = sdf_classes
        self.seed = int(seed)
        self.cache = cache
        self.epoch = 0
        self.ignore_index = ds.labels.ignore_index
        self.labelled_set = set().union(*map(set, self.streams))
        overlap = self.labelled_set & set(self.unlabelled)
        if overlap:
            raise DataError(f"{ds.name}: samples both labelled and unlabelled: {sorted(overlap)[:5]}.")
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def batch_size(self) -> int:
        return len(self.streams) * self.labelled_batch_size + self.unlabelled_batch_size

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        if i in self._cache:
            return self._cache[i]
        sample = self.ds[i]
        if i in self.labelled_set:
            image, mask = self.ds.read_pair(sample)
        else:  # never read an unlabelled sample's ground truth
            image, mask = self.ds.read_image(sample), None
        spatial = image.shape[: self.dims]
        if image.ndim not in (self.dims, self.dims + 1) or (self.dims == 3 and image.ndim != 3):
            raise DataError(f"{self.ds.name}/{sample.id}: expected a {self.dims}D image, got shape {image.shape}.")
        if mask is not None and tuple(mask.shape) != tuple(spatial):
            raise DataError(f"{self.ds.name}/{sample.id}: mask shape {mask.shape} differs from image {spatial}.")
        item = (image, mask)
        if self.cache:
            self._cache[i] = item
        return item

    @staticmethod
    def _draw(pool: list[int], start: int, n: int, seed: tuple[int, ...]) -> list[int]:
        """Items start..start+n of an endless sequence of seeded permutations of `pool`."""
        out, k = [], len(pool)
        for pos in range(start, start + n):
            cycle, offset = divmod(pos, k)
            perm = np.random.default_rng(_permutation_seed(*seed, cycle)).permutation(k)
            out.append(pool[int(perm[offset])])
        return out

    # -- augmentation and patches --------------------------------------------------------------------
    def _patch_2d(self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
        if self.augment == "crop":  # natural images: rescale, pad, crop, flip (torch generator from the slot's)
            x = to_tensor_image(np.ascontiguousarray(image))
            y = (torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64)) if mask is not None
                 else torch.full(x.shape[1:], self.ignore_index, dtype=torch.int64))
            x, y = self.crop(x, y, torch.Generator().manual_seed(int(rng.integers(2**62))))
            return x, (y if mask is not None else None)
        if self.augment == "ssl4mis":  # SSL4MIS RandomGenerator
            if rng.random() > 0.5:
                k, axis = int(rng.integers(0, 4)), int(rng.integers(0, 2))
                image = np.flip(np.rot90(image, k), axis=axis)
                mask = None if mask is None else np.flip(np.rot90(mask, k), axis=axis)
            elif rng.random() > 0.5:
                angle = float(rng.uniform(-20, 20))
                # SSL4MIS fills with 0 (background) and rotates the image with order 0 too.
                image = rotate(image, angle, order=0, reshape=False)
                mask = None if mask is None else rotate(mask, angle, order=0, reshape=False)
        elif self.augment == "rotflip":
            k = int(rng.integers(0, 4))
            image = np.rot90(image, k)
            mask = None if mask is None else np.rot90(mask, k)
            if rng.random() < 0.5:
                image = np.flip(image, axis=1)
                mask = None if mask is None else np.flip(mask, axis=1)
        x = to_tensor_image(np.ascontiguousarray(image))
        if tuple(x.shape[1:]) != self.patch:
            x = F.interpolate(x[None], size=self.patch, mode="bilinear", align_corners=False)[0]
        y = None
        if mask is not None:
            y = torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))
            if tuple(y.shape) != self.patch:
                y = F.interpolate(y[None, None].float(), size=self.patch, mode="nearest")[0, 0].long()
        return x, y

    def _patch_3d(self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
        if self.augment != "none":  # DTC RandomRotFlip
            k, axis = int(rng.integers(0, 4)), int(rng.integers(0, 2))
            image = np.flip(np.rot90(image, k), axis=axis)
            mask = None if mask is None else np.flip(np.rot90(mask, k), axis=axis)
        # Pad (zeros, as the reference) where the volume is smaller than the patch, then crop.
        pad = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for p, s in zip(self.patch, image.shape)]
        if any(a or b for a, b in pad):
            image = np.pad(image, pad)
            mask = None if mask is None else np.pad(mask, pad)
        if self.augment != "none":
            start = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape, self.patch)]
        else:
            start = [(s - p) // 2 for s, p in zip(image.shape, self.patch)]
        box = tuple(slice(a, a + p) for a, p in zip(start, self.patch))
        x = torch.from_numpy(np.ascontiguousarray(image[box], dtype=np.float32))[None]
        y = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask[box]).astype(np.int64))
        return x, y

    def batch(self, b: int, rank: int = 0) -> dict:
        """Batch number b of the current epoch (deterministic)."""
        picks: list[tuple[int, int]] = []  # (dataset index, stream or -1)
        for s, pool in enumerate(self.streams):
            n = self.labelled_batch_size
            picks += [(i, s) for i in self._draw(pool, b * n, n, (self.seed, self.epoch, rank, s))]
        n = self.unlabelled_batch_size
        if n:
            picks += [(i, -1) for i in self._draw(self.unlabelled, b * n, n, (self.seed, self.epoch, rank, 10**6))]
        images, masks, sdfs = [], [], []
        for slot, (i, _) in enumerate(picks):
            image, mask = self._load(i)
            rng = np.random.default_rng(_permutation_seed(self.seed, self.epoch, rank, b, slot))
            x, y = (self._patch_2d if self.dims == 2 else self._patch_3d)(image, mask, rng)
            if y is None:
                y = torch.full(self.patch, self.ignore_index, dtype=torch.int64)
                if self.sdf_classes:
                    sdfs.append(torch.zeros(self.sdf_classes - 1, *self.patch))
            elif self.sdf_classes:
                sdfs.append(torch.from_numpy(compute_sdf(y[None].numpy(), self.sdf_classes, self.ignore_index)[0]))
            images.append(x)
            masks.append(y)
        channels = {int(x.shape[0]) for x in images}
        if len(channels) > 1:
            raise DataError(f"{self.ds.name}: images with different channel counts {sorted(channels)} in one batch.")
        out = {
            "image": torch.stack(images),
            "mask": torch.stack(masks),
            "labelled": torch.tensor([s >= 0 for _, s in picks]),
            "stream": torch.tensor([s for _, s in picks], dtype=torch.int64),
            "index": torch.tensor([i for i, _ in picks], dtype=torch.int64),
        }
        if self.sdf_classes:
            out["sdf"] = torch.stack(sdfs)
        if self.jitter is not None:
            strong = []
            for slot, ((_, stream), x) in enumerate(zip(picks, images)):
                gen = torch.Generator().manual_seed(_permutation_seed(self.seed, self.epoch, rank, b, slot, 1))
                strong.append(x if stream >= 0 else self.jitter(x, gen))
            out["image_strong"] = torch.stack(strong)
        return out

    def global_index(self, b: int) -> int:
        """The run-wide number of batch b of the current epoch (epoch × steps + b)."""
        return self.epoch * self.steps + b

    def __iter__(self):
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for b in range(worker, self.steps, workers):
            yield self.batch(b, rank)


def split_batch(batch: dict) -> tuple[dict, dict]:
    """(labelled part, unlabelled part) of a semi batch; checks the labelled-first convention."""
    flag = batch["labelled"]
    n = int(flag.sum())
    if not bool(flag[:n].all()):
        raise ValueError("semi batch: labelled samples must come first, unlabelled ones after.")
    lab = {k: v[:n] for k, v in batch.items() if torch.is_tensor(v)}
    unl = {k: v[n:] for k, v in batch.items() if torch.is_tensor(v)}
    return lab, unl
