"""Training-step speed of the semi-supervised methods on the CPU protocol (issue: semi-supervision on this CPU).

Every method's step runs as `frugalseg train --semi` runs it (the same `SemiBatches`, step module, optimiser
and schedule, built by `stages.semi`), minus Lightning, so the time splits cleanly into

- data: `SemiBatches.batch(b)` (read, augment, resize, DTC's signed distance maps) on the main thread;
- compute: `step.terms` + backward + optimiser step + `after_step` (the EMA update of the mean teacher).

Lightning's own share (logging, hooks) is the difference to the `seconds_per_iteration` a real run records,
reported by `benchmarks/semi.py`. Images/s counts every image of a batch (labelled and unlabelled).

Variants (`--variant`, compute only; the data path is the same): `default`, `channels_last` (NHWC
tensors and weights), `bf16` (CPU autocast), `compile` (`torch.compile` of each network; its compilation
time is reported apart), `threads2` (two torch threads for one run: what a run gets alone on this box).
A variant is kept as a default only where it is faster and its loss stays within tolerance of `default`
(the first steps' losses are recorded for that). `lightning` runs the real path instead (`train_semi` for 60
iterations, validation off): the step time a run reports, Lightning's hooks and logging included.

    python benchmarks/semi_speed.py [--setting acdc_l7|la] [--methods ...] [--steps N] [--variant ...] [--key NAME]

Results: benchmarks/results/semi_speed.json, section `<key>` (e.g. `before`, `after`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

from common import default_data_root, print_table, save_results

os.environ.setdefault("FRUGALSEG_DATA", str(default_data_root()))

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from semi import cpu_config  # noqa: E402

from frugalseg.semi.batches import SemiBatches  # noqa: E402
from frugalseg.stages.engine import make_optimizer  # noqa: E402
from frugalseg.stages.semi import network_spec, open_semi_data  # noqa: E402
from frugalseg.data.torchdata import input_channels  # noqa: E402

VARIANTS = ("default", "channels_last", "bf16", "compile", "threads2", "lightning")


def build(setting: str, method: str, seed: int = 1):
    """(config, step, batches, optimiser) of one CPU-protocol run, as `stages.semi.train_semi` builds them."""
    cfg = cpu_config(setting, method, seed)
    # Ramps given explicitly (the values `scale_schedule` resolves for this run), so code from before the
    # schedule scaling computes the same loss terms and the losses of `before` and `after` are comparable.
    ramps = {"rampup_every": 1, "lr_step": max(1, round(2500 * cfg.iterations / 6000))}
    if hasattr(cfg, "consistency_rampup"):
        ramps["consistency_rampup"] = float(cfg.iterations)
    if hasattr(cfg, "ramp_epochs"):
        ramps["ramp_epochs"] = cfg.iterations / 2
    for name, value in ramps.items():
        setattr(cfg, name, value)
    cfg.validate()
    torch.manual_seed(cfg.seed)
    data = open_semi_data(cfg, require_unlabelled=cfg.STEP.uses_unlabelled)
    cfg, train, labels = data.cfg, data.train, data.train.labels
    streams = cfg.streams(data.labelled)
    spec = network_spec(cfg, labels, input_channels(train))
    step = cfg.build_step(spec, labels)
    index = {s.id: i for i, s in enumerate(train.samples)}
    uses = cfg.STEP.uses_unlabelled
    batches = SemiBatches(
        train, [[index[i] for i in s] for s in streams], data.unlabelled if uses else [],
        labelled_batch_size=cfg.labelled_batch_size, unlabelled_batch_size=cfg.unlabelled_batch_size if uses else 0,
        steps=cfg.epoch_length, patch_size=cfg.patch_size, augment=cfg.augment,
        sdf_classes=labels.num_classes if cfg.STEP.needs_sdf else None, seed=cfg.seed, scale=cfg.scale,
        base_size=cfg.base_size, jitter=cfg.jitter or 0.0)
    return cfg, step, batches, make_optimizer(step.trainable_parameters(), cfg)


def measure(setting: str, method: str, steps: int, variant: str, warmup: int = 3) -> dict:
    cfg, step, batches, opt = build(setting, method)
    step.train()
    autocast = contextlib.nullcontext
    compile_s = 0.0
    if variant == "channels_last":
        step.to(memory_format=torch.channels_last if cfg.dims == 2 else torch.channels_last_3d)
    if variant == "bf16":
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    if variant == "compile":
        for name, net in list(step.named_children()):
            if isinstance(net, torch.nn.ModuleList):
                for k in range(len(net)):
                    net[k] = torch.compile(net[k])
            else:
                setattr(step, name, torch.compile(net))
    data_s, compute_s, losses = [], [], []
    # Batches loaded once first: the timed loop reads them from the decoded-sample cache as a real run does
    # after its first pass (the first pass is reported apart as `first_pass_s`).
    t = time.perf_counter()
    for b in range(min(batches.steps, warmup + steps)):
        batches.batch(b)
    first_pass_s = time.perf_counter() - t
    # Steps are numbered from the middle of the run: every ramp is on there (at step 0 co-training's diversity
    # weight is 0 and its adversarial term is skipped, which would time a cheaper step than the run's).
    offset = cfg.iterations // 2
    for b in range(warmup + steps):
        t0 = time.perf_counter()
        batch = batches.batch(b % batches.steps)
        if variant == "channels_last":
            fmt = torch.channels_last if cfg.dims == 2 else torch.channels_last_3d
            batch["image"] = batch["image"].contiguous(memory_format=fmt)
        t1 = time.perf_counter()
        with autocast():
            terms = step.terms(batch, offset + b)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        step.after_step(offset + b)
        t2 = time.perf_counter()
        if b < warmup:
            if variant == "compile" and b == 0:
                compile_s = t2 - t1
            continue
        data_s.append(t1 - t0)
        compute_s.append(t2 - t1)
        losses.append(round(float(terms["loss"].detach()), 6))
    data, compute = statistics.median(data_s), statistics.median(compute_s)
    images = batches.batch_size
    return {"method": method, "variant": variant, "batch_images": images, "data_s": round(data, 4),
            "compute_s": round(compute, 4), "step_s": round(data + compute, 4),
            "images_per_s": round(images / (data + compute), 2), "data_share": round(data / (data + compute), 3),
            "first_pass_s": round(first_pass_s, 2), "compile_s": round(compile_s, 1), "losses": losses[:5],
            "threads": torch.get_num_threads(), "steps": steps, "first_step": offset}


def measure_lightning(setting: str, method: str, steps: int) -> dict:
    """The real path (`stages.semi.train_semi`: Lightning, logging, checkpoint at the end) for `steps` iterations,
    validation off: the median time from one training batch to the next, as a run reports it."""
    import shutil
    import tempfile

    from frugalseg.stages.semi import train_semi

    cfg = cpu_config(setting, method, 1)
    cfg.iterations, cfg.epoch_steps, cfg.val_split = steps, steps, ""
    out = Path(tempfile.mkdtemp(prefix="semi_speed_"))
    cfg.out = str(out / "run")
    try:
        res = train_semi(cfg)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    step = res["seconds_per_iteration"]
    images = cfg.labelled_batch_size * (cfg.n_models if hasattr(cfg, "n_models") else 1) + (
        cfg.unlabelled_batch_size if cfg.STEP.uses_unlabelled else 0)
    return {"method": method, "variant": "lightning", "step_s": step, "images_per_s": round(images / step, 2),
            "batch_images": images, "steps": steps, "losses": res["losses"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="acdc_l7", choices=["acdc_l7", "acdc_l3", "la", "msrc_10pct"])
    ap.add_argument("--methods", nargs="+",
                    default=["supervised_only", "meanteacher", "dtc", "cotrain_k2", "cotrain_k2_noadv", "cotrain_k3"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--variant", nargs="+", default=["default"], choices=VARIANTS)
    ap.add_argument("--key", default="current", help="Section of semi_speed.json to write (e.g. before, after).")
    args = ap.parse_args()
    started = time.time()
    rows, figures = [], {}
    for variant in args.variant:
        torch.set_num_threads(2 if variant == "threads2" else 1)
        for method in args.methods:
            r = (measure_lightning(args.setting, method, max(args.steps, 60)) if variant == "lightning"
                 else measure(args.setting, method, args.steps, variant))
            figures.setdefault(variant, {})[method] = r
            rows.append((method, variant, r["batch_images"], f"{r.get('data_s', float('nan')):.3f}",
                         f"{r.get('compute_s', r['step_s']):.3f}", f"{r['images_per_s']:.1f}",
                         f"{r['data_share']:.0%}" if "data_share" in r else "-"))
            print(f"  {method} {variant}: {r['images_per_s']:.1f} images/s", flush=True)
    print_table(rows, ("method", "variant", "images/batch", "data s", "compute s", "images/s", "data share"))
    settings = {"setting": args.setting, "protocol": {m: cpu_config(args.setting, m, 1).__dict__ for m in args.methods},
                "steps": args.steps, "warmup": 3}
    path = save_results("semi_speed", {f"{args.setting}.{args.key}": figures},
                        {f"{args.setting}.{args.key}": settings}, started)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
