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
  12 labelled + 12 unlabelled slices per batch, 256×256 (the shared 2D protocol of `SemiConfig`; 3D
  data get the UA-MT/DTC LA protocol and UA-MT's consistency 0.1 over 40 ramp units).
Data, schedule, resume and evaluation are the ones every semi-supervised method shares
(`frugalseg.semi.batches`, `frugalseg.semi.stage`); this module is only the step.
The student is evaluated (SSL4MIS tests `model`, not `ema_model`); `evaluate="teacher"` picks the teacher.
Both are exported: `model/` (the evaluated one) and `teacher/` or `student/` (the other).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from frugalseg.data.labels import IGNORE_INDEX, LabelSpec
from frugalseg.errors import ConfigError
from frugalseg.semi.batches import SemiConfig, split_batch
from frugalseg.semi.ramps import SSL4MIS_CONSISTENCY, SSL4MIS_RAMPUP, consistency_weight
from frugalseg.semi.stage import SemiModule, supervised_loss, train_semi

log = logging.getLogger(__name__)

__all__ = ["MeanTeacherConfig", "MeanTeacherModule", "ema_decay_at", "ema_update", "input_noise",
           "mean_teacher_loss", "train_meanteacher"]

UAMT_RAMPUP = 40.0  # UA-MT (LA, 3D): consistency 0.1 ramped over 40 units of 150 iterations


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
    sup = supervised_loss(logits[:n_lab], y_lab, loss_kind, ignore_index)
    with torch.no_grad():
        t_logits = _first(teacher(x_unl + input_noise(x_unl, teacher_noise, noise_clip, generator)))
    s_prob = logits[n_lab:].float().softmax(1)
    consistency = ((s_prob - t_logits.float().softmax(1)) ** 2).mean()
    return {"loss": sup + weight * consistency, "sup": sup.detach(), "consistency": consistency.detach()}


@dataclass
class MeanTeacherConfig(SemiConfig):
    """Mean teacher (defaults: SSL4MIS train_mean_teacher_2D.py on ACDC; UA-MT's constants on volumes)."""

    SEMI: ClassVar[str] = "meanteacher"
    semi: str = "meanteacher"
    out: str = "runs/meanteacher"
    ema_decay: float = 0.99
    consistency: float | None = None  # 0.1
    consistency_rampup: float | None = None  # 200 (2D) / 40 (3D) units of rampup_every (150) iterations
    teacher_noise: float = 0.1
    noise_clip: float = 0.2
    student_noise: float = 0.0
    evaluate: str = "student"  # student (SSL4MIS) | teacher

    @classmethod
    def protocol(cls, dims: int) -> dict:
        return {**super().protocol(dims), "consistency": SSL4MIS_CONSISTENCY,
                "consistency_rampup": UAMT_RAMPUP if dims == 3 else SSL4MIS_RAMPUP}

    def validate(self) -> "MeanTeacherConfig":
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")
        if self.evaluate not in ("student", "teacher"):
            raise ConfigError(f"evaluate must be student or teacher, got '{self.evaluate}'.")
        super().validate()
        return self


class MeanTeacherModule(SemiModule):
    """Student (`model`, optimised) and EMA teacher (`teacher`, no gradient) on the shared batches."""

    kind: ClassVar[str] = "meanteacher"

    def __init__(self, model: nn.Module, labels: LabelSpec, cfg: MeanTeacherConfig, model_spec: dict):
        super().__init__(labels, cfg, model_spec)
        self.model = model
        self.teacher = copy.deepcopy(model)
        self.teacher.requires_grad_(False)

    @property
    def evaluated(self) -> nn.Module:
        return self.teacher if self.cfg.evaluate == "teacher" else self.model

    @property
    def predictor(self) -> nn.Module:
        return self.evaluated

    def consistency_weight(self, step: int) -> float:
        return consistency_weight(step, self.cfg.consistency, self.cfg.consistency_rampup, self.cfg.rampup_every)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lab, unl = split_batch(batch)
        w = self.consistency_weight(self.global_step)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.global_step)
        out = mean_teacher_loss(
            self.model, self.teacher, lab["image"], lab["mask"], unl["image"], weight=w,
            teacher_noise=self.cfg.teacher_noise, noise_clip=self.cfg.noise_clip, student_noise=self.cfg.student_noise,
            loss_kind=self.cfg.loss, ignore_index=self.labels.ignore_index, generator=gen,
        )
        self.log_terms({**out, "w_consistency": w}, batch["image"].shape[0])
        return out["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # global_step already counts the step just taken: the update after step s (0-based) uses s.
        ema_update(self.teacher, self.model, ema_decay_at(self.global_step - 1, self.cfg.ema_decay))

    def trainable_parameters(self):
        return list(self.model.parameters())

    def export(self, run) -> None:
        # `model/` is the evaluated network; the other one is kept beside it (`teacher/` or `student/`).
        # Checkpoint `model.*` keys are the student: `export.load_export(last.ckpt)` loads it like any checkpoint.
        from frugalseg.export import save_export

        other, net = ("student", self.model) if self.cfg.evaluate == "teacher" else ("teacher", self.teacher)
        save_export(self.evaluated, self.model_spec, self.labels, run / "model")
        save_export(net, self.model_spec, self.labels, run / other)


def train_meanteacher(cfg: MeanTeacherConfig) -> dict:
    """Train a mean teacher in `cfg.out`, export, evaluate on the validation cases (`semi.stage.train_semi`).

    Returns {"run", "train_seconds", "val": metrics, ...} with the metrics of `semi.stage.evaluate_semi`
    (Dice, Jaccard, HD95, ASD per class; `case_mean_dice`, `case_mean_hd95`). A finished run is not
    retrained (resume with `cfg.resume`).
    """
    return train_semi(cfg, MeanTeacherModule)
