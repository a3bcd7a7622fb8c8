"""Lightning glue: one LightningModule per training kind, and the trainer factory.

The algorithms stay plain modules and functions; this file only adapts them to Lightning's loop so
users get progress bars, checkpoints, resume, AMP and multi-GPU DDP (`torchrun --nproc_per_node=N`
or SLURM `srun`: Lightning reads the environment) without code of their own.

- `SegmentationModule`: supervised training of a segmenter (`stages.train`);
- `SemiModule`: semi-supervised training of any method's step module (`frugalseg.semi.step.SemiStep`:
  DTC, co-training, mean teacher, the supervised-only baseline; `stages.semi`);
- `ClassifierModule`: the multi-label tag classifier (`stages.classify`);
- `GANModule`: the mask → image conditional GAN (`stages.synth`), two optimisers stepped by hand;
- `PretrainModule`: an encoder on a proxy task or mix-and-match tuning (`stages.pretrain`).

The stages import this module only when they train: Lightning takes seconds to import, and the CLI
reads the stage configs (for `--help`) without it.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from frugalseg.data.io import atomic_path, output_error
from frugalseg.data.labels import LabelSpec
from frugalseg.export import CHECKPOINT_FORMAT, RESUME_ADVICE, read_checkpoint
from frugalseg.inference import predict_case, predict_volume_slices
from frugalseg.losses import segmentation_loss
from frugalseg.metrics import ConfusionMatrix, summarise
from frugalseg.models.group_net import group_loss
from frugalseg.models.tag_classifier import tag_loss
from frugalseg.runs import RunDir
from frugalseg.semi.step import SemiStep
from frugalseg.stages.options import RunOptions
from frugalseg.synth.cgan import discriminator_loss, generator_loss
from frugalseg.weak.group import SPEC_KIND as GROUP_SPEC_KIND

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints through `data.io.atomic_path` (temporary name, rename): a killed run never leaves a
    truncated .ckpt, a failed save leaves no temporary file, and a full disk or read-only folder is one
    `OutputError` naming the checkpoint."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_path(Path(path)) as tmp:
            torch.save(checkpoint, tmp)


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

    def __init__(self, model: torch.nn.Module, labels: LabelSpec, cfg: Any, model_spec: dict):
        super().__init__()
        self.model = model
        self.labels = labels
        self.cfg = cfg
        self.model_spec = model_spec
        self.val_cm = ConfusionMatrix(labels.num_classes, labels.ignore_index)
        self.loss_kind = cfg.loss_kind()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["mask"]
        if hasattr(self.model, "forward_train"):
            out, aux = self.model.forward_train(x)
            loss_main = segmentation_loss(out, y, self.loss_kind, self.labels.ignore_index)
            loss_aux = segmentation_loss(aux, y, self.loss_kind, self.labels.ignore_index)
            loss = loss_main + self.cfg.aux_weight * loss_aux
            self.log("train/loss_aux", loss_aux, on_step=True, on_epoch=False)
        else:
            loss = segmentation_loss(self.model(x), y, self.loss_kind, self.labels.ignore_index)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if "input" in batch:  # a 3D case (`data.torchdata.EvalCases`) evaluated slice-wise by a 2D network
            probs = predict_volume_slices(self.model, batch["input"], size=_resize_size(self.cfg), device=self.device)
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


class GANModule(L.LightningModule):
    """pix2pix's alternating updates: the discriminator on (condition, real) vs (condition, generated), then
    the generator against the updated discriminator (adversarial + L1 + feature matching). Adam for both
    (lr, beta1 from the config), constant lr, then linear decay to 0 from `cfg.decay_from` of the run
    (pix2pix: constant for half the epochs, then linear). Checkpoints carry the generator's spec and the
    label spec, like a segmenter's."""

    def __init__(self, generator: torch.nn.Module, discriminator: torch.nn.Module, labels: LabelSpec, cfg: Any,
                 spec: dict, total_steps: int):
        super().__init__()
        self.automatic_optimization = False
        self.generator = generator
        self.discriminator = discriminator
        self.labels = labels
        self.cfg = cfg
        self.model_spec = spec
        self.total_steps = max(1, int(total_steps))

    def training_step(self, batch: dict, batch_idx: int) -> None:
        cfg = self.cfg
        opt_g, opt_d = self.optimizers()
        cond, real = batch["cond"], batch["image"]
        fake = self.generator(cond)
        loss_d = discriminator_loss(self.discriminator, cond, real, fake, cfg.gan_loss)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        opt_d.step()
        self.discriminator.requires_grad_(False)  # the generator's step: no gradients for D's weights
        terms = generator_loss(self.discriminator, cond, real, fake, cfg.gan_loss, cfg.l1_weight, cfg.fm_weight)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(terms["loss"])
        opt_g.step()
        self.discriminator.requires_grad_(True)
        for sched in self.lr_schedulers():
            sched.step()
        n = real.shape[0]
        self.log("train/loss_d", loss_d.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/loss_g", terms["loss"].detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        for name in ("adversarial", "l1", "feature_matching"):
            self.log(f"train/g_{name}", terms[name], on_step=False, on_epoch=True, batch_size=n)

    def on_train_epoch_start(self) -> None:
        pass_epoch_to_dataset(self)

    def configure_optimizers(self):
        cfg = self.cfg
        betas = (cfg.beta1, 0.999)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr, betas=betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr, betas=betas)
        start = int(cfg.decay_from * self.total_steps)
        span = max(1, self.total_steps - start)

        def factor(step: int) -> float:
            return 1.0 if step < start else max(0.0, 1.0 - (step - start) / span)

        scheds = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (opt_g, opt_d)]
        return [opt_g, opt_d], [{"scheduler": s, "interval": "step"} for s in scheds]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["frugalseg"] = {"format_version": CHECKPOINT_FORMAT, "labels": self.labels.to_dict(),
                                   "model": self.model_spec, "kind": "cgan"}


class PretrainModule(L.LightningModule):
    """Self-supervised training of an encoder (`selfsup.encoders.Encoder`): colourisation or rotation with a
    small head, or mix-and-match's triplet loss on patches of the batch (no head). SGD with poly decay."""

    def __init__(self, encoder: torch.nn.Module, cfg: Any, labels: LabelSpec, background: int | None = 0):
        super().__init__()
        from frugalseg.selfsup.proxies import ColorizationHead, RotationHead

        self.encoder = encoder
        self.cfg = cfg
        self.background = background
        heads = {"colorize": ColorizationHead, "rotation": RotationHead}
        self.head = heads[cfg.task](encoder.channels) if cfg.task in heads else None
        self.labels = labels
        self.last_losses: dict[str, float] = {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["frugalseg"] = {"format_version": CHECKPOINT_FORMAT, "labels": self.labels.to_dict(),
                                   "model": {"encoder": self.encoder.kind, "task": self.cfg.task}, "kind": "pretrain"}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        from frugalseg.selfsup import mixmatch, proxies

        cfg, images = self.cfg, batch["image"]
        if cfg.task == "colorize":
            grey = proxies.lightness_input(images)
            logits = self.head(self.encoder(grey))
            loss = proxies.colorization_loss(logits, proxies.colorization_targets(images, logits.shape[-2:]))
        elif cfg.task == "rotation":
            x, y = proxies.rotation_batch(images)
            logits = self.head(self.encoder(x))
            loss = torch.nn.functional.cross_entropy(logits, y)
            self.log("train/rotation_acc", (logits.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        else:
            g = torch.Generator().manual_seed(hash((cfg.seed, int(self.global_step))) & 0x7FFFFFFF)
            patches, labels = mixmatch.sample_patches(images, batch["mask"], cfg.patches_per_image,
                                                      tuple(cfg.patch_sides), cfg.patch_resize, cfg.bg_ratio,
                                                      self.background, generator=g)
            triplets = mixmatch.class_graph_triplets(labels.cpu(), generator=g).to(images.device)
            self.log("train/triplets", float(len(triplets)), on_step=False, on_epoch=True)
            if len(triplets) == 0:  # no seed pixel in any image of the batch (all void): nothing to learn from
                return None  # Lightning skips the step
            loss = mixmatch.triplet_loss(self.encoder.embedding(patches, cfg.embedding_grid), triplets, cfg.margin)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=images.shape[0])
        self.last_losses = {"loss": float(loss.detach())}
        return loss

    def configure_optimizers(self):
        cfg = self.cfg
        opt = torch.optim.SGD(self.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        pass_epoch_to_dataset(self)


def _resize_size(cfg: Any) -> int | None:
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
    with atomic_path(main) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    for path in parts:
        shutil.rmtree(path.parent)  # its metrics.csv is merged; hparams.yaml repeats the first fit's


class LastCheckpoint(L.Callback):
    """Write checkpoints/last.ckpt at every training-epoch end, whatever the validation interval.

    `--resume` then loses at most an epoch. (Lightning's ModelCheckpoint with save_top_k=0 writes `last`
    only when a top-k checkpoint was written in the same step, i.e. never: a bug for long runs.)

    The checkpoint also carries the random number generators' states (torch CPU and CUDA, numpy, Python),
    restored on resume: dropout, noise and any other draw after the checkpoint are then those of the
    uninterrupted run (Lightning restores weights, optimiser, scheduler and loops, not the RNGs). With
    the samplers and augmentations seeded by (seed, epoch), a resumed run ends where the uninterrupted
    one does (tests/test_reliability_runs.py).
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            _flush_logs(trainer)  # the log holds every step the checkpoint covers, whatever kills the run next
            trainer.save_checkpoint(self.path, weights_only=False)  # optimizer and loops too: resumable

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _flush_logs(trainer)  # the previous epoch's end-of-epoch rows, logged after its checkpoint

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if RNG_KEY in checkpoint:
            restore_rng_states(checkpoint[RNG_KEY])


RNG_KEY = "frugalseg_rng_states"


def _flush_logs(trainer: L.Trainer) -> None:
    """Write buffered log rows now (Lightning's CSV logger writes every 100 steps and at the end)."""
    for logger in trainer.loggers:
        logger.save()


def rng_states() -> dict[str, Any]:
    """Every generator a training step may draw from, as stored in last.ckpt: tensors and plain Python
    values only, so the checkpoint still loads with `torch.load(weights_only=True)` (Lightning's resume)."""
    import random

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    states = {"torch": torch.get_rng_state(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
              "python": [version, list(internal), py_gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = states["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def make_trainer(options: RunOptions, run_path: Path, *, max_epochs: int, max_steps: int = -1, val_every: int = 1,
                 val: bool = True, resuming: bool = False) -> L.Trainer:
    """The one Lightning trainer of every training stage: devices, strategy, precision and progress from the
    run options; checkpoints/last.ckpt at every epoch end (atomic); CSV logs in logs/ (resumes fold in)."""
    checkpoint = LastCheckpoint(Path(run_path) / "checkpoints" / "last.ckpt")
    on_cpu = str(options.devices).lower() == "cpu"  # as `device_of` reads it: the CPU even where a GPU is
    return L.Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        accelerator="cpu" if on_cpu else "auto",
        devices=1 if on_cpu else options.devices,
        strategy=options.strategy,
        precision=resolve_precision(options.precision),
        callbacks=[checkpoint],
        enable_checkpointing=False,  # LastCheckpoint is the one checkpoint; no extra logs/checkpoints/epoch=*.ckpt
        logger=CSVLogger(save_dir=str(run_path), name="logs", version=_log_version(run_path, resuming)),
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=options.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=max(1, val_every) if val else 10**9,
        limit_val_batches=1.0 if val else 0,
        log_every_n_steps=10,
        default_root_dir=str(run_path),
    )


def fit_resumable(module: L.LightningModule, options: RunOptions, run: RunDir, train_loader, *, max_epochs: int,
                  max_steps: int = -1, val_loader=None, val_every: int = 1) -> L.Trainer:
    """Fit `module` in run directory `run`, the way every training stage does it: from checkpoints/last.ckpt
    when `options.resume` and one exists (a warning when none does), the resumed attempt's logs folded into
    logs/metrics.csv, and KeyboardInterrupt raised when the fit was interrupted (last.ckpt is then the
    place to resume from).

    Logs hold each epoch once: a resume first drops the rows a killed attempt logged after its checkpoint,
    and a fresh start drops every earlier attempt's rows. Lightning answers Ctrl-C with `sys.exit(1)` and
    leaves SIGINT ignored; both are undone here so the CLI can say how to resume (exit 130)."""
    ckpt = run.last_checkpoint if options.resume and run.last_checkpoint.exists() else None
    if options.resume and ckpt is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch.", run.checkpoints)
    if ckpt is not None:
        epoch = _checkpoint_epoch(ckpt)
        merge_resumed_logs(run.path)
        drop_rows_after(run.path / "logs" / "metrics.csv", epoch)
        # With worker processes, Lightning creates a resumed run's first iterator (workers prefetch at once)
        # before it sets the sampler's epoch: the loader is told the epoch it resumes at here.
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch + 1)
    else:
        clear_logs(run.path)
    trainer = make_trainer(options, run.path, max_epochs=max_epochs, max_steps=max_steps, val_every=val_every,
                           val=val_loader is not None, resuming=ckpt is not None)
    handler = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt)
    except SystemExit:
        if not trainer.interrupted:
            raise
    except OSError as exc:  # Lightning's CSV log is written in place, not through atomic_path
        logs = (run.path / "logs").resolve()
        failed = Path(os.fsdecode(exc.filename)).resolve() if exc.filename else None
        error = output_error(exc, failed) if failed is not None and logs in (failed, *failed.parents) else None
        if error is None:
            raise
        raise error from exc
    finally:
        if signal.getsignal(signal.SIGINT) is not handler and handler is not None:
            signal.signal(signal.SIGINT, handler)
    merge_resumed_logs(run.path)
    if trainer.interrupted:
        raise KeyboardInterrupt
    return trainer


def schedule_done(run: RunDir, epochs: int) -> bool:
    """Whether the run's last.ckpt already finished `epochs` epochs: a `--resume` of a finished run with the
    same schedule has nothing to train (and must not overwrite what the finished run recorded)."""
    return run.last_checkpoint.exists() and _checkpoint_epoch(run.last_checkpoint) + 1 >= epochs


def _checkpoint_epoch(path: Path) -> int:
    """The last finished epoch of a last.ckpt (written at that epoch's end); a clear error when it is damaged."""
    return int(read_checkpoint(path, RESUME_ADVICE, mmap=True)["epoch"])


def clear_logs(run_path: Path) -> None:
    """Remove an earlier attempt's training logs before a fresh start (CSVLogger would append resumed parts
    of a run that is no longer continued)."""
    logs = Path(run_path) / "logs"
    for part in logs.glob("resume_*"):
        shutil.rmtree(part, ignore_errors=True)
    for name in ("metrics.csv", "hparams.yaml"):
        (logs / name).unlink(missing_ok=True)


def drop_rows_after(metrics_csv: Path, epoch: int) -> None:
    """Keep the rows of epochs <= `epoch` (and rows without an epoch): what a killed attempt logged after
    its last checkpoint is logged again by the resumed one. A torn last line (the kill) is dropped too."""
    if not metrics_csv.exists():
        return
    with open(metrics_csv, newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = list(reader)

    def keep(row: dict) -> bool:
        if None in row or any(v is None for v in row.values()):  # a row cut short or overlong: torn
            return False
        value = row.get("epoch") or ""
        try:
            return not value or int(float(value)) <= epoch
        except ValueError:
            return False

    kept = [r for r in rows if keep(r)]
    if len(kept) == len(rows):
        return
    with atomic_path(metrics_csv) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)


def make_optimizer(params, cfg: Any) -> torch.optim.Optimizer:
    """SGD (momentum) or Adam over `params`, from a semi-supervised config's optimiser fields."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class SemiModule(L.LightningModule):
    """Semi-supervised training of a method's step module, the same for every method.

    The step (`frugalseg.semi.step.SemiStep`) computes the loss terms of a batch and holds the networks;
    here: the optimiser and learning-rate schedule (poly or step over `iterations`), loss-term logging,
    `after_step` after each optimiser step, validation (slice by slice for 2D networks, sliding window for
    3D ones), the epoch handed to the batches (also on resume) and the checkpoint metadata.

    The step's networks are registered here under the step's own names (the step itself is not a
    submodule), so checkpoint keys are `model.*` (`teacher.*`, `models.<k>.*`) as in an export, and
    `export.load_export(last.ckpt)` reads a checkpoint's `model` like any other.
    """

    def __init__(self, method: SemiStep, labels: LabelSpec, cfg: Any, model_spec: dict):
        super().__init__()
        object.__setattr__(self, "method", method)  # not registered: its networks are, below
        self.labels = labels
        self.cfg = cfg
        self.model_spec = model_spec
        self.val_cm = ConfusionMatrix(labels.num_classes, labels.ignore_index)
        for name, net in method.named_children():
            self.add_module(name, net)
        self.batches = None  # the `SemiBatches` (set by `stages.semi.fit_semi`): told the epoch on resume
        self._last_terms: dict[str, torch.Tensor | float] = {}
        self._loss_sum: torch.Tensor | float = 0.0  # this epoch's summed loss (logged as its mean at the end)
        self._loss_count = 0
        self._step_starts: list[float] = []

    def train(self, mode: bool = True) -> "SemiModule":
        super().train(mode)
        self.method.training = mode  # its networks are ours: they follow already
        return self

    def forward(self, x: torch.Tensor):
        return self.method.predictor(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.method.terms(batch, self.global_step)
        self.log_terms(terms, batch["image"].shape[0])
        return terms["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # global_step already counts the step just taken: the hook after step s (0-based) gets s.
        self.method.after_step(self.global_step - 1)

    def log_terms(self, terms: dict, batch_size: int) -> None:
        """Log every term (and `loss` on the progress bar) on the steps the logger writes (every
        `log_every_n_steps`: Lightning drops step values logged in between, yet each `self.log` call costs
        about a tenth of a CPU U-Net step); the epoch mean of `loss` is summed here without a host sync and
        logged at the epoch's end. Keeps the last terms."""
        self._last_terms = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in terms.items()}
        self._loss_sum = self._loss_sum + self._last_terms["loss"]
        self._loss_count += 1
        if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps):
            return
        for name, value in terms.items():
            self.log("train/loss_step" if name == "loss" else f"train/{name}", value, prog_bar=name == "loss",
                     on_step=True, on_epoch=False, batch_size=batch_size)

    @property
    def last_losses(self) -> dict[str, float]:
        """The loss terms of the last training step, as floats (read at the end: no sync per step)."""
        return {name: float(v) for name, v in self._last_terms.items()}

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_starts.append(time.perf_counter())

    def on_train_epoch_end(self) -> None:
        self._step_starts.append(float("nan"))  # validation and checkpoints are not iterations
        if self._loss_count:
            self.log("train/loss_epoch", self._loss_sum / self._loss_count, on_step=False, on_epoch=True)
        self._loss_sum, self._loss_count = 0.0, 0

    @property
    def seconds_per_iteration(self) -> float | None:
        """Median time from one training batch to the next (data, forward, backward, step), this process."""
        t = self._step_starts
        gaps = [b - a for a, b in zip(t, t[1:]) if not (math.isnan(a) or math.isnan(b))]
        return round(float(np.median(gaps)), 4) if gaps else None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        cfg = self.cfg
        probs = predict_case(self.method.predictor, batch["input"], cfg.dims, cfg.inference_size, cfg.val_overlap,
                             device=self.device)
        mask = batch["mask"]
        pred = probs.argmax(0)
        if mask.ndim == 2:  # a 2D image: one slice
            pred = pred[0]
        self.val_cm.update(pred.to(self.device), mask.to(self.device))

    def on_validation_epoch_end(self) -> None:
        log_validation(self, self.val_cm, self.labels)

    def configure_optimizers(self):
        cfg = self.cfg
        opt = make_optimizer(self.method.trainable_parameters(), cfg)
        if cfg.lr_schedule == "step":  # DTC: base_lr · 0.1^(iter // 2500)
            every = max(1, cfg.lr_step)
            schedule = lambda s: 0.1 ** (s // every)  # noqa: E731
        else:  # SSL4MIS: base_lr · (1 - iter / max_iter)^0.9
            schedule = poly_lambda(cfg.iterations)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        # Workers are not persistent, so they see the epoch given here.
        if self.batches is not None:
            self.batches.set_epoch(self.current_epoch)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # On resume Lightning may create the first iterator before `on_train_epoch_start`: the batches
        # are told here which epoch comes next (checkpoints are written at epoch ends).
        if self.batches is not None:
            self.batches.set_epoch(int(checkpoint["global_step"]) // self.batches.steps)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["frugalseg"] = {"format_version": CHECKPOINT_FORMAT, "kind": self.method.kind,
                                   "labels": self.labels.to_dict(), "model": self.model_spec,
                                   "epoch_steps": self.batches.steps if self.batches is not None else None,
                                   **self.method.checkpoint_extra()}


class TagModelModule(L.LightningModule):
    """What the tag-trained models (classifier, group network) share: the epoch handed to the dataset, and a
    checkpoint that names its kind and classes (a --resume with other classes is refused before writing)."""

    KIND: str = ""

    def __init__(self, model: torch.nn.Module, cfg: Any, labels: LabelSpec):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.labels = labels

    def on_train_epoch_start(self) -> None:
        pass_epoch_to_dataset(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["frugalseg"] = {"format_version": CHECKPOINT_FORMAT, "kind": self.KIND,
                                   "labels": self.labels.to_dict()}


class ClassifierModule(TagModelModule):
    """Multi-label tag classifier training (IRN recipe: soft-margin loss, poly SGD, 10x head learning rate)."""

    KIND = "tag_classifier"

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(batch["image"])
        loss = tag_loss(logits.float(), batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def configure_optimizers(self):
        cfg = self.cfg
        opt = torch.optim.SGD(self.model.param_groups(cfg.lr, cfg.head_lr_mult), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class GroupModule(TagModelModule):
    """Group-wise training: both losses, the reference's four learning rates, step decay per epoch."""

    KIND = GROUP_SPEC_KIND

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.model(batch["images"])
        loss = group_loss(out, batch["targets"], self.cfg.pre_weight)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["images"].shape[0])
        return loss

    def configure_optimizers(self):
        cfg = self.cfg
        opt = torch.optim.SGD(self.model.param_groups(cfg.lr, cfg.new_lr_mult, cfg.bias_lr_mult), lr=cfg.lr,
                              momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              nesterov=cfg.nesterov and cfg.momentum > 0)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.lr_steps), gamma=cfg.lr_gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
