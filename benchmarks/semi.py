"""Semi-supervised figures (issue: semi-supervision).

acdc: the SSL4MIS 2D protocol on ACDC: labelled = every slice of the first 3 or 7 training patients, the
rest of the training slices unlabelled; val mean Dice and HD95 (per volume, voxels: the HDF5 files carry
no spacing) of the supervised-only baseline, the mean teacher, DTC and deep co-training with K = 2 and
K = 3 models, each with and without its adversarial diversity term. la: the LA subset (8 training + 2 test
volumes): DTC against the supervised-only baseline (the same dual-head network, its level-set head
unused) with 2 labelled and 6 unlabelled volumes; Dice, Jaccard, HD95 and ASD on the 2 test volumes.
msrc: msrc-objects with masks for 10 % of the training images and tags for the rest (AdvCAM's
semi-supervised setting: AdvCAM pseudo-masks -> CRF -> mining rounds with an OCR segmenter, the given masks
replacing the pseudo-masks of their images) against masks-only (the same 10 %, the same segmenter and
number of optimizer steps) and tags-only (the same pipeline without masks, sharing classifier and maps);
val mIoU of each.

Every method runs on the same labelled set and the same batch machinery (`frugalseg.semi`); every model
is evaluated once, with its last weights, on the split named in the output: nothing is selected on it.
Each run is a subprocess with its wall time recorded; `--parallel N` runs N at once (beside a GPU).
The full schedules are the protocols' (30000 iterations at 256×256 in 2D, 6000 at 112×112×80 with
the V-Net in 3D): GPU work (on this CPU a 2D step takes about 2.4 s and a V-Net step 100 s, i.e. a day
per ACDC run and a week per LA run). `--quick` shrinks patch (64² / 64×64×48), network (U-Net 8..64) and
iterations (160 ACDC / 80 LA) to finish in about 10 minutes on a 2-core CPU (estimated from measured
per-iteration times and per-run overheads, see QUICK_SIZING), so its figures show the pipeline, not the
methods' ranking. Results: benchmarks/results/semi.json (semi_quick.json with --quick).

    python benchmarks/semi.py [--quick] [--only acdc|la|msrc] [--parallel N] [--runs DIR] [--max-iterations N]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from common import ROOT, default_data_root, mean_sd, print_table, save_results
from frugalseg.runs import git_commit, machine_info

os.environ.setdefault("FRUGALSEG_DATA", str(default_data_root()))

from frugalseg.data.io import write_json  # noqa: E402
from frugalseg.stages.semi import SemiConfig  # noqa: E402

ACDC_LABELLED = (3, 7)  # patients (SSL4MIS: 68 / 136 slices of its 70 patients; 50 patients here)
ACDC_METHODS = ("supervised", "meanteacher", "dtc", "cotrain_k2", "cotrain_k2_noadv", "cotrain_k3", "cotrain_k3_noadv")
LA_METHODS = ("supervised", "dtc")

# --quick: sized on this 2-core CPU from per-iteration times measured with one thread per run (QUICK_SIZING).
# The consistency and diversity ramps keep their shape: over the whole run (SSL4MIS, DTC) or its first half
# (co-training's official 100 of 200 units), in units of one iteration instead of 150.
QUICK_ACDC = dict(patch_size=[64, 64], channels=[8, 16, 32, 64], iterations=160, epoch_steps=40, labelled_batch_size=4,
                  unlabelled_batch_size=4, val_limit=4, rampup_every=1)
QUICK_LA = dict(arch="unet", patch_size=[64, 64, 48], channels=[8, 16, 32, 64], iterations=80, epoch_steps=40,
                labelled_batch_size=2, unlabelled_batch_size=2, val_limit=None, rampup_every=1)
# msrc masks + tags. Full: the tags_to_model schedule with AdvCAM maps (the four default scales cost about 7x
# the climbing of scale 1.0 alone: GPU work; `--msrc-scales 1.0` makes it CPU-sized). Quick: the first 48 training images, one scale,
# 8 climbing steps, one mining round.
MSRC_MASK_FRACTION = 0.1
MSRC_FULL = dict(limit=None, classifier_epochs=8, scales=(1.0, 0.5, 1.5, 2.0), steps=27, rounds=2, seg_epochs=20,
                 crop_size=256)
MSRC_QUICK = dict(limit=48, classifier_epochs=4, scales=(1.0,), steps=8, rounds=1, seg_epochs=6, crop_size=192)
QUICK_SIZING = {
    "measured": "2026-11-26 on the 2-core CPU of this machine (busy with another benchmark), 1 torch thread per run",
    "seconds_per_iteration": {
        "acdc_64px": {"supervised": 0.055, "meanteacher": 0.079, "dtc": 0.071, "cotrain_k2": 0.170,
                      "cotrain_k2_noadv": 0.093, "cotrain_k3": 0.293, "cotrain_k3_noadv": 0.141},
        "la_64x64x48": {"dtc": 0.968, "supervised": 0.388},
    },
    "per_run_overhead_s": 11.8,  # a 16-run smoke at 2 iterations took 188 s: start-up, data, set-up, evaluation
    "estimate_s": {"acdc_training": 289, "la_training": 108, "overheads": 188, "total": 585},
    "full_schedule_cpu_step_s": {"unet2d_256px_batch24": 2.4, "levelset_vnet_112x112x80_batch4": 101.0},
}


# ---- the CPU protocol (`--only cpu`): settled on this 2-core CPU ------------------------------------------
CPU_METHODS = {
    "acdc_l7": ("supervised_only", "meanteacher", "dtc", "cotrain_k2", "cotrain_k2_noadv", "cotrain_k3"),
    "acdc_l3": ("supervised_only", "meanteacher", "dtc", "cotrain_k2"),
    "la": ("supervised_only", "dtc"),
    "msrc_10pct": ("supervised_only", "meanteacher", "cotrain_k2"),
}
#: Diagnostics (run after every main run, reported beside them as such, never used to choose anything): where
#: DTC's result comes from: its dual-head network alone, + the level-set regression, + the consistency (= dtc).
#: And co-training's: its models each see a share of the labelled patients (the method's views); with every
#: model on every labelled patient, diversity comes from initialisation and the adversarial term alone.
CPU_DIAGNOSTICS = {"acdc_l7": ("supervised_levelset", "dtc_no_consistency", "cotrain_k2_allviews"),
                   # msrc: the first protocol's co-training (2 labelled per model, adversarial passes updating
                   # BatchNorm's running statistics) ended near background-only: 0.071 mIoU; and co-training
                   # with every model on every labelled image, as on ACDC
                   "msrc_10pct": ("cotrain_k2_lb2_bnleak", "supervised_only_lb2", "cotrain_k2_allviews")}
CPU_SEEDS = (1, 2, 3)
#: Why each value (measured on this CPU, one torch thread per run, two runs at once):
#: - ACDC: 128×128 patches (the slices are zoomed to the patch, as SSL4MIS zooms them to 256²) and a U-Net of
#:   8..128 channels (SSL4MIS's 5 levels at half its width). Supervised-only pilots at 7 patients (val, seed 1,
#:   `cpu_protocol_selection`): 96² 0.548 / 0.556 (seeds 1, 2), 128² 0.638 / 0.587, 96² at 16..256 channels
#:   0.646 (1.3× the step time of 128² at 8..128). Batches of 8 labelled + 8 unlabelled slices (SSL4MIS: 12 + 12;
#:   128² at batch 8 and 1200 iterations scored 0.647, no worse than batch 12 at 1500); co-training keeps its
#:   official 4 labelled per model + 4 unlabelled.
#: - Iterations 1200 (1/25 of SSL4MIS's 30000) keep every run within about 15 minutes (co-training K=3, the
#:   slowest); every ramp and the learning-rate schedule are scaled to it by `stages.semi.scale_schedule`
#:   (consistency ramps over the whole run as SSL4MIS / DTC, co-training's over its first half, poly decay over
#:   the run, ramp unit 1 iteration instead of 150). The EMA decay 0.99 is kept (a horizon of ~100 iterations).
#: - Optimiser: one for every method (the references' SGD for the SSL4MIS methods and Adam for co-training would
#:   confound method with optimiser): Adam, lr 0.01, poly, chosen with the supervised-only baseline on ACDC val
#:   at 7 patients among SGD 0.01 / 0.03 and Adam 0.001 / 0.003 / 0.01 (0.444 / 0.461 / 0.419 / 0.548 / 0.625 at
#:   96², seed 1): the same choice for all methods, as the issue allows; LA and msrc are not tuned (LA takes
#:   ACDC's choice, msrc `frugalseg train`'s OCR recipe).
#: - A validation pass every 150 iterations draws each run's learning curve (val Dice vs iteration); the
#:   model reported is the last one, nothing is selected on val.
CPU_ACDC = dict(data="acdc", val_split="val", patch_size=[128, 128], channels=[8, 16, 32, 64, 128], iterations=1200,
                epoch_steps=150, val_every=1, labelled_batch_size=8, unlabelled_batch_size=8, optimizer="adam",
                lr=0.01)
#: Co-training on ACDC: the official 4 labelled slices per model + 4 unlabelled. These runs were made with the
#: official handling of BatchNorm in the diversity term (forward passes on adversarial examples update the running
#: statistics, `adv_bn_update`), before the library's default froze them; on ACDC's U-Net trained from scratch on
#: [0, 1] slices the adversarial term changed K=2 by 0.007 either way (within the spread), so they were not rerun.
CPU_COTRAIN_2D = dict(labelled_batch_size=4, unlabelled_batch_size=4, adv_bn_update=True)
#: msrc-objects: the masks+tags benchmark's 10 % (the same 23 masked images, `msrc_labelled_ids`), the other
#: training images unlabelled (no tags), OCR on EfficientNet-Lite0 with ImageNet weights as `frugalseg train`
#: trains it (SGD 0.01, weight decay 5e-4, poly, aux 0.4, cross-entropy, crop/scale/flip), val mIoU on whole
#: images. Sized with `benchmarks/semi_speed.py --setting msrc_10pct` (one thread, the CPU shared with two
#: other runs): at 192² crops and batch 8 + 8 a step took 3.0 s (supervised-only), 7.1 s (mean teacher) and
#: 15.5 s (co-training K=2, whose adversarial term runs every model twice more); so 160² crops, 4 labelled + 4
#: unlabelled images per step and 400 iterations. Every network sees 4 labelled images a step, co-training's each
#: model too: the first protocol gave each co-trained model 2 (the K models sharing the 4 slots), and at 2 a step
#: the network collapses to background whatever the method: supervised-only at 2 a step ends at 0.057 val mIoU
#: against 0.280 at 4 (seed 1, 400 iterations, diagnostic row `supervised_only_lb2`: a diagnosis of the collapse;
#: the choice is the rule "every network sees the same labelled batch", not a tuning); the diagnostic row
#: `cotrain_k2_lb2_bnleak` is that first protocol's co-training run.
CPU_MSRC = dict(data="msrc-objects", val_split="val", arch="ocr", backbone="tf_efficientnet_lite0", pretrained=True,
                patch_size=[160, 160], iterations=400, epoch_steps=100, val_every=1, labelled_batch_size=4,
                unlabelled_batch_size=4, optimizer="sgd", lr=0.01, weight_decay=5e-4)
#: LA: 2 labelled + 6 unlabelled volumes, the 2 test volumes scored (the reference has no val split). A 3D
#: U-Net of 8..128 channels on 64×64×48 patches (the V-Net at 112×112×80 costs about 100 s a step here), batch
#: 2 + 2 as DTC, 1200 iterations (1/5 of DTC's 6000: DTC's step is the slowest at about 1 s, so a run stays
#: within 30 minutes), ramps and the ×0.1 step of the learning rate scaled by `scale_schedule`.
CPU_LA = dict(data="la2018", labelled_patients=2, val_split="test", arch="unet", patch_size=[64, 64, 48],
              channels=[8, 16, 32, 64, 128], iterations=1200, epoch_steps=150, val_every=1, labelled_batch_size=2,
              unlabelled_batch_size=2, optimizer="adam", lr=0.01)


#: The papers' schedules (GPU work): each method's library defaults, i.e. the protocols themselves (ACDC: U-Net
#: 16..256 at 256², 12 + 12 slices, 30000 iterations, SGD 0.01 poly for the SSL4MIS methods, co-training's Adam
#: 1e-3 with 4 + 4; LA: V-Net at 112×112×80, 2 + 2, 6000 iterations, step decay), `fraction` of the iterations
#: (ramps and learning-rate steps follow, `scale_schedule`), all runs at once on the one GPU, bf16 autocast.
GPU_SETTINGS = {"acdc_l7": ("supervised_only", "meanteacher", "dtc", "cotrain_k2"), "la": ("supervised_only", "dtc")}


def gpu_config(setting: str, method: str, seed: int, fraction: float = 1.0) -> SemiConfig:
    cls, extra = _method(method)
    if setting.startswith("acdc_l"):
        common = dict(data="acdc", labelled_patients=int(setting[len("acdc_l"):]), val_split="val",
                      iterations=max(1, round(30000 * fraction)), epoch_steps=150, val_every=20)
    elif setting == "la":
        common = dict(data="la2018", labelled_patients=2, val_split="test", iterations=max(1, round(6000 * fraction)),
                      epoch_steps=150, val_every=10)
        if method == "supervised_only":
            extra = {"network": "levelset"}
    else:
        raise SystemExit(f"no GPU schedule for {setting} (acdc_l7, acdc_l3, la)")
    return cls(**common, **extra, seed=seed, progress=False, num_workers=2)


def protocol_config(protocol: str, setting: str, method: str, seed: int, fraction: float = 1.0) -> SemiConfig:
    """A run of the CPU protocol (`cpu_config`) or of the papers' schedules on a GPU (`gpu_config`)."""
    return gpu_config(setting, method, seed, fraction) if protocol == "gpu" else cpu_config(setting, method, seed)


def cpu_config(setting: str, method: str, seed: int) -> SemiConfig:
    """The config of one run of the CPU protocol: `setting` (acdc_l7, acdc_l3, la, msrc_10pct), `method`
    (supervised_only, meanteacher, dtc, cotrain_k2, cotrain_k2_noadv, cotrain_k3), training `seed`."""
    cls, extra = _method(method)
    if setting.startswith("acdc_l"):
        common = dict(CPU_ACDC, labelled_patients=int(setting[len("acdc_l"):]))
        if cls.__name__ == "CoTrainConfig":
            common.update(CPU_COTRAIN_2D)
    elif setting == "la":
        common = dict(CPU_LA)
        if method in ("supervised_only", "supervised"):
            extra = {"network": "levelset"}  # DTC's network: the difference is DTC's two extra terms only
    elif setting == "msrc_10pct":
        common = dict(CPU_MSRC, labelled_ids=list(msrc_labelled_ids()))
        if extra.pop("half_labelled_batch", False):  # the first protocol's co-training batch: 2 labelled a step
            common["labelled_batch_size"] = CPU_MSRC["labelled_batch_size"] // 2
    else:
        raise SystemExit(f"unknown setting {setting} (acdc_l7, acdc_l3, la, msrc_10pct)")
    if QUICK:  # `--only cpu --quick`: the same runs, a path check in minutes (figures mean nothing)
        common.update(iterations=8 if setting.startswith("msrc") else 24, epoch_steps=8 if setting.startswith(
            "msrc") else 12, val_limit=2)
    return cls(**common, **extra, seed=seed, progress=False)


#: `--quick` (set by main and passed to the child processes): `cpu_config` gives short runs, their records and
#: results go to scratch / semi_quick.json.
QUICK = False


@functools.lru_cache(maxsize=1)
def msrc_labelled_ids() -> tuple[str, ...]:
    """The masked images of the masks+tags benchmark (`run_msrc`): 10 % (seed 0) of the msrc-objects training
    images that have object tags, drawn as `stages.pipeline.given_masks` draws them."""
    from frugalseg.data import open_split
    from frugalseg.data.budget import LabelBudget, apply_budget

    ds = open_split("msrc-objects", "train")
    ds = ds.with_samples([s for s in ds.samples if (s.tags is not None or s.mask is not None) and ds.tags_of(s)])
    budgeted = apply_budget(ds, LabelBudget(mask_fraction=MSRC_MASK_FRACTION, rest="tags", seed=0))
    return tuple(s.id for s in budgeted.samples if s.supervision == "mask")


CPU_ROOT = ROOT / "runs" / "bench" / "semi_cpu"
#: One small JSON per finished run (figures + the settings that made them), kept in the repository: run
#: folders are scratch, these records carry a benchmark spread over several days of work.
CPU_RECORDS = ROOT / "benchmarks" / "results" / "semi_cpu"


def cpu_run_dir(root: Path, setting: str, method: str, seed: int) -> Path:
    return Path(root) / setting / method / f"seed{seed}"


GPU_RECORDS = ROOT / "benchmarks" / "results" / "semi_gpu"


def record_path(records: Path, setting: str, method: str, seed: int) -> Path:
    return Path(records) / f"{setting}.{method}.seed{seed}.json"


def _settings_of(cfg: SemiConfig) -> dict:
    return json.loads(json.dumps({k: v for k, v in vars(cfg).items() if k not in ("out", "progress", "resume")}))


def learning_curve(run: Path) -> list[list[float]]:
    """[(iteration, validation score)] of a run from logs/metrics.csv: val/dice_fg (the foreground Dice of the
    pooled validation voxels) for medical data, val/miou for natural images."""
    import csv

    path = run / "logs" / "metrics.csv"
    if not path.exists():
        return []
    rows = list(csv.DictReader(path.open()))
    key = "val/dice_fg" if any(r.get("val/dice_fg") for r in rows) else "val/miou"
    return [[int(r["step"]), round(float(r[key]), 5)] for r in rows if r.get(key)]


def run_child(protocol: str, setting: str, method: str, seed: int, root: Path, records: Path, threads: int,
              fraction: float = 1.0) -> None:
    """One run of a protocol in this process; resumes its checkpoint if an earlier invocation was killed; writes
    the run's record (figures + settings) and prints its figures as the last line."""
    import torch

    from frugalseg.errors import ConfigError
    from frugalseg.stages.semi import SEMI_METHODS

    torch.set_num_threads(threads)
    cfg = protocol_config(protocol, setting, method, seed, fraction)
    out = cpu_run_dir(root, setting, method, seed)
    cfg.out = str(out)
    if record_path(records, setting, method, seed).exists():
        shutil.rmtree(out, ignore_errors=True)  # its record is stale (other settings): the run is redone
    cfg.resume = (out / "checkpoints" / "last.ckpt").exists() and not (out / "stages" / "train.done").exists()
    t0 = time.time()
    try:
        res = SEMI_METHODS[cfg.semi][1](cfg)
    except ConfigError as exc:  # the folder holds a run of other settings (an older protocol): start it over
        if "made with other settings" not in str(exc):
            raise
        shutil.rmtree(out)
        cfg.resume = False
        res = SEMI_METHODS[cfg.semi][1](cfg)
    val = res["val"]
    figures = {"seed": seed, "split": val["split"], "cases": val["samples"], "wall_s": round(time.time() - t0, 1),
               "resumed": cfg.resume, "iterations": res["iterations"],
               "s_per_iteration": res.get("seconds_per_iteration"), "labelled": res["labelled"],
               "unlabelled": res["unlabelled"], "threads": threads, "curve": learning_curve(out)}
    if cfg.natural:
        figures.update(miou=val["miou"], per_class_iou={c: v["iou"] for c, v in val["per_class"].items()})
    else:
        figures.update(dice=val["case_mean_dice"], jaccard=val["case_mean_jaccard"], hd95=val["case_mean_hd95"],
                       asd=val["case_mean_asd"], units=val["surface_units"],
                       per_class={c: {k: v[k] for k in ("dice", "hd95", "empty_pred_cases")}
                                  for c, v in val["surface"].items()})
    write_json(record_path(records, setting, method, seed), {
        "settings": _settings_of(cfg), "figures": figures, "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "git_commit": git_commit(ROOT)})
    print(json.dumps(figures))


def same_settings(kept: dict, cfg: SemiConfig) -> bool:
    """Whether a record was made with `cfg`'s settings. A field the record lacks (added to the configs since)
    matches when `cfg` leaves it at its default: new options do not invalidate finished runs."""
    now = _settings_of(cfg)
    defaults = _settings_of(type(cfg)(data=cfg.data, labelled_ids=["x"]))
    return all(kept[k] == v if k in kept else v == defaults.get(k) for k, v in now.items()) and set(kept) <= set(now)


def read_record(records: Path, setting: str, method: str, seed: int, protocol: str = "cpu",
                fraction: float = 1.0) -> dict | None:
    """A finished run's figures, if it was made with today's protocol (else None: it is rerun)."""
    path = record_path(records, setting, method, seed)
    if not path.exists():
        return None
    kept = json.loads(path.read_text())
    return kept["figures"] if same_settings(kept["settings"], protocol_config(protocol, setting, method, seed,
                                                                                fraction)) else None


def aggregate(records: Path, protocol: str = "cpu", fraction: float = 1.0) -> dict:
    """`<protocol>_protocol.<setting>.<method>` from every finished run on disk: mean ± sd over seeds, each seed,
    the gain over supervised-only and whether it is beyond the spread (larger than both methods' seed sd)."""
    out: dict = {}
    table = GPU_SETTINGS if protocol == "gpu" else {k: v + CPU_DIAGNOSTICS.get(k, ()) for k, v in CPU_METHODS.items()}
    for setting, methods in table.items():
        part: dict = {}
        for method in methods:
            runs = [r for seed in CPU_SEEDS
                    if (r := read_record(records, setting, method, seed, protocol, fraction)) is not None]
            if not runs:
                continue
            score = "miou" if setting.startswith("msrc") else "dice"
            mean, sd = mean_sd([r[score] for r in runs], digits=5)
            entry = {f"{score}_mean": mean, "sd": sd, "per_seed": [r[score] for r in runs],
                     "seeds": [r["seed"] for r in runs], "wall_s": mean_sd([r["wall_s"] for r in runs], digits=5)[0],
                     "s_per_iteration": mean_sd([r["s_per_iteration"] for r in runs], digits=5)[0], "split": runs[0]["split"],
                     "cases": runs[0]["cases"], "labelled": runs[0]["labelled"], "unlabelled": runs[0]["unlabelled"],
                     "curves": {str(r["seed"]): r["curve"] for r in runs}}
            entry.update(curve_shape([r["curve"] for r in runs]))
            if score == "dice":
                entry["hd95_mean"], entry["hd95_sd"] = mean_sd([r["hd95"] for r in runs], digits=5)
                entry["hd95_per_seed"] = [r["hd95"] for r in runs]
                entry["jaccard_mean"] = mean_sd([r["jaccard"] for r in runs], digits=5)[0]
                entry["asd_mean"] = mean_sd([r["asd"] for r in runs], digits=5)[0]
                entry["units"] = runs[0]["units"]
            if method in CPU_DIAGNOSTICS.get(setting, ()):
                entry["diagnostic"] = True
            part[method] = entry
        base = part.get("supervised_only")
        score = "miou_mean" if setting.startswith("msrc") else "dice_mean"
        for method, entry in part.items():
            if method == "supervised_only" or base is None:
                continue
            gain = round(entry[score] - base[score], 5)
            spread = max(x for x in (entry["sd"], base["sd"], 0.0) if x is not None)
            entry["gain_over_supervised"] = gain
            entry["beyond_spread"] = bool(len(entry["per_seed"]) >= 3 and len(base["per_seed"]) >= 3 and gain > spread)
        if part:
            out[setting] = part
    return out


def curve_shape(curves: list[list]) -> dict:
    """Where each seed's validation curve peaked and where it ended (a diagnosis, not a result: the peak is
    picked on the validation curve). A method that learns and then unlearns (co-training once its agreement
    term reaches full weight) shows a peak well above its end."""
    curves = [c for c in curves if c]
    if not curves:
        return {}
    peaks = [max(c, key=lambda p: p[1]) for c in curves]
    return {"curve_peak_mean": round(float(np.mean([p[1] for p in peaks])), 4),
            "curve_peak_iterations": [int(p[0]) + 1 for p in peaks],
            "curve_final_mean": round(float(np.mean([c[-1][1] for c in curves])), 4)}


def cpu_table(agg: dict) -> None:
    rows = []
    for setting, part in agg.items():
        for method, e in part.items():
            score = e.get("dice_mean", e.get("miou_mean"))
            rows.append((setting, method, len(e["per_seed"]), f"{score:.4f}", _fmt(e["sd"], 4),
                         " ".join(f"{v:.3f}" for v in e["per_seed"]),
                         f"{e['gain_over_supervised']:+.4f}" if "gain_over_supervised" in e else "",
                         "yes" if e.get("beyond_spread") else "", _fmt(e.get("hd95_mean")), f"{e['wall_s']:.0f}"))
    print_table(rows, ("setting", "method", "seeds", "Dice/mIoU", "sd", "per seed", "gain", "beyond sd", "HD95",
                       "wall s/run"))


def run_protocol(protocol: str, settings: list[str], methods: list[str] | None, seeds: list[int], root: Path,
                 records: Path, parallel: int, threads: int, started: float, fraction: float = 1.0) -> Path | None:
    """Every (setting, method, seed) of a protocol not finished yet, `parallel` at a time (`threads` torch
    threads each), seed by seed; the results file is rewritten after each run, so a killed benchmark loses at
    most the runs in flight (and those resume from their last checkpoint)."""
    table = GPU_SETTINGS if protocol == "gpu" else CPU_METHODS
    extra = {} if protocol == "gpu" else CPU_DIAGNOSTICS
    jobs = [(st, m, seed) for seed in seeds for st in settings if st in table for m in table[st]
            if (methods is None or m in methods) and read_record(records, st, m, seed, protocol, fraction) is None]
    jobs += [(st, m, seed) for seed in seeds for st in settings for m in extra.get(st, ())  # diagnostics last
             if (methods is None or m in methods) and read_record(records, st, m, seed, protocol, fraction) is None]
    print(f"{protocol} protocol: {len(jobs)} runs to do in {root}", flush=True)
    running: list[tuple[tuple, float, subprocess.Popen]] = []
    key = f"{protocol}_protocol"
    path = None
    root.mkdir(parents=True, exist_ok=True)

    def save() -> Path | None:
        agg = aggregate(records, protocol, fraction)
        if protocol == "cpu" and not QUICK:
            plot_curves(agg, ROOT / "benchmarks" / "results" / "semi_cpu_curves.png")
        extra = {"gpu_fraction": fraction} if protocol == "gpu" else {}
        name = "semi_quick" if QUICK else "semi"
        return save_results(name, {key: agg}, {key: {**protocol_settings(protocol), **extra}}, started) if agg \
            else None

    while jobs or running:
        while jobs and len(running) < parallel:
            job = jobs.pop(0)
            st, m, seed = job
            log_path = cpu_run_dir(root, st, m, seed).parent / f"seed{seed}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, __file__, "--run-child", protocol, st, m, str(seed), "--cpu-root", str(root),
                   "--cpu-records", str(records), "--threads", str(threads), "--gpu-fraction", str(fraction)] + (
                       ["--quick"] if QUICK else [])
            running.append((job, time.time(), subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log_path, "w"),
                                                                  text=True, cwd=ROOT)))
        time.sleep(2)
        for item in list(running):
            job, t_start, proc = item
            if proc.poll() is None:
                continue
            running.remove(item)
            out = proc.stdout.read()
            if proc.returncode != 0:
                print(f"  {job}: failed (exit {proc.returncode}); see its .log", flush=True)
                continue
            r = json.loads(out.strip().splitlines()[-1])
            score = f"mIoU {r['miou']:.4f}" if "miou" in r else f"Dice {r['dice']:.4f}  HD95 {_fmt(r['hd95'])}"
            print(f"  {job[0]} {job[1]} seed {job[2]}: {score}  ({r['wall_s']:.0f} s)", flush=True)
            path = save() or path
    cpu_table(aggregate(records, protocol, fraction))
    return save() or path


def markdown_table(agg: dict) -> str:
    """The README's table of the CPU protocol (`--markdown`): mean ± sd over seeds, each seed, the gain over
    supervised-only and whether it is beyond the spread, HD95, the training-time validation curve's peak
    and end (a diagnosis), wall time per run."""
    lines = ["| setting (split) | method | seeds | Dice / mIoU mean ± sd | per seed | gain | beyond sd | HD95 "
             "| val curve: peak (iteration) → end | wall / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for setting, part in agg.items():
        for method, e in part.items():
            score = e.get("dice_mean", e.get("miou_mean"))
            sd = "" if e["sd"] is None else f" ± {e['sd']:.3f}"
            gain = f"{e['gain_over_supervised']:+.3f}" if "gain_over_supervised" in e else ""
            beyond = {True: "yes", False: "no"}.get(e.get("beyond_spread"), "")
            hd = "" if e.get("hd95_mean") is None else f"{e['hd95_mean']:.1f}"
            shape = (f"{e['curve_peak_mean']:.3f} ({'/'.join(map(str, e['curve_peak_iterations']))}) → "
                     f"{e['curve_final_mean']:.3f}") if "curve_peak_mean" in e else ""
            lines.append(f"| {setting} ({e['split']}) | {method} | {len(e['per_seed'])} | {score:.3f}{sd} | "
                         f"{' / '.join(f'{v:.3f}' for v in e['per_seed'])} | {gain} | {beyond} | {hd} | {shape} | "
                         f"{e['wall_s'] / 60:.1f} min |")
    return "\n".join(lines)


def plot_curves(agg: dict, path: Path) -> Path | None:
    """One panel per setting: each method's validation score against iteration, mean over its seeds (line;
    dashed: diagnostics) and the seeds' range (band); the legend gives the number of seeds. The score is the one logged during training (ACDC / LA: foreground Dice of the
    pooled validation voxels; msrc: mIoU), every `epoch_steps` iterations; the table's figures are the final
    per-case means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in agg if any(e.get("curves") for e in agg[s].values())]
    if not settings:
        return None
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for method, e in agg[setting].items():
            curves = [c for c in e.get("curves", {}).values() if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            steps = np.array([curves[0][i][0] + 1 for i in range(n)])
            values = np.array([[c[i][1] for i in range(n)] for c in curves])
            line, = ax.plot(steps, values.mean(0), marker=".", label=f"{method} ({len(curves)})",
                            linestyle="--" if e.get("diagnostic") else "-")
            if len(curves) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
        ax.set_title(f"{setting} ({next(iter(agg[setting].values()))['split']})")
        ax.set_xlabel("iteration")
        ax.set_ylabel("val mIoU" if setting.startswith("msrc") else "val Dice (pooled)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def protocol_settings(protocol: str) -> dict:
    if protocol == "gpu":
        return {"settings": {k: list(v) for k, v in GPU_SETTINGS.items()}, "configs": "gpu_config: the library's "
                "protocol defaults per method", "precision": "auto (bf16 mixed on GPU)"}
    return cpu_settings()


def cpu_settings() -> dict:
    """The protocol as run (per setting: one method's resolved-ready config; the others differ by method fields)."""
    return {"acdc": CPU_ACDC, "la": CPU_LA, "msrc_10pct": {**CPU_MSRC, "labelled_ids": list(msrc_labelled_ids())},
            "methods": {k: list(v) for k, v in CPU_METHODS.items()}, "seeds": list(CPU_SEEDS),
            "diagnostics": {k: list(v) for k, v in CPU_DIAGNOSTICS.items()},
            "threads_per_run": 1, "ramps": "stages.semi.scale_schedule: each ramp spans the protocol's fraction of "
                                           "the run, in units of 1 iteration; poly / step lr over the run"}


def _ramps(cls, iterations: int) -> dict:
    """Quick runs: ramps in units of one iteration, spanning the run as the protocols' do."""
    if cls.__name__ == "CoTrainConfig":
        return {"ramp_epochs": iterations / 2}
    if cls.__name__ in ("DTCConfig", "MeanTeacherConfig"):
        return {"consistency_rampup": float(iterations)}
    return {}


def default_workers(parallel: int = 1) -> int:
    """Loader processes: none on a small CPU box (they would steal the training cores), several beside a GPU."""
    import torch

    cpus = os.cpu_count() or 1
    return max(1, min(8, (cpus - parallel) // max(1, parallel))) if torch.cuda.is_available() and cpus > 4 else 0


def default_threads(parallel: int) -> int:
    """Torch threads per run: the cores shared between the runs beside a GPU; half of them on a CPU-only box,
    where a second busy process turns OpenMP spin-waits into 100x slower steps (measured: 2.2 s instead of 0.03 s
    per U-Net step with 2 threads on 2 shared cores)."""
    import torch

    cpus = os.cpu_count() or 1
    share = max(1, cpus // max(1, parallel))
    return share if torch.cuda.is_available() else max(1, share // 2)


def _method(name: str) -> tuple[type, dict]:
    """Config class and method-specific fields of a run name such as 'cotrain_k3_noadv'."""
    from frugalseg.stages.semi import CoTrainConfig, DTCConfig, MeanTeacherConfig, SupervisedOnlyConfig

    if name in ("supervised", "supervised_only"):
        return SupervisedOnlyConfig, {}
    if name == "supervised_only_lb2":  # diagnostic (msrc): 2 labelled images a step, as each model of the first
        return SupervisedOnlyConfig, {"half_labelled_batch": True}  # co-training protocol
    if name == "meanteacher":
        return MeanTeacherConfig, {}
    if name == "dtc":
        return DTCConfig, {}
    if name == "supervised_levelset":  # diagnostic: DTC's dual-head network, its level-set head unused
        return SupervisedOnlyConfig, {"network": "levelset"}
    if name == "dtc_no_consistency":  # diagnostic: DTC's network and level-set regression, no unlabelled term
        return DTCConfig, {"consistency": 0.0}
    if name.startswith("cotrain_k"):
        k = int(name.split("_")[1][1:])
        # K = 3 on 3 labelled patients: one patient per model (disjoint views, the default).
        extra = {"n_models": k, "adversarial": not name.endswith("_noadv"), "adv_pairs": "all"}
        if name.endswith("_allviews"):  # diagnostic: every model sees every labelled patient (no split views)
            extra["view_overlap"] = 1.0
        if name.endswith("_no_agreement"):  # diagnostic: no Jensen-Shannon term (each model on its own view)
            extra["lambda_cot"] = 0.0
        if name.endswith("_lb2_bnleak"):  # diagnostic (msrc): 2 labelled images per model a step, and the
            extra.update(adv_bn_update=True, half_labelled_batch=True)  # adversarial passes update BatchNorm
        return CoTrainConfig, extra
    raise SystemExit(f"unknown method {name}")


def acdc_configs(quick: bool) -> dict[str, SemiConfig]:
    configs = {}
    for n in ACDC_LABELLED:
        for method in ACDC_METHODS:
            cls, extra = _method(method)
            common = dict(data="acdc", labelled_patients=n, val_split="val", seed=1337, val_every=0, progress=False)
            if quick:
                common.update(QUICK_ACDC, **_ramps(cls, QUICK_ACDC["iterations"]))
                if cls.__name__ == "CoTrainConfig":  # per model: K × 2 labelled + 4 unlabelled
                    common["labelled_batch_size"] = 2
            configs[f"acdc_l{n}_{method}"] = cls(**common, **extra)
    return configs


def la_configs(quick: bool) -> dict[str, SemiConfig]:
    configs = {}
    for method in LA_METHODS:
        cls, extra = _method(method)
        common = dict(data="la2018", labelled_patients=2, val_split="test", seed=1337, val_every=0, progress=False)
        if method == "supervised":
            extra = {"network": "levelset"}  # DTC's network: the difference is DTC's two extra terms only
        if quick:
            common.update(QUICK_LA, **_ramps(cls, QUICK_LA["iterations"]))
        configs[f"la_{method}"] = cls(**common, **extra)
    return configs


def all_configs(quick: bool) -> dict[str, SemiConfig]:
    return {**acdc_configs(quick), **la_configs(quick)}


def child(name: str, quick: bool, out_root: str, max_iterations: int | None, workers: int, threads: int | None) -> None:
    """One run in its own process; prints its figures as the last JSON line."""
    import torch

    from frugalseg.stages.semi import SEMI_METHODS

    if threads:
        torch.set_num_threads(threads)
    cfg = all_configs(quick)[name]
    cfg.out = str(Path(out_root) / name)
    cfg.num_workers = workers
    if max_iterations:
        cfg.iterations = min(cfg.iterations or max_iterations, max_iterations)
    t0 = time.time()
    res = SEMI_METHODS[cfg.semi][1](cfg)
    val = res["val"]
    done = json.loads((Path(cfg.out) / "stages" / "train.done").read_text())
    print(json.dumps({
        "dice": val["case_mean_dice"], "jaccard": val["case_mean_jaccard"], "hd95": val["case_mean_hd95"],
        "asd": val["case_mean_asd"], "units": val["surface_units"], "cases": val["samples"], "split": val["split"],
        "per_class": {c: {k: v[k] for k in ("dice", "jaccard", "hd95", "asd", "empty_pred_cases")}
                      for c, v in val["surface"].items()},
        "wall_s": round(time.time() - t0, 1), "train_s": done.get("seconds"), "iterations": res["iterations"],
        "s_per_iteration": res.get("seconds_per_iteration"), "labelled": res["labelled"],
        "unlabelled": res["unlabelled"], "streams": res["streams"], "threads": torch.get_num_threads(),
    }))


def run_jobs(names: list[str], quick: bool, out_root: Path, parallel: int, max_iterations: int | None) -> dict:
    """Every run as a subprocess, `parallel` at a time."""
    jobs = list(names)
    results: dict[str, dict] = {}
    running: list[tuple[str, float, subprocess.Popen]] = []
    workers = default_workers(parallel)
    threads = default_threads(parallel)
    while jobs or running:
        while jobs and len(running) < parallel:
            name = jobs.pop(0)
            cmd = [sys.executable, __file__, "--child", name, "--runs", str(out_root), "--workers", str(workers),
                   "--threads", str(threads)] + (["--quick"] if quick else [])
            if max_iterations:
                cmd += ["--max-iterations", str(max_iterations)]
            log = open(out_root / f"{name}.log", "w")
            running.append((name, time.time(), subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                                                cwd=ROOT)))
        time.sleep(1)
        for item in list(running):
            name, started, proc = item
            if proc.poll() is None:
                continue
            out = proc.stdout.read()
            running.remove(item)
            if proc.returncode != 0:
                raise SystemExit(f"run {name} failed (exit {proc.returncode}); see {out_root / (name + '.log')}")
            results[name] = json.loads(out.strip().splitlines()[-1])
            results[name]["process_wall_s"] = round(time.time() - started, 1)
            r = results[name]
            print(f"  {name}: Dice {r['dice']:.4f}  HD95 {_fmt(r['hd95'])}  ({r['wall_s']:.0f} s, "
                  f"{_fmt(r['s_per_iteration'], 3)} s/iteration)", flush=True)
    return results


def _fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _settings(configs: dict[str, SemiConfig]) -> dict:
    return {name: {k: v for k, v in vars(cfg).items() if k not in ("out", "progress")} for name, cfg in configs.items()}


def run_acdc(quick: bool, out_root: Path, parallel: int, max_iterations: int | None) -> tuple[dict, dict]:
    configs = acdc_configs(quick)
    t_all = time.time()
    results = run_jobs(list(configs), quick, out_root, parallel, max_iterations)
    figures: dict = {}
    rows = []
    for n in ACDC_LABELLED:
        part = {}
        base = results[f"acdc_l{n}_supervised"]
        for method in ACDC_METHODS:
            r = results[f"acdc_l{n}_{method}"]
            part[method] = {**r, "dice_gain_over_supervised": round(r["dice"] - base["dice"], 6)}
            rows.append((f"{n} patients", method, f"{r['dice']:.4f}", f"{r['dice'] - base['dice']:+.4f}",
                         _fmt(r["hd95"]), r["labelled"], r["unlabelled"], f"{r['wall_s']:.0f}"))
        figures[f"labelled_{n}_patients"] = part
    first = results[f"acdc_l{ACDC_LABELLED[0]}_supervised"]
    figures.update(val_split=first["split"], val_volumes=first["cases"], hd95_units=first["units"],
                   wall_s_all_runs=round(time.time() - t_all, 1), parallel_runs=parallel,
                   schedule=_schedule(configs[f"acdc_l{ACDC_LABELLED[0]}_dtc"], max_iterations))
    print_table(rows, ("acdc labelled", "method", "val Dice", "vs sup", f"HD95 ({first['units']})", "lab. slices",
                       "unlab.", "wall s"))
    return {"acdc": figures}, _settings(configs)


def run_la(quick: bool, out_root: Path, parallel: int, max_iterations: int | None) -> tuple[dict, dict]:
    configs = la_configs(quick)
    t_all = time.time()
    results = run_jobs(list(configs), quick, out_root, parallel, max_iterations)
    figures: dict = {m: results[f"la_{m}"] for m in LA_METHODS}
    base = figures["supervised"]
    figures["dtc_dice_gain_over_supervised"] = round(figures["dtc"]["dice"] - base["dice"], 6)
    figures.update(test_volumes=base["cases"], labelled_volumes=base["labelled"],
                   unlabelled_volumes=results["la_dtc"]["unlabelled"], units=base["units"],
                   wall_s_all_runs=round(time.time() - t_all, 1), parallel_runs=parallel,
                   schedule=_schedule(configs["la_dtc"], max_iterations))
    rows = [(m, f"{figures[m]['dice']:.4f}", f"{figures[m]['jaccard']:.4f}", _fmt(figures[m]["hd95"]),
             _fmt(figures[m]["asd"]), f"{figures[m]['wall_s']:.0f}") for m in LA_METHODS]
    s = figures["schedule"]
    print_table(rows, ("la (2 labelled, 6 unlabelled)", "test Dice", "Jaccard", f"HD95 ({base['units']})",
                       f"ASD ({base['units']})", "wall s"))
    print(f"patch {s['patch_size']}, {s['iterations']} iterations, {s['arch']} network")
    return {"la": figures}, _settings(configs)


def masks_only_steps(train_images: int, masked: int, seg_epochs: int, batch_size: int) -> tuple[int, int]:
    """(epochs, max_steps) giving the masks-only segmenter as many optimizer steps as one round's segmenter of
    the pipeline (`seg_epochs` over every training image): the baseline is not starved of iterations just
    because 10 % of the images make short epochs."""
    steps = seg_epochs * max(1, train_images // batch_size)
    per_epoch = masked // batch_size if masked > batch_size else 1  # the loader drops the last partial batch
    return -(-steps // per_epoch), steps


def by_round(summary: dict) -> dict[str, float]:
    return {str(r): v["miou"] for r, v in summary["val_by_round"].items()}


def stage_wall(summary: dict) -> float:
    """Seconds of the pipeline stages this run computed itself (stages reused from another run count 0)."""
    return round(sum(v for v in summary["stage_seconds"].values() if v is not None), 1)


def stage_table(summary: dict) -> dict:
    """Pseudo-mask mIoU per pipeline stage on the training images it scores (not those that chose a threshold)."""
    return {"pseudo_mask_miou_train": {r["stage"]: r["miou"] for r in summary["stages"]},
            "pseudo_mask_scored_images": summary["scored_images"]}


def finished_part(folder: Path, cfg, make: Callable[[], dict]) -> dict:
    """Figures of a finished run with the same settings (a `--resume`d benchmark), else `make()` timed and
    kept next to the run, so a resumed benchmark reports the figures and wall time of the run that made them.
    Any other run in `folder` is removed first: a finished training run is skipped, not retrained."""
    record = folder / "benchmark_part.json"
    settings = {k: v for k, v in vars(cfg).items() if k != "progress"}
    if record.exists():
        kept = json.loads(record.read_text())
        if kept["settings"] == json.loads(json.dumps(settings)):
            return kept["figures"]
    shutil.rmtree(folder, ignore_errors=True)
    t = time.time()
    figures = {**make(), "wall_s": round(time.time() - t, 1)}
    write_json(record, {"settings": settings, "figures": figures})
    return figures


def run_msrc(quick: bool, out_root: Path, parallel: int, max_iterations: int | None,
             scales: tuple[float, ...] | None = None) -> tuple[dict, dict]:
    """Masks (10 %) + tags vs masks-only vs tags-only on msrc-objects, val mIoU; in this process, one at a time.
    `scales` replaces the AdvCAM scales of the schedule (the full one at scale 1.0 fits a CPU afternoon).

    Masks + tags chooses its seed/CRF thresholds on its own masked training images (the pipeline's
    calibration drawn within the label budget): a user who has masks for a few images has exactly the data
    to tune them. Tags-only has no masks, so it keeps the pipeline's default thresholds. Wall times are the
    stage times of the invocation that ran each stage (`stage_seconds`), so a `--resume` keeps them true."""
    from frugalseg.stages.train import train
    from frugalseg.stages.pipeline import PipelineConfig, run_pipeline, segmenter_config

    schedule = {**(MSRC_QUICK if quick else MSRC_FULL), **({"scales": tuple(scales)} if scales else {})}
    common = dict(data="msrc-objects", train_split="train", val_split="val", seeds="advcam", progress=False, **schedule)
    figures: dict = {"val_split": "val", "mask_fraction": MSRC_MASK_FRACTION, "seeds": "advcam",
                     "advcam_scales": list(schedule["scales"])}
    tags_cfg = PipelineConfig(out=str(out_root / "msrc_tags_only"), **common)
    tags = run_pipeline(tags_cfg)
    figures["tags_only"] = {"val_miou": tags["final_val_miou"], "val_miou_by_round": by_round(tags),
                            "thresholds": tags["thresholds"], **stage_table(tags), "wall_s": stage_wall(tags)}
    both_cfg = PipelineConfig(out=str(out_root / "msrc_masks_tags"), mask_fraction=MSRC_MASK_FRACTION,
                              calibration_fraction=MSRC_MASK_FRACTION,
                              classifier=str(out_root / "msrc_tags_only" / "classifier"),
                              maps_from=str(out_root / "msrc_tags_only" / "cams"), **common)
    both = run_pipeline(both_cfg)
    figures["masks_tags"] = {"val_miou": both["final_val_miou"], "val_miou_by_round": by_round(both),
                             "masked_images": both["masked_images"], "thresholds": both["thresholds"], **stage_table(both),
                             "wall_s_after_shared_maps": stage_wall(both)}
    masked = json.loads((out_root / "msrc_masks_tags" / "budget.json").read_text())["mask"]
    epochs, steps = masks_only_steps(both["train_images"], len(masked), both_cfg.seg_epochs, both_cfg.batch_size)
    if max_iterations:
        steps = min(steps, max_iterations)
    only_cfg = segmenter_config(both_cfg, out_root / "msrc_masks_only", labelled_ids=masked, epochs=epochs, max_steps=steps)
    figures["masks_only"] = finished_part(out_root / "msrc_masks_only", only_cfg, lambda: {
        "val_miou": train(only_cfg)["val"]["miou"], "masked_images": len(masked), "optimizer_steps": steps})
    figures["train_images"] = both["train_images"]
    for other in ("masks_only", "tags_only"):
        figures[f"masks_tags_minus_{other}"] = round(figures["masks_tags"]["val_miou"] - figures[other]["val_miou"], 6)
    rows = [(name.replace("_", " "), "val", f"{figures[name]['val_miou']:.4f}", detail) for name, detail in (
        ("masks_only", f"{len(masked)} masked images, {steps} steps"),
        ("tags_only", f"{both['train_images']} tagged images, {tags_cfg.rounds} rounds"),
        ("masks_tags", f"{len(masked)} masks + {both['train_images'] - len(masked)} tags"))]
    print_table(rows, ("msrc-objects", "split", "mIoU", "supervision"))
    settings = {"msrc_pipeline": {k: v for k, v in vars(both_cfg).items() if k not in ("out", "progress")},
                "msrc_masks_only": {k: v for k, v in vars(only_cfg).items() if k not in ("out", "progress")}}
    return {"msrc": figures}, settings


def _schedule(cfg: SemiConfig, max_iterations: int | None) -> dict:
    """The resolved schedule of a run (the protocol's values where the config leaves them to the data)."""
    from frugalseg.data import open_dataset

    dims = open_dataset(cfg.data, cfg.train_split).ndim
    r = cfg.resolved(dims)
    iterations = min(r.iterations, max_iterations) if max_iterations else r.iterations
    return {"patch_size": r.patch_size, "iterations": iterations, "arch": r.arch, "channels": r.channels,
            "labelled_batch_size": r.labelled_batch_size, "unlabelled_batch_size": r.unlabelled_batch_size,
            "dims": dims}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Short schedules (under 15 minutes on a 2-core CPU).")
    ap.add_argument("--only", choices=["cpu", "gpu", "acdc", "la", "msrc"], action="append",
                    help="cpu: the CPU protocol (resumable run by run); gpu: the papers' schedules, every run at once "
                         "on one GPU (benchmarks/semi_gpu.sh); acdc / la / msrc: the earlier full / --quick parts.")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench"), help="Where run directories go.")
    ap.add_argument("--parallel", type=int, help="Runs at once (default: 4 beside a GPU, else 1).")
    ap.add_argument("--max-iterations", type=int, help="Cap every run's iterations (smoke test).")
    ap.add_argument("--resume", action="store_true",
                    help="Keep the run directories of an earlier invocation: finished runs and stages are not redone "
                         "(their wall times then describe the earlier invocation). Default: start fresh.")
    ap.add_argument("--msrc-scales", type=float, nargs="+",
                    help="AdvCAM scales of the msrc part (default: the schedule's; 1.0 alone makes the full schedule "
                         "CPU-sized, about an hour on 2 cores).")
    ap.add_argument("--cpu-settings", nargs="+", choices=list(CPU_METHODS), default=list(CPU_METHODS),
                    help="--only cpu: the settings to run (default: all).")
    ap.add_argument("--cpu-methods", nargs="+", help="--only cpu: only these methods.")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(CPU_SEEDS), help="--only cpu: training seeds.")
    ap.add_argument("--cpu-root", default=str(CPU_ROOT), help="--only cpu: where its run folders go (kept: a "
                                                              "finished run is never redone).")
    ap.add_argument("--cpu-records", default=str(CPU_RECORDS), help="--only cpu: where each finished run's record "
                                                                    "goes (committed; read on resume).")
    ap.add_argument("--gpu-settings", nargs="+", choices=list(GPU_SETTINGS), default=list(GPU_SETTINGS),
                    help="--only gpu: the settings to run.")
    ap.add_argument("--gpu-fraction", type=float, default=1.0,
                    help="--only gpu: this fraction of the papers' iterations (ramps and lr steps follow).")
    ap.add_argument("--markdown", action="store_true", help="Print the CPU protocol's table from the records on disk.")
    ap.add_argument("--aggregate", action="store_true", help="Write semi.json's cpu_protocol and its figure from the "
                                                             "records on disk, running nothing.")
    ap.add_argument("--run-child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global QUICK
    QUICK = args.quick
    if args.child:
        child(args.child, args.quick, args.runs, args.max_iterations, args.workers, args.threads)
        return
    if args.run_child:
        protocol, setting, method, seed = args.run_child
        run_child(protocol, setting, method, int(seed), Path(args.cpu_root), Path(args.cpu_records),
                  args.threads or 1, args.gpu_fraction)
        return
    if args.markdown:
        print(markdown_table(aggregate(Path(args.cpu_records))))
        return
    if args.aggregate:  # semi.json's cpu_protocol and the figure from the records on disk, nothing run
        path = run_protocol("cpu", [], None, [], Path(args.cpu_root), Path(args.cpu_records), 1, 1, time.time())
        print(f"wrote {path}")
        return
    if args.only == ["cpu"]:
        root, records, seeds = Path(args.cpu_root), Path(args.cpu_records), args.seeds
        if args.quick:  # scratch records: never mixed with the protocol's
            root, records, seeds = Path(args.runs) / "semi_cpu_quick", Path(args.runs) / "semi_cpu_quick" / "records", [1]
            shutil.rmtree(root, ignore_errors=True)
        path = run_protocol("cpu", args.cpu_settings, args.cpu_methods, seeds, root, records, args.parallel or 2, 1,
                            time.time())
        print(f"wrote {path}")
        return
    if args.only == ["gpu"]:  # all runs at once on the one GPU, a few CPU threads each
        runs = sum(len(GPU_SETTINGS[k]) for k in args.gpu_settings) * len(args.seeds)
        records = Path(args.cpu_records) if args.cpu_records != str(CPU_RECORDS) else GPU_RECORDS
        path = run_protocol("gpu", args.gpu_settings, args.cpu_methods, args.seeds, Path(args.runs) / "semi_gpu",
                            records, args.parallel or runs, max(1, (os.cpu_count() or 2) // runs), time.time(),
                            args.gpu_fraction)
        print(f"wrote {path}")
        return
    import torch

    parallel = args.parallel or (4 if torch.cuda.is_available() else 1)
    started = time.time()
    name = "semi_quick" if args.quick else "semi"
    out_root = Path(args.runs) / name
    if out_root.exists() and not args.resume:
        shutil.rmtree(out_root)  # finished runs would be skipped, and their old figures and times reported as new
    out_root.mkdir(parents=True, exist_ok=True)
    path = None
    for part in args.only or ["acdc", "la", "msrc"]:
        fn = {"acdc": run_acdc, "la": run_la, "msrc": functools.partial(run_msrc, scales=args.msrc_scales)}[part]
        figures, settings = fn(args.quick, out_root, parallel, args.max_iterations)
        extra = {"quick": args.quick, "max_iterations": args.max_iterations, "threads_per_run": default_threads(parallel)}
        if args.quick:
            extra["quick_sizing"] = QUICK_SIZING
        path = save_results(name, figures, {**settings, **extra}, started)
    print(f"wrote {path} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
