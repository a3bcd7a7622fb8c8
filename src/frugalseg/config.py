"""Typed configuration: the single source of truth for defaults, `--help`, and the saved config.yaml.

Defaults follow the OCR recipe where it applies (SGD momentum 0.9, poly lr, weight decay 5e-4, aux 0.4)
scaled to what runs on a CPU (small backbone, output stride 16, 256 px crops). A run is re-run from its
saved file with `--config runs/x/config.yaml`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from frugalseg.errors import ConfigError


@dataclass
class TrainConfig:
    data: str = ""  # folder or task name (msrc-objects, acdc, ...)
    out: str = "runs/train"
    train_split: str = "train"
    background_classes: list[str] | None = None  # merged into the background class
    ignore_classes: list[str] | None = None  # become void (255)
    val_split: str | None = "val"
    mask_dir: str | None = None  # train on these masks (<id>.png, 255 = ignore) instead of the dataset's, e.g. pseudo-masks
    # model
    arch: Literal["ocr", "fcn", "unet2d"] = "ocr"
    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool | str = True
    init_from: str | None = None  # start from an exported model (a run's model/ folder or a .ckpt) of the same spec
    output_stride: int = 16
    aux_stage: Literal["last", "penultimate"] = "penultimate"  # chosen on a train holdout (benchmarks/supervised.py)
    # optimisation
    epochs: int = 30
    max_steps: int = -1
    batch_size: int = 8
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    backbone_lr_mult: float = 1.0
    weight_decay: float = 5e-4
    momentum: float = 0.9
    loss: Literal["ce", "dice_ce"] = "ce"
    aux_weight: float = 0.4
    # data
    policy: Literal["crop", "resize"] = "crop"
    crop_size: int = 256
    scale: tuple[float, float] = (0.5, 2.0)
    base_size: int | None = None
    # label budget (None = every mask)
    mask_fraction: float | None = None
    mask_count: int | None = None
    labelled_ids: list[str] | None = None
    budget_seed: int = 0
    # machinery
    seed: int = 0
    precision: str = "auto"  # auto: bf16/16-mixed on GPU, 32 on CPU
    devices: str = "auto"
    strategy: str = "auto"
    num_workers: int = 0
    val_every: int = 1
    eval_batch_size: int = 4
    resume: bool = False
    progress: bool = True

    def validate(self) -> "TrainConfig":
        check_common(self)
        if self.mask_fraction is not None and not 0 < self.mask_fraction <= 1:
            raise ConfigError(f"mask_fraction must be in (0, 1], got {self.mask_fraction}.")
        return self


def check_common(cfg: Any) -> None:
    """Checks every training config shares: a dataset, a schedule, a batch, a valid output stride."""
    if not cfg.data:
        raise ConfigError("No dataset given: pass --data FOLDER or a task name such as msrc-objects.")
    if cfg.epochs < 1 and cfg.max_steps < 1:
        raise ConfigError("epochs must be >= 1.")
    if cfg.batch_size < 1:
        raise ConfigError("batch_size must be >= 1.")
    if getattr(cfg, "output_stride", 16) not in (8, 16, 32):
        raise ConfigError("output_stride must be 8, 16 or 32.")


def load_config(path: str | Path, cls=TrainConfig, **overrides: Any):
    """Read a saved config.yaml; unknown keys are an error (typos should not pass silently)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Config file {path} does not exist.")
    data = yaml.safe_load(path.read_text()) or {}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown config keys {unknown}.")
    if isinstance(data.get("scale"), list):
        data["scale"] = tuple(data["scale"])
    data.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**data)
