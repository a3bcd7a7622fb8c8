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
(`frugalseg.semi.batches`, `frugalseg.stages.semi`, `frugalseg.evaluation`); this module is only the
loss and the step (`MeanTeacherStep`), its configuration `MeanTeacherConfig` is in `frugalseg.stages.semi`.
The student is evaluated (SSL4MIS tests `model`, not `ema_model`); `evaluate="teacher"` picks the teacher.
Both are exported: `model/` (the evaluated one) and `teacher/` or `student/` (the other).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from frugalseg.data.labels import IGNORE_INDEX, LabelSpec
from frugalseg.export import save_export
from frugalseg.losses import LossKind
from frugalseg.models import first_output
from frugalseg.semi.batches import split_batch
from frugalseg.semi.ramps import RAMPUP_EVERY, SSL4MIS_CONSISTENCY, SSL4MIS_RAMPUP, consistency_weight
from frugalseg.semi.step import SemiStep, segment, supervised_with_aux

__all__ = ["MeanTeacherStep", "UAMT_RAMPUP", "ema_decay_at", "ema_update", "input_noise", "mean_teacher_loss"]

UAMT_RAMPUP = 40.0  # UA-MT (LA, 3D): consistency 0.1 ramped over 40 units of 150 iterations


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
    loss_kind: LossKind = "dice_ce",
    ignore_index: int = IGNORE_INDEX,
    generator: torch.Generator | None = None,
    x_unl_student: torch.Tensor | None = None,
    aux_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The mean-teacher loss of one batch and its terms (loss, sup, consistency).

    The student sees labelled and unlabelled images in one forward pass (as SSL4MIS: one batch for
    normalisation statistics); the teacher sees the noisy unlabelled images without gradient.
    `x_unl_student`: the student's own view of the unlabelled images (natural images: colour-jittered,
    pixel-aligned with `x_unl`); default `x_unl`. `aux_weight` > 0 adds the auxiliary head's supervised loss
    (ocr / fcn students).
    """
    n_lab = x_lab.shape[0]
    x_s = x_unl if x_unl_student is None else x_unl_student
    x_student = torch.cat([x_lab, x_s + input_noise(x_s, student_noise, noise_clip, generator)])
    logits, aux = segment(student, x_student, aux_weight > 0)
    sup = supervised_with_aux(logits[:n_lab], None if aux is None else aux[:n_lab], y_lab, loss_kind, aux_weight,
                              ignore_index)
    with torch.no_grad():
        t_logits = first_output(teacher(x_unl + input_noise(x_unl, teacher_noise, noise_clip, generator)))
    s_prob = logits[n_lab:].float().softmax(1)
    consistency = ((s_prob - t_logits.float().softmax(1)) ** 2).mean()
    return {"loss": sup + weight * consistency, "sup": sup.detach(), "consistency": consistency.detach()}


class MeanTeacherStep(SemiStep):
    """Student (`model`, optimised) and EMA teacher (`teacher`, a copy, no gradient) on the shared batches.

    `evaluate` names the network validated, evaluated and exported as `model/` ("student" as SSL4MIS, or
    "teacher"); the other one is exported beside it (`teacher/` or `student/`). Checkpoints hold the
    student as `model.*` either way, so `export.load_export(last.ckpt)` loads the student."""

    kind: ClassVar[str] = "meanteacher"

    def __init__(self, model: nn.Module, *, ema_decay: float = 0.99, consistency: float = SSL4MIS_CONSISTENCY,
                 rampup: float = SSL4MIS_RAMPUP, rampup_every: int = RAMPUP_EVERY, teacher_noise: float = 0.1,
                 noise_clip: float = 0.2, student_noise: float = 0.0, loss: LossKind = "dice_ce",
                 evaluate: str = "student", seed: int = 0, ignore_index: int = IGNORE_INDEX, aux_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.teacher = copy.deepcopy(model)
        self.teacher.requires_grad_(False)
        self.ema_decay, self.evaluate = ema_decay, evaluate
        self.consistency, self.rampup, self.rampup_every = consistency, rampup, rampup_every
        self.teacher_noise, self.noise_clip, self.student_noise = teacher_noise, noise_clip, student_noise
        self.loss, self.seed, self.ignore_index, self.aux_weight = loss, seed, ignore_index, aux_weight

    @property
    def predictor(self) -> nn.Module:
        return self.teacher if self.evaluate == "teacher" else self.model

    def consistency_weight(self, step: int) -> float:
        return consistency_weight(step, self.consistency, self.rampup, self.rampup_every)

    def terms(self, batch: dict, step: int) -> dict[str, torch.Tensor | float]:
        lab, unl = split_batch(batch)
        w = self.consistency_weight(step)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)  # the noise of step `step`, on resume too
        out = mean_teacher_loss(
            self.model, self.teacher, lab["image"], lab["mask"], unl["image"], weight=w,
            teacher_noise=self.teacher_noise, noise_clip=self.noise_clip, student_noise=self.student_noise,
            loss_kind=self.loss, ignore_index=self.ignore_index, generator=gen,
            x_unl_student=unl.get("image_strong"), aux_weight=self.aux_weight,
        )
        return {**out, "w_consistency": w}

    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.model, ema_decay_at(step, self.ema_decay))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def export(self, folder: Path, spec: dict, labels: LabelSpec) -> None:
        # `model/` is the evaluated network; the other one is kept beside it (`teacher/` or `student/`).
        other, net = ("student", self.model) if self.evaluate == "teacher" else ("teacher", self.teacher)
        save_export(self.predictor, spec, labels, Path(folder) / "model")
        save_export(net, spec, labels, Path(folder) / other)
