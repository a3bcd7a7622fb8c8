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
from pathlib import Path

import numpy as np
from common import ROOT, default_data_root, print_table, save_results

import os  # noqa: E402

os.environ.setdefault("FRUGALSEG_DATA", str(default_data_root()))

from frugalseg.stages.train import TrainConfig  # noqa: E402


def default_workers() -> int:
    """Loader processes: none on a small CPU box (they would steal the training cores), several beside a GPU."""
    import torch

    cpus = os.cpu_count() or 1
    return min(8, cpus // 2) if torch.cuda.is_available() and cpus > 4 else 0


AUX_STAGES = ("last", "penultimate")
SELECT_SEEDS = [0, 1]


def msrc_configs(quick: bool, stages: tuple[str, ...] = AUX_STAGES) -> dict[str, TrainConfig]:
    """FCN and OCR with ImageNet weights at each auxiliary stage, and FCN from random init.

    The auxiliary stage (where OCR's soft object regions come from) is chosen on a holdout carved from
    *train* (`select_configs`), never on val: the headline keys report the chosen stage's val runs, and the
    other stage's runs stay in the output as an ablation.
    """
    common = dict(
        data="msrc-objects", train_split="train", val_split="val", backbone="tf_efficientnet_lite0",
        output_stride=16, batch_size=8, optimizer="sgd", lr=0.01, weight_decay=5e-4, loss="ce",
        policy="crop", scale=(0.5, 2.0), seed=0, progress=False,
        epochs=2 if quick else 40, crop_size=192 if quick else 256, val_every=100,
        num_workers=default_workers(),
    )
    configs = {}
    for stage in stages:
        for head in ("fcn", "ocr"):
            configs[f"{head}_pretrained_{stage}"] = TrainConfig(arch=head, pretrained=True, aux_stage=stage, **common)
    configs["fcn_scratch"] = TrainConfig(arch="fcn", pretrained=False, aux_stage=stages[0], **common)
    return configs


def select_configs(quick: bool) -> dict[str, TrainConfig]:
    """The msrc schedule trained on train:fit (80 %) and scored on train:holdout (20 %), per head and stage."""
    configs = {}
    for name, cfg in msrc_configs(quick).items():
        if "pretrained" in name:
            cfg.train_split, cfg.val_split = "train:fit", "train:holdout"
            configs[f"select_{name}"] = cfg
    return configs


def all_configs(quick: bool) -> dict[str, TrainConfig]:
    return {**msrc_configs(quick), **select_configs(quick)}


def results_path(quick: bool) -> Path:
    return ROOT / "benchmarks" / "results" / ("supervised_quick.json" if quick else "supervised.json")


def chosen_stage(quick: bool) -> tuple[str, str]:
    """The auxiliary stage picked by the last `--only select` run (results JSON), else the library default
    (itself the stage the full benchmark's selection chose)."""
    path = results_path(quick)
    if path.exists():
        sel = json.loads(path.read_text()).get("figures", {}).get("aux_stage_selection", {})
        if sel.get("chosen_aux_stage") in AUX_STAGES:
            return sel["chosen_aux_stage"], "train:holdout (aux_stage_selection)"
    return TrainConfig().aux_stage, "library default: no selection run in this results file"


def headline(figures: dict, stage: str, source: str) -> dict:
    """The issue's keys (fcn_pretrained_miou, ...) from the runs at the stage chosen on train:holdout."""
    out = dict(figures)
    for head in ("fcn", "ocr"):
        for suffix in ("miou", "miou_seeds", "miou_std", "per_class_iou", "wall_s_per_run"):
            key = f"{head}_pretrained_{stage}_{suffix}"
            if key in figures:
                out[f"{head}_pretrained_{suffix}"] = figures[key]
    out["aux_stage"] = stage
    out["aux_stage_chosen_on"] = source
    out["ocr_minus_fcn_miou"] = round(out["ocr_pretrained_miou"] - out["fcn_pretrained_miou"], 6)
    out["pretrained_minus_scratch_miou"] = round(out["fcn_pretrained_miou"] - out["fcn_scratch_miou"], 6)
    for st in AUX_STAGES:
        if f"ocr_pretrained_{st}_miou" in figures and f"fcn_pretrained_{st}_miou" in figures:
            out[f"ocr_minus_fcn_miou_{st}"] = round(figures[f"ocr_pretrained_{st}_miou"] - figures[f"fcn_pretrained_{st}_miou"], 6)
    return out


def acdc_config(quick: bool) -> TrainConfig:
    return TrainConfig(
        data="acdc", train_split="train", val_split="val", arch="unet2d", policy="resize",
        crop_size=128 if quick else 192, batch_size=16, optimizer="adamw", lr=3e-3, weight_decay=1e-4,
        loss="dice_ce", epochs=1 if quick else 25, seed=0, progress=False, val_every=100,
        num_workers=default_workers(),
    )


def msrc_child(name: str, seed: int, quick: bool, out_root: str, max_steps: int = -1, workers: int | None = None) -> None:
    """One msrc configuration and seed, in its own process; prints its figures as the last JSON line."""
    from frugalseg.stages.train import train

    cfg = all_configs(quick)[name]
    cfg.seed, cfg.max_steps = seed, max_steps
    if workers is not None:
        cfg.num_workers = workers
    cfg.out = str(Path(out_root) / f"msrc_{name}_seed{seed}")
    t0 = time.time()
    res = train(cfg)
    print(json.dumps({"miou": res["val"]["miou"], "wall_s": round(time.time() - t0, 1),
                      "per_class_iou": {k: v["iou"] for k, v in res["val"]["per_class"].items()}}))


def run_jobs(names: list[str], quick: bool, out_root: Path, seeds: list[int], parallel: int, max_steps: int = -1) -> dict:
    """Every configuration x seed as a subprocess, `parallel` at a time (a GPU runs several small jobs at once)."""
    jobs = [(name, seed) for name in names for seed in seeds]
    results: dict[tuple[str, int], dict] = {}
    running: list[tuple[tuple[str, int], subprocess.Popen]] = []
    # Loader processes share the machine's cores between the runs going at once.
    workers = max(1, ((os.cpu_count() or 1) - parallel) // parallel) if default_workers() else 0
    while jobs or running:
        while jobs and len(running) < parallel:
            name, seed = jobs.pop(0)
            cmd = [sys.executable, __file__, "--msrc-child", name, str(seed), "--runs", str(out_root)]
            cmd += (["--quick"] if quick else []) + ["--max-steps", str(max_steps), "--workers", str(workers)]
            running.append(((name, seed), subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)))
        time.sleep(1)
        for key, proc in list(running):
            if proc.poll() is not None:
                out = proc.stdout.read()
                if proc.returncode != 0:
                    raise SystemExit(f"msrc run {key} failed (exit {proc.returncode}); rerun it with --msrc-child to see why")
                results[key] = json.loads(out.strip().splitlines()[-1])
                running.remove((key, proc))
                print(f"  {key[0]} seed {key[1]}: mIoU {results[key]['miou']:.4f} ({results[key]['wall_s']:.0f} s)", flush=True)
    return results


def summarise_runs(configs: dict[str, TrainConfig], results: dict, seeds: list[int], split: str) -> tuple[dict, dict, list]:
    figures, settings, rows = {}, {}, []
    for name, cfg in configs.items():
        per_seed = [results[(name, s)]["miou"] for s in seeds]
        mean = float(np.mean(per_seed))
        figures[f"{name}_miou"] = round(mean, 6)
        figures[f"{name}_miou_seeds"] = per_seed
        figures[f"{name}_miou_std"] = round(float(np.std(per_seed)), 6)
        figures[f"{name}_per_class_iou"] = {
            c: round(float(np.mean([results[(name, s)]["per_class_iou"][c] for s in seeds])), 6)
            for c in results[(name, seeds[0])]["per_class_iou"]
        }
        figures[f"{name}_wall_s_per_run"] = round(float(np.mean([results[(name, s)]["wall_s"] for s in seeds])), 1)
        settings[name] = {k: v for k, v in vars(cfg).items() if k not in ("out", "progress", "seed")}
        rows.append((name, split, f"{mean:.4f}", f"{np.std(per_seed):.4f}", " ".join(f"{v:.3f}" for v in per_seed)))
    return figures, settings, rows


def run_msrc(quick: bool, out_root: Path, seeds: list[int], parallel: int, max_steps: int = -1,
             both_stages: bool = True) -> tuple[dict, dict]:
    """Val mIoU on 59 images moves by a few points between seeds, so the headline figure is the mean over seeds,
    with each seed's value beside it. `both_stages=False` skips the other aux stage's ablation runs (the
    headline keys need only the chosen stage: 3 runs per seed instead of 5, for a small CPU)."""
    stage, source = chosen_stage(quick)
    others = tuple(s for s in AUX_STAGES if s != stage) if both_stages and not quick else ()
    stages = (stage,) + others
    configs = msrc_configs(quick, stages)
    t_all = time.time()
    results = run_jobs(list(configs), quick, out_root, seeds, parallel, max_steps)
    figures, settings, rows = summarise_runs(configs, results, seeds, "val")
    figures = headline(figures, stage, source)
    figures["seeds"] = seeds
    figures["wall_s_all_runs"] = round(time.time() - t_all, 1)
    figures["parallel_runs"] = parallel
    print_table(rows, ("msrc_objects", "split", "mIoU (mean)", "std", "per seed"))
    print(f"aux stage {stage}: OCR - FCN {figures['ocr_minus_fcn_miou']:+.4f}; pretrained - scratch {figures['pretrained_minus_scratch_miou']:+.4f}")
    return {"msrc_objects": figures}, {f"msrc_{k}": v for k, v in settings.items()}


def rederive_headline(path: Path, stage: str) -> None:
    """Point the msrc headline keys at the chosen stage's val runs already in the results file.

    Both stages' val runs are measured by `--only msrc`; this only changes which of them the issue's keys
    name, so the msrc section keeps its own provenance (machine, date) in `measured_on`.
    """
    if not path.exists():
        return
    data = json.loads(path.read_text())
    msrc = data.get("figures", {}).get("msrc_objects")
    if not msrc or f"ocr_pretrained_{stage}_miou" not in msrc:
        print(f"no msrc val runs at stage {stage} in {path.name}: run --only msrc next")
        return
    data["figures"]["msrc_objects"] = headline(msrc, stage, "train:holdout (aux_stage_selection)")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def run_select(quick: bool, out_root: Path, parallel: int, max_steps: int = -1) -> tuple[dict, dict]:
    """Choose OCR's auxiliary stage on train:holdout: the stage with the higher holdout mIoU, averaged over
    both heads and SELECT_SEEDS (the stage is a property of the model, shared by the FCN and OCR runs)."""
    configs = select_configs(quick)
    seeds = SELECT_SEEDS[:1] if quick else SELECT_SEEDS
    t_all = time.time()
    results = run_jobs(list(configs), quick, out_root, seeds, parallel, max_steps)
    figures, settings, rows = summarise_runs(configs, results, seeds, "train:holdout")
    by_stage = {st: round(float(np.mean([figures[f"select_{h}_pretrained_{st}_miou"] for h in ("fcn", "ocr")])), 6)
                for st in AUX_STAGES if f"select_ocr_pretrained_{st}_miou" in figures}
    figures["holdout_miou_by_stage"] = by_stage
    figures["chosen_aux_stage"] = max(by_stage, key=by_stage.get)
    figures["rule"] = "stage with the higher train:holdout mIoU, mean over FCN and OCR and seeds"
    figures["seeds"] = seeds
    from frugalseg.data import open_dataset

    figures["fit_images"] = len(open_dataset("msrc-objects", "train:fit").samples)
    figures["holdout_images"] = len(open_dataset("msrc-objects", "train:holdout").samples)
    figures["wall_s_all_runs"] = round(time.time() - t_all, 1)
    print_table(rows, ("aux-stage selection", "split", "mIoU (mean)", "std", "per seed"))
    print(f"holdout mIoU by stage {by_stage}: chosen {figures['chosen_aux_stage']}")
    rederive_headline(results_path(quick), figures["chosen_aux_stage"])
    return {"aux_stage_selection": figures}, {f"select_{k}": v for k, v in settings.items()}


def run_acdc(quick: bool, out_root) -> tuple[dict, dict]:
    from frugalseg.stages.train import train

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
    from frugalseg.stages.train import train_transform
    from frugalseg.losses import segmentation_loss
    from torch.utils.data import DataLoader

    stage = chosen_stage(quick)[0]
    cfg = msrc_configs(quick, (stage,))[f"ocr_pretrained_{stage}"]
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
    ap.add_argument("--only", choices=["select", "msrc", "acdc", "throughput"], action="append",
                    help="select = choose the aux stage on train:holdout (run it before msrc).")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench"), help="Where run directories go.")
    ap.add_argument("--seeds", type=int, nargs="+", help="msrc seeds (default: 0 with --quick, else 0 1 2).")
    ap.add_argument("--parallel", type=int, help="msrc runs at once (default: 5 beside a GPU, else 1).")
    ap.add_argument("--stages", choices=["chosen", "both"], default="both",
                    help="msrc: train the chosen aux stage only (3 configs), or both stages (ablation, 5 configs).")
    ap.add_argument("--max-steps", type=int, default=-1, help="Stop each msrc run after this many steps (smoke test).")
    ap.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--throughput-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--msrc-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.throughput_child:
        throughput_child(args.quick)
        return
    if args.msrc_child:
        msrc_child(args.msrc_child[0], int(args.msrc_child[1]), args.quick, args.runs, args.max_steps, args.workers)
        return
    import torch

    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    parallel = args.parallel or (5 if torch.cuda.is_available() else 1)

    started = time.time()
    out_root = Path(args.runs) / ("supervised_quick" if args.quick else "supervised")
    parts = args.only or (["throughput", "msrc", "acdc"] if args.quick else ["throughput", "select", "msrc", "acdc"])
    name = "supervised_quick" if args.quick else "supervised"
    for part in parts:
        fn = {"select": lambda: run_select(args.quick, out_root, parallel, args.max_steps),
              "msrc": lambda: run_msrc(args.quick, out_root, seeds, parallel, args.max_steps,
                                           args.stages == "both"), "acdc": lambda: run_acdc(args.quick, out_root),
              "throughput": lambda: run_throughput(args.quick)}[part]
        figures, settings = fn()
        path = save_results(name, figures, {**settings, "quick": args.quick}, started)
    print(f"wrote {path} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
