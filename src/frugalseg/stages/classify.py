"""Stage `classify`: train the multi-label tag classifier on image tags only, then score its tags (AP / F1).

Training follows IRN where it is right: multi-label soft-margin loss, BN statistics frozen, early stages
frozen, SGD with poly decay, the new 1x1 head at 10x the backbone's learning rate, random rescale +
crop + flip. Not copied: IRN's optimizer passes weight decay where SGD expects momentum (momentum 1e-4 in
effect); here momentum is a real option (default 0.9).

Writes into `cfg.out`: config.yaml, checkpoints/last.ckpt (every epoch; `--resume`), logs/, model/
(safetensors + config.json, read by `frugalseg.weak.classify.load_classifier`), stages/classify.done and
metrics/classify_<eval split>.json. The network, its data and its evaluation are `frugalseg.weak.classify`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import lightning as L

from frugalseg.data import open_splits
from frugalseg.data.torchdata import shuffled_loader
from frugalseg.data.transforms import CropTransform
from frugalseg.errors import DataError
from frugalseg.runs import RunDir
from frugalseg.stages.engine import ClassifierModule, fit_resumable
from frugalseg.stages.options import RunOptions, ascending, check_common, device_of, minus_one_or_positive, option
from frugalseg.stages.run_guard import claim_run_dir
from frugalseg.weak.classify import (
    TaggedImages,
    build_classifier,
    classifier_spec,
    evaluate_classifier,
    load_classifier,
    save_classifier,
)

log = logging.getLogger(__name__)

PRETRAINED_HELP = "true (ImageNet weights), false (random init), or a path to a weight file."
BACKBONE_HELP = "Any timm model name; tf_efficientnet_lite0/1/2 have offline ImageNet weights."
OUTPUT_STRIDE_HELP = "Backbone output stride (8, 16 or 32): the last stages are dilated instead of strided."
FROZEN_STAGES_HELP = "Backbone feature stages kept frozen (IRN: up to stride 8)."
FREEZE_BN_HELP = "Keep the backbone's BatchNorm statistics frozen (IRN)."


@dataclass
class ClassifyConfig(RunOptions):
    out: str = option("runs/classify", "Run directory for the classifier (config, checkpoints, model/, metrics/).")
    # "train+val" joins splits (tags only: WSSS maps the images it trains on)
    train_split: str = option("train", "Split(s) whose tags train the classifier; '+' joins splits (train+val).")
    eval_split: str | None = option("val", "Split for per-class AP / F1 (empty to skip).")
    backbone: str = option("tf_efficientnet_lite0", BACKBONE_HELP)
    pretrained: bool | str = option(True, PRETRAINED_HELP)
    output_stride: int = option(16, OUTPUT_STRIDE_HELP, choices=(8, 16, 32))
    frozen_stages: int = option(3, FROZEN_STAGES_HELP, ge=0)
    freeze_bn: bool = option(True, FREEZE_BN_HELP)
    peak_stimulation: bool = option(False, "PRM: train with peak stimulation (class score = mean response at "
                                           "local maxima).")
    epochs: int = option(8, "Training epochs (-1: no epoch limit, with --max-steps).", check=minus_one_or_positive)
    max_steps: int = option(-1, "Stop after this many optimiser steps (-1: the epochs decide).",
                            check=minus_one_or_positive)
    batch_size: int = option(16, "Images per batch.", ge=1)
    lr: float = option(0.01, "Learning rate of the backbone (SGD, poly decay).", gt=0)
    head_lr_mult: float = option(10.0, "Learning rate of the new 1x1 head, as a multiple of --lr (IRN: 10).", gt=0)
    weight_decay: float = option(1e-4, "SGD weight decay.", ge=0)
    momentum: float = option(0.9, "SGD momentum (IRN's code passes its weight decay here; 0.9 is the usual value).",
                             ge=0, lt=1)
    crop_size: int = option(256, "Training crop after the random rescale.", ge=1)
    base_size: int = option(320, "Longer image side before the random scale factor.", ge=1)
    scale: tuple[float, float] = option((0.5, 1.0), "Random rescale range, as factors of --base-size.", gt=0,
                                        check=ascending)

    def validate(self) -> "ClassifyConfig":
        check_common(self)
        return self


def open_classify_split(cfg: Any, splits: str):
    """The '+'-joined `splits` of the config's dataset, with its class remapping."""
    return open_splits(cfg.data, splits, background_classes=cfg.background_classes, ignore_classes=cfg.ignore_classes)


def train_classifier(cfg: ClassifyConfig) -> dict:
    """Train (or resume, or skip when finished) the tag classifier in cfg.out; evaluate AP/F1."""
    cfg.validate()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    train_ds = open_classify_split(cfg, cfg.train_split)
    eval_ds = open_classify_split(cfg, cfg.eval_split) if cfg.eval_split else None  # named before training
    labels = train_ds.labels
    spec = classifier_spec(labels, backbone=cfg.backbone, output_stride=cfg.output_stride,
                           peak_stimulation=cfg.peak_stimulation, frozen_stages=cfg.frozen_stages,
                           freeze_bn=cfg.freeze_bn)
    run = RunDir(cfg.out)  # after the data is checked: bad input leaves no folder behind
    finished = run.stage_done("classify")
    claim_run_dir(run, cfg, labels, finished=finished, started=run.last_checkpoint.exists())
    t0 = time.time()
    if finished and not cfg.resume:
        log.info("%s: classifier already trained; skipping (delete stages/classify.done to retrain).", run.path)
    else:
        model = build_classifier(spec, pretrained=cfg.pretrained)
        transform = CropTransform(cfg.crop_size, tuple(cfg.scale), True, cfg.base_size)
        data = TaggedImages(train_ds, spec["class_ids"], transform, cfg.seed)
        if data.targets.sum() == 0:
            raise DataError(f"{train_ds.name}: no image carries a foreground tag; nothing to classify.")
        loader = shuffled_loader(data, cfg.batch_size, cfg.seed, cfg.num_workers, persistent_workers=True)
        module = ClassifierModule(model, cfg, labels)
        fit_resumable(module, cfg, run, loader, max_epochs=cfg.epochs, max_steps=cfg.max_steps)
        save_classifier(module.model, spec, labels, run / "model")
        run.mark_done("classify", {"seconds": round(time.time() - t0, 1), "images": len(data), "epochs": cfg.epochs})
    result = {"run": str(run.path), "train_seconds": round(time.time() - t0, 1)}
    if eval_ds is not None:
        model, spec, labels = load_classifier(run.path)
        device = device_of(cfg.devices)
        metrics = evaluate_classifier(model.to(device), eval_ds, spec["class_ids"],
                                      labels, device)
        metrics["split"] = cfg.eval_split
        run.write_metrics(f"classify_{cfg.eval_split}", metrics)
        result["eval"] = metrics
    return result
