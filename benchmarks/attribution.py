"""Weak supervision I (issue: CAM, AdvCAM, PRM): seed quality, sensitivity, speed.

On msrc-objects, a tag classifier (tf_efficientnet_lite0, ImageNet weights, OS16) is trained on the tags of
train+val images (tags derived from masks; masks never seen in training). Then:

- CAM, multi-scale + flip, on every train+val image. The background threshold is chosen by a sweep on
  *train* and applied to *val*: `cam_seed_miou` is that val figure. Sweeps on both splits are reported as
  sweeps.
- CAM vs AdvCAM on a fixed subset at scale 1.0 (image + flip; multi-scale AdvCAM belongs on a GPU): the
  first N train and first M val images in split-file order, same classifier, same threshold protocol.
  Per-class IoU and IoU by object size say where AdvCAM helps and where it hurts.
- AdvCAM sensitivity (lambda, xi, T, penalty scale, clamp) on train images only.
- Speed: batched AdvCAM vs the reference-structured loop on the same images and weights (every val image
  with a known tag, scale 1.0), one image at a time and in the cams stage's batches.
- PRM: a classifier trained with peak stimulation; peak precision and instance mAP@0.5 against connected
  components of the ground-truth masks (an approximation: touching objects of a class merge), and seed
  mIoU of the instance maps with the same threshold protocol.

    python benchmarks/attribution.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from common import ROOT, allocator_description, default_data_root, print_table, save_results

os.environ.setdefault("FRUGALSEG_DATA", str(default_data_root()))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SWEEP = [round(0.05 * i, 2) for i in range(1, 19)]  # 0.05 .. 0.90


def settings(quick: bool) -> dict:
    return {
        "classifier_epochs": 3 if quick else 6,
        "subset_train": 8 if quick else 40,
        "subset_val": 6 if quick else 20,
        "sensitivity_images": 4 if quick else 12,
        # the full run times every val image with a known tag (46 on msrc-objects): a few images' figure
        # moved between runs with which images (tags per image) and allocator state they happened to get
        "speed_images": 2 if quick else 59,
        "prm_train": 4 if quick else 16,
        "prm_val": 6 if quick else 20,
        "cam_scales": [1.0, 0.5] if quick else [1.0, 0.5, 1.5, 2.0],
        "cam_limit": 20 if quick else None,  # images per split for multi-scale CAM (None = all)
        "subset_scale": 1.0,
        "advcam": {"steps": 27, "step_size": 0.08, "restriction": 7.0, "mask_threshold": 0.5},
        "sweep": SWEEP,
    }


def train_classifiers(root: Path, s: dict) -> tuple[Path, Path, dict]:
    from frugalseg.stages.classify import ClassifyConfig, train_classifier

    out = {}
    runs = {}
    for name, peaks in (("cam", False), ("prm", True)):
        cfg = ClassifyConfig(data="msrc-objects", out=str(root / f"classifier_{name}"), train_split="train+val",
                             eval_split="val", epochs=s["classifier_epochs"], peak_stimulation=peaks, progress=False)
        t0 = time.time()
        res = train_classifier(cfg)
        out[f"{name}_classifier"] = {"val_tag_mAP": res["eval"]["mAP"], "val_mean_f1": res["eval"]["mean_f1"],
                                     "seconds": round(time.time() - t0, 1), "peak_stimulation": peaks}
        runs[name] = Path(cfg.out)
        print(f"classifier ({name}): val tag mAP {res['eval']['mAP']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    return runs["cam"], runs["prm"], out


def maps(classifier: Path, out: Path, method: str, split: str, limit: int | None = None, scales=(1.0,), **kw) -> dict:
    from frugalseg.stages.maps import MapsConfig, make_maps

    cfg = MapsConfig(classifier=str(classifier), out=str(out), method=method, split=split, limit=limit,
                     scales=tuple(scales), progress=False, gallery_images=12, **kw)
    return make_maps(cfg)


def protocol(train_dir: Path, val_dir: Path) -> dict:
    """Sweep on train -> threshold -> val. Returns the val figure plus both sweeps (labelled as sweeps)."""
    from frugalseg.stages.maps import eval_seeds

    tr = eval_seeds(train_dir, split="train", sweep=SWEEP)
    va = eval_seeds(val_dir, split="val", threshold_from=train_dir / "seeds_train.json", sweep=SWEEP)
    f = va["fixed"]
    return {
        "val_miou": f["miou"], "threshold_chosen_on_train": tr["chosen_threshold"], "train_images": tr["images"],
        "val_images": va["images"], "val_per_class_iou": {k: v["iou"] for k, v in f["per_class"].items()},
        "val_by_object_size": {b: v.get("miou") for b, v in f["by_object_size"].items()},
        "train_sweep": tr["sweep"], "val_sweep": va["sweep"],
    }


def page_faults() -> int:
    """Minor page faults of this process so far (0 where `resource` is missing)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def in_batches(items: list, size: int | None) -> list[list]:
    """`items` in consecutive batches of `size` (one batch when size is None)."""
    size = size or len(items)
    return [items[i:i + size] for i in range(0, len(items), size)]


def speed(classifier: Path, n: int, batch_size: int | None = None) -> dict:
    """Batched climb vs the reference loop, same images/weights, scale 1.0, T=27, this machine.

    The grouped figure climbs same-size images `batch_size` at a time, as `frugalseg cams` does (its
    default batch size unless given; None on a GPU: whole size groups, to fill it)."""
    from frugalseg.data import open_dataset
    from frugalseg.data.transforms import to_tensor_image
    from frugalseg.weak.advcam import AdvCAMConfig, advcam_maps, count_passes
    from frugalseg.weak.advcam_reference import advcam_reference
    from frugalseg.weak.classify import load_classifier
    from frugalseg.stages.maps import MapsConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, spec, _ = load_classifier(classifier)
    model = model.to(device)
    to_clf = {c: i for i, c in enumerate(spec["class_ids"])}
    ds = open_dataset("msrc-objects", "val")
    items = []
    for smp in ds.samples:
        t = [to_clf[c] for c in sorted(ds.tags_of(smp)) if c in to_clf]
        if t:
            items.append((to_tensor_image(ds.read_image(smp)).to(device), t))
        if len(items) == n:
            break
    n = len(items)  # val images with at least one tag the classifier knows (fewer than asked for when the split runs out)
    cfg = AdvCAMConfig(scales=(1.0,))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, *a, **kw) -> float:
        sync()
        t0 = time.perf_counter()
        fn(*a, **kw)
        sync()
        return time.perf_counter() - t0

    timed(advcam_maps, model, items[0][0][None], [items[0][1]], AdvCAMConfig(scales=(1.0,), steps=2))  # warm-up
    timed(advcam_reference, model, items[0][0], items[0][1], AdvCAMConfig(scales=(1.0,), steps=2))
    # Interleaved, image by image: both methods see the same machine load and the same allocator state (glibc
    # adapts its thresholds to what the process freed before, so back-to-back blocks favour whichever ran second).
    batched_s, loop_s = [], []
    for img, t in items:
        batched_s.append(timed(advcam_maps, model, img[None], [t], cfg))  # its classes batched, the lighter step
        loop_s.append(timed(advcam_reference, model, img, t, cfg))
    batched, loop = sum(batched_s), sum(loop_s)
    by_size: dict = {}
    for img, t in items:  # as `frugalseg cams` runs it: same-size images climb together
        by_size.setdefault(tuple(img.shape), []).append((img, t))
    if batch_size is None and device.type == "cpu":
        batch_size = MapsConfig().batch_size
    stacked = [(torch.stack([img for img, _ in batch]), [t for _, t in batch])
               for group in by_size.values() for batch in in_batches(group, batch_size)]
    for imgs, tags in stacked:  # warm-up at the grouped batch shapes (kernel selection is per shape)
        timed(advcam_maps, model, imgs, tags, AdvCAMConfig(scales=(1.0,), steps=2))
    faults0 = page_faults()
    grouped = sum(timed(advcam_maps, model, imgs, tags, cfg) for imgs, tags in stacked)
    faults_per_step = (page_faults() - faults0) / (cfg.steps * len(stacked))
    bf16 = plain_dw = None
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        bf16 = {"skipped": "this CPU has no native bf16 (oneDNN would emulate it, far slower than float32)"}
    if device.type == "cpu" and bf16 is None:
        # bf16 on CPU: faster, not exact; its map deviation is reported beside it
        cfg16 = AdvCAMConfig(scales=(1.0,), autocast="bf16")
        for imgs, tags in stacked:
            timed(advcam_maps, model, imgs, tags, AdvCAMConfig(scales=(1.0,), steps=2, autocast="bf16"))
        t16 = sum(timed(advcam_maps, model, imgs, tags, cfg16) for imgs, tags in stacked)
        diffs = []
        for imgs, tags in stacked:
            out16, out32 = advcam_maps(model, imgs, tags, cfg16), advcam_maps(model, imgs, tags, cfg)
            diffs += [float((a.high_res - b.high_res).abs().max()) for a, b in zip(out16, out32) if a.keys.numel()]
        bf16 = {"images_per_s": n / t16, "speedup": loop / t16, "max_abs_map_diff_vs_float32": max(diffs) if diffs else None}
    if device.type == "cpu":
        # the same climb with oneDNN's own dilated depthwise backward: the share of `DepthwiseInputGrad`
        cfg_plain = AdvCAMConfig(scales=(1.0,), depthwise_input_grad=False)
        plain_dw = n / sum(timed(advcam_maps, model, imgs, tags, cfg_plain) for imgs, tags in stacked)
    passes_1 = count_passes([len(t) for _, t in items], cfg)
    return {
        "advcam_images_per_s": n / grouped, "oracle_images_per_s": n / loop, "advcam_speedup": loop / grouped,
        "advcam_images_per_s_one_image_at_a_time": n / batched, "advcam_speedup_one_image_at_a_time": loop / batched,
        "image_groups": len(by_size), "grouped_batches": len(stacked), "grouped_batch_size": batch_size,
        "advcam_images_per_s_without_depthwise_input_grad": plain_dw,
        "allocator": allocator_description(), "page_faults_per_step_grouped": round(faults_per_step, 1),
        "seconds_per_image": {"batched": [round(x, 3) for x in batched_s], "oracle": [round(x, 3) for x in loop_s]},
        "protocol": "per image, batched then oracle, interleaved; then same-size images climb together (advcam_speedup)",
        "bf16_cpu": bf16,
        "images": n, "mean_tags": passes_1["mean_tags_per_image"], "scale": 1.0, "steps": 27,
        "passes_per_image_scale_1": passes_1,
        "passes_per_image_default_scales": count_passes([len(t) for _, t in items], AdvCAMConfig()),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "amp": "bf16 autocast (batched only)" if device.type == "cuda" else None, "torch_threads": torch.get_num_threads(),
    }


def prm_instances_eval(classifier: Path, n_val: int) -> dict:
    """Peak precision and instance mAP@0.5 on the first n_val val images."""
    from frugalseg.data import open_dataset
    from frugalseg.data.transforms import to_tensor_image
    from frugalseg.weak.classify import load_classifier
    from frugalseg.weak.prm import instance_ap, peak_precision, peak_response_maps, prm_instances

    model, spec, _ = load_classifier(classifier)
    to_clf = {c: i for i, c in enumerate(spec["class_ids"])}
    ds = open_dataset("msrc-objects", "val")
    label_of = spec["class_ids"]  # classifier index -> dataset class id
    precisions, preds, gts = [], [], []
    for smp in ds.samples[:n_val]:
        t = [to_clf[c] for c in sorted(ds.tags_of(smp)) if c in to_clf]
        img = to_tensor_image(ds.read_image(smp))
        gt = ds.read_mask(smp)
        if not t:
            continue
        peaks = peak_response_maps(model, img, t)
        p = peak_precision(peaks, gt, label_of=label_of)
        if not np.isnan(p):
            precisions.append(p)
        preds.append(prm_instances(model, img, classes=t))
        gts.append(gt)
    ap = instance_ap(preds, gts, iou=0.5, label_of=label_of)
    return {"peak_precision": float(np.mean(precisions)) if precisions else None, "instance_map50": ap["mAP"],
            "instance_ap50_per_class": ap["ap"], "gt_instances": ap["gt_instances"], "images": len(gts),
            "num_gt": ap["num_gt"], "num_pred": ap["num_pred"]}


def advcam_all_images(classifier: Path, scales: tuple[float, ...]) -> None:
    """AdvCAM over every train and val image, threshold chosen on train, applied to val; the reference's
    lambda 7 first, then lambda 0 (chosen by the train-only sensitivity table). Each variant is saved as
    soon as it is done, beside `cam_scale1_all` (CAM on the same images at the same scales) for comparison."""
    root = classifier.parent
    batch = 16 if torch.cuda.is_available() else 4
    name = "advcam_multiscale" if len(scales) > 1 else "advcam_all_scale1"
    variants = [(name.replace("advcam", "cam"), "cam", {}), (name, "advcam", {}), (f"{name}_lambda0", "advcam", {"restriction": 0.0})]
    for tag, method, kw in variants:
        started = time.time()
        for split in ("train", "val"):
            maps(classifier, root / f"{tag}_{split}", method, split, scales=scales, batch_size=batch, **kw)
        res = protocol(root / f"{tag}_train", root / f"{tag}_val")
        res.update(seconds=round(time.time() - started, 1), scales=list(scales), method=method,
                   restriction=kw.get("restriction", 7.0) if method == "advcam" else None)
        print(f"{tag}: val seed mIoU {res['val_miou']:.4f} (threshold {res['threshold_chosen_on_train']} from train), {res['seconds']:.0f} s", flush=True)
        save_results("attribution", {tag: res}, {tag: {"batch_size": batch}}, started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--only-speed", action="store_true", help="Measure AdvCAM speed only (classifier must exist).")
    ap.add_argument("--speed-images", type=int, help="Val images timed (default: all with a known tag; 2 with --quick).")
    ap.add_argument("--speed-batch-size", type=int,
                    help="Images per grouped climb in the speed test (default: `frugalseg cams`' batch size on CPU, whole size groups on a GPU).")
    ap.add_argument("--speed-key", default="", help="Suffix of the results key of an --only-speed run (keeps earlier runs beside it).")
    ap.add_argument("--only-advcam-multiscale", action="store_true",
                    help="Multi-scale AdvCAM (default scales) on all train+val images, lambda 7 then 0 (a GPU job).")
    ap.add_argument("--only-advcam-all", action="store_true",
                    help="AdvCAM at scale 1.0 (image + flip) on all train and val images, lambda 7 then 0 (CPU: about 40 min).")
    args = ap.parse_args()
    s = settings(args.quick)
    if args.only_advcam_multiscale or args.only_advcam_all:
        scales = (1.0, 0.5, 1.5, 2.0) if args.only_advcam_multiscale else (1.0,)
        advcam_all_images(Path(args.runs) / "attribution" / "classifier_cam", scales)
        return
    if args.only_speed:
        name = "attribution_quick" if args.quick else "attribution"
        started = time.time()
        n = args.speed_images or s["speed_images"]
        sp = speed(Path(args.runs) / name / "classifier_cam", n, args.speed_batch_size)
        print({k: v for k, v in sp.items() if "passes" not in k})
        key = f"advcam_speed_{'gpu' if torch.cuda.is_available() else 'cpu'}"
        if allocator_description() == "C library defaults" and not torch.cuda.is_available():
            key += "_default_allocator"  # FRUGALSEG_DEFAULT_ALLOCATOR=1: kept beside the tuned figures
        key += f"_{args.speed_key}" if args.speed_key else ""
        save_results(name, {key: sp}, {key: {"images": n, "batch_size": sp["grouped_batch_size"]}}, started)
        return
    name = "attribution_quick" if args.quick else "attribution"
    root = Path(args.runs) / name
    started = time.time()
    torch.manual_seed(0)

    cam_clf, prm_clf, clf_figs = train_classifiers(root, s)
    figures: dict = {"classifiers": clf_figs}

    # 1. multi-scale CAM over all train+val images, threshold chosen on train
    for split in ("train", "val"):
        maps(cam_clf, root / f"cam_ms_{split}", "cam", split, limit=s["cam_limit"], scales=s["cam_scales"])
    ms = protocol(root / "cam_ms_train", root / "cam_ms_val")
    figures["cam_seed_miou"] = ms["val_miou"]
    figures["cam_multiscale"] = ms
    print(f"CAM (multi-scale): val seed mIoU {ms['val_miou']:.4f} at threshold {ms['threshold_chosen_on_train']} chosen on train", flush=True)

    # 2. CAM vs AdvCAM on the fixed subset at scale 1.0
    sub = {}
    for method in ("cam", "advcam"):
        t0 = time.time()
        for split, n in (("train", s["subset_train"]), ("val", s["subset_val"])):
            maps(cam_clf, root / f"{method}_subset_{split}", method, split, limit=n, scales=(s["subset_scale"],))
        sub[method] = protocol(root / f"{method}_subset_train", root / f"{method}_subset_val")
        sub[method]["seconds"] = round(time.time() - t0, 1)
        print(f"{method} subset: val seed mIoU {sub[method]['val_miou']:.4f} (threshold {sub[method]['threshold_chosen_on_train']} from train)", flush=True)
    figures["subset_cam_seed_miou"] = sub["cam"]["val_miou"]
    figures["advcam_seed_miou"] = sub["advcam"]["val_miou"]
    figures["advcam_minus_cam_subset"] = sub["advcam"]["val_miou"] - sub["cam"]["val_miou"]
    figures["subset"] = sub
    figures["advcam_vs_cam_per_class"] = {
        c: (None if sub["advcam"]["val_per_class_iou"][c] is None or sub["cam"]["val_per_class_iou"][c] is None
            else round(sub["advcam"]["val_per_class_iou"][c] - sub["cam"]["val_per_class_iou"][c], 4))
        for c in sub["cam"]["val_per_class_iou"]
    }
    figures["advcam_vs_cam_by_size"] = {b: (None if sub["advcam"]["val_by_object_size"][b] is None or sub["cam"]["val_by_object_size"][b] is None
                                            else round(sub["advcam"]["val_by_object_size"][b] - sub["cam"]["val_by_object_size"][b], 4))
                                        for b in sub["cam"]["val_by_object_size"]}

    # 3. sensitivity, train images only (best threshold of each variant's own train sweep: a train-side sweep)
    from frugalseg.stages.maps import eval_seeds

    # lambda_2.8: the reference's balance of penalty to score. The score is a spatial mean (1/hw per pixel),
    # the penalty a sum of Grad-CAM values (about 1/(2K+) per unit of CAM); lite0 has K+ ~ 158 of 320
    # channels and msrc maps are 20x15, ResNet-50 on VOC has K+ ~ 1024 and 32x24 maps, so lambda=7 there
    # weighs like lambda ~ 2.8 here.
    variants = {"default": {}, "lambda_0": {"restriction": 0.0}, "lambda_1": {"restriction": 1.0},
                "lambda_2.8": {"restriction": 2.8}, "lambda_20": {"restriction": 20.0},
                "xi_0.04": {"step_size": 0.04}, "xi_0.16": {"step_size": 0.16}, "T_13": {"steps": 13},
                "raw_cam_penalty": {"gradcam_scale": False}, "clamp_previous": {"clamp": "previous"}}
    if args.quick:
        variants = {k: variants[k] for k in ("default", "lambda_0")}
    sens = []
    for vname, kw in variants.items():
        d = root / f"sens_{vname}"
        maps(cam_clf, d, "advcam", "train", limit=s["sensitivity_images"], scales=(1.0,), **kw)
        r = eval_seeds(d, split="train", sweep=SWEEP)
        best = r["sweep"]["best_miou_on_this_split"]
        at_fixed = [row for row in r["sweep"]["rows"] if abs(row["threshold"] - 0.15) < 1e-9]
        sens.append({"variant": vname, **kw, "train_best_miou": best, "train_best_threshold": r["chosen_threshold"],
                     "train_miou_at_0.15": at_fixed[0]["miou"] if at_fixed else None, "images": r["images"]})
    d = root / "sens_cam"
    maps(cam_clf, d, "cam", "train", limit=s["sensitivity_images"], scales=(1.0,))
    r = eval_seeds(d, split="train", sweep=SWEEP)
    sens.append({"variant": "cam (no climbing)", "train_best_miou": r["sweep"]["best_miou_on_this_split"],
                 "train_best_threshold": r["chosen_threshold"], "images": r["images"]})
    figures["advcam_sensitivity_train"] = sens
    print_table([(v["variant"], "train", f"{v['train_best_miou']:.4f}", v["train_best_threshold"]) for v in sens],
                ("AdvCAM variant", "split", "best mIoU (train sweep)", "at threshold"))

    # 3b. the variant with the best train sweep, applied to the subset: val at the train-chosen threshold
    best = max((v for v in sens if v["variant"] != "cam (no climbing)"), key=lambda v: v["train_best_miou"])
    kw = variants[best["variant"]]
    if kw:
        tag = f"advcam_{best['variant']}"
        for split, n in (("train", s["subset_train"]), ("val", s["subset_val"])):
            maps(cam_clf, root / f"{tag}_subset_{split}", "advcam", split, limit=n, scales=(s["subset_scale"],), **kw)
        tuned = protocol(root / f"{tag}_subset_train", root / f"{tag}_subset_val")
    else:
        tuned = sub["advcam"]
    figures["advcam_tuned_on_train"] = {"variant": best["variant"], **kw, **tuned}
    figures["advcam_tuned_seed_miou"] = tuned["val_miou"]
    figures["advcam_tuned_minus_cam_subset"] = tuned["val_miou"] - sub["cam"]["val_miou"]
    figures["advcam_tuned_vs_cam_per_class"] = {
        c: (None if tuned["val_per_class_iou"][c] is None or sub["cam"]["val_per_class_iou"][c] is None
            else round(tuned["val_per_class_iou"][c] - sub["cam"]["val_per_class_iou"][c], 4))
        for c in sub["cam"]["val_per_class_iou"]
    }
    figures["advcam_tuned_vs_cam_by_size"] = {
        b: (None if tuned["val_by_object_size"][b] is None or sub["cam"]["val_by_object_size"][b] is None
            else round(tuned["val_by_object_size"][b] - sub["cam"]["val_by_object_size"][b], 4))
        for b in sub["cam"]["val_by_object_size"]}
    print(f"AdvCAM with {best['variant']} (chosen on train): val seed mIoU {tuned['val_miou']:.4f} vs CAM {sub['cam']['val_miou']:.4f}", flush=True)

    # 4. speed
    sp = speed(cam_clf, s["speed_images"])
    figures["speed"] = sp
    figures["advcam_images_per_s"] = sp["advcam_images_per_s"]
    figures["advcam_speedup"] = sp["advcam_speedup"]
    print(f"AdvCAM speed (CPU, scale 1.0, T=27): batched {sp['advcam_images_per_s']:.3f} img/s, loop {sp['oracle_images_per_s']:.3f} img/s, speed-up {sp['advcam_speedup']:.2f}x", flush=True)

    # 5. PRM
    for split, n in (("train", s["prm_train"]), ("val", s["prm_val"])):
        maps(prm_clf, root / f"prm_{split}", "prm", split, limit=n)
    pr = protocol(root / "prm_train", root / "prm_val")
    figures["prm_seed_miou"] = pr["val_miou"]
    figures["prm_seeds"] = pr
    figures["prm_instances"] = prm_instances_eval(prm_clf, s["prm_val"])
    print(f"PRM: val seed mIoU {pr['val_miou']:.4f}; peak precision {figures['prm_instances']['peak_precision']}; "
          f"instance mAP@0.5 {figures['prm_instances']['instance_map50']}", flush=True)

    rows = [("cam (multi-scale)", "val", f"{figures['cam_seed_miou']:.4f}", ms["val_images"]),
            ("cam (subset, scale 1)", "val", f"{figures['subset_cam_seed_miou']:.4f}", sub["cam"]["val_images"]),
            ("advcam (subset, scale 1)", "val", f"{figures['advcam_seed_miou']:.4f}", sub["advcam"]["val_images"]),
            (f"advcam {best['variant']} (chosen on train)", "val", f"{figures['advcam_tuned_seed_miou']:.4f}", tuned["val_images"]),
            ("prm (subset)", "val", f"{figures['prm_seed_miou']:.4f}", pr["val_images"])]
    print_table(rows, ("seeds", "split", "mIoU (threshold from train)", "images"))
    figures["wall_seconds"] = round(time.time() - started, 1)
    path = save_results(name, {"msrc_objects": figures}, {"attribution": s, "quick": args.quick}, started)
    print(f"wrote {path} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
