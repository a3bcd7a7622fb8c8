"""Fully supervised reference figures (issue: foundation).

msrc_objects: val mIoU of FCN and OCR heads on tf_efficientnet_lite0 with ImageNet weights, and FCN from
random init, same schedule; acdc: 2D U-Net on all training slices, val mean Dice (RV, Myo, LV) and HD95
per volume; throughput: training images/s and peak RSS of the msrc_objects configuration.

Every model is evaluated once, with its last checkpoint, on the split named in the output: nothing is
selected on the validation split.

    python benchmarks/supervised.py [--quick] [--only msrc|acdc|throughput]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from common import ROOT, default_data_root, print_table, save_results

import os  # noqa: E402

os.environ.setdefault("FRUGALSEG_DATA", str(default_data_root()))

from frugalseg.config import TrainConfig  # noqa: E402


def msrc_configs(quick: bool) -> dict[str, TrainConfig]:
    common = dict(
        data="msrc-objects", train_split="train", val_split="val", backbone="tf_efficientnet_lite0",
        output_stride=16, batch_size=8, optimizer="sgd", lr=0.01, weight_decay=5e-4, loss="ce",
        policy="crop", scale=(0.5, 2.0), seed=0, progress=False,
        epochs=2 if quick else 20, crop_size=192 if quick else 256, val_every=100,
    )
    return {
        "fcn_pretrained": TrainConfig(arch="fcn", pretrained=True, **common),
        "ocr_pretrained": TrainConfig(arch="ocr", pretrained=True, **common),
        "fcn_scratch": TrainConfig(arch="fcn", pretrained=False, **common),
    }


def acdc_config(quick: bool) -> TrainConfig:
    return TrainConfig(
        data="acdc", train_split="train", val_split="val", arch="unet2d", policy="resize",
        crop_size=128 if quick else 192, batch_size=16, optimizer="adamw", lr=3e-3, weight_decay=1e-4,
        loss="dice_ce", epochs=1 if quick else 25, seed=0, progress=False, val_every=100,
    )


def run_msrc(quick: bool, out_root) -> tuple[dict, dict]:
    from frugalseg.supervised import train

    figures, settings, rows = {}, {}, []
    for name, cfg in msrc_configs(quick).items():
        cfg.out = str(out_root / f"msrc_{name}")
        t0 = time.time()
        res = train(cfg)
        miou = res["val"]["miou"]
        figures[f"{name}_miou"] = miou
        figures[f"{name}_per_class_iou"] = {k: v["iou"] for k, v in res["val"]["per_class"].items()}
        figures[f"{name}_wall_s"] = round(time.time() - t0, 1)
        settings[f"msrc_{name}"] = {k: v for k, v in vars(cfg).items() if k not in ("out", "progress")}
        rows.append((name, "val", f"{miou:.4f}", f"{time.time() - t0:.0f}"))
    figures["ocr_minus_fcn_miou"] = figures["ocr_pretrained_miou"] - figures["fcn_pretrained_miou"]
    figures["pretrained_minus_scratch_miou"] = figures["fcn_pretrained_miou"] - figures["fcn_scratch_miou"]
    print_table(rows, ("msrc_objects", "split", "mIoU", "seconds"))
    return {"msrc_objects": figures}, settings


def run_acdc(quick: bool, out_root) -> tuple[dict, dict]:
    from frugalseg.supervised import train

    cfg = acdc_config(quick)
    cfg.out = str(out_root / "acdc_unet2d_full")
    t0 = time.time()
    res = train(cfg)
    val = res["val"]
    figures = {
        "acdc_full_dice": val["case_mean_dice"],
        "acdc_full_hd95": val["case_mean_hd95"],
        "hd95_units": val["surface_units"],
        "per_class": val["surface"],
        "val_volumes": val["samples"],
        "wall_s": round(time.time() - t0, 1),
    }
    rows = [(c, "val", f"{v['dice']:.4f}", "-" if v["hd95"] is None else f"{v['hd95']:.2f}", v["empty_pred_cases"])
            for c, v in val["surface"].items()]
    rows.append(("mean", "val", f"{val['case_mean_dice']:.4f}",
                 "-" if val["case_mean_hd95"] is None else f"{val['case_mean_hd95']:.2f}", ""))
    print_table(rows, ("acdc class", "split", "Dice", f"HD95 ({val['surface_units']})", "empty preds"))
    return {"acdc": figures}, {"acdc": {k: v for k, v in vars(cfg).items() if k not in ("out", "progress")}}


def throughput_child(quick: bool) -> None:
    """Runs in a fresh process so peak RSS belongs to this configuration alone."""
    import torch

    from frugalseg.data import open_dataset
    from frugalseg.data.torchdata import MaskedImages
    from frugalseg.models import create_segmenter
    from frugalseg.supervised import train_transform
    from frugalseg.losses import segmentation_loss
    from torch.utils.data import DataLoader

    cfg = msrc_configs(quick)["ocr_pretrained"]
    ds = open_dataset("msrc-objects", "train")
    data = MaskedImages(ds, train_transform(cfg))
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    model = create_segmenter("ocr", ds.labels.num_classes, pretrained=True, output_stride=cfg.output_stride).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    steps, warm, images, t0 = (4 if quick else 12), 2, 0, None
    it = iter(loader)
    for step in range(steps + warm):
        batch = next(it)
        if step == warm:
            t0, images = time.perf_counter(), 0
        out, aux = model.forward_train(batch["image"])
        loss = segmentation_loss(out, batch["mask"]) + 0.4 * segmentation_loss(aux, batch["mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        images += batch["image"].shape[0]
    dt = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"train_images_per_s": images / dt, "peak_rss_mb": rss_mb, "batch_size": cfg.batch_size,
                      "crop": cfg.crop_size, "steps_timed": steps, "torch_threads": torch.get_num_threads()}))


def run_throughput(quick: bool) -> tuple[dict, dict]:
    cmd = [sys.executable, __file__, "--throughput-child"] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    print_table([(f"{figures['train_images_per_s']:.2f}", f"{figures['peak_rss_mb']:.0f}", figures["crop"], figures["batch_size"])],
                ("train images/s", "peak RSS MB", "crop", "batch"))
    return {"throughput": figures}, {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Short schedules (minutes on a 2-core CPU).")
    ap.add_argument("--only", choices=["msrc", "acdc", "throughput"], action="append")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench"), help="Where run directories go.")
    ap.add_argument("--throughput-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.throughput_child:
        throughput_child(args.quick)
        return
    from pathlib import Path

    started = time.time()
    out_root = Path(args.runs) / ("supervised_quick" if args.quick else "supervised")
    parts = args.only or ["throughput", "msrc", "acdc"]
    name = "supervised_quick" if args.quick else "supervised"
    for part in parts:
        fn = {"msrc": lambda: run_msrc(args.quick, out_root), "acdc": lambda: run_acdc(args.quick, out_root),
              "throughput": lambda: run_throughput(args.quick)}[part]
        figures, settings = fn()
        path = save_results(name, figures, {**settings, "quick": args.quick}, started)
    print(f"wrote {path} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
