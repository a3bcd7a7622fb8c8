"""Why IRN pseudo-masks do not beat the CRF's on msrc-objects: the random walk with *perfect* boundaries.

IRN has two parts: a boundary map learnt from the seeds' confident regions, and a random walk of the class maps
inside those boundaries. On VOC the pair raises CAM seeds by 17 points; here IRN (0.550) lands below the CAM seeds
it starts from (0.557), where the CRF gives 0.609. This separates the two parts on the IRN study's own artefacts
(`tags_to_model.py --irn pseudo-masks` made them: classifier, four-scale CAMs, the trained boundary network and
its walked maps, the calibration draw):

1. `oracle_boundary`: the same walk (β 10, 256 steps, radius 5, stride 4) with the boundary map made from the
   ground-truth masks (1 on every stride-4 cell that a class edge crosses). The walk's own ceiling on these maps.
2. `learned_boundary`: IRN's walk as the pipeline made it (its walked maps, recomputed read-out).
3. The learned boundary map against the ground-truth edges: ROC AUC over stride-4 cells, and the mean boundary
   value on edge cells and elsewhere.
4. `seed` and `crf`: the pipeline's own figures, for reference.

Every background threshold is chosen on the calibration images (as the pipeline does); mIoU on the 173 scored
training images. Writes the `irn_diagnosis` section of tags_to_model.json.

    python benchmarks/irn_diagnosis.py [--runs runs/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from common import ROOT, default_data_root, print_table, save_results

os.environ.setdefault("FRUGALSEG_DATA", str(default_data_root()))

SWEEP = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


def edge_cells(mask: np.ndarray, grid: tuple[int, int], ignore: int = 255) -> np.ndarray:
    """(h, w) bool: the stride-4 cells crossed by a class edge of the full-resolution `mask` (void edges not)."""
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(mask.astype(np.int64))
    edge = torch.zeros_like(m, dtype=torch.bool)
    for a, b, sl_a, sl_b in ((m[1:], m[:-1], (slice(1, None),), (slice(None, -1),)),
                             (m[:, 1:], m[:, :-1], (slice(None), slice(1, None)), (slice(None), slice(None, -1)))):
        d = (a != b) & (a != ignore) & (b != ignore)
        edge[sl_a] |= d
        edge[sl_b] |= d
    h, w = grid
    pad_h, pad_w = h * 4 - m.shape[0], w * 4 - m.shape[1]
    e = F.pad(edge.float()[None, None], (0, max(pad_w, 0), 0, max(pad_h, 0)))[..., : h * 4, : w * 4]
    return (F.max_pool2d(e, 4)[0, 0] > 0).numpy()


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula."""
    from scipy.stats import rankdata

    r = rankdata(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main() -> None:
    import torch
    import torch.nn.functional as F

    from frugalseg.data import open_split
    from frugalseg.metrics import confusion_matrix
    from frugalseg.metrics import summarise as summarise_confusion
    from frugalseg.models.irn import InterPixelNet
    from frugalseg.weak.irn import boundary_map, random_walk, walk_to_labels
    from frugalseg.weak.maps_io import load_maps, maps_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--limit", type=int, default=None, help="First N images only (a quick check).")
    args = ap.parse_args()
    started = time.time()
    run = Path(args.runs) / "tags_to_model" / "cam_irn"
    if not (run / "irn" / "net.pt").exists():
        raise SystemExit(f"{run}: no IRN study artefacts; run benchmarks/tags_to_model.py --irn pseudo-masks first.")
    ds = open_split("msrc-objects", "train")
    calibration = set(json.loads((run / "calibration.json").read_text())["ids"])
    from frugalseg.data.io import sample_file

    def walk_file(sid: str) -> Path:
        return sample_file(run / "irn" / "walk", sid, ".npz")

    # the pipeline's training images: those it mapped and walked (tagged images)
    samples = [s for s in ds.samples if maps_path(run / "cams", s.id).exists() and walk_file(s.id).exists()]
    samples = samples[: args.limit] if args.limit else samples
    net = InterPixelNet("tf_efficientnet_lite0", pretrained=True)
    net.load_state_dict(torch.load(run / "irn" / "net.pt", map_location="cpu"))
    bg = ds.labels.background
    walks: dict[str, dict] = {}
    b_edge, b_rest, scores, positives = [], [], [], []
    t0 = time.time()
    for n, s in enumerate(samples):
        m = load_maps(maps_path(run / "cams", s.id))
        truth = ds.read_mask(s)
        with np.load(walk_file(s.id)) as z:
            learned = z["walk"]
        b = boundary_map(net, ds.read_image(s))
        edges = edge_cells(truth, tuple(b.shape))
        bn = b.numpy()
        b_edge.append(bn[edges].ravel())
        b_rest.append(bn[~edges].ravel())
        scores.append(bn.ravel())
        positives.append(edges.ravel())
        small = F.interpolate(torch.from_numpy(m.high_res)[None], size=tuple(b.shape), mode="bilinear",
                              align_corners=False)[0]
        oracle = random_walk(small, torch.from_numpy(edges.astype(np.float32))).numpy()
        walks[s.id] = {"learned": learned, "oracle": oracle, "keys": np.asarray(m.keys), "truth": truth}
        if n % 25 == 0:
            print(f"  {n}/{len(samples)} images ({time.time() - t0:.0f} s)", flush=True)

    def miou(kind: str, t: float, ids) -> float:
        conf = 0
        for i in ids:
            w = walks[i]
            pred = walk_to_labels(torch.from_numpy(w[kind]), w["keys"], w["truth"].shape, t, bg)
            conf = conf + confusion_matrix(torch.from_numpy(pred.astype(np.int64)),
                                           torch.from_numpy(w["truth"].astype(np.int64)), ds.labels.num_classes)
        return summarise_confusion(conf, ds.labels.names, bg)["miou"]

    calib = [i for i in walks if i in calibration]
    scored = [i for i in walks if i not in calibration]
    fig: dict = {"scored_images": len(scored), "calibration_images": len(calib),
                 "split": "train (calibration images excluded; thresholds chosen on them)"}
    for kind in ("oracle", "learned"):
        sweep = {t: miou(kind, t, calib) for t in SWEEP}
        t = max(sweep, key=sweep.get)
        fig[f"{kind}_boundary"] = {"miou": round(miou(kind, t, scored), 4), "bg_threshold": t,
                                   "calibration_miou": round(sweep[t], 4)}
    edge_v, rest_v = np.concatenate(b_edge), np.concatenate(b_rest)
    fig["learned_boundary_vs_gt_edges"] = {
        "auc": round(auc(np.concatenate(scores), np.concatenate(positives)), 4),
        "mean_on_edge_cells": round(float(edge_v.mean()), 4), "mean_elsewhere": round(float(rest_v.mean()), 4),
        "edge_cell_share": round(float(len(edge_v) / (len(edge_v) + len(rest_v))), 4)}
    ref = json.loads((ROOT / "benchmarks" / "results" / "tags_to_model.json").read_text())["figures"]
    pm = ref.get("irn", {}).get("pseudo_mask_miou", {})
    fig["pipeline_figures"] = {k: pm.get(k) for k in ("seed", "crf", "irn", "irn_crf")}
    fig["seconds"] = round(time.time() - started, 1)
    print_table([(k, v["miou"], v["bg_threshold"]) for k, v in fig.items() if isinstance(v, dict) and "miou" in v]
                + [(f"pipeline {k}", v, "") for k, v in fig["pipeline_figures"].items()],
                ("walk", "train mIoU", "threshold"))
    print(json.dumps(fig["learned_boundary_vs_gt_edges"]))
    if not args.limit:
        path = save_results("tags_to_model", {"irn_diagnosis": fig}, {"irn_diagnosis": {"sweep": SWEEP}}, started)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
