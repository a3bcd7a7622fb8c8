"""Lightning glue: one LightningModule per training kind, and the trainer factory.

The algorithms stay plain modules and functions; this file only adapts them to Lightning's loop so
users get progress bars, checkpoints, resume, AMP and multi-GPU DDP (`torchrun --nproc_per_node=N`
or SLURM `srun`: Lightning reads the environment) without code of their own.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from frugalseg.config import TrainConfig
from frugalseg.data.labels import LabelSpec
from frugalseg.losses import segmentation_loss
from frugalseg.metrics import ConfusionMatrix, summarise

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary name and rename: a killed run never leaves a truncated .ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def poly_lambda(total_steps: int, power: float = 0.9):
    total = max(1, total_steps)
    return lambda step: max(0.0, 1 - min(step, total) / total) ** power


def log_validation(module: L.LightningModule, cm, labels: LabelSpec) -> None:
    """Log val/miou and val/dice_fg from the epoch's confusion matrix (already summed across GPUs) and
    reset it: the one validation summary of supervised and semi-supervised training."""
    m = summarise(cm.compute().cpu(), labels.names, labels.background)
    cm.reset()
    if m["miou"] is not None:
        module.log("val/miou", m["miou"], prog_bar=True, sync_dist=False)
    if m["mean_dice_foreground"] is not None:
        module.log("val/dice_fg", m["mean_dice_foreground"], prog_bar=True, sync_dist=False)


def pass_epoch_to_dataset(module: L.LightningModule) -> None:
    """Tell the training dataset the epoch: its augmentation is seeded per (seed, epoch, index)."""
    ds = getattr(module.trainer.train_dataloader, "dataset", None)
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(module.current_epoch)


class SegmentationModule(L.LightningModule):
    """Supervised training of any model returning logits, or (logits, aux) through `forward_train`."""

    def __init__(self, model: torch.nn.Module, labels: LabelSpec, cfg: TrainConfig, model_spec: dict):
        super().__init__()
        self.model = model
        self.labels = labels
        self.cfg = cfg
        self.model_spec = model_spec
        self.val_cm = ConfusionMatrix(labels.num_classes, labels.ignore_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["mask"]
        if hasattr(self.model, "forward_train"):
            out, aux = self.model.forward_train(x)
            loss_main = segmentation_loss(out, y, self.cfg.loss, self.labels.ignore_index)
            loss_aux = segmentation_loss(aux, y, self.cfg.loss, self.labels.ignore_index)
            loss = loss_main + self.cfg.aux_weight * loss_aux
            self.log("train/loss_aux", loss_aux, on_step=True, on_epoch=False)
        else:
            loss = segmentation_loss(self.model(x), y, self.cfg.loss, self.labels.ignore_index)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if "volume" in batch:  # a 3D case evaluated slice-wise by a 2D network
            from frugalseg.inference import predict_volume_slices

            probs = predict_volume_slices(self.model, batch["volume"], size=_resize_size(self.cfg))
            self.val_cm.update(probs.argmax(1).to(self.device), batch["mask"].to(self.device))
            return
        logits = self.model(batch["image"])
        self.val_cm.update(logits.argmax(1), batch["mask"])

    def on_validation_epoch_end(self) -> None:
        log_validation(self, self.val_cm, self.labels)

    def on_train_epoch_start(self) -> None:
        pass_epoch_to_dataset(self)

    def configure_optimizers(self):
        cfg = self.cfg
        backbone = getattr(self.model, "backbone", None)
        bb_params = set(id(p) for p in backbone.parameters()) if backbone is not None else set()
        groups = [
            {"params": [p for p in self.model.parameters() if id(p) in bb_params], "lr": cfg.lr * cfg.backbone_lr_mult},
            {"params": [p for p in self.model.parameters() if id(p) not in bb_params], "lr": cfg.lr},
        ]
        groups = [g for g in groups if g["params"]]
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints carry what is needed to rebuild and interpret the model without the run directory.
        checkpoint["frugalseg"] = {
            "format_version": CHECKPOINT_FORMAT,
            "labels": self.labels.to_dict(),
            "model": self.model_spec,
        }


def _resize_size(cfg: TrainConfig) -> int | None:
    return cfg.crop_size if cfg.policy == "resize" else None


def _log_version(run_path: Path, resuming: bool) -> str:
    """First fit logs to logs/metrics.csv; each resume to logs/resume_<k>/ (CSVLogger would erase the first)."""
    if not resuming:
        return ""
    k = 1
    while (Path(run_path) / "logs" / f"resume_{k}").exists():
        k += 1
    return f"resume_{k}"


def merge_resumed_logs(run_path: Path) -> None:
    """Fold logs/resume_*/metrics.csv into logs/metrics.csv (union of columns) so curves span the whole run."""
    import csv

    logs = Path(run_path) / "logs"
    parts = sorted(logs.glob("resume_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    main = logs / "metrics.csv"
    if not parts or not main.exists():
        return
    rows, columns = [], []
    for path in [main, *parts]:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns += [c for c in reader.fieldnames or [] if c not in columns]
            rows += list(reader)
    from frugalseg.data.io import atomic_path

    with atomic_path(main) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    import shutil

    for path in parts:
        shutil.rmtree(path.parent)  # its metrics.csv is merged; hparams.yaml repeats the first fit's


class LastCheckpoint(L.Callback):
    """Write checkpoints/last.ckpt at every training-epoch end, whatever the validation interval.

    `--resume` then loses at most an epoch. (Lightning's ModelCheckpoint with save_top_k=0 writes `last`
    only when a top-k checkpoint was written in the same step, i.e. never: a bug for long runs.)
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            trainer.save_checkpoint(self.path, weights_only=False)  # optimizer and loops too: resumable


def make_trainer(cfg: TrainConfig, run_path: Path, *, max_epochs: int, val: bool = True, resuming: bool = False) -> L.Trainer:
    checkpoint = LastCheckpoint(Path(run_path) / "checkpoints" / "last.ckpt")
    return L.Trainer(
        max_epochs=max_epochs,
        max_steps=cfg.max_steps,
        accelerator="auto",
        devices=cfg.devices,
        strategy=cfg.strategy,
        precision=resolve_precision(cfg.precision),
        callbacks=[checkpoint],
        enable_checkpointing=False,  # LastCheckpoint is the one checkpoint; no extra logs/checkpoints/epoch=*.ckpt
        logger=CSVLogger(save_dir=str(run_path), name="logs", version=_log_version(run_path, resuming)),
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=cfg.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=cfg.val_every if val else 10**9,
        limit_val_batches=1.0 if val else 0,
        log_every_n_steps=10,
        default_root_dir=str(run_path),
    )


class ClassifierModule(L.LightningModule):
    """Multi-label tag classifier training (IRN recipe: soft-margin loss, poly SGD, 10x head learning rate)."""

    def __init__(self, model: torch.nn.Module, cfg: Any):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        from frugalseg.models.tag_classifier import tag_loss

        logits = self.model(batch["image"])
        loss = tag_loss(logits.float(), batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def on_train_epoch_start(self) -> None:
        pass_epoch_to_dataset(self)

    def configure_optimizers(self):
        cfg = self.cfg
        opt = torch.optim.SGD(self.model.param_groups(cfg.lr, cfg.head_lr_mult), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["frugalseg"] = {"format_version": CHECKPOINT_FORMAT, "kind": "tag_classifier"}
