"""From image tags to a segmentation model: `frugalseg run`.

The chain (each a stage of the run directory, skipped when its `stages/<name>.done` marker exists, so a
killed run resumes at the stage it was in):

1. `classify`   tag classifier on the training split's tags (masks never seen);
2. `group`      (seeds = group) the group-wise co-attention classifier, started from the tag classifier;
3. `maps`       class maps of the training images: cam | advcam | prm | group;
4. `calibrate`  (optional, `calibration_fraction`) the background threshold chosen on the masks of a few
                training images, see below;
5. `seeds`      seed label maps at the background threshold (IRN's 0.15, or the calibrated one);
6. `crf`        dense-CRF pseudo-masks with confidence-based ignore regions (AdvCAM's 0.35 / 0.15, or the
                calibrated threshold and that threshold minus the same 0.2 gap);
7. `round<r>`   MCOF's loop, `rounds` times: bottom-up mining of common object features (superpixels,
                one region classifier over the whole training set, saliency under a Bayesian rule in the
                first `saliency_rounds` rounds) -> refined regions; top-down: a segmentation network (OCR
                head) trained on those regions; its predictions on the training images, restricted to each
                image's tags, seed the next round: as they are (MCOF, `round_seeds=predictions`) or, by
                default, only where they agree with the round's mined regions (`agreement`), the pixels
                where top-down and bottom-up disagree left for the next region classifier to decide. From
                round 2 on the segmenter continues from the previous round's (`segmenter_init`). On
                msrc-objects (benchmarks/tags_to_model.py) MCOF's rule mined round-2 regions of 0.604 train
                mIoU from round-1 regions of 0.637 (the miner inherits the segmenter's errors); the
                agreement gave 0.652.

Ground-truth masks of the training images are read only to *report* how good each stage's masks are
(pseudo-mask mIoU per stage), with one opt-in exception: `calibration_fraction` lends the masks of that
fraction of the training images to choose the background threshold, because IRN's thresholds were tuned for
ResNet-50 CAMs on VOC and other backbones' maps peak elsewhere (lite0's multi-scale CAMs on msrc-objects are
best near 0.5, not 0.15). Those images still train everything through their tags only, and every stage is
then scored on the *other* training images, so no figure is reported on the images that chose it. The
final model is scored on the validation split. Everything lands in `summary.json` and `report.html`.

Each stage's done-marker records the settings it depends on (its own and everything upstream: `stage_key`,
derived from the `stage=` every field of `PipelineConfig` declares); a stage whose marker holds other
settings is redone with its outputs removed (`restart_stage`), and so is everything after it, so changing
e.g. a threshold and re-running the same `--out` never mixes stale stages with new ones.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from frugalseg.data import open_split
from frugalseg.data.budget import LabelBudget, apply_budget, budget_manifest
from frugalseg.data.io import make_folder, read_json, read_label_png, sample_file, write_json, write_label_png
from frugalseg.data.samples import SegDataset
from frugalseg.data.transforms import to_tensor_image
from frugalseg.errors import ConfigError, DataError
from frugalseg.export import load_export
from frugalseg.inference import predict_images
from frugalseg.report.pipeline import write_pipeline_report
from frugalseg.runs import RunDir
from frugalseg.stages.classify import ClassifyConfig, train_classifier
from frugalseg.stages.group import GroupConfig, GroupMapsConfig, make_group_maps, train_group_classifier
from frugalseg.stages.maps import MapsConfig, make_maps
from frugalseg.stages.options import (
    NO_OUTPUT,
    RunOptions,
    device_of,
    option,
    run_options_of,
    stage_fields,
    unclassified_fields,
)
from frugalseg.stages.train import TrainConfig, train
from frugalseg.weak.crf import ADVCAM_BG_THRESHOLD, ADVCAM_FG_THRESHOLD, evaluate_pseudo_masks, refine_dataset
from frugalseg.weak.maps_io import load_maps, maps_path
from frugalseg.weak.methods import SEED_METHODS, SeedMethodName
from frugalseg.weak.mining import agreement, backbone_features, mine_round, restrict_to_tags, superpixels
from frugalseg.weak.saliency import manifold_ranking_saliency
from frugalseg.weak.seeds import (
    IRN_THRESHOLD,
    choose_threshold,
    evaluate_seeds,
    iter_seed_items,
    seed_from_maps,
    sweep_table,
)

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig(RunOptions):
    """`frugalseg run`. Each field's `stage` is the first stage whose output it changes (see `stage_key`)."""

    out: str = option("runs/tags", "Run directory to write (config, every stage's outputs, summary.json, "
                                   "report.html).", stage=NO_OUTPUT)
    # tags of these images train everything; their masks are only scored
    train_split: str = option("train", "Split whose tags train everything (its masks are only scored).",
                              stage="data")
    # the final model is scored here (and the classifier's tags): what is reported, not what is made
    val_split: str | None = option("val", "Split the segmenters and the classifier are scored on.", stage=NO_OUTPUT)
    # the classifier trains on the whole split; groups and maps on the first N images
    limit: int | None = option(None, "Only the first N training images (a fixed, stated subset for CPU runs).",
                               stage="group", ge=2)
    mask_fraction: float | None = option(None, "Masks + tags: this fraction of the training images keeps its "
                                               "masks (drawn with --budget-seed).", stage="calibrate", gt=0, le=1)
    calibration_fraction: float | None = option(None, "Masks of this fraction of training images choose the "
                                                      "background threshold (seeds, CRF); they are not scored.",
                                                stage="calibrate", gt=0, lt=1)
    # draws the calibration images and the label budget (with neither, nothing: see stage_key)
    budget_seed: int = option(0, "Seed of the label-budget and calibration draws.", stage="calibrate", ge=0)
    seeds: SeedMethodName = option("cam", "Where seeds come from: cam, advcam, prm, or group (co-attention over "
                                          "groups of images sharing a tag).", stage="maps")
    classifier: str | None = option(None, "An existing `frugalseg classify` run to use instead of training one.",
                                    stage="classify")
    maps_from: str | None = option(None, "Reuse another run's maps folder (its cams/: same classifier, method and "
                                         "images) instead of computing maps.", stage="maps")
    refine: Literal["crf", "irn", "irn+crf", "none"] = option(
        "crf", "crf: dense-CRF pseudo-masks with confidence-based ignore regions; irn: IRN (a boundary network "
               "trained on the CRF's confident regions, then a random walk of the maps); irn+crf: IRN, then a "
               "CRF of its masks; none: seeds go straight to mining.", stage="crf")
    rounds: int = option(3, "MCOF iterations: mine regions from the seeds, train a segmenter on them, its "
                            "predictions seed the next.", stage="round", ge=0)
    saliency_rounds: int = option(1, "Rounds that refine regions with saliency under a Bayesian rule (MCOF: the "
                                     "first only).", stage="round", ge=0)
    # classifier and maps
    classifier_epochs: int = option(8, "Epochs of the tag classifier.", stage="classify", ge=1)
    scales: tuple[float, ...] = option((1.0, 0.5, 1.5, 2.0), "Image scales for maps (repeat the option: --scales "
                                                             "1.0 --scales 0.5).", stage="maps", gt=0)
    steps: int = option(27, "AdvCAM T: climbing steps per scale.", stage="maps", ge=1)
    restriction: float = option(7.0, "AdvCAM lambda: weight of the restriction penalty (fractional allowed).",
                                stage="maps", ge=0)
    group_size: int = option(3, "Group seeds: images per group, anchor included.", stage="group", ge=2)
    group_epochs: int = option(6, "Group seeds: epochs of the group model.", stage="group", ge=1)
    # CRF pseudo-masks
    fg_threshold: float = option(ADVCAM_FG_THRESHOLD, "CRF pseudo-masks: foreground where the CRF of maps vs this "
                                                      "background level says so (AdvCAM 0.35).", stage="calibrate",
                                 ge=0, le=1)
    bg_threshold: float = option(ADVCAM_BG_THRESHOLD, "CRF pseudo-masks: background where the CRF of maps vs this "
                                                      "level says so; between = ignore (0.15).", stage="calibrate",
                                 ge=0, le=1)
    crf_workers: int | None = option(None, "CRF processes (0 or 1: in this process) [default: min(4, CPUs)].",
                                     stage=NO_OUTPUT, ge=0)
    # IRN (--refine irn / irn+crf)
    irn_epochs: int = option(3, "IRN: epochs of the boundary network (the reference: 3).", stage="irn", ge=1)
    irn_crop: int = option(256, "IRN: training crop (the reference: 512 on VOC's larger images).", stage="irn", ge=32)
    irn_batch_size: int = option(8, "IRN: training batch (the reference: 32).", stage="irn", ge=1)
    irn_lr: float = option(0.1, "IRN: learning rate of the boundary branch (displacement: 10x; SGD, poly).",
                           stage="irn", gt=0)
    irn_beta: float = option(10.0, "IRN: random-walk affinity exponent beta.", stage="irn", gt=0)
    irn_steps: int = option(256, "IRN: random-walk steps (the reference: 2^8).", stage="irn", ge=1)
    irn_bg_threshold: float | None = option(None, "IRN: background level of the walked maps [default: chosen on "
                                                  "the calibration masks, else 0.25 as the reference].",
                                            stage="irn", ge=0, le=1)
    # mining
    superpixel_method: Literal["felzenszwalb", "slic"] = option("felzenszwalb", "Mining: superpixels of MCOF "
                                                                                "(felzenszwalb) or SLIC.", stage="round")
    min_coverage: float = option(0.5, "Mining: a superpixel takes a seed label covering at least this fraction "
                                      "of it.", stage="round", ge=0, le=1)
    mining: bool = option(True, "Mine regions each round (off: each round's segmenter trains on its seeds as they "
                                "are, the no-mining ablation).", stage="round")
    expand_only: bool = option(False, "Mining only fills unknown pixels (off, MCOF: the region classifier "
                                      "relabels every superpixel).", stage="round")
    mining_confidence: float = option(0.5, "Mining: region-classifier probability needed to fill an unknown "
                                           "region.", stage="round", ge=0, le=1)
    # Inverse-frequency class weights in the region classifier. Off: weighting background down made the miner
    # grow objects into background in diagnostic runs on msrc-objects' training images (at two threshold
    # settings); on the tags_to_model benchmark's calibration images the two were level.
    region_class_balanced: bool = option(False, "Mining: weigh the region classifier's classes by inverse "
                                                "frequency (off: background keeps its weight).", stage="round")
    prediction_confidence: float = option(0.5, "Segmenter pixels below this probability (within the tags) are "
                                                "unknown to the next round.", stage="predictions", ge=0, le=1)
    # rounds >= 2 start from: the last segmenter's predictions (MCOF), or the pixels where those predictions
    # agree with the last round's mined regions, the disagreements left unknown for the region classifier
    round_seeds: Literal["predictions", "agreement"] = option("agreement", "Rounds >= 2 start from the last "
                                                                           "predictions (MCOF) or where they agree "
                                                                           "with the last mined regions "
                                                                           "(agreement).", stage="round")
    # rounds >= 2: the segmenter continues from the previous round's model, or starts again from ImageNet
    segmenter_init: Literal["previous", "imagenet"] = option("previous", "Round >= 2 segmenters: continue from "
                                                                         "the previous round's model (previous) "
                                                                         "or start from ImageNet weights.",
                                                             stage="round")
    # learning rate of a segmenter that continues from the previous round's, as a multiple of `lr`
    continue_lr_mult: float = option(1.0, "Round >= 2 segmenters that continue from the previous round's model "
                                          "train at lr times this.", stage="round", gt=0)
    # segmenter
    seg_arch: Literal["ocr", "fcn"] = option("ocr", "Segmenter of each round: OCR or FCN head.", stage="round")
    seg_epochs: int = option(30, "Epochs of each round's segmenter.", stage="round", ge=1)
    crop_size: int = option(256, "Training crop of each round's segmenter.", stage="round", ge=1)
    batch_size: int = option(8, "Batch size of each round's segmenter.", stage="round", ge=1)
    lr: float = option(0.01, "Learning rate of each round's segmenter.", stage="round", gt=0)
    # every stage resumes by itself (finished stages are kept, training continues from its last checkpoint)
    resume: bool = option(False, "Unused: a run always resumes from its finished stages and last checkpoints.",
                          stage=NO_OUTPUT, cli=False)

    def validate(self) -> "PipelineConfig":
        self.check_data()
        if self.seeds not in SEED_METHODS:
            raise ConfigError(f"Unknown seeds '{self.seeds}'; choose one of {SEED_METHODS}.")
        # each field's type and range were checked when the config was made (check_values); across fields:
        if not self.bg_threshold <= self.fg_threshold:
            raise ConfigError(f"Need 0 <= bg_threshold <= fg_threshold <= 1, got bg_threshold {self.bg_threshold} > "
                              f"fg_threshold {self.fg_threshold}.")
        return self


# ---- what each stage depends on ---------------------------------------------------------------
#: The stages in order. A stage's cache key holds the fields of its own stage and of every stage before it, so
#: a change upstream makes every later stage stale too. `group` runs only for group seeds, but its fields
#: (limit, group size and epochs) come before `maps` either way.
STAGES = ("data", "classify", "group", "maps", "calibrate", "seeds", "crf", "irn", "round", "predictions")
#: IRN's fields enter the keys only of runs that use IRN: adding them left every other run's keys as they were.
IRN_FIELDS = ("irn_epochs", "irn_crop", "irn_batch_size", "irn_lr", "irn_beta", "irn_steps", "irn_bg_threshold")
#: Round fields that enter round r's key in a shape of their own (`round_key`), or not at all.
PER_ROUND_FIELDS = {
    "rounds": "round r does not depend on how many rounds follow it",
    "saliency_rounds": "round_key lists which of rounds 1..r used saliency",
    "round_seeds": "rounds >= 2 only, one entry per earlier round",
    "segmenter_init": "rounds >= 2 only, one entry per earlier round",
    "continue_lr_mult": "rounds >= 2 with segmenter_init=previous only, and only when it is not 1.0",
}
#: Fields earlier versions put in the keys of stages that do not use them (the round-1 regions and segmenter and
#: `prediction_confidence`; every stage and `budget_seed` when nothing is drawn): a marker that still holds one
#: matches a key without it, so a finished run is not redone for them.
RETIRED_KEY_FIELDS = ("prediction_confidence", "budget_seed")


@functools.cache
def key_fields(cls: type, stage: str) -> tuple[str, ...]:
    """The fields of config class `cls` whose values make up `stage`'s key (own and upstream, plain values)."""
    missing = unclassified_fields(cls)
    if missing:
        raise ConfigError(f"{cls.__name__}: fields {missing} declare no stage; give each option(..., stage=...) "
                          "(the first stage whose output it changes, or NO_OUTPUT).")
    upto = STAGES[: STAGES.index(stage) + 1]
    return tuple(f for f in stage_fields(cls, upto) if f not in PER_ROUND_FIELDS)


def stage_key(cfg: PipelineConfig, stage: str, **extra: Any) -> dict[str, Any]:
    """The settings a stage's output depends on: its own and every upstream stage's (`key_fields`), plus
    `extra` (the PRM flag of the classifier, a round's history)."""
    key = {f: getattr(cfg, f) for f in key_fields(type(cfg), stage)}
    if not str(getattr(cfg, "refine", "")).startswith("irn"):
        for f in IRN_FIELDS:
            key.pop(f, None)
    if "budget_seed" in key and cfg.calibration_fraction is None and cfg.mask_fraction is None:
        del key["budget_seed"]  # it draws the calibration images and the label budget; with neither, nothing
    return {**key, **extra}


def uses_saliency(cfg: PipelineConfig, r: int, ds: SegDataset) -> bool:
    return r <= cfg.saliency_rounds and ds.labels.background is not None


def round_key(cfg: PipelineConfig, r: int, ds: SegDataset) -> dict[str, Any]:
    """Round r depends on the rounds before it, so its key lists which of rounds 1..r refined with saliency
    (raising `saliency_rounds` from 1 to 2 leaves round 1 current and redoes round 2 onwards), and, from
    round 2 on, how the earlier rounds seeded and started their segmenters and their predictions' threshold."""
    extra: dict[str, Any] = {}
    if r > 1:  # round 1 starts from the CRF and from ImageNet either way
        extra = {"round_seeds": [cfg.round_seeds] * (r - 1), "segmenter_init": [cfg.segmenter_init] * (r - 1),
                 "prediction_confidence": cfg.prediction_confidence}  # earlier rounds' predictions
        if cfg.segmenter_init == "previous" and cfg.continue_lr_mult != 1.0:  # old keys stay valid at 1.0
            extra["continue_lr_mult"] = [cfg.continue_lr_mult] * (r - 1)
    return stage_key(cfg, "round", round=r, saliency=[uses_saliency(cfg, i, ds) for i in range(1, r + 1)], **extra)


def predictions_key(cfg: PipelineConfig, r: int, ds: SegDataset) -> dict[str, Any]:
    """Round r's predictions: the round's key and their own threshold."""
    own = {f: getattr(cfg, f) for f in stage_fields(type(cfg), ("predictions",))}
    return {**round_key(cfg, r, ds), **own}


def stage_is_current(run: RunDir, stage: str, key: dict[str, Any]) -> bool:
    """True when `stage` finished with the settings `key`."""
    return run.stage_done(stage, key, RETIRED_KEY_FIELDS)


def restart_stage(run: RunDir, stage: str, key: dict[str, Any], *outputs: Path) -> None:
    """About to (re)run `stage` with `key`: outputs made with other settings (a finished stage's, or those a
    killed run left while working with other settings) are removed with the marker, and
    `stages/<stage>.started` records `key`, so partial outputs are resumed from only by a run with the same
    settings."""
    if run.stage_made_with_other_settings(stage, key, RETIRED_KEY_FIELDS):
        log.info("stage %s of %s was made with other settings; redoing it", stage, run.path)
        for out in outputs:
            shutil.rmtree(out, ignore_errors=True)
        run.clear_stage(stage)
    run.mark_started(stage, key)


def needs_run(run: RunDir, stage: str, key: dict[str, Any], *outputs: Path) -> bool:
    """Whether `stage` must run: False when it is current; else True, after `restart_stage`."""
    if stage_is_current(run, stage, key):
        return False
    restart_stage(run, stage, key, *outputs)
    return True


# ---- data -------------------------------------------------------------------------------------
def open_training_images(cfg: PipelineConfig) -> SegDataset:
    """The training split (optionally its first `limit` images), with a clear error when it has no tags."""
    ds = open_split(cfg.data, cfg.train_split, background_classes=cfg.background_classes,
                    ignore_classes=cfg.ignore_classes, limit=cfg.limit)
    tagged = [s for s in ds.samples if (s.tags is not None or s.mask is not None) and ds.tags_of(s)]
    if not tagged:
        raise DataError(
            f"{ds.name}: no image of split '{cfg.train_split}' has image-level tags (give a tags.csv, or masks "
            "to derive them from); learning from tags needs at least one tagged image."
        )
    return ds.with_samples(tagged)


def given_masks(cfg: PipelineConfig, run: RunDir, ds: SegDataset) -> dict[str, np.ndarray]:
    """Masks + tags (the semi-supervised setting of AdvCAM): the label budget's masked training images keep
    their masks, which then replace the pseudo-masks of those images in every round (mining learns from
    them too). The budget is drawn over the images this run uses (`ds`: the training split, or its first
    `limit` images), as `frugalseg train --mask-fraction` draws it over its split; `budget.json` lists the
    masked ids, so a masks-only baseline can train on exactly the same images (`--labelled-ids`)."""
    if cfg.mask_fraction is None:
        return {}
    budget = LabelBudget(mask_fraction=cfg.mask_fraction, rest="tags", seed=cfg.budget_seed)
    budgeted = apply_budget(ds, budget)
    write_json(run / "budget.json", budget_manifest(budgeted, budget))
    return {s.id: ds.read_mask(s) for s in budgeted.samples if s.supervision == "mask"}


def has_ground_truth(ds: SegDataset) -> bool:
    return all(s.mask is not None for s in ds.samples)


def mask_file(folder: Path, sample_id: str) -> Path:
    """A stage's mask of one image: `folder/<safe id>.png` (palette PNG, 255 = unknown)."""
    return sample_file(folder, sample_id, ".png")


def write_masks(folder: Path, ds: SegDataset, masks: dict[str, np.ndarray]) -> None:
    make_folder(folder)
    for sid, m in masks.items():
        write_label_png(mask_file(folder, sid), m.astype(np.uint8), ds.labels.palette_bytes())


def read_masks(folder: Path, ds: SegDataset) -> dict[str, np.ndarray]:
    return {s.id: read_label_png(mask_file(folder, s.id)) for s in ds.samples if mask_file(folder, s.id).exists()}


def score_masks(folder: Path, ds: SegDataset, truth: dict[str, np.ndarray] | None = None) -> dict[str, Any] | None:
    """Pseudo-mask quality against the training images' own masks (report only), IRN's convention."""
    if not has_ground_truth(ds):
        return None
    return evaluate_pseudo_masks(folder, ds, save=True, truth=truth)


# ---- stages -----------------------------------------------------------------------------------
def stage_classify(cfg: PipelineConfig, run: RunDir) -> Path:
    if cfg.classifier:
        if not (Path(cfg.classifier) / "model").is_dir():
            raise ConfigError(f"--classifier {cfg.classifier}: not a classify run directory (no model/ folder).")
        return Path(cfg.classifier)
    out = run / "classifier"
    key = stage_key(cfg, "classify", prm=cfg.seeds == "prm")  # PRM classifiers train with peak stimulation
    if needs_run(run, "classify", key, out):
        ccfg = ClassifyConfig(**run_options_of(cfg, out=str(out), resume=(out / "checkpoints" / "last.ckpt").exists()),
                              train_split=cfg.train_split, eval_split=cfg.val_split, epochs=cfg.classifier_epochs,
                              peak_stimulation=cfg.seeds == "prm")
        res = train_classifier(ccfg)
        run.mark_done("classify", {"eval": res.get("eval")}, key=key)
    return out


def reused_maps(cfg: PipelineConfig, classifier: Path, ds: SegDataset) -> Path:
    """`maps_from`: maps another run already made, checked to come from the same classifier and method and to
    cover every training image (runs that differ only after the maps, e.g. tags-only vs masks + tags)."""
    folder = Path(cfg.maps_from)
    meta_file = folder / "maps.json"
    if not meta_file.exists():
        raise ConfigError(f"--maps-from {folder}: no maps.json there (give the cams/ folder of a finished run).")
    meta = read_json(meta_file)
    if meta.get("method") != cfg.seeds:
        raise ConfigError(f"--maps-from {folder}: its maps are '{meta.get('method')}', this run asks for '{cfg.seeds}'.")
    if Path(meta.get("classifier", "")).resolve() != Path(classifier).resolve():
        raise ConfigError(f"--maps-from {folder}: made with classifier {meta.get('classifier')}, this run uses "
                          f"{classifier} (pass the same --classifier).")
    missing = [s.id for s in ds.samples if not maps_path(folder, s.id).exists()]
    if missing:
        raise ConfigError(f"--maps-from {folder}: no maps for {len(missing)} training images, e.g. {missing[:3]}.")
    return folder


def stage_maps(cfg: PipelineConfig, run: RunDir, classifier: Path, ds: SegDataset) -> Path:
    if cfg.maps_from:
        return reused_maps(cfg, classifier, ds)
    maps_dir = run / "cams"  # maps.json, maps/<id>.npz, gallery.html
    key = stage_key(cfg, "maps")
    if not needs_run(run, "maps", key, maps_dir):
        return maps_dir
    if cfg.seeds == "group":
        gout = run / "group"
        group_key = stage_key(cfg, "group")
        if needs_run(run, "group", group_key, gout):
            lr_steps = tuple(e for e in (cfg.group_epochs // 3, 2 * cfg.group_epochs // 3) if e > 0)
            train_group_classifier(GroupConfig(
                **run_options_of(cfg, out=str(gout), resume=(gout / "checkpoints" / "last.ckpt").exists()),
                train_split=cfg.train_split, limit=cfg.limit, init_classifier=str(classifier),
                group_size=cfg.group_size, epochs=cfg.group_epochs, lr_steps=lr_steps))
            run.mark_done("group", key=group_key)
        make_group_maps(GroupMapsConfig(**run_options_of(cfg, out=str(maps_dir)), classifier=str(gout),
                                        split=cfg.train_split, scales=tuple(cfg.scales), limit=cfg.limit))
    else:
        make_maps(MapsConfig(**run_options_of(cfg, out=str(maps_dir)), classifier=str(classifier), method=cfg.seeds,
                             split=cfg.train_split, scales=tuple(cfg.scales), limit=cfg.limit, steps=cfg.steps,
                             restriction=cfg.restriction))
    run.mark_done("maps", key=key)
    return maps_dir


CALIBRATION_SWEEP = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95


@dataclass
class Thresholds:
    """The background levels the seeds and the CRF use, and where they came from."""

    seed: float
    fg: float
    bg: float
    calibration_ids: tuple[str, ...] = ()  # training images whose masks chose them (excluded from scoring)


def calibrated_threshold(maps_dir: Path, calibration: SegDataset, split: str) -> tuple[float | None, dict]:
    """The seed threshold with the best seed mIoU on `calibration`'s masks over `CALIBRATION_SWEEP`, and the
    sweep's results."""
    labels = calibration.labels
    results = evaluate_seeds(iter_seed_items(maps_dir, calibration), labels.num_classes, labels.names,
                             labels.background, CALIBRATION_SWEEP, split=split)
    return choose_threshold(results), results


def stage_calibrate(cfg: PipelineConfig, run: RunDir, maps_dir: Path, ds: SegDataset,
                    given: dict[str, np.ndarray] | None = None) -> Thresholds:
    """The seed/CRF thresholds: the configured ones, or (with `calibration_fraction`) the seed threshold with
    the best seed mIoU on the masks of a seeded random draw of that fraction of the training images, the CRF
    planes then at that threshold and at it minus the configured gap (fg_threshold - bg_threshold, AdvCAM's
    0.2). The sweep is kept in calibration.json, next to the ids that chose it. With a label budget
    (`mask_fraction`, `given`) the draw is among the budget's masked images, so calibration spends no mask
    beyond the budget."""
    default = Thresholds(IRN_THRESHOLD, cfg.fg_threshold, cfg.bg_threshold)
    if cfg.calibration_fraction is None:
        return default
    path = run / "calibration.json"
    key = stage_key(cfg, "calibrate")
    if stage_is_current(run, "calibrate", key) and path.exists():
        c = read_json(path)
        return Thresholds(c["seed_threshold"], c["fg_threshold"], c["bg_threshold"], tuple(c["ids"]))
    restart_stage(run, "calibrate", key)  # calibration.json is rewritten below
    if ds.labels.background is None:
        raise ConfigError(f"{ds.name} has no background class, so there is no background threshold to calibrate; "
                          "drop --calibration-fraction.")
    masked = [s for s in ds.samples if s.mask is not None and (not given or s.id in given)]
    n = max(1, round(cfg.calibration_fraction * len(ds.samples)))
    if len(masked) < n or n >= len(ds.samples):
        where = " within the label budget (--mask-fraction)" if given else ""
        raise DataError(f"{ds.name}: --calibration-fraction {cfg.calibration_fraction} needs masks on {n} of the "
                        f"{len(ds.samples)} training images (leaving some to score), but {len(masked)} have "
                        f"masks{where}.")
    rng = np.random.default_rng(cfg.budget_seed)
    chosen = ds.with_samples([masked[i] for i in sorted(rng.choice(len(masked), n, replace=False))])
    t, results = calibrated_threshold(maps_dir, chosen, f"{cfg.train_split} (calibration images)")
    gap = cfg.fg_threshold - cfg.bg_threshold
    out = Thresholds(t, t, round(max(0.0, t - gap), 4), tuple(s.id for s in chosen.samples))
    write_json(path, {"seed_threshold": out.seed, "fg_threshold": out.fg, "bg_threshold": out.bg,
                      "gap": gap, "ids": list(out.calibration_ids), "sweep": sweep_table(results),
                      "note": "chosen on these training images' masks; pipeline stages are scored on the others"})
    run.mark_done("calibrate", {"seed_threshold": t, "images": n}, key=key)
    return out


def stage_seeds(cfg: PipelineConfig, run: RunDir, maps_dir: Path, ds: SegDataset, th: Thresholds) -> Path:
    """Seeds at the background threshold, written as PNGs (the report shows them; round 1 uses them if no CRF)."""
    out = run / "seeds"
    key = stage_key(cfg, "seeds")
    if needs_run(run, "seeds", key, out):
        masks = {}
        for s in ds.samples:
            m = load_maps(maps_path(maps_dir, s.id))
            masks[s.id] = seed_from_maps(m.high_res, m.keys, th.seed, ds.labels.background)
        write_masks(out, ds, masks)
        run.mark_done("seeds", {"threshold": th.seed, "images": len(masks)}, key=key)
    return out


def stage_crf(cfg: PipelineConfig, run: RunDir, maps_dir: Path, ds: SegDataset, th: Thresholds) -> Path:
    out = run / "crf"
    key = stage_key(cfg, "crf")
    if needs_run(run, "crf", key, out):
        refine_dataset(maps_dir, ds, out, workers=cfg.crf_workers, fg_threshold=th.fg,
                       bg_threshold=th.bg, progress=cfg.progress)
        run.mark_done("crf", {"fg_threshold": th.fg, "bg_threshold": th.bg}, key=key)
    return out


class MiningInputs:
    """Images, frozen ImageNet features, superpixels and saliency of the training images, computed once."""

    def __init__(self, cfg: PipelineConfig, ds: SegDataset):
        t0 = time.time()
        self.ids = [s.id for s in ds.samples]
        self.images = [ds.read_image(s) for s in ds.samples]
        self.tags = [sorted(ds.tags_of(s)) for s in ds.samples]
        self.features = backbone_features(self.images, device=device_of(cfg.devices))
        self.superpixels = [superpixels(im, method=cfg.superpixel_method) for im in self.images]
        self.saliency = [manifold_ranking_saliency(im) for im in self.images]
        log.info("mining inputs for %d images in %.0f s", len(self.images), time.time() - t0)


def mine_regions(cfg: PipelineConfig, r: int, ds: SegDataset, inputs: MiningInputs, seeds: dict[str, np.ndarray],
                 given: dict[str, np.ndarray] | None = None, source: Path | str = "seeds"
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Round `r`'s MCOF mining of `seeds` (id -> mask; the label budget's masks `given` replace theirs and are
    kept as they are): the regions of every training image, and the mining statistics."""
    seeds = {**seeds, **(given or {})}
    missing = [i for i in inputs.ids if i not in seeds]
    if missing:
        raise DataError(f"{source}: no seed mask for {missing[:5]} ({len(missing)} images).")
    regions, stats = mine_round(
        inputs.images, [seeds[i] for i in inputs.ids], inputs.tags, inputs.features,
        num_classes=ds.labels.num_classes, background_index=ds.labels.background,
        use_saliency=uses_saliency(cfg, r, ds),
        superpixel_maps=inputs.superpixels, saliency_maps=inputs.saliency,
        min_coverage=cfg.min_coverage, min_confidence=cfg.mining_confidence, keep_seeds=cfg.expand_only,
        classifier_options={"class_balanced": cfg.region_class_balanced}, seed=cfg.seed + r)
    return {**dict(zip(inputs.ids, regions)), **(given or {})}, stats


def stage_round(cfg: PipelineConfig, run: RunDir, r: int, seeds_dir: Path, ds: SegDataset,
                inputs: MiningInputs | None, given: dict[str, np.ndarray] | None = None,
                agree_with: Path | None = None) -> tuple[Path, Path, MiningInputs | None]:
    """One MCOF round: regions mined from `seeds_dir` (with `agree_with`, from the pixels where its masks and
    those of `seeds_dir` agree, written to round<r>/seeds), a segmenter trained on them, its tag-restricted
    predictions on the training images (the next round's seeds)."""
    rdir = run / f"round{r}"
    regions_dir, preds_dir = rdir / "regions", rdir / "predictions"
    key = round_key(cfg, r, ds)
    # stale regions make the round's segmenter (and its resumable checkpoint) stale too: the whole round folder
    # goes (the predictions' key holds the round's, so their marker is stale as well)
    if needs_run(run, f"round{r}_regions", key, rdir):
        if cfg.mining:
            inputs = inputs or MiningInputs(cfg, ds)
            seeds = read_masks(seeds_dir, ds)
            if agree_with is not None:
                seeds = agreement(seeds, read_masks(agree_with, ds))
                write_masks(rdir / "seeds", ds, seeds)
            regions, stats = mine_regions(cfg, r, ds, inputs, seeds, given, source=seeds_dir)
            write_masks(regions_dir, ds, regions)
            write_json(rdir / "mining_stats.json", stats)
            run.mark_done(f"round{r}_regions", key=key)
        else:
            write_masks(regions_dir, ds, {**read_masks(seeds_dir, ds), **(given or {})})
            run.mark_done(f"round{r}_regions", {"mining": False}, key=key)
    init = run / f"round{r - 1}" / "segmenter" / "model" if r > 1 and cfg.segmenter_init == "previous" else None
    lr = cfg.lr * cfg.continue_lr_mult if init else cfg.lr
    train(segmenter_config(cfg, rdir / "segmenter", mask_dir=str(regions_dir), init_from=init and str(init), lr=lr))
    preds_key = predictions_key(cfg, r, ds)  # the round's key and this round's own threshold
    if needs_run(run, f"round{r}_predictions", preds_key, preds_dir):
        predict_within_tags(rdir / "segmenter" / "model", ds, preds_dir, cfg.prediction_confidence,
                            device_of(cfg.devices))
        run.mark_done(f"round{r}_predictions", key=preds_key)
    return regions_dir, preds_dir, inputs


def segmenter_config(cfg: PipelineConfig, out: Path, **overrides: Any) -> TrainConfig:
    """The segmentation network of a round (OCR head by default), trained on `mask_dir`'s masks; resumes
    from its last checkpoint. Benchmarks build their masks-only baseline from it (same schedule)."""
    # an interrupted segmenter resumes; a finished one is left as it is (not reloaded and re-exported)
    resume = (out / "checkpoints" / "last.ckpt").exists() and not (out / "stages" / "train.done").exists()
    fields = dict(**run_options_of(cfg, out=str(out), resume=resume), train_split=cfg.train_split,
                  val_split=cfg.val_split, arch=cfg.seg_arch, epochs=cfg.seg_epochs, crop_size=cfg.crop_size,
                  batch_size=cfg.batch_size, lr=cfg.lr, val_every=10_000)
    return TrainConfig(**{**fields, **overrides})


@torch.no_grad()
def predict_within_tags(model_dir: Path, ds: SegDataset, out: Path, min_confidence: float = 0.0,
                        device: torch.device | str = "cpu") -> None:
    """The segmenter's labels on the training images, with classes outside each image's tags forbidden
    (`restrict_to_tags`: MCOF's 'predictions restricted to image labels' seed the next round). Pixels whose
    probability, renormalised over the allowed classes, is below `min_confidence` become unknown (255)."""
    model, spec, labels = load_export(model_dir)
    model = model.to(device).eval()
    masks = {}
    for s in ds.samples:
        image = to_tensor_image(ds.read_image(s))
        probs = predict_images(model, image[None], spec.get("input_size"), device=device)[0]
        label = restrict_to_tags(probs, ds.tags_of(s), labels.background, min_confidence, labels.ignore_index)
        masks[s.id] = label.cpu().numpy()
    write_masks(out, ds, masks)


IRN_BG_SWEEP = tuple(round(0.05 * i, 2) for i in range(1, 16))  # 0.05 .. 0.75


def stage_irn(cfg: PipelineConfig, run: RunDir, maps_dir: Path, crf_dir: Path, ds: SegDataset,
              th: Thresholds) -> tuple[Path, Path | None]:
    """IRN pseudo-masks (and, with `irn+crf`, a CRF of them): the boundary network trains on the CRF stage's
    confident regions (its ignore band left out), then every image's maps are walked inside its boundaries.
    The walked maps' background level is `irn_bg_threshold`, or the best on the calibration images' masks
    (the pipeline's thresholds are chosen there), else the reference's 0.25. Resumable: a killed training
    continues from its last epoch (irn/train_state.pt), and the trained network and each image's walked maps
    are kept (irn/net.pt, irn/walk/<id>.npz)."""
    from frugalseg.data.io import atomic_path
    from frugalseg.data.labels import IGNORE_INDEX
    from frugalseg.metrics import confusion_matrix
    from frugalseg.metrics import summarise as summarise_confusion
    from frugalseg.models.irn import InterPixelNet
    from frugalseg.stages.options import device_of
    from frugalseg.weak.irn import IRN_SEM_BG_THRESHOLD, boundary_map, random_walk, train_irn, walk_to_labels

    out, walks = run / "irn", run / "irn" / "walk"
    crf_out = run / "irn_crf" if cfg.refine == "irn+crf" else None
    key = stage_key(cfg, "irn")
    if not needs_run(run, "irn", key, out, *([crf_out] if crf_out else [])):
        return out, crf_out
    device = device_of(cfg.devices)
    net_file = out / "net.pt"
    net = InterPixelNet("tf_efficientnet_lite0", pretrained=True)
    if net_file.exists():
        net.load_state_dict(torch.load(net_file, map_location="cpu"))
    else:
        pairs = [(ds.read_image(s), read_label_png(mask_file(crf_dir, s.id))) for s in ds.samples
                 if mask_file(crf_dir, s.id).exists()]
        make_folder(out)
        losses = train_irn(net, pairs, epochs=cfg.irn_epochs, batch_size=cfg.irn_batch_size, crop=cfg.irn_crop,
                           lr=cfg.irn_lr, seed=cfg.seed, device=device, checkpoint=out / "train_state.pt")
        with atomic_path(net_file) as tmp:
            torch.save(net.state_dict(), tmp)
        write_json(out / "train.json", {"steps": len(losses), "loss_first": losses[:5], "loss_last": losses[-5:]})
    walked: dict[str, tuple[np.ndarray, np.ndarray, tuple[int, int]]] = {}
    for s in ds.samples:
        f = sample_file(walks, s.id, ".npz")
        if f.exists():
            with np.load(f) as z:
                walked[s.id] = (z["walk"], z["keys"], tuple(int(v) for v in z["size"]))
            continue
        m = load_maps(maps_path(maps_dir, s.id))
        image = ds.read_image(s)
        b = boundary_map(net, image, device)
        small = torch.nn.functional.interpolate(torch.from_numpy(m.high_res)[None], size=tuple(b.shape),
                                                mode="bilinear", align_corners=False)[0]
        w = random_walk(small, b, cfg.irn_beta, cfg.irn_steps).numpy().astype(np.float32)
        walked[s.id] = (w, np.asarray(m.keys), image.shape[:2])
        make_folder(walks)
        with atomic_path(f) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, walk=w, keys=np.asarray(m.keys), size=np.array(image.shape[:2]))
    bg = ds.labels.background

    def labels_at(t: float, ids: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        return {sid: (walk_to_labels(torch.from_numpy(w), k, size, t, bg if bg is not None else 0)
                      if k.size else np.full(size, bg if bg is not None else IGNORE_INDEX, np.uint8))
                for sid, (w, k, size) in ((i, walked[i]) for i in (walked if ids is None else ids))}

    threshold, sweep = cfg.irn_bg_threshold, None
    if threshold is None and th.calibration_ids and bg is not None:
        # only the calibration images are labelled at each swept level, their masks read once
        truth = {s.id: torch.from_numpy(ds.read_mask(s).astype(np.int64))
                 for s in ds.samples if s.id in set(th.calibration_ids)}
        sweep = {}
        for t in IRN_BG_SWEEP:
            pred = labels_at(t, truth)
            conf = sum(confusion_matrix(torch.from_numpy(pred[i].astype(np.int64)), m, ds.labels.num_classes)
                       for i, m in truth.items())
            sweep[t] = summarise_confusion(conf, ds.labels.names, bg)["miou"]
        threshold = max(sweep, key=lambda t: (sweep[t], -abs(t - IRN_SEM_BG_THRESHOLD)))
    threshold = IRN_SEM_BG_THRESHOLD if threshold is None else threshold
    masks = labels_at(threshold)
    write_masks(out, ds, masks)
    if crf_out is not None:
        from frugalseg.weak.crf import CrfSettings, dense_crf

        refined = {}
        for s in ds.samples:
            lab = masks[s.id]
            present = np.unique(lab[lab != IGNORE_INDEX])
            if present.size < 2:
                refined[s.id] = lab
                continue
            index = np.searchsorted(present, np.where(lab == IGNORE_INDEX, present[0], lab))
            q = dense_crf(ds.read_image(s), index, present.size, **CrfSettings().kwargs())
            refined[s.id] = present[np.asarray(q)].astype(np.uint8)
        write_masks(crf_out, ds, refined)
    write_json(out / "threshold.json", {"bg_threshold": threshold, "calibration_sweep": sweep,
                                        "chosen_on": "calibration images" if sweep else "default"})
    run.mark_done("irn", {"bg_threshold": threshold, "images": len(masks)}, key=key)
    return out, crf_out


# ---- the whole run ----------------------------------------------------------------------------
def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run (or resume) every stage; returns the summary (also `summary.json`), writes `report.html`."""
    cfg.validate()
    ds = open_training_images(cfg)
    if cfg.val_split:  # a split that does not exist is named now, not after the classifier has trained
        open_split(cfg.data, cfg.val_split, background_classes=cfg.background_classes,
                   ignore_classes=cfg.ignore_classes)
    run = RunDir(cfg.out)
    run.save_config(cfg)
    given = given_masks(cfg, run, ds)
    t0 = time.time()
    # Seconds per stage as of the invocation that last *ran* it (a resumed run does not report a skipped
    # stage as taking 0 s): a stage ran when it wrote a done-marker during this call.
    timings_file = run / "stage_seconds.json"
    timings: dict[str, float | None] = read_json(timings_file) if timings_file.exists() else {}

    def timed(name: str, fn, *args):
        t = time.time()
        out = fn(*args)
        if any(m.stat().st_mtime >= t for m in (run / "stages").glob("*.done")):
            timings[name] = round(time.time() - t, 1)
        else:
            timings.setdefault(name, None)  # skipped, and ran before times were kept
        write_json(timings_file, timings)
        return out

    classifier = timed("classify", stage_classify, cfg, run)
    maps_dir = timed("maps", stage_maps, cfg, run, classifier, ds)
    th = timed("calibrate", stage_calibrate, cfg, run, maps_dir, ds, given)
    seeds_dir = timed("seeds", stage_seeds, cfg, run, maps_dir, ds, th)
    stages = [("seed", seeds_dir)]
    current = seeds_dir
    if cfg.refine != "none":  # IRN learns from the CRF's confident regions
        current = timed("crf", stage_crf, cfg, run, maps_dir, ds, th)
        stages.append(("crf", current))
    if cfg.refine.startswith("irn"):
        irn_dir, irn_crf_dir = timed("irn", stage_irn, cfg, run, maps_dir, current, ds, th)
        stages.append(("irn", irn_dir))
        current = irn_dir
        if irn_crf_dir is not None:
            stages.append(("irn_crf", irn_crf_dir))
            current = irn_crf_dir
    inputs = None
    val_by_round = {}
    previous_regions = None
    for r in range(1, cfg.rounds + 1):
        agree_with = previous_regions if cfg.round_seeds == "agreement" and cfg.mining else None
        regions, preds, inputs = timed(f"round{r}", stage_round, cfg, run, r, current, ds, inputs, given, agree_with)
        if agree_with is not None:
            stages.append((f"round{r}_seeds", run / f"round{r}" / "seeds"))
        stages += [(f"round{r}_regions", regions), (f"round{r}_predictions", preds)]
        metrics = run / f"round{r}" / "segmenter" / "metrics" / f"{cfg.val_split}.json"
        if cfg.val_split and metrics.exists():
            val_by_round[r] = read_json(metrics)
        current, previous_regions = preds, regions
    best = pick_best_round(cfg, run, ds, th, given)
    if best.round is not None:
        publish_model(run, best.round)
    summary = summarise(cfg, ds, stages, val_by_round, timings, time.time() - t0, th, best)
    summary["masked_images"] = len(given)
    write_json(run / "summary.json", summary)
    write_pipeline_report(run.path, ds, stages, summary)
    return summary


@dataclass(frozen=True)
class RoundChoice:
    """Which round's segmenter is the run's model, and the scores that chose it."""

    round: int | None
    chosen_on: str
    calibration_miou_by_round: dict[str, float]
    calibration_images: int = 0
    calibration_masks_trained: bool = False  # a label budget's masks: they also trained the segmenters


def score_segmenter(model_dir: Path, ds: SegDataset, device: torch.device | str = "cpu") -> float:
    """mIoU of an exported segmenter on `ds`'s masks, predicted as `frugalseg eval` does (no tag restriction:
    the model a user gets sees no tags)."""
    from frugalseg.evaluation import evaluate

    model, spec, labels = load_export(model_dir)
    return float(evaluate(model, ds, labels, device=device, dims=2, size=spec.get("input_size"),
                          progress=False)["miou"])


def pick_best_round(cfg: PipelineConfig, run: RunDir, ds: SegDataset, th: Thresholds,
                    given: dict[str, np.ndarray]) -> RoundChoice:
    """The round whose segmenter scores best on the calibration images' masks (the training images whose masks
    chose the thresholds; never the validation split), the earliest on a tie; the last round where there are no
    calibration masks. A later round is not always better (its seeds are an earlier segmenter's predictions),
    so the run reports the one it can show is best. Scores are kept per round (round<r>/calibration.json,
    removed with a stale round)."""
    rounds = [r for r in range(1, cfg.rounds + 1) if (run / f"round{r}" / "segmenter" / "model").is_dir()]
    if not rounds:
        return RoundChoice(None, "no rounds", {})
    ids = set(th.calibration_ids) if th else set()
    cal = ds.with_samples([s for s in ds.samples if s.id in ids and s.mask is not None]) if ids else None
    if cal is None or not cal.samples:
        return RoundChoice(rounds[-1], "last round (no calibration masks)", {})
    scores: dict[str, float] = {}
    for r in rounds:
        f = run / f"round{r}" / "calibration.json"
        if f.exists() and read_json(f).get("ids") == sorted(ids):
            scores[str(r)] = read_json(f)["miou"]
            continue
        scores[str(r)] = round(score_segmenter(run / f"round{r}" / "segmenter" / "model", cal,
                                               device_of(cfg.devices)), 6)
        write_json(f, {"miou": scores[str(r)], "ids": sorted(ids), "images": len(cal)})
    best = max(rounds, key=lambda r: (scores[str(r)], -r))
    return RoundChoice(best, "calibration images", scores, len(cal), bool(ids & set(given)))


def publish_model(run: RunDir, r: int) -> Path:
    """The chosen round's segmenter exported as the run's `model/` (what `frugalseg predict RUN/model` and
    `eval` use), copied under a temporary name and renamed, so a reader never sees half a model; kept as is
    when it already is that round's (`model/ROUND`)."""
    out, src = run / "model", run / f"round{r}" / "segmenter" / "model"
    marker = out / "ROUND"
    if marker.exists() and marker.read_text().strip() == str(r):
        return out
    tmp = run / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    (tmp / "ROUND").write_text(f"{r}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def summarise(cfg: PipelineConfig, ds: SegDataset, stages, val_by_round: dict, timings: dict, seconds: float,
              th: Thresholds | None = None, best: RoundChoice | None = None) -> dict[str, Any]:
    calibration = set(th.calibration_ids) if th else set()
    scored = ds.with_samples([s for s in ds.samples if s.id not in calibration])  # never score what chose a threshold
    truth = {s.id: scored.read_mask(s) for s in scored.samples} if has_ground_truth(scored) else None  # read once
    # The calibration images chose only the threshold; the stages after it are scored on them too, apart
    # (their masks were not used to make anything downstream), as a second, smaller check.
    held = ds.with_samples([s for s in ds.samples if s.id in calibration]) if calibration else None
    held_truth = {s.id: held.read_mask(s) for s in held.samples} if held is not None else None
    rows = []
    for name, folder in stages:
        score = score_masks(folder, scored, truth)
        rows.append({"stage": name, "folder": str(folder), "split": cfg.train_split,
                     "miou": None if score is None else score["miou"],
                     "miou_labelled": None if score is None else score["miou_labelled"],
                     "labelled_fraction": None if score is None else score["labelled_fraction"]})
        if held is not None:
            rows[-1]["miou_calibration_images"] = evaluate_pseudo_masks(folder, held, save=False,
                                                                        truth=held_truth)["miou"]
    # String keys, as summary.json has them once written: a caller reads the returned summary and the file alike.
    val = {str(r): {"miou": m.get("miou"), "per_class": {k: v.get("iou") for k, v in m.get("per_class", {}).items()}}
           for r, m in sorted(val_by_round.items())}
    final_round = best.round if best is not None and best.round is not None else (max(val_by_round) if val else None)
    final = val[str(final_round)]["miou"] if val and str(final_round) in val else None
    last = val[str(max(val_by_round))]["miou"] if val else None
    thresholds = None if th is None else {"seed": th.seed, "fg": th.fg, "bg": th.bg,
                                          "calibration_images": len(calibration)}
    return {"config": dataclasses.asdict(cfg), "train_images": len(ds), "scored_images": len(scored),
            "thresholds": thresholds, "stages": rows, "val_by_round": val, "final_val_miou": final,
            "final_round": final_round, "last_round_val_miou": last,
            "final_model": None if final_round is None else "model",
            "round_choice": None if best is None else dataclasses.asdict(best),
            "val_split": cfg.val_split, "stage_seconds": timings, "seconds": round(seconds, 1)}
