"""Stage `cams`: class maps (CAM, AdvCAM or PRM) for every image of a split, one .npz per image; and
`eval-seeds`: how good the seeds read off those maps are against the split's masks.

Resumable: an image whose map file exists is skipped, so a killed run continues where it stopped. Images
are grouped by size and climbed/forwarded in batches through the method of `MAP_METHODS`
(`frugalseg.weak.methods`). The map files hold dataset class ids (`keys`), the stride-4 maps and the
image-size maps, all in [0, 1]; `maps.json` records the method and settings, and `gallery.html` shows the
first images with their maps, seeds and ground truth.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from frugalseg.data import open_splits
from frugalseg.data.io import read_json, write_json
from frugalseg.data.samples import SegDataset
from frugalseg.data.transforms import to_tensor_image
from frugalseg.errors import ConfigError, DataError
from frugalseg.report.gallery import write_maps_gallery
from frugalseg.runs import RunDir
from frugalseg.stages.options import RunOptions, device_of, option, read_config_file
from frugalseg.stages.run_guard import claim_run_dir
from frugalseg.weak.classify import load_classifier
from frugalseg.weak.maps_io import maps_path, save_maps
from frugalseg.weak.methods import MAP_METHODS, MapMethodName, method_options
from frugalseg.weak.seeds import IRN_THRESHOLD, choose_threshold, evaluate_seeds, iter_seed_items, sweep_table

log = logging.getLogger(__name__)

SCALES_HELP = "Image scales for maps (repeat the option: --scales 1.0 --scales 0.5)."
GALLERY_IMAGES_HELP = "Images shown in gallery.html (0: no gallery)."
GALLERY_THRESHOLD_HELP = "Background threshold of the seeds shown in gallery.html (IRN: 0.15)."


@dataclass
class MapsConfig(RunOptions):
    # inherited machinery that map making does not use (it trains nothing and reads no workers' batches)
    CLI_HIDDEN: ClassVar[tuple[str, ...]] = ("seed", "precision", "strategy", "num_workers", "resume")
    classifier: str = option("", "A classify run directory.")
    out: str = option("", "Folder for the maps [default: <classifier>/maps_<method>_<split>].")
    method: MapMethodName = option("cam", "cam (forward pass), advcam (anti-adversarial climbing) or prm (peak "
                                          "response maps + instances).")
    data: str | None = option(None, "Dataset to map [default: the classifier's].")
    background_classes: list[str] | None = option(None, "Class names merged into background [default: the "
                                                        "classifier's].")
    ignore_classes: list[str] | None = option(None, "Class names turned into void [default: the classifier's].")
    split: str = option("train", "Split(s) to map; '+' joins splits (train+val).")
    scales: tuple[float, ...] = option((1.0, 0.5, 1.5, 2.0), SCALES_HELP, gt=0)
    batch_size: int = option(4, "Images per batch (AdvCAM climbs all their tagged classes at once).", ge=1)
    limit: int | None = option(None, "Only the first N images of the split (a fixed, stated subset).", ge=1)
    high_res: Literal["resize", "stride16"] = option(
        "resize", "CAM/AdvCAM image-size maps: each scale's map stretched onto the image (resize), or IRN's "
                  "stride-16 up-size 16*ceil(H/16) x 16*ceil(W/16) cropped to the image (stride16).")
    # AdvCAM
    steps: int = option(27, "AdvCAM T: climbing steps per scale (half of them at scale 0.5, as the reference).", ge=1)
    step_size: float = option(0.08, "AdvCAM xi: step per climb, after max-normalising the gradient.", ge=0)
    restriction: float = option(7.0, "AdvCAM lambda: weight of the restriction penalty (fractional allowed).", ge=0)
    mask_threshold: float = option(0.5, "AdvCAM tau: restriction mask = map > tau * max, rebuilt every step.", ge=0,
                                   le=1)
    gradcam_scale: bool = option(True, "AdvCAM: penalise the reference's Grad-CAM-scaled maps (else raw CAM "
                                       "values).")
    clamp: Literal["original", "previous"] = option("original", "AdvCAM: clamp each climb to the original image's "
                                                                "range, or to the previous step's (the reference "
                                                                "code).")
    autocast: Literal["auto", "bf16", "off"] = option("auto", "AdvCAM network passes in bf16: auto (GPU only), "
                                                              "bf16 (also on CPUs with bf16 support), off.")
    # PRM
    peak_threshold: float = option(0.0, "PRM: a peak counts when its class-map value is above this.",
                                   unbounded="class-map values are unnormalised scores, of either sign")
    proposal_count: int = option(100, "PRM: superpixel proposals per image.", ge=1)
    gallery_images: int = option(24, GALLERY_IMAGES_HELP, ge=0)
    gallery_threshold: float = option(IRN_THRESHOLD, GALLERY_THRESHOLD_HELP, ge=0, le=1)

    def validate(self) -> "MapsConfig":
        if not self.classifier:
            raise ConfigError("No classifier given: pass --classifier RUN (made by `frugalseg classify`).")
        if self.method not in MAP_METHODS:
            raise ConfigError(f"Unknown method '{self.method}'; choose one of {tuple(MAP_METHODS)}.")
        if not self.scales:
            raise ConfigError("scales is empty: give at least one image scale (--scales 1.0).")
        return self

    def method_options(self) -> Any:
        """The options object of `method` (`frugalseg.weak.methods.MAP_OPTIONS`), from this config's fields."""
        return method_options(self.method, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


def default_out(cfg: MapsConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path(cfg.classifier) / f"maps_{cfg.method}_{cfg.split.replace('+', '_')}"


def saved_data_options(run_dir: Path | str) -> dict[str, Any]:
    """The dataset and class remapping a run was made with (its config.yaml: data, background_classes,
    ignore_classes)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise DataError(f"{run_dir}: no config.yaml, so its dataset is unknown; pass --data.")
    saved = read_config_file(path)
    return {k: saved.get(k) for k in ("data", "background_classes", "ignore_classes")}


def open_maps_dataset(run_dir: Path | str, split: str, data: str | None = None,
                      background_classes: list[str] | None = None,
                      ignore_classes: list[str] | None = None) -> SegDataset:
    """The split to map, with the classes of the run in `run_dir` (a classifier's): its dataset and class
    remapping, unless given here."""
    saved = saved_data_options(run_dir)
    return open_splits(data or saved["data"], split,
                       background_classes=saved["background_classes"] if background_classes is None else background_classes,
                       ignore_classes=saved["ignore_classes"] if ignore_classes is None else ignore_classes)


#: Settings that leave existing maps valid: which and how many images, batching, the gallery.
MAPS_FREE_FIELDS = ("limit", "batch_size", "gallery_images", "gallery_threshold")


def make_maps(cfg: MapsConfig) -> dict:
    """Compute and save maps for every image of the split; returns the manifest."""
    cfg.validate()
    model, spec, labels = load_classifier(cfg.classifier)
    if cfg.method == "prm" and not spec.get("peak_stimulation"):
        log.warning("PRM maps from a classifier trained without --peak-stimulation: peaks will be less instance-like.")
    ds = open_maps_dataset(cfg.classifier, cfg.split, cfg.data, cfg.background_classes, cfg.ignore_classes)
    if ds.labels.names != labels.names:
        raise DataError(f"{ds.name}: classes {ds.labels.names} differ from the classifier's {labels.names}.")
    out = default_out(cfg)
    # maps already in the folder are kept, so they must have been made with these settings
    claim_run_dir(RunDir(out), cfg, finished=(out / "maps.json").exists(), started=any(out.glob("maps/*.npz")),
                  free=MAPS_FREE_FIELDS, rerun_hint=False)
    device = device_of(cfg.devices)
    model = model.to(device).eval()
    method, options = MAP_METHODS[cfg.method], cfg.method_options()
    to_clf = {c: i for i, c in enumerate(spec["class_ids"])}
    samples = [s for s in ds.samples if s.supervision in ("mask", "tags")]
    if cfg.limit is not None:
        samples = samples[: cfg.limit]
    if not samples:
        raise DataError(f"{ds.name}: no image has tags or a mask; there is nothing to map.")
    todo = [s for s in samples if not maps_path(out, s.id).exists()]
    log.info("%s: %d images, %d already mapped", ds.name, len(samples), len(samples) - len(todo))
    # Images are read as they come and batched by size; a batch runs once it is full, so memory holds at
    # most one partial batch per image size, however large the split.
    pending: dict[tuple, list[tuple]] = defaultdict(list)
    t0 = time.time()
    bar = tqdm(total=len(todo), desc=f"{cfg.method} maps", disable=not cfg.progress)

    def run(batch: list[tuple]) -> None:
        tags = [sorted(c for c in ds.tags_of(s) if c in to_clf) for s, _ in batch]
        clf_tags = [[to_clf[c] for c in t] for t in tags]
        x = torch.stack([img for _, img in batch]).to(device)
        for (s, _), t, m in zip(batch, tags, method(model, x, clf_tags, options)):
            save_maps(maps_path(out, s.id), np.asarray(t, dtype=np.int64), m.cam, m.high_res, method=cfg.method)
        bar.update(len(batch))

    for s in todo:
        img = to_tensor_image(ds.read_image(s))
        group = pending[tuple(img.shape)]
        group.append((s, img))
        if len(group) == cfg.batch_size:
            run(group)
            group.clear()
    for group in pending.values():
        if group:
            run(group)
    bar.close()
    seconds = time.time() - t0
    manifest = {
        "method": cfg.method, "dataset": ds.name, "split": cfg.split, "images": len(samples),
        "computed_now": len(todo), "seconds_now": round(seconds, 1),
        "images_per_s_now": round(len(todo) / seconds, 4) if todo and seconds > 0 else None,
        "device": str(device), "classifier": str(cfg.classifier),
        "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress",)},
    }
    write_json(out / "maps.json", manifest)
    if cfg.gallery_images:
        write_maps_gallery(out, ds, samples[: cfg.gallery_images], method=cfg.method, max_images=cfg.gallery_images,
                           threshold=cfg.gallery_threshold)
    return manifest


def parse_sweep(text: str) -> list[float]:
    """'0.05:0.6:0.05' (start:stop:step, stop included) or '0.1,0.15,0.2' to a threshold list."""
    try:
        if ":" in text:
            a, b, c = (float(v) for v in text.split(":"))
            if c <= 0 or b < a:
                raise ValueError
            return [round(a + i * c, 6) for i in range(int(round((b - a) / c)) + 1)]
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--sweep '{text}': expected start:stop:step (e.g. 0.05:0.6:0.05) or a comma list.") from None


def eval_seeds(maps_dir: str | Path, split: str | None = None, data: str | None = None, threshold: float | None = None,
               threshold_from: str | Path | None = None, sweep: list[float] | None = None) -> dict:
    """Seed mIoU of a maps folder against the masks of its split: at one fixed threshold, plus a sweep.

    The fixed threshold is `threshold`, or the one chosen on another split's sweep (`threshold_from`, a
    seeds JSON written by this function on training images), or IRN's 0.15. The sweep over *this* split's
    ground truth is reported as a sweep, never as the figure. Writes `maps_dir/seeds_<split>.json`.
    """
    maps_dir = Path(maps_dir)
    if not (maps_dir / "maps.json").exists():
        raise DataError(f"{maps_dir}: not a maps folder (no maps.json); run `frugalseg cams` first.")
    manifest = read_json(maps_dir / "maps.json")
    split = split or manifest["split"]
    ds = open_maps_dataset(manifest["classifier"], split, data)
    chosen_on = None
    if threshold_from is not None:
        prev = read_json(threshold_from)
        threshold, chosen_on = prev["chosen_threshold"], prev.get("split")
        if threshold is None:
            raise DataError(f"{threshold_from}: holds no chosen threshold (dataset without background?).")
    fixed = IRN_THRESHOLD if threshold is None else float(threshold)
    thresholds = sorted(set((sweep or []) + [fixed]))
    res = evaluate_seeds(iter_seed_items(maps_dir, ds), ds.labels.num_classes, ds.labels.names, ds.labels.background,
                         thresholds, split=split)
    by_t = {r["threshold"]: r for r in res["results"]}
    fixed_res = by_t.get(fixed, res["results"][0])
    source = f"chosen on {chosen_on}" if chosen_on else ("given" if threshold is not None else f"IRN default {IRN_THRESHOLD}")
    out = {
        "method": manifest["method"], "split": split, "dataset": ds.name,
        "fixed_threshold": fixed_res["threshold"],
        "fixed_threshold_source": source,
        "fixed": fixed_res, "images": res["images"], "skipped_no_maps": res.get("skipped_no_maps"),
        "sweep": sweep_table(res) if sweep else None,
        "chosen_threshold": choose_threshold(res) if sweep else None,
    }
    write_json(maps_dir / f"seeds_{split.replace('+', '_')}.json", out)
    return out
