"""Stage: supervised segmentation (`frugalseg train`, `eval`, `predict`, `demo`).

`train(cfg)` runs the whole stage in a run directory: dataset + label budget, model, Lightning fit
(resumable), export, evaluation on the validation split, report. `evaluate_run` evaluates a finished run
(supervised or semi-supervised) on any split; `predict_files` segments image files, folders or volumes
with an exported model. Each piece is also a plain function usable from a notebook.

Defaults follow the OCR recipe where it applies (SGD momentum 0.9, poly lr, weight decay 5e-4, aux 0.4)
scaled to what runs on a CPU (small backbone, output stride 16, 256 px crops). A run is re-run from its
saved file with `--config runs/x/config.yaml` (`stages.options.load_config`).

Lightning is imported only when a run trains (`stages.engine`): the config loads without it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader

from frugalseg.data import LabelBudget, apply_budget, open_split
from frugalseg.data.budget import budget_manifest
from frugalseg.data.io import (RASTER_SUFFIXES, make_folder, read_rgb, remove_stale_temporaries, sample_file, suffix_of,
                               write_json, write_label_png, write_rgb)
from frugalseg.data.labels import LabelSpec
from frugalseg.data.nifti import write_nifti
from frugalseg.data.samples import SegDataset, with_mask_folder
from frugalseg.data.torchdata import (EvalCases, MaskedImages, first_item, input_channels, mixed_loader, pad_collate,
                                     shuffled_loader)
from frugalseg.data.transforms import CropTransform, ResizeTransform, to_tensor_image
from frugalseg.data.validate import check_masks_for_training
from frugalseg.data.volume_io import volume_reader
from frugalseg.errors import ConfigError, DataError
from frugalseg.evaluation import evaluate
from frugalseg.export import load_export, save_export
from frugalseg.inference import predict_images, predict_volume_sliding, predict_volume_slices
from frugalseg.models import build_model
from frugalseg.report import write_report
from frugalseg.report.overlays import overlay
from frugalseg.runs import RunDir
from frugalseg.semi.cotrain import ENSEMBLE_FILE, load_ensemble
from frugalseg.stages import semi as semi_stage
from frugalseg.stages.options import (
    LalOptions,
    RunOptions,
    ascending,
    check_common,
    device_of,
    load_config,
    read_config_file,
    minus_one_or_positive,
    option,
    option_like,
)
from frugalseg.stages.run_guard import claim_run_dir

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "evaluate_run", "init_weights", "load_training_data", "predict_files", "train"]


@dataclass
class TrainConfig(LalOptions, RunOptions):
    """Supervised training of a segmenter on masks (optionally a label budget); the run options on top."""

    out: str = option_like(RunOptions, "out", "runs/train")
    train_split: str = option("train", "Split to train on ('train:fit' / 'train:holdout': a fixed 80/20 part).")
    val_split: str | None = option("val", "Split to validate and evaluate on (empty: none).")
    mask_dir: str | None = option(None, "Train on the masks in this folder (<id>.png in the dataset's class ids, "
                                        "255 = ignore), e.g. pseudo-masks.")
    # model
    arch: Literal["ocr", "fcn", "unet2d"] = option("ocr", "Model: ocr or fcn head on a timm backbone, or unet2d "
                                                          "for medical slices.")
    backbone: str = option("tf_efficientnet_lite0", "Any timm model name; tf_efficientnet_lite0/1/2 have offline "
                                                    "ImageNet weights.")
    pretrained: bool | str = option(True, "true (ImageNet weights), false (random init), or a path to a weight file "
                                          "or a `frugalseg pretrain` run (unet2d: a path only).")
    init_from: str | None = option(None, "Start from the weights of an exported model (a run's model/ folder or a "
                                         ".ckpt) of the same network.")
    output_stride: int = option(16, "Backbone output stride: 8, 16 or 32.", choices=(8, 16, 32))
    aux_stage: Literal["last", "penultimate"] = option(
        "penultimate", "Backbone stage feeding the auxiliary head (OCR's soft object regions): last (HRNet-OCR) or "
                       "penultimate (ResNet-OCR; chosen on a train holdout, benchmarks/supervised.py).")
    # optimisation
    epochs: int = option(30, "Training epochs (-1: no epoch limit, with --max-steps).", check=minus_one_or_positive)
    max_steps: int = option(-1, "Stop after this many optimiser steps (-1: after the epochs).",
                            check=minus_one_or_positive)
    batch_size: int = option(8, "Training images per batch.", ge=1)
    optimizer: Literal["sgd", "adamw"] = option("sgd", "sgd (momentum, the OCR recipe) or adamw.")
    lr: float = option(0.01, "Base learning rate (poly decay, power 0.9).", gt=0)
    backbone_lr_mult: float = option(1.0, "The backbone trains at lr times this.", ge=0)
    weight_decay: float = option(5e-4, "Weight decay.", ge=0)
    momentum: float = option(0.9, "SGD momentum.", ge=0, lt=1)
    loss: Literal["ce", "dice_ce", "lal"] = option("ce", "ce (cross-entropy), dice_ce (0.5 CE + 0.5 soft Dice) or lal "
                                                        "(locally adaptive learning loss, Guo et al. 2018).")
    aux_weight: float = option(0.4, "Weight of the auxiliary head's loss (OCR: 0.4).", ge=0)
    # data
    policy: Literal["crop", "resize"] = option("crop", "Augmentation: crop (rescale/crop/flip, natural images) or "
                                                       "resize (fixed size + rot90/flip, medical).")
    crop_size: int = option(256, "Training crop (crop policy) or the fixed input size (resize policy).", ge=1)
    scale: tuple[float, float] = option((0.5, 2.0), "Random rescale range of the crop policy (min max).", gt=0,
                                        check=ascending)
    base_size: int | None = option(None, "Longer image side before the random rescale (crop policy; default: as read).",
                                   ge=1)
    # label budget (None = every mask)
    mask_fraction: float | None = option(None, "Label budget: train with masks of this fraction of images (seeded by "
                                               "--budget-seed).", gt=0, le=1)
    mask_count: int | None = option(None, "Label budget: train with masks of this many images.", ge=1)
    labelled_ids: list[str] | None = option(None, "Label budget: exactly these sample ids have masks (repeat the "
                                                  "option, or @file with one id a line).")
    budget_seed: int = option(0, "Seed of the label-budget draw.", ge=0)
    # extra pairs (e.g. synthetic: `frugalseg synth sample`)
    extra_data: str | None = option(None, "A folder dataset of extra image/mask pairs (images/, masks/, "
                                          "classes.txt; e.g. from `frugalseg synth sample`) trained on with the "
                                          "real pairs.")
    extra_weight: float = option(0.5, "Share of the training draws that come from --extra-data (the real pairs "
                                      "are each drawn once an epoch, the extra ones make up this share).", gt=0, lt=1)
    # validation
    val_every: int = option(1, "Validate every N epochs during training.", ge=1)
    eval_batch_size: int = option(4, "Images per batch in validation and evaluation.", ge=1)

    def validate(self) -> "TrainConfig":
        check_common(self)  # each field's type and range were checked when the config was made
        return self


# ---- data -------------------------------------------------------------------------------------
def masks_budget(ids: list[str] | None, count: int | None, fraction: float | None, seed: int) -> LabelBudget | None:
    """The label budget of listed ids, a count or a fraction (first given wins; None: every mask), the rest of
    the images without labels: the one draw `train`, `synth train` and `pretrain` share."""
    if ids:
        return LabelBudget(listed=tuple(ids), rest="none", seed=seed)
    if count is not None:
        return LabelBudget(mask_count=count, rest="none", seed=seed)
    if fraction is not None:
        return LabelBudget(mask_fraction=fraction, rest="none", seed=seed)
    return None


def budget_of(cfg: TrainConfig) -> LabelBudget | None:
    return masks_budget(cfg.labelled_ids, cfg.mask_count, cfg.mask_fraction, cfg.budget_seed)


def _open(cfg: RunOptions, split: str) -> SegDataset:
    return open_split(cfg.data, split, background_classes=cfg.background_classes, ignore_classes=cfg.ignore_classes)


def load_training_data(cfg: TrainConfig) -> tuple[SegDataset, SegDataset | None, LabelBudget | None]:
    """(training split with the label budget or mask folder applied, validation split or None, budget or None)."""
    train_ds = _open(cfg, cfg.train_split)
    if cfg.mask_dir:
        train_ds = with_mask_folder(train_ds, cfg.mask_dir)
    budget = budget_of(cfg)
    if budget is not None:
        train_ds = apply_budget(train_ds, budget)
    elif not any(s.supervision == "mask" for s in train_ds):
        raise DataError(f"{train_ds.name}: no training sample has a mask; supervised training needs masks.")
    if not any(s.supervision == "mask" for s in train_ds):
        raise DataError(f"{train_ds.name}: the label budget leaves no masked sample to train on.")
    check_masks_for_training(train_ds)  # 0/255 exports, masks without a class: refused before training
    val_ds = _open(cfg, cfg.val_split) if cfg.val_split else None
    if val_ds is not None and val_ds.labels.names != train_ds.labels.names:
        raise DataError(f"{cfg.data}: validation classes {val_ds.labels.names} differ from training classes.")
    return train_ds, val_ds, budget


def load_extra_data(cfg: TrainConfig, train_ds: SegDataset) -> SegDataset:
    """The --extra-data pairs, checked against the training data: same classes, same image kind, masks valid."""
    from frugalseg.data import open_dataset

    extra = open_dataset(cfg.extra_data, "train")
    if extra.labels.names != train_ds.labels.names:
        raise DataError(f"--extra-data {cfg.extra_data}: classes {list(extra.labels.names)} differ from the "
                        f"training data's {list(train_ds.labels.names)}.")
    if extra.ndim != train_ds.ndim:
        raise DataError(f"--extra-data {cfg.extra_data}: {extra.ndim}D samples, the training data is {train_ds.ndim}D.")
    extra = extra.by_supervision("mask")
    if len(extra) == 0:
        raise DataError(f"--extra-data {cfg.extra_data}: no image has a mask.")
    check_masks_for_training(extra)
    if input_channels(extra) != input_channels(train_ds):
        raise DataError(f"--extra-data {cfg.extra_data}: images have other channels than the training images.")
    return extra


def train_transform(cfg: TrainConfig):
    if cfg.policy == "crop":
        return CropTransform(crop=cfg.crop_size, scale=tuple(cfg.scale), base_size=cfg.base_size)
    return ResizeTransform(size=cfg.crop_size, augment=True)


def eval_transform(cfg: TrainConfig):
    return ResizeTransform(size=cfg.crop_size, augment=False) if cfg.policy == "resize" else None


def model_spec(cfg: TrainConfig, labels: LabelSpec, in_chans: int) -> dict:
    spec = {"arch": cfg.arch, "num_classes": labels.num_classes, "in_chans": in_chans}
    if cfg.arch in ("ocr", "fcn"):
        spec.update(backbone=cfg.backbone, output_stride=cfg.output_stride, aux_stage=cfg.aux_stage)
    if cfg.policy == "resize":
        spec["input_size"] = cfg.crop_size  # images are resized to this at inference, logits back
    return spec


def val_loader(cfg: TrainConfig, val_ds: SegDataset) -> DataLoader:
    if val_ds.ndim == 3:  # whole volumes, slice by slice
        return DataLoader(EvalCases(val_ds, 2), batch_size=1, collate_fn=first_item, num_workers=cfg.num_workers)
    return DataLoader(MaskedImages(val_ds, eval_transform(cfg), all_samples=True), batch_size=cfg.eval_batch_size,
                      collate_fn=pad_collate, num_workers=cfg.num_workers)


# ---- training ---------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Train, export, evaluate and report in `cfg.out`. A finished run is not retrained."""
    import lightning as L  # only when training (seconds to import)

    from frugalseg.stages.engine import SegmentationModule, fit_resumable

    cfg.validate()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    train_ds, val_ds, budget = load_training_data(cfg)
    extra_ds = load_extra_data(cfg, train_ds) if cfg.extra_data else None
    run = RunDir(cfg.out)  # after the data is checked: bad input leaves no folder behind
    finished = run.stage_done("train")
    claim_run_dir(run, cfg, train_ds.labels, finished=finished, started=run.last_checkpoint.exists())
    if budget is not None:
        write_json(run / "budget.json", budget_manifest(train_ds, budget))
    in_chans = input_channels(train_ds)
    if cfg.arch in ("ocr", "fcn") and train_ds.ndim == 2 and in_chans == 1 and cfg.pretrained is True:
        log.info("Greyscale input: the first convolution's ImageNet weights are summed over RGB.")
    spec = model_spec(cfg, train_ds.labels, in_chans)
    t0 = time.time()
    if finished and not cfg.resume:
        log.info("%s: training already finished; skipping (delete stages/train.done to retrain).", run.path)
    else:
        model = build_model(spec, pretrained=cfg.pretrained)
        if cfg.init_from:
            init_weights(model, spec, cfg.init_from)
        module = SegmentationModule(model, train_ds.labels, cfg, spec)
        train_data = MaskedImages(train_ds, train_transform(cfg), seed=cfg.seed)
        if extra_ds is not None:
            extra = MaskedImages(extra_ds, train_transform(cfg), seed=cfg.seed + 1)
            loader = mixed_loader(train_data, extra, cfg.extra_weight, cfg.batch_size, cfg.seed, cfg.num_workers,
                                  persistent_workers=True)
        else:
            loader = shuffled_loader(train_data, cfg.batch_size, cfg.seed, cfg.num_workers, persistent_workers=True)
        fit_resumable(module, cfg, run, loader, max_epochs=cfg.epochs, max_steps=cfg.max_steps,
                      val_loader=val_loader(cfg, val_ds) if val_ds is not None else None, val_every=cfg.val_every)
        save_export(module.model, spec, train_ds.labels, run / "model")
        run.mark_done("train", {"seconds": round(time.time() - t0, 1), "samples": len(train_data),
                                "epochs": cfg.epochs})
    result = {"run": str(run.path), "train_seconds": round(time.time() - t0, 1)}
    if val_ds is not None:
        result["val"] = evaluate_run(run.path, split=cfg.val_split, ds=val_ds)
    return result


def init_weights(model: torch.nn.Module, spec: dict, source: str | Path) -> None:
    """Load every weight of an exported model into `model` (continued training, e.g. the next pseudo-mask
    round). The two must be the same network over the same classes; a mismatch is named, not a torch error."""
    if not Path(source).exists():
        raise ConfigError(f"--init-from {source}: no such export folder or checkpoint.")
    other, other_spec, _ = load_export(Path(source))
    keys = ("arch", "backbone", "num_classes", "in_chans", "output_stride", "aux_stage")
    diff = {k: (other_spec.get(k), spec.get(k)) for k in keys if other_spec.get(k) != spec.get(k)}
    if diff:
        detail = ", ".join(f"{k} {a} there vs {b} here" for k, (a, b) in diff.items())
        raise ConfigError(f"--init-from {source}: a different network ({detail}).")
    model.load_state_dict(other.state_dict())


# ---- evaluation -------------------------------------------------------------------------------
def saved_config(run: RunDir) -> TrainConfig | semi_stage.SemiConfig:
    """A run's config.yaml as its config class: `TrainConfig`, or the `train --semi` method's config."""
    path = run / "config.yaml"
    if not path.exists():
        raise DataError(f"{run.path}: no config.yaml; not a frugalseg training run.")
    semi = read_config_file(path).get("semi")
    if semi and semi not in semi_stage.SEMI_METHODS:
        raise DataError(f"{path}: unknown semi-supervised method '{semi}'.")
    return load_config(path, semi_stage.SEMI_METHODS[semi][0] if semi else TrainConfig)


def evaluate_run(run_path: str | Path, split: str | None = "val", ds: SegDataset | None = None,
                 data: str | None = None, write_predictions: bool = True, report: bool = True,
                 devices: str | None = None) -> dict:
    """Evaluate a finished run's exported model on a split (`frugalseg eval`): metrics/<split>.json (the
    `frugalseg.evaluation` schema), predictions/<split>/ and report.html.

    Supervised and semi-supervised runs alike (the run's config says how its cases are predicted);
    `data` evaluates on another dataset with the same classes; `devices` overrides the run's option."""
    run = RunDir(run_path)
    cfg = saved_config(run)
    if data:
        cfg.data = data
    if devices is not None:
        cfg.devices = devices
    pred_dir = run / "predictions" / (split or "eval") if write_predictions else None
    # the model first: a damaged export is reported before the dataset is scanned
    if isinstance(cfg, semi_stage.SemiConfig):
        meta = semi_stage.saved_export(run)
        spec, labels = meta["model"], LabelSpec.from_dict(meta["labels"])
        model = cfg.STEP.load_predictor(run.path)
    else:
        if not (run / "model" / "config.json").exists():
            raise DataError(f"{run.path}: no exported model (model/config.json); has training finished?")
        model, spec, labels = load_export(run / "model")
    if ds is None:
        ds = _open(cfg, split or "val")
        if isinstance(cfg, semi_stage.SemiConfig) and cfg.val_limit is not None and split == cfg.val_split:
            ds = ds.with_samples(ds.samples[: max(1, cfg.val_limit)])  # the cases the run was evaluated on
    if isinstance(cfg, semi_stage.SemiConfig):
        metrics = semi_stage.evaluate_semi(model, ds, labels, cfg, pred_dir=pred_dir)
        metrics.update(split=split, model=spec, method=cfg.semi)
    else:
        metrics = evaluate(model, ds, labels, device=device_of(cfg.devices), dims=2, size=spec.get("input_size"),
                           batch_size=cfg.eval_batch_size, amp=True, pred_dir=pred_dir, progress=cfg.progress)
        metrics.update(split=split, model=spec)
    run.write_metrics(split or "eval", metrics)
    if report:
        write_report(run.path, ds=ds, split=split or "eval")
    return metrics


# ---- prediction -------------------------------------------------------------------------------
VOLUME_INPUTS = {".h5", ".nii", ".nii.gz"}


def load_predictor(path: str | Path) -> tuple[torch.nn.Module, dict, LabelSpec]:
    """(network, spec, label spec) from an export folder, a .ckpt, or co-training's models/ folder."""
    path = Path(path)
    if path.is_dir() and (path / ENSEMBLE_FILE).exists():
        return load_ensemble(path)
    return load_export(path)


def predict_files(model_path: str | Path, inputs: Iterable[str | Path], out_dir: str | Path, overlays: bool = True,
                  devices: str = "auto") -> PredictResult:
    """Predict masks for image files or folders: palette PNGs (+ overlays) for 2D, NIfTI for volumes.

    2D networks segment volumes slice by slice, 3D networks (a semi-supervised V-Net or 3D U-Net) by
    sliding window over their training patch. `devices` as the training option (cpu, auto, ...).

    Inputs are never overwritten: an `out_dir` that holds input images is refused before anything is
    written, and inputs whose names would give the same mask file (`001.png` and `001.jpg`, or two folders'
    `001.png`) keep their extension or folder in the mask's name. An input that cannot be read is skipped
    with a warning and listed in the result's `failed`; the others are still written."""
    files = _input_files(inputs)
    out_dir = Path(out_dir)
    _refuse_input_folder(out_dir, files)
    names = output_names(files)
    model, spec, labels = load_predictor(Path(model_path))
    device = device_of(devices)
    model = model.to(device).eval()
    dims = int(spec.get("dims", 2))
    if dims != 2 and any(suffix_of(f) in RASTER_SUFFIXES for f in files):
        raise ConfigError(f"{model_path}: a 3D network cannot segment 2D images; give it volumes (.nii.gz, .h5).")
    make_folder(out_dir)
    for folder in (out_dir, out_dir / "overlays"):  # only what predict writes: --out may be any folder
        remove_stale_temporaries(folder, recursive=False)
    result = PredictResult()
    for f, name in zip(files, names):
        try:
            result.written.append(_predict_file(model, spec, labels, dims, device, f, name, out_dir, overlays))
        except DataError as exc:
            log.warning("skipped %s: %s", f, exc)
            result.failed[str(f)] = str(exc)
    return result


@dataclass
class PredictResult:
    """What `predict_files` wrote, and the inputs it skipped ({path: reason})."""

    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _input_files(inputs: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and suffix_of(f) in RASTER_SUFFIXES | VOLUME_INPUTS)
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder.")
    if not files:
        raise DataError(f"No input images found in {', '.join(map(str, inputs))} (looked for "
                        f"{', '.join(sorted(RASTER_SUFFIXES | VOLUME_INPUTS))}).")
    unique = list(dict.fromkeys(f.resolve() for f in files))  # a file given twice is predicted once
    return [Path(f) for f in unique]


def _refuse_input_folder(out_dir: Path, files: list[Path]) -> None:
    """Masks written beside their images would overwrite some (`a.png` -> `a.png`) and mix with the rest."""
    out = out_dir.resolve()
    clash = [f for f in files if f.parent == out or f.parent == out / "overlays"]
    if clash:
        raise ConfigError(f"--out {out_dir} holds input images ({clash[0].name}"
                          f"{f' and {len(clash) - 1} more' if len(clash) > 1 else ''}); their masks would overwrite or "
                          f"mix with them. Choose another --out folder.")


def output_names(files: list[Path]) -> list[str]:
    """The mask name of each input: its stem; where stems collide, the file name with its extension; where
    those collide too (same name in two folders), the parent folder's name in front. Names are compared
    case-folded: `A.png` and `a.png` are one file on macOS and Windows."""
    def unique(names: list[str]) -> Callable[[str], bool]:
        counts = Counter(n.casefold() for n in names)
        return lambda n: counts[n.casefold()] == 1

    stems = [f.name[: -len(suffix_of(f))] for f in files]
    ok = unique(stems)
    names = [stem if ok(stem) else f.name for stem, f in zip(stems, files)]
    ok = unique(names)
    names = [n if ok(n) else f"{f.parent.name}_{f.name}" for n, f in zip(names, files)]
    ok = unique(names)
    names = [n if ok(n) else str(f) for n, f in zip(names, files)]  # sample_file hashes a path
    renamed = [(f, n) for f, stem, n in zip(files, stems, names) if n != stem]
    if renamed:
        log.warning("%d inputs share a name with another input; their masks are named after the full name: %s",
                    len(renamed), ", ".join(f"{f} -> {n}" for f, n in renamed[:5]))
    return names


def _predict_file(model, spec: dict, labels: LabelSpec, dims: int, device, f: Path, name: str, out_dir: Path,
                  overlays: bool) -> Path:
    if suffix_of(f) in RASTER_SUFFIXES:
        image = read_rgb(f)
        x = to_tensor_image(image)
        if spec.get("in_chans", 3) == 1:
            x = x.mean(0, keepdim=True)
        probs = predict_images(model, x[None], spec.get("input_size"), device=device)
        pred = probs.argmax(1)[0].numpy().astype(np.uint8)
        path = sample_file(out_dir, name, ".png")
        write_label_png(path, pred, labels.palette_bytes())
        if overlays:
            write_rgb(sample_file(out_dir / "overlays", name, ".jpg"), overlay(image, pred, labels))
        return path
    volume = torch.from_numpy(np.ascontiguousarray(volume_reader(f)[0](f), dtype=np.float32))
    if volume.ndim != 3:
        raise DataError(f"{f}: expected a 3D volume, got shape {tuple(volume.shape)}.")
    if dims == 3:
        probs = predict_volume_sliding(model, volume, spec["patch_size"], device=device)
        pred = probs.argmax(0).numpy().astype(np.uint8)
    else:
        probs = predict_volume_slices(model, volume, size=spec.get("input_size"), device=device)
        pred = probs.argmax(1).numpy().astype(np.uint8)
    path = sample_file(out_dir, name, ".nii.gz")
    write_nifti(path, pred, (1.0,) * pred.ndim)
    return path
