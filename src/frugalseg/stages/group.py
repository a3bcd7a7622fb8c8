"""Stage `group`: train the group-wise co-attention classifier (Group-WSSS), and make its class maps, one
.npz per image of a split, in the layout `cams` writes (so `eval-seeds`, seeds and refinement read them).

    train_group_classifier(GroupConfig(...))     train (Lightning, checkpoint per epoch, resumable)
    make_group_maps(GroupMapsConfig(...))        maps of every tagged image, each the anchor of its group

The method (groups, crops, jitter, the network, `group_maps`) is `frugalseg.weak.group`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from tqdm.auto import tqdm

from frugalseg.data import open_splits
from frugalseg.data.io import write_json
from frugalseg.data.torchdata import shuffled_loader
from frugalseg.data.transforms import to_tensor_image
from frugalseg.errors import ConfigError, DataError
from frugalseg.report.gallery import write_maps_gallery
from frugalseg.runs import RunDir
from frugalseg.stages.classify import (
    BACKBONE_HELP,
    FREEZE_BN_HELP,
    FROZEN_STAGES_HELP,
    OUTPUT_STRIDE_HELP,
    PRETRAINED_HELP,
    ClassifyConfig,
)
from frugalseg.stages.engine import GroupModule, fit_resumable
from frugalseg.stages.maps import GALLERY_IMAGES_HELP, GALLERY_THRESHOLD_HELP, open_maps_dataset, saved_data_options
from frugalseg.stages.options import (
    MAX_SEED,
    RunOptions,
    ascending,
    check_common,
    device_of,
    minus_one_or_positive,
    option,
)
from frugalseg.stages.run_guard import claim_run_dir
from frugalseg.weak.cam import finish_maps
from frugalseg.weak.classify import load_classifier, save_classifier
from frugalseg.weak.group import (
    GroupImages,
    build_group_net,
    group_maps,
    group_spec,
    load_group_classifier,
    sample_groups,
)
from frugalseg.weak.maps_io import maps_path, save_maps
from frugalseg.weak.seeds import IRN_THRESHOLD

log = logging.getLogger(__name__)


@dataclass
class GroupConfig(RunOptions):
    out: str = option("runs/group", "Run directory for the group model (config, checkpoints, model/).")
    train_split: str = option("train", "Split(s) whose tags train the group model; '+' joins splits (train+val).")
    limit: int | None = option(None, "Only the first N tagged images of the split (a fixed, stated subset).", ge=1)
    init_classifier: str | None = option(None, "A classify run: the backbone and class-map conv start from it.")
    backbone: str = option("tf_efficientnet_lite0", BACKBONE_HELP + " Used when --init-classifier is not given.")
    pretrained: bool | str = option(True, PRETRAINED_HELP)
    output_stride: int = option(16, OUTPUT_STRIDE_HELP, choices=(8, 16, 32))
    frozen_stages: int = option(3, FROZEN_STAGES_HELP, ge=0)
    freeze_bn: bool = option(True, FREEZE_BN_HELP)
    # group graph
    group_size: int = option(3, "Images per group, anchor included (reference code: 3).", ge=2)
    rounds: int = option(3, "Message-passing rounds of the group graph (T).", ge=1)
    proj_channels: int = option(10, "Channels of the co-attention projections (d).", ge=1)
    drop_rate: float = option(0.8, "Graph dropout rate.", ge=0, le=1)
    drop_th: float = option(0.7, "Graph dropout threshold.", ge=0, le=1)
    gdl_in_eval: bool = option(False, "Graph dropout at inference too, as the reference (random maps).")
    pre_weight: float = option(0.4, "Weight of the pre-graph loss.", ge=0)
    # optimisation (reference: SGD nesterov, lr 1e-3, x2 biases, x10 new layers, 15 epochs, x0.1 at 5 and 10)
    epochs: int = option(15, "Training epochs (-1: no epoch limit, with --max-steps).", check=minus_one_or_positive)
    max_steps: int = option(-1, "Stop after this many optimiser steps (-1: the epochs decide).",
                            check=minus_one_or_positive)
    batch_size: int = option(1, "Groups per step (reference: 1).", ge=1)
    lr: float = option(1e-3, "Learning rate of the backbone (SGD).", gt=0)
    new_lr_mult: float = option(10.0, "Learning rate of the new layers, as a multiple of --lr.", gt=0)
    bias_lr_mult: float = option(2.0, "Learning rate of biases, as a multiple of their layer's.", ge=0)
    weight_decay: float = option(5e-4, "SGD weight decay.", ge=0)
    momentum: float = option(0.9, "SGD momentum.", ge=0, lt=1)
    nesterov: bool = option(True, "Nesterov momentum.")
    lr_steps: tuple[int, ...] = option((5, 10), "Epochs at which the learning rate is multiplied by --lr-gamma.", ge=1)
    lr_gamma: float = option(0.1, "Learning-rate factor at each of --lr-steps.", gt=0)
    # data
    input_size: int = option(256, "Short image side before the crop.", ge=1)
    crop_size: int = option(256, "Square crop shared by a group's images.", ge=1)
    scale: tuple[float, float] = option((1.0, 1.0), "Random rescale range of the short side.", gt=0, check=ascending)
    hflip: bool = option(False, "Random horizontal flips.")
    color_jitter: tuple[float, float, float, float] = option(
        (0.3, 0.3, 0.3, 0.1), "ColorJitter strengths: brightness, contrast, saturation, hue (hue <= 0.5).", ge=0,
        check=lambda v: "must have hue (the last) <= 0.5" if v[3] > 0.5 else None)

    def validate(self) -> "GroupConfig":
        check_common(self)  # each field's type and range were checked when the config was made
        return self


def train_group_classifier(cfg: GroupConfig) -> dict:
    """Train (or resume, or skip when finished) the group model in cfg.out; saved to <out>/model/."""
    cfg.validate()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    train_ds = open_splits(cfg.data, cfg.train_split, background_classes=cfg.background_classes,
                           ignore_classes=cfg.ignore_classes)
    if cfg.limit is not None:
        tagged = [s for s in train_ds.samples if s.supervision in ("mask", "tags")]
        train_ds = train_ds.with_samples(tagged[: cfg.limit])
    labels = train_ds.labels
    base = load_classifier(cfg.init_classifier) if cfg.init_classifier else None
    if base is not None and base[2].names != labels.names:
        raise DataError(f"{cfg.init_classifier}: the classifier's classes {base[2].names} differ from "
                        f"{train_ds.name}'s {labels.names}; pass the same --data and class options.")
    base_spec = base[1] if base else {"backbone": cfg.backbone, "output_stride": cfg.output_stride,
                                      "frozen_stages": cfg.frozen_stages, "freeze_bn": cfg.freeze_bn}
    spec = group_spec(labels, base_spec, group_size=cfg.group_size, rounds=cfg.rounds,
                      proj_channels=cfg.proj_channels, drop_rate=cfg.drop_rate, drop_th=cfg.drop_th,
                      gdl_in_eval=cfg.gdl_in_eval)
    run = RunDir(cfg.out)  # after the data is checked: bad input leaves no folder behind
    finished = run.stage_done("group")
    claim_run_dir(run, cfg, labels, finished=finished, started=run.last_checkpoint.exists())
    t0 = time.time()
    if finished and not cfg.resume:
        log.info("%s: group model already trained; skipping (delete stages/group.done to retrain).", run.path)
        return {"run": str(run.path), "train_seconds": 0.0, "skipped": True}
    model = build_group_net(spec, pretrained=False if base else cfg.pretrained)
    if base is not None:
        model.base.load_state_dict(base[0].state_dict())
    data = GroupImages(train_ds, spec["class_ids"], group_size=cfg.group_size, seed=cfg.seed,
                       input_size=cfg.input_size, crop_size=cfg.crop_size, scale=tuple(cfg.scale), hflip=cfg.hflip,
                       color_jitter=tuple(cfg.color_jitter))
    # Workers are not persistent: each epoch's workers start after `set_epoch` has redrawn the groups.
    loader = shuffled_loader(data, cfg.batch_size, cfg.seed, cfg.num_workers)
    module = GroupModule(model, cfg, labels)
    fit_resumable(module, cfg, run, loader, max_epochs=cfg.epochs, max_steps=cfg.max_steps)
    save_classifier(module.model, spec, labels, run / "model")
    seconds = round(time.time() - t0, 1)
    run.mark_done("group", {"seconds": seconds, "images": len(data), "epochs": cfg.epochs,
                            "init_classifier": cfg.init_classifier})
    return {"run": str(run.path), "train_seconds": seconds, "images": len(data)}


@dataclass
class GroupMapsConfig(RunOptions):
    classifier: str = option("", "A group run directory (made by train_group_classifier).")
    out: str = option("", "Folder for the maps [default: <classifier>/maps_group_<split>].")
    data: str | None = option(None, "Dataset to map [default: the group run's].")
    background_classes: list[str] | None = option(None, "Class names merged into background [default: the group "
                                                        "run's].")
    ignore_classes: list[str] | None = option(None, "Class names turned into void [default: the group run's].")
    split: str = option("train", "Split(s) to map; '+' joins splits (train+val).")
    scales: tuple[float, ...] = option((1.0,), "Image scales for maps (repeat the option: --scales 1.0 --scales 0.5).",
                                       gt=0)
    flips: bool = option(True, "Add each group's mirrored copy (as CAM does).")
    readout: Literal["mean", "graph", "plain"] = option(
        "mean", "Maps: mean of the post-graph and pre-graph maps (the reference), the post-graph maps alone, or "
                "the pre-graph maps (no messages from the partners).")
    graph_dropout_in_eval: bool = option(False, "Keep graph dropout on while mapping (the reference has no eval "
                                                "switch, so its maps are random draws).")
    group_size: int | None = option(None, "Images per group [default: the training group size].", ge=2)
    seed: int = option(0, "Seed of the partner draw.", ge=0, le=MAX_SEED)
    limit: int | None = option(None, "Only the first N images of the split are mapped (partners come from all).",
                               ge=1)
    gallery_images: int = option(24, GALLERY_IMAGES_HELP, ge=0)
    gallery_threshold: float = option(IRN_THRESHOLD, GALLERY_THRESHOLD_HELP, ge=0, le=1)

    @property
    def method(self) -> str:
        return "group"

    def validate(self) -> "GroupMapsConfig":
        if not self.classifier:
            raise ConfigError("No group model given: pass the run directory of a group training.")
        if not self.scales:
            raise ConfigError("scales is empty: give at least one image scale (--scales 1.0).")
        return self


#: Settings that leave existing group maps valid: how many images, the gallery.
GROUP_MAPS_FREE_FIELDS = ("limit", "gallery_images", "gallery_threshold")


def make_group_maps(cfg: GroupMapsConfig) -> dict:
    """Maps for every tagged image of a split, each the anchor of its own group; returns the manifest.

    Partners are drawn with `sample_groups` over the split's tagged images (seeded: the same files come
    out of every run), read at their own size and resized to the anchor's. Writes `maps/<id>.npz` (the
    partners' ids in each file's meta), `maps.json` and `gallery.html` in the layout `make_maps` uses, so
    `eval_seeds`, seeds and refinement read them unchanged. Resumable: existing files are skipped.

    `eval_seeds` opens the dataset through the `config.yaml` of the folder that `maps.json["classifier"]`
    names; a group run's config names its dataset too, but the maps folder carries its own
    `dataset/config.yaml` (data, split, class options) and the manifest points there (`group_classifier`
    names the group run).
    """
    cfg.validate()
    model, spec, labels = load_group_classifier(cfg.classifier)
    ds = open_maps_dataset(cfg.classifier, cfg.split, cfg.data, cfg.background_classes, cfg.ignore_classes)
    if ds.labels.names != labels.names:
        raise DataError(f"{ds.name}: classes {ds.labels.names} differ from the group model's {labels.names}.")
    out = Path(cfg.out) if cfg.out else Path(cfg.classifier) / f"maps_group_{cfg.split.replace('+', '_')}"
    # maps already in the folder are kept, so they must have been made with these settings
    claim_run_dir(RunDir(out), cfg, finished=(out / "maps.json").exists(), started=any(out.glob("maps/*.npz")),
                  free=GROUP_MAPS_FREE_FIELDS, rerun_hint=False)
    device = device_of(cfg.devices)
    model = model.to(device).eval()
    model.graph.gdl.in_eval = cfg.graph_dropout_in_eval
    n = cfg.group_size or spec.get("group_size", 3)
    to_clf = {c: i for i, c in enumerate(spec["class_ids"])}
    samples = [s for s in ds.samples if s.supervision in ("mask", "tags")]
    if not samples:
        raise DataError(f"{ds.name}: no image has tags or a mask; there is nothing to map.")
    tags = [sorted(c for c in ds.tags_of(s) if c in to_clf) for s in samples]
    clf_tags = [[to_clf[c] for c in t] for t in tags]
    groups = sample_groups(clf_tags, n, cfg.seed)
    anchors = list(range(len(samples)))[: cfg.limit]
    todo = [i for i in anchors if not maps_path(out, samples[i].id).exists()]
    log.info("%s: %d images, %d already mapped", ds.name, len(anchors), len(anchors) - len(todo))

    def read(j: int) -> torch.Tensor:
        return to_tensor_image(ds.read_image(samples[j]))

    t0 = time.time()
    for i in tqdm(todo, desc="group maps", disable=not cfg.progress):
        anchor = read(i)
        if not clf_tags[i]:  # nothing to localise: empty maps, the seed is all background
            m = finish_maps([], torch.zeros(0, dtype=torch.long), tuple(anchor.shape[-2:]))
        else:
            members = [anchor] + [read(j) for j in groups[i][1:]]
            m = group_maps(model, members, [clf_tags[i]] + [[] for _ in groups[i][1:]], cfg.scales, cfg.flips,
                           cfg.readout)[0]
        save_maps(maps_path(out, samples[i].id), np.asarray(tags[i], dtype=np.int64), m.cam.cpu(), m.high_res.cpu(),
                  method="group", scales=list(cfg.scales), flips=cfg.flips,
                  group=[samples[j].id for j in groups[i]])
    seconds = time.time() - t0
    saved = saved_data_options(cfg.classifier)
    data_cfg = ClassifyConfig(
        data=cfg.data or saved["data"], train_split=cfg.split, eval_split=None,
        background_classes=saved["background_classes"] if cfg.background_classes is None else cfg.background_classes,
        ignore_classes=saved["ignore_classes"] if cfg.ignore_classes is None else cfg.ignore_classes)
    RunDir(out / "dataset").save_config(data_cfg)
    manifest = {
        "method": "group", "dataset": ds.name, "split": cfg.split, "images": len(anchors),
        "computed_now": len(todo), "seconds_now": round(seconds, 1),
        "images_per_s_now": round(len(todo) / seconds, 4) if todo and seconds > 0 else None,
        "device": str(device), "classifier": str(out / "dataset"), "group_classifier": str(cfg.classifier),
        "group_size": n,
        "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"},
    }
    write_json(out / "maps.json", manifest)
    if cfg.gallery_images:
        write_maps_gallery(out, ds, [samples[i] for i in anchors[: cfg.gallery_images]], method="group",
                           max_images=cfg.gallery_images, threshold=cfg.gallery_threshold)
    return manifest
