"""Stage: self-supervised pretraining (`frugalseg pretrain --task colorize|rotation|mixmatch`).

`pretrain(cfg)` trains, in a run directory, the encoder of a segmenter without ImageNet weights:
- `colorize` / `rotation`: a proxy task on the split's images, labels unused (`frugalseg.selfsup.proxies`);
- `mixmatch`: Mix-and-Match tuning on the masks of a label budget, starting from a proxy run (`--init`).
It saves `weights.safetensors` (the encoder's state dict: a timm features model, or the whole medical U-Net)
and `pretrain.json`; `frugalseg train --pretrained RUN` and `train --semi ... --pretrained RUN` start from it.
Resumable from checkpoints/last.ckpt (Lightning), like every training stage.

CPU-sized defaults: 160 px crops, batch 16, 1000 iterations for a proxy; M&M with 8 images x 10 patches of
128 px a step (the official code: 40 x 10), 500 iterations (official: 8000). The official M&M solver: SGD lr
0.01, momentum 0.9, weight decay 5e-4; the same here for every task, with poly decay.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from frugalseg.data import apply_budget, open_split
from frugalseg.data.io import atomic_path, read_json, write_json
from frugalseg.data.labels import IGNORE_INDEX
from frugalseg.data.samples import SegDataset
from frugalseg.data.torchdata import EpochAware, SharedEpoch, sample_generator, shuffled_loader
from frugalseg.data.transforms import CropTransform, to_tensor_image
from frugalseg.errors import ConfigError, DataError
from frugalseg.models.backbones import PRETRAIN_META, PRETRAIN_WEIGHTS
from frugalseg.runs import RunDir
from frugalseg.stages.options import RunOptions, ascending, check_common, option, option_like
from frugalseg.stages.run_guard import claim_run_dir

log = logging.getLogger(__name__)

__all__ = ["PretrainConfig", "pretrain"]



@dataclass
class PretrainConfig(RunOptions):
    """Proxy-task pretraining or mix-and-match tuning of a segmenter's encoder."""

    out: str = option_like(RunOptions, "out", "runs/pretrain")
    task: Literal["colorize", "rotation", "mixmatch"] = option(
        "colorize", "colorize (lightness → hue/chroma, colour images), rotation (0/90/180/270), or mixmatch "
                    "(M&M tuning on the label budget's masks; start it from a proxy run with --init).")
    train_split: str = option("train", "Split whose images are used (their labels only by mixmatch).")
    arch: Literal["ocr", "fcn", "unet2d"] = option("ocr", "The segmenter to prepare: ocr/fcn (a timm backbone) or "
                                                          "unet2d (the medical U-Net).")
    backbone: str = option("tf_efficientnet_lite0", "ocr/fcn: timm backbone name (random init: no ImageNet).")
    channels: list[int] = option(factory=lambda: [16, 32, 64, 128, 256], help="unet2d: channels per level "
                                 "(match the segmenter: `train --arch unet2d` uses 16..256, the semi-supervised CPU "
                                 "protocol 8..128).", ge=1)
    init: str | None = option(None, "Start from a pretrain run folder (or its weights file): mixmatch after a proxy.")
    iterations: int = option(1000, "Training iterations.", ge=1)
    batch_size: int = option(16, "Images per iteration (mixmatch: images whose patches are mixed).", ge=1)
    crop_size: int = option(160, "Random crop side.", ge=16)
    scale: tuple[float, float] = option((0.5, 1.5), "Random rescale range before the crop.", gt=0, check=ascending)
    lr: float = option(0.01, "SGD learning rate (poly decay; M&M's solver: 0.01).", gt=0)
    momentum: float = option(0.9, "SGD momentum.", ge=0, lt=1)
    weight_decay: float = option(5e-4, "Weight decay.", ge=0)
    epoch_iterations: int = option(50, "Iterations between checkpoints.", ge=1)
    # mix-and-match
    patches_per_image: int = option(10, "mixmatch: patches per image (official 10).", ge=1)
    patch_sides: tuple[int, int] = option((64, 256), "mixmatch: patch side range around seed pixels (official "
                                                     "64 256).", ge=2, check=ascending)
    patch_resize: int = option(128, "mixmatch: patches are resized to this side (official 128).", ge=8)
    bg_ratio: float = option(0.1, "mixmatch: share of patches seeded on background (official 0.1).", ge=0, le=1)
    margin: float = option(2.1, "mixmatch: triplet margin on squared distances of L2-normalised features "
                                "(official 2.1).", gt=0)
    embedding_grid: int = option(4, "mixmatch: the deepest features are pooled to at most this grid per side and "
                                    "flattened (the official pool5 keeps AlexNet's 6×6 layout).", ge=1)
    mask_fraction: float | None = option(None, "mixmatch label budget: masks of this fraction of images.", gt=0, le=1)
    mask_count: int | None = option(None, "mixmatch label budget: masks of this many images.", ge=1)
    labelled_ids: list[str] | None = option(None, "mixmatch label budget: exactly these ids (repeat, or @file).")
    budget_seed: int = option(0, "Seed of the label-budget draw (as `train`'s).", ge=0)

    def validate(self) -> "PretrainConfig":
        check_common(self)
        if self.task == "mixmatch" and not self.init:
            log.warning("mixmatch without --init: M&M tunes a pretrained encoder; starting from random weights.")
        if self.task == "rotation" and self.arch == "unet2d" and self.crop_size % 2 ** (len(self.channels) - 1):
            raise ConfigError(f"--crop-size {self.crop_size}: the U-Net needs multiples of "
                              f"{2 ** (len(self.channels) - 1)}.")
        return self

    @property
    def epochs(self) -> int:
        return math.ceil(self.iterations / self.epoch_iterations)


# ---- data ---------------------------------------------------------------------------------------
def pretrain_data(cfg: PretrainConfig) -> SegDataset:
    """The images of the split (mixmatch: those with a mask under the label budget), checked for the task."""
    cfg.check_data()
    ds = open_split(cfg.data, cfg.train_split, background_classes=cfg.background_classes,
                    ignore_classes=cfg.ignore_classes)
    if ds.ndim != 2:
        raise DataError(f"{ds.name}: pretraining works on 2D images or slices; this split holds volumes.")
    if cfg.task == "mixmatch":
        from frugalseg.stages.train import masks_budget

        budget = masks_budget(cfg.labelled_ids, cfg.mask_count, cfg.mask_fraction, cfg.budget_seed)
        if budget is not None:
            ds = apply_budget(ds, budget)
        ds = ds.by_supervision("mask")
        if len(ds) == 0:
            raise DataError(f"{cfg.data}: mixmatch needs images with masks (its patches are labelled by them).")
    if len(ds) == 0:
        raise DataError(f"{cfg.data}: no images in split '{cfg.train_split}'.")
    if cfg.task == "colorize":
        image = ds.read_image(ds[0])
        if image.ndim != 3 or image.shape[-1] != 3:
            raise DataError(f"{ds.name}: colorize needs colour (RGB) images; these are greyscale. Use --task rotation.")
    return ds


class PretrainCrops(EpochAware, Dataset):
    """`length` random crops per epoch (images in turn), rescaled and flipped, always inside the image (no
    padding a proxy task could read): {'image', 'mask'} (void where an image has no mask)."""

    def __init__(self, ds: SegDataset, crop: int, scale: tuple[float, float], length: int, seed: int = 0):
        self.ds = ds
        self.transform = CropTransform(crop=crop, scale=tuple(scale), pad=False)
        self.length = length
        self.seed = seed
        self._shared_epoch = SharedEpoch()
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.length

    def load(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if j not in self._cache:
            s = self.ds[j]
            image = to_tensor_image(self.ds.read_image(s))
            if s.mask is not None:
                mask = torch.from_numpy(self.ds.read_mask(s).astype(np.int64))
            else:
                mask = torch.full(image.shape[-2:], IGNORE_INDEX, dtype=torch.long)
            self._cache[j] = (image, mask)
        return self._cache[j]

    def __getitem__(self, i: int) -> dict:
        image, mask = self.load(i % len(self.ds))
        image, mask = self.transform(image, mask, sample_generator(self.seed, self.epoch, i))
        return {"image": image, "mask": mask}


# ---- weights ------------------------------------------------------------------------------------
def build_encoder(cfg: PretrainConfig, in_chans: int, num_classes: int):
    from frugalseg.models.backbones import load_network_weights
    from frugalseg.selfsup.encoders import make_encoder

    kind = "unet2d" if cfg.arch == "unet2d" else "timm"
    enc = make_encoder(kind, in_chans, backbone=cfg.backbone, channels=tuple(cfg.channels), num_classes=num_classes)
    if cfg.init:
        load_network_weights(enc.network, cfg.init)  # a run of another arch, backbone or channels: a DataError
    return enc


# ---- the stage ----------------------------------------------------------------------------------
def pretrain(cfg: PretrainConfig) -> dict:
    """Train the encoder in `cfg.out`; save weights.safetensors + pretrain.json. A finished run is not rerun."""
    import lightning as L

    from frugalseg.data.torchdata import input_channels
    from frugalseg.stages.engine import PretrainModule, fit_resumable, schedule_done

    cfg.validate()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ds = pretrain_data(cfg)
    in_chans = input_channels(ds)
    encoder = build_encoder(cfg, in_chans, ds.labels.num_classes)  # a bad --init is refused before any folder
    run = RunDir(cfg.out)
    finished = run.stage_done("pretrain")
    claim_run_dir(run, cfg, ds.labels, finished=finished, started=run.last_checkpoint.exists())
    t0 = time.time()
    if finished and (not cfg.resume or schedule_done(run, cfg.epochs)):
        log.info("%s: pretraining already finished; skipping (delete stages/pretrain.done to rerun).", run.path)
    else:
        data = PretrainCrops(ds, cfg.crop_size, cfg.scale, cfg.epoch_iterations * cfg.batch_size, seed=cfg.seed)
        loader = shuffled_loader(data, cfg.batch_size, cfg.seed, cfg.num_workers, persistent_workers=True)
        module = PretrainModule(encoder, cfg, ds.labels, background=ds.labels.background)
        fit_resumable(module, cfg, run, loader, max_epochs=cfg.epochs)
        from safetensors.torch import save_file

        with atomic_path(run / PRETRAIN_WEIGHTS) as tmp:
            save_file(encoder.saved_state(), str(tmp))
        write_json(run / PRETRAIN_META, {"task": cfg.task, "arch": cfg.arch, "backbone": cfg.backbone,
                                     "channels": list(cfg.channels), "in_chans": in_chans, "init": cfg.init,
                                     "images": len(ds), "iterations": cfg.iterations,
                                     "last_losses": module.last_losses, "labels": ds.labels.to_dict()})
        run.mark_done("pretrain", {"seconds": round(time.time() - t0, 1), "iterations": cfg.iterations})
    meta = read_json(run / PRETRAIN_META)
    done = run.stage_info("pretrain")
    return {"run": str(run.path), "weights": str(run / PRETRAIN_WEIGHTS), "task": meta["task"], "images": meta["images"],
            "seconds": done.get("seconds"), "last_losses": meta.get("last_losses")}
