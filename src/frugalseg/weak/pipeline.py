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

Each stage's done-marker records the settings it depends on (its own and everything upstream); a stage
whose marker holds other settings is redone with its outputs removed, and so is everything after it, so
changing e.g. a threshold and re-running the same `--out` never mixes stale stages with new ones.
"""

from __future__ import annotations

import dataclasses
import html
import shutil
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from frugalseg.data.io import read_label_png, write_label_png
from frugalseg.data.labels import IGNORE_INDEX
from frugalseg.errors import ConfigError, DataError
from frugalseg.runs import RunDir, write_json

log = logging.getLogger(__name__)

SEED_METHODS = ("cam", "advcam", "prm", "group")
IRN_SEED_THRESHOLD = 0.15


@dataclass
class PipelineConfig:
    data: str = ""
    out: str = "runs/tags"
    train_split: str = "train"  # tags of these images train everything; their masks are only scored
    val_split: str | None = "val"  # the final model is scored here
    background_classes: list[str] | None = None
    ignore_classes: list[str] | None = None
    limit: int | None = None  # only the first N training images (a fixed, stated subset for CPU runs)
    mask_fraction: float | None = None  # masks + tags: this fraction of training images keeps its masks
    calibration_fraction: float | None = None  # masks of this fraction of training images choose the threshold
    budget_seed: int = 0
    seeds: Literal["cam", "advcam", "prm", "group"] = "cam"
    classifier: str | None = None  # an existing `frugalseg classify` run to use instead of training one
    maps_from: str | None = None  # another run's maps folder (same classifier, method, images) instead of computing maps
    refine: Literal["crf", "none"] = "crf"
    rounds: int = 3  # MCOF iterations (bottom-up mining + top-down segmenter)
    saliency_rounds: int = 1  # MCOF: the Bayesian saliency refinement in the first round only
    # classifier and maps
    classifier_epochs: int = 8
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    steps: int = 27  # AdvCAM
    restriction: float = 7.0  # AdvCAM lambda
    group_size: int = 3
    group_epochs: int = 6
    # CRF pseudo-masks
    fg_threshold: float = 0.35
    bg_threshold: float = 0.15
    crf_workers: int | None = None
    # mining
    superpixel_method: Literal["felzenszwalb", "slic"] = "felzenszwalb"
    min_coverage: float = 0.5
    mining: bool = True  # False: each round's segmenter trains on its seeds as they are (the no-mining ablation)
    expand_only: bool = False  # True: mining only fills unknown pixels; False (MCOF): the region classifier relabels every superpixel
    mining_confidence: float = 0.5  # region-classifier probability needed to fill an unknown region
    # Inverse-frequency class weights in the region classifier. Off: weighting background down made the miner
    # grow objects into background in diagnostic runs on msrc-objects' training images (at two threshold
    # settings); on the tags_to_model benchmark's calibration images the two were level.
    region_class_balanced: bool = False
    prediction_confidence: float = 0.5  # segmenter pixels below this (within the tags) are unknown next round
    # rounds >= 2 start from: the last segmenter's predictions (MCOF), or the pixels where those predictions
    # agree with the last round's mined regions, the disagreements left unknown for the region classifier
    round_seeds: Literal["predictions", "agreement"] = "agreement"
    # rounds >= 2: the segmenter continues from the previous round's model, or starts again from ImageNet
    segmenter_init: Literal["previous", "imagenet"] = "previous"
    # learning rate of a segmenter that continues from the previous round's, as a multiple of `lr`
    continue_lr_mult: float = 1.0
    # segmenter
    seg_arch: Literal["ocr", "fcn"] = "ocr"
    seg_epochs: int = 30
    crop_size: int = 256
    batch_size: int = 8
    lr: float = 0.01
    # machinery
    seed: int = 0
    precision: str = "auto"
    num_workers: int = 0
    progress: bool = True

    def validate(self) -> "PipelineConfig":
        if not self.data:
            raise ConfigError("No dataset given: pass --data FOLDER or a task name such as msrc-objects.")
        if self.seeds not in SEED_METHODS:
            raise ConfigError(f"Unknown seeds '{self.seeds}'; choose one of {SEED_METHODS}.")
        if self.rounds < 0:
            raise ConfigError(f"rounds must be >= 0, got {self.rounds}.")
        if not self.continue_lr_mult > 0:
            raise ConfigError(f"continue_lr_mult must be > 0, got {self.continue_lr_mult}.")
        if not 0 <= self.bg_threshold <= self.fg_threshold <= 1:
            raise ConfigError("Need 0 <= bg_threshold <= fg_threshold <= 1.")
        if self.mask_fraction is not None and not 0 < self.mask_fraction <= 1:
            raise ConfigError(f"mask_fraction must be in (0, 1], got {self.mask_fraction}.")
        if self.calibration_fraction is not None and not 0 < self.calibration_fraction < 1:
            raise ConfigError(f"calibration_fraction must be in (0, 1) (the other images are scored), "
                              f"got {self.calibration_fraction}.")
        if self.limit is not None and self.limit < 2:
            raise ConfigError("limit must leave at least 2 training images.")
        return self


# ---- what each stage depends on ---------------------------------------------------------------
_CLASSIFY_FIELDS = ("data", "train_split", "background_classes", "ignore_classes", "classifier", "classifier_epochs",
                    "seed", "precision")
_MAPS_FIELDS = ("seeds", "maps_from", "limit", "scales", "steps", "restriction", "group_size", "group_epochs")
_CALIBRATE_FIELDS = ("calibration_fraction", "budget_seed", "mask_fraction", "fg_threshold", "bg_threshold")
_CRF_FIELDS = ("refine", "fg_threshold", "bg_threshold")
_ROUND_FIELDS = ("mask_fraction", "superpixel_method", "min_coverage", "mining", "expand_only", "mining_confidence",
                 "region_class_balanced", "seg_arch", "seg_epochs", "crop_size", "batch_size",
                 "lr")  # and whether rounds 1..r used saliency (round_key), rather than saliency_rounds itself
_STAGE_FIELDS = {"classify": _CLASSIFY_FIELDS}
_STAGE_FIELDS["group"] = _STAGE_FIELDS["classify"] + ("limit", "group_size", "group_epochs")  # not the map scales
_STAGE_FIELDS["maps"] = _STAGE_FIELDS["classify"] + _MAPS_FIELDS
_STAGE_FIELDS["calibrate"] = _STAGE_FIELDS["maps"] + _CALIBRATE_FIELDS
_STAGE_FIELDS["seeds"] = _STAGE_FIELDS["calibrate"]
_STAGE_FIELDS["crf"] = _STAGE_FIELDS["calibrate"] + _CRF_FIELDS
_STAGE_FIELDS["round"] = _STAGE_FIELDS["crf"] + _ROUND_FIELDS


# Fields earlier versions put in the keys of stages that do not use them (the round-1 regions and segmenter and
# `prediction_confidence`; every stage and `budget_seed` when nothing is drawn): a marker that still holds one
# matches a key without it, so a finished run is not redone for them.
RETIRED_KEY_FIELDS = ("prediction_confidence", "budget_seed")


def stage_key(cfg: PipelineConfig, stage: str, **extra: Any) -> dict[str, Any]:
    """The settings a stage's output depends on: its own and every upstream stage's (so a change upstream
    makes every later stage stale too). The PRM flag of the classifier is part of `seeds`."""
    key = {f: getattr(cfg, f) for f in _STAGE_FIELDS[stage]}
    if "budget_seed" in key and cfg.calibration_fraction is None and cfg.mask_fraction is None:
        del key["budget_seed"]  # it draws the calibration images and the label budget; with neither, nothing
    return {**key, **extra}


def uses_saliency(cfg: PipelineConfig, r: int, ds) -> bool:
    return r <= cfg.saliency_rounds and ds.labels.background is not None


def round_key(cfg: PipelineConfig, r: int, ds) -> dict[str, Any]:
    """Round r depends on the rounds before it, so its key lists which of rounds 1..r refined with saliency
    (raising `saliency_rounds` from 1 to 2 leaves round 1 current and redoes round 2 onwards)."""
    # round 1 starts from the CRF and from ImageNet either way
    extra = {"round_seeds": [cfg.round_seeds] * (r - 1), "segmenter_init": [cfg.segmenter_init] * (r - 1),
             "prediction_confidence": cfg.prediction_confidence} if r > 1 else {}  # earlier rounds' predictions
    if r > 1 and cfg.segmenter_init == "previous" and cfg.continue_lr_mult != 1.0:  # old keys stay valid at 1.0
        extra["continue_lr_mult"] = [cfg.continue_lr_mult] * (r - 1)
    return stage_key(cfg, "round", round=r, saliency=[uses_saliency(cfg, i, ds) for i in range(1, r + 1)], **extra)


def agreement(predictions: dict[str, np.ndarray], regions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Top-down meets bottom-up: a pixel keeps its label where the segmenter's prediction and the mined region
    say the same class, and is unknown (255) where they disagree, for the next region classifier to decide."""
    out = {}
    for sid, pred in predictions.items():
        if sid not in regions:
            raise DataError(f"no mined region mask for {sid} to compare its prediction with.")
        out[sid] = np.where(pred == regions[sid], pred, IGNORE_INDEX).astype(np.uint8)
    return out


def is_current(run: RunDir, stage: str, key: dict[str, Any], *outputs: Path) -> bool:
    """True when `stage` finished with `key`. Otherwise the caller is about to run it: outputs made with other
    settings (a finished stage's, or those a killed run left while working with other settings) are removed
    with the marker, and `stages/<stage>.started` records `key`, so partial outputs are resumed from only
    by a run with the same settings."""
    if run.stage_done(stage, key, RETIRED_KEY_FIELDS):
        return True
    if run.stage_made_with_other_settings(stage, key, RETIRED_KEY_FIELDS):
        log.info("stage %s of %s was made with other settings; redoing it", stage, run.path)
        for out in outputs:
            shutil.rmtree(out, ignore_errors=True)
        run.clear_stage(stage)
    run.mark_started(stage, key)
    return False


# ---- data -------------------------------------------------------------------------------------
def open_training_images(cfg: PipelineConfig):
    """The training split (optionally its first `limit` images), with a clear error when it has no tags."""
    from frugalseg.config import TrainConfig
    from frugalseg.supervised import open_with_classes

    ds = open_with_classes(TrainConfig(data=cfg.data, background_classes=cfg.background_classes,
                                       ignore_classes=cfg.ignore_classes), cfg.train_split)
    if cfg.limit is not None:
        ds = ds.with_samples(ds.samples[: cfg.limit])
    tagged = []
    for s in ds.samples:
        if s.tags is None and s.mask is None:
            continue
        if ds.tags_of(s):
            tagged.append(s)
    if not tagged:
        raise DataError(
            f"{ds.name}: no image of split '{cfg.train_split}' has image-level tags (give a tags.csv, or masks "
            "to derive them from); learning from tags needs at least one tagged image."
        )
    return ds.with_samples(tagged)


def given_masks(cfg: PipelineConfig, run: RunDir, ds) -> dict[str, np.ndarray]:
    """Masks + tags (the semi-supervised setting of AdvCAM): the label budget's masked training images keep
    their masks, which then replace the pseudo-masks of those images in every round (mining learns from
    them too). The budget is drawn over the images this run uses (`ds`: the training split, or its first
    `limit` images), as `frugalseg train --mask-fraction` draws it over its split; `budget.json` lists the
    masked ids, so a masks-only baseline can train on exactly the same images (`--labelled-ids`)."""
    if cfg.mask_fraction is None:
        return {}
    from frugalseg.data.budget import LabelBudget, apply_budget, budget_manifest

    budget = LabelBudget(mask_fraction=cfg.mask_fraction, rest="tags", seed=cfg.budget_seed)
    budgeted = apply_budget(ds, budget)
    write_json(run / "budget.json", budget_manifest(budgeted, budget))
    return {s.id: ds.read_mask(s) for s in budgeted.samples if s.supervision == "mask"}


def has_ground_truth(ds) -> bool:
    return all(s.mask is not None for s in ds.samples)


def mask_file(folder: Path, sample_id: str) -> Path:
    from frugalseg.weak.maps_io import safe_name

    return folder / f"{safe_name(sample_id)}.png"


def write_masks(folder: Path, ds, masks: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for sid, m in masks.items():
        write_label_png(mask_file(folder, sid), m.astype(np.uint8), ds.labels.palette_bytes())


def read_masks(folder: Path, ds) -> dict[str, np.ndarray]:
    return {s.id: read_label_png(mask_file(folder, s.id)) for s in ds.samples if mask_file(folder, s.id).exists()}


def score_masks(folder: Path, ds, truth: dict[str, np.ndarray] | None = None) -> dict[str, Any] | None:
    """Pseudo-mask quality against the training images' own masks (report only), IRN's convention."""
    if not has_ground_truth(ds):
        return None
    from frugalseg.weak.crf import evaluate_pseudo_masks

    return evaluate_pseudo_masks(folder, ds, save=True, truth=truth)


# ---- stages -----------------------------------------------------------------------------------
def stage_classify(cfg: PipelineConfig, run: RunDir) -> Path:
    from frugalseg.weak.classify import ClassifyConfig, train_classifier

    if cfg.classifier:
        if not (Path(cfg.classifier) / "model").is_dir():
            raise ConfigError(f"--classifier {cfg.classifier}: not a classify run directory (no model/ folder).")
        return Path(cfg.classifier)
    out = run / "classifier"
    key = stage_key(cfg, "classify", prm=cfg.seeds == "prm")  # PRM classifiers train with peak stimulation
    if not is_current(run, "classify", key, out):
        ccfg = ClassifyConfig(data=cfg.data, out=str(out), train_split=cfg.train_split, eval_split=cfg.val_split,
                              background_classes=cfg.background_classes, ignore_classes=cfg.ignore_classes,
                              epochs=cfg.classifier_epochs, peak_stimulation=cfg.seeds == "prm", seed=cfg.seed,
                              precision=cfg.precision, num_workers=cfg.num_workers, progress=cfg.progress,
                              resume=(out / "checkpoints" / "last.ckpt").exists())
        res = train_classifier(ccfg)
        run.mark_done("classify", {"eval": res.get("eval")}, key=key)
    return out


def reused_maps(cfg: PipelineConfig, classifier: Path, ds) -> Path:
    """`maps_from`: maps another run already made, checked to come from the same classifier and method and to
    cover every training image (runs that differ only after the maps, e.g. tags-only vs masks + tags)."""
    from frugalseg.weak.maps_io import maps_path

    folder = Path(cfg.maps_from)
    meta_file = folder / "maps.json"
    if not meta_file.exists():
        raise ConfigError(f"--maps-from {folder}: no maps.json there (give the cams/ folder of a finished run).")
    meta = json.loads(meta_file.read_text())
    if meta.get("method") != cfg.seeds:
        raise ConfigError(f"--maps-from {folder}: its maps are '{meta.get('method')}', this run asks for '{cfg.seeds}'.")
    if Path(meta.get("classifier", "")).resolve() != Path(classifier).resolve():
        raise ConfigError(f"--maps-from {folder}: made with classifier {meta.get('classifier')}, this run uses "
                          f"{classifier} (pass the same --classifier).")
    missing = [s.id for s in ds.samples if not maps_path(folder, s.id).exists()]
    if missing:
        raise ConfigError(f"--maps-from {folder}: no maps for {len(missing)} training images, e.g. {missing[:3]}.")
    return folder


def stage_maps(cfg: PipelineConfig, run: RunDir, classifier: Path, ds) -> Path:
    if cfg.maps_from:
        return reused_maps(cfg, classifier, ds)
    maps_dir = run / "cams"  # maps.json, maps/<id>.npz, gallery.html
    key = stage_key(cfg, "maps")
    if is_current(run, "maps", key, maps_dir):
        return maps_dir
    limit = cfg.limit
    if cfg.seeds == "group":
        from frugalseg.weak.group import GroupConfig, GroupMapsConfig, make_group_maps, train_group_classifier

        gout = run / "group"
        group_key = stage_key(cfg, "group")
        if not is_current(run, "group", group_key, gout):
            train_group_classifier(GroupConfig(
                data=cfg.data, out=str(gout), train_split=cfg.train_split, limit=limit,
                background_classes=cfg.background_classes, ignore_classes=cfg.ignore_classes,
                init_classifier=str(classifier), group_size=cfg.group_size, epochs=cfg.group_epochs,
                lr_steps=tuple(e for e in (cfg.group_epochs // 3, 2 * cfg.group_epochs // 3) if e > 0),
                seed=cfg.seed, precision=cfg.precision, num_workers=cfg.num_workers, progress=cfg.progress,
                resume=(gout / "checkpoints" / "last.ckpt").exists()))
            run.mark_done("group", key=group_key)
        make_group_maps(GroupMapsConfig(classifier=str(gout), out=str(maps_dir), data=cfg.data, split=cfg.train_split,
                                        scales=tuple(cfg.scales), limit=limit, seed=cfg.seed, progress=cfg.progress))
    else:
        from frugalseg.weak.maps_stage import MapsConfig, make_maps

        make_maps(MapsConfig(classifier=str(classifier), out=str(maps_dir), method=cfg.seeds, data=cfg.data,
                             split=cfg.train_split, scales=tuple(cfg.scales), limit=limit, steps=cfg.steps,
                             restriction=cfg.restriction, progress=cfg.progress))
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


def stage_calibrate(cfg: PipelineConfig, run: RunDir, maps_dir: Path, ds,
                    given: dict[str, np.ndarray] | None = None) -> Thresholds:
    """The seed/CRF thresholds: the configured ones, or (with `calibration_fraction`) the seed threshold with
    the best seed mIoU on the masks of a seeded random draw of that fraction of the training images, the CRF
    planes then at that threshold and at it minus the configured gap (fg_threshold - bg_threshold, AdvCAM's
    0.2). The sweep is kept in calibration.json, next to the ids that chose it. With a label budget
    (`mask_fraction`, `given`) the draw is among the budget's masked images, so calibration spends no mask
    beyond the budget."""
    from frugalseg.weak.maps_stage import iter_seed_items
    from frugalseg.weak.seeds import choose_threshold, evaluate_seeds, sweep_table

    default = Thresholds(IRN_SEED_THRESHOLD, cfg.fg_threshold, cfg.bg_threshold)
    if cfg.calibration_fraction is None:
        return default
    path = run / "calibration.json"
    key = stage_key(cfg, "calibrate")
    if is_current(run, "calibrate", key) and path.exists():
        c = json.loads(path.read_text())
        return Thresholds(c["seed_threshold"], c["fg_threshold"], c["bg_threshold"], tuple(c["ids"]))
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
    results = evaluate_seeds(iter_seed_items(maps_dir, chosen), ds.labels.num_classes, ds.labels.names,
                             ds.labels.background, CALIBRATION_SWEEP, split=f"{cfg.train_split} (calibration images)")
    t = choose_threshold(results)
    gap = cfg.fg_threshold - cfg.bg_threshold
    out = Thresholds(t, t, round(max(0.0, t - gap), 4), tuple(s.id for s in chosen.samples))
    write_json(path, {"seed_threshold": out.seed, "fg_threshold": out.fg, "bg_threshold": out.bg,
                      "gap": gap, "ids": list(out.calibration_ids), "sweep": sweep_table(results),
                      "note": "chosen on these training images' masks; pipeline stages are scored on the others"})
    run.mark_done("calibrate", {"seed_threshold": t, "images": n}, key=key)
    return out


def stage_seeds(cfg: PipelineConfig, run: RunDir, maps_dir: Path, ds, th: Thresholds) -> Path:
    """Seeds at the background threshold, written as PNGs (the report shows them; round 1 uses them if no CRF)."""
    from frugalseg.weak.maps_io import load_maps, maps_path
    from frugalseg.weak.seeds import seed_from_maps

    out = run / "seeds"
    key = stage_key(cfg, "seeds")
    if not is_current(run, "seeds", key, out):
        masks = {}
        for s in ds.samples:
            m = load_maps(maps_path(maps_dir, s.id))
            masks[s.id] = seed_from_maps(m.high_res, m.keys, th.seed, ds.labels.background)
        write_masks(out, ds, masks)
        run.mark_done("seeds", {"threshold": th.seed, "images": len(masks)}, key=key)
    return out


def stage_crf(cfg: PipelineConfig, run: RunDir, maps_dir: Path, ds, th: Thresholds) -> Path:
    from frugalseg.weak.crf import refine_dataset

    out = run / "crf"
    key = stage_key(cfg, "crf")
    if not is_current(run, "crf", key, out):
        refine_dataset(maps_dir, ds, out, workers=cfg.crf_workers, fg_threshold=th.fg,
                       bg_threshold=th.bg, progress=cfg.progress)
        run.mark_done("crf", {"fg_threshold": th.fg, "bg_threshold": th.bg}, key=key)
    return out


class MiningInputs:
    """Images, frozen ImageNet features, superpixels and saliency of the training images, computed once."""

    def __init__(self, cfg: PipelineConfig, ds):
        from frugalseg.weak.mining import backbone_features, superpixels
        from frugalseg.weak.saliency import manifold_ranking_saliency

        t0 = time.time()
        self.ids = [s.id for s in ds.samples]
        self.images = [ds.read_image(s) for s in ds.samples]
        self.tags = [sorted(ds.tags_of(s)) for s in ds.samples]
        self.features = backbone_features(self.images)
        self.superpixels = [superpixels(im, method=cfg.superpixel_method) for im in self.images]
        self.saliency = [manifold_ranking_saliency(im) for im in self.images]
        log.info("mining inputs for %d images in %.0f s", len(self.images), time.time() - t0)


def stage_round(cfg: PipelineConfig, run: RunDir, r: int, seeds_dir: Path, ds, inputs: "MiningInputs | None",
                given: dict[str, np.ndarray] | None = None,
                agree_with: Path | None = None) -> tuple[Path, Path, "MiningInputs | None"]:
    """One MCOF round: regions mined from `seeds_dir` (with `agree_with`, from the pixels where its masks and
    those of `seeds_dir` agree, written to round<r>/seeds), a segmenter trained on them, its tag-restricted
    predictions on the training images (the next round's seeds)."""
    from frugalseg.supervised import train

    rdir = run / f"round{r}"
    regions_dir, preds_dir = rdir / "regions", rdir / "predictions"
    key = round_key(cfg, r, ds)
    # stale regions make the round's segmenter (and its resumable checkpoint) stale too: redo the round (the
    # predictions' key holds the round's, so their marker is stale as well)
    is_current(run, f"round{r}_regions", key, rdir)
    if not run.stage_done(f"round{r}_regions") and not cfg.mining:
        write_masks(regions_dir, ds, {**read_masks(seeds_dir, ds), **(given or {})})
        run.mark_done(f"round{r}_regions", {"mining": False}, key=key)
    if not run.stage_done(f"round{r}_regions"):
        from frugalseg.weak.mining import mine_round

        inputs = inputs or MiningInputs(cfg, ds)
        seeds = read_masks(seeds_dir, ds)
        if agree_with is not None:
            seeds = agreement(seeds, read_masks(agree_with, ds))
            write_masks(rdir / "seeds", ds, seeds)
        seeds = {**seeds, **(given or {})}
        missing = [i for i in inputs.ids if i not in seeds]
        if missing:
            raise DataError(f"{seeds_dir}: no seed mask for {missing[:5]} ({len(missing)} images).")
        regions, stats = mine_round(
            inputs.images, [seeds[i] for i in inputs.ids], inputs.tags, inputs.features,
            num_classes=ds.labels.num_classes, background_index=ds.labels.background,
            use_saliency=uses_saliency(cfg, r, ds),
            superpixel_maps=inputs.superpixels, saliency_maps=inputs.saliency,
            min_coverage=cfg.min_coverage, min_confidence=cfg.mining_confidence, keep_seeds=cfg.expand_only,
            classifier_options={"class_balanced": cfg.region_class_balanced}, seed=cfg.seed + r)
        write_masks(regions_dir, ds, {**dict(zip(inputs.ids, regions)), **(given or {})})
        write_json(rdir / "mining_stats.json", stats)
        run.mark_done(f"round{r}_regions", key=key)
    init = run / f"round{r - 1}" / "segmenter" / "model" if r > 1 and cfg.segmenter_init == "previous" else None
    lr = cfg.lr * cfg.continue_lr_mult if init else cfg.lr
    train(segmenter_config(cfg, rdir / "segmenter", mask_dir=str(regions_dir), init_from=init and str(init), lr=lr))
    preds_key = {**key, "prediction_confidence": cfg.prediction_confidence}  # this round's own threshold
    if not is_current(run, f"round{r}_predictions", preds_key, preds_dir):
        predict_within_tags(rdir / "segmenter" / "model", ds, preds_dir, cfg.prediction_confidence)
        run.mark_done(f"round{r}_predictions", key=preds_key)
    return regions_dir, preds_dir, inputs


def segmenter_config(cfg: PipelineConfig, out: Path, **overrides):
    """The segmentation network of a round (OCR head by default), trained on `mask_dir`'s masks; resumes
    from its last checkpoint. Benchmarks build their masks-only baseline from it (same schedule)."""
    from frugalseg.config import TrainConfig

    fields = dict(data=cfg.data, out=str(out), train_split=cfg.train_split, val_split=cfg.val_split,
                  background_classes=cfg.background_classes, ignore_classes=cfg.ignore_classes,
                  arch=cfg.seg_arch, epochs=cfg.seg_epochs, crop_size=cfg.crop_size, batch_size=cfg.batch_size,
                  lr=cfg.lr, seed=cfg.seed, precision=cfg.precision, num_workers=cfg.num_workers,
                  progress=cfg.progress, val_every=10_000,
                  # an interrupted segmenter resumes; a finished one is left as it is (not reloaded and re-exported)
                  resume=(out / "checkpoints" / "last.ckpt").exists() and not (out / "stages" / "train.done").exists())
    return TrainConfig(**{**fields, **overrides})


@torch.no_grad()
def predict_within_tags(model_dir: Path, ds, out: Path, min_confidence: float = 0.0) -> None:
    """The segmenter's labels on the training images, with classes outside each image's tags forbidden
    (MCOF: 'predictions restricted to image labels' seed the next round). Pixels whose probability,
    renormalised over the allowed classes, is below `min_confidence` become unknown (255) for the miner."""
    from frugalseg.export import load_export
    from frugalseg.supervised import _device, predict_images

    model, spec, labels = load_export(model_dir)
    device = _device()
    model = model.to(device).eval()
    masks = {}
    for s in ds.samples:
        image = torch.from_numpy(np.array(ds.read_image(s))).permute(2, 0, 1).float().div(255)
        probs = predict_images(model, image[None].to(device), spec.get("input_size"))[0]
        allowed = torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)
        allowed[list(ds.tags_of(s))] = True
        if labels.background is not None:
            allowed[labels.background] = True
        probs = probs.masked_fill(~allowed[:, None, None], 0)
        conf, label = (probs / probs.sum(0, keepdim=True).clamp_min(1e-8)).max(0)
        label[conf < min_confidence] = labels.ignore_index
        masks[s.id] = label.to(torch.uint8).cpu().numpy()
    write_masks(out, ds, masks)


# ---- the whole run ----------------------------------------------------------------------------
def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Run (or resume) every stage; returns the summary (also `summary.json`), writes `report.html`."""
    cfg.validate()
    run = RunDir(cfg.out)
    run.save_config(cfg)
    ds = open_training_images(cfg)
    given = given_masks(cfg, run, ds)
    t0 = time.time()
    # Seconds per stage as of the invocation that last *ran* it (a resumed run does not report a skipped
    # stage as taking 0 s): a stage ran when it wrote a done-marker during this call.
    timings_file = run / "stage_seconds.json"
    timings: dict[str, float] = json.loads(timings_file.read_text()) if timings_file.exists() else {}

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
    if cfg.refine == "crf":
        current = timed("crf", stage_crf, cfg, run, maps_dir, ds, th)
        stages.append(("crf", current))
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
            val_by_round[r] = json.loads(metrics.read_text())
        current, previous_regions = preds, regions
    summary = summarise(cfg, ds, stages, val_by_round, timings, time.time() - t0, th)
    summary["masked_images"] = len(given)
    write_json(run / "summary.json", summary)
    write_pipeline_report(run.path, ds, stages, summary)
    return summary


def summarise(cfg: PipelineConfig, ds, stages, val_by_round: dict, timings: dict, seconds: float,
              th: Thresholds | None = None) -> dict[str, Any]:
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
            from frugalseg.weak.crf import evaluate_pseudo_masks

            rows[-1]["miou_calibration_images"] = evaluate_pseudo_masks(folder, held, save=False,
                                                                        truth=held_truth)["miou"]
    # String keys, as summary.json has them once written: a caller reads the returned summary and the file alike.
    val = {str(r): {"miou": m.get("miou"), "per_class": {k: v.get("iou") for k, v in m.get("per_class", {}).items()}}
           for r, m in sorted(val_by_round.items())}
    final = val[str(max(val_by_round))]["miou"] if val else None
    thresholds = None if th is None else {"seed": th.seed, "fg": th.fg, "bg": th.bg,
                                          "calibration_images": len(calibration)}
    return {"config": dataclasses.asdict(cfg), "train_images": len(ds), "scored_images": len(scored),
            "thresholds": thresholds, "stages": rows, "val_by_round": val, "final_val_miou": final,
            "val_split": cfg.val_split, "stage_seconds": timings, "seconds": round(seconds, 1)}


def write_pipeline_report(run_dir: Path, ds, stages, summary: dict, max_images: int = 16) -> Path:
    """Seeds, pseudo-masks and predictions side by side per image, and the per-stage mIoU table."""
    from frugalseg.data.io import atomic_path, write_rgb
    from frugalseg.report.overlays import colourise, panel

    assets = run_dir / "report_assets"
    assets.mkdir(exist_ok=True)
    rows_html = []
    for s in ds.samples[:max_images]:
        image = ds.read_image(s)
        tiles, titles = [image], ["image"]
        if s.mask is not None:
            tiles.append(colourise(ds.read_mask(s), ds.labels))
            titles.append("truth")
        for name, folder in stages:
            f = mask_file(Path(folder), s.id)
            if f.exists():
                tiles.append(colourise(read_label_png(f), ds.labels))
                titles.append(name.replace("_", " "))
        path = assets / f"{mask_file(Path(''), s.id).stem}.jpg"
        write_rgb(path, panel(tiles, titles))
        rows_html.append(f'<div class="row"><p>{html.escape(s.id)}</p><img src="report_assets/{path.name}"></div>')
    table = "".join(
        f"<tr><td>{html.escape(r['stage'])}</td><td>{r['split']}</td><td>{_fmt(r['miou'])}</td>"
        f"<td>{_fmt(r['miou_labelled'])}</td><td>{_fmt(r['labelled_fraction'])}</td></tr>" for r in summary["stages"])
    val_rows = "".join(f"<tr><td>round {r}</td><td>{summary['val_split']}</td><td>{_fmt(v['miou'])}</td></tr>"
                       for r, v in summary["val_by_round"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>frugalseg run: tags to model</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
.row img{{max-width:100%}}.row p{{margin:.8em 0 .2em;font-weight:bold}}</style></head><body>
<h1>From tags to a segmentation model</h1>
<p>{summary['train_images']} training images ({html.escape(str(summary['config']['train_split']))}), seeds from
<b>{summary['config']['seeds']}</b>, refinement {summary['config']['refine']}, {summary['config']['rounds']} mining rounds;
{summary['seconds']:.0f} s. Training-image masks are used only to score the stages below{_calibration_note(summary)}.</p>
<h2>Pseudo-mask mIoU per stage (training images)</h2>
<table><tr><th>stage</th><th>split</th><th>mIoU (ignore = background)</th><th>mIoU of labelled pixels</th><th>labelled fraction</th></tr>{table}</table>
<h2>Segmenter per round</h2><table><tr><th>round</th><th>split</th><th>mIoU</th></tr>{val_rows}</table>
<h2>Per image</h2>{''.join(rows_html)}</body></html>"""
    out = run_dir / "report.html"
    with atomic_path(out) as tmp:
        tmp.write_text(page)
    return out


def _calibration_note(summary: dict) -> str:
    th = summary.get("thresholds") or {}
    if not th.get("calibration_images"):
        return ", never to choose anything"
    return (f" ({summary['scored_images']} images), except {th['calibration_images']} calibration images whose masks "
            f"chose the background threshold {th['seed']} (CRF planes {th['fg']} / {th['bg']}) and which are not scored")


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.4f}"
