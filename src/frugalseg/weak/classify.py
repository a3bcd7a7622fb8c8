"""A multi-label tag classifier (IRN-style head) and what it learns from: image tags only.

Masks are never read for training: a sample's tags are the dataset's tags, or, for a sample that has a
mask, the classes present in it (what a user with masks would tag). The classifier covers the foreground
classes only (the background is what no tag names); `class_ids` maps its outputs back to dataset ids.

    TaggedImages(ds, class_ids, transform)         (image, multi-hot tags) items
    classifier_spec(labels, backbone=...)          what rebuilds the network (saved next to its weights)
    build_classifier / save_classifier / load_classifier
    evaluate_classifier(model, ds, class_ids, labels, device)   per-class AP and F1

Training (Lightning, run directory, resume) is the `classify` stage: `frugalseg.stages.classify`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from frugalseg.data.io import atomic_path, make_folder, read_json, write_json
from frugalseg.data.labels import LabelSpec
from frugalseg.data.samples import SegDataset
from frugalseg.data.torchdata import EpochAware, SharedEpoch, sample_generator
from frugalseg.data.transforms import CropTransform, to_tensor_image
from frugalseg.errors import DataError
from frugalseg.export import read_safetensors
from frugalseg.models.tag_classifier import TagClassifier

SPEC_KIND = "tag_classifier"


def classifier_classes(labels: LabelSpec) -> list[int]:
    """Dataset class ids the classifier predicts: every class but the background."""
    return [i for i in range(labels.num_classes) if i != labels.background]


class TaggedImages(EpochAware, Dataset):
    """(image, multi-hot tags) of every sample with tags or a mask; images decoded once and cached."""

    def __init__(self, ds: SegDataset, class_ids: list[int], transform: CropTransform | None, seed: int = 0):
        self.ds = ds.with_samples([s for s in ds.samples if s.supervision in ("mask", "tags")])
        if len(self.ds) == 0:
            raise DataError(f"{ds.name}: no image has tags or a mask; the tag classifier has nothing to learn from.")
        self.index = {c: i for i, c in enumerate(class_ids)}
        self.num = len(class_ids)
        self.transform = transform
        self.seed = seed
        self._shared_epoch = SharedEpoch()
        self._cache: dict[int, torch.Tensor] = {}
        self.targets = torch.stack([self.target_of(s) for s in self.ds.samples])

    def target_of(self, sample) -> torch.Tensor:
        y = torch.zeros(self.num)
        for c in self.ds.tags_of(sample):
            if c in self.index:
                y[self.index[c]] = 1.0
        return y

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        if i not in self._cache:
            self._cache[i] = to_tensor_image(self.ds.read_image(self.ds[i]))
        image = self._cache[i]
        if self.transform is not None:
            dummy = torch.zeros(image.shape[-2:], dtype=torch.long)
            image, _ = self.transform(image, dummy, sample_generator(self.seed, self.epoch, i))
        return {"image": image, "target": self.targets[i], "index": i}


def classifier_spec(labels: LabelSpec, *, backbone: str = "tf_efficientnet_lite0", output_stride: int = 16,
                    peak_stimulation: bool = False, frozen_stages: int = 3, freeze_bn: bool = True) -> dict:
    """What rebuilds the classifier (`build_classifier`). A PRM classifier (peak stimulation) has a head bias."""
    return {
        "kind": SPEC_KIND, "backbone": backbone, "output_stride": output_stride,
        "class_ids": classifier_classes(labels), "peak_stimulation": peak_stimulation,
        "bias": peak_stimulation, "frozen_stages": frozen_stages, "freeze_bn": freeze_bn,
    }


def build_classifier(spec: dict, pretrained: bool | str = False) -> TagClassifier:
    return TagClassifier(
        len(spec["class_ids"]), backbone=spec["backbone"], pretrained=pretrained, output_stride=spec["output_stride"],
        freeze_bn=spec.get("freeze_bn", True), frozen_stages=spec.get("frozen_stages", 3),
        peak_stimulation=spec.get("peak_stimulation", False), bias=spec.get("bias", False),
    )


def save_classifier(model: torch.nn.Module, spec: dict, labels: LabelSpec, folder: Path) -> None:
    """`folder/model.safetensors` + `folder/config.json` (spec and label spec), each written atomically."""
    make_folder(folder)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(folder / "config.json", {"format_version": 1, "model": spec, "labels": labels.to_dict()})


def model_folder(run_or_folder: str | Path, what: str, hint: str) -> tuple[Path, dict]:
    """(folder, config.json) of a saved classifier: a run directory or its model/ folder."""
    p = Path(run_or_folder)
    folder = p / "model" if (p / "model" / "config.json").exists() else p
    if not (folder / "config.json").exists():
        raise DataError(f"{p}: no trained {what} here (expected model/config.json); {hint}.")
    return folder, read_json(folder / "config.json")


def load_classifier(run_or_folder: str | Path) -> tuple[TagClassifier, dict, LabelSpec]:
    """(model in eval mode, spec, labels) from a classify run directory or its model/ folder."""
    folder, meta = model_folder(run_or_folder, "classifier", "run `frugalseg classify` first")
    kind = meta.get("model", {}).get("kind")
    if kind != SPEC_KIND:
        raise DataError(f"{run_or_folder}: this model is not a tag classifier (kind {kind}).")
    spec = meta["model"]
    model = build_classifier(spec, pretrained=False)
    model.load_state_dict(read_safetensors(folder / "model.safetensors"))
    return model.eval(), spec, LabelSpec.from_dict(meta["labels"])


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """All-point AP of one class (None when the class has no positive)."""
    pos = targets.sum()
    if pos == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    tp = targets[order]
    precision = np.cumsum(tp) / np.arange(1, len(tp) + 1)
    return float((precision * tp).sum() / pos)


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, ds: SegDataset, class_ids: list[int], labels: LabelSpec,
                        device: torch.device | str = "cpu") -> dict:
    """Per-class AP and F1 (probability threshold 0.5) against the split's tags (from masks where present).
    `model` must already be on `device`; images are scored one at a time (any size)."""
    data = TaggedImages(ds, class_ids, None)
    scores, targets = [], []
    for i in range(len(data)):
        item = data[i]
        scores.append(torch.sigmoid(model(item["image"][None].to(device))).cpu()[0])
        targets.append(item["target"])
    s, t = torch.stack(scores).numpy(), torch.stack(targets).numpy()
    per_class = {}
    for j, c in enumerate(class_ids):
        pred = s[:, j] >= 0.5
        tp, fp, fn = float((pred & (t[:, j] == 1)).sum()), float((pred & (t[:, j] == 0)).sum()), float((~pred & (t[:, j] == 1)).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else None
        per_class[labels.names[c]] = {"ap": average_precision(s[:, j], t[:, j]), "f1": f1, "positives": int(t[:, j].sum())}
    aps = [v["ap"] for v in per_class.values() if v["ap"] is not None]
    f1s = [v["f1"] for v in per_class.values() if v["f1"] is not None]
    return {"dataset": ds.name, "images": len(data), "mAP": float(np.mean(aps)) if aps else None,
            "mean_f1": float(np.mean(f1s)) if f1s else None, "per_class": per_class,
            "f1_threshold": 0.5}
