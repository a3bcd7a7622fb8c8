"""Dual-task consistency (DTC; Luo, Chen, Song, Wang, AAAI 2021, arXiv 2009.04448), 2D and 3D,
binary and multi-class.

One network, two heads (`frugalseg.models.levelset`): segmentation logits and a tanh level-set map per
foreground class. The level-set map is turned back into a soft mask by the differentiable transform
`sigmoid(-k · sdf)` (k = 1500, a near-Heaviside step); the two tasks must agree on every image, so
unlabelled images train the network through that agreement. The loss of one batch, as the official
code (train_la_dtc.py) computes it:

    L = L_seg(labelled) + β · MSE(sdf_pred, sdf_true)(labelled) + λ(t) · MSE(sigmoid(-k·sdf_pred), p_fg)(all)

with β = 0.3 and λ(t) = 1.0 · exp(-5 (1 - (t // 150) / 40)^2) (`frugalseg.semi.ramps`; 2D runs
default to SSL4MIS's 0.1 and 200, see `DTCConfig`). Differences from the reference, each deliberate:

- Multi-class: softmax over K classes; one level-set channel and one consistency term per foreground
  class (the maintainer's one-vs-rest answer, DTC#5/#16). Binary is K = 2 (softmax[1] = sigmoid(b-a),
  the reference's single sigmoid channel).
- L_seg defaults to 0.5·CE + 0.5·soft Dice (`frugalseg.losses`: SSL4MIS's supervised loss, also what
  some DTC forks use); the official LA script uses its squared-denominator Dice alone (`seg_loss="dice"`
  is the closest option: soft Dice over all classes, not squared).
- Void pixels (255) of labelled images are left out of L_seg and of the SDF regression; the
  consistency term covers every pixel of every image, labelled or not, as in the reference. It is not
  detached: its gradient reaches both heads.

Batches (`DTCBatches`): `image` (B, 1, *patch) float, `mask` (B, *patch) int64 with 255 everywhere on
unlabelled samples, `labelled` (B,) bool — **the flag is authoritative**; when a caller passes no flag,
a sample counts as labelled if any of its pixels is not 255 — and `sdf` (B, K-1, *patch), the
ground-truth maps computed in the data workers (zeros on unlabelled rows). Each batch holds
`labelled_bs` labelled then `unlabelled_bs` unlabelled samples (the reference's TwoStreamBatchSampler).

Data protocols: 2D (ACDC, SSL4MIS) trains on slices resized to `patch_size` (default 256×256) with
random rot90/flip or ±20° rotation; validation volumes are segmented slice by slice at that size.
3D (LA, UA-MT/DTC) trains on random crops of `patch_size` (default 112×112×80, in the array's axis
order) after DTC's RandomRotFlip; validation uses MONAI sliding-window inference over the same window.
The labelled set is the first N patients of the list (the SSL4MIS/DTC protocol), listed ids, or a
seeded random fraction of the patients (a clean protocol). The model evaluated is the last one, as
the DTC maintainer does (DTC#14); no model is picked on the validation split.

Read top to bottom: loss, data, Lightning module, evaluation, the `train_dtc(cfg)` stage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from frugalseg.data.labels import IGNORE_INDEX, LabelSpec
from frugalseg.data.samples import SegDataset
from frugalseg.errors import ConfigError, DataError
from frugalseg.losses import segmentation_loss, soft_dice_loss
from frugalseg.metrics import ConfusionMatrix, confusion_matrix, summarise
from frugalseg.semi.ramps import (DTC_CONSISTENCY, DTC_RAMPUP, RAMPUP_EVERY, SSL4MIS_CONSISTENCY, SSL4MIS_RAMPUP,
                                  consistency_weight)
from frugalseg.semi.sdf import compute_sdf, sdf_targets

log = logging.getLogger(__name__)

__all__ = [
    "DTCBatches", "DTCConfig", "DTCModule", "K_TRANSFORM", "SDF_WEIGHT", "StepSampler", "choose_labelled_ids",
    "dtc_loss", "evaluate_dtc", "load_dtc_model", "sdf_to_mask", "train_dtc",
]

K_TRANSFORM = 1500.0  # k of the transform sigmoid(-k·sdf), same in training and testing (train_la_dtc.py)
SDF_WEIGHT = 0.3  # β, `--beta`
CHECKPOINT_FORMAT = 1
# DTCConfig fields whose None means "the protocol's default for the data's dimension" (DTCConfig.resolved)
RESOLVED_FIELDS = ("dims", "arch", "dropout", "patch_size", "iterations", "labelled_bs", "unlabelled_bs",
                   "consistency", "rampup", "lr_schedule")


# ---- the transform and the loss -----------------------------------------------------------------
def sdf_to_mask(sdf: torch.Tensor, k: float = K_TRANSFORM) -> torch.Tensor:
    """DTC's differentiable task transform T⁻¹(z) = sigmoid(-k z): level-set map → soft mask."""
    return torch.sigmoid(-k * sdf)


def infer_labelled(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B,) bool: a sample is labelled if any pixel of its mask is not void."""
    return (labels != ignore_index).flatten(1).any(1)


def dtc_loss(
    seg_logits: torch.Tensor,
    sdf_pred: torch.Tensor,
    labels: torch.Tensor,
    labelled_mask: torch.Tensor | None = None,
    step: int = 0,
    *,
    sdf_target: torch.Tensor | None = None,
    k: float = K_TRANSFORM,
    beta: float = SDF_WEIGHT,
    consistency: float = DTC_CONSISTENCY,
    rampup: float = DTC_RAMPUP,
    rampup_every: int = RAMPUP_EVERY,
    seg_loss: Literal["dice_ce", "ce", "dice"] = "dice_ce",
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, torch.Tensor]:
    """DTC loss terms of one mixed batch.

    seg_logits (B, K, *S); sdf_pred (B, K-1, *S), already tanh'ed; labels (B, *S) int with 255 = void;
    labelled_mask (B,) bool (None: inferred from the labels); step = training iteration (for λ);
    sdf_target (B, K-1, *S) ground-truth maps (rows of unlabelled samples are ignored; None: computed
    here on the CPU with `compute_sdf`).

    Returns `loss` (the total), `loss_seg`, `loss_sdf` (both 0 without labelled samples),
    `loss_consistency` and `consistency_weight` (λ(step)), all tensors.
    """
    b, kc = seg_logits.shape[:2]
    spatial = tuple(seg_logits.shape[2:])
    if kc < 2:
        raise ValueError(f"DTC needs at least 2 segmentation channels (softmax over K classes), got {kc}.")
    if tuple(sdf_pred.shape) != (b, kc - 1, *spatial):
        raise ValueError(f"sdf_pred shape {tuple(sdf_pred.shape)} should be {(b, kc - 1, *spatial)} "
                         "(one map per foreground class).")
    if tuple(labels.shape) != (b, *spatial):
        raise ValueError(f"labels shape {tuple(labels.shape)} should be {(b, *spatial)}.")
    seg_logits = seg_logits.float()
    sdf_pred = sdf_pred.float()
    labelled = infer_labelled(labels, ignore_index) if labelled_mask is None else labelled_mask.bool()
    labelled = labelled.to(seg_logits.device)
    zero = seg_logits.sum() * 0.0 + sdf_pred.sum() * 0.0  # keeps the graph when a term is absent

    if labelled.any():
        lab_logits, lab_labels = seg_logits[labelled], labels[labelled].long()
        if not (lab_labels != ignore_index).any():
            loss_seg = zero
        elif seg_loss == "dice":
            loss_seg = soft_dice_loss(lab_logits, lab_labels, ignore_index)
        else:
            loss_seg = segmentation_loss(lab_logits, lab_labels, seg_loss, ignore_index)
        if sdf_target is None:
            target = sdf_targets(lab_labels, kc, ignore_index)
        else:
            target = sdf_target.to(sdf_pred.device)[labelled]
        valid = (lab_labels != ignore_index).unsqueeze(1).expand_as(target)
        diff = (sdf_pred[labelled] - target.float()) ** 2
        loss_sdf = diff[valid].mean() if valid.any() else zero
    else:
        loss_seg = loss_sdf = zero

    # Consistency on every image: the transformed level set against the foreground probabilities.
    probs_fg = seg_logits.softmax(1)[:, 1:]
    loss_cons = ((sdf_to_mask(sdf_pred, k) - probs_fg) ** 2).mean()
    lam = consistency_weight(step, consistency, rampup, rampup_every)
    loss = loss_seg + beta * loss_sdf + lam * loss_cons
    return {
        "loss": loss,
        "loss_seg": loss_seg,
        "loss_sdf": loss_sdf,
        "loss_consistency": loss_cons,
        "consistency_weight": torch.tensor(lam, device=loss.device),
    }


# ---- data: labelled + unlabelled batches --------------------------------------------------------
def choose_labelled_ids(
    ds: SegDataset,
    *,
    patients: int | None = None,
    ids: Sequence[str] | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> tuple[str, ...]:
    """Ids of the labelled samples: listed ids, the first N patients, or a seeded fraction of patients.

    Patients come from `frugalseg.data.hdf5.patient_of` ('patient004_frame01_slice_1' → 'patient004';
    an LA case id is its own patient), so no patient is split between labelled and unlabelled.
    """
    from frugalseg.data.hdf5 import first_patients_ids, patient_of

    given = [x is not None for x in (patients, ids, fraction)]
    if sum(given) != 1:
        raise ConfigError("Choose the labelled set with exactly one of: labelled_patients, labelled_ids, "
                          "labelled_fraction.")
    if ids is not None:
        known = {s.id for s in ds.samples}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ConfigError(f"labelled ids not in {ds.name}: {unknown[:5]}.")
        return tuple(ids)
    if patients is not None:
        return first_patients_ids(ds, patients)
    if not 0 < fraction <= 1:
        raise ConfigError(f"labelled_fraction must be in (0, 1], got {fraction}.")
    order: list[str] = []
    for s in ds.samples:
        p = patient_of(s.id)
        if p not in order:
            order.append(p)
    n = max(1, int(round(fraction * len(order))))
    chosen = set(np.random.default_rng(seed).permutation(order)[:n].tolist())
    return tuple(s.id for s in ds.samples if patient_of(s.id) in chosen)


class StepSampler(Sampler[int]):
    """Yields global iteration numbers, `steps_per_epoch` per epoch: item g of `DTCBatches` is batch g.

    Lightning calls `set_epoch` before each epoch; `DTCModule.on_load_checkpoint` sets it on resume
    (Lightning creates the resumed epoch's iterator before calling `set_epoch`). If nothing calls it
    (e.g. wrapped by a distributed sampler), each pass moves on to the next epoch by itself.
    """

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = int(steps_per_epoch)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        start = self.epoch * self.steps_per_epoch
        self.epoch += 1
        return iter(range(start, start + self.steps_per_epoch))


def _grey(image: np.ndarray, dims: int) -> np.ndarray:
    """Single-channel float32: raster RGB images (2D datasets) are averaged to grey in [0, 1]."""
    if image.ndim == dims + 1 and image.shape[-1] in (3, 4):
        image = image[..., :3].astype(np.float32).mean(-1) / 255.0
    if image.ndim != dims:
        raise DataError(f"expected {dims}D single-channel images for DTC, got shape {image.shape}.")
    return np.ascontiguousarray(image, dtype=np.float32)


class DTCBatches(Dataset):
    """Item g = training batch g: `labelled_bs` labelled then `unlabelled_bs` unlabelled samples.

    Samples whose supervision is "mask" are labelled; every other sample is unlabelled and only its
    image is read. Which samples and which augmentation are a function of (seed, g) only, so a run
    is reproducible whatever the number of workers and resumes with the same batches. Labelled
    (and unlabelled) samples are drawn in a fresh permutation per pass over their set, so each
    labelled sample is seen once per pass, as with the reference's TwoStreamBatchSampler.
    Use with `DataLoader(batches, batch_size=None, sampler=StepSampler(n))`.
    """

    def __init__(
        self,
        ds: SegDataset,
        *,
        dims: int,
        patch_size: Sequence[int],
        num_classes: int,
        labelled_bs: int,
        unlabelled_bs: int,
        seed: int = 0,
        augment: bool = True,
        cache: bool = True,
    ):
        if dims not in (2, 3) or len(patch_size) != dims:
            raise ConfigError(f"patch_size must give {dims} sizes for {dims}D data, got {tuple(patch_size)}.")
        self.ds = ds
        self.dims = dims
        self.patch = tuple(int(p) for p in patch_size)
        self.num_classes = num_classes
        self.labelled = [i for i, s in enumerate(ds.samples) if s.supervision == "mask"]
        self.unlabelled = [i for i, s in enumerate(ds.samples) if s.supervision != "mask"]
        if not self.labelled:
            raise DataError(f"{ds.name}: the label budget leaves no labelled sample.")
        if labelled_bs < 1 or unlabelled_bs < 0:
            raise ConfigError("labelled_bs must be >= 1 and unlabelled_bs >= 0.")
        if unlabelled_bs and not self.unlabelled:
            log.warning("%s: every sample is labelled; batches hold labelled samples only.", ds.name)
        self.labelled_bs = labelled_bs
        self.unlabelled_bs = unlabelled_bs if self.unlabelled else 0
        self.seed = seed
        self.augment = augment
        self.cache = cache
        self.ignore_index = ds.labels.ignore_index
        self._items: dict[tuple[int, bool], tuple[np.ndarray, np.ndarray | None]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:  # nominal: the sampler decides which batches are drawn
        return 2**31 - 1

    def _pick(self, pool: list[int], stream: int, g: int, bs: int) -> list[int]:
        out = []
        for j in range(bs):
            p = g * bs + j
            cycle = p // len(pool)
            key = (stream, cycle)
            if key not in self._perms:
                if len(self._perms) > 8:
                    self._perms.clear()
                self._perms[key] = np.random.default_rng([self.seed, stream, cycle]).permutation(len(pool))
            out.append(pool[int(self._perms[key][p % len(pool)])])
        return out

    def _load(self, i: int, with_mask: bool) -> tuple[np.ndarray, np.ndarray | None]:
        key = (i, with_mask)
        if key in self._items:
            return self._items[key]
        sample = self.ds[i]
        if with_mask:
            image, mask = self.ds.read_pair(sample)
        else:
            image, mask = self.ds.read_image(sample), None
        item = (_grey(image, self.dims), mask)
        if self.cache:
            self._items[key] = item
        return item

    # -- augmentation ----------------------------------------------------------------------------
    def _augment_2d(self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
        """SSL4MIS RandomGenerator: rot90 + flip (p 0.5), else rotation by ±20° (p 0.5), then resize."""
        if self.augment:
            if rng.random() > 0.5:
                k, axis = int(rng.integers(0, 4)), int(rng.integers(0, 2))
                image = np.flip(np.rot90(image, k), axis=axis)
                mask = None if mask is None else np.flip(np.rot90(mask, k), axis=axis)
            elif rng.random() > 0.5:
                from scipy.ndimage import rotate

                angle = float(rng.uniform(-20, 20))
                image = rotate(image, angle, order=0, reshape=False)
                # SSL4MIS fills with 0 (background); void would keep rotated corners out of the loss,
                # but background is what the reference trains on.
                mask = None if mask is None else rotate(mask, angle, order=0, reshape=False)
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        if tuple(x.shape[2:]) != self.patch:
            x = F.interpolate(x, size=self.patch, mode="bilinear", align_corners=False)
        y = None
        if mask is not None:
            y = torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))[None, None].float()
            if tuple(y.shape[2:]) != self.patch:
                y = F.interpolate(y, size=self.patch, mode="nearest")
            y = y[0, 0].long()
        return x[0], y

    def _augment_3d(self, image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator):
        """DTC RandomRotFlip (rot90 k∈0..3 in the first two axes, flip along one of them), RandomCrop."""
        if self.augment:
            k, axis = int(rng.integers(0, 4)), int(rng.integers(0, 2))
            image = np.flip(np.rot90(image, k), axis=axis)
            mask = None if mask is None else np.flip(np.rot90(mask, k), axis=axis)
        # Pad (zeros, as the reference) where the volume is smaller than the patch, then crop.
        pad = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for p, s in zip(self.patch, image.shape)]
        if any(a or b for a, b in pad):
            image = np.pad(image, pad)
            mask = None if mask is None else np.pad(mask, pad)
        if self.augment:
            start = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape, self.patch)]
        else:
            start = [(s - p) // 2 for s, p in zip(image.shape, self.patch)]
        box = tuple(slice(a, a + p) for a, p in zip(start, self.patch))
        x = torch.from_numpy(np.ascontiguousarray(image[box], dtype=np.float32))[None]
        y = None if mask is None else torch.from_numpy(np.ascontiguousarray(mask[box]).astype(np.int64))
        return x, y

    def __getitem__(self, g: int) -> dict:
        rng = np.random.default_rng([self.seed, 2, int(g)])
        picks = [(i, True) for i in self._pick(self.labelled, 0, g, self.labelled_bs)]
        if self.unlabelled_bs:
            picks += [(i, False) for i in self._pick(self.unlabelled, 1, g, self.unlabelled_bs)]
        images, masks, sdfs = [], [], []
        for i, with_mask in picks:
            image, mask = self._load(i, with_mask)
            x, y = (self._augment_2d if self.dims == 2 else self._augment_3d)(image, mask, rng)
            if y is None:
                y = torch.full(self.patch, self.ignore_index, dtype=torch.long)
                sdf = torch.zeros(self.num_classes - 1, *self.patch)
            else:
                sdf = torch.from_numpy(compute_sdf(y[None].numpy(), self.num_classes, self.ignore_index)[0])
            images.append(x)
            masks.append(y)
            sdfs.append(sdf)
        return {
            "image": torch.stack(images),
            "mask": torch.stack(masks),
            "labelled": torch.tensor([w for _, w in picks], dtype=torch.bool),
            "sdf": torch.stack(sdfs),
            "index": torch.tensor([i for i, _ in picks]),
        }


# ---- Lightning module ---------------------------------------------------------------------------
class DTCModule(L.LightningModule):
    """Trains a `LevelSetNet` with `dtc_loss` on `DTCBatches`; validates on whole volumes."""

    def __init__(self, model: torch.nn.Module, labels: LabelSpec, cfg: "DTCConfig", model_spec: dict,
                 sampler: "StepSampler | None" = None):
        super().__init__()
        if any(getattr(cfg, name) is None for name in RESOLVED_FIELDS):  # a config used outside train_dtc
            cfg = cfg.resolved(getattr(model, "spatial_dims", cfg.dims or 2))
        if labels.background != 0:
            raise ConfigError("DTC needs class 0 to be the background (level sets are per foreground class).")
        self.model = model
        self.labels = labels
        self.cfg = cfg
        self.model_spec = model_spec
        self.val_cm = ConfusionMatrix(labels.num_classes, labels.ignore_index)
        self.sampler = sampler
        self._last_terms: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        cfg = self.cfg
        seg, sdf = self.model(batch["image"])
        terms = dtc_loss(
            seg, sdf, batch["mask"], batch.get("labelled"), self.global_step, sdf_target=batch.get("sdf"),
            k=cfg.k, beta=cfg.beta, consistency=cfg.consistency, rampup=cfg.rampup, rampup_every=cfg.rampup_every,
            seg_loss=cfg.seg_loss, ignore_index=self.labels.ignore_index,
        )
        n = batch["image"].shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        for name in ("loss_seg", "loss_sdf", "loss_consistency", "consistency_weight"):
            self.log(f"train/{name}", terms[name], on_step=True, on_epoch=False, batch_size=n)
        self._last_terms = {name: v.detach() for name, v in terms.items()}  # read at the end: no sync per step
        return terms["loss"]

    @property
    def last_losses(self) -> dict[str, float]:
        """The loss terms of the last training step, as floats."""
        return {name: float(v) for name, v in self._last_terms.items()}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        volume, mask = batch["volume"], batch["mask"]
        if volume.ndim == 2:  # a 2D validation image: a volume of one slice
            volume, mask = volume[None], mask[None]
        probs = predict_case(self.model, volume, self.cfg.dims, self.cfg.patch_size, self.cfg.val_overlap)
        self.val_cm.update(probs.argmax(0).to(self.device), mask.to(self.device))

    def on_validation_epoch_end(self) -> None:
        m = summarise(self.val_cm.compute().cpu(), self.labels.names, self.labels.background)
        self.val_cm.reset()
        if m["mean_dice_foreground"] is not None:
            self.log("val/dice_fg", m["mean_dice_foreground"], prog_bar=True, sync_dist=False)
        if m["miou"] is not None:
            self.log("val/miou", m["miou"], sync_dist=False)

    def configure_optimizers(self):
        cfg = self.cfg
        opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if cfg.lr_schedule == "step":  # DTC: base_lr · 0.1^(iter // 2500)
            every = max(1, cfg.lr_step)
            schedule = lambda s: 0.1 ** (s // every)  # noqa: E731
        else:  # SSL4MIS: base_lr · (1 - iter / max_iter)^0.9
            from frugalseg.engine import poly_lambda

            schedule = poly_lambda(cfg.iterations)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # On resume Lightning creates the first data iterator before it calls the sampler's set_epoch,
        # so the sampler is told here which batch comes next (checkpoints are written at epoch ends).
        if self.sampler is not None:
            self.sampler.set_epoch(int(checkpoint["global_step"]) // self.sampler.steps_per_epoch)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["frugalseg"] = {
            "format_version": CHECKPOINT_FORMAT,
            "kind": "dtc",
            "labels": self.labels.to_dict(),
            "model": self.model_spec,
        }


# ---- inference and evaluation -------------------------------------------------------------------
def predict_case(model: torch.nn.Module, volume: torch.Tensor, dims: int, patch_size: Sequence[int],
                 overlap: float = 0.5) -> torch.Tensor:
    """Class probabilities (K, *volume.shape) on the CPU: slice by slice at `patch_size` (2D networks,
    slice axis first), or by sliding window of `patch_size` (3D networks)."""
    from frugalseg.inference import predict_volume_sliding, predict_volume_slices

    if dims == 2:
        return predict_volume_slices(model, volume, size=tuple(patch_size)).movedim(1, 0)
    return predict_volume_sliding(model, volume, patch_size, overlap=overlap)


def keep_largest_component(pred: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Keep each class's largest connected component (the reference's `nms=1`); the rest → class 0."""
    from scipy import ndimage

    out = pred.copy()
    for c in classes:
        comp, n = ndimage.label(pred == c)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            out[(comp > 0) & (comp != sizes.argmax())] = 0
    return out


@torch.no_grad()
def evaluate_dtc(
    model: torch.nn.Module,
    ds: SegDataset,
    labels: LabelSpec,
    *,
    dims: int,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    largest_component: bool = False,
    max_cases: int | None = None,
    progress: bool = True,
) -> dict:
    """Dice (confusion matrix and per case), HD95 and ASD per foreground class over the cases of `ds`.

    2D datasets are scored image by image; volumes as whole cases. Empty predictions get no surface
    distance (flagged, never scored 0, unlike the reference's medpy wrapper); units are voxels unless
    the samples carry spacing.
    """
    from tqdm.auto import tqdm

    from frugalseg.surface_metrics import surface_report

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    samples = [s for s in ds.samples if s.mask is not None][: max_cases or None]
    if not samples:
        raise DataError(f"{ds.name}: no sample has a ground-truth mask to evaluate against.")
    k, fg = labels.num_classes, labels.foreground
    cm = torch.zeros(k, k, dtype=torch.long)
    per_case = []
    for sample in tqdm(samples, desc=f"eval {ds.name}", disable=not progress, leave=False):
        image, mask = ds.read_pair(sample)
        image = _grey(image, ds.ndim)
        volume = torch.from_numpy(image if ds.ndim == 3 else image[None])
        probs = predict_case(model, volume.to(device), dims, patch_size, overlap)
        pred = probs.argmax(0).numpy().astype(np.uint8)
        if ds.ndim == 2:
            pred = pred[0]
        if largest_component:
            pred = keep_largest_component(pred, fg)
        cm += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(mask.astype(np.int64)), k, labels.ignore_index)
        rep = surface_report(pred, mask, fg, sample.spacing, labels.ignore_index)
        per_case.append({"id": sample.id, **{m: {labels.names[c]: _num(r[m]) for c, r in rep.items()}
                                             for m in ("dice", "hd95", "asd", "empty_pred")}})
    result: dict = {"dataset": ds.name, "samples": len(samples), "kind": "volume" if ds.ndim == 3 else "2d"}
    result.update(summarise(cm, labels.names, labels.background))
    units = "mm" if all(s.spacing for s in samples) else "voxel"
    result["surface"] = {}
    for c in fg:
        name = labels.names[c]
        d = [1.0 if pc["dice"][name] is None else pc["dice"][name] for pc in per_case]  # both empty: agreement
        h = [pc["hd95"][name] for pc in per_case if pc["hd95"][name] is not None]
        a = [pc["asd"][name] for pc in per_case if pc["asd"][name] is not None]
        result["surface"][name] = {
            "dice": float(np.mean(d)),
            "hd95": float(np.mean(h)) if h else None,
            "asd": float(np.mean(a)) if a else None,
            "units": units,
            "empty_pred_cases": sum(bool(pc["empty_pred"][name]) for pc in per_case),
        }
    result["case_mean_dice"] = float(np.mean([v["dice"] for v in result["surface"].values()]))
    hd = [v["hd95"] for v in result["surface"].values() if v["hd95"] is not None]
    result["case_mean_hd95"] = float(np.mean(hd)) if hd else None
    result["surface_units"] = units
    result["per_case"] = per_case
    return result


def _num(x):
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    return None if x is None or math.isnan(float(x)) else float(x)


# ---- configuration and the stage ----------------------------------------------------------------
@dataclass
class DTCConfig:
    """DTC training. `None` fields are resolved from the data (saved resolved in config.yaml):

    dims from the training split (ACDC slices: 2, LA volumes: 3); then the DTC LA protocol for 3D and
    the SSL4MIS ACDC protocol for 2D: arch V-Net / U-Net; patch 112×112×80 / 256×256; dropout 0.5
    (DTC's has_dropout) / 0; iterations 6000 / 30000; batches 2+2 / 12+12; consistency and ramp-up
    1.0 over 40 / 0.1 over 200 "epochs" of 150 iterations (both ramps span the whole run); lr step
    ×0.1 every 2500 iterations / poly 0.9. val_split 'auto': 'val' if the dataset has one, else 'test'
    (LA, like the reference, has no validation split; the last model is reported, none is selected).
    """

    data: str = ""  # folder or task name (acdc, la2018)
    out: str = "runs/dtc"
    train_split: str = "train"
    val_split: str | None = "auto"
    max_val_cases: int | None = None  # evaluate the first N validation cases only (quick runs)
    background_classes: list[str] | None = None  # merged into background (e.g. binary LV on ACDC)
    ignore_classes: list[str] | None = None  # become void (255)
    dims: int | None = None
    # label budget: exactly one of these
    labelled_patients: int | None = None  # the first N patients of the list (SSL4MIS / DTC protocol)
    labelled_ids: list[str] | None = None
    labelled_fraction: float | None = None  # a random draw of patients (budget_seed)
    budget_seed: int = 0
    # model
    arch: Literal["unet", "vnet"] | None = None
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256])  # U-Net only
    dropout: float | None = None
    # optimisation (SGD 0.01, momentum 0.9, wd 1e-4 in both references)
    iterations: int | None = None  # 6000 (DTC, 3D) / 30000 (SSL4MIS, 2D)
    steps_per_epoch: int = 150  # an "epoch" = a checkpoint (and validation every val_every epochs)
    labelled_bs: int | None = None  # 2 (DTC) / 12 (SSL4MIS)
    unlabelled_bs: int | None = None  # 2 (DTC) / 12 (SSL4MIS)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: Literal["step", "poly"] | None = None
    lr_step: int = 2500
    # DTC loss
    k: float = K_TRANSFORM
    beta: float = SDF_WEIGHT
    consistency: float | None = None
    rampup: float | None = None
    rampup_every: int = RAMPUP_EVERY
    seg_loss: Literal["dice_ce", "ce", "dice"] = "dice_ce"
    # data
    patch_size: list[int] | None = None
    augment: bool = True
    cache: bool = True
    # evaluation
    val_overlap: float = 0.5  # sliding-window overlap (3D)
    largest_component: bool = False  # the reference's LCC post-processing (nms=1)
    # machinery
    seed: int = 1337  # the reference's
    precision: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_workers: int = 0
    val_every: int = 10  # epochs
    resume: bool = False
    progress: bool = True

    @property
    def max_steps(self) -> int:  # read by engine.make_trainer: training stops on max_epochs instead
        return -1

    @property
    def epoch_steps(self) -> int:
        """Iterations per epoch: the largest divisor of `iterations` not above `steps_per_epoch`, so the run
        ends on an epoch boundary (where last.ckpt is written and a resume is exact)."""
        n = min(self.steps_per_epoch, self.iterations)
        while self.iterations % n:
            n -= 1
        return n

    def validate(self) -> "DTCConfig":
        if not self.data:
            raise ConfigError("No dataset given: set data to a folder or a task name such as acdc or la2018.")
        if (self.iterations is not None and self.iterations < 1) or self.steps_per_epoch < 1:
            raise ConfigError("iterations and steps_per_epoch must be >= 1.")
        if (self.labelled_bs is not None and self.labelled_bs < 1) or (self.unlabelled_bs or 0) < 0:
            raise ConfigError("labelled_bs must be >= 1 and unlabelled_bs >= 0.")
        if self.dims not in (None, 2, 3):
            raise ConfigError(f"dims must be 2 or 3, got {self.dims}.")
        if sum(x is not None for x in (self.labelled_patients, self.labelled_ids, self.labelled_fraction)) != 1:
            raise ConfigError("Choose the labelled set with exactly one of labelled_patients, labelled_ids, "
                              "labelled_fraction (e.g. labelled_patients=7 on ACDC, 16 on LA).")
        if self.patch_size is not None and self.dims is not None and len(self.patch_size) != self.dims:
            raise ConfigError(f"patch_size {self.patch_size} must give {self.dims} sizes.")
        if not 0 <= self.val_overlap < 1:
            raise ConfigError(f"val_overlap must be in [0, 1), got {self.val_overlap}.")
        return self

    def resolved(self, dims: int, splits: Sequence[str] = ()) -> "DTCConfig":
        """A copy with every `None` default filled for `dims`-D data."""
        three = dims == 3
        val = self.val_split
        if val == "auto":
            val = "val" if "val" in splits else ("test" if "test" in splits else None)
        cfg = dataclasses.replace(
            self,
            dims=dims,
            val_split=val,
            arch=self.arch or ("vnet" if three else "unet"),
            patch_size=list(self.patch_size or ([112, 112, 80] if three else [256, 256])),
            consistency=(self.consistency if self.consistency is not None
                         else DTC_CONSISTENCY if three else SSL4MIS_CONSISTENCY),
            rampup=self.rampup if self.rampup is not None else (DTC_RAMPUP if three else SSL4MIS_RAMPUP),
            lr_schedule=self.lr_schedule or ("step" if three else "poly"),
            iterations=self.iterations or (6000 if three else 30000),
            labelled_bs=self.labelled_bs or (2 if three else 12),
            unlabelled_bs=self.unlabelled_bs if self.unlabelled_bs is not None else (2 if three else 12),
        )
        if cfg.dropout is None:
            cfg.dropout = 0.5 if cfg.arch == "vnet" else 0.0
        if len(cfg.patch_size) != dims:
            raise ConfigError(f"patch_size {cfg.patch_size} must give {dims} sizes for {dims}D data.")
        if cfg.arch == "vnet" and not three:
            raise ConfigError("The V-Net is 3D; use arch='unet' for 2D data.")
        return cfg


def model_spec(cfg: DTCConfig, labels: LabelSpec) -> dict:
    arch = "levelset_vnet3d" if cfg.arch == "vnet" else f"levelset_unet{cfg.dims}d"
    spec = {"arch": arch, "num_classes": labels.num_classes, "in_chans": 1, "dropout": cfg.dropout,
            "dims": cfg.dims, "patch_size": list(cfg.patch_size), "method": "dtc"}
    if cfg.arch == "unet":
        spec["channels"] = list(cfg.channels)
    return spec


def load_dtc_model(path: str | Path) -> tuple[torch.nn.Module, dict, LabelSpec]:
    """(model in eval mode on the CPU, spec, label spec) from a DTC export folder or checkpoint."""
    import json

    from frugalseg.models.levelset import build_levelset

    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        from safetensors.torch import load_file

        meta = json.loads((path / "config.json").read_text())
        model = build_levelset(meta["model"])
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model.eval(), meta["model"], LabelSpec.from_dict(meta["labels"])
    if path.is_file() and path.suffix == ".ckpt":
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        meta = ckpt.get("frugalseg") or {}
        if meta.get("kind") != "dtc":
            raise DataError(f"{path}: not a frugalseg DTC checkpoint.")
        model = build_levelset(meta["model"])
        model.load_state_dict({k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
        return model.eval(), meta["model"], LabelSpec.from_dict(meta["labels"])
    raise DataError(f"{path}: expected a DTC export folder (config.json + model.safetensors) or a .ckpt file.")


def _splits(cfg: DTCConfig) -> list[str]:
    from frugalseg.data import data_root

    root = Path(cfg.data) if Path(cfg.data).exists() else data_root() / cfg.data
    return sorted(p.stem for p in root.glob("*.list")) if root.is_dir() else []


def train_dtc(cfg: DTCConfig) -> dict:
    """Train DTC in `cfg.out` (resumable), export the model, evaluate it on the validation split.

    Writes config.yaml (resolved), budget.json, checkpoints/last.ckpt (each epoch), logs/metrics.csv,
    model/ (safetensors + config.json; load with `load_dtc_model`) and metrics/<split>.json. A finished
    run is not retrained unless `resume`. Returns {"run", "train_seconds", "losses", "val"?}.
    """
    from frugalseg.data import LabelBudget, apply_budget
    from frugalseg.data.budget import budget_manifest
    from frugalseg.engine import make_trainer, merge_resumed_logs
    from frugalseg.export import save_export
    from frugalseg.models.levelset import build_levelset
    from frugalseg.runs import RunDir, read_json, write_json
    from frugalseg.supervised import VolumeCases, first_item, open_with_classes

    cfg.validate()
    run = RunDir(cfg.out)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    train_ds = open_with_classes(cfg, cfg.train_split)
    if cfg.dims is not None and cfg.dims != train_ds.ndim:
        raise ConfigError(f"{train_ds.name} holds {train_ds.ndim}D samples but dims={cfg.dims}.")
    cfg = cfg.resolved(train_ds.ndim, _splits(cfg))
    labels = train_ds.labels
    if labels.background != 0:
        raise ConfigError(f"{train_ds.name}: DTC needs class 0 to be the background.")
    ids = choose_labelled_ids(train_ds, patients=cfg.labelled_patients, ids=cfg.labelled_ids,
                              fraction=cfg.labelled_fraction, seed=cfg.budget_seed)
    budget = LabelBudget(listed=ids, rest="none", seed=cfg.budget_seed)
    train_ds = apply_budget(train_ds, budget)
    write_json(run / "budget.json", budget_manifest(train_ds, budget))
    val_ds = open_with_classes(cfg, cfg.val_split) if cfg.val_split else None
    if val_ds is not None:
        if val_ds.labels.names != labels.names:
            raise DataError(f"{cfg.data}: validation classes {val_ds.labels.names} differ from training classes.")
        if cfg.max_val_cases:
            val_ds = val_ds.with_samples(val_ds.samples[: cfg.max_val_cases])
    spec = model_spec(cfg, labels)
    run.save_config(cfg)
    t0 = time.time()
    done = run / "stages" / "train.done"
    if run.stage_done("train") and not cfg.resume:
        log.info("%s: training already finished; skipping (delete stages/train.done to retrain).", run.path)
        losses = read_json(done).get("losses", {})
    else:
        sampler = StepSampler(cfg.epoch_steps)
        if cfg.epoch_steps != cfg.steps_per_epoch:
            log.info("%d iterations: epochs of %d iterations (steps_per_epoch %d does not divide them).",
                     cfg.iterations, cfg.epoch_steps, cfg.steps_per_epoch)
        module = DTCModule(build_levelset(spec), labels, cfg, spec, sampler=sampler)
        batches = DTCBatches(train_ds, dims=cfg.dims, patch_size=cfg.patch_size, num_classes=labels.num_classes,
                              labelled_bs=cfg.labelled_bs, unlabelled_bs=cfg.unlabelled_bs, seed=cfg.seed,
                              augment=cfg.augment, cache=cfg.cache)
        loader = DataLoader(batches, batch_size=None, sampler=sampler,
                            num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
        val_loader = (DataLoader(VolumeCases(val_ds), batch_size=1, collate_fn=first_item, num_workers=cfg.num_workers)
                      if val_ds is not None else None)
        ckpt = run.last_checkpoint if cfg.resume and run.last_checkpoint.exists() else None
        if cfg.resume and ckpt is None:
            log.warning("resume: no checkpoint in %s, starting from scratch.", run.checkpoints)
        trainer = make_trainer(cfg, run.path, max_epochs=cfg.iterations // cfg.epoch_steps, val=val_ds is not None,
                               resuming=ckpt is not None)
        trainer.fit(module, loader, val_loader, ckpt_path=ckpt)
        merge_resumed_logs(run.path)
        if trainer.interrupted:
            raise KeyboardInterrupt
        save_export(module.model, spec, labels, run / "model")
        losses = module.last_losses
        run.mark_done("train", {"seconds": round(time.time() - t0, 1), "iterations": int(trainer.global_step),
                                "labelled": len(batches.labelled), "unlabelled": len(batches.unlabelled),
                                "losses": losses})
    result: dict = {"run": str(run.path), "train_seconds": round(time.time() - t0, 1), "losses": losses}
    if val_ds is not None:
        model, _, _ = load_dtc_model(run / "model")
        metrics = evaluate_dtc(model, val_ds, labels, dims=cfg.dims, patch_size=cfg.patch_size, overlap=cfg.val_overlap,
                               largest_component=cfg.largest_component, progress=cfg.progress)
        metrics.update(split=cfg.val_split, model=spec)
        run.write_metrics(cfg.val_split, metrics)
        result["val"] = metrics
    return result
