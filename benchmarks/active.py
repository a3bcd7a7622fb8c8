"""Active learning with geometric priors, measured with a simulated oracle on this CPU (issue 19).

    python benchmarks/active.py               # everything still missing (resumable run by run, round by round)
    python benchmarks/active.py --quick       # a path check in minutes (figures mean nothing): active_quick.json
    python benchmarks/active.py --only isbi2012 --seeds 0 1
    python benchmarks/active.py --aggregate   # active.json, its figure and the table from the records on disk

Settings (chosen before any run, from the papers' setting and this CPU's budget, never from the test
sections; nothing here is tuned on the scored split):

- **isbi2012** (2D): the 30 EM sections at half resolution (256², mean-pooled; labels subsampled).
  Pool = sections 0-19 (what can be queried), scored on sections 20-29 (held out, never queried):
  membrane Dice / Jaccard pooled over their pixels. SLIC superpixels (n_segments 300 → about 150
  regions of ~440 px per section). Start: 20 random regions (the same for every strategy of a repeat);
  10 rounds of 40 regions. The U-Net of the semi-supervised CPU protocol's width (8..64, 4 levels,
  dropout 0.1 so MC-dropout has samples), Adam 1e-3, batch 8 of 128² crops centred on annotated pixels,
  200 steps on the start then 100 fine-tuning steps per round. MC-dropout: 8 passes.
- **volume3d**: the same 30 sections as one volume at quarter resolution in-plane (30×128×128; EM voxels
  are 4×4×50 nm, so the z spacing is 50/16 ≈ 3.1 pixels), sections 0-19 the pool volume, 20-29 scored.
  SLIC supervoxels (n_segments 1500, physical spacing); start 20 random supervoxels; 8 rounds of at
  least 3000 voxels each: `plane` (planar patches, r = 3, patch radius 20 px, 10 candidate centres,
  a 24×24 orientation grid, branch-and-bound), `top_supervoxels` (the same combined criterion, free
  supervoxels up to the same voxels) and `random_plane`. The same 2D U-Net trained slice by slice.
- **volume3d_la**: la2018 MRI, one training volume (the first, 2× downsampled to about 92×70×44) as the
  pool, the two test volumes scored (left-atrium Dice), each volume z-scored; supervoxels 1500, the same 3D
  rounds with 64² crops and a class-balanced loss (the atrium is a few percent of the voxels).
- Repeats: seeds 0-4 (5) in 2D, 0-2 (3) in 3D: a repeat changes the start regions, the network's
  initialisation and the batches; every strategy of a repeat shares its start.
- AULC: area under Dice against the annotated fraction of the pool's pixels (voxels), over the range every
  run of the setting covers, divided by that range (the mean Dice over one common budget); also against
  annotated regions (the same x for every strategy in 2D). `geometry_region` is a diagnostic: the
  combined criterion with superpixels as instances (see `frugalseg.active.acquisition`).
- `plane_search`: branch-and-bound against exhaustive search on the real supervoxel graph with the
  trained model's uncertainties: evaluations and wall time per query, several grid sizes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, default_data_root, mean_sd, print_table, save_results  # noqa: E402

RECORDS = RESULTS / "active"
RUN_ROOT = ROOT / "runs" / "bench" / "active"
QUICK = False

STRATEGIES = {"isbi2012": ("random", "entropy", "geometry", "mc_dropout", "geometry_region"),
              "volume3d": ("plane", "top_supervoxels", "random_plane"),
              "volume3d_la": ("plane", "top_supervoxels", "random_plane")}
SEEDS = {"isbi2012": (0, 1, 2, 3, 4), "volume3d": (0, 1, 2), "volume3d_la": (0, 1, 2)}
ISBI_2D = dict(downsample=2, pool=(0, 20), test=(20, 30), n_segments=300)
ISBI_3D = dict(downsample=4, pool=(0, 20), test=(20, 30), n_segments=1500, z_spacing=50 / 16)
LOOP_2D = dict(rounds=10, initial_regions=20, per_round=40, iterations_first=200, iterations_per_round=100,
               batch_size=8, crop=128, lr=1e-3, mc_passes=8)
LOOP_3D = dict(rounds=8, initial_regions=20, per_round=3000, iterations_first=200, iterations_per_round=100,
               batch_size=8, crop=96, lr=1e-3, plane_r=3.0, plane_radius=20.0, plane_candidates=10, plane_grid=24)
LA_3D = dict(downsample=2, pool_volume=0, n_segments=1500)
# Class-balanced loss on LA: the atrium is a few percent of the voxels and the queried planes are mostly
# background; unweighted, Dice fell to 0.03 and 0.002 by the last round of the plane strategy (seeds 0, 1 at
# commit 933680a) as the network drifted to all-background predictions.
LOOP_3D_LA = {**LOOP_3D, "crop": 64, "class_balanced": True}
UNET = dict(channels=(8, 16, 32, 64), dropout=0.1)


def loop_settings(setting: str, strategy: str, seed: int) -> dict:
    base = dict({"isbi2012": LOOP_2D, "volume3d": LOOP_3D, "volume3d_la": LOOP_3D_LA}[setting])
    if QUICK:
        base.update(rounds=2, iterations_first=30, iterations_per_round=20, mc_passes=2)
    return {**base, "strategy": strategy, "seed": seed}


def _load_isbi(downsample: int) -> tuple[np.ndarray, np.ndarray]:
    from skimage.transform import downscale_local_mean

    from frugalseg.data.isbi import load_isbi, read_stack

    vol, gt = read_stack(load_isbi(default_data_root() / "isbi2012"))
    f = downsample
    return (downscale_local_mean(vol.astype(np.float32) / 255.0, (1, f, f)).astype(np.float32),
            np.ascontiguousarray(gt[:, f // 2::f, f // 2::f]))


def build_problem(setting: str):
    """(pool, test images, test truths) of a setting."""
    from frugalseg.active.loop import RegionPool

    if setting == "isbi2012":
        s = ISBI_2D
        v, g = _load_isbi(s["downsample"])
        a, b = s["pool"]
        c, d = s["test"]
        pool = RegionPool.build(list(v[a:b]), list(g[a:b]), n_segments=s["n_segments"])
        return pool, list(v[c:d]), list(g[c:d])
    if setting == "volume3d_la":
        return _la_problem()
    s = ISBI_3D
    v, g = _load_isbi(s["downsample"])
    a, b = s["pool"]
    c, d = s["test"]
    pool = RegionPool.build([v[a:b]], [g[a:b]], n_segments=s["n_segments"], spacing=(s["z_spacing"], 1.0, 1.0))
    return pool, [v[c:d]], [g[c:d]]


def _la_problem():
    """One LA training volume as the pool (2× downsampled: mean-pooled image, subsampled mask, each volume
    z-scored), the two test volumes scored. LA MRI is near-isotropic, so the spacing is 1 per axis."""
    from skimage.transform import downscale_local_mean

    from frugalseg.active.loop import RegionPool
    from frugalseg.data import open_dataset

    f = LA_3D["downsample"]

    def load(split: str, index: int | None = None):
        ds = open_dataset(default_data_root() / "la2018", split)
        samples = ds.samples if index is None else [ds.samples[index]]
        out = []
        for smp in samples:
            im, gt = ds.read_image(smp), ds.read_mask(smp)
            cut = tuple(slice(0, (n // f) * f) for n in im.shape)  # whole blocks: image and mask stay aligned
            im, gt = im[cut], gt[cut]
            small = downscale_local_mean(im, (f, f, f)).astype(np.float32)
            # each volume on its own intensity scale: as read, the pool volume's voxels have mean 1.46 and sd
            # 1.62, the two test volumes' 0.42 / 0.53 and 0.29 / 0.72, so a network fitted to the pool met the
            # test volumes at a third of its scale (Dice fell as annotation grew)
            small = (small - small.mean()) / max(float(small.std()), 1e-6)
            out.append((small, np.ascontiguousarray(gt[f // 2::f, f // 2::f, f // 2::f])))
        return out

    (pv, pg), = load("train", LA_3D["pool_volume"])
    test = load("test")
    pool = RegionPool.build([pv], [pg], n_segments=LA_3D["n_segments"], spacing=(1.0, 1.0, 1.0))
    return pool, [t[0] for t in test], [t[1] for t in test]


def record_path(records: Path, setting: str, strategy: str, seed: int) -> Path:
    return records / f"{setting}.{strategy}.seed{seed}.json"


def read_record(records: Path, setting: str, strategy: str, seed: int) -> dict | None:
    path = record_path(records, setting, strategy, seed)
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    from frugalseg.active.loop import LoopSettings, same_settings

    settings = LoopSettings(**loop_settings(setting, strategy, seed))
    return rec if same_settings(rec.get("settings", {}), settings) else None  # stale: redo


def run_child(setting: str, strategy: str, seed: int, records: Path, run_root: Path) -> dict:
    import torch

    from frugalseg.active.loop import LoopSettings, run_loop
    from frugalseg.data.io import write_json
    from frugalseg.models.medical import unet2d

    torch.set_num_threads(1)
    t0 = time.time()
    pool, test_x, test_y = build_problem(setting)
    settings = LoopSettings(**loop_settings(setting, strategy, seed))
    result = run_loop(pool, test_x, test_y, settings, lambda: unet2d(1, 2, UNET["channels"], UNET["dropout"]),
                      state_dir=run_root / setting / strategy / f"seed{seed}",
                      progress=lambda m: print(m, file=sys.stderr, flush=True))
    split = "la2018 test (2 volumes)" if setting == "volume3d_la" else "sections 20-29 (held out)"
    record = {"setting": setting, "strategy": strategy, "seed": seed, "split": split,
              "pool_pixels": pool.total_pixels, "wall_s": round(time.time() - t0, 1), **result}
    write_json(record_path(records, setting, strategy, seed), record)
    return record


def run_all(settings: list[str], seeds: list[int] | None, records: Path, run_root: Path, parallel: int) -> None:
    jobs = [(st, m, s) for st in settings for s in (seeds if seeds is not None else SEEDS[st])
            for m in STRATEGIES[st] if read_record(records, st, m, s) is None]
    print(f"active: {len(jobs)} runs to do", flush=True)
    running: list[tuple[tuple, subprocess.Popen]] = []
    while jobs or running:
        while jobs and len(running) < parallel:
            job = jobs.pop(0)
            log = run_root / job[0] / job[1] / f"seed{job[2]}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "--run-child", job[0], job[1], str(job[2]), "--records", str(records),
                   "--run-root", str(run_root)] + (["--quick"] if QUICK else [])
            running.append((job, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), cwd=ROOT)))
        time.sleep(2)
        for item in list(running):
            job, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            if proc.returncode != 0:
                print(f"  {job}: failed (exit {proc.returncode}); see its .log", flush=True)
                continue
            rec = read_record(records, *job)
            print(f"  {job[0]} {job[1]} seed {job[2]}: AULC {rec['aulc']:.4f}, final Dice "
                  f"{rec['curve'][-1]['dice']:.4f} ({rec['wall_s']:.0f} s)", flush=True)


def common_range_aulc(runs: dict, lo: float, hi: float, key: str = "dice") -> float:
    """Mean score over [lo, hi] of annotated fraction (linear interpolation between rounds)."""
    if hi <= lo:
        raise SystemExit(f"the runs share no annotation range ({lo:.4f} to {hi:.4f}); their rounds differ too much")
    grid = np.linspace(lo, hi, 101)
    x = [c["fraction"] for c in runs["curve"]]
    y = [c[key] for c in runs["curve"]]
    return float(np.trapezoid(np.interp(grid, x, y), grid) / (hi - lo))


def aggregate(records: Path) -> dict:
    """Per setting and strategy: AULC against annotated pixels (voxels) over the range every run of the
    setting covers (strategies annotate slightly different pixel counts per round, so each is integrated
    over the same budget), AULC against annotated regions, the mean ± sd curve, timings."""
    agg: dict = {}
    for setting, strategies in STRATEGIES.items():
        by_strategy = {m: [r for s in range(20) if (r := read_record(records, setting, m, s)) is not None]
                       for m in strategies}
        all_runs = [r for recs in by_strategy.values() for r in recs]
        if not all_runs:
            continue
        lo = max(r["curve"][0]["fraction"] for r in all_runs)
        hi = min(r["curve"][-1]["fraction"] for r in all_runs)
        for strategy, recs in by_strategy.items():
            if not recs:
                continue
            aulcs = [common_range_aulc(r, lo, hi) for r in recs]
            aulcs_regions = [r["aulc_regions"] for r in recs]
            n = min(len(r["curve"]) for r in recs)
            frac = np.array([[r["curve"][i]["fraction"] for i in range(n)] for r in recs])
            dice = np.array([[r["curve"][i]["dice"] for i in range(n)] for r in recs])
            jac = np.array([[r["curve"][i]["jaccard"] for i in range(n)] for r in recs])
            regions = np.array([[r["curve"][i]["regions"] for i in range(n)] for r in recs])
            m, sd = mean_sd(aulcs, digits=None)
            mr, sdr = mean_sd(aulcs_regions, digits=None)
            entry = {
                "aulc_mean": round(m, 4), "aulc_sd": None if sd is None else round(sd, 4), "repeats": len(recs),
                "per_seed": {str(r["seed"]): round(a, 4) for r, a in zip(recs, aulcs)},
                "aulc_range": [round(lo, 5), round(hi, 5)],
                # against regions only in 2D, where every strategy takes the same number per round
                "aulc_regions_mean": round(mr, 4) if setting == "isbi2012" else None,
                "aulc_regions_sd": None if sdr is None or setting != "isbi2012" else round(sdr, 4),
                "final_dice_mean": round(float(dice[:, -1].mean()), 4),
                "curve": {"fraction_mean": frac.mean(0).round(5).tolist(), "regions_mean": regions.mean(0).tolist(),
                          "pixels_mean": np.array([[r["curve"][i]["pixels"] for i in range(n)] for r in recs]
                                                  ).mean(0).round(1).tolist(),
                          "dice_mean": dice.mean(0).round(4).tolist(),
                          "dice_sd": (dice.std(0, ddof=1) if len(recs) > 1 else 0 * dice[0]).round(4).tolist(),
                          "jaccard_mean": jac.mean(0).round(4).tolist()},
                "query_s_mean": round(float(np.mean([c["query_s"] for r in recs for c in r["curve"][1:]])), 3),
                "train_s_mean": round(float(np.mean([c["train_s"] for r in recs for c in r["curve"][1:]])), 3),
                "wall_s_mean": round(float(np.mean([r["wall_s"] for r in recs])), 1),
                "split": recs[0]["split"],
            }
            if setting.startswith("volume3d") and strategy == "plane":
                tot = {k: int(sum(c.get(k, 0) for r in recs for c in r["curve"])) for k in ("bounds", "exact",
                                                                                          "exhaustive")}
                entry["plane_search"] = {**tot, "planes": int(sum(c.get("planes", 0) for r in recs
                                                                  for c in r["curve"]))}
            agg.setdefault(setting, {})[strategy] = entry
    for setting, pairs in (("isbi2012", (("geometry", "entropy"), ("entropy", "random"), ("geometry", "random"),
                                         ("geometry", "mc_dropout"))),
                           ("volume3d", (("plane", "random_plane"), ("plane", "top_supervoxels"))),
                           ("volume3d_la", (("plane", "random_plane"), ("plane", "top_supervoxels")))):
        for a, b in pairs:
            ea, eb = agg.get(setting, {}).get(a), agg.get(setting, {}).get(b)
            if not ea or not eb:
                continue
            gain = ea["aulc_mean"] - eb["aulc_mean"]
            beyond = (ea["repeats"] >= 3 and eb["repeats"] >= 3 and ea["aulc_sd"] is not None
                      and eb["aulc_sd"] is not None and abs(gain) > max(ea["aulc_sd"], eb["aulc_sd"]))
            # Paired by repeat: the strategies of a repeat share its start regions and initialisation, which
            # make most of the seed-to-seed spread; the per-repeat difference removes it.
            seeds = sorted(set(ea["per_seed"]) & set(eb["per_seed"]), key=int)
            diffs = [ea["per_seed"][k] - eb["per_seed"][k] for k in seeds]
            dm, dsd = mean_sd(diffs, digits=None) if diffs else (None, None)
            agg[setting].setdefault("comparisons", {})[f"{a}_vs_{b}"] = {
                "aulc_gain": round(gain, 4), "beyond_spread": bool(beyond),
                "paired_per_seed": {k: round(d, 4) for k, d in zip(seeds, diffs)},
                "paired_mean": None if dm is None else round(dm, 4),
                "paired_sd": None if dsd is None else round(dsd, 4),
                "paired_beyond_spread": bool(len(diffs) >= 3 and dsd is not None and abs(dm) > dsd)}
        if setting in agg:
            agg[setting]["dice_at_fraction"] = dice_at_fractions(agg[setting], records, setting)
    return agg


#: annotated fractions at which every strategy's Dice is read (interpolated between rounds), per setting
DICE_AT = {"isbi2012": (0.02, 0.03, 0.04, 0.06, 0.08), "volume3d": (0.02, 0.05, 0.1), "volume3d_la": (0.02, 0.05, 0.1)}


def dice_at_fractions(entries: dict, records: Path, setting: str) -> dict:
    """Mean ± sd over repeats of the Dice each strategy has reached at a few annotation budgets (where its
    curve covers them): where along the budget a strategy gains or loses, which one AULC number hides."""
    out: dict = {}
    for strategy in STRATEGIES[setting]:
        if strategy not in entries:
            continue
        recs = [r for s in range(20) if (r := read_record(records, setting, strategy, s)) is not None]
        row = {}
        for f in DICE_AT[setting]:
            vals = [float(np.interp(f, [c["fraction"] for c in r["curve"]], [c["dice"] for c in r["curve"]]))
                    for r in recs if r["curve"][0]["fraction"] <= f <= r["curve"][-1]["fraction"]]
            if vals:
                m, sd = mean_sd(vals, digits=None)
                row[f"{f:g}"] = {"mean": round(m, 4), "sd": None if sd is None else round(sd, 4), "n": len(vals)}
        out[strategy] = row
    return out


def plot(agg: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in ("isbi2012", "volume3d", "volume3d_la") if s in agg]
    if not settings:
        return None
    fig, axes = plt.subplots(1, len(settings), figsize=(4.6 * len(settings), 3.6), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for strategy, e in agg[setting].items():
            if strategy in ("comparisons", "dice_at_fraction"):
                continue
            x = 100 * np.asarray(e["curve"]["fraction_mean"])
            y, sd = np.asarray(e["curve"]["dice_mean"]), np.asarray(e["curve"]["dice_sd"])
            line, = ax.plot(x, y, marker=".", label=f"{strategy} (AULC {e['aulc_mean']:.3f}, n={e['repeats']})")
            ax.fill_between(x, y - sd, y + sd, color=line.get_color(), alpha=0.15)
        ax.set_title(f"{setting}: test {next(v for k, v in agg[setting].items() if k != 'comparisons')['split']}",
                     fontsize=9)
        ax.set_xlabel("annotated % of the pool's " + ("voxels" if setting.startswith("volume3d") else "pixels"))
        ax.set_ylabel(("left-atrium" if setting == "volume3d_la" else "membrane") + " Dice (mean ± sd over repeats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def plane_search_benchmark(grids: tuple[int, ...] = (12, 24, 48), candidates: int = 10) -> dict:
    """Branch-and-bound vs exhaustive on the volume3d supervoxels with a trained model's uncertainty."""
    import torch

    from frugalseg.active.acquisition import region_uncertainty
    from frugalseg.active.geometry import region_means
    from frugalseg.active.loop import fit_partial, predict_probabilities
    from frugalseg.active.planes import best_planar_query
    from frugalseg.models.medical import unet2d

    torch.set_num_threads(1)
    torch.manual_seed(0)
    pool, _, _ = build_problem("volume3d")
    labelled = pool.empty()
    rng = np.random.default_rng(0)
    labelled[0][rng.choice(pool.graphs[0].n_regions, 40, replace=False)] = True
    model = unet2d(1, 2, UNET["channels"], UNET["dropout"])
    fit_partial(model, pool.images, pool.partial_masks(labelled), 30 if QUICK else 200, rng, crop=96)
    probs, _ = predict_probabilities(model, pool.images)
    g = pool.graphs[0]
    u = np.where(labelled[0], 0.0, region_uncertainty(region_means(probs[0], pool.regions[0], g.n_regions), g))
    out = {"supervoxels": g.n_regions, "candidates": candidates, "r": LOOP_3D["plane_r"],
           "radius": LOOP_3D["plane_radius"]}
    for n in grids:
        t = time.perf_counter()
        qb = best_planar_query(g.centroids, u, LOOP_3D["plane_r"], LOOP_3D["plane_radius"], candidates, n, n)
        tb = time.perf_counter() - t
        t = time.perf_counter()
        qe = best_planar_query(g.centroids, u, LOOP_3D["plane_r"], LOOP_3D["plane_radius"], candidates, n, n,
                               exhaustive=True)
        te = time.perf_counter() - t
        out[f"grid{n}"] = {"orientations": n * n, "bnb_bounds": qb.stats.bounds, "bnb_exact": qb.stats.exact,
                           "bnb_evaluations": qb.stats.bounds + qb.stats.exact,
                           "exhaustive_evaluations": qe.stats.exact, "candidates_pruned": qb.stats.candidates_pruned,
                           "same_optimum": bool((qb.center_region, qb.theta, qb.phi) == (qe.center_region, qe.theta,
                                                                                          qe.phi)
                                                and abs(qb.score - qe.score) <= 1e-9 * max(1.0, qe.score)),
                           "score": round(qb.score, 4), "bnb_s": round(tb, 4), "exhaustive_s": round(te, 4)}
    return out


def diagnose_2d(records: Path, run_root: Path, seeds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> dict:
    """What the geometric prior changes on isbi2012: with each repeat's final entropy-run network (its
    labelled regions excluded), the regions the entropy and the geometry criteria would ask for next.
    Per repeat: Spearman correlation of the two region scores, overlap of the two next-round selections,
    and of each selection the mean region size, the network's error rate on its pixels (what a query can
    correct) and its membrane share."""
    import torch
    from scipy.stats import spearmanr

    from frugalseg.active.loop import _pixel_scores, predict_probabilities
    from frugalseg.active.selection import select_regions
    from frugalseg.models.medical import unet2d

    torch.set_num_threads(1)
    pool, _, _ = build_problem("isbi2012")
    per_round = LOOP_2D["per_round"]
    out: dict = {}
    for seed in seeds:
        state_file = run_root / "isbi2012" / "entropy" / f"seed{seed}" / "state.pt"
        if not state_file.exists():
            continue
        saved = torch.load(state_file, map_location="cpu", weights_only=False)
        model = unet2d(1, 2, UNET["channels"], UNET["dropout"])
        model.load_state_dict(saved["model"])
        labelled = saved["labelled"]
        probs, _ = predict_probabilities(model, pool.images)
        scores = {name: _pixel_scores(pool, probs, source, "entropy")
                  for name, source in (("entropy", "feature"), ("geometry", "combined"))}
        free = np.concatenate([~done for done in labelled])
        rho = float(spearmanr(np.concatenate(scores["entropy"])[free], np.concatenate(scores["geometry"])[free])[0])
        picks = {name: {(q.image, q.region) for q in select_regions(sc, pool.graphs, per_round, labelled)}
                 for name, sc in scores.items()}
        row = {"spearman": round(rho, 4), "selection_overlap": len(picks["entropy"] & picks["geometry"]) / per_round}
        for name, chosen in picks.items():
            size = err = fg = 0
            for i, r in chosen:
                inside = pool.regions[i] == r
                pred = probs[i].argmax(0)[inside]
                truth = pool.truths[i][inside]
                size += int(inside.sum())
                err += int((pred != truth).sum())
                fg += int((truth == 1).sum())
            row[name] = {"mean_region_pixels": round(size / len(chosen), 1), "error_rate": round(err / size, 4),
                         "membrane_share": round(fg / size, 4)}
        out[str(seed)] = row
        print(f"  seed {seed}: spearman {row['spearman']:.3f}, overlap {row['selection_overlap']:.2f}, error rate "
              f"entropy {row['entropy']['error_rate']:.3f} / geometry {row['geometry']['error_rate']:.3f}", flush=True)
    out["ceiling"] = full_annotation_ceiling(pool, seeds[:3])
    return out


def full_annotation_ceiling(pool, seeds: tuple[int, ...]) -> dict:
    """The same network and training schedule (all rounds' iterations, same batches and crops) with every pool
    pixel annotated: the Dice any strategy can approach on the held-out sections, per repeat."""
    import torch

    from frugalseg.active.loop import fit_partial, foreground_scores, predict_probabilities
    from frugalseg.models.medical import unet2d

    _, test_x, test_y = build_problem("isbi2012")
    iterations = LOOP_2D["iterations_first"] + LOOP_2D["rounds"] * LOOP_2D["iterations_per_round"]
    dice = {}
    for seed in seeds:
        torch.manual_seed(seed)
        model = unet2d(1, 2, UNET["channels"], UNET["dropout"])
        fit_partial(model, pool.images, pool.truths, iterations, np.random.default_rng(seed),
                    LOOP_2D["batch_size"], LOOP_2D["crop"], LOOP_2D["lr"])
        probs, _ = predict_probabilities(model, test_x)
        dice[str(seed)] = round(foreground_scores(probs, test_y)["dice"], 4)
        print(f"  full annotation, seed {seed}: Dice {dice[str(seed)]:.4f}", flush=True)
    m, sd = mean_sd(list(dice.values()), digits=None)
    return {"dice_per_seed": dice, "dice_mean": round(m, 4), "dice_sd": None if sd is None else round(sd, 4),
            "iterations": iterations, "split": "sections 20-29 (held out)"}


def table(agg: dict) -> None:
    rows = []
    for setting, strategies in agg.items():
        if setting == "plane_search":
            continue
        for strategy, e in strategies.items():
            if strategy in ("comparisons", "dice_at_fraction"):
                continue
            sd = "-" if e["aulc_sd"] is None else f"{e['aulc_sd']:.4f}"
            rows.append((setting, strategy, e["repeats"], f"{e['aulc_mean']:.4f}", sd,
                         " ".join(f"{v:.3f}" for v in e["per_seed"].values()), f"{e['final_dice_mean']:.4f}",
                         f"{100 * e['curve']['fraction_mean'][-1]:.1f}%", e["query_s_mean"], e["wall_s_mean"]))
    print_table(rows, ("setting", "strategy", "n", "AULC", "sd", "per seed", "final Dice", "annotated", "query s",
                       "wall s"))
    for setting, strategies in agg.items():
        for name, c in strategies.get("comparisons", {}).items() if isinstance(strategies, dict) else ():
            paired = "" if c.get("paired_mean") is None else (
                f"; paired by repeat {c['paired_mean']:+.4f} ± {c['paired_sd'] or 0:.4f} "
                f"({'beyond' if c['paired_beyond_spread'] else 'within'} its spread)")
            print(f"{setting} {name}: AULC {c['aulc_gain']:+.4f} ({'beyond' if c['beyond_spread'] else 'within'} "
                  f"the spread){paired}")


def markdown(agg: dict) -> str:
    lines = ["| setting: scored on | strategy | repeats | AULC mean ± sd | per seed | final Dice | annotated "
             "| query s / round |", "|---|---|---|---|---|---|---|---|"]
    for setting, strategies in agg.items():
        if setting == "plane_search":
            continue
        for strategy, e in strategies.items():
            if strategy in ("comparisons", "dice_at_fraction"):
                continue
            sd = "" if e["aulc_sd"] is None else f" ± {e['aulc_sd']:.3f}"
            lines.append(f"| {setting}: {e['split']} | {strategy} | {e['repeats']} | {e['aulc_mean']:.3f}{sd} | "
                         + " / ".join(f"{v:.3f}" for v in e["per_seed"].values())
                         + f" | {e['final_dice_mean']:.3f} | {100 * e['curve']['fraction_mean'][-1]:.1f}% | "
                         f"{e['query_s_mean']:.2f} |")
    return "\n".join(lines)


def markdown_plane_search() -> str:
    """The README's plane-search table, from active.json's `plane_search`."""
    path = RESULTS / "active.json"
    ps = json.loads(path.read_text())["figures"].get("plane_search") if path.exists() else None
    if not ps:
        return ""
    lines = ["| orientations | B&B evaluations (bounds + exact) | exhaustive | ratio | same optimum | B&B s "
             "| exhaustive s |", "|---|---|---|---|---|---|---|"]
    for key, v in ps.items():
        if key.startswith("grid"):
            lines.append(f"| {v['orientations']} | {v['bnb_evaluations']} ({v['bnb_bounds']} + {v['bnb_exact']}) | "
                         f"{v['exhaustive_evaluations']} | {v['exhaustive_evaluations'] / v['bnb_evaluations']:.1f}× | "
                         f"{'yes' if v['same_optimum'] else 'NO'} | {v['bnb_s']:.3f} | {v['exhaustive_s']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    global QUICK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Minutes: 1 repeat, 2 short rounds (figures mean nothing).")
    ap.add_argument("--only", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    ap.add_argument("--seeds", type=int, nargs="+", help="Repeats to run (default: 0-4 in 2D, 0-2 in 3D).")
    ap.add_argument("--parallel", type=int, default=1, help="Runs at once (one torch thread each).")
    ap.add_argument("--records", default=str(RECORDS), help="Where each finished run's record goes (kept).")
    ap.add_argument("--run-root", default=str(RUN_ROOT), help="Where runs keep their round-by-round state.")
    ap.add_argument("--no-plane-search", action="store_true", help="Skip the branch-and-bound timing.")
    ap.add_argument("--plane-search-only", action="store_true", help="Only the branch-and-bound timing.")
    ap.add_argument("--aggregate", action="store_true", help="Only aggregate the records on disk.")
    ap.add_argument("--markdown", action="store_true", help="Print the README table from the records.")
    ap.add_argument("--diagnose", action="store_true",
                    help="isbi2012: what the geometric prior changes in the next query of each repeat's final "
                         "entropy-run network (score correlation, overlap, error rate of the selected regions).")
    ap.add_argument("--run-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    QUICK = args.quick
    started = time.time()
    records, run_root = Path(args.records), Path(args.run_root)
    if QUICK and args.records == str(RECORDS):  # scratch: quick records never mix with the real ones
        records = RUN_ROOT.parent / "active_quick" / "records"
    if QUICK and args.run_root == str(RUN_ROOT):
        run_root = RUN_ROOT.parent / "active_quick" / "runs"
    if args.run_child:
        setting, strategy, seed = args.run_child
        run_child(setting, strategy, int(seed), records, run_root)
        return
    if args.diagnose:
        diag = diagnose_2d(records, run_root)
        save_results("active", {"isbi2012_geometry_diagnosis": diag},
                     {"isbi2012_geometry_diagnosis": {"network": "final state of each repeat's entropy run",
                                                      "per_round": LOOP_2D["per_round"]}}, started)
        return
    if args.markdown:
        print(markdown(aggregate(records)))
        print()
        print(markdown_plane_search())
        return
    if not args.aggregate and not args.plane_search_only:
        run_all(args.only, args.seeds if not QUICK else [0], records, run_root, args.parallel)
    agg = aggregate(records)
    figures: dict = {k: v for k, v in agg.items()}
    if not args.aggregate and not args.no_plane_search:
        figures["plane_search"] = plane_search_benchmark(grids=(12, 24) if QUICK else (12, 24, 48, 96, 180))
    name = "active_quick" if QUICK else "active"
    settings = {"isbi2012": {**ISBI_2D, **LOOP_2D, "unet": UNET, "seeds": list(SEEDS["isbi2012"])},
                "volume3d": {**ISBI_3D, **LOOP_3D, "unet": UNET, "seeds": list(SEEDS["volume3d"])},
                "volume3d_la": {**LA_3D, **LOOP_3D_LA, "unet": UNET, "seeds": list(SEEDS["volume3d_la"])},
                "quick": QUICK}
    if figures:
        path = save_results(name, figures, settings, started)
        print(f"wrote {path}")
    if not QUICK and agg:
        plot(agg, RESULTS / "active_curves.png")
    table(agg)
    if "plane_search" in figures:
        ps = figures["plane_search"]
        print_table([(k, v["orientations"], v["bnb_evaluations"], v["exhaustive_evaluations"], v["same_optimum"],
                      v["bnb_s"], v["exhaustive_s"]) for k, v in ps.items() if k.startswith("grid")],
                    ("grid", "orientations", "B&B evaluations", "exhaustive", "same optimum", "B&B s",
                     "exhaustive s"))


if __name__ == "__main__":
    main()
