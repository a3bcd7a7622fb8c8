"""Stage: synthetic image/mask pairs (`frugalseg synth train`, `frugalseg synth sample`).

`train_synth(cfg)` fits, in a run directory, on the labelled images of the label budget only (so a model
trained on real + synthetic pairs sees no information the real-only model lacked):
- the mask shape model (`frugalseg.synth.masks.ShapeModel`, `shapes.npz`), seconds;
- the mask → image cGAN (`frugalseg.synth.cgan`, Lightning, resumable from checkpoints/last.ckpt), exported
  as `generator/` (safetensors + config.json, like a segmenter's export);
- a report page: for a few drawn masks, the mask, its synthetic image and the real image whose mask is
  nearest (shape-aligned IoU), plus the loss curves.

`sample_synth(run, n, out)` writes a folder dataset (images/, masks/, classes.txt) of `n` pairs, with masks
from the shape model (`masks="shapes"`) or the run's own training masks re-rendered (`masks="real"`, the
ablation). The folder is written as `<out>.partial` and renamed when complete; an interrupted call resumes
there. `novelty.json` says how close each mask is to the nearest training mask. Train with
`frugalseg train --extra-data <out> --extra-weight 0.5`.

CPU-sized defaults: generator and discriminator at half pix2pix's widths (ngf = ndf = 32), 128 px crops
(InstanceNorm and full convolutions: sampling runs at the full image size), 2000 iterations of batch 4.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from frugalseg.data import LabelBudget, apply_budget, open_split
from frugalseg.data.io import atomic_path, make_folder, read_json, write_json, write_label_png, write_rgb, write_text
from frugalseg.data.labels import IGNORE_INDEX, LabelSpec
from frugalseg.data.samples import SegDataset
from frugalseg.data.torchdata import EpochAware, SharedEpoch, sample_generator, shuffled_loader
from frugalseg.data.validate import check_masks_for_training
from frugalseg.errors import ConfigError, DataError
from frugalseg.export import load_export, save_export
from frugalseg.runs import RunDir
from frugalseg.stages.options import RunOptions, check_common, option, option_like, read_config_file
from frugalseg.stages.run_guard import claim_run_dir
from frugalseg.synth.cgan import render_mask
from frugalseg.synth.conditioning import condition, condition_channels, instance_map
from frugalseg.synth.masks import ShapeModel, aligned_nearest, nearest_mask_iou, void_far_background

log = logging.getLogger(__name__)

__all__ = ["SynthTrainConfig", "sample_synth", "train_synth"]

SHAPES_FILE = "shapes.npz"
GENERATOR_DIR = "generator"
TRAINING_FILE = "training_masks.json"


@dataclass
class SynthTrainConfig(RunOptions):
    """A mask → image cGAN and a mask shape model, trained on the labelled images of a label budget."""

    out: str = option_like(RunOptions, "out", "runs/synth")
    train_split: str = option("train", "Split whose labelled images train the GAN ('train:fit' keeps a holdout out).")
    labelled_fraction: float | None = option(None, "Label budget: the GAN sees the masks of this fraction of images "
                                                   "(as `train --mask-fraction`).", gt=0, le=1)
    labelled_count: int | None = option(None, "Label budget: the GAN sees the masks of this many images (as `train "
                                              "--mask-count`).", ge=1)
    labelled_ids: list[str] | None = option(None, "Label budget: exactly these sample ids (repeat, or @file).")
    budget_seed: int = option(0, "Seed of the label-budget draw (the same draw as `train` with this seed).", ge=0)
    # networks
    ngf: int = option(32, "Generator width (pix2pix: 64; halved for CPU).", ge=4)
    ndf: int = option(32, "Discriminator width (pix2pix: 64; halved for CPU).", ge=4)
    depth: int = option(6, "Generator U-Net levels (inputs are padded to multiples of 2**depth).", ge=2, le=8)
    num_d: int = option(1, "Discriminator scales (pix2pixHD: 2).", ge=1, le=4)
    n_layers_d: int = option(3, "PatchGAN layers (3: 70×70 receptive field).", ge=1, le=5)
    dropout: float = option(0.5, "Generator dropout in its 3 innermost decoder levels: the sampling noise.", ge=0, lt=1)
    # objective
    gan_loss: Literal["lsgan", "vanilla"] = option("lsgan", "Adversarial loss: lsgan (pix2pixHD) or vanilla (pix2pix).")
    l1_weight: float = option(100.0, "Weight of the L1 loss to the real image (pix2pix: 100).", ge=0)
    fm_weight: float = option(10.0, "Weight of discriminator feature matching (pix2pixHD: 10; 0 = off).", ge=0)
    # optimisation
    iterations: int = option(2000, "Training iterations (one discriminator and one generator update each).", ge=1)
    batch_size: int = option(4, "Crops per iteration.", ge=1)
    crop_size: int = option(128, "Training crop side (images smaller than it are padded).", ge=16)
    lr: float = option(2e-4, "Adam learning rate (pix2pix: 2e-4).", gt=0)
    beta1: float = option(0.5, "Adam beta1 (pix2pix: 0.5).", ge=0, lt=1)
    decay_from: float = option(0.5, "Fraction of the run after which the lr decays linearly to 0.", ge=0, le=1)
    epoch_iterations: int = option(100, "Iterations between checkpoints (an 'epoch' of crops).", ge=1)
    # masks
    shape_variance: float = option(0.98, "Shape model: variance kept by its PCA modes.", gt=0, le=1)
    gallery: int = option(8, "Report: drawn masks shown with their synthetic image and nearest real image.", ge=0)

    def validate(self) -> "SynthTrainConfig":
        check_common(self)
        if self.crop_size % 2**self.depth:
            raise ConfigError(f"--crop-size {self.crop_size} must be a multiple of 2**depth = {2**self.depth}.")
        return self

    @property
    def epochs(self) -> int:
        return math.ceil(self.iterations / self.epoch_iterations)


# ---- data ---------------------------------------------------------------------------------------
def labelled_pairs(cfg: SynthTrainConfig) -> tuple[SegDataset, list[np.ndarray], list[np.ndarray]]:
    """(dataset of the budget's labelled samples, their RGB images, their class-id masks)."""
    cfg.check_data()
    ds = open_split(cfg.data, cfg.train_split, background_classes=cfg.background_classes,
                    ignore_classes=cfg.ignore_classes)
    if ds.ndim != 2:
        raise DataError(f"{ds.name}: the mask → image GAN works on 2D images; this dataset holds volumes.")
    budget = synth_budget(cfg)
    if budget is not None:
        ds = apply_budget(ds, budget)
    ds = ds.by_supervision("mask")
    if len(ds) == 0:
        raise DataError(f"{cfg.data}: no labelled image to train the GAN on (it learns from image/mask pairs).")
    check_masks_for_training(ds)
    images, masks = [], []
    for s in ds:
        image, mask = ds.read_pair(s)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise DataError(f"{s.image}: the GAN renders 8-bit RGB images (PNG, JPEG, TIFF); this one is "
                            f"{image.dtype} of shape {image.shape} (e.g. a medical slice).")
        images.append(np.ascontiguousarray(image))
        masks.append(mask.astype(np.uint8))
    return ds, images, masks


def synth_budget(cfg: SynthTrainConfig) -> LabelBudget | None:
    """The label budget as `frugalseg train` draws it from the same numbers and seed (same images)."""
    from frugalseg.stages.train import masks_budget

    return masks_budget(cfg.labelled_ids, cfg.labelled_count, cfg.labelled_fraction, cfg.budget_seed)


class GANCrops(EpochAware, Dataset):
    """`length` random crops of the labelled pairs per epoch (each pair equally often), with a random
    rotation/reflection (a smear has no up): {'cond': (C+1, s, s), 'image': (3, s, s) in [-1, 1]}.

    Images smaller than the crop are reflect-padded with their mask; instance maps are computed once on the
    whole mask (a crop must not invent a boundary where it cuts an object)."""

    def __init__(self, images: list[np.ndarray], masks: list[np.ndarray], num_classes: int, crop: int,
                 length: int, seed: int = 0):
        self.images = [torch.tensor(im).permute(2, 0, 1).float() / 127.5 - 1 for im in images]
        self.masks = [torch.from_numpy(m.astype(np.int64)) for m in masks]
        self.instances = [torch.from_numpy(instance_map(m).astype(np.int64)) for m in masks]
        self.num_classes = num_classes
        self.crop = crop
        self.length = length
        self.seed = seed
        self._shared_epoch = SharedEpoch()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        j = i % len(self.images)
        g = sample_generator(self.seed, self.epoch, i)
        image, mask, inst = self.images[j], self.masks[j], self.instances[j]
        h, w = mask.shape
        ph, pw = max(0, self.crop - h), max(0, self.crop - w)
        if ph or pw:
            image = torch.nn.functional.pad(image[None], (0, pw, 0, ph), mode="reflect")[0]
            stack = torch.stack([mask, inst]).float()[None]
            stack = torch.nn.functional.pad(stack, (0, pw, 0, ph), mode="reflect")[0].long()
            mask, inst = stack[0], stack[1]
            h, w = mask.shape
        y = int(torch.randint(0, h - self.crop + 1, (1,), generator=g))
        x = int(torch.randint(0, w - self.crop + 1, (1,), generator=g))
        sl = (slice(y, y + self.crop), slice(x, x + self.crop))
        image, mask, inst = image[:, sl[0], sl[1]], mask[sl], inst[sl]
        k = int(torch.randint(0, 8, (1,), generator=g))
        image, mask, inst = (_dihedral(t, k) for t in (image, mask, inst))
        cond = condition(mask[None], self.num_classes, inst[None])[0]
        return {"cond": cond, "image": image.contiguous()}


def _dihedral(t: torch.Tensor, k: int) -> torch.Tensor:
    t = torch.rot90(t, k % 4, dims=(-2, -1))
    return torch.flip(t, dims=(-1,)) if k >= 4 else t


def generator_spec(cfg: SynthTrainConfig, labels: LabelSpec) -> dict:
    return {"arch": "unet_generator", "in_chans": condition_channels(labels.num_classes), "out_chans": 3,
            "ngf": cfg.ngf, "depth": cfg.depth, "dropout": cfg.dropout, "num_classes": labels.num_classes}


# ---- training -----------------------------------------------------------------------------------
def train_synth(cfg: SynthTrainConfig) -> dict:
    """Shape model + cGAN on the budget's labelled images, in `cfg.out`; a finished run is not retrained."""
    import lightning as L

    from frugalseg.models import build_model
    from frugalseg.models.gan import MultiScaleDiscriminator, PatchDiscriminator
    from frugalseg.stages.engine import GANModule, fit_resumable, schedule_done

    cfg.validate()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ds, images, masks = labelled_pairs(cfg)
    labels = ds.labels
    smallest = min(min(m.shape) for m in masks)
    if cfg.crop_size >= 2 * smallest:  # reflection padding needs less padding than the image's side
        raise ConfigError(f"--crop-size {cfg.crop_size} is too large for the smallest labelled image ({smallest} "
                          f"px a side); choose a crop below {2 * smallest}.")
    if labels.background != 0:
        raise DataError(f"{cfg.data}: the mask shape model needs background as class 0 (objects are the classes "
                        f"above it); this dataset's background is class {labels.background}.")
    run = RunDir(cfg.out)
    finished = run.stage_done("synth")
    claim_run_dir(run, cfg, labels, finished=finished, started=run.last_checkpoint.exists())
    write_json(run / TRAINING_FILE, {"ids": [s.id for s in ds], "labels": labels.to_dict()})  # data: config.yaml
    t0 = time.time()
    shape_seconds = None  # fitted by an earlier call: its time is not this call's
    if not (run / SHAPES_FILE).exists():
        try:
            shapes = ShapeModel.fit(masks, labels.num_classes, variance_kept=cfg.shape_variance)
        except ValueError as exc:  # e.g. every labelled mask is background only
            raise DataError(f"{cfg.data}: cannot fit the mask shape model: {exc}.") from None
        with atomic_path(run / SHAPES_FILE) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **shapes.to_arrays())
        shape_seconds = round(time.time() - t0, 1)
    spec = generator_spec(cfg, labels)
    if finished and (not cfg.resume or schedule_done(run, cfg.epochs)):
        log.info("%s: GAN training already finished; skipping (delete stages/synth.done to retrain).", run.path)
    else:
        generator = build_model(spec)
        disc_in = spec["in_chans"] + 3
        disc = (PatchDiscriminator(disc_in, cfg.ndf, cfg.n_layers_d) if cfg.num_d == 1
                else MultiScaleDiscriminator(disc_in, cfg.ndf, cfg.n_layers_d, cfg.num_d))
        data = GANCrops(images, masks, labels.num_classes, cfg.crop_size, cfg.epoch_iterations * cfg.batch_size,
                        seed=cfg.seed)
        loader = shuffled_loader(data, cfg.batch_size, cfg.seed, cfg.num_workers, persistent_workers=True)
        total = cfg.epochs * len(loader)
        module = GANModule(generator, disc, labels, cfg, spec, total_steps=total)
        t1 = time.time()
        fit_resumable(module, cfg, run, loader, max_epochs=cfg.epochs)
        save_export(module.generator, spec, labels, run / GENERATOR_DIR)
        run.mark_done("synth", {"seconds": round(time.time() - t1, 1), "iterations": total,
                                "labelled_images": len(images)})
    info = run.stage_info("synth")
    summary = {"run": str(run.path), "labelled_images": len(images), "shape_model_seconds": shape_seconds,
               "gan_seconds": info.get("seconds"), "iterations": info.get("iterations")}
    if cfg.gallery:
        summary["report"] = str(write_synth_report(run, n=cfg.gallery, seed=cfg.seed))
    write_json(run / "summary.json", summary)
    return summary


# ---- sampling -----------------------------------------------------------------------------------
def load_generator(run: RunDir) -> tuple[torch.nn.Module, dict, LabelSpec]:
    if not (run / GENERATOR_DIR / "config.json").exists():
        raise DataError(f"{run.path}: no trained generator ({GENERATOR_DIR}/); run `frugalseg synth train` first.")
    return load_export(run / GENERATOR_DIR)


def load_shapes(run: RunDir) -> ShapeModel:
    path = run / SHAPES_FILE
    if not path.exists():
        raise DataError(f"{path}: missing; run `frugalseg synth train` first.")
    try:
        with np.load(path) as a:
            return ShapeModel.from_arrays(a)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: truncated or corrupt ({exc}); re-run `frugalseg synth train`.") from None


def training_masks(run: RunDir, with_images: bool = False) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """(ids, images, masks) of the labelled images the run was trained on, read again from its dataset (the
    images only `with_images`, else an empty list)."""
    meta = read_json(run / TRAINING_FILE)
    cfg = read_config_file(run / "config.yaml")
    ds = open_split(cfg["data"], cfg["train_split"], background_classes=cfg.get("background_classes"),
                    ignore_classes=cfg.get("ignore_classes"))
    by_id = {s.id: s for s in ds}
    missing = [i for i in meta["ids"] if i not in by_id]
    if missing:
        raise DataError(f"{run / TRAINING_FILE}: training images {missing[:3]} are no longer in {cfg['data']}.")
    masks = [ds.read_mask(by_id[i]).astype(np.uint8) for i in meta["ids"]]
    images = [ds.read_image(by_id[i]) for i in meta["ids"]] if with_images else []
    return list(meta["ids"]), images, masks


def mask_source(run: RunDir, source: str, seed: int, temperature: float = 1.0):
    """A function i -> the i-th mask of a sampling: the shape model's draws, or the training masks in a seeded
    order. Mask i depends on (seed, i) alone, so a resumed sampling continues the same sequence."""
    if source == "shapes":
        shapes = load_shapes(run)
        return lambda i: shapes.sample(np.random.default_rng([seed, i]), temperature)
    _, _, masks = training_masks(run)
    return lambda i: masks[int(np.random.default_rng([seed, i]).integers(len(masks)))]


def sample_synth(run_path: str | Path, n: int, out: str | Path, masks: Literal["shapes", "real"] = "shapes",
                 seed: int = 0, temperature: float = 1.0, progress: bool = True, device: str = "cpu",
                 void_background_beyond: float | None = None) -> dict:
    """Write `n` synthetic pairs as a folder dataset at `out` (see the module docstring); returns its summary.

    `void_background_beyond`: background pixels farther than this many pixels from every object are void (255)
    in the written masks (`synth.masks.void_far_background`); the images are the same."""
    from tqdm.auto import tqdm

    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}.")
    if masks not in ("shapes", "real"):
        raise ConfigError(f"--masks must be 'shapes' or 'real', got '{masks}'.")
    if void_background_beyond is not None and void_background_beyond < 0:
        raise ConfigError(f"--void-background-beyond must be >= 0 pixels, got {void_background_beyond}.")
    run = RunDir(run_path)
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose another --out or delete it.")
    generator, spec, labels = load_generator(run)
    generator = generator.to(device).sample_mode()
    settings = {"run": str(Path(run_path).resolve()), "n": n, "masks": masks, "seed": seed, "temperature": temperature,
                "void_background_beyond": void_background_beyond}
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        kept = read_json(partial / "synth.json") if (partial / "synth.json").exists() else None
        if kept is None or kept.get("settings") != settings:
            raise ConfigError(f"{partial}: an unfinished sampling with other settings; delete it or use another --out.")
    else:
        make_folder(partial / "images")
        make_folder(partial / "masks")
        write_json(partial / "synth.json", {"settings": settings})
    done = 0
    while (partial / "images" / f"synth_{done:05d}.png").exists():
        done += 1  # images are written last: every pair before the first missing image is complete
    if done:
        log.info("%s: resuming after %d of %d pairs.", partial, done, n)
    palette = labels.palette_bytes()
    t0 = time.time()
    bar = tqdm(total=n, initial=done, desc="synth: sampling", unit="pair", disable=not progress)
    draw = mask_source(run, masks, seed, temperature)
    for i in range(done, n):
        mask = draw(i)
        image = render_mask(generator, mask, labels.num_classes, noise_seed=hash((seed, i)) & 0x7FFFFFFF)
        if void_background_beyond is not None:
            mask = void_far_background(mask, void_background_beyond, labels.background)
        write_label_png(partial / "masks" / f"synth_{i:05d}.png", mask, palette)
        write_rgb(partial / "images" / f"synth_{i:05d}.png", image)
        bar.update(1)
    bar.close()
    seconds = round(time.time() - t0, 1)
    write_text(partial / "classes.txt", "\n".join(labels.names) + "\n")
    novelty = mask_novelty(run, partial, n, labels.num_classes)
    summary = {"settings": settings, "pairs": n, "seconds_this_call": seconds, "novelty": novelty,
               "labels": labels.to_dict()}
    write_json(partial / "synth.json", summary)
    os.replace(partial, out)
    return summary


def mask_novelty(run: RunDir, folder: Path, n: int, num_classes: int) -> dict:
    """How close the sampled masks are to the training masks: foreground-class IoU with the nearest one as
    placed, and with position and orientation factored out (1.0 = a training mask again)."""
    from frugalseg.data.io import read_label_png

    _, _, train = training_masks(run)
    window = load_shapes(run).window
    placed, aligned = [], []
    for i in range(n):
        m = read_label_png(folder / "masks" / f"synth_{i:05d}.png")
        m = np.where(m == IGNORE_INDEX, 0, m)  # a voided background is still background to the shapes
        placed.append(nearest_mask_iou(m, train, num_classes))
        aligned.append(aligned_nearest(m, train, num_classes, window)[0])
    write_json(folder / "novelty.json", {"nearest_iou_placed": placed, "nearest_iou_aligned": aligned})

    def stats(v: list[float]) -> dict:
        a = np.asarray(v)
        return {"mean": round(float(a.mean()), 4), "median": round(float(np.median(a)), 4),
                "max": round(float(a.max()), 4), "share_at_least_0.9": round(float((a >= 0.9).mean()), 4)}

    return {"nearest_iou_placed": stats(placed), "nearest_iou_aligned": stats(aligned)}


# ---- report -------------------------------------------------------------------------------------
def write_synth_report(run: RunDir, n: int = 8, seed: int = 0) -> Path:
    """report.html: drawn masks, their synthetic images and the nearest real image; the loss curves."""
    from frugalseg.report.synth_page import write_synth_page

    generator, spec, labels = load_generator(run) if (run / GENERATOR_DIR).exists() else (None, None, None)
    ids, images, train = training_masks(run, with_images=True)
    shapes = load_shapes(run)
    rows = []
    if generator is not None:
        generator.sample_mode()
        for i in range(n):
            mask = shapes.sample(np.random.default_rng([seed, 10**6 + i]))
            image = render_mask(generator, mask, labels.num_classes, noise_seed=hash((seed, 10**6 + i)) & 0x7FFFFFFF)
            iou, j = aligned_nearest(mask, train, labels.num_classes, shapes.window)
            rows.append({"mask": mask, "synthetic": image, "nearest_image": images[j], "nearest_mask": train[j],
                         "nearest_id": ids[j], "iou": iou})
    done = run.stage_info("synth")
    return write_synth_page(run.path, rows, LabelSpec.from_dict(read_json(run / TRAINING_FILE)["labels"]),
                            facts={"labelled images": len(ids), "GAN seconds": done.get("seconds"),
                                   "iterations": done.get("iterations"), "shape modes": len(shapes.sd)})

