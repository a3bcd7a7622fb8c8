"""Stage: semi-supervised training (`frugalseg train --semi dtc|cotrain|meanteacher|none`).

Every method runs the same stage; they differ only in their step module (`frugalseg.semi`: DTC,
deep co-training, mean teacher, the supervised-only baseline) and its hyper-parameters:

- configuration: `SemiConfig` (the fields every method shares, on top of the run options; `None` =
  the protocol's value for the data's dimension, resolved and saved in config.yaml) and one config per
  method (`DTCConfig`, `CoTrainConfig`, `MeanTeacherConfig`, `SupervisedOnlyConfig`), which builds its
  step (`build_step`), its labelled streams (`streams`: one per co-trained model) and checks the data;
- `SEMI_METHODS`: {name: (config class, train function)}, the names of `frugalseg train --semi`;
- `open_semi_data(cfg)`: the training split with the labelled set chosen (first N patients, a fraction
  of the patients, or listed ids), the unlabelled indices, the validation cases;
- `train_semi(cfg)`: data, network spec, batches (`semi.batches.SemiBatches`), Lightning fit with a
  checkpoint every epoch and exact resume (`fit_semi`, `stages.engine.SemiModule`), export, evaluation
  (`frugalseg.evaluation.evaluate`: Dice, Jaccard, HD95, ASD) in the run directory `cfg.out`:
  config.yaml (resolved), budget.json, checkpoints/last.ckpt, logs/metrics.csv, the exported model(s),
  metrics/<split>.json, stages/train.done. A finished run is not retrained unless `resume`.

Lightning is imported only when a run trains (`stages.engine`): the configs load without it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

from torch import nn
from torch.utils.data import DataLoader

from frugalseg.data import open_split
from frugalseg.data.hdf5 import patient_of
from frugalseg.data.labels import LabelSpec
from frugalseg.data.samples import SegDataset
from frugalseg.data.torchdata import EvalCases, first_item, input_channels
from frugalseg.data.validate import check_masks_for_training
from frugalseg.data.io import read_json, write_json
from frugalseg.errors import ConfigError, DataError
from frugalseg.evaluation import evaluate
from frugalseg.export import check_checkpoint
from frugalseg.models import build_model
from frugalseg.report import write_report
from frugalseg.runs import RunDir
from frugalseg.semi.batches import AUGMENTATIONS, SemiBatches, choice, patch_shape, select_labelled
from frugalseg.semi.cotrain import CoTrainStep, adversarial_pairs, assign_views
from frugalseg.semi.dtc import K_TRANSFORM, SDF_WEIGHT, DTCStep
from frugalseg.semi.meanteacher import UAMT_RAMPUP, MeanTeacherStep
from frugalseg.semi.ramps import (
    COTRAIN_RAMP, DTC_CONSISTENCY, DTC_ITERATIONS, DTC_LR_STEP, DTC_RAMPUP, RAMPUP_EVERY, SSL4MIS_CONSISTENCY,
    SSL4MIS_ITERATIONS, SSL4MIS_RAMPUP,
)
from frugalseg.semi.step import SemiStep
from frugalseg.semi.supervised_only import SupervisedOnlyStep
from frugalseg.stages.options import (
    LalOptions,
    RunOptions,
    ascending,
    device_of,
    option,
    option_like,
    read_config_file,
)
from frugalseg.stages.run_guard import claim_run_dir

log = logging.getLogger(__name__)

__all__ = [
    "CoTrainConfig", "DTCConfig", "MeanTeacherConfig", "SEMI_METHODS", "SemiConfig", "SemiData",
    "SupervisedOnlyConfig", "evaluate_semi", "fit_semi", "network_spec", "open_semi_data", "saved_export",
    "train_cotrain", "train_semi",
]


# ---- configuration shared by the semi-supervised methods ------------------------------------------
@dataclass
class SemiConfig(LalOptions, RunOptions):
    """Fields every semi-supervised method shares. `None` fields are resolved from the training data
    (`resolved`, saved resolved in config.yaml): 2D data (ACDC slices) follow the SSL4MIS ACDC protocol,
    3D data (LA volumes) the UA-MT/DTC LA protocol:

    arch U-Net / V-Net; patch 256×256 / 112×112×80; batches 12+12 / 2+2; iterations 30000 / 6000;
    lr poly (power 0.9) / step (×0.1 every 2500); dropout 0 (U-Net) / 0.5 (V-Net, DTC's has_dropout).
    Methods override some of these (`protocol`): co-training's official 4+4 batches in 2D, DTC's and the
    mean teacher's consistency constants. val_split 'auto' is 'val' if the dataset has one, else 'test'
    (LA, like the reference, has no validation split; the last model is reported, none is selected).

    A method's config also says how to train it: `STEP` (its step class), `build_step`, `streams`,
    `levelset` (DTC's dual-head network) and `check` (data the method cannot train on).
    """

    semi: str = option("", "The method (`frugalseg train --semi`); each method's config sets it.", cli=False)
    out: str = option_like(RunOptions, "out", "runs/semi")
    seed: int = option_like(RunOptions, "seed", 1337)
    train_split: str = option("train", "Split holding the labelled and unlabelled training samples.")
    val_split: str | None = option("auto", "Split to validate and evaluate on: auto = val if the dataset has one, "
                                           "else test; empty for none.")
    val_limit: int | None = option(None, "Evaluate on the first N validation cases only.", ge=1)
    # labelled set: exactly one of these (first N patients is the SSL4MIS protocol: 3 → 68 slices, 7 → 136)
    labelled_patients: int | None = option(None, "Labelled set: every slice of the first N patients of the list "
                                                 "(SSL4MIS/DTC protocol: 3 or 7 on ACDC).", ge=1)
    labelled_fraction: float | None = option(None, "Labelled set: this fraction of the patients (cases), drawn with "
                                                   "--budget-seed; the rest is unlabelled.", gt=0, le=1)
    labelled_ids: list[str] | None = option(None, "Labelled set: exactly these sample ids (repeat the option, or "
                                                  "@file with one id a line).")
    budget_seed: int = option(0, "Seed of the label-budget draw.", ge=0)
    unlabelled_limit: int | None = option(None, "Use only the first N unlabelled samples.", ge=0)
    # network
    dims: int | None = option(None, "2 (slices) or 3 (volumes) [default: the training split's].", choices=(2, 3))
    arch: Literal["unet", "vnet", "ocr", "fcn"] | None = option(
        None, "unet (2D/3D), vnet (3D), or ocr / fcn (a head on a timm backbone, 2D natural images) [default: U-Net "
              "in 2D, V-Net in 3D].")
    backbone: str = option("tf_efficientnet_lite0", "ocr/fcn: any timm model name; tf_efficientnet_lite0/1/2 have "
                                                    "offline ImageNet weights.")
    pretrained: bool | str = option(True, "ocr/fcn: true (ImageNet weights), false (random init), or a path to a "
                                          "weight file; any arch: a `frugalseg pretrain` run or weight file.")
    output_stride: int = option(16, "ocr/fcn: backbone output stride: 8, 16 or 32.", choices=(8, 16, 32))
    aux_stage: Literal["last", "penultimate"] = option("penultimate", "ocr/fcn: backbone stage feeding the "
                                                                      "auxiliary head.")
    aux_weight: float = option(0.4, "ocr/fcn: weight of the auxiliary head's supervised loss (OCR: 0.4).", ge=0)
    channels: list[int] = option(help="U-Net channels per level, e.g. 16,32,64,128,256.",
                                 factory=lambda: [16, 32, 64, 128, 256], ge=1)
    dropout: float | None = option(None, "Dropout [default: 0 for the U-Net, 0.5 for the V-Net].", ge=0, lt=1)
    # batches and schedule
    patch_size: int | list[int] | None = option(None, "Training patch: one size (square/cube) or one per axis, e.g. "
                                                      "256 or 112,112,80 [default: by dims].", ge=1)
    labelled_batch_size: int | None = option(None, "Labelled samples per batch (per model for co-training) "
                                                   "[default: by dims and method].", ge=1)
    unlabelled_batch_size: int | None = option(None, "Unlabelled samples per batch [default: by dims and method; "
                                                     "0 for --semi none].", ge=0)
    augment: Literal["ssl4mis", "rotflip", "crop", "none"] | None = option(
        None, "ssl4mis (rot90/flip or ±20° rotation in 2D, RandomRotFlip in 3D), rotflip, crop (natural images: "
              "random rescale, crop, flip), or none [default: crop for ocr/fcn, else ssl4mis].")
    scale: tuple[float, float] = option((0.5, 2.0), "Random rescale range of --augment crop (min max).", gt=0,
                                        check=ascending)
    base_size: int | None = option(None, "--augment crop: longer image side before the random rescale (default: as "
                                         "read).", ge=1)
    jitter: float | None = option(None, "Mean teacher, 2D: strength of the colour jitter of the student's view of "
                                        "unlabelled images (intensities in [0, 1]) [default: 0.4 for ocr/fcn, none "
                                        "for medical images].", ge=0, le=1)
    iterations: int | None = option(None, "Training iterations [default: 30000 in 2D (SSL4MIS), 6000 in 3D (DTC)].",
                                    ge=1)
    epoch_steps: int = option(150, "Iterations per epoch: checkpoint and validation interval.", ge=1)
    rampup_every: int | None = option(None, "Iterations per unit of the ramps [default: 150 (SSL4MIS/DTC) at the "
                                            "protocol's length, 1 when --iterations shortens or lengthens it].", ge=1)
    # optimisation
    optimizer: Literal["sgd", "adam"] = option("sgd", "sgd (momentum) or adam.")
    lr: float = option(0.01, "Base learning rate.", gt=0)
    momentum: float = option(0.9, "SGD momentum.", ge=0, lt=1)
    weight_decay: float = option(1e-4, "Weight decay.", ge=0)
    lr_schedule: Literal["poly", "step"] | None = option(None, "poly (power 0.9) or step (x0.1 every --lr-step) "
                                                               "[default: poly in 2D, step in 3D].")
    lr_step: int | None = option(None, "Step schedule: lr x 0.1 every this many iterations [default: DTC's 2500 of "
                                       "6000, scaled with --iterations].", ge=1)
    loss: Literal["dice_ce", "ce", "dice", "lal"] | None = option(
        None, "Supervised loss: dice_ce (0.5 CE + 0.5 soft Dice, SSL4MIS), ce, dice, or lal (locally adaptive "
              "learning loss) [default: ce for ocr/fcn (the OCR recipe), else dice_ce].")
    # evaluation
    val_overlap: float = option(0.5, "Sliding-window overlap of 3D inference.", ge=0, lt=1)
    largest_component: bool = option(False, "Keep each class's largest connected component in evaluation "
                                            "(DTC's nms).")
    val_every: int = option(10, "Validate every N epochs during training (0: only at the end).", ge=0)

    NATURAL_ARCHS: ClassVar[tuple[str, ...]] = ("ocr", "fcn")  # timm-backbone segmenters (`models.segmenter`)
    STRONG_VIEW: ClassVar[bool] = False  # the method reads `image_strong` (colour-jittered unlabelled images)
    SEMI: ClassVar[str] = ""  # the value of `semi` for this config class
    RAMP_FIELDS: ClassVar[tuple[str, ...]] = ()  # ramp lengths scaled with the run (`scale_schedule`)
    STEP: ClassVar[type[SemiStep]] = SemiStep  # the method's step module

    # -- how the method trains (each method's config) ------------------------------------------------------
    @property
    def levelset(self) -> bool:
        """Whether the method trains DTC's dual-head (segmentation + level-set) network."""
        return False

    @property
    def natural(self) -> bool:
        """Whether the network is a timm-backbone segmenter (ocr / fcn) for natural images."""
        return self.arch in self.NATURAL_ARCHS

    @property
    def inference_size(self) -> list[int] | None:
        """How cases are predicted (resolved config): 2D U-Nets on slices resized to the patch, 3D networks by
        sliding windows of the patch, ocr/fcn on whole images as they are (as `frugalseg train` evaluates)."""
        return None if self.natural else self.patch_size

    def new_model(self, spec: dict) -> nn.Module:
        """A new network of `spec`: ocr/fcn start from `pretrained` (ImageNet by default), U-/V-Nets from scratch or
        from a `pretrained` path (e.g. `frugalseg pretrain` weights)."""
        return build_model(spec, pretrained=self.pretrained)

    def check(self, labels: LabelSpec) -> None:
        """Refuse data the method cannot train on (a clear error before anything is written)."""

    def streams(self, labelled: Sequence[str]) -> list[tuple[str, ...]]:
        """The labelled streams of a batch (ids of each): one, the labelled set."""
        return [tuple(labelled)]

    def build_step(self, spec: dict, labels: LabelSpec) -> SemiStep:
        """The method's step module with new networks of `spec` (the config is resolved)."""
        raise NotImplementedError(f"{type(self).__name__} names no method; use one of {sorted(SEMI_METHODS)}.")

    # -- protocol defaults and checks ----------------------------------------------------------------------
    @classmethod
    def protocol(cls, dims: int) -> dict:
        """Values of the `None` fields for `dims`-D data (subclasses add their own)."""
        if dims == 3:
            return dict(arch="vnet", patch_size=[112, 112, 80], labelled_batch_size=2, unlabelled_batch_size=2,
                        iterations=DTC_ITERATIONS, lr_schedule="step")
        return dict(arch="unet", patch_size=[256, 256], labelled_batch_size=12, unlabelled_batch_size=12,
                    iterations=SSL4MIS_ITERATIONS, lr_schedule="poly")

    def validate(self) -> "SemiConfig":
        if not self.data:
            raise ConfigError("No dataset given: pass data=FOLDER or a task name such as acdc or la2018.")
        if self.SEMI and self.semi != self.SEMI:
            raise ConfigError(f"{type(self).__name__} is the '{self.SEMI}' method; semi='{self.semi}' belongs "
                              "to another method's config.")
        given = [n for n in ("labelled_patients", "labelled_fraction", "labelled_ids") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"Choose the labelled set with exactly one of labelled_patients, labelled_fraction, labelled_ids "
                f"(got {', '.join(given) or 'none'}), e.g. labelled_patients=7 on ACDC, 2 on the LA subset."
            )
        if self.labelled_ids is not None and not self.labelled_ids:
            raise ConfigError("labelled_ids is empty: it selects no image to train on.")
        # types, choices and ranges of single fields were checked when the config was made (check_values)
        if self.patch_size is not None:
            given_sizes = len(self.patch_size) if isinstance(self.patch_size, (list, tuple)) else 1
            patch_shape(self.patch_size, self.dims or given_sizes)
        if self.augment is not None:
            choice("augment", self.augment, AUGMENTATIONS)
        if len(self.channels) < 2:
            raise ConfigError(f"channels needs at least two U-Net levels, got {self.channels}.")
        return self

    def resolved(self, dims: int) -> "SemiConfig":
        """A copy with every `None` default filled for `dims`-D data (patch_size as a list of `dims` sizes)."""
        if self.dims is not None and self.dims != dims:
            raise ConfigError(f"dims={self.dims} but the training split holds {dims}D samples.")
        protocol = self.protocol(dims)
        filled = {k: v for k, v in protocol.items() if getattr(self, k, None) is None}
        cfg = dataclasses.replace(self, dims=dims, **filled)
        cfg.patch_size = patch_shape(cfg.patch_size, dims)
        scale_schedule(cfg, given=self, protocol_iterations=protocol["iterations"])
        if cfg.dropout is None:
            cfg.dropout = 0.5 if cfg.arch == "vnet" else 0.0
        if cfg.arch == "vnet" and dims != 3:
            raise ConfigError("The V-Net is 3D; use arch='unet' for 2D data.")
        if cfg.natural and dims != 2:
            raise ConfigError(f"--arch {cfg.arch} segments 2D images; use unet or vnet for volumes.")
        if cfg.augment is None:
            cfg.augment = "crop" if cfg.natural else "ssl4mis"
        if cfg.augment == "crop" and (dims != 2 or cfg.patch_size[0] != cfg.patch_size[1]):
            raise ConfigError(f"--augment crop takes a square 2D patch, got {cfg.patch_size}.")
        if cfg.loss is None:
            cfg.loss = "ce" if cfg.natural else "dice_ce"
        if cfg.jitter is None and cfg.natural and cfg.STRONG_VIEW:
            cfg.jitter = 0.4  # None (no strong view) otherwise: what configs saved before the option hold
        if cfg.jitter and not cfg.STRONG_VIEW:
            raise ConfigError(f"--jitter is the mean teacher's student view; --semi {cfg.semi or 'none'} does not use it.")
        if cfg.jitter and dims != 2:
            raise ConfigError(f"--jitter colours 2D images; {dims}D data has no colour view.")
        return cfg

    @property
    def epoch_length(self) -> int:
        """Iterations per epoch: the largest divisor of `iterations` not above `epoch_steps`, so the run ends
        on an epoch boundary, where last.ckpt is written and a resume is exact."""
        total = int(self.iterations or self.epoch_steps)
        n = max(1, min(self.epoch_steps, total))
        while total % n:
            n -= 1
        return n


def scale_schedule(cfg: SemiConfig, given: SemiConfig, protocol_iterations: int) -> None:
    """Fill the ramp and step lengths `given` leaves open so they span the same *fraction* of `cfg.iterations`
    as of the protocol's run (in place).

    The reference constants count ramps in units of 150 iterations (`iter_num // 150`): SSL4MIS's 2D
    consistency ramp is 200 units = its whole 30000-iteration run, DTC's and UA-MT's 40 units = their whole
    6000, co-training's 100 units = half its run, DTC's learning rate drops ×0.1 every 2500 of 6000
    iterations. Cut the iterations and keep those constants, and the semi-supervised terms stay near 0
    (0.1·sigmoid_rampup(3000 // 150, 200) = 0.1·0.017). So, unless given:

    - `rampup_every` is 150 at the protocol's length (the reference schedule exactly), else 1, so a short
      run's ramps rise smoothly instead of in steps of 150 iterations;
    - each ramp (`RAMP_FIELDS`) is the protocol's length × 150 / `rampup_every` × iterations / protocol
      iterations: e.g. 1500 iterations in 2D give a consistency ramp of 1500 units of 1 iteration;
    - `lr_step` is 2500/6000 of the run with the step schedule (poly decay follows `iterations` by itself).
    A `--resume` that lengthens a run keeps the lengths its config.yaml holds (`keep_saved_schedule`): the run
    continues its own schedule rather than jumping to the longer run's.
    The mean teacher's EMA (decay 0.99, warm-up min(1 − 1/(t+1), 0.99)) is in iterations and not scaled: its
    horizon of about 100 iterations is short against either length. Explicit values are kept as given.
    """
    if given.rampup_every is None:
        cfg.rampup_every = RAMPUP_EVERY if cfg.iterations == protocol_iterations else 1
    factor = RAMPUP_EVERY / cfg.rampup_every * cfg.iterations / protocol_iterations
    for name in cfg.RAMP_FIELDS:
        if getattr(given, name) is None:
            setattr(cfg, name, float(getattr(cfg, name)) * factor)
    if given.lr_step is None:  # only the step schedule reads it (poly runs keep DTC's 2500, as saved before)
        cfg.lr_step = (max(1, round(DTC_LR_STEP * cfg.iterations / DTC_ITERATIONS)) if cfg.lr_schedule == "step"
                       else DTC_LR_STEP)


SCHEDULE_DERIVED = ("rampup_every", "lr_step", "consistency_rampup", "ramp_epochs")


def keep_saved_schedule(cfg: SemiConfig, given: SemiConfig, run: str | Path) -> SemiConfig:
    """On `--resume`, the ramp and step lengths the user left open are the run's own (its config.yaml), not
    re-derived from a new `iterations`: a lengthened DTC run would otherwise see its learning rate jump ×10
    where the new step falls later than the old one. Only `iterations` (and the poly decay that follows it)
    changes. Returns `cfg` (resolved), updated."""
    path = Path(run) / "config.yaml"
    if not (given.resume and path.exists()):
        return cfg
    saved = read_config_file(path)
    for name in SCHEDULE_DERIVED:
        if hasattr(cfg, name) and getattr(given, name) is None and saved.get(name) is not None:
            setattr(cfg, name, type(getattr(cfg, name))(saved[name]))
    return cfg


# ---- the methods' configurations ------------------------------------------------------------------------
@dataclass
class DTCConfig(SemiConfig):
    """DTC training (`semi.dtc`): the shared fields plus the loss's. Consistency weight and ramp-up: 1.0 over
    40 / 0.1 over 200 ramp units of `rampup_every` (150) iterations for 3D / 2D data (DTC's LA and SSL4MIS's
    ACDC constants; both ramps span the whole protocol run)."""

    SEMI: ClassVar[str] = "dtc"
    RAMP_FIELDS: ClassVar[tuple[str, ...]] = ("consistency_rampup",)
    STEP: ClassVar[type[SemiStep]] = DTCStep
    semi: str = option("dtc", "The method.", cli=False)
    out: str = option_like(RunOptions, "out", "runs/dtc")
    k: float = option(K_TRANSFORM, "DTC: k of the transform sigmoid(-k * sdf).", gt=0)
    beta: float = option(SDF_WEIGHT, "DTC: weight of the level-set (SDF) regression.", ge=0)
    consistency: float | None = option(None, "Maximum consistency weight [default: by dims: 0.1 in 2D; DTC 1.0 in 3D].",
                                       ge=0)
    consistency_rampup: float | None = option(None, "Consistency ramp-up length in units of --rampup-every "
                                                    "iterations [default: by dims].", ge=0)

    @classmethod
    def protocol(cls, dims: int) -> dict:
        three = dims == 3
        return {**super().protocol(dims),
                "consistency": DTC_CONSISTENCY if three else SSL4MIS_CONSISTENCY,
                "consistency_rampup": DTC_RAMPUP if three else SSL4MIS_RAMPUP}

    @property
    def levelset(self) -> bool:
        return True

    def validate(self) -> "DTCConfig":
        if self.arch in self.NATURAL_ARCHS:
            raise ConfigError(f"--arch {self.arch} is not a choice of --semi dtc: DTC's level-set head is built on the "
                              "U-Net / V-Net (unet, vnet). Use --semi meanteacher or cotrain with ocr / fcn.")
        super().validate()
        return self

    def check(self, labels: LabelSpec) -> None:
        if labels.background != 0:
            raise ConfigError("DTC needs class 0 to be the background (level sets are per foreground class).")

    def build_step(self, spec: dict, labels: LabelSpec) -> DTCStep:
        return DTCStep(self.new_model(spec), k=self.k, beta=self.beta, consistency=self.consistency,
                       rampup=self.consistency_rampup, rampup_every=self.rampup_every, seg_loss=self.loss_kind(),
                       ignore_index=labels.ignore_index)


@dataclass
class MeanTeacherConfig(SemiConfig):
    """Mean teacher (`semi.meanteacher`; defaults: SSL4MIS train_mean_teacher_2D.py on ACDC, UA-MT's
    constants on volumes)."""

    SEMI: ClassVar[str] = "meanteacher"
    STRONG_VIEW: ClassVar[bool] = True
    RAMP_FIELDS: ClassVar[tuple[str, ...]] = ("consistency_rampup",)
    STEP: ClassVar[type[SemiStep]] = MeanTeacherStep
    semi: str = option("meanteacher", "The method.", cli=False)
    out: str = option_like(RunOptions, "out", "runs/meanteacher")
    ema_decay: float = option(0.99, "Mean teacher: EMA decay of the teacher.", ge=0, lt=1)
    consistency: float | None = option(None, "Maximum consistency weight [default: 0.1].", ge=0)
    consistency_rampup: float | None = option(None, "Consistency ramp-up length in units of --rampup-every "
                                                    "iterations [default: 200 in 2D, 40 in 3D].", ge=0)
    teacher_noise: float = option(0.1, "Mean teacher: std of the Gaussian noise on the teacher's input.", ge=0)
    noise_clip: float = option(0.2, "Mean teacher: input noise clipped to +-this.", ge=0)
    student_noise: float = option(0.0, "Mean teacher: std of the noise on the student's unlabelled input (0: none).",
                                  ge=0)
    evaluate: str = option("student", "Mean teacher: the network evaluated and exported as model/ (student or "
                                      "teacher).")

    @classmethod
    def protocol(cls, dims: int) -> dict:
        return {**super().protocol(dims), "consistency": SSL4MIS_CONSISTENCY,
                "consistency_rampup": UAMT_RAMPUP if dims == 3 else SSL4MIS_RAMPUP}

    def validate(self) -> "MeanTeacherConfig":
        if self.evaluate not in ("student", "teacher"):
            raise ConfigError(f"evaluate must be student or teacher, got '{self.evaluate}'.")
        super().validate()
        return self

    def build_step(self, spec: dict, labels: LabelSpec) -> MeanTeacherStep:
        return MeanTeacherStep(
            self.new_model(spec), ema_decay=self.ema_decay, consistency=self.consistency,
            rampup=self.consistency_rampup, rampup_every=self.rampup_every, teacher_noise=self.teacher_noise,
            noise_clip=self.noise_clip, student_noise=self.student_noise, loss=self.loss_kind(), evaluate=self.evaluate,
            seed=self.seed, ignore_index=labels.ignore_index, aux_weight=self.aux_weight if self.natural else 0.0)


@dataclass
class CoTrainConfig(SemiConfig):
    """Deep co-training (`semi.cotrain`; defaults: the official ACDC config where it has one; K = `n_models`)."""

    SEMI: ClassVar[str] = "cotrain"
    RAMP_FIELDS: ClassVar[tuple[str, ...]] = ("ramp_epochs",)
    STEP: ClassVar[type[SemiStep]] = CoTrainStep
    semi: str = option("cotrain", "The method.", cli=False)
    out: str = option_like(RunOptions, "out", "runs/cotrain")
    n_models: int = option(2, "Number K >= 2 of co-trained models.", ge=2)
    views: str = option("split", "Co-training views of the labelled set: split (disjoint by patient) or bootstrap.")
    view_overlap: float = option(0.0, "Co-training: fraction of labelled patients every model sees.", ge=0, le=1)
    view_unit: str = option("patient", "Co-training views split patients or images (patient | image).")
    adversarial: bool = option(True, "Co-training's adversarial view-difference (diversity) term.")
    adv_pairs: str = option("all", "Adversarial pairs: all (model i's examples to every j != i) or ring (i to i+1).")
    adv_source: str = option("coin", "Adversarial source per model and step: coin (FGSM on labelled or VAT on "
                                     "unlabelled, p = 0.5, official) or both.")
    fgsm_eps: float = option(0.05, "FGSM step (L-infinity, per pixel).", ge=0)
    vat_xi: float = option(1e-3, "VAT probe (L2 per sample; the official 1e-6 underflows in float32).", gt=0)
    vat_eps: float = option(0.05, "VAT perturbation (L2 per sample).", ge=0)
    vat_power_iterations: int = option(1, "VAT power iterations.", ge=1)
    adv_clamp: list[float] | None = option(help="Adversarial inputs clipped to this range (ACDC intensities are in "
                                                "[0, 1]).", factory=lambda: [0.0, 1.0], check=ascending)
    attack_eval_mode: bool = option(True, "Attacks run the models in eval mode (as the reference), else in "
                                          "training mode with frozen BatchNorm statistics.")
    adv_bn_update: bool = option(False, "Forward passes on adversarial examples update BatchNorm's running "
                                        "statistics (as the official code; off by default: see semi.cotrain).")
    lambda_cot: float = option(1.0, "Maximum weight of the agreement (Jensen-Shannon) term.", ge=0)
    lambda_dif: float = option(0.005, "Maximum weight of the diversity (adversarial) term.", ge=0)
    ramp_epochs: float | None = option(None, "Ramp-up length of both weights in units of --rampup-every iterations "
                                             "(0: none) [default: half the run, the official 100 of 200 epochs].",
                                       ge=0)
    ramp_mult: float = option(-5.0, "Ramp shape: weight = max * exp(mult * (1 - t/T)^2).", le=0)
    eval_members: bool = option(False, "Also evaluate each co-trained model alone (metrics under 'members').")
    # official: Adam lr 1e-3, weight decay 1e-4, 4 labelled (per model) + 4 unlabelled (2D)
    optimizer: Literal["sgd", "adam"] = option("adam", "sgd (momentum) or adam.")
    lr: float = option(1e-3, "Base learning rate.", gt=0)

    @classmethod
    def protocol(cls, dims: int) -> dict:
        base = super().protocol(dims)
        # the official 100 of 200 epochs (of 150 iterations) in 2D: half the run, in 3D too
        base["ramp_epochs"] = COTRAIN_RAMP * base["iterations"] / SSL4MIS_ITERATIONS
        if dims == 2:
            base.update(labelled_batch_size=4, unlabelled_batch_size=4)
        return base

    def validate(self) -> "CoTrainConfig":
        if self.views not in ("split", "bootstrap"):
            raise ConfigError(f"views must be split or bootstrap, got '{self.views}'.")
        if self.view_unit not in ("patient", "image"):
            raise ConfigError(f"view_unit must be patient or image, got '{self.view_unit}'.")
        adversarial_pairs(self.n_models, self.adv_pairs)
        if self.adv_source not in ("coin", "both"):
            raise ConfigError(f"adv_source must be coin or both, got '{self.adv_source}'.")
        super().validate()
        return self

    def streams(self, labelled: Sequence[str]) -> list[tuple[str, ...]]:
        return assign_views(labelled, self.n_models, mode=self.views, overlap=self.view_overlap, seed=self.budget_seed,
                            group=patient_of if self.view_unit == "patient" else None)

    def build_step(self, spec: dict, labels: LabelSpec) -> CoTrainStep:
        return CoTrainStep(
            [self.new_model(spec) for _ in range(self.n_models)], lambda_cot=self.lambda_cot, lambda_dif=self.lambda_dif,
            ramp_epochs=self.ramp_epochs, ramp_mult=self.ramp_mult, rampup_every=self.rampup_every,
            adversarial=self.adversarial, pairs=self.adv_pairs, adv_source=self.adv_source, fgsm_eps=self.fgsm_eps,
            vat_xi=self.vat_xi, vat_eps=self.vat_eps, vat_power_iterations=self.vat_power_iterations,
            clamp=self.adv_clamp, attack_eval_mode=self.attack_eval_mode, adv_bn_update=self.adv_bn_update,
            loss=self.loss_kind(), seed=self.seed,
            ignore_index=labels.ignore_index, aux_weight=self.aux_weight if self.natural else 0.0)


@dataclass
class SupervisedOnlyConfig(SemiConfig):
    """Labelled batches only (`frugalseg train --semi none`, `semi.supervised_only`). It accepts the other
    methods' options, so the same command line with only `--semi` changed gives the baseline;
    `unlabelled_batch_size` is set to 0 (and saved so in config.yaml)."""

    SEMI: ClassVar[str] = "none"
    STEP: ClassVar[type[SemiStep]] = SupervisedOnlyStep
    semi: str = option("none", "The method.", cli=False)
    out: str = option_like(RunOptions, "out", "runs/supervised_only")
    network: Literal["plain", "levelset"] = option("plain", "Supervised-only baseline: plain (U-Net/V-Net) or "
                                                            "levelset (DTC's network, level-set head unused).")

    @property
    def levelset(self) -> bool:
        return self.network == "levelset"

    def resolved(self, dims: int) -> "SupervisedOnlyConfig":
        cfg = super().resolved(dims)
        if cfg.unlabelled_batch_size:
            log.info("supervised-only baseline: labelled batches only (unlabelled_batch_size %d → 0).",
                     cfg.unlabelled_batch_size)
        cfg.unlabelled_batch_size = 0
        return cfg

    def validate(self) -> "SupervisedOnlyConfig":
        if self.network not in ("plain", "levelset"):
            raise ConfigError(f"network must be plain or levelset, got '{self.network}'.")
        if self.network == "levelset" and self.arch in self.NATURAL_ARCHS:
            raise ConfigError(f"--network levelset is DTC's U-Net / V-Net; --arch {self.arch} has no level-set head.")
        super().validate()
        return self

    def build_step(self, spec: dict, labels: LabelSpec) -> SupervisedOnlyStep:
        return SupervisedOnlyStep(self.new_model(spec), loss=self.loss_kind(), ignore_index=labels.ignore_index,
                                  aux_weight=self.aux_weight if self.natural else 0.0)


# ---- data -------------------------------------------------------------------------------------------------
@dataclass
class SemiData:
    """What `open_semi_data` prepares: the config resolved for the data, the training split with each
    sample's supervision set ("mask" for labelled, "none" otherwise), the labelled ids, the unlabelled
    indices, and the validation cases (or None)."""

    cfg: SemiConfig
    train: SegDataset
    labelled: tuple[str, ...]
    unlabelled: list[int]
    val: SegDataset | None


def _open(cfg: SemiConfig, split: str) -> SegDataset:
    return open_split(cfg.data, split, background_classes=cfg.background_classes, ignore_classes=cfg.ignore_classes)


def _open_val(cfg: SemiConfig, names: tuple[str, ...]) -> tuple[str | None, SegDataset | None]:
    if cfg.val_split is None or cfg.val_split == "":
        return None, None
    candidates = ("val", "test") if cfg.val_split == "auto" else (cfg.val_split,)
    for split in candidates:
        try:
            val = _open(cfg, split)
        except DataError:
            if cfg.val_split == "auto":
                continue
            raise
        if val.labels.names != names:
            raise DataError(f"{cfg.data}: {split} classes {val.labels.names} differ from training classes {names}.")
        if cfg.val_limit is not None:
            val = val.with_samples(val.samples[: max(1, cfg.val_limit)])
        return split, val
    log.info("%s: no val or test split; training without evaluation.", cfg.data)
    return None, None


def open_semi_data(cfg: SemiConfig, require_unlabelled: bool = True) -> SemiData:
    """Open the training split, resolve the config for its dimension, choose the labelled set, open the
    validation cases. Raises a clear error when nothing is labelled or (with `require_unlabelled`)
    nothing is left unlabelled."""
    train = _open(cfg, cfg.train_split)
    if train.ndim not in (2, 3):
        raise DataError(f"{train.name}: semi-supervised training needs 2D slices or 3D volumes.")
    if cfg.dims is not None and cfg.dims != train.ndim:
        raise ConfigError(f"{train.name} holds {train.ndim}D samples but dims={cfg.dims}.")
    cfg = cfg.resolved(train.ndim)
    labelled = select_labelled(train, patients=cfg.labelled_patients, fraction=cfg.labelled_fraction,
                               ids=cfg.labelled_ids, seed=cfg.budget_seed)
    chosen = set(labelled)
    train = train.with_samples([replace(s, supervision="mask" if s.id in chosen else "none") for s in train.samples])
    unlabelled = [i for i, s in enumerate(train.samples) if s.id not in chosen]
    if cfg.unlabelled_limit is not None:
        unlabelled = unlabelled[: max(0, cfg.unlabelled_limit)]
    if require_unlabelled and not unlabelled:
        raise DataError(f"{train.name}: the labelled set covers every sample; nothing is left unlabelled "
                        "(label fewer patients, or use --semi none for the supervised-only baseline).")
    check_masks_for_training(train)  # the labelled set's masks: 0/255 exports refused before training
    split, val = _open_val(cfg, train.labels.names)
    cfg = dataclasses.replace(cfg, val_split=split)
    return SemiData(cfg=cfg, train=train, labelled=labelled, unlabelled=unlabelled, val=val)


def network_spec(cfg: SemiConfig, labels: LabelSpec, in_chans: int) -> dict:
    """The spec `frugalseg.models.build_model` rebuilds the network from (saved in checkpoints and exports).

    Plain: unet2d / unet3d / vnet3d; DTC's dual-head versions when `cfg.levelset`. 2D specs carry
    `input_size` (slices are resized to the patch at inference, as in training)."""
    dims, patch = cfg.dims, list(cfg.patch_size)
    if cfg.natural:  # as `frugalseg train` specs its segmenters; whole images at inference (no input_size)
        return {"arch": cfg.arch, "num_classes": labels.num_classes, "in_chans": in_chans, "backbone": cfg.backbone,
                "output_stride": cfg.output_stride, "aux_stage": cfg.aux_stage, "dims": 2, "patch_size": patch,
                "method": cfg.semi}
    arch = "vnet3d" if cfg.arch == "vnet" else f"unet{dims}d"
    spec = {"arch": f"levelset_{arch}" if cfg.levelset else arch, "num_classes": labels.num_classes,
            "in_chans": in_chans, "dropout": cfg.dropout, "dims": dims, "patch_size": patch, "method": cfg.semi}
    if cfg.arch == "unet":
        spec["channels"] = list(cfg.channels)
    if dims == 2:
        spec["input_size"] = patch[0] if patch[0] == patch[1] else patch
    return spec


# ---- fit and stage -----------------------------------------------------------------------------------------
def fit_semi(module, cfg: SemiConfig, run: RunDir, batches: SemiBatches, val: SegDataset | None):
    """Lightning fit of a `stages.engine.SemiModule` with resume, as `stages.train.train` does it.

    `iterations` end the run; epochs of `batches.steps` iterations (a divisor of `iterations`,
    `SemiConfig.epoch_length`) are the checkpoint/validation unit, so a run stopped at its end resumes
    exactly, with the batches the uninterrupted run would have drawn. Training stops on max_epochs, not
    max_steps: a run stopped by max_steps ends inside its last epoch as Lightning counts it, and a resume
    from that checkpoint would replay part of an epoch."""
    from frugalseg.stages.engine import fit_resumable  # Lightning: only when training

    if cfg.iterations % batches.steps:
        raise ConfigError(f"{batches.steps} steps per epoch do not divide {cfg.iterations} iterations.")
    module.batches = batches
    loader = DataLoader(batches, batch_size=None, num_workers=cfg.num_workers)
    validate = val is not None and cfg.val_every > 0
    val_loader = DataLoader(EvalCases(val, cfg.dims), batch_size=1, collate_fn=first_item,
                            num_workers=cfg.num_workers) if validate else None
    return fit_resumable(module, cfg, run, loader, max_epochs=cfg.iterations // batches.steps,
                         val_loader=val_loader, val_every=max(1, cfg.val_every))


def _epoch_steps(cfg: SemiConfig, run: RunDir) -> int:
    """Iterations per epoch: `cfg.epoch_length` for a new run; a resumed run keeps its checkpoint's, so
    its epochs (and so its batches) continue where they stopped even when `iterations` changed."""
    steps = cfg.epoch_length
    if cfg.resume and run.last_checkpoint.exists():
        meta = check_checkpoint(run.last_checkpoint)
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


def evaluate_semi(model: nn.Module, ds: SegDataset, labels: LabelSpec, cfg: SemiConfig, **kwargs: Any) -> dict:
    """`frugalseg.evaluation.evaluate` as a semi-supervised run predicts its cases (resolved `cfg`: the
    network's dims, the patch as input size or sliding window, its overlap, largest component), on the
    device of `cfg.devices`."""
    return evaluate(model, ds, labels, device=device_of(cfg.devices), dims=cfg.dims, size=cfg.inference_size,
                    overlap=cfg.val_overlap, largest_component=cfg.largest_component, progress=cfg.progress,
                    **kwargs)


def train_semi(cfg: SemiConfig) -> dict:
    """Train `cfg`'s method in `cfg.out` (resumable), export, evaluate on the validation split.

    Returns {"run", "method", "train_seconds", "iterations", "seconds_per_iteration", "losses", "labelled",
    "unlabelled", "streams" (labelled samples per stream), "val"?: `frugalseg.evaluation.evaluate` metrics}.
    """
    import lightning as L  # only when training (seconds to import)

    from frugalseg.stages.engine import SemiModule

    cfg.validate()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    step_class = cfg.STEP
    data = open_semi_data(cfg, require_unlabelled=step_class.uses_unlabelled)
    cfg, train, labels = keep_saved_schedule(data.cfg, cfg, cfg.out), data.train, data.train.labels
    cfg.check(labels)
    streams = cfg.streams(data.labelled)
    unlabelled = data.unlabelled if step_class.uses_unlabelled else []
    run = RunDir(cfg.out)  # after the data is checked: bad input leaves no folder behind
    finished = run.stage_done("train")
    claim_run_dir(run, cfg, labels, finished=finished, started=run.last_checkpoint.exists())
    write_json(run / "budget.json", {
        "method": cfg.semi, "labelled": list(data.labelled), "streams": [list(s) for s in streams],
        "unlabelled": [train[i].id for i in unlabelled],
    })
    spec = network_spec(cfg, labels, input_channels(train))
    t0 = time.time()
    if finished and not cfg.resume:
        log.info("%s: training already finished; skipping (delete stages/train.done to retrain).", run.path)
        info = run.stage_info("train")
        predictor = step_class.load_predictor(run.path)
    else:
        method = cfg.build_step(spec, labels)
        module = SemiModule(method, labels, cfg, spec)
        index = {s.id: i for i, s in enumerate(train.samples)}
        batches = SemiBatches(
            train, [[index[i] for i in s] for s in streams], unlabelled,
            labelled_batch_size=cfg.labelled_batch_size,
            unlabelled_batch_size=cfg.unlabelled_batch_size if step_class.uses_unlabelled else 0,
            steps=_epoch_steps(cfg, run), patch_size=cfg.patch_size, augment=cfg.augment,
            sdf_classes=labels.num_classes if step_class.needs_sdf else None, seed=cfg.seed,
            scale=cfg.scale, base_size=cfg.base_size, jitter=cfg.jitter or 0.0,
        )
        trainer = fit_semi(module, cfg, run, batches, data.val)
        method.export(run.path, spec, labels)
        info = {"seconds": round(time.time() - t0, 1), "iterations": int(trainer.global_step),
                "seconds_per_iteration": module.seconds_per_iteration, "losses": module.last_losses}
        run.mark_done("train", info)
        predictor = method.predictor
    result: dict = {"run": str(run.path), "method": cfg.semi, "train_seconds": round(time.time() - t0, 1),
                    "iterations": info.get("iterations"), "seconds_per_iteration": info.get("seconds_per_iteration"),
                    "losses": info.get("losses", {}),
                    "labelled": len(data.labelled), "unlabelled": len(unlabelled),
                    "streams": [len(s) for s in streams]}
    if data.val is not None:
        images = data.val.ndim == 2  # 2D images: predictions kept for the report's gallery
        pred_dir = run / "predictions" / cfg.val_split if images else None
        metrics = evaluate_semi(predictor, data.val, labels, cfg, pred_dir=pred_dir)
        metrics.update(split=cfg.val_split, model=spec, method=cfg.semi)
        run.write_metrics(cfg.val_split, metrics)
        result["val"] = metrics
        write_report(run.path, ds=data.val if images else None, split=cfg.val_split)  # metrics, learning curves
    return result


def train_cotrain(cfg: CoTrainConfig) -> dict:
    """Co-train K networks in `cfg.out`, export the ensemble, evaluate it on the validation cases.

    `train_semi`'s result plus "views" (labelled samples per model); views.json lists each model's labelled
    ids. With `eval_members`, each member's metrics are added under "members" (without their per-case lists).
    """
    result = train_semi(cfg)
    run = Path(result["run"])
    budget = read_json(run / "budget.json")
    write_json(run / "views.json", {"labelled": budget["labelled"], "views": budget["streams"],
                                    "unlabelled": len(budget["unlabelled"])})
    result["views"] = result["streams"]
    val = result.get("val")
    if val is not None and cfg.eval_members:
        data = open_semi_data(cfg)
        rcfg, labels = data.cfg, data.train.labels
        ensemble = CoTrainStep.load_predictor(run)
        val["members"] = [{k: v for k, v in evaluate_semi(m, data.val, labels, rcfg).items() if k != "per_case"}
                          for m in ensemble.members]
        RunDir(run).write_metrics(rcfg.val_split, val)
    return result


def saved_export(run: RunDir) -> dict:
    """The export metadata of a finished semi-supervised run ({"model": spec, "labels": ...}): model/config.json,
    or co-training's models/ensemble.json."""
    for rel in ("model/config.json", "models/ensemble.json"):
        if (run / rel).exists():
            return read_json(run / rel)
    raise DataError(f"{run.path}: no exported model (model/ or models/); has training finished?")


#: `frugalseg train --semi NAME` → (config class, train function).
SEMI_METHODS: dict[str, tuple[type[SemiConfig], Any]] = {
    "dtc": (DTCConfig, train_semi),
    "cotrain": (CoTrainConfig, train_cotrain),
    "meanteacher": (MeanTeacherConfig, train_semi),
    "none": (SupervisedOnlyConfig, train_semi),
}
