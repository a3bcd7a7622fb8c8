"""Stage `group`: group-wise semantic mining (Group-WSSS; Li et al., AAAI 2021) — training and class maps.

A tag classifier sees one image at a time; Group-WSSS sees a *group*: an anchor and N-1 partners that
share its tags. A graph over the group's class maps (`frugalseg.models.group_net.GroupNet`: co-attention
messages, ConvGRU node updates, graph dropout) lets the maps of one image be completed by where the same
classes respond in the others. Both the plain (pre-graph) and the post-graph GAP logits are trained with
the multi-label soft-margin loss; the maps are (post-graph + pre-graph) / 2.

    sample_groups(tags_per_image, group_size, seed)   which images form each anchor's group
    train_group_classifier(GroupConfig(...))           train (Lightning, checkpoint per epoch, resumable)
    group_maps(model, images, tags)                    maps of one group, multi-scale + flip
    make_group_maps(GroupMapsConfig(...))              one .npz per image of a split, as `cams` writes them

Training follows the reference (github.com/Lixy1997/Group-WSSS, train.py) where it carries over to our
backbone: SGD with Nesterov momentum 0.9, weight decay 5e-4, lr 1e-3 on the backbone (x2 for biases),
x10 on the new layers (x20 for their biases), 15 epochs with lr x0.1 at epochs 5 and 10, one group per
step, short side resized to 256, ColorJitter(0.3, 0.3, 0.3, 0.1), loss weight 0.4 on the pre-graph
logits. Different on purpose:
- The backbone + class-map conv start from a trained tag classifier run (`init_classifier`) when given,
  else from ImageNet (the reference: ImageNet VGG16).
- The group's images are batched, so they are cropped to a common square (`crop_size`) after the
  short-side resize; the reference keeps whole images (its co-attention only runs when the images'
  map areas happen to match, as VOC's 341x256 / 256x341 do).
- Groups are shuffled and redrawn every epoch (seeded by seed and epoch); the reference does not shuffle
  (its on-disk maps were named by loader index) and draws partners with Python's unseeded RNG.
- Maps come from a separate inference pass over the finished model, one file per image, named by the
  sample id, multi-scale + flip like CAM. The reference accumulates maps *during* training (max over
  epochs, with graph dropout active) into PNGs named by loader position.
- Partner sampling is exact rather than capped rejection sampling, and never picks the anchor itself
  or an image twice when others exist (see `sample_groups`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from frugalseg.data.labels import LabelSpec
from frugalseg.data.samples import SegDataset
from frugalseg.data.torchdata import sample_generator
from frugalseg.data.transforms import to_tensor_image
from frugalseg.errors import ConfigError, DataError
from frugalseg.models.group_net import GroupNet, group_loss
from frugalseg.runs import RunDir, write_json
from frugalseg.weak.cam import ClassMaps, check_tags, finish_maps, scaled

log = logging.getLogger(__name__)
SPEC_KIND = "group_classifier"


# ---- groups ---------------------------------------------------------------------------------------------
def _draw(pool: Sequence[int], k: int, exclude: set[int], rng: np.random.Generator) -> list[int]:
    """Up to k distinct members of `pool` not in `exclude`, uniformly at random (fewer when it runs out).

    Rejection sampling when the pool is much larger than what is excluded (no pass over a big pool),
    else filter and permute."""
    if k <= 0 or not len(pool):
        return []
    if len(pool) > 4 * (k + len(exclude)):
        out: list[int] = []
        while len(out) < k:
            j = int(pool[int(rng.integers(len(pool)))])
            if j not in exclude and j not in out:
                out.append(j)
        return out
    candidates = [int(j) for j in pool if j not in exclude]
    return [candidates[p] for p in rng.permutation(len(candidates))[:k]]


def sample_groups(
    tags_per_image: Sequence[Sequence[int]], group_size: int = 3, seed: int | Sequence[int] = 0
) -> list[list[int]]:
    """For every image i, the group [i, p_1, ..., p_{N-1}] of indices into `tags_per_image`.

    Partners, in order of preference (the reference's rule, drawn exactly instead of by capped rejection):
    1. images with exactly the anchor's tag set;
    2. once those are used up, images sharing one class of the anchor, chosen at random per anchor
       (the reference: after 1,000 failed tries, any image having that class);
    3. once that class has no other image (or the anchor has no tag), any image.
    Partners are distinct and never the anchor itself; only a dataset with fewer than N images repeats
    images (the anchor included for a one-image dataset). Each anchor draws from its own generator,
    seeded by (seed..., i): a group does not depend on the other anchors, nor on how many are mapped.
    Raises DataError when no image carries a tag.
    """
    if group_size < 2:
        raise ConfigError(f"group_size must be >= 2 (an anchor and at least one partner), got {group_size}.")
    tags = [frozenset(int(c) for c in t) for t in tags_per_image]
    if not tags:
        raise DataError("no images to group: the dataset is empty.")
    if not any(tags):
        raise DataError(f"none of the {len(tags)} images carries a tag; groups are formed from shared tags, "
                        "so group-wise mining needs image tags (or masks to derive them from).")
    seed_seq = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    by_set: dict[frozenset[int], list[int]] = {}
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(tags):
        by_set.setdefault(t, []).append(i)
        for c in t:
            by_class.setdefault(c, []).append(i)
    everyone = np.arange(len(tags))
    need = group_size - 1
    groups = []
    for i, t in enumerate(tags):
        rng = np.random.default_rng([*seed_seq, i])
        chosen = _draw(by_set[t], need, {i}, rng)
        if len(chosen) < need and t:
            c = sorted(t)[int(rng.integers(len(t)))]
            chosen += _draw(by_class[c], need - len(chosen), {i, *chosen}, rng)
        if len(chosen) < need:
            chosen += _draw(everyone, need - len(chosen), {i, *chosen}, rng)
        while len(chosen) < need:  # fewer images than the group size: repeat
            others = [j for j in range(len(tags)) if j != i] or [i]
            chosen.append(others[int(rng.integers(len(others)))])
        groups.append([i, *chosen])
    return groups


# ---- training data ------------------------------------------------------------------------------------
def color_jitter(image: torch.Tensor, strength: Sequence[float], gen: torch.Generator) -> torch.Tensor:
    """torchvision's ColorJitter(brightness, contrast, saturation, hue) on a (3, H, W) image in [0, 1],
    drawn from `gen` (reproducible per sample), in a fixed order."""
    b, c, s, h = (list(strength) + [0.0] * 4)[:4]

    def factor(amount: float) -> float:
        return 1.0 + amount * (2 * torch.rand((), generator=gen).item() - 1)

    def grey(x: torch.Tensor) -> torch.Tensor:
        return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]

    if b:
        image = (image * factor(b)).clamp(0, 1)
    if c:
        image = ((image - grey(image).mean()) * factor(c) + grey(image).mean()).clamp(0, 1)
    if s:
        g = grey(image)
        image = ((image - g) * factor(s) + g).clamp(0, 1)
    if h:
        from torchvision.transforms.functional import adjust_hue

        image = adjust_hue(image, h * (2 * torch.rand((), generator=gen).item() - 1))
    return image


def group_crop(image: torch.Tensor, gen: torch.Generator, input_size: int, crop_size: int,
               scale: tuple[float, float] = (1.0, 1.0), hflip: bool = False) -> torch.Tensor:
    """Short side to input_size x (random factor in `scale`), zero-pad to crop_size, random square crop, flip."""
    h, w = image.shape[-2:]
    s = input_size / min(h, w) * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=gen).item())
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    ph, pw = max(crop_size - nh, 0), max(crop_size - nw, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
    H, W = image.shape[-2:]
    y = int(torch.randint(0, H - crop_size + 1, (), generator=gen))
    x = int(torch.randint(0, W - crop_size + 1, (), generator=gen))
    image = image[:, y : y + crop_size, x : x + crop_size]
    if hflip and torch.rand((), generator=gen).item() < 0.5:
        image = image.flip(-1)
    return image.contiguous()


class GroupImages(Dataset):
    """Item i: the group of anchor i, as images (N, 3, S, S) and multi-hot targets (N, K).

    Groups are redrawn each epoch (`set_epoch`, seeded by (seed, epoch)); each member's augmentation is
    seeded by (seed, epoch, i * N + position). Decoded images are cached (TaggedImages)."""

    def __init__(self, ds: SegDataset, class_ids: list[int], cfg: "GroupConfig"):
        from frugalseg.weak.classify import TaggedImages

        self.images = TaggedImages(ds, class_ids, None, cfg.seed)
        self.targets = self.images.targets
        if self.targets.sum() == 0:
            raise DataError(f"{ds.name}: no image carries a foreground tag; groups are formed from shared tags, "
                            "so group-wise mining has nothing to learn from.")
        self.tags = [frozenset(torch.nonzero(t).flatten().tolist()) for t in self.targets]
        self.cfg = cfg
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.groups = sample_groups(self.tags, self.cfg.group_size, (self.cfg.seed, epoch))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        cfg, n = self.cfg, self.cfg.group_size
        images = []
        for k, j in enumerate(self.groups[i]):
            gen = sample_generator(cfg.seed, self.epoch, i * n + k)
            img = group_crop(self.images[j]["image"], gen, cfg.input_size, cfg.crop_size, tuple(cfg.scale), cfg.hflip)
            if any(cfg.color_jitter):
                img = color_jitter(img, cfg.color_jitter, gen)
            images.append(img)
        return {"images": torch.stack(images), "targets": self.targets[self.groups[i]], "index": i}


# ---- configuration, model spec, save/load -------------------------------------------------------------
@dataclass
class GroupConfig:
    data: str = ""
    out: str = "runs/group"
    train_split: str = "train"
    background_classes: list[str] | None = None
    ignore_classes: list[str] | None = None
    limit: int | None = None  # only the first N tagged images of the split (stated subsets for CPU runs)
    init_classifier: str | None = None  # a classify run: backbone + class-map conv start from it
    backbone: str = "tf_efficientnet_lite0"  # used when init_classifier is not given
    pretrained: bool | str = True
    output_stride: int = 16
    frozen_stages: int = 3
    freeze_bn: bool = True
    # group graph
    group_size: int = 3  # N, anchor included (reference code: 3)
    rounds: int = 3  # T message-passing rounds
    proj_channels: int = 10  # d of the co-attention projections
    drop_rate: float = 0.8
    drop_th: float = 0.7
    gdl_in_eval: bool = False  # the reference applies graph dropout at inference too (random maps)
    pre_weight: float = 0.4  # weight of the pre-graph loss
    # optimisation (reference: SGD nesterov, lr 1e-3, x2 biases, x10 new layers, 15 epochs, x0.1 at 5 and 10)
    epochs: int = 15
    max_steps: int = -1
    batch_size: int = 1  # groups per step (reference: 1)
    lr: float = 1e-3
    new_lr_mult: float = 10.0
    bias_lr_mult: float = 2.0
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    lr_steps: tuple[int, ...] = (5, 10)
    lr_gamma: float = 0.1
    # data
    input_size: int = 256  # short side
    crop_size: int = 256
    scale: tuple[float, float] = (1.0, 1.0)
    hflip: bool = False
    color_jitter: tuple[float, float, float, float] = (0.3, 0.3, 0.3, 0.1)
    # machinery
    seed: int = 0
    precision: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_workers: int = 0
    resume: bool = False
    progress: bool = True

    def validate(self) -> "GroupConfig":
        from frugalseg.config import check_common

        check_common(self)
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (an anchor and at least one partner), got {self.group_size}.")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}.")
        if not 0 <= self.drop_rate <= 1 or not 0 <= self.drop_th <= 1:
            raise ConfigError(f"drop_rate and drop_th must be in [0, 1], got {self.drop_rate}, {self.drop_th}.")
        if self.crop_size < 1 or self.input_size < 1:
            raise ConfigError("input_size and crop_size must be positive.")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}.")
        return self


def group_spec(cfg: GroupConfig, labels: LabelSpec, base_spec: dict | None = None) -> dict:
    """What rebuilds the model: the base classifier's architecture (from `base_spec` when initialised from
    a classifier run) and the graph's options."""
    from frugalseg.weak.classify import classifier_classes

    base = base_spec or {"backbone": cfg.backbone, "output_stride": cfg.output_stride,
                         "frozen_stages": cfg.frozen_stages, "freeze_bn": cfg.freeze_bn}
    return {
        "kind": SPEC_KIND, "backbone": base["backbone"], "output_stride": base["output_stride"],
        "frozen_stages": base.get("frozen_stages", 3), "freeze_bn": base.get("freeze_bn", True),
        "bias": base.get("bias", False), "class_ids": classifier_classes(labels), "group_size": cfg.group_size,
        "rounds": cfg.rounds,
        "proj_channels": cfg.proj_channels, "drop_rate": cfg.drop_rate, "drop_th": cfg.drop_th,
        "gdl_in_eval": cfg.gdl_in_eval,
    }


def build_group_net(spec: dict, pretrained: bool | str = False) -> GroupNet:
    return GroupNet(
        len(spec["class_ids"]), backbone=spec["backbone"], pretrained=pretrained, output_stride=spec["output_stride"],
        freeze_bn=spec.get("freeze_bn", True), frozen_stages=spec.get("frozen_stages", 3),
        proj_channels=spec.get("proj_channels", 10), rounds=spec.get("rounds", 3), drop_rate=spec.get("drop_rate", 0.8),
        drop_th=spec.get("drop_th", 0.7), gdl_in_eval=spec.get("gdl_in_eval", False), bias=spec.get("bias", False),
    )


def load_group_classifier(run_or_folder: str | Path) -> tuple[GroupNet, dict, LabelSpec]:
    """(model in eval mode, spec, labels) from a group run directory or its model/ folder."""
    import json

    from safetensors.torch import load_file

    p = Path(run_or_folder)
    folder = p / "model" if (p / "model" / "config.json").exists() else p
    if not (folder / "config.json").exists():
        raise DataError(f"{p}: no trained group model here (expected model/config.json); run the group training first.")
    meta = json.loads((folder / "config.json").read_text())
    kind = meta.get("model", {}).get("kind")
    if kind != SPEC_KIND:
        raise DataError(f"{p}: this model is not a group classifier (kind {kind}).")
    spec = meta["model"]
    model = build_group_net(spec, pretrained=False)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval(), spec, LabelSpec.from_dict(meta["labels"])


# ---- training -----------------------------------------------------------------------------------------
class GroupModule(L.LightningModule):
    """Group-wise training: both losses, the reference's four learning rates, step decay per epoch."""

    def __init__(self, model: GroupNet, cfg: GroupConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.model(batch["images"])
        loss = group_loss(out, batch["targets"], self.cfg.pre_weight)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["images"].shape[0])
        return loss

    def on_train_epoch_start(self) -> None:
        from frugalseg.engine import pass_epoch_to_dataset

        pass_epoch_to_dataset(self)

    def configure_optimizers(self):
        cfg = self.cfg
        opt = torch.optim.SGD(self.model.param_groups(cfg.lr, cfg.new_lr_mult, cfg.bias_lr_mult), lr=cfg.lr,
                              momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              nesterov=cfg.nesterov and cfg.momentum > 0)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.lr_steps), gamma=cfg.lr_gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from frugalseg.engine import CHECKPOINT_FORMAT

        checkpoint["frugalseg"] = {"format_version": CHECKPOINT_FORMAT, "kind": SPEC_KIND}


def train_group_classifier(cfg: GroupConfig) -> dict:
    """Train (or resume, or skip when finished) the group model in cfg.out; saved to <out>/model/."""
    from frugalseg.engine import make_trainer, merge_resumed_logs
    from frugalseg.weak.classify import load_classifier, open_splits, save_classifier

    cfg.validate()
    run = RunDir(cfg.out)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    train_ds = open_splits(cfg, cfg.train_split)
    if cfg.limit is not None:
        tagged = [s for s in train_ds.samples if s.supervision in ("mask", "tags")]
        train_ds = train_ds.with_samples(tagged[: cfg.limit])
    labels = train_ds.labels
    base = load_classifier(cfg.init_classifier) if cfg.init_classifier else None
    if base is not None and base[2].names != labels.names:
        raise DataError(f"{cfg.init_classifier}: the classifier's classes {base[2].names} differ from "
                        f"{train_ds.name}'s {labels.names}; pass the same --data and class options.")
    spec = group_spec(cfg, labels, base[1] if base else None)
    run.save_config(cfg)
    t0 = time.time()
    if run.stage_done("group") and not cfg.resume:
        log.info("%s: group model already trained; skipping (delete stages/group.done to retrain).", run.path)
        return {"run": str(run.path), "train_seconds": 0.0, "skipped": True}
    model = build_group_net(spec, pretrained=False if base else cfg.pretrained)
    if base is not None:
        model.base.load_state_dict(base[0].state_dict())
    data = GroupImages(train_ds, spec["class_ids"], cfg)
    # Workers are not persistent: each epoch's workers start after `set_epoch` has redrawn the groups.
    loader = DataLoader(data, batch_size=min(cfg.batch_size, len(data)), shuffle=True,
                        drop_last=len(data) > cfg.batch_size, num_workers=cfg.num_workers)
    module = GroupModule(model, cfg)
    ckpt = run.last_checkpoint if cfg.resume and run.last_checkpoint.exists() else None
    trainer = make_trainer(cfg, run.path, max_epochs=cfg.epochs, val=False, resuming=ckpt is not None)
    trainer.fit(module, loader, ckpt_path=ckpt)
    merge_resumed_logs(run.path)
    if trainer.interrupted:
        raise KeyboardInterrupt
    save_classifier(module.model, spec, labels, run / "model")
    seconds = round(time.time() - t0, 1)
    run.mark_done("group", {"seconds": seconds, "images": len(data), "epochs": cfg.epochs,
                            "init_classifier": cfg.init_classifier})
    return {"run": str(run.path), "train_seconds": seconds, "images": len(data)}


# ---- maps ---------------------------------------------------------------------------------------------
@torch.no_grad()
def group_maps(
    model: GroupNet,
    images_of_group: Sequence[torch.Tensor],
    tags_of_group: Sequence[Sequence[int]],
    scales: Sequence[float] = (1.0,),
    flips: bool = True,
) -> list[ClassMaps]:
    """Maps of every image of one group (image 0 is the anchor) for its tagged classes.

    Images are (3, H_n, W_n) in [0, 1]; the partners are resized to the anchor's size and the group runs
    together at each scale (and, with `flips`, its mirrored copy as a second group). Per scale:
    ReLU((post-graph map + pre-graph map) / 2), as the reference's `atts`; then, like CAM, summed over
    scales and flips, resized to each image's own size and stride-4 size, max-normalised per class.
    Tags are classifier output indices; keys of the result are those indices. The model's mode is left
    as it is (eval for deterministic maps).
    """
    images = list(images_of_group)
    if len(images) != len(tags_of_group):
        raise ValueError(f"{len(images)} images but {len(tags_of_group)} tag lists.")
    if len(images) < 2:
        raise ValueError("a group needs at least 2 images (the anchor and a partner).")
    if any(img.ndim != 3 for img in images):
        raise ValueError(f"group_maps expects (3, H, W) images, got shapes {[tuple(i.shape) for i in images]}.")
    check_tags(tags_of_group, model.num_classes)
    device = next(model.parameters()).device
    size = tuple(images[0].shape[-2:])
    group = torch.stack([
        img if tuple(img.shape[-2:]) == size
        else F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        for img in images
    ]).to(device)
    per_image: list[list[torch.Tensor]] = [[] for _ in images]
    for s in scales:
        x = scaled(group, s)
        out = model(torch.stack([x, x.flip(-1)]) if flips else x[None])
        atts = F.relu((out.nodes.float() + out.maps.float()) / 2)
        merged = atts[0] + atts[1].flip(-1) if flips else atts[0]
        for n, t in enumerate(tags_of_group):
            per_image[n].append(merged[n, list(t)])
    return [
        finish_maps(per_image[n], torch.as_tensor(list(t), dtype=torch.long), tuple(images[n].shape[-2:]))
        for n, t in enumerate(tags_of_group)
    ]


@dataclass
class GroupMapsConfig:
    classifier: str = ""  # a group run directory (made by train_group_classifier)
    out: str = ""  # default: <classifier>/maps_group_<split>
    data: str | None = None  # default: the run's dataset
    split: str = "train"
    scales: tuple[float, ...] = (1.0,)
    flips: bool = True
    group_size: int | None = None  # default: the training group size
    seed: int = 0  # partner draw
    limit: int | None = None  # only the first N images of the split are mapped (partners come from all)
    gallery_images: int = 24
    gallery_threshold: float = 0.15
    progress: bool = True

    @property
    def method(self) -> str:
        return "group"

    def validate(self) -> "GroupMapsConfig":
        if not self.classifier:
            raise ConfigError("No group model given: pass the run directory of a group training.")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(f"scales must be positive, got {self.scales}.")
        if self.group_size is not None and self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2, got {self.group_size}.")
        return self


def make_group_maps(cfg: GroupMapsConfig) -> dict:
    """Maps for every tagged image of a split, each the anchor of its own group; returns the manifest.

    Partners are drawn with `sample_groups` over the split's tagged images (seeded: the same files come
    out of every run), read at their own size and resized to the anchor's. Writes `maps/<id>.npz` (the
    partners' ids in each file's meta), `maps.json` and `gallery.html` in the layout `make_maps` uses, so
    `eval_seeds`, seeds and refinement read them unchanged. Resumable: existing files are skipped.

    `eval_seeds` opens the dataset through a classify-style `config.yaml` in the folder that
    `maps.json["classifier"]` names; a group run's config has other keys, so the maps folder carries
    its own `dataset/config.yaml` (data, split, class options) and the manifest points there
    (`group_classifier` names the group run).
    """
    from tqdm.auto import tqdm

    from frugalseg.config import load_config
    from frugalseg.weak.classify import ClassifyConfig, open_splits
    from frugalseg.weak.maps_io import maps_path, save_maps
    from frugalseg.weak.maps_stage import write_gallery

    cfg.validate()
    model, spec, labels = load_group_classifier(cfg.classifier)
    run_cfg = load_config(Path(cfg.classifier) / "config.yaml", GroupConfig)
    if cfg.data:
        run_cfg.data = cfg.data
    ds = open_splits(run_cfg, cfg.split)
    if ds.labels.names != labels.names:
        raise DataError(f"{ds.name}: classes {ds.labels.names} differ from the group model's {labels.names}.")
    out = Path(cfg.out) if cfg.out else Path(cfg.classifier) / f"maps_group_{cfg.split.replace('+', '_')}"
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
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
            m = group_maps(model, members, [clf_tags[i]] + [[] for _ in groups[i][1:]], cfg.scales, cfg.flips)[0]
        save_maps(maps_path(out, samples[i].id), np.asarray(tags[i], dtype=np.int64), m.cam.cpu(), m.high_res.cpu(),
                  method="group", scales=list(cfg.scales), flips=cfg.flips,
                  group=[samples[j].id for j in groups[i]])
    seconds = time.time() - t0
    data_cfg = ClassifyConfig(data=run_cfg.data, train_split=cfg.split, eval_split=None,
                              background_classes=run_cfg.background_classes, ignore_classes=run_cfg.ignore_classes)
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
        write_gallery(out, ds, [samples[i] for i in anchors[: cfg.gallery_images]], cfg)
    return manifest
