"""`frugalseg query`: what to annotate next, from a trained run and a dataset.

For every image of the split the run's model predicts class probabilities; the image is cut into SLIC
superpixels; each superpixel is scored by the chosen strategy (`frugalseg.active`: the combined feature
+ geometric criterion by default) and the best regions over all images are chosen, no two adjacent.
Regions that are already fully annotated (by the dataset's mask or an answer in the answers folder) are
never asked again, so running `query` after `annotate` asks for new regions; in volumes a supervoxel with
any answered voxel is retired (a plane's answer is one voxel thick).

Writes, into `--out` (default `<run>/queries`), atomically:
- `queries.json`: one entry per query (image, region id, its box and size, score, why, the prediction
  in it), plus the classes and palette and where `annotate` writes answers;
- `regions/<image>.npz`: the superpixels of each queried image (what "region 7" means);
- `predictions/<image>.png`: the predicted labels (what `annotate` starts the painting from);
- `queries.html`: each query over its image (region outlined, prediction tinted), best first.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from frugalseg.active.acquisition import CRITERIA, pixel_uncertainty
from frugalseg.active.geometry import region_graph, region_means, superpixels
from frugalseg.active.selection import random_regions, select_regions
from frugalseg.data.io import make_folder, sample_file, write_json, write_label_png, write_text
from frugalseg.data.labels import LabelSpec
from frugalseg.errors import ConfigError, DataError
from frugalseg.inference import predict_images
from frugalseg.stages.options import option

log = logging.getLogger(__name__)

__all__ = ["QUERY_STRATEGIES", "QueryConfig", "query"]

QUERY_STRATEGIES = ("geometry", "entropy", "mc_dropout", "random")
QUERIES_FORMAT = 1


@dataclass
class QueryConfig:
    """What `frugalseg query` reads and how it ranks regions."""

    run: str = option("", "A trained run directory (frugalseg train / train --semi).", cli=False)
    data: str | None = option(None, "Dataset to query (default: the one the run was trained on).")
    split: str = option("train", "Split whose images are candidates.")
    strategy: str = option("geometry", "geometry (classifier + neighbours, Konyushkova et al.), entropy, "
                                       "mc_dropout (needs dropout in the model) or random.", choices=QUERY_STRATEGIES)
    criterion: str = option("entropy", "Uncertainty of a class distribution: entropy, margin (best vs second), "
                                       "least_confidence, selection_entropy or conditional_entropy (the multi-class "
                                       "criteria of Konyushkova et al., CVIU 2019).", choices=tuple(CRITERIA))
    regions: int = option(20, "How many regions to ask for.", ge=1)
    n_segments: int = option(300, "SLIC superpixels per image (about; fewer for small images).", ge=2)
    compactness: float | None = option(None, "SLIC compactness (default: 0.1 greyscale, 10 colour).", gt=0)
    max_images: int | None = option(None, "Consider only the first N images of the split.", ge=1)
    mc_passes: int = option(8, "MC-dropout passes (strategy mc_dropout).", ge=2)
    planes: int = option(3, "Volumes: planar patches to ask for (each shown as one 2D slice).", ge=1)
    supervoxels: int = option(2000, "Volumes: SLIC supervoxels per volume (about).", ge=2)
    plane_r: float = option(3.0, "Volumes: a supervoxel is on the plane within this distance (mm or voxels).", gt=0)
    plane_radius: float = option(24.0, "Volumes: the planar patch's radius (mm or voxels).", gt=0)
    masks: str | None = option(None, "Where annotate writes answers (partial masks, 255 = void). Default: the "
                                     "dataset's masks/ folder for a folders dataset, else <out>/answers.")
    out: str | None = option(None, "Folder for queries.json, queries.html (default <run>/queries).")
    seed: int = option(0, "Seed of the random strategy.", ge=0)
    devices: str = option("auto", "cpu, or auto (a GPU when there is one).")


def _model_of(run: Path):
    """(model, spec, labels, run config) of a finished supervised or semi-supervised run."""
    from frugalseg.export import load_export
    from frugalseg.runs import RunDir
    from frugalseg.stages import semi as semi_stage
    from frugalseg.stages.train import saved_config

    rd = RunDir(run)
    cfg = saved_config(rd)
    if isinstance(cfg, semi_stage.SemiConfig):
        meta = semi_stage.saved_export(rd)
        return cfg.STEP.load_predictor(rd.path), meta["model"], LabelSpec.from_dict(meta["labels"]), cfg
    if not (run / "model" / "config.json").exists():
        raise DataError(f"{run}: no exported model (model/config.json); has training finished?")
    model, spec, labels = load_export(run / "model")
    return model, spec, labels, cfg


def _answers_folder(cfg: QueryConfig, ds, out: Path) -> Path:
    """`--masks`, else the dataset's own masks/ folder when it is a folders dataset read without a class
    map (the answers are then simply more masks of that dataset: `train` and `train --semi` read them
    as labelled images, void outside the answered regions), else `<out>/answers`."""
    if cfg.masks:
        return Path(cfg.masks)
    parents = {Path(s.image).parent for s in ds.samples}
    n = ds.labels.num_classes
    identity = (tuple(ds.class_map.source.names) == tuple(ds.labels.names)
                and np.array_equal(ds.class_map.lut[:n], np.arange(n)))
    if len(parents) == 1 and next(iter(parents)).name == "images" and identity:
        return next(iter(parents)).parent / "masks"
    return out / "answers"


def _known_pixels(ds, s, image: np.ndarray, answers: Path, labels: LabelSpec) -> np.ndarray | None:
    """Pixels annotated so far: the dataset's mask, and an answer mask written by `annotate` (kept apart from
    the dataset when it writes to <queries>/answers or --masks); None when neither exists."""
    from frugalseg.data.io import read_label_png

    known = None
    if s.mask is not None:
        mask = ds.read_mask(s)
        ds.check_sizes(s, image, mask)
        known = mask != labels.ignore_index
    answer = answers / f"{Path(s.image).stem}.png"
    if answer.exists() and (s.mask is None or answer.resolve() != Path(s.mask).resolve()):
        extra = read_label_png(answer) != labels.ignore_index
        if extra.shape == image.shape[:2]:
            known = extra if known is None else known | extra
    return known


class _FirstOutput(torch.nn.Module):
    """A network's main output only (segmenters with auxiliary heads return a tuple)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from frugalseg.models import first_output

        return first_output(self.net(x))


def _mc_information(model, x: torch.Tensor, input_size, passes: int, device) -> np.ndarray:
    """MC-dropout mutual information at the image's size, the network fed as `predict_images` feeds it."""
    import torch.nn.functional as F

    from frugalseg.active.acquisition import mc_dropout_probabilities
    from frugalseg.inference import _hw

    h, w = x.shape[-2:]
    xb = x[None].to(device=device, dtype=torch.float32)
    target = _hw(input_size)
    if target is not None:
        xb = F.interpolate(xb, size=target, mode="bilinear", align_corners=False)
    _, mi = mc_dropout_probabilities(_FirstOutput(model), xb, passes=passes)
    if mi.shape[-2:] != (h, w):
        mi = F.interpolate(mi[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    return mi[0].cpu().numpy()


def _as_input(image: np.ndarray, in_chans: int) -> tuple[torch.Tensor, np.ndarray, int | None]:
    """(network input (C, H, W), the image SLIC sees, its channel axis)."""
    from frugalseg.data.transforms import to_tensor_image

    if image.ndim != 3 or image.shape[-1] != 3:
        raise DataError(f"query works on 2D images (H, W, 3); got shape {image.shape}. Volumes: see "
                        "frugalseg.active.planes.")
    x = to_tensor_image(image)
    if in_chans == 1:
        grey = image.astype(np.float32).mean(-1) / 255.0
        return x.mean(0, keepdim=True), grey, None
    return x, image.astype(np.float32), -1


def _why(strategy: str, feat: float, comb: float, probs: np.ndarray, names: tuple[str, ...]) -> str:
    top = np.argsort(-probs)[:2]
    pred = ", ".join(f"{names[k]} {100 * probs[k]:.0f}%" for k in top)
    if strategy == "geometry":
        extra = ("the neighbours disagree with it" if comb > 1.5 * feat + 1e-3 else
                 "the classifier is unsure" if feat >= comb else "both are unsure")
        return f"combined uncertainty {comb:.3f} (classifier alone {feat:.3f}: {extra}); predicted {pred}"
    if strategy == "entropy":
        return f"classifier entropy {feat:.3f}; predicted {pred}"
    if strategy == "mc_dropout":
        return f"MC-dropout mutual information {comb:.4f} (classifier entropy {feat:.3f}); predicted {pred}"
    return f"random baseline; predicted {pred}"


def query(cfg: QueryConfig) -> dict:
    """Rank regions, write queries.json / queries.html / regions / predictions; returns the summary."""
    from frugalseg.stages.options import device_of
    from frugalseg.stages.train import _open

    if not cfg.run:
        raise ConfigError("query needs a trained run: frugalseg query RUN [--data ...].")
    run = Path(cfg.run)
    if not run.is_dir():
        raise DataError(f"{run}: no such run directory.")
    t0 = time.time()
    model, spec, labels, run_cfg = _model_of(run)
    if cfg.data:
        run_cfg.data = cfg.data
    ds = _open(run_cfg, cfg.split)
    if tuple(ds.labels.names) != tuple(labels.names):
        raise DataError(f"{run_cfg.data}: classes {list(ds.labels.names)} differ from the run's "
                        f"{list(labels.names)}; query a dataset with the classes the model was trained on.")
    samples = ds.samples[: cfg.max_images] if cfg.max_images else ds.samples
    if not samples:
        raise DataError(f"{run_cfg.data}:{cfg.split}: no images to query.")
    out = Path(cfg.out) if cfg.out else run / "queries"
    make_folder(out)
    answers = _answers_folder(cfg, ds, out)
    device = device_of(cfg.devices)
    model = model.to(device).eval()
    if ds.ndim == 3:
        if cfg.strategy != "geometry":
            raise ConfigError(f"--strategy {cfg.strategy} is for 2D images; volumes are queried by planar patches "
                              "of the combined criterion (--strategy geometry, the default).")
        return _query_volumes(cfg, run, run_cfg, ds, samples, model, spec, labels, out, device, t0)
    in_chans = int(spec.get("in_chans", 3))
    graphs, scores, feats, combs, labelled, region_maps, probs_by_image = [], [], [], [], [], [], []
    rng = np.random.default_rng(cfg.seed)
    from tqdm.auto import tqdm

    for s in tqdm(samples, desc="query: scoring", unit="image", disable=len(samples) < 4):
        image = ds.read_image(s)
        x, seen, channel_axis = _as_input(image, in_chans)
        with torch.no_grad():
            probs = predict_images(model, x[None], spec.get("input_size"), device=device)[0].numpy()
            info = None
            if cfg.strategy == "mc_dropout":
                info = _mc_information(model, x, spec.get("input_size"), cfg.mc_passes, device)
        regions = superpixels(seen, cfg.n_segments, cfg.compactness, channel_axis=channel_axis)
        grey = seen if channel_axis is None else seen.mean(-1) / 255.0
        graph = region_graph(regions, grey)
        n = graph.n_regions
        feat = region_means(pixel_uncertainty(probs, criterion=cfg.criterion, source="feature"), regions, n)
        comb = region_means(pixel_uncertainty(probs, grey, cfg.criterion, "combined"), regions, n)
        score = {"geometry": comb, "entropy": feat, "random": np.zeros(n),
                 "mc_dropout": region_means(info, regions, n) if info is not None else None}[cfg.strategy]
        known = _known_pixels(ds, s, image, answers, labels)
        # fully annotated regions (by the dataset's mask or an earlier answer) are never asked again
        done = region_means(known.astype(np.float32), regions, n) >= 1.0 if known is not None else np.zeros(n, bool)
        graphs.append(graph)
        scores.append(score)
        feats.append(feat)
        combs.append(score if cfg.strategy == "mc_dropout" else comb)
        labelled.append(done)
        region_maps.append(regions)
        probs_by_image.append(region_means(probs, regions, n))
        _keep_prediction(out, s.id, probs, labels)
    if all(d.all() for d in labelled):
        raise DataError(f"{run_cfg.data}:{cfg.split}: every region is already annotated; nothing left to ask.")
    picked = (random_regions(graphs, cfg.regions, rng, labelled) if cfg.strategy == "random"
              else select_regions(scores, graphs, cfg.regions, labelled))
    queries = []
    for k, q in enumerate(picked):
        s = samples[q.image]
        reg = region_maps[q.image] == q.region
        ys, xs = np.nonzero(reg)
        queries.append({
            "id": f"q{k:03d}", "kind": "region", "sample": s.id, "image": str(s.image), "region": q.region,
            "score": round(q.score, 6), "pixels": int(reg.sum()),
            "bbox": [int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1],
            "regions_file": str(sample_file("regions", s.id, ".npz")),
            "mask_file": None if s.mask is None else str(Path(s.mask).resolve()),
            "prediction_file": str(sample_file("predictions", s.id, ".png")),
            "why": _why(cfg.strategy, float(feats[q.image][q.region]), float(combs[q.image][q.region]),
                        probs_by_image[q.image][q.region], labels.names),
        })
    for i in sorted({q.image for q in picked}):
        with _atomic_npz(sample_file(out / "regions", samples[i].id, ".npz")) as fh:
            np.savez_compressed(fh, regions=region_maps[i].astype(np.int32))
    doc = {
        "format": QUERIES_FORMAT, "run": str(run.resolve()), "data": str(run_cfg.data), "split": cfg.split,
        "strategy": cfg.strategy, "classes": list(labels.names), "palette": [list(c) for c in labels.palette],
        "ignore_index": labels.ignore_index, "masks": str(answers.resolve()),
        "images_scored": len(samples), "seconds": round(time.time() - t0, 1), "queries": queries,
    }
    write_json(out / "queries.json", doc)
    write_text(out / "queries.html", _page(doc, out, ds, samples, region_maps, labels))
    return {"out": str(out), "queries": len(queries), "images_scored": len(samples), "masks": doc["masks"],
            "seconds": doc["seconds"], "annotate": f"frugalseg annotate {out}"}


class _atomic_npz:
    """np.savez_compressed into a temporary file renamed on success."""

    def __init__(self, path: Path):
        from frugalseg.data.io import atomic_path

        self._ctx = atomic_path(path)

    def __enter__(self):
        self._tmp = self._ctx.__enter__()
        self._fh = open(self._tmp, "wb")
        return self._fh

    def __exit__(self, *exc):
        self._fh.close()
        return self._ctx.__exit__(*exc)


def _keep_prediction(out: Path, sample_id: str, probs: np.ndarray, labels: LabelSpec) -> None:
    write_label_png(sample_file(out / "predictions", sample_id, ".png"), probs.argmax(0).astype(np.uint8),
                    labels.palette_bytes())


def _thumb(image: np.ndarray, region: np.ndarray, pred: np.ndarray, labels: LabelSpec, bbox: list[int],
           margin: int = 24, size: int = 220) -> str:
    """A base64 JPEG: the region's neighbourhood, prediction tinted, the region outlined in yellow."""
    y0, x0, y1, x1 = bbox
    y0, x0 = max(0, y0 - margin), max(0, x0 - margin)
    y1, x1 = min(image.shape[0], y1 + margin), min(image.shape[1], x1 + margin)
    crop = image[y0:y1, x0:x1].astype(np.float32)
    pal = np.array(labels.palette, dtype=np.float32)
    tint = pal[np.clip(pred[y0:y1, x0:x1], 0, len(pal) - 1)]
    mixed = (0.7 * crop + 0.3 * tint).astype(np.uint8)
    reg = region[y0:y1, x0:x1]
    edge = reg & ~(np.roll(reg, 1, 0) & np.roll(reg, -1, 0) & np.roll(reg, 1, 1) & np.roll(reg, -1, 1))
    mixed[edge] = (255, 230, 0)
    img = Image.fromarray(mixed)
    scale = size / max(img.size)
    img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    return base64.b64encode(buf.getvalue()).decode()


def _page(doc: dict, out: Path, ds, samples, region_maps, labels: LabelSpec) -> str:
    by_id = {s.id: (i, s) for i, s in enumerate(samples)}
    cards = []
    for q in doc["queries"]:
        i, s = by_id[q["sample"]]
        image = ds.read_image(s)
        pred = np.array(Image.open(out / q["prediction_file"]))
        thumb = _thumb(image, region_maps[i] == q["region"], pred, labels, q["bbox"])
        cards.append(f"""<figure><img src="data:image/jpeg;base64,{thumb}" alt="{html.escape(q['id'])}">
<figcaption><b>{html.escape(q['id'])}</b> · {html.escape(str(q['sample']))} · region {q['region']} ·
{q['pixels']} px<br>score {q['score']:.4f}<br><small>{html.escape(q['why'])}</small></figcaption></figure>""")
    legend = " ".join(f'<span class="sw" style="background:rgb{tuple(c)}"></span>{html.escape(n)}'
                      for n, c in zip(doc["classes"], doc["palette"]))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>frugalseg queries</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5em;color:#222}} figure{{display:inline-block;width:230px;
margin:6px;vertical-align:top}} img{{width:220px;border:1px solid #ccc}} .sw{{display:inline-block;width:12px;
height:12px;margin:0 4px 0 10px;border:1px solid #888}} figcaption{{font-size:12px}}</style></head><body>
<h1>What to annotate next</h1>
<p>{len(doc['queries'])} regions from {doc['images_scored']} images of <code>{html.escape(doc['data'])}</code>
({html.escape(doc['split'])}), strategy <b>{html.escape(doc['strategy'])}</b>, best first. Yellow outline: the
region; tint: the model's prediction ({legend}).</p>
<p>Answer them: <code>frugalseg annotate {html.escape(str(out))}</code> (answers go to
<code>{html.escape(doc['masks'])}</code>).</p>
{''.join(cards)}
</body></html>"""



# ---- volumes: planar patches -------------------------------------------------------------------------
def volume_planes(volume: np.ndarray, probs: np.ndarray, n_planes: int, n_segments: int, r: float, radius: float,
                  spacing=None, done: np.ndarray | None = None, grid: int = 24, candidates: int = 10,
                  criterion: str = "entropy"):
    """The `n_planes` best planar patches of one volume, one after the other (a patch's supervoxels count
    no more for the next one), by the combined criterion averaged per supervoxel.

    volume: (D, H, W); probs: (C, D, H, W); done: voxels already annotated (a supervoxel with any of them
    counts 0). Returns (supervoxel labels, [(PlaneQuery, feature score, combined score)]).
    """
    from frugalseg.active.geometry import supervoxels
    from frugalseg.active.planes import best_planar_query

    spacing = tuple(float(v) for v in (spacing or (1.0, 1.0, 1.0)))
    regions = supervoxels(volume, n_segments, spacing=spacing)
    graph = region_graph(regions, volume, spacing=spacing)
    n = graph.n_regions
    feat = region_means(pixel_uncertainty(probs, criterion=criterion, source="feature"), regions, n)
    comb = region_means(pixel_uncertainty(probs, volume, criterion, "combined", spacing), regions, n)
    # any annotated voxel retires a supervoxel: a plane's answer is one voxel thick and never covers one whole
    taken = np.zeros(n, bool) if done is None else region_means(done.astype(np.float32), regions, n) > 0
    picked = []
    for _ in range(n_planes):
        if taken.all():
            break
        q = best_planar_query(graph.centroids, np.where(taken, 0.0, comb), r, radius, candidates, grid, grid,
                              exclude=taken)
        if q.score <= 0:
            break
        picked.append((q, float(feat[list(q.regions)].mean()), float(comb[list(q.regions)].mean())))
        taken[list(q.regions)] = True
    return regions, picked


def _query_volumes(cfg: QueryConfig, run: Path, run_cfg, ds, samples, model, spec, labels: LabelSpec, out: Path,
                   device, t0: float) -> dict:
    """Plane queries for volume datasets: per volume the best patches, then the best over all volumes."""
    from frugalseg.active.planes import plane_slice
    from frugalseg.inference import predict_volume_slices, predict_volume_sliding

    found = []
    answers = Path(cfg.masks) if cfg.masks else out / "answers"
    for s in samples:
        volume = np.asarray(ds.read_image(s), dtype=np.float32)
        if volume.ndim != 3:
            raise DataError(f"{run_cfg.data}/{s.id}: expected a (D, H, W) volume, got shape {volume.shape}.")
        x = torch.from_numpy(volume)
        with torch.no_grad():
            if int(spec.get("dims", 2)) == 3:
                probs = predict_volume_sliding(model, x, spec["patch_size"], device=device).numpy()
            else:
                probs = predict_volume_slices(model, x, size=spec.get("input_size"), device=device).numpy()
                probs = probs.transpose(1, 0, 2, 3)
        done = None
        if s.mask is not None:
            done = ds.read_mask(s) != labels.ignore_index
        answered = sample_file(answers, s.id, ".nii.gz")
        if answered.exists():
            from frugalseg.stages.annotate import read_volume_mask

            extra = read_volume_mask(answered) != labels.ignore_index
            if extra.shape == volume.shape:
                done = extra if done is None else done | extra
        spacing = s.spacing or (1.0, 1.0, 1.0)
        lo, hi = float(np.percentile(volume, 0.5)), float(np.percentile(volume, 99.5))
        unit = np.clip((volume - lo) / max(hi - lo, 1e-6), 0, 1)
        regions, picked = volume_planes(unit, probs, cfg.planes, cfg.supervoxels, cfg.plane_r, cfg.plane_radius,
                                        spacing, done, criterion=cfg.criterion)
        for q, feat, comb in picked:
            found.append((q.score, s, q, feat, comb, unit, probs, regions, spacing))
    if not found:
        raise DataError(f"{run_cfg.data}:{cfg.split}: every supervoxel is already annotated (or certain); "
                        "nothing left to ask.")
    found.sort(key=lambda f: -f[0])
    queries = []
    for k, (score, s, q, feat, comb, unit, probs, regions, spacing) in enumerate(found[: cfg.planes]):
        qid = f"q{k:03d}"
        image, coords = plane_slice(unit, q.center, q.normal, cfg.plane_radius, spacing, order=1)
        pred, _ = plane_slice(probs.argmax(0).astype(np.float32), q.center, q.normal, cfg.plane_radius, spacing,
                              order=0, cval=labels.ignore_index)
        sv, _ = plane_slice(regions.astype(np.float32), q.center, q.normal, cfg.plane_radius, spacing, order=0,
                            cval=-1)
        inside = np.isin(sv.astype(np.int64), list(q.regions)) & (pred != labels.ignore_index)
        with _atomic_npz(out / "slices" / f"{qid}.npz") as fh:
            np.savez_compressed(fh, image=image.astype(np.float32), coords=coords.astype(np.float32),
                                patch=inside, prediction=pred.astype(np.uint8))
        center_vox = [round(c / sp, 2) for c, sp in zip(q.center, spacing)]
        queries.append({
            "id": qid, "kind": "plane", "sample": s.id, "image": str(s.image), "score": round(score, 6),
            "volume_shape": list(unit.shape), "center_voxel": center_vox,
            "normal": [round(v, 5) for v in q.normal], "spacing": list(spacing),
            "radius": cfg.plane_radius, "r": cfg.plane_r, "supervoxels": len(q.regions),
            "pixels": int(inside.sum()), "slice_file": f"slices/{qid}.npz",
            "why": (f"plane through the supervoxels with the most combined uncertainty: sum {score:.2f} over "
                    f"{len(q.regions)} supervoxels (mean {comb:.3f}; classifier alone {feat:.3f})"),
        })
    doc = {
        "format": QUERIES_FORMAT, "run": str(run.resolve()), "data": str(run_cfg.data), "split": cfg.split,
        "strategy": "geometry (planes)", "classes": list(labels.names), "palette": [list(c) for c in labels.palette],
        "ignore_index": labels.ignore_index,
        "masks": str(answers.resolve()),
        "images_scored": len(samples), "seconds": round(time.time() - t0, 1), "queries": queries,
    }
    write_json(out / "queries.json", doc)
    write_text(out / "queries.html", _plane_page(doc, out, labels))
    return {"out": str(out), "queries": len(queries), "images_scored": len(samples), "masks": doc["masks"],
            "seconds": doc["seconds"], "annotate": f"frugalseg annotate {out}"}


def _plane_page(doc: dict, out: Path, labels: LabelSpec) -> str:
    cards = []
    pal = np.array(labels.palette + ((0, 0, 0),) * (256 - len(labels.palette)), dtype=np.float32)
    for q in doc["queries"]:
        with np.load(out / q["slice_file"]) as z:
            grey = (255 * z["image"]).astype(np.uint8)
            patch, pred = z["patch"], z["prediction"]
        rgb = np.repeat(grey[..., None], 3, -1).astype(np.float32)
        rgb[patch] = 0.6 * rgb[patch] + 0.4 * pal[pred[patch]]
        inner = np.roll(patch, 1, 0) & np.roll(patch, -1, 0) & np.roll(patch, 1, 1) & np.roll(patch, -1, 1)
        edge = patch & ~inner
        rgb[edge] = (255, 230, 0)
        img = Image.fromarray(rgb.astype(np.uint8)).resize((220, 220), Image.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=88)
        thumb = base64.b64encode(buf.getvalue()).decode()
        cards.append(f"""<figure><img src="data:image/jpeg;base64,{thumb}" alt="{html.escape(q['id'])}">
<figcaption><b>{html.escape(q['id'])}</b> · {html.escape(str(q['sample']))} · centre {q['center_voxel']} ·
normal {q['normal']}<br>{html.escape(q['why'])}</figcaption></figure>""")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>frugalseg plane queries</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5em}} figure{{display:inline-block;width:230px;margin:6px;
vertical-align:top}} img{{width:220px;border:1px solid #ccc}} figcaption{{font-size:12px}}</style></head><body>
<h1>Planes to annotate next</h1><p>{len(doc['queries'])} planar patches from {doc['images_scored']} volumes of
<code>{html.escape(doc['data'])}</code>, each resampled as one 2D slice (yellow: the patch). Answer them:
<code>frugalseg annotate {html.escape(str(out))}</code>.</p>{''.join(cards)}</body></html>"""
