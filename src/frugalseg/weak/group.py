"""Group-wise semantic mining (Group-WSSS; Li et al., AAAI 2021): groups, training data and class maps.

A tag classifier sees one image at a time; Group-WSSS sees a *group*: an anchor and N-1 partners that
share its tags. A graph over the group's class maps (`frugalseg.models.group_net.GroupNet`: co-attention
messages, ConvGRU node updates, graph dropout) lets the maps of one image be completed by where the same
classes respond in the others. Both the plain (pre-graph) and the post-graph GAP logits are trained with
the multi-label soft-margin loss; the maps are (post-graph + pre-graph) / 2.

    sample_groups(tags_per_image, group_size, seed)   which images form each anchor's group
    GroupImages(ds, class_ids, group_size=3, ...)     a group per item, cropped and jittered (training data)
    group_spec / build_group_net / load_group_classifier
    group_maps(model, images, tags)                   maps of one group, multi-scale + flip

Training (Lightning, run directory, resume) and one map file per image of a split are the stage
`frugalseg.stages.group` (`train_group_classifier`, `make_group_maps`).

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

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms.functional import adjust_hue

from frugalseg.data.labels import LabelSpec
from frugalseg.data.samples import SegDataset
from frugalseg.data.torchdata import sample_generator
from frugalseg.errors import ConfigError, DataError
from frugalseg.export import read_safetensors
from frugalseg.models.group_net import GroupNet
from frugalseg.weak.cam import ClassMaps, check_tags, finish_maps, scaled
from frugalseg.weak.classify import TaggedImages, classifier_classes, model_folder

SPEC_KIND = "group_classifier"
#: which maps of the group network become class maps (see `group_maps`)
GROUP_READOUTS = ("mean", "graph", "plain")


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
    seeded by (seed, epoch, i * N + position): short side to `input_size` x a factor in `scale`, a random
    `crop_size` square, an optional flip, then `color_jitter` (brightness, contrast, saturation, hue).
    Decoded images are cached (TaggedImages)."""

    def __init__(self, ds: SegDataset, class_ids: list[int], *, group_size: int = 3, seed: int = 0,
                 input_size: int = 256, crop_size: int = 256, scale: tuple[float, float] = (1.0, 1.0),
                 hflip: bool = False, color_jitter: Sequence[float] = (0.3, 0.3, 0.3, 0.1)):
        self.images = TaggedImages(ds, class_ids, None, seed)
        self.targets = self.images.targets
        if self.targets.sum() == 0:
            raise DataError(f"{ds.name}: no image carries a foreground tag; groups are formed from shared tags, "
                            "so group-wise mining has nothing to learn from.")
        self.tags = [frozenset(torch.nonzero(t).flatten().tolist()) for t in self.targets]
        self.group_size, self.seed = group_size, seed
        self.input_size, self.crop_size, self.scale, self.hflip = input_size, crop_size, tuple(scale), hflip
        self.color_jitter = tuple(color_jitter)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.groups = sample_groups(self.tags, self.group_size, (self.seed, epoch))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        n = self.group_size
        images = []
        for k, j in enumerate(self.groups[i]):
            gen = sample_generator(self.seed, self.epoch, i * n + k)
            img = group_crop(self.images[j]["image"], gen, self.input_size, self.crop_size, self.scale, self.hflip)
            if any(self.color_jitter):
                img = color_jitter(img, self.color_jitter, gen)
            images.append(img)
        return {"images": torch.stack(images), "targets": self.targets[self.groups[i]], "index": i}


# ---- model spec, build, load ----------------------------------------------------------------------------
def group_spec(labels: LabelSpec, base_spec: dict, *, group_size: int = 3, rounds: int = 3, proj_channels: int = 10,
               drop_rate: float = 0.8, drop_th: float = 0.7, gdl_in_eval: bool = False) -> dict:
    """What rebuilds the model (`build_group_net`): the base classifier's architecture (`base_spec`: a tag
    classifier's spec, or at least its backbone and output stride) and the graph's options."""
    return {
        "kind": SPEC_KIND, "backbone": base_spec["backbone"], "output_stride": base_spec["output_stride"],
        "frozen_stages": base_spec.get("frozen_stages", 3), "freeze_bn": base_spec.get("freeze_bn", True),
        "bias": base_spec.get("bias", False), "class_ids": classifier_classes(labels), "group_size": group_size,
        "rounds": rounds, "proj_channels": proj_channels, "drop_rate": drop_rate, "drop_th": drop_th,
        "gdl_in_eval": gdl_in_eval,
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
    folder, meta = model_folder(run_or_folder, "group model", "run the group training first")
    kind = meta.get("model", {}).get("kind")
    if kind != SPEC_KIND:
        raise DataError(f"{run_or_folder}: this model is not a group classifier (kind {kind}).")
    spec = meta["model"]
    model = build_group_net(spec, pretrained=False)
    model.load_state_dict(read_safetensors(folder / "model.safetensors"))
    return model.eval(), spec, LabelSpec.from_dict(meta["labels"])


# ---- maps ---------------------------------------------------------------------------------------------
@torch.no_grad()
def group_maps(
    model: GroupNet,
    images_of_group: Sequence[torch.Tensor],
    tags_of_group: Sequence[Sequence[int]],
    scales: Sequence[float] = (1.0,),
    flips: bool = True,
    readout: str = "mean",
) -> list[ClassMaps]:
    """Maps of every image of one group (image 0 is the anchor) for its tagged classes.

    Images are (3, H_n, W_n) in [0, 1]; the partners are resized to the anchor's size and the group runs
    together at each scale (and, with `flips`, its mirrored copy as a second group). Per scale:
    ReLU((post-graph map + pre-graph map) / 2), as the reference's `atts`; then, like CAM, summed over
    scales and flips, resized to each image's own size and stride-4 size, max-normalised per class.
    Tags are classifier output indices; keys of the result are those indices. The model's mode is left
    as it is (eval for deterministic maps). `readout` picks the maps: "mean" (the reference's), "graph" (the
    post-graph node states alone) or "plain" (the pre-graph maps: the fine-tuned backbone without the
    group's messages, what tells the graph's share from the fine-tuning's).
    """
    if readout not in GROUP_READOUTS:
        raise ConfigError(f"readout must be one of {GROUP_READOUTS}, not {readout!r}.")
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
        atts = F.relu({"mean": (out.nodes.float() + out.maps.float()) / 2, "graph": out.nodes.float(),
                       "plain": out.maps.float()}[readout])
        merged = atts[0] + atts[1].flip(-1) if flips else atts[0]
        for n, t in enumerate(tags_of_group):
            per_image[n].append(merged[n, list(t)])
    return [
        finish_maps(per_image[n], torch.as_tensor(list(t), dtype=torch.long), tuple(images[n].shape[-2:]))
        for n, t in enumerate(tags_of_group)
    ]
