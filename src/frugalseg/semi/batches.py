"""The labelled + unlabelled batch every semi-supervised trainer shares, and the pieces around it.

One data module for all semi-supervised methods (SSL4MIS's `TwoStreamBatchSampler` idea, without one
script per method): each batch is a dict

    image    (B, C, H, W) float     labelled samples first, then unlabelled ones
    mask     (B, H, W) int64        class ids; 255 (void) for every unlabelled sample
    labelled (B,) bool              True for the first n_l samples, False after
    stream   (B,) int64             which labelled stream a labelled sample came from (-1: unlabelled)
    index    (B,) int64             position of the sample in the training dataset

A batch has one block of `labelled_batch_size` samples per labelled *stream* (mean teacher: one stream,
the labelled set; co-training: one stream per model, its view of the labelled set), then one block of
`unlabelled_batch_size` unlabelled samples. Unlabelled samples never carry their ground truth into
training: their masks are void whatever the file holds.

`SemiBatches` is an `IterableDataset` that yields whole batches (use `DataLoader(..., batch_size=None)`).
Batch b of an epoch is a pure function of (seed, epoch, rank, b): each stream walks through seeded
permutations of its samples, the augmentation of each slot is seeded by its position. So a run is
reproducible whatever the worker count, workers split the batches of an epoch between them, DDP ranks
draw different batches, and Lightning never needs to inject a sampler.

Also here: the labelled-set selection for 2D ACDC-style slices (first N patients as SSL4MIS, a
fraction of patients, or listed ids), the base config both trainers share, and small Lightning helpers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from frugalseg.data.labels import IGNORE_INDEX
from frugalseg.data.samples import SegDataset
from frugalseg.data.transforms import ResizeTransform, to_tensor_image
from frugalseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

__all__ = [
    "SemiBatches", "SemiConfig", "select_labelled", "split_batch", "trainer_view",
]


# ---- configuration shared by the semi-supervised trainers ----------------------------------------
@dataclass
class SemiConfig:
    """Fields every semi-supervised 2D trainer shares (defaults: the SSL4MIS ACDC protocol)."""

    data: str = ""  # folder or task name (acdc)
    out: str = "runs/semi"
    train_split: str = "train"
    val_split: str | None = "val"
    val_limit: int | None = None  # evaluate on the first N validation cases only (None: all)
    # labelled set: exactly one of these (first N patients is the SSL4MIS protocol: 3 → 68 slices, 7 → 136)
    labelled_patients: int | None = 7
    labelled_fraction: float | None = None  # fraction of *patients*, drawn with budget_seed
    labelled_ids: list[str] | None = None  # explicit slice ids
    budget_seed: int = 0
    unlabelled_limit: int | None = None  # use only the first N unlabelled slices (None: all)
    # batches and schedule
    patch_size: int = 256  # slices are resized to patch_size² (SSL4MIS zooms to 256×256)
    labelled_batch_size: int = 12
    unlabelled_batch_size: int = 12
    iterations: int = 30000
    epoch_steps: int = 150  # iterations per "epoch": checkpoint interval and the ramps' time unit
    # optimisation
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    loss: str = "dice_ce"  # supervised loss: ce | dice_ce (0.5 CE + 0.5 Dice, SSL4MIS)
    # machinery
    seed: int = 1337
    precision: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_workers: int = 0
    val_every: int = 10  # validate every N epochs during training (0: only at the end)
    resume: bool = False
    progress: bool = True

    def validate(self) -> "SemiConfig":
        if not self.data:
            raise ConfigError("No dataset given: pass data=FOLDER or a task name such as acdc.")
        given = [n for n in ("labelled_patients", "labelled_fraction", "labelled_ids") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"Give exactly one of labelled_patients, labelled_fraction, labelled_ids (got {given or 'none'}); "
                "set the others to None."
            )
        if self.labelled_fraction is not None and not 0 < self.labelled_fraction <= 1:
            raise ConfigError(f"labelled_fraction must be in (0, 1], got {self.labelled_fraction}.")
        if self.labelled_patients is not None and self.labelled_patients < 1:
            raise ConfigError(f"labelled_patients must be >= 1, got {self.labelled_patients}.")
        if self.labelled_ids is not None and not self.labelled_ids:
            raise ConfigError("labelled_ids is empty: it selects no image to train on.")
        for name in ("labelled_batch_size", "unlabelled_batch_size", "iterations", "epoch_steps", "patch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"optimizer must be sgd or adam, got '{self.optimizer}'.")
        if self.loss not in ("ce", "dice_ce"):
            raise ConfigError(f"loss must be ce or dice_ce, got '{self.loss}'.")
        return self


def trainer_view(cfg: SemiConfig) -> SimpleNamespace:
    """The fields `engine.make_trainer` reads, from a semi config (iterations → max_steps)."""
    return SimpleNamespace(max_steps=cfg.iterations, devices=cfg.devices, strategy=cfg.strategy,
                           precision=cfg.precision, progress=cfg.progress, val_every=max(1, cfg.val_every))


def make_optimizer(params, cfg: SemiConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ---- labelled-set selection -------------------------------------------------------------------------
def select_labelled(ds: SegDataset, cfg: SemiConfig, group: Callable[[str], str] | None = None) -> tuple[str, ...]:
    """Ids of the labelled slices, in dataset order; raises a clear error when the choice selects nothing.

    - `labelled_patients=N`: every slice of the first N patients of the list (SSL4MIS protocol);
    - `labelled_fraction=f`: round(f × number of patients) patients drawn at random (`budget_seed`),
      all their slices, so no patient has both labelled and unlabelled slices;
    - `labelled_ids`: exactly these slices.
    """
    from frugalseg.data.hdf5 import first_patients_ids, patient_of

    group = group or patient_of
    if cfg.labelled_ids is not None:
        known = {s.id for s in ds.samples}
        unknown = [i for i in cfg.labelled_ids if i not in known]
        if unknown:
            raise ConfigError(f"labelled_ids names slices not in {ds.name}: {unknown[:5]}.")
        chosen = set(cfg.labelled_ids)
        ids = tuple(s.id for s in ds.samples if s.id in chosen)
    elif cfg.labelled_patients is not None:
        ids = first_patients_ids(ds, cfg.labelled_patients)
    elif cfg.labelled_fraction is not None:
        patients = sorted({group(s.id) for s in ds.samples})
        n = int(round(cfg.labelled_fraction * len(patients)))
        if n == 0:
            raise ConfigError(
                f"labelled_fraction={cfg.labelled_fraction} of the {len(patients)} patients of {ds.name} selects no "
                f"patient (round({cfg.labelled_fraction} × {len(patients)}) = 0); use at least "
                f"{0.5 / len(patients):.3g} or labelled_patients=1."
            )
        order = np.random.default_rng(cfg.budget_seed).permutation(patients)
        chosen = set(order[:n].tolist())
        ids = tuple(s.id for s in ds.samples if group(s.id) in chosen)
    else:
        raise ConfigError("No labelled set: give labelled_patients, labelled_fraction or labelled_ids.")
    if not ids:
        raise ConfigError(f"The labelled-set choice selects no image of {ds.name}.")
    return ids


# ---- batches ---------------------------------------------------------------------------------------
def _permutation_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class SemiBatches(IterableDataset):
    """Whole labelled + unlabelled batches over one 2D `SegDataset` (see the module docstring).

    `streams` are lists of dataset indices (labelled samples), `unlabelled` the indices of unlabelled
    samples; `steps` batches make one epoch. Images are decoded once and cached per process.
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
        patch_size: int = 256,
        augment: bool = True,
        seed: int = 0,
    ):
        if ds.ndim != 2:
            raise DataError(f"{ds.name}: semi-supervised 2D training needs 2D samples (slices), got {ds.ndim}D.")
        if not streams or any(len(s) == 0 for s in streams):
            raise DataError("Every labelled stream needs at least one sample.")
        if len(unlabelled) == 0 and unlabelled_batch_size > 0:
            raise DataError(f"{ds.name}: no unlabelled sample to train on (every slice is labelled).")
        self.ds = ds
        self.streams = [list(map(int, s)) for s in streams]
        self.unlabelled = list(map(int, unlabelled))
        self.labelled_batch_size = int(labelled_batch_size)
        self.unlabelled_batch_size = int(unlabelled_batch_size)
        self.steps = int(steps)
        self.transform = ResizeTransform(size=patch_size, augment=augment)
        self.seed = int(seed)
        self.epoch = 0
        self.labelled_set = set().union(*map(set, self.streams))
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def batch_size(self) -> int:
        return len(self.streams) * self.labelled_batch_size + self.unlabelled_batch_size

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in self._cache:
            sample = self.ds[i]
            if i in self.labelled_set:
                image, mask = self.ds.read_pair(sample)
                m = torch.from_numpy(mask.astype(np.int64))
            else:  # never read an unlabelled sample's ground truth
                image = self.ds.read_image(sample)
                m = torch.full(image.shape[:2], IGNORE_INDEX, dtype=torch.int64)
            self._cache[i] = (to_tensor_image(image), m)
        return self._cache[i]

    @staticmethod
    def _draw(pool: list[int], start: int, n: int, seed: tuple[int, ...]) -> list[int]:
        """Items start..start+n of an endless sequence of seeded permutations of `pool`."""
        out, k = [], len(pool)
        for pos in range(start, start + n):
            cycle, offset = divmod(pos, k)
            perm = np.random.default_rng(_permutation_seed(*seed, cycle)).permutation(k)
            out.append(pool[int(perm[offset])])
        return out

    def batch(self, b: int, rank: int = 0) -> dict:
        """Batch number b of the current epoch (deterministic)."""
        picks: list[tuple[int, int]] = []  # (dataset index, stream or -1)
        for s, pool in enumerate(self.streams):
            n = self.labelled_batch_size
            picks += [(i, s) for i in self._draw(pool, b * n, n, (self.seed, self.epoch, rank, s))]
        n = self.unlabelled_batch_size
        if n:
            picks += [(i, -1) for i in self._draw(self.unlabelled, b * n, n, (self.seed, self.epoch, rank, 10**6))]
        images, masks = [], []
        for slot, (i, _) in enumerate(picks):
            image, mask = self._load(i)
            gen = torch.Generator().manual_seed(_permutation_seed(self.seed, self.epoch, rank, b, slot))
            image, mask = self.transform(image, mask, gen)
            images.append(image)
            masks.append(mask)
        return {
            "image": torch.stack(images),
            "mask": torch.stack(masks),
            "labelled": torch.tensor([s >= 0 for _, s in picks]),
            "stream": torch.tensor([s for _, s in picks], dtype=torch.int64),
            "index": torch.tensor([i for i, _ in picks], dtype=torch.int64),
        }

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


# ---- data preparation shared by the trainers --------------------------------------------------------
def open_semi_data(cfg: SemiConfig) -> tuple[SegDataset, tuple[str, ...], list[int], SegDataset | None]:
    """Training slices, labelled ids, unlabelled indices, and the validation cases (or None)."""
    from dataclasses import replace

    from frugalseg.data import open_dataset

    train = open_dataset(cfg.data, cfg.train_split)
    if train.ndim != 2:
        raise DataError(f"{train.name}: semi-supervised 2D training needs a slice split (e.g. acdc 'train').")
    labelled = select_labelled(train, cfg)
    chosen = set(labelled)
    train = train.with_samples([replace(s, supervision="mask" if s.id in chosen else "none") for s in train.samples])
    unlabelled = [i for i, s in enumerate(train.samples) if s.id not in chosen]
    if cfg.unlabelled_limit is not None:
        unlabelled = unlabelled[: max(0, cfg.unlabelled_limit)]
    if not unlabelled:
        raise DataError(f"{train.name}: the labelled set covers every slice; nothing is left unlabelled.")
    val = None
    if cfg.val_split:
        val = open_dataset(cfg.data, cfg.val_split)
        if val.labels.names != train.labels.names:
            raise DataError(f"{cfg.data}: validation classes {val.labels.names} differ from training classes.")
        if cfg.val_limit is not None:
            val = val.with_samples(val.samples[: max(1, cfg.val_limit)])
    return train, labelled, unlabelled, val


def input_channels(ds: SegDataset) -> int:
    image = ds.read_image(ds[0])
    return 3 if image.ndim == 3 and image.shape[-1] == 3 else 1


def val_loader(val: SegDataset, num_workers: int = 0):
    from torch.utils.data import DataLoader

    from frugalseg.supervised import VolumeCases, first_item

    if val.ndim != 3:
        raise DataError(f"{val.name}: validation of the semi-supervised trainers expects whole volumes.")
    return DataLoader(VolumeCases(val), batch_size=1, collate_fn=first_item, num_workers=num_workers)


def pass_epoch(module) -> None:
    """Give the epoch to the batch dataset (workers are not persistent, so they see it)."""
    ds = getattr(module.trainer.train_dataloader, "dataset", None)
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(module.current_epoch)


def fit_semi(module, cfg: SemiConfig, run, batches: SemiBatches, val: SegDataset | None) -> None:
    """Lightning fit of a semi-supervised module with resume, as `supervised.train` does it."""
    from torch.utils.data import DataLoader

    from frugalseg.engine import make_trainer, merge_resumed_logs

    loader = DataLoader(batches, batch_size=None, num_workers=cfg.num_workers)
    ckpt = run.last_checkpoint if cfg.resume and run.last_checkpoint.exists() else None
    if cfg.resume and ckpt is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch.", run.checkpoints)
    validate = val is not None and cfg.val_every > 0
    # max_steps (= iterations) ends the run; epochs are only the checkpoint/validation/ramp unit. A run
    # stopped at an epoch end resumes exactly; one resumed from a mid-epoch checkpoint (iterations not a
    # multiple of epoch_steps, then extended) replays that epoch's first batches (Lightning's rule for
    # loaders without state), still for exactly `iterations` steps in all.
    trainer = make_trainer(trainer_view(cfg), run.path, max_epochs=-1, val=validate, resuming=ckpt is not None)
    trainer.fit(module, loader, val_loader(val, cfg.num_workers) if validate else None, ckpt_path=ckpt)
    merge_resumed_logs(run.path)
    if trainer.interrupted:
        raise KeyboardInterrupt
