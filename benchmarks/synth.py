"""Synthetic training pairs on few labelled blood-cell images: does adding cGAN pairs help a segmenter?

For each dataset (wbc2: 100 images 300×300; wbc1: 300 images 120×120), each k (10, 25 labelled images) and
each seed (0, 1, 2; the seed draws the k labelled images too, so the spread includes which images were
labelled), on this CPU:
1. `synth train` on the k labelled images of `train:fit` (the 80 % part; `train:holdout`, the fixed other
   20 %, is the test part and is never seen): shape model + cGAN.
2. `synth sample`: 500 pairs with shape-model masks (the first 100 of them are the n100 set: pair i depends
   on (seed, i) only) and 500 with the training masks re-rendered (the ablation: new textures, old layouts).
3. The segmenter (U-Net 16..256 from random init: the starving case synthetic data is for; AdamW 1e-3,
   400 steps of batch 8, random rescale 0.75-1.25, crop, flip) trained on: the k real pairs (`real_only`),
   k real + 100 / 500 synthetic (`real_plus_synth_n100`, `_n500`), k real + 500 re-rendered
   (`real_plus_rerendered_n500`), k real + the 500 synthetic with background farther than 8 px from every cell
   void (`real_plus_synth_n500_voidbg`, as `synth sample --void-background-beyond 8`); every run the same steps,
   synthetic pairs at half the draws (`--extra-weight 0.5`, fixed beforehand, not tuned on the test part).
4. Dice per class on `train:holdout` (cytoplasm, nucleus, their mean).

And the Fréchet distance of synthetic vs real images in EfficientNet-Lite0 features beside real vs real (two
random halves of the dataset's images), at equal set sizes.

Every finished run leaves a record in benchmarks/results/synth_runs/ (its figures and settings): a killed
benchmark resumes run by run, across sessions. `--aggregate` writes benchmarks/results/synth.json.

    python benchmarks/synth.py                       # everything (hours on 2 cores; resumable)
    python benchmarks/synth.py --datasets wbc1 --ks 10 --seeds 0
    python benchmarks/synth.py --aggregate           # synth.json from the records
    python benchmarks/synth.py --quick               # minutes: wbc1, k 10, seed 0, short schedules
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from common import RESULTS, ROOT, default_data_root, mean_sd, print_table, recorded, save_results

os.environ.setdefault("FRUGALSEG_DATA", str(default_data_root()))

RECORDS = RESULTS / "synth_runs"
DATASETS = ("wbc2", "wbc1")
KS = (10, 25)
SEEDS = (0, 1, 2)
VARIANTS = ("real_only", "real_plus_synth_n100", "real_plus_synth_n500", "real_plus_rerendered_n500",
            "real_plus_synth_n500_voidbg")
# the voidbg variant: synth_n500's pairs with background farther than this from every cell void (fixed beforehand:
# a ring of border context; the diagnosis below says why the rest of a synthetic background misleads)
VOID_BEYOND = 8
POOL, TEST = "train:fit", "train:holdout"

# The CPU schedule. GAN: half pix2pix's widths, 128 px crops, 1200 iterations of batch 4 (lr constant for the
# first half, then linear decay, as pix2pix's epochs). Segmenter: see the module docstring.
GAN = dict(ngf=32, ndf=32, depth=6, crop_size=128, batch_size=4, iterations=1200, epoch_iterations=100)
SEG = dict(arch="unet2d", pretrained=False, optimizer="adamw", lr=1e-3, weight_decay=1e-4, batch_size=8,
           max_steps=400, scale=(0.75, 1.25), extra_weight=0.5)
CROP = {"wbc2": 192, "wbc1": 112}
QUICK_GAN = dict(GAN, iterations=40, epoch_iterations=20)
QUICK_SEG = dict(SEG, max_steps=40)
QUICK_N = {"n100": 8, "n500": 16}
DIAGNOSIS = ("background_sd: grey-level sd of the pixels the mask calls background, mean over images (the GAN's k "
             "training images; the first 100 synthetic / re-rendered images); cytoplasm_colour_distance: RGB distance "
             "of each set's mean cytoplasm colour to the real images' mean cytoplasm and background colours; "
             "cytoplasm_false_discovery: share of each segmenter's cytoplasm pixels on the test part that are "
             "background in the truth")


def gan_run(root: Path, ds: str, k: int, seed: int, quick: bool) -> tuple[Path, dict]:
    """Train (or find) the seed's GAN and its three sample folders; returns (run folder, figures)."""
    from frugalseg.stages.synth import SynthTrainConfig, sample_synth, train_synth

    gan = QUICK_GAN if quick else GAN
    n = QUICK_N if quick else {"n100": 100, "n500": 500}
    base = root / f"{ds}_k{k}_s{seed}"
    cfg = SynthTrainConfig(data=ds, train_split=POOL, labelled_count=k, budget_seed=seed, seed=seed,
                           out=str(base / "gan"), progress=False, gallery=8, devices="cpu", resume=True, **gan)
    settings = {"data": ds, "split": POOL, "k": k, "seed": seed, "gan": gan, "n": n}

    def run() -> dict:
        t0 = time.time()
        summ = train_synth(cfg)
        figs = {"gan_seconds": summ["gan_seconds"], "iterations": summ["iterations"],
                "shape_model_seconds": summ["shape_model_seconds"], "samples": {}}
        for tag, masks, count in (("synth_n100", "shapes", n["n100"]), ("synth_n500", "shapes", n["n500"]),
                                  ("rerendered_n500", "real", n["n500"])):
            out = base / tag
            if out.exists():  # a folder from a run without record (killed after sampling): sample again
                shutil.rmtree(out)
            s = sample_synth(cfg.out, count, out, masks=masks, seed=seed, progress=False)
            figs["samples"][tag] = {"pairs": count, "seconds": s["seconds_this_call"], "novelty": s["novelty"]}
        figs["seconds"] = round(time.time() - t0, 1)
        return figs

    figs = recorded(RECORDS, f"{ds}.k{k}.gan.seed{seed}", settings, run, keep=not quick)
    for tag in ("synth_n100", "synth_n500", "rerendered_n500"):
        if not (base / tag).exists():  # a record from another session whose run folder is gone: sample again
            if not (base / "gan" / "generator").exists():
                train_synth(cfg)
            sample_synth(cfg.out, figs["samples"][tag]["pairs"], base / tag,
                         masks="real" if tag.startswith("rerendered") else "shapes", seed=seed, progress=False)
    return base, figs


def seg_run(root: Path, base: Path, ds: str, k: int, seed: int, variant: str, quick: bool) -> dict:
    from frugalseg.stages.train import TrainConfig, train

    seg = QUICK_SEG if quick else SEG
    extra = None if variant == "real_only" else str(base / variant.replace("real_plus_", ""))
    if variant.endswith("_voidbg") and not Path(extra).exists():
        voided_copy(base / variant.replace("real_plus_", "").removesuffix("_voidbg"), Path(extra))
    cfg = TrainConfig(data=ds, train_split=POOL, val_split=TEST, mask_count=k, budget_seed=seed, seed=seed,
                      epochs=-1, crop_size=CROP[ds], val_every=10**6, progress=False, devices="cpu",
                      out=str(base / f"seg_{variant}"), extra_data=extra, resume=True, **seg)
    settings = {"data": ds, "split": POOL, "test": TEST, "k": k, "seed": seed, "variant": variant, "seg": seg,
                "crop": CROP[ds], "extra": variant.replace("real_plus_", "") if extra else None}

    def run() -> dict:
        t0 = time.time()
        if Path(cfg.out).exists() and not (Path(cfg.out) / "checkpoints" / "last.ckpt").exists():
            shutil.rmtree(cfg.out)
        v = train(cfg)["val"]
        dice = {c: round(p["dice"], 4) for c, p in v["per_class"].items()}
        return {"dice": dice, "dice_mean": round((dice["cytoplasm"] + dice["nucleus"]) / 2, 4),
                "miou": v["miou"], "split": TEST, "seconds": round(time.time() - t0, 1)}

    return recorded(RECORDS, f"{ds}.k{k}.{variant}.seed{seed}", settings, run, keep=not quick)


def voided_copy(src: Path, out: Path) -> None:
    """`src`'s pairs with far background void (`synth sample --void-background-beyond`'s helper), the same images."""
    from frugalseg.data import open_dataset
    from frugalseg.data.io import read_label_png, write_label_png
    from frugalseg.synth.masks import void_far_background

    palette = open_dataset(src).labels.palette_bytes()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(src, partial)
    for path in sorted((partial / "masks").glob("*.png")):
        write_label_png(path, void_far_background(read_label_png(path), VOID_BEYOND), palette)
    partial.replace(out)


def diagnosis_run(root: Path, base: Path, ds: str, k: int, seed: int, quick: bool) -> dict:
    """Why a seed's synthetic pairs help or hurt, from its run folders (the GAN's k training images against the first
    100 synthetic and re-rendered ones):
    - background texture: grey-level sd of the pixels the mask calls background, mean over images (the masks do
      not label red blood cells, so the generator's backgrounds are flatter than real ones);
    - cytoplasm colour: distance (RGB, 0-255) of the images' mean cytoplasm colour to the real images' mean
      cytoplasm and mean background colour (a generator that paints cytoplasm in the background's pink teaches a
      segmenter to call red cells cytoplasm);
    - how often each segmenter calls test-part background cytoplasm (share of its cytoplasm pixels that are
      background in the truth)."""
    import numpy as np

    from frugalseg.data import open_split
    from frugalseg.data.io import read_label_png, read_rgb
    from frugalseg.runs import RunDir
    from frugalseg.stages.synth import training_masks

    def pairs_of(tag: str, n: int = 100) -> list[tuple[np.ndarray, np.ndarray]]:
        images = sorted((base / tag / "images").glob("*.png"))[:n]
        return [(read_rgb(p), read_label_png(base / tag / "masks" / p.name)) for p in images]

    def background_sd(pairs) -> float:
        return round(float(np.mean([img.astype(np.float32).mean(-1)[m == 0].std() for img, m in pairs])), 2)

    def mean_colour(pairs, cls: int) -> np.ndarray:
        return np.mean([img[m == cls].astype(np.float32).mean(0) for img, m in pairs if (m == cls).any()], 0)

    settings = {"data": ds, "k": k, "seed": seed, "images_per_synthetic_set": 100, "test": TEST, "colour": True,
                "variants": [v for v in VARIANTS if (base / f"seg_{v}" / "predictions" / TEST).is_dir()]}

    def run() -> dict:
        _, images, masks = training_masks(RunDir(base / "gan"), with_images=True)
        test = open_split(ds, TEST)
        cyto = test.labels.names.index("cytoplasm")
        truths = {smp.id: test.read_mask(smp) for smp in test.samples}  # read once for every variant
        false_cyto = {}
        for variant in VARIANTS:
            pred_dir = base / f"seg_{variant}" / "predictions" / TEST
            if not pred_dir.is_dir():
                continue
            called = wrong = 0
            for sid, truth in truths.items():
                pred = read_label_png(pred_dir / f"{sid}.png")
                called += int((pred == cyto).sum())
                wrong += int(((pred == cyto) & (truth == 0)).sum())
            false_cyto[variant] = round(wrong / max(called, 1), 4)
        real = list(zip(images, masks))
        sets = {"synthetic": pairs_of("synth_n500"), "rerendered": pairs_of("rerendered_n500")}
        real_cyto, real_bg = mean_colour(real, cyto), mean_colour(real, 0)
        colour = {name: {"to_real_cytoplasm": round(float(np.linalg.norm(mean_colour(p, cyto) - real_cyto)), 1),
                         "to_real_background": round(float(np.linalg.norm(mean_colour(p, cyto) - real_bg)), 1)}
                  for name, p in sets.items()}
        colour["real"] = {"to_real_cytoplasm": 0.0, "to_real_background": round(float(np.linalg.norm(
            real_cyto - real_bg)), 1)}
        return {"background_sd": {"real_labelled": background_sd(real),
                                  **{name: background_sd(p) for name, p in sets.items()}},
                "cytoplasm_colour_distance": colour,
                "cytoplasm_false_discovery": false_cyto}

    return recorded(RECORDS, f"{ds}.k{k}.diagnosis.seed{seed}", settings, run, keep=not quick)


def fd_study(root: Path, ds: str, k: int, quick: bool) -> dict:
    """Fréchet distances in EfficientNet-Lite0 features at equal set sizes: synthetic (seed 0's GAN, shape
    masks) vs real half A, re-rendered vs real half A, real half B vs real half A (the floor)."""
    import numpy as np
    import torch

    from frugalseg.data import open_split
    from frugalseg.data.io import read_rgb
    from frugalseg.models.backbones import create_backbone
    from frugalseg.synth.frechet import frechet_distance, pooled_features

    def tensors(paths):
        return [torch.from_numpy(read_rgb(p).copy()).permute(2, 0, 1).float() / 255 for p in paths]

    real = open_split(ds, "train")
    order = np.random.default_rng(0).permutation(len(real))
    half = len(real) // 2
    a = [real.samples[i].image for i in order[:half]]
    b = [real.samples[i].image for i in order[half:2 * half]]
    base = root / f"{ds}_k{k}_s0"
    synth = sorted((base / "synth_n500" / "images").glob("*.png"))[:half]
    rer = sorted((base / "rerendered_n500" / "images").glob("*.png"))[:half]
    bb = create_backbone("tf_efficientnet_lite0", pretrained=True, output_stride=32)
    fa = pooled_features(bb, tensors(a))
    out = {"images_per_set": half, "features": "EfficientNet-Lite0 (ImageNet) last stage, average-pooled, 224 px",
           "real_vs_real": round(frechet_distance(pooled_features(bb, tensors(b)), fa), 2),
           "synthetic_vs_real": round(frechet_distance(pooled_features(bb, tensors(synth)), fa), 2),
           "rerendered_vs_real": round(frechet_distance(pooled_features(bb, tensors(rer)), fa), 2),
           "gan": f"k={k}, seed 0"}
    if len(synth) < half:
        out["note"] = f"only {len(synth)} synthetic images (quick run)"
    return out


def summarise(values: list[float | None]) -> dict:
    """{'mean', 'sd'} of the values given (None where a run did not measure it, e.g. a GAN trained earlier)."""
    mean, sd = mean_sd(values)
    return {"mean": mean, "sd": sd}


def gallery_figure(root: Path, out: Path, k: int = 10, rows: int = 4) -> Path | None:
    """The README gallery: per dataset, the first `rows` shape-model masks of seed 0's n500 sampling, their
    synthetic images, and the training pair whose mask is nearest in shape (IoU after centring and the best of 8
    rotations/reflections, in the title). None when no dataset has its seed-0 run folder here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from frugalseg.data.io import read_json, read_label_png, read_rgb
    from frugalseg.report.overlays import colourise
    from frugalseg.runs import RunDir
    from frugalseg.data.labels import LabelSpec
    from frugalseg.stages.synth import TRAINING_FILE, load_shapes, training_masks
    from frugalseg.synth.masks import aligned_nearest

    runs = [(ds, root / f"{ds}_k{k}_s0") for ds in DATASETS if (root / f"{ds}_k{k}_s0" / "synth_n500").is_dir()]
    if not runs:
        return None
    fig, axes = plt.subplots(rows * len(runs), 4, figsize=(8, 2.1 * rows * len(runs)), squeeze=False)
    for d, (ds, base) in enumerate(runs):
        run = RunDir(base / "gan")
        labels = LabelSpec.from_dict(read_json(run / TRAINING_FILE)["labels"])  # no need to load the generator
        ids, images, masks = training_masks(run, with_images=True)
        window = load_shapes(run).window
        for i in range(rows):
            mask = read_label_png(base / "synth_n500" / "masks" / f"synth_{i:05d}.png")
            image = read_rgb(base / "synth_n500" / "images" / f"synth_{i:05d}.png")
            iou, j = aligned_nearest(mask, masks, labels.num_classes, window)
            panels = ((colourise(mask, labels), f"{ds}: drawn mask"), (image, "synthetic image"),
                      (images[j], f"nearest real ({ids[j]})"),
                      (colourise(masks[j], labels), f"its mask, IoU {iou:.2f}"))
            for c, (picture, title) in enumerate(panels):
                ax = axes[d * rows + i, c]
                ax.imshow(picture)
                ax.set_title(title, fontsize=7)
                ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".partial.png")
    fig.savefig(tmp, dpi=70)
    plt.close(fig)
    tmp.replace(out)
    return out


def aggregate(datasets=DATASETS, ks=KS, seeds=SEEDS, fd: dict | None = None) -> dict:
    """synth.json's figures from the records (--quick keeps none and reports what it just measured)."""
    from frugalseg.data.io import read_json

    figs: dict = {}
    for ds in datasets:
        figs[ds] = {}
        for k in ks:
            block: dict = {}
            for variant in VARIANTS:
                per_seed, cls = {}, {"cytoplasm": [], "nucleus": []}
                for s in seeds:
                    path = RECORDS / f"{ds}.k{k}.{variant}.seed{s}.json"
                    if path.exists():
                        f = read_json(path)["figures"]
                        per_seed[str(s)] = f["dice_mean"]
                        for c in cls:
                            cls[c].append(f["dice"][c])
                if not per_seed:
                    continue
                m = summarise(list(per_seed.values()))
                block[variant] = {"dice_mean": m["mean"], "sd": m["sd"], "per_seed": per_seed,
                                  "dice_cytoplasm": summarise(cls["cytoplasm"]),
                                  "dice_nucleus": summarise(cls["nucleus"]),
                                  "split": TEST, "seeds": len(per_seed)}
            if "real_only" in block:
                base = block["real_only"]
                for variant, v in block.items():
                    if variant == "real_only":
                        continue
                    paired = [v["per_seed"][s] - base["per_seed"][s] for s in v["per_seed"] if s in base["per_seed"]]
                    if paired:
                        d = summarise(paired)
                        # a gain or a loss counts beyond the seed-to-seed spread of the paired differences
                        v["gain_over_real_only"] = {"mean": d["mean"], "sd": d["sd"], "per_seed": paired,
                                                    "beyond_spread": bool(len(paired) >= 3 and d["sd"] is not None
                                                                          and abs(d["mean"]) > d["sd"])}
            gans = [read_json(p)["figures"] for s in seeds if (p := RECORDS / f"{ds}.k{k}.gan.seed{s}.json").exists()]
            if gans:
                block["gan_seconds"] = summarise([g["gan_seconds"] for g in gans if g["gan_seconds"]])
                block["sampling_seconds_per_500"] = summarise([g["samples"]["synth_n500"]["seconds"] for g in gans])
                block["mask_novelty"] = {
                    "nearest_iou_aligned_mean": summarise([g["samples"]["synth_n500"]["novelty"]["nearest_iou_aligned"]
                                                           ["mean"] for g in gans]),
                    "nearest_iou_placed_mean": summarise([g["samples"]["synth_n500"]["novelty"]["nearest_iou_placed"]
                                                          ["mean"] for g in gans]),
                    "rerendered_nearest_iou_aligned_mean": summarise(
                        [g["samples"]["rerendered_n500"]["novelty"]["nearest_iou_aligned"]["mean"] for g in gans])}
            diag = {str(s): read_json(p)["figures"] for s in seeds
                    if (p := RECORDS / f"{ds}.k{k}.diagnosis.seed{s}.json").exists()}
            if diag:
                block["diagnosis"] = {"per_seed": diag, "what": DIAGNOSIS}
            if block:
                figs[ds][f"k{k}"] = block
        if fd and ds in fd:
            figs[ds]["fd"] = fd[ds]
    return figs


def markdown(figs: dict) -> str:
    """The README table: Dice on each dataset's test part per k and variant (mean ± sd, seeds, gain)."""
    rows = ["| dataset | k | variant | Dice cytoplasm | Dice nucleus | Dice mean ± sd | per seed "
            "| gain over real only |",
            "|---|---|---|---|---|---|---|---|"]
    for ds, blocks in figs.items():
        for k, block in blocks.items():
            if not (k.startswith("k") and isinstance(block, dict)):
                continue
            for variant in VARIANTS:
                v = block.get(variant)
                if not v:
                    continue
                g = v.get("gain_over_real_only")
                gain = (f"{g['mean']:+.4f} ± {g['sd']:.4f}{' (beyond spread)' if g['beyond_spread'] else ''}"
                        if g and g.get("sd") is not None else "")
                per = " / ".join(f"{x:.4f}" for x in v["per_seed"].values())
                sd = f" ± {v['sd']:.4f}" if v.get("sd") is not None else ""
                rows.append(f"| {ds} | {k[1:]} | {variant} | {v['dice_cytoplasm']['mean']:.4f} | "
                            f"{v['dice_nucleus']['mean']:.4f} | {v['dice_mean']:.4f}{sd} | {per} | {gain} |")
    return "\n".join(rows)


def markdown_diagnosis(figs: dict) -> str:
    """Per seed: background texture of the GAN's training images against its synthetic ones, and how often each
    segmenter's cytoplasm is test-part background (the diagnosis records)."""
    rows = ["| dataset | k | seed | background sd: real (k images) / synthetic / re-rendered "
            "| synthetic cytoplasm colour: distance to real cytoplasm / to real background (real's own) "
            "| cytoplasm false discovery: real only / + synth 100 / + synth 500 / + re-rendered 500 "
            "/ + synth 500 voided | Dice mean gain, + synth 500 |",
            "|---|---|---|---|---|---|---|"]
    for ds, blocks in figs.items():
        for k, block in blocks.items():
            if not (k.startswith("k") and isinstance(block, dict) and "diagnosis" in block):
                continue
            real, synth = (block.get(v, {}).get("per_seed", {}) for v in ("real_only", "real_plus_synth_n500"))
            for seed, d in block["diagnosis"]["per_seed"].items():
                bg, fdr = d["background_sd"], d["cytoplasm_false_discovery"]
                gain = f"{synth[seed] - real[seed]:+.4f}" if seed in real and seed in synth else ""
                col = d.get("cytoplasm_colour_distance")
                colour = (f"{col['synthetic']['to_real_cytoplasm']} / {col['synthetic']['to_real_background']} "
                          f"({col['real']['to_real_background']})" if col else "")
                rows.append(f"| {ds} | {k[1:]} | {seed} | {bg['real_labelled']} / {bg['synthetic']} / "
                            f"{bg['rerendered']} | {colour} | "
                            f"{' / '.join(f'{fdr[v]:.3f}' if v in fdr else '-' for v in VARIANTS)} | {gain} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def markdown_fd(figs: dict) -> str:
    rows = ["| dataset | images per set | real vs real | synthetic vs real | re-rendered vs real | GAN |",
            "|---|---|---|---|---|---|"]
    for ds, blocks in figs.items():
        fd = blocks.get("fd") if isinstance(blocks, dict) else None
        if fd:
            rows.append(f"| {ds} | {fd['images_per_set']} | {fd['real_vs_real']} | {fd['synthetic_vs_real']} | "
                        f"{fd['rerendered_vs_real']} | {fd['gan']} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="wbc1, k 10, seed 0, short schedules (minutes).")
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument("--ks", nargs="+", type=int, default=list(KS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench" / "synth"))
    ap.add_argument("--aggregate", action="store_true", help="Only write synth.json from the records.")
    ap.add_argument("--fd", action="store_true", help="Also (or only, with --aggregate) the Fréchet distances.")
    args = ap.parse_args()
    started = time.time()
    quick = args.quick
    if quick:
        args.datasets, args.ks, args.seeds = ["wbc1"], [10], [0]
    root = Path(args.runs + ("_quick" if quick else ""))
    quick_figs: dict = {}
    if not args.aggregate:
        for ds in args.datasets:
            for k in args.ks:
                for seed in args.seeds:
                    print(f"{ds} k={k} seed {seed}:", flush=True)
                    base, gfig = gan_run(root, ds, k, seed, quick)
                    for variant in args.variants:
                        f = seg_run(root, base, ds, k, seed, variant, quick)
                        quick_figs[f"{ds}.k{k}.{variant}.seed{seed}"] = f
                        print(f"    {variant}: Dice cytoplasm {f['dice']['cytoplasm']:.4f} nucleus "
                              f"{f['dice']['nucleus']:.4f} mean {f['dice_mean']:.4f} ({f['seconds']:.0f} s)",
                              flush=True)
                    if not quick:
                        print(f"    diagnosis: {diagnosis_run(root, base, ds, k, seed, quick)}", flush=True)
    fd = None
    if args.fd or quick:
        old = RESULTS / "synth.json"
        fd = {ds: v["fd"] for ds, v in (json.loads(old.read_text())["figures"].items() if old.exists() and not quick
                                        else []) if isinstance(v, dict) and "fd" in v}
        for ds in args.datasets:
            k = max(args.ks)
            if (root / f"{ds}_k{k}_s0" / "synth_n500").exists():
                fd[ds] = fd_study(root, ds, k, quick)
                print(f"{ds}: Fréchet distance {fd[ds]}", flush=True)
    name = "synth_quick" if quick else "synth"
    if quick:
        figs = {"wbc1": {"k10": {v: {"dice_mean": quick_figs[f"wbc1.k10.{v}.seed0"]["dice_mean"], "per_seed":
                                     {"0": quick_figs[f"wbc1.k10.{v}.seed0"]["dice_mean"]}} for v in args.variants},
                         "fd": fd.get("wbc1") if fd else None}}
    else:
        figs = aggregate(fd=fd)
        gallery = gallery_figure(root, RESULTS / "synth_gallery.png")
        if gallery:
            print(f"gallery: {gallery}", flush=True)
        old = RESULTS / "synth.json"
        if fd is None and old.exists():  # keep the Fréchet distances of an earlier --fd run
            for ds, v in json.loads(old.read_text())["figures"].items():
                if isinstance(v, dict) and "fd" in v and ds in figs:
                    figs[ds]["fd"] = v["fd"]
    rows = []
    for ds, blocks in figs.items():
        for k, block in blocks.items():
            if not k.startswith("k"):
                continue
            for variant in VARIANTS:
                if variant in block:
                    v = block[variant]
                    gain = v.get("gain_over_real_only", {})
                    rows.append((ds, k, variant, f"{v['dice_mean']:.4f}", v.get("sd"), v["per_seed"],
                                 gain.get("mean", "")))
    print_table(rows, ("dataset", "k", "variant", "Dice (test)", "sd", "per seed", "gain"))
    settings = {"gan": QUICK_GAN if quick else GAN, "segmenter": QUICK_SEG if quick else SEG, "crop": CROP,
                "pool_split": POOL, "test_split": TEST, "seeds": args.seeds, "ks": args.ks,
                "budget": "k labelled images of the pool drawn with the seed (frugalseg LabelBudget mask_count)"}
    path = save_results(name, figs, settings, started)
    print(f"wrote {path} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
