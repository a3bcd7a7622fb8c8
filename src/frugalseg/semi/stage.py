"""The stage every semi-supervised method runs, and the Lightning module they share.

A method is a `SemiModule` subclass that defines its loss/step (`training_step`) and, where it differs
from the default, what it trains (`create`), which labelled streams its batches hold (`streams`: one
per co-trained model), what it evaluates (`predictor`) and exports (`export`, `load_predictor`).
Everything else is here, once:

- `train_semi(cfg, Method)`: data (`semi.batches.open_semi_data`: label budget, unlabelled set,
  validation cases), network spec, batches (`SemiBatches`), Lightning fit with checkpoints every epoch
  and exact resume (`fit_semi`), export, evaluation, in the run directory `cfg.out`:
  config.yaml (resolved), budget.json, checkpoints/last.ckpt, logs/metrics.csv, the exported model(s),
  metrics/<split>.json, stages/train.done. A finished run is not retrained unless `resume`.
- `SemiModule`: validation (slice by slice for 2D networks, sliding window for 3D ones), the optimiser
  and learning-rate schedule (poly or step over `iterations`), the epoch handed to the batches
  (also on resume), checkpoint metadata, loss-term logging.
- `evaluate_semi`: Dice (confusion matrix and per case), Jaccard, HD95 and ASD per foreground class.
"""

from __future__ import annotations

import logging
import math
import time
from types import SimpleNamespace
from typing import ClassVar, Sequence

import lightning as L
import numpy as np
import torch
from torch import nn

from frugalseg.data.labels import IGNORE_INDEX, LabelSpec
from frugalseg.data.samples import SegDataset
from frugalseg.errors import ConfigError, DataError
from frugalseg.losses import segmentation_loss, soft_dice_loss
from frugalseg.engine import log_validation
from frugalseg.metrics import ConfusionMatrix, confusion_matrix, summarise
from frugalseg.semi.batches import (SemiBatches, SemiConfig, case_input, eval_loader, input_channels,
                                    open_semi_data)

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT", "SemiModule", "evaluate_semi", "fit_semi", "keep_largest_component", "make_optimizer",
    "network_spec", "predict_case", "supervised_loss", "train_semi", "trainer_view",
]

CHECKPOINT_FORMAT = 1


def first_output(out):
    """Networks with several outputs (DTC: segmentation, level set) are read through the first."""
    return out[0] if isinstance(out, (tuple, list)) else out


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "dice_ce",
                    ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """ce | dice_ce (0.5 CE + 0.5 soft Dice, SSL4MIS) | dice (soft Dice over all classes, closest to DTC's)."""
    if kind == "dice":
        return soft_dice_loss(logits, labels, ignore_index)
    return segmentation_loss(logits, labels, kind, ignore_index)


def make_optimizer(params, cfg: SemiConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def network_spec(cfg: SemiConfig, labels: LabelSpec, in_chans: int, levelset: bool = False) -> dict:
    """The spec `frugalseg.models.build_model` rebuilds the network from (saved in checkpoints and exports).

    Plain: unet2d / unet3d / vnet3d; `levelset`: DTC's dual-head versions. 2D specs carry `input_size`
    (slices are resized to the patch at inference, as in training)."""
    dims, patch = cfg.dims, list(cfg.patch_size)
    if cfg.arch == "vnet":
        arch = "vnet3d"
    else:
        arch = f"unet{dims}d"
    spec = {"arch": f"levelset_{arch}" if levelset else arch, "num_classes": labels.num_classes, "in_chans": in_chans,
            "dropout": cfg.dropout, "dims": dims, "patch_size": patch, "method": cfg.semi}
    if cfg.arch == "unet":
        spec["channels"] = list(cfg.channels)
    if dims == 2:
        spec["input_size"] = patch[0] if patch[0] == patch[1] else patch
    return spec


def trainer_view(cfg: SemiConfig) -> SimpleNamespace:
    """The fields `engine.make_trainer` reads, from a semi config. Training stops on max_epochs
    (iterations / epoch length), not max_steps: a run stopped by max_steps ends inside its last epoch as
    Lightning counts it, and a resume from that checkpoint would replay part of an epoch."""
    return SimpleNamespace(max_steps=-1, devices=cfg.devices, strategy=cfg.strategy,
                           precision=cfg.precision, progress=cfg.progress, val_every=max(1, cfg.val_every))


# ---- the Lightning module the methods share ------------------------------------------------------------
class SemiModule(L.LightningModule):
    """Base of every semi-supervised method: subclasses define `training_step` (their loss) and, where it
    differs, `create`, `streams`, `predictor`, `export` and `load_predictor`."""

    kind: ClassVar[str] = "semi"
    needs_sdf: ClassVar[bool] = False  # batches carry ground-truth signed distance maps (DTC)
    uses_unlabelled: ClassVar[bool] = True  # False: labelled batches only (the supervised-only baseline)

    def __init__(self, labels: LabelSpec, cfg: SemiConfig, model_spec: dict):
        super().__init__()
        self.labels = labels
        self.cfg = cfg
        self.model_spec = model_spec
        self.val_cm = ConfusionMatrix(labels.num_classes, labels.ignore_index)
        self.batches: SemiBatches | None = None  # set by `fit_semi`: told the epoch on resume
        self._last_terms: dict[str, torch.Tensor | float] = {}
        self._step_starts: list[float] = []

    # -- what a method may override ---------------------------------------------------------------------
    @classmethod
    def levelset(cls, cfg: SemiConfig) -> bool:
        """Whether the method trains DTC's dual-head (segmentation + level-set) network."""
        return False

    @classmethod
    def check(cls, cfg: SemiConfig, labels: LabelSpec) -> None:
        """Refuse data the method cannot train on (clear error before anything is written)."""

    @classmethod
    def streams(cls, cfg: SemiConfig, labelled: Sequence[str]) -> list[tuple[str, ...]]:
        """The labelled streams of a batch (ids of each): one, the labelled set."""
        return [tuple(labelled)]

    @classmethod
    def create(cls, spec: dict, labels: LabelSpec, cfg: SemiConfig) -> "SemiModule":
        from frugalseg.models import build_model

        return cls(build_model(spec), labels, cfg, spec)

    @property
    def predictor(self) -> nn.Module:
        """The network validated, evaluated and exported as model/."""
        return self.model

    def export(self, run) -> None:
        from frugalseg.export import save_export

        save_export(self.predictor, self.model_spec, self.labels, run / "model")

    @classmethod
    def load_predictor(cls, run) -> nn.Module:
        from frugalseg.export import load_export

        return load_export(run / "model")[0]

    def checkpoint_extra(self) -> dict:
        return {}

    # -- shared machinery -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor):
        return self.predictor(x)

    def log_terms(self, terms: dict, batch_size: int) -> None:
        """Log `loss` (step and epoch mean, progress bar) and every other term (per step); keep the last."""
        for name, value in terms.items():
            if name == "loss":
                self.log("train/loss", value, prog_bar=True, on_step=True, on_epoch=True, batch_size=batch_size)
            else:
                self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=batch_size)
        self._last_terms = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in terms.items()}

    @property
    def last_losses(self) -> dict[str, float]:
        """The loss terms of the last training step, as floats (read at the end: no sync per step)."""
        return {name: float(v) for name, v in self._last_terms.items()}

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._step_starts.append(time.perf_counter())

    def on_train_epoch_end(self) -> None:
        self._step_starts.append(float("nan"))  # validation and checkpoints are not iterations

    @property
    def seconds_per_iteration(self) -> float | None:
        """Median time from one training batch to the next (data, forward, backward, step), this process."""
        t = self._step_starts
        gaps = [b - a for a, b in zip(t, t[1:]) if not (math.isnan(a) or math.isnan(b))]
        return round(float(np.median(gaps)), 4) if gaps else None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        probs = predict_case(self.predictor, batch["input"], self.cfg.dims, self.cfg.patch_size, self.cfg.val_overlap)
        mask = batch["mask"]
        pred = probs.argmax(0)
        if mask.ndim == 2:  # a 2D image: one slice
            pred = pred[0]
        self.val_cm.update(pred.to(self.device), mask.to(self.device))

    def on_validation_epoch_end(self) -> None:
        log_validation(self, self.val_cm, self.labels)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        cfg = self.cfg
        opt = make_optimizer(self.trainable_parameters(), cfg)
        if cfg.lr_schedule == "step":  # DTC: base_lr · 0.1^(iter // 2500)
            every = max(1, cfg.lr_step)
            schedule = lambda s: 0.1 ** (s // every)  # noqa: E731
        else:  # SSL4MIS: base_lr · (1 - iter / max_iter)^0.9
            from frugalseg.engine import poly_lambda

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
        checkpoint["frugalseg"] = {"format_version": CHECKPOINT_FORMAT, "kind": self.kind,
                                   "labels": self.labels.to_dict(), "model": self.model_spec,
                                   "epoch_steps": self.batches.steps if self.batches is not None else None,
                                   **self.checkpoint_extra()}


# ---- fit and stage -----------------------------------------------------------------------------------------
def fit_semi(module: SemiModule, cfg: SemiConfig, run, batches: SemiBatches, val: SegDataset | None) -> L.Trainer:
    """Lightning fit of a semi-supervised module with resume, as `supervised.train` does it.

    `iterations` end the run; epochs of `batches.steps` iterations (a divisor of `iterations`,
    `SemiConfig.epoch_length`) are the checkpoint/validation unit, so a run stopped at its end resumes
    exactly, with the batches the uninterrupted run would have drawn."""
    from torch.utils.data import DataLoader

    from frugalseg.engine import make_trainer, merge_resumed_logs

    if cfg.iterations % batches.steps:
        raise ConfigError(f"{batches.steps} steps per epoch do not divide {cfg.iterations} iterations.")
    module.batches = batches
    loader = DataLoader(batches, batch_size=None, num_workers=cfg.num_workers)
    ckpt = run.last_checkpoint if cfg.resume and run.last_checkpoint.exists() else None
    if cfg.resume and ckpt is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch.", run.checkpoints)
    validate = val is not None and cfg.val_every > 0
    trainer = make_trainer(trainer_view(cfg), run.path, max_epochs=cfg.iterations // batches.steps, val=validate,
                           resuming=ckpt is not None)
    trainer.fit(module, loader, eval_loader(val, cfg.dims, cfg.num_workers) if validate else None, ckpt_path=ckpt)
    merge_resumed_logs(run.path)
    if trainer.interrupted:
        raise KeyboardInterrupt
    return trainer


def _epoch_steps(cfg: SemiConfig, run) -> int:
    """Iterations per epoch: `cfg.epoch_length` for a new run; a resumed run keeps its checkpoint's, so
    its epochs (and so its batches) continue where they stopped even when `iterations` changed."""
    steps = cfg.epoch_length
    if cfg.resume and run.last_checkpoint.exists():
        meta = torch.load(run.last_checkpoint, map_location="cpu", weights_only=False, mmap=True).get("frugalseg", {})
        saved = int(meta.get("epoch_steps") or steps)
        if saved != steps:
            if cfg.iterations % saved:
                raise ConfigError(f"--resume: the run's epochs have {saved} iterations, which does not divide "
                                  f"iterations={cfg.iterations}; choose a multiple of {saved}.")
            steps = saved
    elif steps != cfg.epoch_steps:
        log.info("%d iterations: epochs of %d iterations (epoch_steps %d does not divide them).",
                 cfg.iterations, steps, cfg.epoch_steps)
    return steps


def train_semi(cfg: SemiConfig, method: type[SemiModule]) -> dict:
    """Train `method` in `cfg.out` (resumable), export, evaluate on the validation split.

    Returns {"run", "method", "train_seconds", "iterations", "losses", "labelled", "unlabelled",
    "streams" (labelled samples per stream), "val"?: `evaluate_semi` metrics}.
    """
    from frugalseg.runs import RunDir, read_json, write_json

    cfg.validate()
    run = RunDir(cfg.out)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = open_semi_data(cfg, require_unlabelled=method.uses_unlabelled)
    cfg, train, labels = data.cfg, data.train, data.train.labels
    method.check(cfg, labels)
    streams = method.streams(cfg, data.labelled)
    unlabelled = data.unlabelled if method.uses_unlabelled else []
    write_json(run / "budget.json", {
        "method": cfg.semi, "labelled": list(data.labelled), "streams": [list(s) for s in streams],
        "unlabelled": [train[i].id for i in unlabelled],
    })
    spec = network_spec(cfg, labels, input_channels(train), levelset=method.levelset(cfg))
    run.save_config(cfg)
    t0 = time.time()
    if run.stage_done("train") and not cfg.resume:
        log.info("%s: training already finished; skipping (delete stages/train.done to retrain).", run.path)
        info = read_json(run / "stages" / "train.done")
        predictor = method.load_predictor(run)
    else:
        module = method.create(spec, labels, cfg)
        index = {s.id: i for i, s in enumerate(train.samples)}
        steps = _epoch_steps(cfg, run)
        batches = SemiBatches(
            train, [[index[i] for i in s] for s in streams], unlabelled,
            labelled_batch_size=cfg.labelled_batch_size,
            unlabelled_batch_size=cfg.unlabelled_batch_size if method.uses_unlabelled else 0,
            steps=steps, patch_size=cfg.patch_size, augment=cfg.augment,
            sdf_classes=labels.num_classes if method.needs_sdf else None, seed=cfg.seed,
        )
        trainer = fit_semi(module, cfg, run, batches, data.val)
        module.export(run)
        info = {"seconds": round(time.time() - t0, 1), "iterations": int(trainer.global_step),
                "seconds_per_iteration": module.seconds_per_iteration, "losses": module.last_losses}
        run.mark_done("train", info)
        predictor = module.predictor
    result: dict = {"run": str(run.path), "method": cfg.semi, "train_seconds": round(time.time() - t0, 1),
                    "iterations": info.get("iterations"), "seconds_per_iteration": info.get("seconds_per_iteration"),
                    "losses": info.get("losses", {}),
                    "labelled": len(data.labelled), "unlabelled": len(unlabelled),
                    "streams": [len(s) for s in streams]}
    if data.val is not None:
        metrics = evaluate_semi(predictor, data.val, labels, dims=cfg.dims, patch_size=cfg.patch_size,
                                overlap=cfg.val_overlap, largest_component=cfg.largest_component, progress=cfg.progress)
        metrics.update(split=cfg.val_split, model=spec, method=cfg.semi)
        run.write_metrics(cfg.val_split, metrics)
        result["val"] = metrics
    return result


# ---- inference and evaluation -------------------------------------------------------------------------------
def predict_case(model: nn.Module, case: torch.Tensor, dims: int, patch_size: Sequence[int],
                 overlap: float = 0.5) -> torch.Tensor:
    """Class probabilities (K, D, H, W) on the CPU of one case as `semi.batches.case_input` gives it:
    2D networks slice by slice at `patch_size`, 3D networks by sliding window of `patch_size`."""
    from frugalseg.inference import predict_volume_sliding, predict_volume_slices

    if dims == 2:
        return predict_volume_slices(model, case, size=tuple(patch_size)).movedim(1, 0)
    return predict_volume_sliding(model, case, patch_size, overlap=overlap)


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


def _num(x):
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    return None if x is None or math.isnan(float(x)) else float(x)


def _mean(values: list) -> float | None:
    return float(np.mean(values)) if values else None


@torch.no_grad()
def evaluate_semi(
    model: nn.Module,
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
    """Dice (confusion matrix and per case), Jaccard, HD95 and ASD per foreground class over the cases of `ds`.

    Volumes are scored as whole cases (2D networks slice by slice, 3D networks by sliding window); 2D
    datasets image by image. Empty predictions get no surface distance (flagged, never scored 0, unlike
    the reference's medpy wrapper); a class absent from both prediction and truth has Dice and Jaccard 1.
    Per-case Jaccard is Dice / (2 − Dice) (exact for one case). Units are voxels unless the samples
    carry spacing. Keys: per-class `surface`, `case_mean_dice`, `case_mean_jaccard`, `case_mean_hd95`,
    `case_mean_asd`, `per_case`, and the confusion-matrix summary (`miou`, `mean_dice_foreground`, ...).
    """
    from tqdm.auto import tqdm

    from frugalseg.surface_metrics import surface_report

    if ds.labels.names != labels.names:
        raise DataError(f"{ds.name}: classes {ds.labels.names} differ from the model's {labels.names}.")
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
        probs = predict_case(model, case_input(image, ds.ndim, dims), dims, patch_size, overlap)
        pred = probs.argmax(0).numpy().astype(np.uint8)
        if ds.ndim == 2:
            pred = pred[0]
        if largest_component:
            pred = keep_largest_component(pred, fg)
        cm += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(mask.astype(np.int64)), k, labels.ignore_index)
        rep = surface_report(pred, mask, fg, sample.spacing, labels.ignore_index)
        entry = {"id": sample.id, **{m: {labels.names[c]: _num(r[m]) for c, r in rep.items()}
                                     for m in ("dice", "hd95", "asd", "empty_pred")}}
        entry["dice"] = {c: 1.0 if d is None else d for c, d in entry["dice"].items()}  # both empty: agreement
        entry["jaccard"] = {c: d / (2.0 - d) for c, d in entry["dice"].items()}
        per_case.append(entry)
    result: dict = {"dataset": ds.name, "samples": len(samples), "kind": "volume" if ds.ndim == 3 else "2d"}
    result.update(summarise(cm, labels.names, labels.background))
    units = "mm" if all(s.spacing for s in samples) else "voxel"
    result["surface"] = {}
    for c in fg:
        name = labels.names[c]
        result["surface"][name] = {
            "dice": float(np.mean([pc["dice"][name] for pc in per_case])),
            "jaccard": float(np.mean([pc["jaccard"][name] for pc in per_case])),
            "hd95": _mean([pc["hd95"][name] for pc in per_case if pc["hd95"][name] is not None]),
            "asd": _mean([pc["asd"][name] for pc in per_case if pc["asd"][name] is not None]),
            "units": units,
            "empty_pred_cases": sum(bool(pc["empty_pred"][name]) for pc in per_case),
        }
    surface = result["surface"].values()
    result["case_mean_dice"] = float(np.mean([v["dice"] for v in surface]))
    result["case_mean_jaccard"] = float(np.mean([v["jaccard"] for v in surface]))
    result["case_mean_hd95"] = _mean([v["hd95"] for v in surface if v["hd95"] is not None])
    result["case_mean_asd"] = _mean([v["asd"] for v in surface if v["asd"] is not None])
    result["surface_units"] = units
    result["per_case"] = per_case
    return result
