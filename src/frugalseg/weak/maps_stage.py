"""Stage `cams`: class maps (CAM, AdvCAM or PRM) for every image of a split, one .npz per image.

Resumable: an image whose map file exists is skipped, so a killed run continues where it stopped. Images
are grouped by size and climbed/forwarded in batches. The map files hold dataset class ids (`keys`), the
stride-4 maps and the image-size maps, all in [0, 1]; `maps.json` records the method and settings, and
`gallery.html` shows the first images with their maps, seeds and ground truth.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from frugalseg.data.transforms import to_tensor_image
from frugalseg.errors import ConfigError, DataError
from frugalseg.runs import write_json

log = logging.getLogger(__name__)
METHODS = ("cam", "advcam", "prm")


@dataclass
class MapsConfig:
    classifier: str = ""  # a classify run directory
    out: str = ""  # default: <classifier>/maps_<method>_<split>
    method: Literal["cam", "advcam", "prm"] = "cam"
    data: str | None = None  # default: the classifier's dataset
    split: str = "train"
    scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
    batch_size: int = 4  # images per batch (AdvCAM climbs all their tagged classes at once)
    limit: int | None = None  # only the first N images of the split (fixed, stated subsets for CPU runs)
    # AdvCAM
    steps: int = 27
    step_size: float = 0.08
    restriction: float = 7.0
    mask_threshold: float = 0.5
    gradcam_scale: bool = True
    clamp: Literal["original", "previous"] = "original"
    autocast: Literal["auto", "bf16", "off"] = "auto"
    # PRM
    peak_threshold: float = 0.0
    proposal_count: int = 100
    gallery_images: int = 24
    gallery_threshold: float = 0.15
    progress: bool = True

    def validate(self) -> "MapsConfig":
        if not self.classifier:
            raise ConfigError("No classifier given: pass --classifier RUN (made by `frugalseg classify`).")
        if self.method not in METHODS:
            raise ConfigError(f"Unknown method '{self.method}'; choose one of {METHODS}.")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(f"scales must be positive, got {self.scales}.")
        if self.steps < 1:
            raise ConfigError("AdvCAM needs at least one step.")
        return self

    def advcam(self):
        from frugalseg.weak.advcam import AdvCAMConfig

        return AdvCAMConfig(steps=self.steps, step_size=self.step_size, restriction=self.restriction,
                            mask_threshold=self.mask_threshold, scales=tuple(self.scales),
                            gradcam_scale=self.gradcam_scale, clamp=self.clamp, autocast=self.autocast)


def default_out(cfg: MapsConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path(cfg.classifier) / f"maps_{cfg.method}_{cfg.split.replace('+', '_')}"


def open_maps_dataset(cfg: MapsConfig):
    """The split to map, with the classifier's classes (and its run's remapping when --data is not given)."""
    from frugalseg.config import load_config
    from frugalseg.weak.classify import ClassifyConfig, open_splits

    run_cfg = load_config(Path(cfg.classifier) / "config.yaml", ClassifyConfig)
    if cfg.data:
        run_cfg.data = cfg.data
    return open_splits(run_cfg, cfg.split)


def make_maps(cfg: MapsConfig) -> dict:
    """Compute and save maps for every image of the split; returns the manifest."""
    from tqdm.auto import tqdm

    from frugalseg.weak.classify import load_classifier
    from frugalseg.weak.maps_io import maps_path, save_maps

    cfg.validate()
    model, spec, labels = load_classifier(cfg.classifier)
    if cfg.method == "prm" and not spec.get("peak_stimulation"):
        log.warning("PRM maps from a classifier trained without --peak-stimulation: peaks will be less instance-like.")
    ds = open_maps_dataset(cfg)
    if ds.labels.names != labels.names:
        raise DataError(f"{ds.name}: classes {ds.labels.names} differ from the classifier's {labels.names}.")
    out = default_out(cfg)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
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
        for (s, _), t, maps in zip(batch, tags, _maps_of(cfg, model, x, clf_tags)):
            save_maps(maps_path(out, s.id), np.asarray(t, dtype=np.int64), maps[0], maps[1], method=cfg.method)
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
        write_gallery(out, ds, samples[: cfg.gallery_images], cfg)
    return manifest


def _maps_of(cfg: MapsConfig, model, x: torch.Tensor, clf_tags: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(low-res, image-size) map arrays per image, rows in the order of the image's tags."""
    if cfg.method == "cam":
        from frugalseg.weak.cam import cam_maps

        res = cam_maps(model, x, clf_tags, scales=cfg.scales)
        return [(m.cam.cpu().numpy(), m.high_res.cpu().numpy()) for m in res]
    if cfg.method == "advcam":
        from frugalseg.weak.advcam import advcam_maps

        res = advcam_maps(model, x, clf_tags, cfg.advcam())
        return [(m.cam.cpu().numpy(), m.high_res.cpu().numpy()) for m in res]
    from frugalseg.weak.cam import finish_maps, output_sizes, resize_maps
    from frugalseg.weak.prm import prm_class_maps, prm_instances

    out = []
    for img, t in zip(x, clf_tags):
        h, w = img.shape[-2:]
        if not t:
            empty = finish_maps([], torch.zeros(0, dtype=torch.long), (h, w))
            out.append((empty.cam.numpy(), empty.high_res.numpy()))
            continue
        inst = prm_instances(model, img, classes=t, peak_kwargs={"peak_threshold": cfg.peak_threshold},
                             proposal_kwargs={"proposal_count": cfg.proposal_count})
        high = prm_class_maps(inst, t, (h, w))
        low = resize_maps(torch.from_numpy(high), output_sizes(h, w)[0]).clamp(0, 1).numpy()
        out.append((low, high))
    return out


def write_gallery(out: Path, ds, samples, cfg: MapsConfig) -> None:
    from frugalseg.weak.gallery import CamRow, write_cam_gallery
    from frugalseg.weak.maps_io import load_maps, maps_path

    def rows():
        for s in samples:
            image = ds.read_image(s)
            truth = ds.read_mask(s) if s.mask is not None else None
            yield CamRow(s.id, image, load_maps(maps_path(out, s.id)), truth)

    write_cam_gallery(out / "gallery.html", rows(), ds.labels, title=f"{cfg.method.upper()} maps — {ds.name}",
                      max_images=cfg.gallery_images, threshold=cfg.gallery_threshold)


def iter_seed_items(maps_dir: Path, ds):
    """(id, CamMaps, gt mask) for every image of `ds` with a mask (load errors name the file)."""
    from frugalseg.weak.maps_io import load_maps, maps_path

    for s in ds.samples:
        if s.mask is None:
            continue
        p = maps_path(maps_dir, s.id)
        mask = ds.read_mask(s)
        if not p.exists():
            yield s.id, None, mask  # counted as skipped by evaluate_seeds, never scored as empty
            continue
        yield s.id, load_maps(p, image_size=mask.shape[:2], num_classes=ds.labels.num_classes), mask


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
    ground truth is reported as a sweep, never as the figure.
    """
    import json

    from frugalseg.weak.seeds import IRN_THRESHOLD, choose_threshold, evaluate_seeds, sweep_table

    maps_dir = Path(maps_dir)
    if not (maps_dir / "maps.json").exists():
        raise DataError(f"{maps_dir}: not a maps folder (no maps.json); run `frugalseg cams` first.")
    manifest = json.loads((maps_dir / "maps.json").read_text())
    mcfg = MapsConfig(classifier=manifest["classifier"], split=split or manifest["split"], data=data)
    ds = open_maps_dataset(mcfg)
    chosen_on = None
    if threshold_from is not None:
        prev = json.loads(Path(threshold_from).read_text())
        threshold, chosen_on = prev["chosen_threshold"], prev.get("split")
        if threshold is None:
            raise DataError(f"{threshold_from}: holds no chosen threshold (dataset without background?).")
    fixed = IRN_THRESHOLD if threshold is None else float(threshold)
    thresholds = sorted(set((sweep or []) + [fixed]))
    res = evaluate_seeds(iter_seed_items(maps_dir, ds), ds.labels.num_classes, ds.labels.names, ds.labels.background,
                         thresholds, split=mcfg.split)
    by_t = {r["threshold"]: r for r in res["results"]}
    fixed_res = by_t.get(fixed, res["results"][0])
    out = {
        "method": manifest["method"], "split": mcfg.split, "dataset": ds.name,
        "fixed_threshold": fixed_res["threshold"],
        "fixed_threshold_source": (f"chosen on {chosen_on}" if chosen_on else ("given" if threshold is not None else "IRN default 0.15")),
        "fixed": fixed_res, "images": res["images"], "skipped_no_maps": res.get("skipped_no_maps"),
        "sweep": sweep_table(res) if sweep else None,
        "chosen_threshold": choose_threshold(res) if sweep else None,
    }
    write_json(maps_dir / f"seeds_{mcfg.split.replace('+', '_')}.json", out)
    return out
