"""Supervised segmentation stages: train, evaluate, predict (the layer the CLI calls).

`train(cfg)` runs the whole stage in a run directory: dataset + label budget, model, Lightning fit
(resumable), export, evaluation on the validation split, report. Each piece is also a plain function
usable from a notebook.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from frugalseg.config import TrainConfig
from frugalseg.data import LabelBudget, apply_budget, open_dataset
from frugalseg.data.budget import budget_manifest
from frugalseg.data.labels import LabelSpec
from frugalseg.data.samples import SegDataset
from frugalseg.data.torchdata import MaskedImages, pad_collate
from frugalseg.data.transforms import CropTransform, ResizeTransform
from frugalseg.errors import ConfigError, DataError
from frugalseg.metrics import confusion_matrix, summarise
from frugalseg.runs import RunDir, write_json

log = logging.getLogger(__name__)


# ---- data -------------------------------------------------------------------------------------
class VolumeCases(Dataset):
    """Whole volumes with their masks, one per item (validation of 2D networks on 3D cases)."""

    def __init__(self, ds: SegDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        image, mask = self.ds.read_pair(self.ds[i])
        return {"volume": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "mask": torch.from_numpy(mask.astype(np.int64)), "index": i}


def first_item(batch: list[dict]) -> dict:
    return batch[0]


def budget_of(cfg: TrainConfig) -> LabelBudget | None:
    if cfg.labelled_ids:
        return LabelBudget(listed=tuple(cfg.labelled_ids), rest="none", seed=cfg.budget_seed)
    if cfg.mask_count is not None:
        return LabelBudget(mask_count=cfg.mask_count, rest="none", seed=cfg.budget_seed)
    if cfg.mask_fraction is not None:
        return LabelBudget(mask_fraction=cfg.mask_fraction, rest="none", seed=cfg.budget_seed)
    return None


def open_with_classes(cfg: TrainConfig, split: str) -> SegDataset:
    """Open a split and apply the config's class remapping (merge into background, ignore)."""
    ds = open_dataset(cfg.data, split)
    if cfg.background_classes or cfg.ignore_classes:
        from frugalseg.data.labels import merge_into_background
        from frugalseg.data.voc import remap

        ds = remap(ds, merge_into_background(ds.labels, cfg.background_classes or [], cfg.ignore_classes or []))
    return ds


def load_training_data(cfg: TrainConfig) -> tuple[SegDataset, SegDataset | None, LabelBudget | None]:
    train_ds = open_with_classes(cfg, cfg.train_split)
    if cfg.mask_dir:
        from frugalseg.data.samples import with_mask_folder

        train_ds = with_mask_folder(train_ds, cfg.mask_dir)
    budget = budget_of(cfg)
    if budget is not None:
        train_ds = apply_budget(train_ds, budget)
    elif not any(s.supervision == "mask" for s in train_ds):
        raise DataError(f"{train_ds.name}: no training sample has a mask; supervised training needs masks.")
    if not any(s.supervision == "mask" for s in train_ds):
        raise DataError(f"{train_ds.name}: the label budget leaves no masked sample to train on.")
    val_ds = open_with_classes(cfg, cfg.val_split) if cfg.val_split else None
    if val_ds is not None and val_ds.labels.names != train_ds.labels.names:
        raise DataError(f"{cfg.data}: validation classes {val_ds.labels.names} differ from training classes.")
    return train_ds, val_ds, budget


def train_transform(cfg: TrainConfig):
    if cfg.policy == "crop":
        return CropTransform(crop=cfg.crop_size, scale=tuple(cfg.scale), base_size=cfg.base_size)
    return ResizeTransform(size=cfg.crop_size, augment=True)


def eval_transform(cfg: TrainConfig):
    return ResizeTransform(size=cfg.crop_size, augment=False) if cfg.policy == "resize" else None


def input_channels(ds: SegDataset) -> int:
    image = ds.read_image(ds[0])
    return 3 if image.ndim == 3 and image.shape[-1] == 3 and ds.ndim == 2 else 1


def model_spec(cfg: TrainConfig, labels: LabelSpec, in_chans: int) -> dict:
    spec = {"arch": cfg.arch, "num_classes": labels.num_classes, "in_chans": in_chans}
    if cfg.arch in ("ocr", "fcn"):
        spec.update(backbone=cfg.backbone, output_stride=cfg.output_stride, aux_stage=cfg.aux_stage)
    if cfg.policy == "resize":
        spec["input_size"] = cfg.crop_size  # images are resized to this at inference, logits back
    return spec


def val_loader(cfg: TrainConfig, val_ds: SegDataset) -> DataLoader:
    if val_ds.ndim == 3:
        return DataLoader(VolumeCases(val_ds), batch_size=1, collate_fn=first_item, num_workers=cfg.num_workers)
    return DataLoader(MaskedImages(val_ds, eval_transform(cfg), all_samples=True), batch_size=cfg.eval_batch_size,
                      collate_fn=pad_collate, num_workers=cfg.num_workers)


# ---- training ---------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Train, export, evaluate and report in `cfg.out`. A finished run is not retrained."""
    import lightning as L

    from frugalseg.engine import SegmentationModule, make_trainer, merge_resumed_logs
    from frugalseg.export import save_export
    from frugalseg.models import build_model

    cfg.validate()
    run = RunDir(cfg.out)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    train_ds, val_ds, budget = load_training_data(cfg)
    if budget is not None:
        write_json(run / "budget.json", budget_manifest(train_ds, budget))
    in_chans = input_channels(train_ds)
    if cfg.arch in ("ocr", "fcn") and train_ds.ndim == 2 and in_chans == 1 and cfg.pretrained is True:
        log.info("Greyscale input: the first convolution's ImageNet weights are summed over RGB.")
    spec = model_spec(cfg, train_ds.labels, in_chans)
    run.save_config(cfg)
    t0 = time.time()
    if run.stage_done("train") and not cfg.resume:
        log.info("%s: training already finished; skipping (delete stages/train.done to retrain).", run.path)
    else:
        model = build_model(spec, pretrained=cfg.pretrained if cfg.arch in ("ocr", "fcn") else False)
        if cfg.init_from:
            init_weights(model, spec, cfg.init_from)
        module = SegmentationModule(model, train_ds.labels, cfg, spec)
        train_data = MaskedImages(train_ds, train_transform(cfg), seed=cfg.seed)
        loader = DataLoader(train_data, batch_size=min(cfg.batch_size, len(train_data)), shuffle=True,
                            drop_last=len(train_data) > cfg.batch_size, num_workers=cfg.num_workers,
                            persistent_workers=cfg.num_workers > 0)
        ckpt = run.last_checkpoint if cfg.resume and run.last_checkpoint.exists() else None
        trainer = make_trainer(cfg, run.path, max_epochs=cfg.epochs, val=val_ds is not None, resuming=ckpt is not None)
        if cfg.resume and ckpt is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch.", run.checkpoints)
        trainer.fit(module, loader, val_loader(cfg, val_ds) if val_ds is not None else None, ckpt_path=ckpt)
        merge_resumed_logs(run.path)
        if trainer.interrupted:
            raise KeyboardInterrupt
        save_export(module.model, spec, train_ds.labels, run / "model")
        run.mark_done("train", {"seconds": round(time.time() - t0, 1), "samples": len(train_data),
                                "epochs": cfg.epochs})
    result = {"run": str(run.path), "train_seconds": round(time.time() - t0, 1)}
    if val_ds is not None:
        result["val"] = evaluate_run(run.path, split=cfg.val_split, ds=val_ds)
    return result


def init_weights(model: torch.nn.Module, spec: dict, source: str | Path) -> None:
    """Load every weight of an exported model into `model` (continued training, e.g. the next pseudo-mask
    round). The two must be the same network over the same classes; a mismatch is named, not a torch error."""
    from frugalseg.export import load_export

    if not Path(source).exists():
        raise ConfigError(f"--init-from {source}: no such export folder or checkpoint.")
    other, other_spec, _ = load_export(Path(source))
    keys = ("arch", "backbone", "num_classes", "in_chans", "output_stride", "aux_stage")
    diff = {k: (other_spec.get(k), spec.get(k)) for k in keys if other_spec.get(k) != spec.get(k)}
    if diff:
        detail = ", ".join(f"{k} {a} there vs {b} here" for k, (a, b) in diff.items())
        raise ConfigError(f"--init-from {source}: a different network ({detail}).")
    model.load_state_dict(other.state_dict())


# ---- evaluation -------------------------------------------------------------------------------
def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def predict_images(model: torch.nn.Module, images: torch.Tensor, input_size: int | None = None) -> torch.Tensor:
    """Class probabilities (B, K, H, W) for a batch of 2D images (resized to input_size and back if set)."""
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    x = F.interpolate(images, size=(input_size, input_size), mode="bilinear", align_corners=False) if input_size else images
    with _autocast(images.device):
        logits = model(x).float()
    if input_size:
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits.softmax(1)


def evaluate_model(
    model: torch.nn.Module,
    ds: SegDataset,
    labels: LabelSpec,
    *,
    input_size: int | None = None,
    batch_size: int = 4,
    pred_dir: Path | None = None,
    progress: bool = True,
) -> dict:
    """Metrics of `model` on every sample of `ds` with a mask; writes predictions if `pred_dir`."""
    from tqdm.auto import tqdm

    from frugalseg.data.io import write_label_png

    if ds.labels.names != labels.names:
        raise DataError(f"{ds.name}: classes {ds.labels.names} differ from the model's {labels.names}.")
    device = _device()
    model = model.to(device).eval()
    with_mask = ds.with_samples([s for s in ds.samples if s.mask is not None])
    if len(with_mask) == 0:
        raise DataError(f"{ds.name}: no sample has a ground-truth mask to evaluate against.")
    k = labels.num_classes
    cm = torch.zeros(k, k, dtype=torch.long)
    result: dict = {"dataset": ds.name, "samples": len(with_mask)}
    if ds.ndim == 3:
        return _evaluate_volumes(model, with_mask, labels, input_size, pred_dir, progress, result)
    loader = DataLoader(MaskedImages(with_mask, None, all_samples=True, cache=False), batch_size=batch_size,
                        collate_fn=pad_collate)
    for batch in tqdm(loader, desc=f"eval {ds.name}", disable=not progress, leave=False):
        probs = predict_images(model, batch["image"].to(device), input_size)
        preds = probs.argmax(1).cpu()
        for j, (h, w) in enumerate(batch["sizes"]):
            pred, truth = preds[j, :h, :w], batch["mask"][j, :h, :w]
            cm += confusion_matrix(pred, truth, k, labels.ignore_index)
            if pred_dir is not None:
                sample = with_mask[int(batch["index"][j])]
                write_label_png(Path(pred_dir) / f"{sample.id}.png", pred.numpy().astype(np.uint8), labels.palette_bytes())
    result.update(summarise(cm, labels.names, labels.background))
    result["kind"] = "2d"
    return result


def _evaluate_volumes(model, ds: SegDataset, labels: LabelSpec, input_size, pred_dir, progress, result) -> dict:
    """Per-case Dice, HD95, ASD (empty predictions flagged, never scored as distance 0)."""
    from tqdm.auto import tqdm

    from frugalseg.inference import predict_volume_slices
    from frugalseg.surface_metrics import surface_report

    k = labels.num_classes
    cm = torch.zeros(k, k, dtype=torch.long)
    fg = labels.foreground
    per_case = []
    device = next(model.parameters()).device
    for sample in tqdm(ds.samples, desc=f"eval {ds.name}", disable=not progress, leave=False):
        image, mask = ds.read_pair(sample)
        volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        probs = predict_volume_slices(model, volume.to(device), size=input_size)
        pred = probs.argmax(1).cpu().numpy().astype(np.uint8)
        cm += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(mask.astype(np.int64)), k, labels.ignore_index)
        rep = surface_report(pred, mask, fg, sample.spacing)
        per_case.append({"id": sample.id, **_case_entry(rep, labels)})
        if pred_dir is not None:
            _write_volume_prediction(Path(pred_dir) / f"{sample.id}.nii.gz", pred, sample.spacing)
    result.update(summarise(cm, labels.names, labels.background))
    result["kind"] = "volume"
    result["per_case"] = per_case
    units = "mm" if all(s.spacing for s in ds.samples) else "voxel"
    result["surface"] = {}
    for c in fg:
        name = labels.names[c]
        d = [pc["dice"][name] for pc in per_case]
        h = [pc["hd95"][name] for pc in per_case if pc["hd95"][name] is not None]
        a = [pc["asd"][name] for pc in per_case if pc["asd"][name] is not None]
        result["surface"][name] = {
            "dice": float(np.mean(d)),
            "hd95": float(np.mean(h)) if h else None,
            "asd": float(np.mean(a)) if a else None,
            "units": units,
            "empty_pred_cases": sum(pc["empty_pred"][name] for pc in per_case),
        }
    result["case_mean_dice"] = float(np.mean([v["dice"] for v in result["surface"].values()]))
    hd = [v["hd95"] for v in result["surface"].values() if v["hd95"] is not None]
    result["case_mean_hd95"] = float(np.mean(hd)) if hd else None
    result["surface_units"] = units
    return result


def _case_entry(rep: dict, labels: LabelSpec) -> dict:
    def val(x):
        return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)

    out = {"dice": {}, "hd95": {}, "asd": {}, "empty_pred": {}}
    for c, r in rep.items():
        name = labels.names[int(c)]
        out["dice"][name] = float(r["dice"]) if not np.isnan(r["dice"]) else 1.0  # both empty: perfect agreement
        out["hd95"][name] = val(r["hd95"])
        out["asd"][name] = val(r["asd"])
        out["empty_pred"][name] = bool(r["empty_pred"])
    return out


def _write_volume_prediction(path: Path, pred: np.ndarray, spacing) -> None:
    try:
        from frugalseg.data.nifti import write_nifti
    except ImportError:  # pragma: no cover
        return
    write_nifti(path, pred, spacing or (1.0,) * pred.ndim)


def evaluate_run(run_path: str | Path, split: str | None = "val", ds: SegDataset | None = None,
                 data: str | None = None, write_predictions: bool = True, report: bool = True) -> dict:
    """Evaluate a run's exported model on a split; writes metrics/<split>.json, predictions, report."""
    from frugalseg.config import load_config
    from frugalseg.export import load_export

    run = RunDir(run_path)
    if not (run / "model" / "config.json").exists():
        raise DataError(f"{run.path}: no exported model (model/config.json); has training finished?")
    model, spec, labels = load_export(run / "model")
    if ds is None:
        cfg = load_config(run / "config.yaml")
        if data:
            cfg.data = data
        ds = open_with_classes(cfg, split or "val")
    pred_dir = run / "predictions" / (split or "eval") if write_predictions else None
    metrics = evaluate_model(model, ds, labels, input_size=spec.get("input_size"), pred_dir=pred_dir)
    metrics.update(split=split, model=spec)
    run.write_metrics(split or "eval", metrics)
    if report:
        try:
            from frugalseg.report import write_report

            write_report(run.path, ds=ds, split=split or "eval")
        except ImportError:  # pragma: no cover
            log.warning("report module unavailable; metrics written without report.html")
    return metrics


# ---- prediction -------------------------------------------------------------------------------
def predict_files(model_path: str | Path, inputs: Iterable[str | Path], out_dir: str | Path, overlays: bool = True) -> list[Path]:
    """Predict masks for image files or folders: palette PNGs (+ overlays) for 2D, NIfTI for volumes."""
    from frugalseg.data.io import RASTER_SUFFIXES, read_rgb, suffix_of, write_label_png, write_rgb
    from frugalseg.data.samples import _volume_reader
    from frugalseg.data.transforms import to_tensor_image
    from frugalseg.export import load_export

    model, spec, labels = load_export(Path(model_path))
    device = _device()
    model = model.to(device)
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if suffix_of(f) in RASTER_SUFFIXES | {".h5", ".nii", ".nii.gz"})
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder.")
    if not files:
        raise DataError("No input images found.")
    out_dir = Path(out_dir)
    written = []
    for f in files:
        stem = f.name[: -len(suffix_of(f))]
        if suffix_of(f) in RASTER_SUFFIXES:
            image = read_rgb(f)
            x = to_tensor_image(image)
            if spec.get("in_chans", 3) == 1:
                x = x.mean(0, keepdim=True)
            pred = predict_images(model, x[None].to(device), spec.get("input_size")).argmax(1)[0].cpu().numpy().astype(np.uint8)
            path = out_dir / f"{stem}.png"
            write_label_png(path, pred, labels.palette_bytes())
            if overlays:
                from frugalseg.report.overlays import overlay

                write_rgb(out_dir / "overlays" / f"{stem}.jpg", overlay(image, pred, labels))
        else:
            from frugalseg.inference import predict_volume_slices

            volume = torch.from_numpy(np.ascontiguousarray(_volume_reader(f)[0](f), dtype=np.float32))
            if volume.ndim != 3:
                raise DataError(f"{f}: expected a 3D volume, got shape {tuple(volume.shape)}.")
            if spec["arch"] == "vnet3d":
                raise ConfigError("3D network prediction is served by the semi-supervised volume path.")
            pred = predict_volume_slices(model, volume.to(device), size=spec.get("input_size")).argmax(1).numpy().astype(np.uint8)
            path = out_dir / f"{stem}.nii.gz"
            _write_volume_prediction(path, pred, None)
        written.append(path)
    return written
