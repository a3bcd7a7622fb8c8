"""One evaluation of a segmentation network, for 2D images and for volumes, with one result schema.

`evaluate(model, ds, labels, device=...)` predicts every case of `ds` that has a mask and scores it:

- the confusion matrix over every valid pixel/voxel (void = `labels.ignore_index` excluded everywhere):
  `miou`, `mean_dice`, `mean_dice_foreground`, `pixel_accuracy`, `pixels`, `per_class` (`metrics.summarise`);
- per case and foreground class: Dice, Jaccard, HD95 and ASD (`surface_metrics.surface_report`);
  an empty prediction has no surface distance (flagged in `empty_pred`, never scored 0, unlike the
  reference's medpy wrapper); a class absent from both prediction and truth has Dice and Jaccard 1;
  per-case Jaccard is Dice / (2 − Dice) (exact for one case);
- their means over cases per class (`surface`) and over classes (`case_mean_*`).

How a case is predicted depends on the data and the network (`dims`, `size`):
- 2D images: batches of `batch_size` images (padded to the largest, cropped back), resized to `size` and
  back when set (`inference.predict_images`; `amp`: bf16 autocast on CUDA);
- volumes through a 2D network (`dims=2`): slice by slice, resized to `size` when set;
- volumes through a 3D network (`dims=3`): MONAI sliding window of `size` with `overlap`.
`largest_component` keeps each class's largest connected component first (DTC's `nms=1`).

Result keys (the same for every caller: supervised runs, semi-supervised runs, `frugalseg eval`):

    dataset, samples, kind ("2d" | "volume"),
    miou, mean_dice, mean_dice_foreground, pixel_accuracy, pixels, per_class, rules,
    surface: {class: {dice, jaccard, hd95, asd, units, empty_pred_cases}},
    case_mean_dice, case_mean_jaccard, case_mean_hd95, case_mean_asd, surface_units,
    per_case: [{id, dice: {class: v}, jaccard, hd95, asd, empty_pred}]

Units are mm when every case carries its spacing, else voxels (volumes) or pixels (2D images).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from frugalseg.data.io import sample_file, write_label_png
from frugalseg.data.labels import LabelSpec
from frugalseg.data.nifti import write_nifti
from frugalseg.data.samples import Sample, SegDataset
from frugalseg.data.torchdata import MaskedImages, case_input, pad_collate
from frugalseg.errors import DataError, MissingDependencyError
from frugalseg.inference import keep_largest_component, model_device, predict_case, predict_images
from frugalseg.metrics import confusion_matrix, summarise
from frugalseg.surface_metrics import surface_report

log = logging.getLogger(__name__)

__all__ = ["evaluate"]

CASE_METRICS = ("dice", "jaccard", "hd95", "asd")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    ds: SegDataset,
    labels: LabelSpec,
    *,
    device: torch.device | str | None = None,
    dims: int = 2,
    size: int | Sequence[int] | None = None,
    overlap: float = 0.5,
    largest_component: bool = False,
    batch_size: int = 1,
    amp: bool = False,
    pred_dir: Path | str | None = None,
    max_cases: int | None = None,
    progress: bool = True,
) -> dict:
    """Metrics of `model` on every case of `ds` with a mask (see the module docstring for the keys).

    `device`: where the model runs (None: where it is); `dims`, `size`, `overlap`: how cases are predicted
    (2D network resized to `size` or none; 3D network by sliding window of `size`); `pred_dir`: also write
    each case's prediction there (palette PNG for 2D images, NIfTI for volumes; `data.io.sample_file` names).
    """
    if ds.labels.names != labels.names:
        raise DataError(f"{ds.name}: classes {ds.labels.names} differ from the model's {labels.names}.")
    device = torch.device(device) if device is not None else model_device(model)
    model = model.to(device).eval()
    samples = [s for s in ds.samples if s.mask is not None][: max_cases or None]
    if not samples:
        raise DataError(f"{ds.name}: no sample has a ground-truth mask to evaluate against.")
    if ds.ndim == 2 and dims != 2:
        raise DataError(f"{ds.name}: a 3D network cannot segment 2D images; train on volumes or use a 2D network.")
    scorer = _Scorer(labels, largest_component, pred_dir)
    desc = f"eval {ds.name}"
    if ds.ndim == 2:
        subset = ds.with_samples(samples)
        loader = DataLoader(MaskedImages(subset, None, all_samples=True, cache=False), batch_size=max(1, batch_size),
                            collate_fn=pad_collate)
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            preds = predict_images(model, batch["image"], size, device=device, amp=amp).argmax(1)
            for j, (h, w) in enumerate(batch["sizes"]):
                sample = subset[int(batch["index"][j])]
                scorer.add(sample, preds[j, :h, :w].numpy().astype(np.uint8), batch["mask"][j, :h, :w].numpy())
    else:
        for sample in tqdm(samples, desc=desc, disable=not progress, leave=False):
            image, mask = ds.read_pair(sample)
            probs = predict_case(model, case_input(image, ds.ndim, dims), dims, size, overlap, device=device)
            scorer.add(sample, probs.argmax(0).numpy().astype(np.uint8), mask)
    kind = "volume" if ds.ndim == 3 else "2d"
    units = "mm" if all(s.spacing for s in samples) else ("voxel" if kind == "volume" else "pixel")
    result: dict = {"dataset": ds.name, "samples": len(samples), "kind": kind}
    result.update(scorer.summary(units))
    return result


def _num(x) -> float | bool | None:
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    return None if x is None or math.isnan(float(x)) else float(x)


def _mean(values: list) -> float | None:
    return float(np.mean(values)) if values else None


class _Scorer:
    """Accumulates the confusion matrix and the per-case entries; writes predictions."""

    def __init__(self, labels: LabelSpec, largest_component: bool, pred_dir: Path | str | None):
        self.labels = labels
        self.fg = list(labels.foreground)
        self.largest_component = largest_component
        self.pred_dir = Path(pred_dir) if pred_dir is not None else None
        self.cm = torch.zeros(labels.num_classes, labels.num_classes, dtype=torch.long)
        self.per_case: list[dict] = []
        self._write_volumes = True

    def add(self, sample: Sample, pred: np.ndarray, mask: np.ndarray) -> None:
        labels = self.labels
        if pred.ndim == 3 and mask.ndim == 2:  # a 2D image predicted as a one-slice case
            pred = pred[0]
        if self.largest_component:
            pred = keep_largest_component(pred, self.fg)
        self.cm += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(mask.astype(np.int64)),
                                    labels.num_classes, labels.ignore_index)
        rep = surface_report(pred, mask, self.fg, sample.spacing, labels.ignore_index)
        entry = {"id": sample.id, **{m: {labels.names[c]: _num(r[m]) for c, r in rep.items()}
                                     for m in ("dice", "hd95", "asd", "empty_pred")}}
        entry["dice"] = {c: 1.0 if d is None else d for c, d in entry["dice"].items()}  # both empty: agreement
        entry["jaccard"] = {c: d / (2.0 - d) for c, d in entry["dice"].items()}
        self.per_case.append(entry)
        if self.pred_dir is not None:
            self._write(sample, pred)

    def _write(self, sample: Sample, pred: np.ndarray) -> None:
        if pred.ndim == 2:
            write_label_png(sample_file(self.pred_dir, sample.id, ".png"), pred, self.labels.palette_bytes())
            return
        if not self._write_volumes:
            return
        try:
            write_nifti(sample_file(self.pred_dir, sample.id, ".nii.gz"), pred, sample.spacing or (1.0,) * pred.ndim)
        except MissingDependencyError as exc:
            # Deliberate: the metrics do not need NIfTI files; say once why there are none, and go on.
            log.warning("Volume predictions not written: %s", exc)
            self._write_volumes = False

    def summary(self, units: str) -> dict:
        labels, per_case = self.labels, self.per_case
        out = summarise(self.cm, labels.names, labels.background)
        surface = {}
        for c in self.fg:
            name = labels.names[c]
            surface[name] = {
                "dice": float(np.mean([pc["dice"][name] for pc in per_case])),
                "jaccard": float(np.mean([pc["jaccard"][name] for pc in per_case])),
                "hd95": _mean([pc["hd95"][name] for pc in per_case if pc["hd95"][name] is not None]),
                "asd": _mean([pc["asd"][name] for pc in per_case if pc["asd"][name] is not None]),
                "units": units,
                "empty_pred_cases": sum(bool(pc["empty_pred"][name]) for pc in per_case),
            }
        values = surface.values()
        out["surface"] = surface
        for m in CASE_METRICS:
            out[f"case_mean_{m}"] = _mean([v[m] for v in values if v[m] is not None])
        out["surface_units"] = units
        out["per_case"] = per_case
        return out
