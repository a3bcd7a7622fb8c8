"""Dense-CRF refinement of CAM seeds into pseudo-masks with confidence-based ignore regions.

CAMs come from stride-16 features upsampled to the image, so their edges are blobs that spill over object
boundaries. A fully connected CRF (Krähenbühl & Koltun 2011, `pydensecrf`) pulls labels onto colour edges:
its bilateral term makes pixels that are close *and* of similar colour take the same label. This is the
"seed + CRF" step of WSSS pipelines and the first half of IRN's `cam_to_ir_label`.

The rule (IRN `cam_to_ir_label`, with AdvCAM's thresholds; reference notes 1.3 and 2.4), for a dataset with
a background class:

1. fg_conf = CRF(argmax([fg_threshold plane, maps])): a *high* background plane, so only strong CAM
   responses become foreground; what the CRF keeps as a class here is confidently that class.
2. bg_conf = CRF(argmax([bg_threshold plane, maps])): a *low* plane, so even weak responses count as
   object; what the CRF still calls background here is confidently background.
3. pixel = fg_conf's class where fg_conf says a foreground class; background where both say background;
   everything else (weak response: object in one reading, background in the other) is 255 = ignore, so a
   model trained on the pseudo-mask is not taught the uncertain band around objects either way.

Labels are indexed over [background] + keys inside the CRF (so it only chooses among classes the image is
tagged with) and mapped back to the dataset's class ids. IRN used 0.30 / 0.05; AdvCAM changed them to
0.35 / 0.15, the defaults here. The CRF settings are the reference ones: `unary_from_labels(gt_prob=0.7,
zero_unsure=False)`, Gaussian sxy=3 compat=3, bilateral sxy=50 srgb=5 compat=10, 10 mean-field steps.

Datasets without a background class (every pixel is some named class, e.g. MSRC-21 unmerged) have no
threshold to vary, so there is no dual reading: each pixel takes the argmax over the tagged classes' maps,
the CRF refines that, and pixels whose CRF marginal (the mean-field probability of the winning label) is
below `min_confidence` become 255. The marginal is the CRF's own uncertainty: low near edges it had to
move and where two classes' maps compete; 0.0 turns the ignore rule off. An image without tags then has no
class to give and is all 255 (as its seed is, see `seeds.py`).

An image *with* a background class but no tags is all background: its tags say there is no object, and
that is also what IRN's rule gives (a CRF over the background label alone). With tags derived from masks
this only happens for images that hold no object class.

Pseudo-masks are palette PNGs (255 = ignore) named `<safe id>.png` (`data.io.sample_file`), written to a temporary name and
renamed, so a killed run leaves no half file and a rerun skips finished images. The CRF runs on the CPU, one
process per image (`ProcessPoolExecutor`); processes are started with "spawn" because forking a parent that
has used CUDA or OpenMP threads (the CAM stage, in the same Python session) can deadlock or crash.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tqdm.auto import tqdm

from frugalseg.data import open_dataset
from frugalseg.data.io import make_folder, read_label_png, sample_file, write_json, write_label_png
from frugalseg.data.labels import IGNORE_INDEX
from frugalseg.data.samples import Sample, SegDataset
from frugalseg.errors import DataError, FrugalsegError, require
from frugalseg.weak.maps_io import load_maps, maps_path

log = logging.getLogger(__name__)

# AdvCAM's cam_to_ir_label thresholds (IRN used 0.30 / 0.05), the defaults here; reference notes 1.3.
ADVCAM_FG_THRESHOLD = 0.35
ADVCAM_BG_THRESHOLD = 0.15
# Without a background class: CRF marginal below this -> ignore. Not from a paper (the reference pipelines
# all have a background class). Mean-field marginals are overconfident (most pixels end near 1.0), so 0.8
# ignores only the thin band where the CRF stayed undecided (on MSRC-21 maps made from blurred ground truth
# about 0.5 % of pixels); raise it to 0.95-0.99 for a wider ignore band, 0.0 turns it off.
DEFAULT_MIN_CONFIDENCE = 0.8
MANIFEST = "pseudo_masks.json"


@dataclass(frozen=True)
class CrfSettings:
    """Dense-CRF parameters; the defaults are the reference pipeline's (IRN/AdvCAM `crf_inference_label`).

    `gt_prob` is how much the unary trusts the input labels (the rest is spread over the other labels);
    the Gaussian term smooths (positions only), the bilateral term snaps to colour edges (positions and
    RGB). `steps` is the number of mean-field iterations.
    """

    gt_prob: float = 0.7
    steps: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0

    def __post_init__(self) -> None:
        if not 0.0 < self.gt_prob < 1.0:
            raise ValueError(f"gt_prob must be in (0, 1), got {self.gt_prob}.")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}.")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")

    def kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _densecrf():
    """pydensecrf, imported only when a CRF is run (an optional dependency)."""
    dcrf = require("pydensecrf.densecrf", "crf", "Dense CRF refinement")
    utils = require("pydensecrf.utils", "crf", "Dense CRF refinement")
    return dcrf, utils


def _check_image(image: Any) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array (H, W, 3) uint8, got {type(image).__name__}.")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3) (RGB), got {image.shape}.")
    if image.dtype != np.uint8:
        raise ValueError(
            f"image must be uint8 RGB (0..255), got {image.dtype}: the bilateral term compares colours in "
            "0..255 units (srgb), so a float image in 0..1 would make every pixel look alike."
        )
    # pydensecrf takes a writable C-contiguous buffer: a strided view (a crop, a flip) or a read-only array
    # (what Pillow's np.asarray gives) is copied, as IRN's np.ascontiguousarray(np.copy(img)) does.
    if not (image.flags.c_contiguous and image.flags.writeable):
        image = np.array(image, order="C", copy=True)
    return image


def dense_crf(
    image: np.ndarray,
    unary: np.ndarray,
    n_labels: int | None = None,
    *,
    gt_prob: float = 0.7,
    steps: int = 10,
    gaussian_sxy: float = 3.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 50.0,
    bilateral_srgb: float = 5.0,
    bilateral_compat: float = 10.0,
    return_probs: bool = False,
) -> np.ndarray:
    """Refine a label map (or class probabilities) with a fully connected CRF on `image`.

    `image` (H, W, 3) uint8 RGB. `unary` is either integer labels (H, W) in 0..n_labels-1, turned into
    unaries as the reference does (`unary_from_labels(gt_prob, zero_unsure=False)`: every pixel is sure of
    its label with probability `gt_prob`), or float probabilities (n, H, W) in [0, 1] (e.g. a softmax,
    used as given through `unary_from_softmax`; `gt_prob` then unused). `n_labels` defaults to max label + 1
    (labels) or n (probabilities); give it when a label may be absent from this image.

    Returns the refined labels (H, W) int64, or with `return_probs` the mean-field marginals (n, H, W)
    float32 (their max per pixel is the CRF's confidence). With a single label there is nothing to
    decide: all zeros (marginals all 1) without calling the CRF.
    """
    image = _check_image(image)
    h, w = image.shape[:2]
    u = np.asarray(unary)
    if u.ndim == 2 and (np.issubdtype(u.dtype, np.integer) or u.dtype == bool):
        if u.shape != (h, w):
            raise ValueError(f"labels are {u.shape[0]}×{u.shape[1]} but the image is {h}×{w}; they must match.")
        u = u.astype(np.int64)
        lo, hi = (int(u.min()), int(u.max())) if u.size else (0, 0)
        n = hi + 1 if n_labels is None else int(n_labels)
        if lo < 0 or hi >= n:
            raise ValueError(f"labels span {lo}..{hi}; they must be in 0..{n - 1} (n_labels={n}).")
        if not 0.0 < gt_prob < 1.0:
            raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}.")
        from_labels = True
    elif u.ndim == 3 and np.issubdtype(u.dtype, np.floating):
        if u.shape[1:] != (h, w):
            raise ValueError(
                f"probabilities are {u.shape[1]}×{u.shape[2]} but the image is {h}×{w}; they must match."
            )
        n = u.shape[0] if n_labels is None else int(n_labels)
        if n != u.shape[0]:
            raise ValueError(f"n_labels={n} but {u.shape[0]} probability map(s) were given.")
        if u.size and (not np.isfinite(u).all() or u.min() < 0 or u.max() > 1):
            raise ValueError("probabilities must be finite and in [0, 1].")
        from_labels = False
    else:
        raise ValueError(
            "unary must be integer labels (H, W) or float probabilities (n, H, W), "
            f"got {u.dtype} with shape {u.shape}."
        )
    if n < 1:
        raise ValueError(f"n_labels must be at least 1, got {n}.")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")
    if n == 1:
        # unary_from_labels would divide by n - 1 = 0; and one label has no alternative anyway.
        return np.ones((1, h, w), np.float32) if return_probs else np.zeros((h, w), np.int64)

    dcrf, utils = _densecrf()
    if from_labels:
        energy = utils.unary_from_labels(u, n, gt_prob=gt_prob, zero_unsure=False)
    else:
        energy = utils.unary_from_softmax(u.astype(np.float32))
    crf = dcrf.DenseCRF2D(w, h, n)
    crf.setUnaryEnergy(np.ascontiguousarray(energy, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=image, compat=bilateral_compat)
    q = np.asarray(crf.inference(int(steps)), dtype=np.float32).reshape(n, h, w)
    return q if return_probs else q.argmax(axis=0).astype(np.int64)


def _check_maps(
    high_res: Any, keys: Any, image: np.ndarray, background_index: int | None
) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(high_res, dtype=np.float32)
    k = np.asarray(keys).reshape(-1)
    if k.size and not np.issubdtype(k.dtype, np.integer):
        raise ValueError(f"keys must be integer class ids, got {k.dtype}.")
    k = k.astype(np.int64)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (n, H, W), got {maps.shape}.")
    if maps.shape[0] != k.size:
        raise ValueError(f"{k.size} class id(s) but {maps.shape[0]} map(s); each key needs exactly one map.")
    if maps.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"maps are {maps.shape[1]}×{maps.shape[2]} but the image is {image.shape[0]}×{image.shape[1]}: "
            "the CRF needs the image-size (high_res) maps of this very image."
        )
    if k.size and (k.min() < 0 or k.max() >= IGNORE_INDEX):
        raise ValueError(f"class ids must be in 0..{IGNORE_INDEX - 1}, got {k.tolist()}.")
    if len(set(k.tolist())) != k.size:
        raise ValueError(f"keys hold duplicate class ids: {k.tolist()}.")
    if background_index is not None and background_index in k.tolist():
        raise ValueError(
            f"keys {k.tolist()} include the background class {background_index}; maps belong to foreground tags."
        )
    if maps.size and not np.isfinite(maps).all():
        raise ValueError("maps hold NaN or infinite values.")
    return maps, k


def _with_plane(maps: np.ndarray, threshold: float) -> np.ndarray:
    """argmax over [constant plane, maps]: 0 = background, i + 1 = keys[i]; ties go to background."""
    plane = np.full((1, *maps.shape[1:]), np.float32(threshold), dtype=np.float32)
    return np.concatenate([plane, maps], axis=0).argmax(axis=0)


def confident_pseudo_mask(
    image: np.ndarray,
    high_res: np.ndarray,
    keys: Sequence[int] | np.ndarray,
    background_index: int | None,
    *,
    fg_threshold: float = ADVCAM_FG_THRESHOLD,
    bg_threshold: float = ADVCAM_BG_THRESHOLD,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    crf: CrfSettings | None = None,
) -> np.ndarray:
    """A pseudo-mask (H, W) uint8 in dataset class ids, 255 = ignore, from one image and its maps.

    `high_res` (n, H, W) maps in [0, 1] at image size, `keys` (n,) their class ids. With a background
    class: IRN's dual-threshold rule (module docstring); `bg_threshold` must not exceed `fg_threshold`
    and `min_confidence` is unused. Without one (`background_index=None`): CRF over the argmax of the
    tagged maps, 255 where the CRF marginal is below `min_confidence`; thresholds unused.
    """
    crf = crf or CrfSettings()
    image = _check_image(image)
    maps, k = _check_maps(high_res, keys, image, background_index)
    h, w = image.shape[:2]
    settings = crf.kwargs()

    if background_index is None:
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}.")
        if k.size == 0:
            return np.full((h, w), IGNORE_INDEX, np.uint8)  # no tag, no class to give
        q = dense_crf(image, maps.argmax(axis=0), k.size, return_probs=True, **settings)
        out = k[q.argmax(axis=0)].astype(np.uint8)
        out[q.max(axis=0) < np.float32(min_confidence)] = IGNORE_INDEX
        return out

    for name, t in (("fg_threshold", fg_threshold), ("bg_threshold", bg_threshold)):
        if not math.isfinite(t):
            raise ValueError(f"{name} must be a finite number, got {t}.")
    if bg_threshold > fg_threshold:
        raise ValueError(
            f"bg_threshold ({bg_threshold}) must not exceed fg_threshold ({fg_threshold}): the low plane reads "
            "confident background, the high plane confident foreground."
        )
    if not 0 <= background_index < IGNORE_INDEX:
        raise ValueError(f"background_index must be in 0..{IGNORE_INDEX - 1} or None, got {background_index}.")
    if k.size == 0:
        return np.full((h, w), background_index, np.uint8)  # no object tag: all background (as IRN's rule gives)
    lut = np.concatenate([[background_index], k]).astype(np.uint8)  # CRF label index -> class id
    fg_conf = dense_crf(image, _with_plane(maps, fg_threshold), k.size + 1, **settings)
    if bg_threshold == fg_threshold:
        bg_conf = fg_conf
    else:
        bg_conf = dense_crf(image, _with_plane(maps, bg_threshold), k.size + 1, **settings)
    out = np.full((h, w), IGNORE_INDEX, np.uint8)
    fg = fg_conf > 0
    out[fg] = lut[fg_conf[fg]]
    out[~fg & (bg_conf == 0)] = background_index
    return out


# ---- a whole dataset -------------------------------------------------------------------------------
def _crf_image(image: np.ndarray, where: str) -> np.ndarray:
    """The RGB uint8 image the CRF compares colours on; a 2-D grey image (medical slices) is scaled to
    0..255 by its own min/max and repeated over three channels."""
    if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return image
    if image.ndim == 2:
        a = image.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        grey = ((a - lo) / max(hi - lo, 1e-6) * 255).round().astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    raise DataError(f"{where}: the CRF needs an RGB (H, W, 3) uint8 or a 2-D image, got {image.dtype} {image.shape}.")


def _refine_one(dataset: SegDataset, sample: Sample, maps_dir: Path, out_dir: Path, options: dict[str, Any]) -> str:
    where = f"{dataset.name}/{sample.id}"
    image = _crf_image(dataset.read_image(sample), where)
    # load_maps checks the maps were made at this image's size, naming the file if not.
    maps = load_maps(maps_path(maps_dir, sample.id), image_size=image.shape[:2], num_classes=dataset.labels.num_classes)
    try:
        mask = confident_pseudo_mask(image, maps.high_res, maps.keys, dataset.labels.background, **options)
    except ValueError as exc:
        raise DataError(f"{where} ({maps.path}): {exc}") from None
    write_label_png(sample_file(out_dir, sample.id, ".png"), mask, dataset.labels.palette_bytes())
    return sample.id


_WORKER: dict[str, Any] = {}


def _init_worker(dataset: SegDataset, maps_dir: Path, out_dir: Path, options: dict[str, Any]) -> None:
    _WORKER.update(dataset=dataset, maps_dir=maps_dir, out_dir=out_dir, options=options)


def _refine_in_worker(sample: Sample) -> str:
    try:
        return _refine_one(_WORKER["dataset"], sample, _WORKER["maps_dir"], _WORKER["out_dir"], _WORKER["options"])
    except FrugalsegError as exc:
        # Re-raised as a plain DataError(message): subclasses with other constructors do not unpickle.
        raise DataError(str(exc)) from None


def _open(dataset: SegDataset | str | Path, split: str | None) -> SegDataset:
    if isinstance(dataset, SegDataset):
        return dataset
    return open_dataset(dataset, split or "train")


def default_workers() -> int:
    """min(4, CPU count): the CRF is CPU-bound, one image per process; more than 4 rarely pays on a shared box."""
    return max(1, min(4, os.cpu_count() or 1))


def refine_dataset(
    maps_dir: str | Path,
    dataset: SegDataset | str | Path,
    out_dir: str | Path,
    *,
    split: str | None = None,
    workers: int | None = None,
    fg_threshold: float = ADVCAM_FG_THRESHOLD,
    bg_threshold: float = ADVCAM_BG_THRESHOLD,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    crf: CrfSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a CRF pseudo-mask PNG for every sample of `dataset` that has a maps file in `maps_dir`.

    `dataset` is a `SegDataset`, or a folder / task name opened at `split` (default "train"). Each mask
    goes to `out_dir/<safe id>.png` (palette, 255 = ignore), written atomically; an existing PNG is
    skipped, so a killed run resumes. `workers` processes run the CRF (None: `default_workers()`; 0 or 1:
    in this process). The CRF sees the sample's RGB image, which must be the maps' high_res size.

    Returns {"written", "skipped" (PNG already there), "no_maps" (samples without a maps file),
    "seconds", "workers", "settings", ...}; the same is saved as `out_dir/pseudo_masks.json`.
    """
    maps_dir, out_dir = Path(maps_dir), Path(out_dir)
    ds = _open(dataset, split)
    if ds.ndim != 2:
        raise DataError(f"{ds.name}: dense-CRF refinement is 2-D; this dataset holds {ds.ndim}-D images.")
    if not maps_dir.is_dir():
        raise DataError(f"{maps_dir}: maps folder not found; run the CAM stage (`frugalseg cams`) first.")
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}.")
    crf = crf or CrfSettings()
    options = {"fg_threshold": fg_threshold, "bg_threshold": bg_threshold,
               "min_confidence": min_confidence, "crf": crf}
    # Check the options once here, on a tiny dummy image, rather than in every worker.
    confident_pseudo_mask(np.zeros((1, 1, 3), np.uint8), np.zeros((0, 1, 1), np.float32), [],
                          ds.labels.background, **options)
    _densecrf()  # fail now, with the install hint, not inside a worker

    with_maps = [s for s in ds.samples if maps_path(maps_dir, s.id).exists()]
    no_maps = [s.id for s in ds.samples if not maps_path(maps_dir, s.id).exists()]
    todo = [s for s in with_maps if not sample_file(out_dir, s.id, ".png").exists()]
    skipped = len(with_maps) - len(todo)
    if not with_maps:
        raise DataError(f"{maps_dir}: no maps file for any of the {len(ds)} samples of {ds.name}; "
                        "were the maps made for another dataset or split?")
    make_folder(out_dir)
    log.info("%s: %d images with maps, %d already refined", ds.name, len(with_maps), skipped)
    t0 = time.time()
    bar = tqdm(total=len(todo), desc="crf pseudo-masks", disable=not progress)
    try:
        if workers <= 1 or len(todo) <= 1:
            for s in todo:
                _refine_one(ds, s, maps_dir, out_dir, options)
                bar.update(1)
        else:
            # The dataset travels once per worker (without its sample list), the samples one per task.
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx,
                                       initializer=_init_worker,
                                       initargs=(ds.with_samples([]), maps_dir, out_dir, options))
            try:
                futures = {pool.submit(_refine_in_worker, s) for s in todo}
                while futures:
                    done, futures = wait(futures, return_when=FIRST_EXCEPTION)
                    for f in done:
                        f.result()  # re-raises a worker's error here
                        bar.update(1)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    seconds = time.time() - t0
    summary = {
        "kind": "crf_pseudo_masks",
        "dataset": ds.name,
        "split": split,
        "maps_dir": str(maps_dir),
        "images": len(with_maps),
        "written": len(todo),
        "skipped": skipped,
        "no_maps": len(no_maps),
        "no_maps_ids": no_maps[:20],
        "seconds": round(seconds, 3),
        "images_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else None,
        "workers": workers,
        "background_index": ds.labels.background,
        "settings": {"fg_threshold": fg_threshold, "bg_threshold": bg_threshold,
                     "min_confidence": min_confidence, "crf": crf.kwargs()},
        "rule": ("IRN cam_to_ir_label: class where CRF(argmax[fg plane, maps]) says a class, background where "
                 "CRF(argmax[bg plane, maps]) also says background, else 255"
                 if ds.labels.background is not None else
                 "CRF(argmax over tagged maps), 255 where the CRF marginal < min_confidence"),
    }
    write_json(out_dir / MANIFEST, summary)
    return summary


# ---- evaluation --------------------------------------------------------------------------------------
def evaluate_pseudo_masks(
    out_dir: str | Path,
    dataset: SegDataset | str | Path,
    split: str | None = None,
    *,
    save: bool = True,
    truth: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Score the pseudo-masks in `out_dir` against the ground truth of `dataset` (opened at `split` if a name).

    `truth` (sample id -> mask) lets a caller that scores several folders read the ground truth once.

    Three numbers, because a pseudo-mask with ignore regions has two sides (how much it labels, how right
    that is):
    - `miou`: ignored pixels counted as background, IRN's `eval_sem_seg` convention (comparable with
      published pseudo-mask figures). Without a background class they count as wrong (a miss for the true
      class, a false positive for none).
    - `miou_labelled`: over the pixels the pseudo-mask labels only (its precision side).
    - `labelled_fraction`: labelled pixels / all pixels of the scored masks (its coverage side).
    Void truth pixels are excluded throughout; classes absent from truth and prediction are left out of the
    means (`frugalseg.metrics` rules). Samples without a mask are not scored; samples with a mask but no
    PNG are skipped and counted, never scored as empty. With `save`, the result is also written to
    `out_dir/eval_<split>.json`.
    """
    # torch and the metrics load here, not at import: the CRF's spawned workers import this module
    import torch

    from frugalseg.metrics import confusion_matrix, iou_per_class, nanmean, summarise

    out_dir = Path(out_dir)
    ds = _open(dataset, split)
    spec = ds.labels
    K, bg, void = spec.num_classes, spec.background, spec.ignore_index
    cm_main = torch.zeros((K, K) if bg is not None else (K + 1, K + 1), dtype=torch.long)
    cm_lab = torch.zeros(K, K, dtype=torch.long)
    labelled = total = 0
    scored, missing = 0, []
    for s in ds.samples:
        if s.mask is None:
            continue
        png = sample_file(out_dir, s.id, ".png")
        if not png.exists():
            missing.append(s.id)
            continue
        gt = truth[s.id] if truth is not None and s.id in truth else ds.read_mask(s)
        pred = read_label_png(png)
        if pred.shape != gt.shape:
            raise DataError(f"{png}: pseudo-mask is {pred.shape[0]}×{pred.shape[1]} but the mask of {s.id} is "
                            f"{gt.shape[0]}×{gt.shape[1]}; were the maps made from resized images?")
        bad = sorted({int(v) for v in np.unique(pred) if v >= K and v != void})
        if bad:
            raise DataError(f"{png}: holds class ids {bad[:10]} outside 0..{K - 1} (and {void} = ignore); "
                            f"was it made for another label spec?")
        is_void = pred == void
        labelled += int((~is_void).sum())
        total += int(pred.size)
        p = torch.from_numpy(pred.astype(np.int64))
        t = torch.from_numpy(gt.astype(np.int64))
        if bg is not None:
            cm_main += confusion_matrix(p.masked_fill(torch.from_numpy(is_void), bg), t, K, void)
        else:  # an extra "unlabelled" prediction column K: a miss for the true class
            cm_main += confusion_matrix(p.masked_fill(torch.from_numpy(is_void), K), t, K + 1, void)
        cm_lab += confusion_matrix(p, t.masked_fill(torch.from_numpy(is_void), void), K, void)
        scored += 1

    names = list(spec.names)
    labelled_only = summarise(cm_lab, names, bg)
    if bg is not None:
        main = summarise(cm_main, names, bg)
        miou, per_class = main["miou"], {n: v["iou"] for n, v in main["per_class"].items()}
    else:
        iou = iou_per_class(cm_main)[:K]
        m = nanmean(iou)
        miou = None if math.isnan(m) else round(m, 6)
        per_class = {n: (None if math.isnan(float(iou[i])) else round(float(iou[i]), 6)) for i, n in enumerate(names)}
    result = {
        "kind": "pseudo_mask_evaluation",
        "dataset": ds.name,
        "split": split,
        "out_dir": str(out_dir),
        "images": scored,
        "skipped_no_pseudo_mask": len(missing),
        "skipped_no_pseudo_mask_ids": missing[:20],
        "miou": miou,
        "miou_labelled": labelled_only["miou"],
        "labelled_fraction": round(labelled / total, 6) if total else None,
        "per_class_iou": per_class,
        "labelled_only": labelled_only,
        "rules": ("miou: ignored (255) pixels counted as background (IRN eval_sem_seg)" if bg is not None else
                  "miou: ignored (255) pixels counted as wrong (no background class)")
                 + "; miou_labelled: labelled pixels only; labelled_fraction over all pixels of the scored masks; "
                   "void truth excluded; classes absent from truth and prediction left out of means",
    }
    if save:
        write_json(out_dir / f"eval_{(split or 'all').replace('+', '_')}.json", result)
    return result
