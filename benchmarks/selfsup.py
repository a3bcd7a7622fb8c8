"""Self-supervised pretraining with mix-and-match tuning, and the locally adaptive learning loss, on this CPU.

Pretraining (`pretrain.<setting>.<init>`, val mIoU / Dice, 3 training seeds):
- msrc-objects, OCR on EfficientNet-Lite0: settings `msrc_10pct` (the 23 masked images of the semi-supervised
  benchmark's 10 %) and `msrc_full` (all 276 training masks). Inits: `random`; `colorize` and `rotation`
  (proxy tasks on the 276 training images, labels unused; 1000 iterations); `colorize_mm`, `rotation_mm`
  (mix-and-match tuning of those on the setting's masks, 300 iterations of 8 images x 10 patches); `imagenet`
  (the offline ImageNet weights: the ceiling). Fine-tuning: `frugalseg train` with the semi-supervised CPU
  protocol's msrc schedule (crop 160, batch 4, 400 iterations, SGD 0.01 poly, weight decay 5e-4, aux 0.4).
- ACDC, 7 labelled patients, the semi-supervised CPU protocol's supervised-only run (U-Net 8..128, 128²,
  1200 iterations, Adam 0.01): `random` against `rotation_mm` (rotation on all 944 training slices, then M&M
  on the 7 patients' slices), `rotation` alone (what M&M adds), and `rotation_mm_small` (M&M with 8-24 px patches,
  sized to ACDC's structures: `--part mm-patches`). Colourisation needs colour: ACDC is greyscale.
The M&M label budget is fixed (the setting's masks); the seeds vary initialisation of the new layers, data order
and augmentation.

LAL (`lal.<setting>.<loss>`): `ce` against `lal` on msrc_full, msrc_10pct (ImageNet init, the runs above for
ce) and acdc_l7 (cross-entropy against LAL in the supervised-only protocol). Window, stride and k were chosen by
`--part lal-select` at the recipe's rate: msrc_full's train:fit → train:holdout (the reported val split never seen),
one seed; ACDC's LAL takes the chosen window, stride and k with its protocol's Adam rate. Besides per-class IoU,
msrc's LAL and CE runs are scored inside a 5 px band around the val masks' class boundaries (`boundary.*`).

Every finished run leaves a record in benchmarks/results/selfsup_runs/; runs resume from their records and
checkpoints, across sessions. `--aggregate` writes benchmarks/results/selfsup.json.

    python benchmarks/selfsup.py --part pretrain-msrc [--seeds 0 1 2]
    python benchmarks/selfsup.py --part acdc
    python benchmarks/selfsup.py --part lal-select
    python benchmarks/selfsup.py --part lal [--settings acdc_l7]
    python benchmarks/selfsup.py --part lal-speed     # LAL vs CE forward + backward time
    python benchmarks/selfsup.py --part mm-patches    # how different M&M's anchors and negatives are in content
    python benchmarks/selfsup.py --aggregate
    python benchmarks/selfsup.py --quick            # minutes: every path once, tiny schedules
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

from common import RESULTS, ROOT, default_data_root, mean_sd, print_table, recorded, save_results

os.environ.setdefault("FRUGALSEG_DATA", str(default_data_root()))

RECORDS = RESULTS / "selfsup_runs"
SEEDS = (0, 1, 2)
MSRC_INITS = ("random", "colorize", "colorize_mm", "rotation", "rotation_mm", "imagenet")
PROXY = dict(iterations=1000, batch_size=16, crop_size=160, epoch_iterations=50)
PROXY_ROTATION = dict(PROXY, batch_size=4)  # each image is shown 4 times: 16 images a step
MIXMATCH = dict(iterations=300, batch_size=8, crop_size=256, scale=(0.75, 1.25), epoch_iterations=50,
                patches_per_image=10, patch_sides=(64, 256), patch_resize=128, embedding_grid=4)
FINETUNE = dict(arch="ocr", backbone="tf_efficientnet_lite0", crop_size=160, batch_size=4, max_steps=400, epochs=-1,
                optimizer="sgd", lr=0.01, weight_decay=5e-4, val_every=10**6)
ACDC_CHANNELS = [8, 16, 32, 64, 128]
ACDC_PROXY = dict(iterations=1000, batch_size=16, crop_size=128, epoch_iterations=50, scale=(0.75, 1.25))
# M&M patches for ACDC's structures: the official sides are 13-50 % of a VOC image's side; patches of 32-96 px
# centred on RV, myocardium or LV pixels all show the whole heart (`--part mm-patches`: anchor-negative class
# histograms as alike as anchor-positive ones), 8-24 px ones differ as msrc's do. Chosen on the training slices.
ACDC_SMALL_PATCHES = (8, 24)
ACDC_MIXMATCH = dict(iterations=1000, batch_size=8, crop_size=128, scale=(0.9, 1.1), epoch_iterations=50,
                     patches_per_image=10, patch_sides=(32, 96), patch_resize=64, embedding_grid=4)
# (window, stride, k), all at the recipe's SGD rate 0.01: at 0.05 LAL diverged (train:holdout mIoU 0.063 with k = 1,
# 0.047 with k = 5, background only), so the rate is not among the options.
# k = 2 was added after every k = 5 model ended hedged (`window_cost_study`): a milder weight on hard windows.
LAL_CANDIDATES = ((9, 4, 5.0), (17, 8, 5.0), (5, 2, 5.0), (9, 4, 1.0), (9, 4, 2.0))
# how a window's cost behaves below losses.LAL_FLOOR; the records made while it was clamped (no gradient) differ here
LAL_COST = {"below_floor": "linear"}
LAL_DEFAULT = dict(lal_window=9, lal_stride=4, lal_k=5.0)
QUICK = False


def quick_schedule(d: dict, steps_key: str) -> dict:
    return {**d, steps_key: 2, **({"epoch_iterations": 2} if "epoch_iterations" in d else {})}


def record(name: str, settings: dict, run) -> dict:
    """Figures of run `name` (`common.recorded`: from its record when made with `settings`, else `run()`'s timed,
    printed and kept; --quick keeps none)."""
    def timed() -> dict:
        t0 = time.time()
        figures = run()
        figures["seconds"] = round(time.time() - t0, 1)
        print(f"  {name}: {json.dumps({k: v for k, v in figures.items() if not isinstance(v, dict)})}", flush=True)
        return figures

    return recorded(RECORDS, name, settings, timed, keep=not QUICK)


def msrc_10pct_ids() -> list[str]:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from semi import msrc_labelled_ids

    return list(msrc_labelled_ids())


# ---- pretraining runs -----------------------------------------------------------------------------------
def pretrain_run(root: Path, name: str, **kw) -> Path:
    """A `frugalseg pretrain` run (resumable); its wall time and last loss recorded under pretrain.<name>."""
    from frugalseg.stages.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(out=str(root / name), progress=False, devices="cpu", resume=True, **kw)
    settings = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k not in ("out", "progress", "resume")}
    settings["init"] = Path(cfg.init).name if cfg.init else None

    def run() -> dict:
        res = pretrain(cfg)
        return {"pretrain_seconds": res["seconds"], "images": res["images"], "last_losses": res["last_losses"]}

    record(f"pretrain_run.{name}", settings, run)
    if not (root / name / "weights.safetensors").exists():  # recorded in another session: the weights are scratch
        pretrain(cfg)
    return root / name


def msrc_inits(root: Path, setting: str, inits: tuple[str, ...]) -> dict[str, bool | str]:
    """`init` name → TrainConfig.pretrained for msrc (runs the pretraining the inits need)."""
    proxy = quick_schedule(PROXY, "iterations") if QUICK else PROXY
    rot = quick_schedule(PROXY_ROTATION, "iterations") if QUICK else PROXY_ROTATION
    mm = quick_schedule(MIXMATCH, "iterations") if QUICK else MIXMATCH
    labels = {"labelled_ids": msrc_10pct_ids()} if setting == "msrc_10pct" else {}
    out: dict[str, bool | str] = {}
    for init in inits:
        if init == "random":
            out[init] = False
        elif init == "imagenet":
            out[init] = True
        elif init in ("colorize", "rotation"):
            out[init] = str(pretrain_run(root, f"msrc_{init}", task=init, data="msrc-objects",
                                         **(proxy if init == "colorize" else rot)))
        else:
            proxy_name = init[: -len("_mm")]
            base = pretrain_run(root, f"msrc_{proxy_name}", task=proxy_name, data="msrc-objects",
                                **(proxy if proxy_name == "colorize" else rot))
            out[init] = str(pretrain_run(root, f"msrc_{setting}_{init}", task="mixmatch", data="msrc-objects",
                                         init=str(base), **labels, **mm))
    return out


def msrc_finetune(root: Path, setting: str, init: str, pretrained, seed: int, loss: str = "ce",
                  lal: dict | None = None, split: tuple[str, str] = ("train", "val"), tag: str | None = None) -> dict:
    from frugalseg.stages.train import TrainConfig, train

    ft = {**FINETUNE, "max_steps": 4} if QUICK else FINETUNE
    labels = {"labelled_ids": msrc_10pct_ids()} if setting == "msrc_10pct" else {}
    name = tag or f"{setting}.{init}.{loss}.seed{seed}"
    cfg = TrainConfig(data="msrc-objects", train_split=split[0], val_split=split[1], pretrained=pretrained, seed=seed,
                      loss=loss, out=str(root / "finetune" / name), progress=False, devices="cpu", resume=True,
                      **labels, **{**ft, **(lal or {})})
    settings = {"setting": setting, "init": init, "loss": loss, "lal": lal and {**lal, **LAL_COST}, "seed": seed,
                "split": list(split),
                "finetune": ft, "pretrained": Path(str(pretrained)).name if isinstance(pretrained, str) else pretrained}

    def run() -> dict:
        v = train(cfg)["val"]
        return {"miou": v["miou"], "per_class_iou": {c: round(p["iou"], 4) for c, p in v["per_class"].items()},
                "split": split[1]}

    return record(f"finetune.{name}", settings, run)


BAND = 5  # px: the boundary band of `boundary_run` (DeepLab-style trimap evaluation)


def boundary_run(root: Path, setting: str, loss: str, seed: int) -> dict:
    """mIoU of a finished msrc fine-tuning inside the band of BAND px around the val masks' class boundaries
    (`surface_metrics.boundary_band`), from its saved predictions: LAL's windows should help borders most."""
    import numpy as np
    import torch

    from frugalseg.data import open_split
    from frugalseg.data.io import read_label_png
    from frugalseg.metrics import confusion_matrix, iou_per_class, nanmean
    from frugalseg.surface_metrics import boundary_band

    name = f"{setting}.imagenet.{loss}.seed{seed}"
    settings = {"run": name, "split": "val", "band_px": BAND}

    def run() -> dict:
        ds = open_split("msrc-objects", "val")
        n = ds.labels.num_classes
        cm = torch.zeros(n, n, dtype=torch.int64)
        for smp in ds.samples:
            truth = ds.read_mask(smp)
            pred = read_label_png(root / "finetune" / name / "predictions" / "val" / f"{smp.id}.png")
            band = boundary_band(truth, BAND)
            cm += confusion_matrix(torch.from_numpy(pred[band].astype(np.int64)),
                                   torch.from_numpy(truth[band].astype(np.int64)), n)
        return {"band_miou": round(nanmean(iou_per_class(cm)), 4),
                "band_pixel_accuracy": round(float(cm.diag().sum()) / max(int(cm.sum()), 1), 4),
                "band_pixels": int(cm.sum())}

    return record(f"boundary.{setting}.{loss}.seed{seed}", settings, run)


# ---- ACDC --------------------------------------------------------------------------------------------
def acdc_labelled_ids() -> list[str]:
    from frugalseg.data import open_split
    from frugalseg.semi.batches import select_labelled

    return list(select_labelled(open_split("acdc", "train"), patients=7))


def acdc_pretrained(root: Path) -> dict[str, str]:
    """{'rotation': the proxy run, 'rotation_mm': M&M on top of it}: the proxy alone is fine-tuned too, to tell
    what M&M adds from what the proxy does."""
    proxy = quick_schedule(ACDC_PROXY, "iterations") if QUICK else ACDC_PROXY
    mm = quick_schedule(ACDC_MIXMATCH, "iterations") if QUICK else ACDC_MIXMATCH
    base = pretrain_run(root, "acdc_rotation", task="rotation", data="acdc", arch="unet2d", channels=ACDC_CHANNELS,
                        **proxy)
    tuned = pretrain_run(root, "acdc_l7_rotation_mm", task="mixmatch", data="acdc", arch="unet2d",
                         channels=ACDC_CHANNELS, init=str(base), labelled_ids=acdc_labelled_ids(), **mm)
    small = pretrain_run(root, "acdc_l7_rotation_mm_small", task="mixmatch", data="acdc", arch="unet2d",
                         channels=ACDC_CHANNELS, init=str(base), labelled_ids=acdc_labelled_ids(),
                         **{**mm, "patch_sides": ACDC_SMALL_PATCHES})
    return {"rotation": str(base), "rotation_mm": str(tuned), "rotation_mm_small": str(small)}


def acdc_run(root: Path, init: str, pretrained, seed: int, loss: str = "dice_ce", lal: dict | None = None) -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import semi

    from frugalseg.stages.semi import SEMI_METHODS

    semi.QUICK = QUICK
    cfg = semi.cpu_config("acdc_l7", "supervised_only", seed)
    cfg.pretrained = pretrained if isinstance(pretrained, str) else False
    cfg.loss = loss
    for k, v in (lal or {}).items():
        setattr(cfg, k, v)
    name = f"acdc_l7.{init}.{loss}.seed{seed}"
    cfg.out = str(root / "acdc" / name)
    cfg.resume = True
    cfg.val_every = 0  # validation at the end only
    settings = {"setting": "acdc_l7", "init": init, "loss": loss, "lal": lal and {**lal, **LAL_COST}, "seed": seed,
                "protocol": "semi.CPU_ACDC supervised_only", "iterations": cfg.iterations}

    def run() -> dict:
        res = SEMI_METHODS[cfg.semi][1](cfg)
        v = res["val"]
        fg = {c: p["dice"] for c, p in v["per_class"].items() if c != "background"}
        return {"dice": round(sum(fg.values()) / len(fg), 4), "per_class_dice": {c: round(x, 4) for c, x in fg.items()},
                "split": "val"}

    return record(f"acdc.{name}", settings, run)


# ---- aggregation -------------------------------------------------------------------------------------
def aggregate() -> dict:
    from frugalseg.data.io import read_json

    figs: dict = {"pretrain": {}, "lal": {}}
    recs = {p.stem: read_json(p) for p in sorted(RECORDS.glob("*.json"))}

    def block(prefix: str, metric: str) -> dict | None:
        per_seed = {k.rsplit("seed", 1)[1]: r["figures"][metric] for k, r in recs.items()
                    if k.startswith(prefix) and k[len(prefix):].startswith("seed")}
        if not per_seed:
            return None
        mean, sd = mean_sd(list(per_seed.values()))
        key = "miou_mean" if metric == "miou" else "dice_mean"
        return {key: mean, "sd": sd, "per_seed": per_seed, "split": "val"}

    for setting in ("msrc_10pct", "msrc_full"):
        for init in MSRC_INITS:
            b = block(f"finetune.{setting}.{init}.ce.", "miou")
            if b:
                figs["pretrain"].setdefault(setting, {})[init] = b
        for loss in ("ce", "lal"):
            b = block(f"finetune.{setting}.imagenet.{loss}.", "miou")
            if b:
                per_class = [recs[f"finetune.{setting}.imagenet.{loss}.seed{s}"]["figures"]["per_class_iou"]
                             for s in b["per_seed"]]
                b["per_class_iou_mean"] = {c: round(statistics.fmean(pc[c] for pc in per_class), 4)
                                           for c in per_class[0]}
                band = {s: recs[k]["figures"]["band_miou"] for s in b["per_seed"]
                        if (k := f"boundary.{setting}.{loss}.seed{s}") in recs}
                if band:
                    mean, sd = mean_sd(list(band.values()))
                    b["boundary_band_miou"] = {"miou_mean": mean, "sd": sd, "per_seed": band, "band_px": BAND}
                figs["lal"].setdefault(setting, {})[loss] = b
    for init in ("random", "rotation", "rotation_mm", "rotation_mm_small"):
        b = block(f"acdc.acdc_l7.{init}.dice_ce.", "dice")
        if b:
            figs["pretrain"].setdefault("acdc_l7", {})[init] = b
    for loss in ("ce", "lal"):
        b = block(f"acdc.acdc_l7.random.{loss}.", "dice")
        if b:
            per_class = [recs[f"acdc.acdc_l7.random.{loss}.seed{s}"]["figures"]["per_class_dice"]
                         for s in b["per_seed"]]
            b["per_class_dice_mean"] = {c: round(statistics.fmean(pc[c] for pc in per_class), 4) for c in per_class[0]}
            figs["lal"].setdefault("acdc_l7", {})[loss] = b
    for setting, inits in figs["pretrain"].items():
        if "imagenet" in inits and "random" in inits:
            gap = inits["imagenet"]["miou_mean"] - inits["random"]["miou_mean"]
            for init, b in inits.items():
                if init not in ("random", "imagenet") and gap > 0:
                    b["share_of_imagenet_gain"] = round((b["miou_mean"] - inits["random"]["miou_mean"]) / gap, 3)
    sel = {k: r["figures"] for k, r in recs.items() if k.startswith("finetune.lal_select.")}
    if sel:
        figs["lal"]["selection"] = {"split": "train:fit -> train:holdout (msrc_full, seed 0)", "runs": sel}
        if "lal_select.window_costs" in recs:
            figs["lal"]["selection"]["window_costs_train_fit"] = recs["lal_select.window_costs"]["figures"]
    pre = {k[len("pretrain_run."):]: r["figures"] for k, r in recs.items() if k.startswith("pretrain_run.")}
    if pre:
        figs["pretrain_runs"] = pre
    return figs


def markdown(figs: dict) -> str:
    """README tables: pretraining inits per setting, then LAL against CE (mean ± sd, each seed)."""
    def cell(v: dict) -> str:
        m = v.get("miou_mean", v.get("dice_mean"))
        sd = f" ± {v['sd']:.4f}" if v.get("sd") is not None else ""
        return f"{m:.4f}{sd} ({' / '.join(f'{x:.4f}' for x in v['per_seed'].values())})"

    rows = ["| setting | init | val (mean ± sd, per seed) | share of ImageNet's gain over random |",
            "|---|---|---|---|"]
    for setting, inits in figs.get("pretrain", {}).items():
        for init, v in inits.items():
            rows.append(f"| {setting} | {init} | {cell(v)} | {v.get('share_of_imagenet_gain', '')} |")
    rows += ["", f"| setting | loss | val (mean ± sd, per seed) | mIoU in the {BAND} px boundary band |",
             "|---|---|---|---|"]
    for setting, losses in figs.get("lal", {}).items():
        if setting == "selection":
            continue
        for loss in ("ce", "lal"):
            if loss in losses:
                band = losses[loss].get("boundary_band_miou")
                rows.append(f"| {setting} | {loss} | {cell(losses[loss])} | {cell(band) if band else ''} |")
    return "\n".join(rows)


def markdown_lal_classes(figs: dict) -> str:
    """Per-class val IoU (Dice on ACDC) of CE and LAL, mean over seeds, classes from the smallest share of the val
    split's labelled pixels to the largest: LAL's windows should help small objects most."""
    rows = ["| setting | class | share of val pixels | CE | LAL | LAL - CE |", "|---|---|---|---|---|---|"]
    for setting, losses in figs.get("lal", {}).items():
        if setting == "selection" or not {"ce", "lal"} <= losses.keys():
            continue
        key = "per_class_iou_mean" if "per_class_iou_mean" in losses["ce"] else "per_class_dice_mean"
        ce, lal = losses["ce"][key], losses["lal"][key]
        share = class_pixel_share("acdc" if setting == "acdc_l7" else "msrc-objects")
        for c in sorted(ce, key=lambda c: share.get(c, 0.0)):
            rows.append(f"| {setting} | {c} | {share.get(c, 0.0):.4f} | {ce[c]:.4f} | {lal[c]:.4f} | "
                        f"{lal[c] - ce[c]:+.4f} |")
    return "\n".join(rows) if len(rows) > 2 else ""


@functools.lru_cache(maxsize=None)
def class_pixel_share(data: str) -> dict[str, float]:
    """Each class's share of the labelled pixels of the data's val split (void excluded)."""
    import numpy as np

    from frugalseg.data import open_split

    ds = open_split(data, "val")
    counts = np.zeros(ds.labels.num_classes, np.int64)
    for smp in ds.samples:
        m = ds.read_mask(smp)
        counts += np.bincount(m[m < ds.labels.num_classes].ravel(), minlength=ds.labels.num_classes)
    return {name: float(n) / max(int(counts.sum()), 1) for name, n in zip(ds.labels.names, counts)}


def patch_content(ds, crop: int, scale: tuple, sides: tuple, resize: int, batches: int = 30, batch_size: int = 8,
                  patches_per_image: int = 10) -> dict:
    """How different M&M's triplets are in what they show: each patch's class histogram (its mask content, cut
    and resized exactly as its image is), cosine similarity anchor-positive against anchor-negative over the
    official class-wise graph's triplets, crops and patches as the benchmark's M&M draws them (seed 0). Near equal
    similarities mean the triplet loss asks to tell apart patches that show the same thing."""
    import numpy as np
    import torch

    from frugalseg.data.labels import IGNORE_INDEX
    from frugalseg.selfsup.mixmatch import class_graph_triplets, sample_patches
    from frugalseg.stages.pretrain import PretrainCrops

    n_cls = ds.labels.num_classes
    crops = PretrainCrops(ds, crop, scale, length=batches * batch_size, seed=0)
    g = torch.Generator().manual_seed(0)
    sim_p, sim_n, same_image = [], [], []
    for b in range(batches):
        items = [crops[b * batch_size + i] for i in range(batch_size)]
        masks = torch.stack([it["mask"] for it in items])
        valid = masks != IGNORE_INDEX
        onehot = torch.zeros(batch_size, n_cls, *masks.shape[-2:])
        onehot.scatter_(1, torch.where(valid, masks, 0)[:, None], 1.0)
        onehot *= valid[:, None]
        source = torch.arange(1, batch_size + 1).float().view(-1, 1, 1, 1).expand(-1, 1, *masks.shape[-2:])
        patches, labels = sample_patches(torch.cat([onehot, source], 1), masks, patches_per_image, sides, resize,
                                         0.1, ds.labels.background, generator=g)
        triplets = class_graph_triplets(labels, generator=g)
        if len(triplets) == 0:
            continue
        hist = patches[:, :n_cls].mean((2, 3))
        hist = hist / hist.sum(1, keepdim=True).clamp_min(1e-6)
        src = patches[:, n_cls].amax((1, 2))
        a, p, n = (hist[triplets[:, i]] for i in range(3))
        sim_p.append(torch.nn.functional.cosine_similarity(a, p).numpy())
        sim_n.append(torch.nn.functional.cosine_similarity(a, n).numpy())
        same_image.append((src[triplets[:, 0]] == src[triplets[:, 2]]).float().numpy())
    sp, sn, si = (np.concatenate(v) for v in (sim_p, sim_n, same_image))
    return {"triplets": int(len(sp)), "class_histogram_cosine_anchor_positive": round(float(sp.mean()), 4),
            "class_histogram_cosine_anchor_negative": round(float(sn.mean()), 4),
            "negative_from_anchor_image": round(float(si.mean()), 4), "crop": crop, "scale": list(scale),
            "patch_sides": list(sides), "patch_resize": resize, "batches": batches}


def patch_content_study() -> dict:
    """`patch_content` for the two M&M settings the benchmark tunes: ACDC's 7 patients and msrc's 10 %."""
    from frugalseg.data import open_split

    acdc = open_split("acdc", "train")
    ids = set(acdc_labelled_ids())
    msrc = open_split("msrc-objects", "train")
    mids = set(msrc_10pct_ids())
    mm, amm = MIXMATCH, ACDC_MIXMATCH
    return {
        "acdc_l7": patch_content(acdc.with_samples([s for s in acdc.samples if s.id in ids]), amm["crop_size"],
                                 amm["scale"], amm["patch_sides"], amm["patch_resize"]),
        "msrc_10pct": patch_content(msrc.with_samples([s for s in msrc.samples if s.id in mids]), mm["crop_size"],
                                    mm["scale"], mm["patch_sides"], mm["patch_resize"]),
        # smaller patches on ACDC, nearer the size of its structures in a 128 px crop
        **{f"acdc_l7_sides_{lo}_{hi}": patch_content(acdc.with_samples([s for s in acdc.samples if s.id in ids]),
                                                     amm["crop_size"], amm["scale"], (lo, hi), amm["patch_resize"])
           for lo, hi in ((16, 48), (8, 24))},
        "split": "train (the settings' labelled images)"}


def lal_speed(repeats: int = 7) -> dict:
    """Forward + backward time of LAL against cross-entropy on the logits of one training step, interleaved, the
    median of `repeats` (2D: the msrc fine-tuning batch, 4 x 16 classes x 160²; 3D: 2 x 2 classes x 64×64×48;
    one thread)."""
    import torch
    import torch.nn.functional as F

    from frugalseg.losses import lal_loss

    torch.set_num_threads(1)
    out = {}
    for name, shape, classes in (("2d_msrc", (4, 16, 160, 160), 6), ("3d_la", (2, 2, 48, 64, 64), 2)):
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(*shape, generator=g, requires_grad=True)
        target = torch.randint(0, classes, (shape[0], *shape[2:]), generator=g)
        times: dict[str, list[float]] = {"ce": [], "lal": []}
        for _ in range(repeats):
            for kind in ("ce", "lal"):
                t0 = time.perf_counter()
                loss = F.cross_entropy(logits, target) if kind == "ce" else lal_loss(logits, target, **{
                    k[len("lal_"):]: v for k, v in chosen_lal().items()})
                loss.backward()
                logits.grad = None
                times[kind].append(time.perf_counter() - t0)
        ce, lal = statistics.median(times["ce"]), statistics.median(times["lal"])
        out[name] = {"ce_ms": round(1000 * ce, 2), "lal_ms": round(1000 * lal, 2), "lal_over_ce": round(lal / ce, 2),
                     "shape": list(shape), "classes_present": classes, "repeats": repeats}
        print(f"  {name}: CE {1000 * ce:.1f} ms, LAL {1000 * lal:.1f} ms", flush=True)
    return out


def main() -> None:
    global QUICK
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("pretrain-msrc", "acdc", "lal-select", "lal", "lal-speed", "mm-patches"),
                    action="append")
    ap.add_argument("--settings", nargs="+", default=["msrc_10pct", "msrc_full", "acdc_l7"],
                    choices=("msrc_10pct", "msrc_full", "acdc_l7"),
                    help="Which settings --part pretrain-msrc (msrc ones) and --part lal run.")
    ap.add_argument("--inits", nargs="+", default=list(MSRC_INITS), choices=MSRC_INITS)
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench" / "selfsup"))
    ap.add_argument("--aggregate", action="store_true")
    ap.add_argument("--quick", action="store_true", help="Every path once with tiny schedules (minutes).")
    args = ap.parse_args()
    started = time.time()
    QUICK = args.quick
    root = Path(args.runs + ("_quick" if QUICK else ""))
    parts = args.part or ([] if args.aggregate else ["pretrain-msrc", "acdc", "lal-select", "lal"])
    if QUICK:
        args.seeds, args.settings, parts = [0], ["msrc_10pct", "acdc_l7"], ["pretrain-msrc", "acdc", "lal"]
    quick_rows = []
    msrc_settings = [s for s in args.settings if s.startswith("msrc")]
    if "pretrain-msrc" in parts:
        for setting in msrc_settings:
            inits = msrc_inits(root, setting, tuple(args.inits))
            for seed in args.seeds:
                for init, pretrained in inits.items():
                    f = msrc_finetune(root, setting, init, pretrained, seed)
                    quick_rows.append((setting, init, "ce", seed, f["miou"]))
    if "acdc" in parts:
        pre = acdc_pretrained(root)
        for seed in args.seeds:
            for init, pretrained in (("random", False), ("rotation_mm", pre["rotation_mm"]),
                                     ("rotation", pre["rotation"]), ("rotation_mm_small", pre["rotation_mm_small"])):
                f = acdc_run(root, init, pretrained, seed)
                quick_rows.append(("acdc_l7", init, "dice_ce", seed, f["dice"]))
    if "lal-select" in parts:
        for cand in LAL_CANDIDATES:
            msrc_finetune(root, "msrc_full", "imagenet", True, 0, "lal", lal_options(cand),
                          ("train:fit", "train:holdout"), tag=lal_select_tag(cand))
        msrc_finetune(root, "msrc_full", "imagenet", True, 0, "ce", None, ("train:fit", "train:holdout"),
                      tag="lal_select.ce")
        if not QUICK:
            print(f"  window costs: {window_cost_study(root)}", flush=True)
    if "lal" in parts:
        lal = chosen_lal()
        for setting in msrc_settings:
            for seed in args.seeds:
                for loss in ("ce", "lal"):
                    f = msrc_finetune(root, setting, "imagenet", True, seed, loss, lal if loss == "lal" else None)
                    quick_rows.append((setting, "imagenet", loss, seed, f["miou"]))
                    if not QUICK:
                        boundary_run(root, setting, loss, seed)
        for seed in args.seeds if "acdc_l7" in args.settings else ():
            for loss in ("ce", "lal"):
                f = acdc_run(root, "random", False, seed, loss, lal if loss == "lal" else None)
                quick_rows.append(("acdc_l7", "random", loss, seed, f["dice"]))
    speed = lal_speed(3 if QUICK else 7) if ("lal-speed" in parts or QUICK) else None
    if QUICK:
        print_table(quick_rows, ("setting", "init", "loss", "seed", "val"))
        save_results("selfsup_quick", {"runs": [list(r) for r in quick_rows], "lal_speed": speed}, {"quick": True},
                     started)
        return
    figs = aggregate()
    if speed:
        figs["lal_speed"] = speed
    if "mm-patches" in parts:
        figs["mixmatch_patch_content"] = patch_content_study()
        print(json.dumps(figs["mixmatch_patch_content"], indent=1))
    rows = [(f"{sec}.{setting}.{k}", v.get("miou_mean", v.get("dice_mean")), v.get("sd"), v.get("per_seed"))
            for sec in ("pretrain", "lal") for setting, d in figs[sec].items() if isinstance(d, dict)
            for k, v in d.items() if isinstance(v, dict) and "per_seed" in v]
    print_table(rows, ("key", "mean", "sd", "per seed"))
    settings = {"proxy": PROXY, "proxy_rotation": PROXY_ROTATION, "mixmatch": MIXMATCH, "finetune": FINETUNE,
                "acdc_proxy": ACDC_PROXY, "acdc_mixmatch": ACDC_MIXMATCH, "acdc_small_patches": ACDC_SMALL_PATCHES,
                "acdc_channels": ACDC_CHANNELS,
                "lal_candidates": LAL_CANDIDATES, "lal": chosen_lal()}
    print(f"wrote {save_results('selfsup', figs, settings, started)}")


def window_cost_study(root: Path, images: int = 24) -> dict:
    """What each selection model learned, in LAL's own terms: the costs of 9/4 windows on the first `images`
    train:fit images (training data), at full image size. Minkowski pooling with k = 5 trades the typical window for
    the worst: its models end with a higher mean and a lower maximum than CE's, i.e. hedged, low-confidence
    predictions (argmax falls to background), where k = 1 ends like CE."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from frugalseg.data import open_split
    from frugalseg.export import load_export
    from frugalseg.losses import lal_window_costs

    tags = [lal_select_tag(c) for c in LAL_CANDIDATES] + ["lal_select.ce"]
    settings = {"split": "train:fit", "images": images, "window": 9, "stride": 4, "models": tags,
                "lal": LAL_COST}

    def run() -> dict:
        ds = open_split("msrc-objects", "train:fit", limit=images)
        pairs = [(torch.from_numpy(ds.read_image(smp).copy()).permute(2, 0, 1).float()[None] / 255,
                  torch.from_numpy(ds.read_mask(smp).astype(np.int64))[None]) for smp in ds.samples]  # read once
        out = {}
        for tag in tags:
            model, _, _ = load_export(root / "finetune" / tag / "model")
            costs = []
            with torch.no_grad():
                for x, target in pairs:
                    logits = F.interpolate(model(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
                    costs.append(lal_window_costs(logits, target, 9, 4))
            c = torch.cat(costs)
            out[tag] = {"windows": int(c.numel()), "mean": round(float(c.mean()), 4),
                        "p99": round(float(c.quantile(0.99)), 4), "max": round(float(c.max()), 4)}
        return out

    return record("lal_select.window_costs", settings, run)


def chosen_lal() -> dict:
    """The LAL options with the best train:holdout mIoU of `--part lal-select` (the defaults until it ran)."""
    from frugalseg.data.io import read_json

    best, best_miou = dict(LAL_DEFAULT), -1.0
    for cand in LAL_CANDIDATES:
        p = RECORDS / f"finetune.{lal_select_tag(cand)}.json"
        if p.exists() and read_json(p)["figures"]["miou"] > best_miou:
            best, best_miou = lal_options(cand), read_json(p)["figures"]["miou"]
    return best


def lal_options(cand: tuple) -> dict:
    """A candidate's TrainConfig options."""
    w, s, k = cand
    return dict(lal_window=w, lal_stride=s, lal_k=k)


def lal_select_tag(cand: tuple) -> str:
    w, s, k = cand
    return f"lal_select.w{w}_s{s}_k{k:g}"


if __name__ == "__main__":
    main()
