"""The labelled + unlabelled data module every semi-supervised method shares (2D and 3D).

One data module for all semi-supervised methods (SSL4MIS's `TwoStreamBatchSampler` idea, without one
script per method): the methods (`dtc`, `cotrain`, `meanteacher`, `supervised_only`) differ only in
their loss/step module (`frugalseg.semi.stage.SemiModule`). Each batch is a dict

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
- "none": resize (2D) or centre crop (3D) only.

`SemiBatches` is an `IterableDataset` that yields whole batches (use `DataLoader(..., batch_size=None)`).
Batch b of epoch e is a pure function of (seed, e, rank, b): each stream walks through seeded
permutations of its samples (every labelled sample once per pass, as the TwoStreamBatchSampler), and
the augmentation of each slot is seeded by its position. So a run is reproducible whatever the worker
count, workers split the batches of an epoch between them, DDP ranks draw different batches, and a
resumed run draws exactly the batches the uninterrupted run would have (`SemiModule` restores the
epoch from the checkpoint).

Also here: `SemiConfig` (the fields every method shares; `None` = the protocol's value for the data's
dimension), the labelled-set selection (`select_labelled`: first N patients as SSL4MIS/DTC, a seeded
fraction of patients, or listed ids; clear errors when the choice selects nothing) and
`open_semi_data` (training split with the label budget applied, unlabelled indices, validation cases).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field, replace
from typing import Callable, ClassVar, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from frugalseg.data.samples import SegDataset
from frugalseg.data.transforms import to_tensor_image
from frugalseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "AUGMENTATIONS", "EvalCases", "SemiBatches", "SemiConfig", "SemiData", "case_input", "case_of", "input_channels",
    "open_semi_data", "patch_shape", "select_labelled", "split_batch",
]

AUGMENTATIONS = ("ssl4mis", "rotflip", "none")


# ---- configuration shared by the semi-supervised methods ------------------------------------------
@dataclass
class SemiConfig:
    """Fields every semi-supervised method shares. `None` fields are resolved from the training data
    (`resolved`, saved resolved in config.yaml): 2D data (ACDC slices) follow the SSL4MIS ACDC protocol,
    3D data (LA volumes) the UA-MT/DTC LA protocol:

    arch U-Net / V-Net; patch 256×256 / 112×112×80; batches 12+12 / 2+2; iterations 30000 / 6000;
    lr poly (power 0.9) / step (×0.1 every 2500); dropout 0 (U-Net) / 0.5 (V-Net, DTC's has_dropout).
    Methods override some of these (`protocol`): co-training's official 4+4 batches in 2D, DTC's and the
    mean teacher's consistency constants. val_split 'auto' is 'val' if the dataset has one, else 'test'
    (LA, like the reference, has no validation split; the last model is reported, none is selected).
    """

    semi: str = ""  # the method (`frugalseg train --semi`); each method's config sets it
    data: str = ""  # folder or task name (acdc, la2018)
    out: str = "runs/semi"
    train_split: str = "train"
    val_split: str | None = "auto"
    val_limit: int | None = None  # evaluate on the first N validation cases only (None: all)
    background_classes: list[str] | None = None  # merged into background (e.g. binary LV on ACDC)
    ignore_classes: list[str] | None = None  # become void (255)
    # labelled set: exactly one of these (first N patients is the SSL4MIS protocol: 3 → 68 slices, 7 → 136)
    labelled_patients: int | None = None
    labelled_fraction: float | None = None  # fraction of *patients* (cases), drawn with budget_seed
    labelled_ids: list[str] | None = None  # explicit sample ids
    budget_seed: int = 0
    unlabelled_limit: int | None = None  # use only the first N unlabelled samples (None: all)
    # network
    dims: int | None = None  # None: the training split's (ACDC slices 2, LA volumes 3)
    arch: Literal["unet", "vnet"] | None = None  # None: U-Net (2D) / V-Net (3D)
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # U-Net levels
    dropout: float | None = None
    # batches and schedule
    patch_size: list[int] | None = None  # one value: a square / cube patch
    labelled_batch_size: int | None = None  # per labelled stream
    unlabelled_batch_size: int | None = None
    augment: Literal["ssl4mis", "rotflip", "none"] = "ssl4mis"
    iterations: int | None = None
    epoch_steps: int = 150  # iterations per "epoch": the checkpoint and validation interval
    rampup_every: int = 150  # iterations per unit of the consistency ramps (SSL4MIS/DTC: iter // 150)
    # optimisation
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: Literal["poly", "step"] | None = None
    lr_step: int = 2500  # step schedule: lr × 0.1 every lr_step iterations (DTC)
    loss: Literal["dice_ce", "ce", "dice"] = "dice_ce"  # supervised loss: 0.5 CE + 0.5 soft Dice (SSL4MIS)
    # evaluation
    val_overlap: float = 0.5  # sliding-window overlap (3D networks)
    largest_component: bool = False  # keep each class's largest connected component (DTC's nms=1)
    # machinery
    seed: int = 1337
    precision: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_workers: int = 0
    val_every: int = 10  # validate every N epochs during training (0: only at the end)
    resume: bool = False
    progress: bool = True

    SEMI: ClassVar[str] = ""  # the value of `semi` for this config class

    @classmethod
    def protocol(cls, dims: int) -> dict:
        """Values of the `None` fields for `dims`-D data (subclasses add their own)."""
        if dims == 3:
            return dict(arch="vnet", patch_size=[112, 112, 80], labelled_batch_size=2, unlabelled_batch_size=2,
                        iterations=6000, lr_schedule="step")
        return dict(arch="unet", patch_size=[256, 256], labelled_batch_size=12, unlabelled_batch_size=12,
                    iterations=30000, lr_schedule="poly")

    def validate(self) -> "SemiConfig":
        if not self.data:
            raise ConfigError("No dataset given: pass data=FOLDER or a task name such as acdc or la2018.")
        if self.SEMI and self.semi != self.SEMI:
            raise ConfigError(f"{type(self).__name__} is the '{self.SEMI}' method; semi='{self.semi}' belongs "
                              "to another method's config.")
        given = [n for n in ("labelled_patients", "labelled_fraction", "labelled_ids") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"Choose the labelled set with exactly one of labelled_patients, labelled_fraction, labelled_ids "
                f"(got {', '.join(given) or 'none'}), e.g. labelled_patients=7 on ACDC, 2 on the LA subset."
            )
        if self.labelled_fraction is not None and not 0 < self.labelled_fraction <= 1:
            raise ConfigError(f"labelled_fraction must be in (0, 1], got {self.labelled_fraction}.")
        if self.labelled_patients is not None and self.labelled_patients < 1:
            raise ConfigError(f"labelled_patients must be >= 1, got {self.labelled_patients}.")
        if self.labelled_ids is not None and not self.labelled_ids:
            raise ConfigError("labelled_ids is empty: it selects no image to train on.")
        for name in ("labelled_batch_size", "iterations", "epoch_steps", "rampup_every", "lr_step"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}.")
        if self.unlabelled_batch_size is not None and self.unlabelled_batch_size < 0:
            raise ConfigError(f"unlabelled_batch_size must be >= 0, got {self.unlabelled_batch_size}.")
        if self.dims not in (None, 2, 3):
            raise ConfigError(f"dims must be 2 or 3, got {self.dims}.")
        if self.patch_size is not None:
            sizes = patch_shape(self.patch_size, self.dims or len(_as_list(self.patch_size)))
            if any(s < 1 for s in sizes):
                raise ConfigError(f"patch_size must be positive, got {self.patch_size}.")
        _choice("arch", self.arch, ("unet", "vnet", None))
        _choice("optimizer", self.optimizer, ("sgd", "adam"))
        _choice("loss", self.loss, ("ce", "dice_ce", "dice"))
        _choice("augment", self.augment, AUGMENTATIONS)
        _choice("lr_schedule", self.lr_schedule, ("poly", "step", None))
        if not 0 <= self.val_overlap < 1:
            raise ConfigError(f"val_overlap must be in [0, 1), got {self.val_overlap}.")
        if len(self.channels) < 2:
            raise ConfigError(f"channels needs at least two U-Net levels, got {self.channels}.")
        return self

    def resolved(self, dims: int) -> "SemiConfig":
        """A copy with every `None` default filled for `dims`-D data (patch_size as a list of `dims` sizes)."""
        if self.dims is not None and self.dims != dims:
            raise ConfigError(f"dims={self.dims} but the training split holds {dims}D samples.")
        filled = {k: v for k, v in self.protocol(dims).items() if getattr(self, k, None) is None}
        cfg = dataclasses.replace(self, dims=dims, **filled)
        cfg.patch_size = patch_shape(cfg.patch_size, dims)
        if cfg.dropout is None:
            cfg.dropout = 0.5 if cfg.arch == "vnet" else 0.0
        if cfg.arch == "vnet" and dims != 3:
            raise ConfigError("The V-Net is 3D; use arch='unet' for 2D data.")
        return cfg

    @property
    def epoch_length(self) -> int:
        """Iterations per epoch: the largest divisor of `iterations` not above `epoch_steps`, so the run ends
        on an epoch boundary, where last.ckpt is written and a resume is exact."""
        total = int(self.iterations or self.epoch_steps)
        n = max(1, min(self.epoch_steps, total))
        while total % n:
            n -= 1
        return n


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _choice(name: str, value, allowed: Sequence) -> None:
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
_PATIENT = re.compile(r"^(.+?)_frame\d+")


def case_of(sample_id: str) -> str:
    """The patient of an ACDC slice or volume ('patient004_frame01_slice_1' → 'patient004'); any other id
    (an LA volume, an image) is its own case."""
    m = _PATIENT.match(sample_id)
    return m.group(1) if m else sample_id


def select_labelled(
    ds: SegDataset,
    cfg: SemiConfig | None = None,
    *,
    patients: int | None = None,
    fraction: float | None = None,
    ids: Sequence[str] | None = None,
    seed: int = 0,
    group: Callable[[str], str] | None = None,
) -> tuple[str, ...]:
    """Ids of the labelled samples, in dataset order; raises a clear error when the choice selects nothing.

    Give a config (its labelled_patients / labelled_fraction / labelled_ids / budget_seed) or exactly one
    keyword:
    - `patients=N`: every sample of the first N patients of the list (the SSL4MIS / DTC protocol);
    - `fraction=f`: round(f × number of patients) patients drawn at random (`seed`), all their samples,
      so no patient has both labelled and unlabelled samples;
    - `ids`: exactly these samples.
    Patients are `group(id)` (default `case_of`: ACDC patients; a volume or image is its own case).
    """
    if cfg is not None:
        patients, fraction, ids, seed = cfg.labelled_patients, cfg.labelled_fraction, cfg.labelled_ids, cfg.budget_seed
    given = [n for n, v in (("labelled_patients", patients), ("labelled_fraction", fraction), ("labelled_ids", ids))
             if v is not None]
    if len(given) != 1:
        raise ConfigError(f"Choose the labelled set with exactly one of labelled_patients, labelled_fraction, "
                          f"labelled_ids (got {', '.join(given) or 'none'}).")
    group = group or case_of
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
        _choice("augment", augment, AUGMENTATIONS)
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
        if self.augment == "ssl4mis":  # SSL4MIS RandomGenerator
            if rng.random() > 0.5:
                k, axis = int(rng.integers(0, 4)), int(rng.integers(0, 2))
                image = np.flip(np.rot90(image, k), axis=axis)
                mask = None if mask is None else np.flip(np.rot90(mask, k), axis=axis)
            elif rng.random() > 0.5:
                from scipy.ndimage import rotate

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
        from frugalseg.semi.sdf import compute_sdf

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


# ---- whole cases for validation and evaluation ------------------------------------------------------
def case_input(image: np.ndarray, ds_ndim: int, net_dims: int) -> torch.Tensor:
    """A case as the network reads it: a 2D network gets (D, C, H, W) slices (a 2D image is one slice),
    a 3D network one (C, D, H, W) volume."""
    if ds_ndim == 3:
        v = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        if v.ndim != 3:
            raise DataError(f"expected a (D, H, W) volume, got shape {tuple(v.shape)}.")
        return v[:, None] if net_dims == 2 else v[None]
    if net_dims != 2:
        raise DataError("a 3D network cannot segment 2D images; train on volumes or use a 2D network.")
    return to_tensor_image(np.ascontiguousarray(image))[None]


class EvalCases(Dataset):
    """Whole validation cases: {"input": `case_input`, "mask": (D, H, W) or (H, W) int64, "index"}."""

    def __init__(self, ds: SegDataset, net_dims: int):
        self.ds = ds
        self.net_dims = net_dims
        self.samples = [s for s in ds.samples if s.mask is not None]
        if not self.samples:
            raise DataError(f"{ds.name}: no sample has a ground-truth mask to validate against.")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        image, mask = self.ds.read_pair(self.samples[i])
        return {"input": case_input(image, self.ds.ndim, self.net_dims),
                "mask": torch.from_numpy(mask.astype(np.int64)), "index": i}


def _first_item(batch: list[dict]) -> dict:
    return batch[0]


def eval_loader(val: SegDataset, net_dims: int, num_workers: int = 0):
    from torch.utils.data import DataLoader

    return DataLoader(EvalCases(val, net_dims), batch_size=1, collate_fn=_first_item, num_workers=num_workers)


# ---- data preparation shared by the methods ----------------------------------------------------------
@dataclass
class SemiData:
    """What `open_semi_data` prepares: the config resolved for the data, the training split with each
    sample's supervision set ("mask" for labelled, "none" otherwise), the labelled ids, the unlabelled
    indices, and the validation cases (or None)."""

    cfg: SemiConfig
    train: SegDataset
    labelled: tuple[str, ...]
    unlabelled: list[int]
    val: SegDataset | None


def input_channels(ds: SegDataset) -> int:
    image = ds.read_image(ds[0])
    return 3 if ds.ndim == 2 and image.ndim == 3 and image.shape[-1] == 3 else 1


def _open_val(cfg: SemiConfig, names: tuple[str, ...]) -> tuple[str | None, SegDataset | None]:
    from frugalseg.supervised import open_with_classes

    if cfg.val_split is None or cfg.val_split == "":
        return None, None
    candidates = ("val", "test") if cfg.val_split == "auto" else (cfg.val_split,)
    for split in candidates:
        try:
            val = open_with_classes(cfg, split)
        except DataError:
            if cfg.val_split == "auto":
                continue
            raise
        if val.labels.names != names:
            raise DataError(f"{cfg.data}: {split} classes {val.labels.names} differ from training classes {names}.")
        if cfg.val_limit is not None:
            val = val.with_samples(val.samples[: max(1, cfg.val_limit)])
        return split, val
    log.info("%s: no val or test split; training without evaluation.", cfg.data)
    return None, None


def open_semi_data(cfg: SemiConfig, require_unlabelled: bool = True) -> SemiData:
    """Open the training split, resolve the config for its dimension, choose the labelled set, open the
    validation cases. Raises a clear error when nothing is labelled or (with `require_unlabelled`)
    nothing is left unlabelled."""
    from frugalseg.supervised import open_with_classes

    train = open_with_classes(cfg, cfg.train_split)
    if train.ndim not in (2, 3):
        raise DataError(f"{train.name}: semi-supervised training needs 2D slices or 3D volumes.")
    if cfg.dims is not None and cfg.dims != train.ndim:
        raise ConfigError(f"{train.name} holds {train.ndim}D samples but dims={cfg.dims}.")
    cfg = cfg.resolved(train.ndim)
    labelled = select_labelled(train, cfg)
    chosen = set(labelled)
    train = train.with_samples([replace(s, supervision="mask" if s.id in chosen else "none") for s in train.samples])
    unlabelled = [i for i, s in enumerate(train.samples) if s.id not in chosen]
    if cfg.unlabelled_limit is not None:
        unlabelled = unlabelled[: max(0, cfg.unlabelled_limit)]
    if require_unlabelled and not unlabelled:
        raise DataError(f"{train.name}: the labelled set covers every sample; nothing is left unlabelled "
                        "(label fewer patients, or use --semi none for the supervised-only baseline).")
    split, val = _open_val(cfg, train.labels.names)
    cfg = dataclasses.replace(cfg, val_split=split)
    return SemiData(cfg=cfg, train=train, labelled=labelled, unlabelled=unlabelled, val=val)
