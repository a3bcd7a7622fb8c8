"""Stage `classify`: a multi-label tag classifier (IRN-style head) trained on image tags only.

Masks are never read for training: a sample's tags are the dataset's tags, or, for a sample that has a
mask, the classes present in it (what a user with masks would tag). The classifier covers the foreground
classes only (the background is what no tag names); `class_ids` maps its outputs back to dataset ids.

Training follows IRN where it is right: multi-label soft-margin loss, BN statistics frozen, early stages
frozen, SGD with poly decay, the new 1x1 head at 10x the backbone's learning rate, random rescale +
crop + flip. Not copied: IRN's optimizer passes weight decay where SGD expects momentum (momentum 1e-4 in
effect); here momentum is a real option (default 0.9).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from frugalseg.data.labels import LabelSpec
from frugalseg.data.samples import SegDataset
from frugalseg.data.torchdata import EpochAware, SharedEpoch, sample_generator
from frugalseg.data.transforms import CropTransform, to_tensor_image
from frugalseg.errors import ConfigError, DataError
from frugalseg.runs import RunDir, write_json

log = logging.getLogger(__name__)


@dataclass
class ClassifyConfig:
    data: str = ""
    out: str = "runs/classify"
    train_split: str = "train"  # "train+val" joins splits (tags only: WSSS maps the images it trains on)
    eval_split: str | None = "val"  # per-class AP / F1 on this split's tags
    background_classes: list[str] | None = None
    ignore_classes: list[str] | None = None
    backbone: str = "tf_efficientnet_lite0"
    pretrained: bool | str = True
    output_stride: int = 16
    frozen_stages: int = 3  # feature stages not trained (IRN: up to stride 8)
    freeze_bn: bool = True
    peak_stimulation: bool = False  # PRM: class score = mean response at peaks
    epochs: int = 8
    max_steps: int = -1
    batch_size: int = 16
    lr: float = 0.01
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    crop_size: int = 256
    base_size: int = 320  # longer side rescaled to this, then by a random factor in `scale`
    scale: tuple[float, float] = (0.5, 1.0)
    seed: int = 0
    precision: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_workers: int = 0
    resume: bool = False
    progress: bool = True

    def validate(self) -> "ClassifyConfig":
        from frugalseg.config import check_common

        check_common(self)
        return self


def open_splits(cfg, splits: str) -> SegDataset:
    """One dataset over '+'-joined split names (e.g. train+val), with the config's class remapping."""
    from frugalseg.supervised import open_with_classes

    parts = [open_with_classes(cfg, s) for s in splits.split("+") if s]
    if not parts:
        raise ConfigError(f"No split named in '{splits}'.")
    samples, seen = [], set()
    for p in parts:
        if p.labels.names != parts[0].labels.names:
            raise DataError(f"{cfg.data}: splits {splits} have different classes.")
        samples += [s for s in p.samples if s.id not in seen]
        seen |= {s.id for s in p.samples}
    return parts[0].with_samples(samples, name=f"{parts[0].name.split(':')[0]}:{splits}")


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


def classifier_spec(cfg: ClassifyConfig, labels: LabelSpec) -> dict:
    return {
        "kind": "tag_classifier", "backbone": cfg.backbone, "output_stride": cfg.output_stride,
        "class_ids": classifier_classes(labels), "peak_stimulation": cfg.peak_stimulation,
        "bias": cfg.peak_stimulation, "frozen_stages": cfg.frozen_stages, "freeze_bn": cfg.freeze_bn,
    }


def build_classifier(spec: dict, pretrained: bool | str = False):
    from frugalseg.models.tag_classifier import TagClassifier

    return TagClassifier(
        len(spec["class_ids"]), backbone=spec["backbone"], pretrained=pretrained, output_stride=spec["output_stride"],
        freeze_bn=spec.get("freeze_bn", True), frozen_stages=spec.get("frozen_stages", 3),
        peak_stimulation=spec.get("peak_stimulation", False), bias=spec.get("bias", False),
    )


def save_classifier(model: torch.nn.Module, spec: dict, labels: LabelSpec, folder: Path) -> None:
    from safetensors.torch import save_file

    from frugalseg.data.io import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(folder / "config.json", {"format_version": 1, "model": spec, "labels": labels.to_dict()})


def load_classifier(run_or_folder: str | Path):
    """(model in eval mode, spec, labels) from a classify run directory or its model/ folder."""
    import json

    from safetensors.torch import load_file

    p = Path(run_or_folder)
    folder = p / "model" if (p / "model" / "config.json").exists() else p
    if not (folder / "config.json").exists():
        raise DataError(f"{p}: no trained classifier here (expected model/config.json); run `frugalseg classify` first.")
    meta = json.loads((folder / "config.json").read_text())
    if meta.get("model", {}).get("kind") != "tag_classifier":
        raise DataError(f"{p}: this model is not a tag classifier (kind {meta.get('model', {}).get('kind')}).")
    spec = meta["model"]
    model = build_classifier(spec, pretrained=False)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
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
def evaluate_classifier(model, ds: SegDataset, class_ids: list[int], labels: LabelSpec, batch_size: int = 8) -> dict:
    """Per-class AP and F1 (probability threshold 0.5) against the split's tags (from masks where present)."""
    data = TaggedImages(ds, class_ids, None)
    device = next(model.parameters()).device
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


def train_classifier(cfg: ClassifyConfig) -> dict:
    """Train (or resume, or skip when finished) the tag classifier in cfg.out; evaluate AP/F1."""
    import lightning as L

    from frugalseg.engine import ClassifierModule, make_trainer, merge_resumed_logs

    cfg.validate()
    run = RunDir(cfg.out)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    train_ds = open_splits(cfg, cfg.train_split)
    labels = train_ds.labels
    spec = classifier_spec(cfg, labels)
    run.save_config(cfg)
    t0 = time.time()
    if run.stage_done("classify") and not cfg.resume:
        log.info("%s: classifier already trained; skipping (delete stages/classify.done to retrain).", run.path)
    else:
        model = build_classifier(spec, pretrained=cfg.pretrained)
        data = TaggedImages(train_ds, spec["class_ids"], CropTransform(cfg.crop_size, tuple(cfg.scale), True, cfg.base_size), cfg.seed)
        if data.targets.sum() == 0:
            raise DataError(f"{train_ds.name}: no image carries a foreground tag; nothing to classify.")
        loader = DataLoader(data, batch_size=min(cfg.batch_size, len(data)), shuffle=True, drop_last=len(data) > cfg.batch_size,
                            num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
        module = ClassifierModule(model, cfg)
        ckpt = run.last_checkpoint if cfg.resume and run.last_checkpoint.exists() else None
        trainer = make_trainer(cfg, run.path, max_epochs=cfg.epochs, val=False, resuming=ckpt is not None)
        trainer.fit(module, loader, ckpt_path=ckpt)
        merge_resumed_logs(run.path)
        if trainer.interrupted:
            raise KeyboardInterrupt
        save_classifier(module.model, spec, labels, run / "model")
        run.mark_done("classify", {"seconds": round(time.time() - t0, 1), "images": len(data), "epochs": cfg.epochs})
    result = {"run": str(run.path), "train_seconds": round(time.time() - t0, 1)}
    if cfg.eval_split:
        model, spec, labels = load_classifier(run.path)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        metrics = evaluate_classifier(model.to(device), open_splits(cfg, cfg.eval_split), spec["class_ids"], labels)
        metrics["split"] = cfg.eval_split
        run.write_metrics(f"classify_{cfg.eval_split}", metrics)
        result["eval"] = metrics
    return result
