"""Seeds from class activation maps, and how good they are against ground-truth masks.

A *seed* is the label map read straight off the CAMs, before any refinement (CRF, random walk). Seed mIoU is
the number WSSS papers report as "CAM" or "seed" quality; it is not the pseudo-mask mIoU (after IRN) nor the
final segmentation mIoU, and the three are easy to confuse (reference notes, section 7).

Rule (IRN `eval_cam`): with a background class, a constant plane at `threshold` is put in front of the tagged
classes' maps and each pixel takes the argmax: background where no map *exceeds* the threshold (a tie goes to
background, the first plane), else the class of the strongest map. IRN uses a fixed threshold of 0.15;
AdvCAM sweeps 0.15..0.34 on the very ground truth it reports on, which is an oracle. `evaluate_seeds`
therefore computes every threshold of a sweep in one pass, `sweep_table` labels the sweep's best as
"best_threshold_on_this_split", and `choose_threshold` is meant to be run on *train* and the threshold it
returns applied to val.

Without a background class (every pixel belongs to some named class) the threshold has nothing to separate:
each pixel takes the argmax over the tagged classes' maps, ties (including pixels where every map is 0) going
to the first key. An image with no tags then has no class to give: its seed is all void (255), and
`evaluate_seeds` skips it and counts it (`skipped_no_tags`) rather than inventing a prediction.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from frugalseg.data.labels import IGNORE_INDEX
from frugalseg.errors import DataError
from frugalseg.metrics import confusion_matrix, summarise
from frugalseg.weak.maps_io import CamMaps, load_maps, maps_path

#: IRN's background threshold of CAM seeds: the one place this 0.15 is defined
IRN_THRESHOLD = 0.15

# Object-size bins: the fraction of an image's valid (non-void) pixels that a class covers in the truth.
SIZE_BINS = ("small", "medium", "large")
SMALL_MAX = 0.05
LARGE_MIN = 0.20
SIZE_RULES = (
    "each (image, foreground class in that image's truth; every class if there is no background) pair is binned by the class's truth area as a fraction "
    "of the image's non-void pixels: small < 5 %, medium 5-20 % (both ends included), large > 20 %; a bin's IoU "
    "for a class is sum(TP) / sum(TP + FP + FN) over that bin's images only (false positives in images whose "
    "truth lacks the class fall in no bin); the bin's mean IoU is the mean over classes with at least one image "
    "in the bin"
)


def _best_of_maps(high_res: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(strongest value, its class id) per pixel over the tagged maps; ties go to the first key."""
    idx = high_res.argmax(axis=0)
    best = np.take_along_axis(high_res, idx[None], axis=0)[0]
    return best, keys[idx]


def _check_maps(high_res: Any, keys: Any) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(high_res, dtype=np.float32)
    k = np.asarray(keys).astype(np.int64).reshape(-1)
    if maps.ndim != 3:
        raise ValueError(f"high_res must have shape (n, height, width), got {maps.shape}.")
    if maps.shape[0] != k.shape[0]:
        raise ValueError(f"{k.shape[0]} class id(s) but {maps.shape[0]} map(s).")
    if k.size and (k.min() < 0 or k.max() >= IGNORE_INDEX):
        raise ValueError(f"class ids must be in 0..{IGNORE_INDEX - 1}, got {k.tolist()}.")
    return maps, k


def seed_from_maps(
    high_res: np.ndarray,
    keys: Sequence[int] | np.ndarray,
    threshold: float | None,
    background_index: int | None,
) -> np.ndarray:
    """A seed label map (H, W) uint8 from one image's maps (n, H, W) and their class ids (n,).

    With a background class: argmax over [constant `threshold` plane, maps] -> `background_index` or
    `keys[i]` (IRN's eval_cam; a map equal to the threshold loses to background; the comparison is made in
    float32, as in IRN's padded float32 array, so a float32 map value 0.15 ties with a threshold of 0.15). With
    `background_index=None`: argmax over the maps, ties to the first key, `threshold` ignored; no maps
    at all gives an all-void (255) seed.
    """
    maps, k = _check_maps(high_res, keys)
    h, w = maps.shape[1:]
    if background_index is None:
        if k.size == 0:
            return np.full((h, w), IGNORE_INDEX, dtype=np.uint8)
        return _best_of_maps(maps, k)[1].astype(np.uint8)
    if threshold is None:
        raise ValueError("a threshold is needed to separate background from the tagged classes.")
    seed = np.full((h, w), background_index, dtype=np.uint8)
    if k.size:
        best, label = _best_of_maps(maps, k)
        fg = best > np.float32(threshold)
        seed[fg] = label[fg]
    return seed


def _size_bin(fraction: float) -> str:
    if fraction < SMALL_MAX:
        return "small"
    return "large" if fraction > LARGE_MIN else "medium"


def _clean(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 6)


def iter_seed_items(maps_dir: Path | str, ds) -> Iterator[tuple[str, CamMaps | None, np.ndarray]]:
    """(id, maps, truth mask) for every sample of `ds` (a `SegDataset`) with a mask, for `evaluate_seeds`.
    A sample without a map file in `maps_dir` yields None maps (counted as skipped, never scored as empty);
    load errors name the file."""
    for s in ds.samples:
        if s.mask is None:
            continue
        p = maps_path(maps_dir, s.id)
        mask = ds.read_mask(s)
        if not p.exists():
            yield s.id, None, mask
            continue
        yield s.id, load_maps(p, image_size=mask.shape[:2], num_classes=ds.labels.num_classes), mask


def evaluate_seeds(
    items: Iterable[tuple[str, CamMaps | None, np.ndarray | None]],
    num_classes: int,
    names: Sequence[str],
    background_index: int | None,
    thresholds: Sequence[float] = (IRN_THRESHOLD,),
    *,
    split: str | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Any]:
    """Seed quality at every threshold in one pass over `items` (each image's maps are read once).

    `items` yields (sample_id, maps, truth): `truth` (H, W) class ids with `ignore_index` = void (excluded);
    a None truth (no ground truth) or None maps (none written) skips the image and is counted, never
    scored as empty. Without a background class the threshold changes nothing, so one result with
    threshold None is returned.

    Returns a JSON-ready dict: `results` is a list, one entry per threshold (ascending) holding `threshold`,
    the `summarise` metrics (miou, per_class IoU/Dice, pixels) and `by_object_size` (see `SIZE_RULES`);
    plus `images` (scored), `skipped_no_truth`, `skipped_no_maps`, `skipped_no_tags` (counts, each with the
    first 20 ids) and the rules. `split` is recorded so a sweep is always shown with the data it was chosen on.
    """
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes.")
    if background_index is None:
        ts: list[float | None] = [None]
    else:
        ts = sorted({float(t) for t in thresholds})
        if not ts:
            raise ValueError("give at least one threshold.")
        if not all(math.isfinite(t) for t in ts):
            raise ValueError(f"thresholds must be finite numbers, got {list(thresholds)}.")
    K = num_classes
    cms = [torch.zeros(K, K, dtype=torch.long) for _ in ts]
    # Per threshold, per bin: summed TP, FP, FN per class, and how many (image, class) pairs fell in the bin.
    bins = [{b: np.zeros((3, K), dtype=np.int64) for b in SIZE_BINS} for _ in ts]
    bin_counts = {b: np.zeros(K, dtype=np.int64) for b in SIZE_BINS}
    skipped_truth: list[str] = []
    skipped_maps: list[str] = []
    skipped_tags: list[str] = []
    scored = 0
    for sample_id, maps, truth in items:
        if truth is None:
            skipped_truth.append(str(sample_id))
            continue
        if maps is None:
            skipped_maps.append(str(sample_id))
            continue
        truth = np.asarray(truth)
        if truth.shape != maps.high_res.shape[1:]:
            raise DataError(
                f"{sample_id}: the maps are {maps.high_res.shape[1]}×{maps.high_res.shape[2]} but the mask is "
                f"{'×'.join(map(str, truth.shape))}; maps and masks must be at the same image size."
            )
        keys = np.asarray(maps.keys).astype(np.int64)
        bad = [int(k) for k in keys if k < 0 or k >= K or k == background_index]
        if bad:
            bg = f" except background ({background_index})" if background_index is not None else ""
            raise DataError(
                f"{sample_id}: maps are given for class id(s) {bad}; maps belong to tag classes 0..{K - 1}{bg}."
            )
        if background_index is None and keys.size == 0:
            skipped_tags.append(str(sample_id))  # nothing to predict: see the module docstring
            continue
        valid = truth != ignore_index
        truth_ids = truth[valid].astype(np.int64)
        if truth_ids.size and (truth_ids.min() < 0 or truth_ids.max() >= K):
            wrong = sorted({int(v) for v in np.unique(truth_ids) if v < 0 or v >= K})[:10]
            raise DataError(
                f"{sample_id}: mask holds class ids {wrong} outside 0..{K - 1} (and {ignore_index} = void)."
            )
        target = torch.from_numpy(truth.astype(np.int64))
        truth_counts = np.bincount(truth_ids, minlength=K)
        present = [int(c) for c in np.flatnonzero(truth_counts) if c != background_index]
        pair_bins = {c: _size_bin(truth_counts[c] / truth_ids.size) for c in present}
        for c, b in pair_bins.items():
            bin_counts[b][c] += 1
        high_res = np.asarray(maps.high_res, dtype=np.float32)
        if background_index is not None and keys.size:
            best, label = _best_of_maps(high_res, keys)
        for j, t in enumerate(ts):
            if background_index is None:
                seed = seed_from_maps(high_res, keys, None, None)
            else:
                seed = np.full(truth.shape, background_index, dtype=np.uint8)
                if keys.size:
                    fg = best > np.float32(t)  # the rule of seed_from_maps, reusing the per-pixel argmax across thresholds
                    seed[fg] = label[fg]
            cm_img = confusion_matrix(torch.from_numpy(seed.astype(np.int64)), target, K, ignore_index)
            cms[j] += cm_img
            tp = cm_img.diag().numpy()
            fp = cm_img.sum(0).numpy() - tp
            fn = cm_img.sum(1).numpy() - tp
            for c, b in pair_bins.items():
                bins[j][b][:, c] += (tp[c], fp[c], fn[c])
        scored += 1

    results = []
    for j, t in enumerate(ts):
        entry: dict[str, Any] = {"threshold": t}
        entry.update(summarise(cms[j], list(names), background_index))
        by_size: dict[str, Any] = {}
        for b in SIZE_BINS:
            tp, fp, fn = bins[j][b]
            denom = tp + fp + fn
            has = bin_counts[b] > 0
            iou = np.where(has & (denom > 0), tp / np.maximum(denom, 1), np.nan)
            by_size[b] = {
                "miou": _clean(float(iou[has].mean()) if has.any() else float("nan")),
                "pairs": int(bin_counts[b].sum()),
                "per_class": {names[c]: {"iou": _clean(float(iou[c])), "images": int(bin_counts[b][c])}
                              for c in range(K) if has[c]},
            }
        entry["by_object_size"] = by_size
        results.append(entry)
    return {
        "kind": "seed_evaluation",
        "split": split,
        "background_index": background_index,
        "images": scored,
        "skipped_no_truth": len(skipped_truth),
        "skipped_no_truth_ids": skipped_truth[:20],
        "skipped_no_maps": len(skipped_maps),
        "skipped_no_maps_ids": skipped_maps[:20],
        "skipped_no_tags": len(skipped_tags),
        "skipped_no_tags_ids": skipped_tags[:20],
        "results": results,
        "rules": (
            "seed = argmax over [threshold plane, tagged class maps] (ties to background); void truth pixels "
            "excluded; classes absent from truth and seed are null and left out of the mean"
            if background_index is not None else
            "seed = argmax over the tagged class maps (ties to the first tag; no background, so no threshold); "
            "void truth pixels excluded; an image without maps predicts nothing and is skipped (counted)"
        ),
        "size_bins": SIZE_RULES,
    }



# ---- sweeps ------------------------------------------------------------------------------------
def _scored(results: dict[str, Any]) -> list[dict[str, Any]]:
    entries = results.get("results") if isinstance(results, dict) else None
    if not entries:
        raise ValueError("no seed results: pass what evaluate_seeds returned.")
    return entries


def choose_threshold(results: dict[str, Any]) -> float | None:
    """The background threshold with the highest seed mIoU in `results` (ties: the lowest threshold).

    Run `evaluate_seeds` on the TRAIN split, choose here, and apply the returned threshold to val: a
    threshold chosen on the split it is reported on is an oracle (AdvCAM's sweep is). Returns None when
    the label spec has no background class (the seed then has no threshold).
    """
    entries = _scored(results)
    if entries[0]["threshold"] is None:
        return None
    defined = [e for e in entries if e.get("miou") is not None]
    if not defined:
        raise ValueError("no threshold has a defined mIoU (no image was scored).")
    best = max(defined, key=lambda e: (e["miou"], -e["threshold"]))
    return float(best["threshold"])


def sweep_table(results: dict[str, Any]) -> dict[str, Any]:
    """A threshold sweep as a JSON-ready record: one row per threshold (mIoU, mIoU by object size).

    The record is marked `"kind": "sweep"`, and its best entry is called `best_threshold_on_this_split`
    because it was chosen on the very ground truth it is scored on (an oracle, as in AdvCAM): report it as
    a sweep, and for a held-out number use `choose_threshold` on train and evaluate val at that threshold.
    `format_sweep_table` prints it.
    """
    entries = _scored(results)
    rows = []
    for e in entries:
        sizes = e.get("by_object_size") or {}
        rows.append({
            "threshold": e["threshold"],
            "miou": e.get("miou"),
            **{f"miou_{b}": (sizes.get(b) or {}).get("miou") for b in SIZE_BINS},
        })
    best = choose_threshold(results) if entries[0]["threshold"] is not None else None
    best_row = next((r for r in rows if r["threshold"] == best), None)
    return {
        "kind": "sweep",
        "split": results.get("split"),
        "images": results.get("images"),
        "best_threshold_on_this_split": best,
        "best_miou_on_this_split": best_row["miou"] if best_row else None,
        "note": ("best_threshold_on_this_split was chosen on the ground truth of this same split, so its mIoU "
                 "is an optimistic (oracle) figure; choose the threshold on train and apply it to val."),
        "rows": rows,
    }


def format_sweep_table(table: dict[str, Any]) -> str:
    """The sweep as fixed-width text for a terminal, best row marked with '*'."""
    def pct(v: Any) -> str:
        return "     -" if v is None else f"{100 * v:6.2f}"

    split = f" on {table['split']}" if table.get("split") else ""
    lines = [f"seed mIoU (%) by background threshold{split}, {table.get('images')} image(s)",
             " threshold    mIoU   small  medium   large"]
    for r in table["rows"]:
        mark = "*" if r["threshold"] is not None and r["threshold"] == table.get("best_threshold_on_this_split") else " "
        t = "  none" if r["threshold"] is None else f"{r['threshold']:6.3f}"
        lines.append(f"{mark}  {t}  {pct(r['miou'])}  {pct(r['miou_small'])}  {pct(r['miou_medium'])}  {pct(r['miou_large'])}")
    if table.get("best_threshold_on_this_split") is not None:
        lines.append(f"* best on this split ({table['best_threshold_on_this_split']:g}): an oracle choice, not a held-out result")
    return "\n".join(lines)
