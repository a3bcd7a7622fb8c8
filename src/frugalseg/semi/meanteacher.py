"""Mean teacher (Tarvainen & Valpola, NeurIPS 2017) as the SSL4MIS 2D baseline runs it on ACDC.

A student network learns from labelled slices and from agreeing, on unlabelled slices, with a teacher
whose weights are an exponential moving average of the student's:

    L = L_sup(student, labelled) + λ(t) · mean((softmax(student(x_u)) − softmax(teacher(x_u + n)))²)
    teacher ← α·teacher + (1 − α)·student after every optimiser step, α = min(1 − 1/(step + 1), 0.99)

as in SSL4MIS `train_mean_teacher_2D.py`:
- supervised loss 0.5·CE + 0.5·Dice on the labelled part of the batch (`losses.segmentation_loss`,
  "dice_ce"; SSL4MIS's Dice squares its denominators, ours does not);
- consistency on the **unlabelled** part only (SSL4MIS; the official Mean Teacher applies it to every
  image, SSL4MIS#17), MSE between softmaxes averaged over classes and pixels;
- teacher input noise n = clamp(N(0, 0.1²), −0.2, 0.2); the student sees the clean batch
  (`student_noise` > 0 adds the same kind of noise on the student side);
- λ(t) = 0.1 · exp(−5 (1 − t/200)²), t = iteration // 150 (`semi.ramps`: 0.0067·0.1 at the start,
  0.1 from iteration 30 000, the whole SSL4MIS run);
- EMA decay 0.99 with the 1 − 1/(step + 1) warm-up, so the first update copies the student; only
  parameters are averaged (as SSL4MIS): the teacher's buffers (BatchNorm statistics) come from its own
  forward passes in training mode, and the teacher runs in the module's mode (train) as there;
- SGD lr 0.01, momentum 0.9, weight decay 1e-4, poly decay (power 0.9) over 30 000 iterations,
  12 labelled + 12 unlabelled slices per batch, 256×256.
The student is evaluated (SSL4MIS tests `model`, not `ema_model`); `evaluate="teacher"` picks the teacher.
Both are exported: `model/` (the evaluated one) and `teacher/` or `student/` (the other).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from frugalseg.data.labels import IGNORE_INDEX, LabelSpec
from frugalseg.engine import CHECKPOINT_FORMAT, poly_lambda
from frugalseg.errors import ConfigError
from frugalseg.losses import segmentation_loss
from frugalseg.metrics import ConfusionMatrix, summarise
from frugalseg.semi.batches import SemiConfig, make_optimizer, pass_epoch, split_batch
from frugalseg.semi.ramps import RAMPUP_EVERY, SSL4MIS_CONSISTENCY, SSL4MIS_RAMPUP, consistency_weight

log = logging.getLogger(__name__)

__all__ = ["MeanTeacherConfig", "MeanTeacherModule", "ema_decay_at", "ema_update", "input_noise",
           "mean_teacher_loss", "train_meanteacher"]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def ema_decay_at(step: int, decay: float = 0.99) -> float:
    """The EMA coefficient after optimiser step `step` (0-based): min(1 − 1/(step + 1), decay)."""
    return min(1.0 - 1.0 / (max(int(step), 0) + 1), float(decay))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher ← decay·teacher + (1 − decay)·student, parameter by parameter (buffers untouched)."""
    t_params = dict(teacher.named_parameters())
    for name, s in student.named_parameters():
        t = t_params.get(name)
        if t is None or t.shape != s.shape:
            raise ValueError(f"ema_update: teacher and student differ at parameter '{name}'.")
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)


def input_noise(x: torch.Tensor, std: float, clip: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """clamp(N(0, std²), −clip, clip) shaped like x (zeros when std = 0)."""
    if std <= 0:
        return torch.zeros_like(x)
    n = torch.randn(x.shape, generator=generator, device="cpu" if generator is not None else x.device)
    return (n.to(x) * std).clamp(-clip, clip)


def mean_teacher_loss(
    student: nn.Module,
    teacher: nn.Module,
    x_lab: torch.Tensor,
    y_lab: torch.Tensor,
    x_unl: torch.Tensor,
    *,
    weight: float,
    teacher_noise: float = 0.1,
    noise_clip: float = 0.2,
    student_noise: float = 0.0,
    loss_kind: str = "dice_ce",
    ignore_index: int = IGNORE_INDEX,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The mean-teacher loss of one batch and its terms (loss, sup, consistency).

    The student sees labelled and unlabelled images in one forward pass (as SSL4MIS: one batch for
    normalisation statistics); the teacher sees the noisy unlabelled images without gradient.
    """
    n_lab = x_lab.shape[0]
    x_student = torch.cat([x_lab, x_unl + input_noise(x_unl, student_noise, noise_clip, generator)])
    logits = _first(student(x_student))
    sup = segmentation_loss(logits[:n_lab], y_lab, loss_kind, ignore_index)
    with torch.no_grad():
        t_logits = _first(teacher(x_unl + input_noise(x_unl, teacher_noise, noise_clip, generator)))
    s_prob = logits[n_lab:].float().softmax(1)
    consistency = ((s_prob - t_logits.float().softmax(1)) ** 2).mean()
    return {"loss": sup + weight * consistency, "sup": sup.detach(), "consistency": consistency.detach()}


@dataclass
class MeanTeacherConfig(SemiConfig):
    """Mean teacher on 2D slices (defaults: SSL4MIS train_mean_teacher_2D.py on ACDC)."""

    out: str = "runs/meanteacher"
    ema_decay: float = 0.99
    consistency: float = SSL4MIS_CONSISTENCY  # 0.1
    consistency_rampup: float = SSL4MIS_RAMPUP  # 200 "epochs" of epoch_steps (150) iterations
    teacher_noise: float = 0.1
    noise_clip: float = 0.2
    student_noise: float = 0.0
    evaluate: str = "student"  # student (SSL4MIS) | teacher
    epoch_steps: int = RAMPUP_EVERY

    def validate(self) -> "MeanTeacherConfig":
        super().validate()
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")
        if self.evaluate not in ("student", "teacher"):
            raise ConfigError(f"evaluate must be student or teacher, got '{self.evaluate}'.")
        return self


class MeanTeacherModule(L.LightningModule):
    """Student (`model`, optimised) and EMA teacher (`teacher`, no gradient); semi batches."""

    def __init__(self, model: nn.Module, labels: LabelSpec, cfg: MeanTeacherConfig, model_spec: dict):
        super().__init__()
        self.model = model
        self.teacher = copy.deepcopy(model)
        self.teacher.requires_grad_(False)
        self.labels = labels
        self.cfg = cfg
        self.model_spec = model_spec
        self.val_cm = ConfusionMatrix(labels.num_classes, labels.ignore_index)

    @property
    def evaluated(self) -> nn.Module:
        return self.teacher if self.cfg.evaluate == "teacher" else self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.evaluated(x)

    def consistency_weight(self, step: int) -> float:
        return consistency_weight(step, self.cfg.consistency, self.cfg.consistency_rampup, self.cfg.epoch_steps)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lab, unl = split_batch(batch)
        w = self.consistency_weight(self.global_step)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.global_step)
        out = mean_teacher_loss(
            self.model, self.teacher, lab["image"], lab["mask"], unl["image"], weight=w,
            teacher_noise=self.cfg.teacher_noise, noise_clip=self.cfg.noise_clip, student_noise=self.cfg.student_noise,
            loss_kind=self.cfg.loss, ignore_index=self.labels.ignore_index, generator=gen,
        )
        bs = batch["image"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        self.log("train/sup", out["sup"], on_step=True, on_epoch=False, batch_size=bs)
        self.log("train/consistency", out["consistency"], on_step=True, on_epoch=False, batch_size=bs)
        self.log("train/w_consistency", w, on_step=True, on_epoch=False, batch_size=bs)
        return out["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # global_step already counts the step just taken: the update after step s (0-based) uses s.
        ema_update(self.teacher, self.model, ema_decay_at(self.global_step - 1, self.cfg.ema_decay))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        from frugalseg.inference import predict_volume_slices

        probs = predict_volume_slices(self.evaluated, batch["volume"], size=self.cfg.patch_size)
        self.val_cm.update(probs.argmax(1).to(self.device), batch["mask"].to(self.device))

    def on_validation_epoch_end(self) -> None:
        m = summarise(self.val_cm.compute().cpu(), self.labels.names, self.labels.background)
        self.val_cm.reset()
        if m["mean_dice_foreground"] is not None:
            self.log("val/dice_fg", m["mean_dice_foreground"], prog_bar=True)

    def on_train_epoch_start(self) -> None:
        pass_epoch(self)

    def configure_optimizers(self):
        opt = make_optimizer(self.model.parameters(), self.cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # `model.*` keys are the student: `export.load_export(last.ckpt)` loads it like any checkpoint.
        checkpoint["frugalseg"] = {"format_version": CHECKPOINT_FORMAT, "kind": "meanteacher",
                                   "labels": self.labels.to_dict(), "model": self.model_spec}


def train_meanteacher(cfg: MeanTeacherConfig) -> dict:
    """Train a mean teacher on 2D slices in `cfg.out`, export, evaluate on the validation cases.

    Returns {"run", "train_seconds", "val": metrics} with the volume metrics of
    `supervised.evaluate_model` (Dice, HD95, ASD per class; `case_mean_dice`, `case_mean_hd95`).
    A finished run is not retrained (resume with `cfg.resume`).
    """
    from frugalseg.export import load_export, save_export
    from frugalseg.models import build_model
    from frugalseg.runs import RunDir, write_json
    from frugalseg.semi.batches import SemiBatches, fit_semi, input_channels, open_semi_data

    cfg.validate()
    run = RunDir(cfg.out)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    train, labelled, unlabelled, val = open_semi_data(cfg)
    write_json(run / "budget.json", {"labelled": list(labelled), "unlabelled": len(unlabelled)})
    run.save_config(cfg)
    spec = {"arch": "unet2d", "num_classes": train.labels.num_classes, "in_chans": input_channels(train),
            "input_size": cfg.patch_size}
    other = "student" if cfg.evaluate == "teacher" else "teacher"
    t0 = time.time()
    if run.stage_done("train") and not cfg.resume:
        log.info("%s: training already finished; skipping (delete stages/train.done to retrain).", run.path)
        evaluated = load_export(run / "model")[0]
    else:
        module = MeanTeacherModule(build_model(spec), train.labels, cfg, spec)
        index = {s.id: i for i, s in enumerate(train.samples)}
        batches = SemiBatches(train, [[index[i] for i in labelled]], unlabelled,
                              labelled_batch_size=cfg.labelled_batch_size,
                              unlabelled_batch_size=cfg.unlabelled_batch_size,
                              steps=min(cfg.epoch_steps, cfg.iterations), patch_size=cfg.patch_size, seed=cfg.seed)
        fit_semi(module, cfg, run, batches, val)
        evaluated = module.evaluated
        save_export(evaluated, spec, train.labels, run / "model")
        save_export(module.model if other == "student" else module.teacher, spec, train.labels, run / other)
        run.mark_done("train", {"seconds": round(time.time() - t0, 1), "iterations": cfg.iterations})
    result: dict = {"run": str(run.path), "train_seconds": round(time.time() - t0, 1)}
    if val is not None:
        from frugalseg.supervised import evaluate_model

        metrics = evaluate_model(evaluated, val, train.labels, input_size=cfg.patch_size, progress=cfg.progress)
        metrics.update(split=cfg.val_split, model={"evaluated": cfg.evaluate, **spec})
        run.write_metrics(cfg.val_split or "val", metrics)
        result["val"] = metrics
    return result
