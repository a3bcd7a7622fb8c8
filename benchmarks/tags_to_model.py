"""From tags to a segmentation model on msrc-objects (issue: weak supervision II).

Tags only for the training images (derived from their masks; the masks themselves are read only to score
each stage). One `frugalseg run` with CAM seeds -> CRF -> MCOF mining rounds (regions, OCR segmenter,
tag-restricted predictions as the next seeds), and a second run that shares its tag classifier and makes
group-wise seeds (co-attention over groups of 3 images) for `group_seed_miou`.

Thresholds: IRN's background thresholds (0.15 seeds, 0.35 / 0.15 CRF) were tuned for ResNet-50 CAMs on VOC;
lite0's maps peak elsewhere. So the masks of a seeded quarter of the training images (`calibration_fraction`
0.25) choose the background threshold of each run's own maps (sweep kept in calibration.json), the CRF planes
sit at it and 0.2 below it, and every per-stage figure is scored on the *other* three quarters of the
training images. All training images, calibration ones included, train through their tags only.

Figures: pseudo-mask mIoU per stage on the scored train images (IRN's convention: ignored pixels count as
background), `group_seed_miou` vs `cam_seed_miou` (each at its own calibrated threshold),
`tags_only_val_miou` (the last round's segmenter on the *val* split) and `ratio_to_full`, the latter divided
by `ocr_pretrained_miou` of benchmarks/results/supervised.json (40 epochs; this run's segmenter schedule is
stated beside it). Nothing is chosen on val or on the training masks.

    python benchmarks/tags_to_model.py [--quick]

The IRN study (`--irn pseudo-masks|segmenters`) keeps each finished run (pseudo-mask tables, every training
seed of the tags-only pipeline and of full supervision) as a small record in `benchmarks/results/
tags_to_model_runs/`, so its seeds can be finished over several sessions; the shared classifier and CAMs are
remade when a working copy lacks them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import RESULTS, ROOT, default_data_root, mean_sd, print_table, recorded, save_results

os.environ.setdefault("FRUGALSEG_DATA", str(default_data_root()))

from frugalseg.stages.pipeline import PipelineConfig, run_pipeline  # noqa: E402


def settings(quick: bool) -> dict:
    if quick:
        return dict(limit=48, classifier_epochs=4, scales=(1.0,), rounds=2, seg_epochs=6, crop_size=192, group_epochs=2)
    return dict(limit=None, classifier_epochs=8, scales=(1.0, 0.5, 1.5, 2.0), rounds=2, seg_epochs=20,
                crop_size=256, group_epochs=4)


def full_supervision_miou() -> tuple[float | None, dict]:
    path = ROOT / "benchmarks" / "results" / "supervised.json"
    if not path.exists():
        return None, {}
    data = json.loads(path.read_text())
    msrc = data["figures"].get("msrc_objects", {})
    return msrc.get("ocr_pretrained_miou"), {"source": "supervised.json msrc_objects.ocr_pretrained_miou",
                                             "aux_stage": msrc.get("aux_stage"),
                                             "measured_on": data.get("measured_on", {}).get("msrc_objects", {}).get("machine", {}).get("gpu", "cpu")}


def copy_finished_stages(src: Path, dst: Path, keep_rounds: int) -> None:
    """Start `dst` from `src`'s finished stages up to round `keep_rounds` (their markers hold the settings, so
    the pipeline redoes whatever the new run's settings change and reuses the rest)."""
    import re
    import shutil

    if dst.exists():
        return
    if not (src / "summary.json").exists():
        raise SystemExit(f"{src} has no finished run: run this benchmark without options first.")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def later_round(name: str) -> bool:
        m = re.match(r"round(\d+)", name)
        return bool(m) and int(m.group(1)) > keep_rounds

    def ignore(folder: str, names: list[str]) -> list[str]:
        top = Path(folder) == src
        return [n for n in names if later_round(n) or (top and n in ("summary.json", "report.html", "report_assets"))]

    shutil.copytree(src, tmp, ignore=ignore)
    tmp.rename(dst)


def seed_study(root: Path, common: dict, seeds: list[int], rounds: int) -> dict:
    """Round-by-round val mIoU over training seeds: is round r+1's gain larger than seed-to-seed spread?

    Only what trains after the maps varies (region classifiers, segmenters, data order); the tag classifier,
    its maps and the calibration draw are the main run's, so differences are those of the mining rounds.
    """

    main_dir = root / "cam_crf_mining"
    if not (main_dir / "summary.json").exists():
        raise SystemExit(f"{main_dir} has no finished run: run this benchmark without --seed-study first.")
    per_seed = {0: json.loads((main_dir / "summary.json").read_text())}
    for seed in [x for x in seeds if x != 0]:
        cfg = PipelineConfig(**{**common, "seed": seed}, out=str(root / f"cam_crf_mining_seed{seed}"), seeds="cam",
                             refine="crf", classifier=str(main_dir / "classifier"), maps_from=str(main_dir / "cams"))
        per_seed[seed] = run_pipeline(cfg)
    table: dict = {}
    for seed, summ in per_seed.items():
        stages = {r["stage"]: r["miou"] for r in summ["stages"]}
        table[str(seed)] = {
            "val_miou_by_round": {str(r): v["miou"] for r, v in summ["val_by_round"].items()},
            "regions_miou_train": {str(r): stages.get(f"round{r}_regions") for r in range(1, rounds + 1)},
            "predictions_miou_train": {str(r): stages.get(f"round{r}_predictions") for r in range(1, rounds + 1)},
        }

    def spread(values: list[float]) -> dict:
        mean, sd = mean_sd(values)
        return {"mean": mean, "std": sd, "n": len(values)}

    over = {f"val_round{r}": spread([t["val_miou_by_round"][str(r)] for t in table.values()]) for r in range(1, rounds + 1)}
    over.update({f"regions_train_round{r}": spread([t["regions_miou_train"][str(r)] for t in table.values()])
                 for r in range(1, rounds + 1)})
    gains = [t["val_miou_by_round"][str(rounds)] - t["val_miou_by_round"]["1"] for t in table.values()]
    over[f"val_round{rounds}_minus_round1"] = spread(gains)
    full, _ = full_supervision_miou()
    if full:
        over["ratio_to_full_by_round"] = {str(r): round(over[f"val_round{r}"]["mean"] / full, 4) for r in range(1, rounds + 1)}
    rows = [(seed, *(f"{t['val_miou_by_round'][str(r)]:.4f}" for r in range(1, rounds + 1))) for seed, t in table.items()]
    rows.append(("mean", *(f"{over[f'val_round{r}']['mean']:.4f}" for r in range(1, rounds + 1))))
    print_table(rows, ("seed", *(f"val round {r}" for r in range(1, rounds + 1))))
    return {"seeds": sorted(per_seed), "split": "val", "per_seed": table, "over_seeds": over,
            "shared": "tag classifier, maps and calibration draw of the main run (seed 0)"}


def retrained_seconds(summary: dict, rounds: range) -> float | None:
    """Seconds of these rounds in the runs that computed them; None where a round's time was not kept."""
    times = [summary["stage_seconds"].get(f"round{r}") for r in rounds]
    return None if any(t is None for t in times) else round(sum(times), 1)


def continue_lr_study(root: Path, common: dict, mult: float, seeds: list[int], rounds: int) -> dict:
    """Round >= 2 segmenters continuing from round 1's at lr x `mult`, for each seed of the seed study: rounds up
    to 1 are copied from that seed's run, so only the later rounds retrain. The choice between the two learning
    rates is read on the calibration images (training images whose masks chose the threshold and trained nothing),
    never on val; val is reported beside it."""
    import statistics

    main_dir = root / "cam_crf_mining"
    table: dict = {}
    for seed in seeds:
        src = main_dir if seed == 0 else root / f"cam_crf_mining_seed{seed}"
        if not (src / "summary.json").exists():
            raise SystemExit(f"{src} has no finished run: run the main benchmark and --seed-study {seed} first.")
        dst = root / f"cam_crf_mining_seed{seed}_continue_lr{mult:g}"
        copy_finished_stages(src, dst, keep_rounds=1)
        shared = {} if seed == 0 else {"classifier": str(main_dir / "classifier"), "maps_from": str(main_dir / "cams")}
        cfg = PipelineConfig(**{**common, "seed": seed}, out=str(dst), seeds="cam", refine="crf", continue_lr_mult=mult,
                             **shared)
        new = run_pipeline(cfg)
        base = json.loads((src / "summary.json").read_text())

        def calib(summ: dict, r: int) -> float | None:
            rows = {row["stage"]: row for row in summ["stages"]}
            return rows.get(f"round{r}_predictions", {}).get("miou_calibration_images")

        table[str(seed)] = {
            "val_round1": base["val_by_round"]["1"]["miou"],
            **{f"val_round{r}_lr_mult_1": base["val_by_round"][str(r)]["miou"] for r in range(2, rounds + 1)},
            **{f"val_round{r}_lr_mult_{mult:g}": new["val_by_round"][str(r)]["miou"] for r in range(2, rounds + 1)},
            "calibration_images_round1_predictions": calib(base, 1),
            **{f"calibration_images_round{r}_predictions_lr_mult_1": calib(base, r) for r in range(2, rounds + 1)},
            **{f"calibration_images_round{r}_predictions_lr_mult_{mult:g}": calib(new, r) for r in range(2, rounds + 1)},
            # Stage times of the run that computed the later rounds (a resumed study would otherwise report the
            # seconds of its own, near-empty, invocation).
            "seconds_rounds_after_1": retrained_seconds(new, range(2, rounds + 1))}

    def mean(key: str) -> float:
        return round(statistics.fmean(t[key] for t in table.values()), 4)

    over = {k: mean(k) for k in next(iter(table.values())) if not k.startswith("seconds")}
    last = f"round{rounds}"
    over[f"val_{last}_lr_mult_{mult:g}_minus_round1"] = round(over[f"val_{last}_lr_mult_{mult:g}"] - over["val_round1"], 4)
    over[f"val_{last}_lr_mult_{mult:g}_minus_lr_mult_1"] = round(
        over[f"val_{last}_lr_mult_{mult:g}"] - over[f"val_{last}_lr_mult_1"], 4)
    better_on_calibration = over[f"calibration_images_{last}_predictions_lr_mult_{mult:g}"] > \
        over[f"calibration_images_{last}_predictions_lr_mult_1"]
    rows = [(seed, f"{t['val_round1']:.4f}", f"{t[f'val_{last}_lr_mult_1']:.4f}", f"{t[f'val_{last}_lr_mult_{mult:g}']:.4f}",
             f"{t[f'calibration_images_{last}_predictions_lr_mult_1']:.4f}",
             f"{t[f'calibration_images_{last}_predictions_lr_mult_{mult:g}']:.4f}") for seed, t in table.items()]
    rows.append(("mean", *(f"{over[k]:.4f}" for k in ("val_round1", f"val_{last}_lr_mult_1", f"val_{last}_lr_mult_{mult:g}",
                                                      f"calibration_images_{last}_predictions_lr_mult_1",
                                                      f"calibration_images_{last}_predictions_lr_mult_{mult:g}"))))
    print_table(rows, ("seed", "val r1", f"val r{rounds} lr x1", f"val r{rounds} lr x{mult:g}",
                       f"calib r{rounds} x1", f"calib r{rounds} x{mult:g}"))
    return {"continue_lr_mult": mult, "seeds": seeds, "split": "val (reported); calibration images of train (choice)",
            "per_seed": table, "over_seeds": over,
            "chosen_on_calibration_images": mult if better_on_calibration else 1.0}


REFINEMENTS = {"crf": "crf", "irn": "irn", "irn_crf": "irn+crf"}  # stage name -> --refine


def scored_and_calibration(folder: Path, ds, calibration: set[str]) -> dict:
    """Pseudo-mask mIoU (IRN's convention) on the scored training images and, apart, on the calibration ones."""
    from frugalseg.weak.crf import evaluate_pseudo_masks

    out = {}
    for name, keep in (("miou", False), ("miou_calibration_images", True)):
        part = ds.with_samples([s for s in ds.samples if (s.id in calibration) == keep])
        out[name] = round(evaluate_pseudo_masks(folder, part, save=False)["miou"], 6) if part.samples else None
    return out


def mined_after(cfg: PipelineConfig, run: Path, stage: str, folder: Path, ds, inputs):
    """Round-1 MCOF mining of one refinement's masks (what a run with that --refine mines first), written to
    <run>/mining_after/<stage>/ under a temporary name; kept once complete (a rerun skips it)."""
    import shutil

    from frugalseg.stages import pipeline

    out = run / "mining_after" / stage
    if (out / "COMPLETE").exists():
        return out, inputs
    inputs = inputs or pipeline.MiningInputs(cfg, ds)
    regions, stats = pipeline.mine_regions(cfg, 1, ds, inputs, pipeline.read_masks(folder, ds), source=folder)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.write_masks(tmp, ds, regions)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1, default=str))
    (tmp / "COMPLETE").write_text("")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out, inputs


#: One small record per finished run of the IRN study (figures + the settings that made them, committed): run
#: folders do not outlive a working copy, these records do, so the study's seeds can be finished over several
#: sessions and a finished run is never redone.
RUN_RECORDS = RESULTS / "tags_to_model_runs"


def config_settings(cfg, root: Path) -> dict:
    """What made a run: every field of its (dataclass) config except where it goes and how it reports; paths
    under the study's folder `root` written relative to it (`<runs>/...`), so a record outlives the folder."""
    import dataclasses

    text = json.dumps({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                       if f.name not in ("out", "progress", "resume")}, default=str)
    return json.loads(text.replace(json.dumps(str(root))[1:-1], "<runs>"))


def config_defaults(cfg) -> dict:
    """The defaults of `cfg`'s fields (those that have one): `recorded` keeps a record made before a field existed."""
    import dataclasses

    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cfg)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def run_record(root: Path, name: str, cfg, run) -> dict:
    """The figures of the run of `cfg` called `name`, from its record or `run()` (`common.recorded`; `--quick`
    runs keep no record)."""
    return recorded(RUN_RECORDS, name, config_settings(cfg, root), run, keep=not root.name.endswith("_quick"),
                    defaults=config_defaults(cfg))


def irn_pseudo_masks(root: Path, common: dict, method: str, maps_from: str | None = None, irn_epochs: int = 3) -> dict:
    """Seed, CRF, IRN and IRN + CRF pseudo-masks of one seed method (each also followed by round-1 mining),
    scored on the training images outside the calibration quarter, and on that quarter apart (where the
    refinement for the segmenter rounds is chosen). `irn_epochs` other than the reference's 3 gets its own run
    folder, sharing the classifier and CAMs of the 3-epoch one."""
    from frugalseg.stages import pipeline

    shared = {} if method == "cam" else {"classifier": str(root / "cam_irn" / "classifier")}
    if maps_from:
        shared["maps_from"] = maps_from
    name = f"{method}_irn" + ("" if irn_epochs == 3 else f"_e{irn_epochs}")
    if irn_epochs != 3 and method == "cam":
        shared = {"classifier": str(root / "cam_irn" / "classifier"), "maps_from": str(root / "cam_irn" / "cams")}
    # no segmenter round here: the segmenter schedule is left at the benchmark's, so a --seg-epochs run reuses the record
    seg_epochs = settings(root.name.endswith("_quick"))["seg_epochs"]
    cfg = PipelineConfig(**{**common, "rounds": 0, "seg_epochs": seg_epochs}, out=str(root / name), seeds=method,
                         refine="irn+crf",
                         irn_epochs=irn_epochs, **shared)

    def measure() -> dict:
        t0 = time.time()
        summ = run_pipeline(cfg)
        ds = pipeline.open_training_images(cfg)
        calibration = set(json.loads((root / name / "calibration.json").read_text())["ids"])
        rows = {r["stage"]: r for r in summ["stages"]}
        table: dict = {}
        inputs = None
        for stage in ("seed", *REFINEMENTS):
            folder = Path(rows[stage]["folder"])
            table[stage] = {"miou": rows[stage]["miou"],
                            "miou_calibration_images": rows[stage]["miou_calibration_images"]}
            mined, inputs = mined_after(cfg, root / name, stage, folder, ds, inputs)
            table[f"{stage}+mining"] = scored_and_calibration(mined, ds, calibration)
            print(f"  {method} {stage}: {table[stage]['miou']:.4f}, +mining {table[stage + '+mining']['miou']:.4f} "
                  f"(calibration images {table[stage + '+mining']['miou_calibration_images']:.4f})", flush=True)
        irn_th = json.loads((root / name / "irn" / "threshold.json").read_text())
        train = json.loads((root / name / "irn" / "train.json").read_text())
        return {"pseudo_mask_miou": table, "split": "train (calibration images excluded; their figure apart)",
                "scored_images": summ["scored_images"], "calibration_images": len(calibration),
                "thresholds": summ["thresholds"], "irn_bg_threshold": irn_th["bg_threshold"],
                "irn_bg_chosen_on": irn_th["chosen_on"], "stage_seconds": summ["stage_seconds"],
                "irn_epochs": irn_epochs, "irn_steps": train["steps"], "irn_loss_first": train["loss_first"],
                "irn_loss_last": train["loss_last"],
                "seconds_this_call": round(time.time() - t0, 1)}

    return run_record(root, f"pseudo_masks.{name}", cfg, measure)


def chosen_refinement(table: dict) -> str:
    """The --refine whose mined regions score best on the calibration images (never on the scored images or val)."""
    best = max(REFINEMENTS, key=lambda st: table[f"{st}+mining"]["miou_calibration_images"])
    return REFINEMENTS[best]


def irn_segmenters(root: Path, common: dict, refine: str, seeds: list[int]) -> dict:
    """The whole pipeline with `refine`, one run per training seed (classifier and maps of the IRN study shared;
    the CRF, IRN, mining rounds and segmenters train with the seed); each run's model is its best round on the
    calibration images. Each finished seed is kept as a record (`recorded`)."""
    per_seed = {}
    tag = schedule_tag(root, common)
    for seed in seeds:
        out = root / f"cam_{refine.replace('+', '_')}{tag}_seed{seed}"
        cfg = PipelineConfig(**{**common, "seed": seed}, out=str(out), seeds="cam", refine=refine,
                             classifier=str(root / "cam_irn" / "classifier"), maps_from=str(root / "cam_irn" / "cams"))

        def measure(cfg=cfg) -> dict:
            ensure_shared_maps(root, common)
            summ = run_pipeline(cfg)
            stages = {r["stage"]: r["miou"] for r in summ["stages"]}
            return {"val_miou": summ["final_val_miou"], "final_round": summ["final_round"],
                    "val_miou_by_round": {r: v["miou"] for r, v in summ["val_by_round"].items()},
                    "calibration_miou_by_round": summ["round_choice"]["calibration_miou_by_round"],
                    # the shared maps' seeds as this run scored them: equal in every seed's record unless the
                    # shared classifier and maps were recomputed differently in between
                    "seed_stage_miou": stages.get("seed"), "pseudo_mask_miou": stages,
                    "seconds": summ["seconds"], "stage_seconds": summ["stage_seconds"]}

        per_seed[str(seed)] = run_record(root, f"segmenter.cam_{refine.replace('+', '_')}{tag}.seed{seed}", cfg,
                                        measure)
        fig = per_seed[str(seed)]
        print(f"  seed {seed}: val mIoU {fig['val_miou']:.4f} (round {fig['final_round']} chosen on "
              f"calibration images)", flush=True)
    kept = {fig["seed_stage_miou"] for fig in per_seed.values()}
    if len(kept) > 1:
        print(f"  warning: the seeds' runs scored the shared CAM seeds differently ({sorted(kept)}): the shared "
              "classifier and maps were recomputed with another result between them", flush=True)
    return per_seed


def schedule_tag(root: Path, common: dict) -> str:
    """'' for the benchmark's segmenter schedule (--quick's in a quick study folder), '_se<N>' for another
    --seg-epochs (its runs and records apart)."""
    default = settings(root.name.endswith("_quick"))["seg_epochs"]
    return "" if common["seg_epochs"] == default else f"_se{common['seg_epochs']}"


def ensure_shared_maps(root: Path, common: dict) -> None:
    """The tag classifier and CAMs that every seed's run shares (`cam_irn`), made (or resumed) if this working
    copy lacks them; the IRN study's own figures come from its record."""
    if (root / "cam_irn" / "classifier").exists() and (root / "cam_irn" / "cams").exists():
        return
    run_pipeline(PipelineConfig(**{**common, "rounds": 0}, out=str(root / "cam_irn"), seeds="cam", refine="crf"))


def full_supervision_seeds(root: Path, common: dict, seeds: list[int]) -> dict:
    """The same segmenter (OCR on lite0, ImageNet weights) on the training masks, for each seed, with the
    tags-only run's total segmenter epochs (rounds x seg_epochs: its chosen round may have continued from the one
    before); val mIoU per seed, each finished seed kept as a record."""
    from frugalseg.stages.pipeline import segmenter_config
    from frugalseg.stages.train import train

    per_seed = {}
    epochs = common["seg_epochs"] * max(1, common["rounds"])
    for seed in seeds:
        out = root / f"full_supervision{schedule_tag(root, common)}_seed{seed}"
        cfg = PipelineConfig(**{**common, "seed": seed}, out=str(root / "unused"))
        train_cfg = segmenter_config(cfg, out, epochs=epochs)

        def measure(train_cfg=train_cfg, out=out) -> dict:
            t0 = time.time()
            train(train_cfg)
            metrics = json.loads((out / "metrics" / "val.json").read_text())
            return {"val_miou": metrics["miou"], "epochs": epochs, "seconds_this_call": round(time.time() - t0, 1)}

        per_seed[str(seed)] = run_record(root, f"full_supervision{schedule_tag(root, common)}.seed{seed}", train_cfg, measure)
        print(f"  full supervision seed {seed}: val mIoU {per_seed[str(seed)]['val_miou']:.4f}", flush=True)
    return per_seed


def irn_study(root: Path, common: dict, seeds: list[int], stage: str, advcam_maps: str | None,
              irn_epochs: int = 3) -> dict:
    """Issue 'tags to model II': IRN pseudo-masks, then (stage 'segmenters') the final segmenter over seeds
    against full supervision over the same seeds. Every step resumes where it stopped."""
    fig: dict = {"irn": {}}
    if irn_epochs != 3:  # a longer IRN training, beside the reference's 3 epochs (kept under its own key)
        print(f"IRN pseudo-masks, CAM seeds, {irn_epochs} IRN epochs:", flush=True)
        return {f"irn_e{irn_epochs}": irn_pseudo_masks(root, common, "cam", irn_epochs=irn_epochs)}
    print("IRN pseudo-masks, CAM seeds:", flush=True)
    cam = irn_pseudo_masks(root, common, "cam")
    fig["irn"]["cam"] = cam
    fig["irn"]["pseudo_mask_miou"] = {k: v["miou"] for k, v in cam["pseudo_mask_miou"].items()}
    if advcam_maps:
        print("IRN pseudo-masks, AdvCAM seeds:", flush=True)
        adv = irn_pseudo_masks(root, common, "advcam", maps_from=advcam_maps)
        fig["irn"]["advcam"] = adv
        fig["irn"]["pseudo_mask_miou_advcam"] = {k: v["miou"] for k, v in adv["pseudo_mask_miou"].items()}
    refine = chosen_refinement(cam["pseudo_mask_miou"])
    fig["irn"]["refine_chosen_on_calibration_images"] = refine
    if stage == "pseudo-masks":
        return fig
    print(f"segmenters with --refine {refine}, seeds {seeds}:", flush=True)
    tags = irn_segmenters(root, common, refine, seeds)
    print(f"full supervision, seeds {seeds}:", flush=True)
    full = full_supervision_seeds(root, common, seeds)
    ratios = [tags[str(k)]["val_miou"] / full[str(k)]["val_miou"] for k in seeds]
    full_mean, full_sd = mean_sd([full[str(k)]["val_miou"] for k in seeds])
    tags_mean, tags_sd = mean_sd([tags[str(k)]["val_miou"] for k in seeds])
    fig["irn"].update({
        "val_miou_per_seed": [tags[str(k)]["val_miou"] for k in seeds], "val_miou_mean": tags_mean,
        "val_miou_sd": tags_sd, "full_val_miou_per_seed": [full[str(k)]["val_miou"] for k in seeds],
        "full_val_miou_mean": full_mean, "full_val_miou_sd": full_sd,
        # the ratio of the means (what a user compares) and the sd of the per-seed ratios (seed k against seed k)
        "ratio_to_full_mean": round(tags_mean / full_mean, 4), "ratio_to_full_sd": mean_sd(ratios)[1],
        "ratio_per_seed": [round(x, 4) for x in ratios], "seeds": seeds, "split": "val",
        "per_seed": tags, "full_per_seed": full})
    return fig


def four_scale_study(root: Path, quick: bool, name: str) -> dict:
    """Four-scale (1.0, 0.5, 1.5, 2.0, each with its flip) CAM vs AdvCAM (the reference's lambda 7, T 27, xi 0.08)
    on every msrc-objects train and val image, with the IRN study's tag classifier (trained on the training
    images' tags only). Each threshold is chosen on train's sweep and applied to val. The image-size map
    convention (stretch vs IRN's stride-16 up-size and crop) is chosen on train with CAM (the cheap method; it
    only changes the final resize) and used for AdvCAM. Resumable image by image; each variant is saved when
    done."""
    from attribution import protocol

    from frugalseg.stages.maps import MapsConfig, make_maps

    clf = root / "cam_irn" / "classifier"
    if not (clf / "model").is_dir():
        raise SystemExit(f"{clf}: no classifier yet; run --irn pseudo-masks first (it trains it).")
    scales = (1.0, 0.5) if quick else (1.0, 0.5, 1.5, 2.0)
    limit = 12 if quick else None
    out = root / "four_scale"
    record = RESULTS / f"{name}.json"  # variants finished by an earlier call are kept, not recomputed
    old = json.loads(record.read_text()).get("figures", {}).get("four_scale", {}) if record.exists() else {}
    fig: dict = {k: v for k, v in old.items() if isinstance(v, dict) and "val_miou" in v}

    def variant(tag: str, method: str, **kw) -> dict:
        if tag in fig:
            return fig[tag]
        t0 = time.time()
        rates = {}
        for split in ("train", "val"):
            m = make_maps(MapsConfig(classifier=str(clf), out=str(out / f"{tag}_{split}"), method=method, split=split,
                                     scales=scales, limit=limit, progress=False, gallery_images=0,
                                     batch_size=4, **kw))
            rates[split] = m["images_per_s_now"]
        res = protocol(out / f"{tag}_train", out / f"{tag}_val")
        res = {k: v for k, v in res.items() if k != "val_sweep"}  # val's own sweep would be an oracle: not kept
        res.update(method=method, scales=list(scales), seconds_this_call=round(time.time() - t0, 1),
                   images_per_s=rates, options=kw, train_best_miou=res["train_sweep"]["best_miou_on_this_split"])
        fig[tag] = res
        print(f"  {tag}: val seed mIoU {res['val_miou']:.4f} at {res['threshold_chosen_on_train']} (chosen on "
              f"train), {res['seconds_this_call']:.0f} s", flush=True)
        save_results(name, {"four_scale": summary()}, {"four_scale": {"scales": list(scales), "limit": limit,
                                                                        "classifier": str(clf)}}, time.time())
        return res

    def summary() -> dict:
        for tag in ("cam", "cam_stride16", "advcam"):
            if tag in fig and all((out / f"{tag}_{split}" / "maps").is_dir() for split in ("train", "val")):
                secs = [seconds_from_write_times(out / f"{tag}_{split}" / "maps") for split in ("train", "val")]
                fig[tag]["seconds_from_map_write_times"] = round(sum(secs), 1)
                fig[tag]["seconds_per_image_from_map_write_times"] = round(
                    sum(secs) / (fig[tag]["train_images"] + fig[tag]["val_images"]), 2)
        out_fig = dict(fig)
        if "cam" in fig and "advcam" in fig:
            out_fig.update(cam_val_miou=fig[cam_tag()]["val_miou"], advcam_val_miou=fig["advcam"]["val_miou"],
                           advcam_minus_cam=round(fig["advcam"]["val_miou"] - fig[cam_tag()]["val_miou"], 4),
                           split="val (thresholds chosen on train)")
        return out_fig

    def cam_tag() -> str:
        return "cam_stride16" if fig.get("high_res_chosen_on_train") == "stride16" else "cam"

    variant("cam", "cam")
    variant("cam_stride16", "cam", high_res="stride16")
    high_res = "stride16" if fig["cam_stride16"]["train_best_miou"] > fig["cam"]["train_best_miou"] else "resize"
    fig["high_res_chosen_on_train"] = high_res
    variant("advcam", "advcam", high_res=high_res)
    return summary()


def seconds_from_write_times(folder: Path, pause: float = 600.0) -> float:
    """The time spent writing a maps folder, from its files' write times: the gaps between consecutive files
    summed, those longer than `pause` left out (a stop between sessions). A maps run resumed across sessions
    reports only its last call's seconds; this counts every call (all but the first batch of each)."""
    times = sorted(p.stat().st_mtime for p in folder.glob("*.npz"))
    return float(sum(b - a for a, b in zip(times, times[1:]) if b - a <= pause))


def calibrated_seed_miou(maps_dir: Path, ds, calibration: set[str]) -> dict:
    """Seed mIoU as the pipeline makes seeds: background threshold chosen on the calibration images' masks,
    applied to the other training images (the figure)."""
    from frugalseg.stages.pipeline import calibrated_threshold
    from frugalseg.weak.seeds import evaluate_seeds, iter_seed_items

    labels = ds.labels
    cal = ds.with_samples([s for s in ds.samples if s.id in calibration])
    rest = ds.with_samples([s for s in ds.samples if s.id not in calibration])
    t, res = calibrated_threshold(maps_dir, cal, "train (calibration images)")
    cal_best = next(r["miou"] for r in res["results"] if r["threshold"] == t)
    scored = evaluate_seeds(iter_seed_items(maps_dir, rest), labels.num_classes, labels.names, labels.background,
                            [t], split="train")
    return {"miou": round(scored["results"][0]["miou"], 6), "threshold": t,
            "calibration_images_miou": round(cal_best, 6), "images": len(rest.samples)}


#: group-study variants: name -> (group size, epochs, graph dropout rate in training, map readouts)
GROUP_VARIANTS = {
    "g3_e4": (3, 4, 0.8, ("mean", "graph", "plain", "mean_gdl_in_eval")),
    "g3_e12": (3, 12, 0.8, ("mean",)),
    "g2_e4": (2, 4, 0.8, ("mean",)),
    "g3_e4_no_graph_dropout": (3, 4, 0.0, ("mean",)),
    "g3_e1": (3, 1, 0.8, ("mean",)),  # the trend in training length, towards the classifier's own CAM (0 epochs)
}


def group_study(root: Path, common: dict, name: str) -> dict:
    """Why group-wise seeds lose to single-image CAM: group networks trained from the IRN study's tag classifier
    with the pipeline's recipe and one change each (group size, training length, graph dropout), and for the
    default one the maps read out four ways (pre-graph = the fine-tuned classifier without the partners'
    messages; post-graph; their mean, the reference; the mean with graph dropout left on while mapping, the
    reference's random maps). Every variant's seeds use a threshold chosen on the calibration images and are
    scored on the other training images, beside CAM seeds of the same classifier on the same images; the
    variant reported as `group_seed_miou` is the best on the calibration images."""
    from frugalseg.stages import pipeline
    from frugalseg.stages.group import GroupConfig, GroupMapsConfig, make_group_maps, train_group_classifier

    base = root / "cam_irn"
    if not (base / "calibration.json").exists():
        raise SystemExit(f"{base}: run --irn pseudo-masks first (its classifier, CAMs and calibration are shared).")
    ds = pipeline.open_training_images(PipelineConfig(**common, out=str(root / "unused")))
    calibration = set(json.loads((base / "calibration.json").read_text())["ids"])
    fig: dict = {"cam": calibrated_seed_miou(base / "cams", ds, calibration), "split": "train (calibration "
                 "images excluded; thresholds chosen on them)", "scales": list(common["scales"])}
    print(f"  cam: {fig['cam']['miou']:.4f}", flush=True)
    # readouts measured in an earlier session (their run folders gone) are kept, when made with today's variant
    saved = json.loads((RESULTS / f"{name}.json").read_text()).get("figures", {}).get("group", {}) \
        if (RESULTS / f"{name}.json").exists() else {}
    for key, entry in saved.items():
        variant = next((v for v in GROUP_VARIANTS if isinstance(entry, dict) and key.startswith(v + "_")
                        and key[len(v) + 1:] in GROUP_VARIANTS[v][3]), None)
        if variant and (entry.get("group_size"), entry.get("epochs"), entry.get("graph_dropout_rate")) == \
                GROUP_VARIANTS[variant][:3]:
            fig[key] = entry
            print(f"  {key}: {entry['miou']:.4f}, measured earlier", flush=True)
    for variant, (size, epochs, drop_rate, readouts) in GROUP_VARIANTS.items():
        if all(f"{variant}_{r}" in fig for r in readouts):
            continue
        gout = root / "group_study" / variant / "group"
        t0 = time.time()
        train_group_classifier(GroupConfig(
            data=common["data"], out=str(gout), train_split=common["train_split"], limit=common["limit"],
            init_classifier=str(base / "classifier"),
            group_size=size, epochs=epochs, drop_rate=drop_rate, progress=False,
            lr_steps=tuple(e for e in (epochs // 3, 2 * epochs // 3) if e > 0),
            resume=(gout / "checkpoints" / "last.ckpt").exists()))
        for readout in readouts:
            key = f"{variant}_{readout}"
            if key in fig:
                continue
            maps = make_group_maps(GroupMapsConfig(
                classifier=str(gout), out=str(root / "group_study" / variant / f"maps_{readout}"),
                split=common["train_split"], limit=common["limit"], scales=tuple(common["scales"]),
                readout=readout.replace("_gdl_in_eval", ""),
                graph_dropout_in_eval=readout.endswith("gdl_in_eval"), progress=False, gallery_images=0))
            fig[key] = {**calibrated_seed_miou(root / "group_study" / variant / f"maps_{readout}", ds, calibration),
                        "group_size": size, "epochs": epochs, "graph_dropout_rate": drop_rate, "readout": readout,
                        "maps_images_per_s": maps["images_per_s_now"], "seconds_this_call": round(time.time() - t0, 1)}
            print(f"  {key}: {fig[key]['miou']:.4f} (calibration images {fig[key]['calibration_images_miou']:.4f})",
                  flush=True)
            save_results(name, {"group": summarise_group(fig)}, {"group": {"variants": {
                k: {"group_size": v[0], "epochs": v[1], "drop_rate": v[2], "readouts": list(v[3])}
                for k, v in GROUP_VARIANTS.items()}}}, time.time())
    return summarise_group(fig)


def summarise_group(fig: dict) -> dict:
    variants = {k: v for k, v in fig.items() if isinstance(v, dict) and "group_size" in v}
    out = dict(fig)
    out["cam_seed_miou"] = fig["cam"]["miou"]
    if "g3_e4_mean" in variants:
        out["default_group_seed_miou"] = variants["g3_e4_mean"]["miou"]
    if variants:
        best = max(variants, key=lambda k: variants[k]["calibration_images_miou"])
        out.update(group_seed_miou=variants[best]["miou"], group_variant_chosen_on_calibration_images=best,
                   group_minus_cam_seed_miou=round(variants[best]["miou"] - fig["cam"]["miou"], 6))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="48 training images, short schedules (minutes here).")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench"))
    ap.add_argument("--skip-group", action="store_true", help="Only the CAM pipeline.")
    ap.add_argument("--ablation-no-mining", action="store_true",
                    help="One round whose segmenter trains on the CRF pseudo-masks as they are (same classifier).")
    ap.add_argument("--ablation-round-seeds", choices=("predictions",),
                    help="The same run with round 2 mining from the round-1 predictions as they are and its segmenter "
                         "started again from ImageNet (MCOF's rounds), instead of the agreement with the round-1 "
                         "regions and a segmenter continuing from round 1's.")
    ap.add_argument("--ablation-segmenter-init", choices=("imagenet",),
                    help="The same run with the round-2 segmenter started from ImageNet weights (MCOF retrains each "
                         "round) instead of continuing from round 1's; rounds 1 and before are copied from the main run.")
    ap.add_argument("--ablation-continue-lr-mult", type=float, metavar="MULT",
                    help="Round >= 2 segmenters continue from round 1's at lr x MULT, for seeds 0 1 2 of the seed study "
                         "(run the main benchmark and --seed-study 1 2 first); the choice is read on calibration images.")
    ap.add_argument("--seed-study", type=int, nargs="+", metavar="SEED",
                    help="Repeat the main run's mining rounds with these seeds (the region classifiers and segmenters "
                         "train with them; the tag classifier, maps and calibration are the main run's) and report "
                         "round-by-round val mIoU per seed and over seeds, the main run's seed 0 included.")
    ap.add_argument("--irn", choices=("pseudo-masks", "segmenters"),
                    help="IRN study: the seed, CRF, IRN and IRN + CRF pseudo-masks of CAM seeds (and of AdvCAM seeds "
                         "with --advcam-maps), each also mined; with 'segmenters', then the whole pipeline with the "
                         "refinement chosen on the calibration images, for each --seeds, against full supervision "
                         "over the same seeds. Resumable step by step.")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training seeds of --irn segmenters.")
    ap.add_argument("--seg-epochs", type=int,
                    help="Segmenter epochs per round for --irn segmenters (full supervision gets rounds x this): a "
                         "CPU schedule shorter than the benchmark's 20, with its runs and records kept apart.")
    ap.add_argument("--irn-epochs", type=int, default=3,
                    help="--irn pseudo-masks with a longer IRN training (the reference: 3 epochs of VOC's 10582 "
                         "images; msrc-objects has 231), saved under irn_e<N>.")
    ap.add_argument("--advcam-maps", help="A four-scale AdvCAM maps folder of the training images made with the "
                                          "IRN study's classifier (--four-scale writes one).")
    ap.add_argument("--four-scale", action="store_true",
                    help="Four-scale CAM vs AdvCAM on every train and val image with the IRN study's classifier "
                         "(thresholds chosen on train, scored on val); resumable image by image.")
    ap.add_argument("--group-study", action="store_true",
                    help="Group-wise seeds against CAM seeds on the same images: group size, training length, graph "
                         "dropout and map readout varied one at a time (run --irn pseudo-masks first).")
    args = ap.parse_args()
    started = time.time()
    s = settings(args.quick)
    if args.seg_epochs:
        if args.irn != "segmenters":  # the other parts' run folders are named for the benchmark's schedule
            ap.error("--seg-epochs applies to --irn segmenters only.")
        s["seg_epochs"] = args.seg_epochs
    root = Path(args.runs) / ("tags_to_model_quick" if args.quick else "tags_to_model")
    common = dict(data="msrc-objects", train_split="train", val_split="val", progress=False, calibration_fraction=0.25,
                  **s)
    if args.ablation_no_mining:
        cfg = PipelineConfig(**{**common, "rounds": 1}, out=str(root / "cam_crf_no_mining"), mining=False,
                             classifier=str(root / "cam_crf_mining" / "classifier"))
        summ = run_pipeline(cfg)
        fig = {"val_miou": summ["final_val_miou"], "rounds": 1, "mining": False, "seconds": summ["seconds"],
               "scored_images": summ["scored_images"],
               "pseudo_mask_miou": {r["stage"]: r["miou"] for r in summ["stages"]}}
        print(f"no mining: segmenter on CRF pseudo-masks, val mIoU {fig['val_miou']:.4f}")
        save_results("tags_to_model_quick" if args.quick else "tags_to_model", {"ablation_no_mining": fig},
                     {"ablation_no_mining": {"rounds": 1, "mining": False}}, started)
        return

    if args.ablation_round_seeds:
        cfg = PipelineConfig(**common, out=str(root / "cam_crf_mining_round_seeds_predictions"), seeds="cam",
                             refine="crf", round_seeds=args.ablation_round_seeds, segmenter_init="imagenet")
        summ = run_pipeline(cfg)
        fig = {"round_seeds": args.ablation_round_seeds, "segmenter_init": "imagenet", "seconds": summ["seconds"],
               "val_miou_by_round": {str(r): v["miou"] for r, v in summ["val_by_round"].items()},
               "pseudo_mask_miou": {r["stage"]: r["miou"] for r in summ["stages"]}, "scored_images": summ["scored_images"]}
        print(f"round seeds = {args.ablation_round_seeds}: val mIoU by round {fig['val_miou_by_round']}")
        save_results("tags_to_model_quick" if args.quick else "tags_to_model", {"ablation_round_seeds_predictions": fig},
                     {"ablation_round_seeds_predictions": {"round_seeds": args.ablation_round_seeds,
                                                             "segmenter_init": "imagenet"}}, started)
        return

    if args.ablation_segmenter_init:
        out = root / f"cam_crf_mining_segmenter_init_{args.ablation_segmenter_init}"
        copy_finished_stages(root / "cam_crf_mining", out, keep_rounds=1)
        cfg = PipelineConfig(**common, out=str(out), seeds="cam", refine="crf", segmenter_init=args.ablation_segmenter_init)
        summ = run_pipeline(cfg)
        fig = {"segmenter_init": args.ablation_segmenter_init, "round_seeds": cfg.round_seeds, "seconds": summ["seconds"],
               "val_miou_by_round": {str(r): v["miou"] for r, v in summ["val_by_round"].items()},
               "pseudo_mask_miou": {r["stage"]: r["miou"] for r in summ["stages"]},
               "pseudo_mask_miou_calibration_images": {r["stage"]: r.get("miou_calibration_images") for r in summ["stages"]},
               "scored_images": summ["scored_images"]}
        print(f"segmenter init = {args.ablation_segmenter_init}: val mIoU by round {fig['val_miou_by_round']}")
        save_results("tags_to_model_quick" if args.quick else "tags_to_model", {"ablation_segmenter_init_imagenet": fig},
                     {"ablation_segmenter_init_imagenet": {"segmenter_init": args.ablation_segmenter_init}}, started)
        return

    if args.ablation_continue_lr_mult:
        name = "tags_to_model_quick" if args.quick else "tags_to_model"
        fig = continue_lr_study(root, common, args.ablation_continue_lr_mult, [0, 1, 2], s["rounds"])
        save_results(name, {"ablation_continue_lr": fig}, {"ablation_continue_lr": {
            "continue_lr_mult": args.ablation_continue_lr_mult, "seeds": [0, 1, 2],
            "shared": "rounds up to 1 of each seed's run"}}, started)
        return

    if args.group_study:
        fig = group_study(root, common, "tags_to_model_quick" if args.quick else "tags_to_model")
        rows = [(k, f"{v['miou']:.4f}", f"{v['calibration_images_miou']:.4f}", v["threshold"])
                for k, v in fig.items() if isinstance(v, dict) and "miou" in v]
        print_table(rows, ("seeds", "train mIoU", "calibration images", "threshold"))
        return

    if args.four_scale:
        name = "tags_to_model_quick" if args.quick else "tags_to_model"
        fig = four_scale_study(root, args.quick, name)
        save_results(name, {"four_scale": fig}, {}, started)
        print(json.dumps({k: v for k, v in fig.items() if not isinstance(v, dict)}, indent=1))
        return

    if args.irn:
        name = "tags_to_model_quick" if args.quick else "tags_to_model"
        fig = irn_study(root, common, args.seeds, args.irn, args.advcam_maps, args.irn_epochs)
        key = next(iter(fig))
        old = RESULTS / f"{name}.json"
        if key == "irn" and old.exists():  # a pseudo-masks run keeps the segmenter figures of an earlier one
            fig["irn"] = {**json.loads(old.read_text())["figures"].get("irn", {}), **fig["irn"]}
        path = save_results(name, fig, {key: {"pipeline": {k: v for k, v in common.items() if k != "progress"},
                                              "seeds": args.seeds, "stage": args.irn,
                                              "irn_epochs": args.irn_epochs}}, started)
        table = (fig["irn"]["cam"] if key == "irn" else fig[key])["pseudo_mask_miou"]
        print_table([(k, f"{v['miou']:.4f}", f"{v['miou_calibration_images']:.4f}") for k, v in table.items()],
                    ("CAM seeds", "train mIoU", "calibration images"))
        print(f"wrote {path} ({time.time() - started:.0f} s)")
        return

    if args.seed_study:
        name = "tags_to_model_quick" if args.quick else "tags_to_model"
        fig = seed_study(root, common, args.seed_study, s["rounds"])
        save_results(name, {"seed_study": fig}, {"seed_study": {"seeds": fig["seeds"], "shared": fig["shared"]}}, started)
        return

    main_cfg = PipelineConfig(out=str(root / "cam_crf_mining"), seeds="cam", refine="crf", **common)
    summary = run_pipeline(main_cfg)
    stages = {r["stage"]: r for r in summary["stages"]}
    figures: dict = {"train_images": summary["train_images"], "val_split": "val",
                     "stages_split": "train (images not used for calibration)", "scored_images": summary["scored_images"],
                     "thresholds": summary["thresholds"]}
    figures["pseudo_mask_miou"] = {name: r["miou"] for name, r in stages.items()}
    figures["pseudo_mask_miou_labelled"] = {name: r["miou_labelled"] for name, r in stages.items()}
    figures["labelled_fraction"] = {name: r["labelled_fraction"] for name, r in stages.items()}
    figures["pseudo_mask_miou_calibration_images"] = {name: r.get("miou_calibration_images") for name, r in stages.items()}
    figures["cam_seed_miou"] = stages["seed"]["miou"]
    figures["crf_miou"] = stages["crf"]["miou"]
    for r in range(1, s["rounds"] + 1):
        figures[f"round{r}_regions_miou"] = stages[f"round{r}_regions"]["miou"]
        figures[f"round{r}_predictions_miou"] = stages[f"round{r}_predictions"]["miou"]
    figures["val_miou_by_round"] = {str(r): v["miou"] for r, v in summary["val_by_round"].items()}
    figures["val_per_class_iou_last_round"] = summary["val_by_round"][max(summary["val_by_round"], key=int)]["per_class"]
    figures["tags_only_val_miou"] = summary["final_val_miou"]
    full, full_src = full_supervision_miou()
    figures["full_supervision_val_miou"] = full
    figures["full_supervision_source"] = full_src
    figures["ratio_to_full"] = round(summary["final_val_miou"] / full, 4) if full else None
    figures["ratio_to_full_by_round"] = {r: round(v / full, 4) for r, v in figures["val_miou_by_round"].items()} if full else None
    figures["stage_seconds"] = summary["stage_seconds"]
    figures["cam_pipeline_seconds"] = summary["seconds"]

    if not args.skip_group:
        group_cfg = PipelineConfig(**{**common, "rounds": 0}, out=str(root / "group_seeds"), seeds="group", refine="none",
                                   classifier=str(root / "cam_crf_mining" / "classifier"))
        gsum = run_pipeline(group_cfg)
        figures["group_seed_miou"] = {r["stage"]: r for r in gsum["stages"]}["seed"]["miou"]
        figures["group_thresholds"] = gsum["thresholds"]
        figures["group_minus_cam_seed_miou"] = round(figures["group_seed_miou"] - figures["cam_seed_miou"], 6)
        figures["group_seconds"] = gsum["seconds"]

    rows = [(name, "train", f"{v:.4f}" if v is not None else "-") for name, v in figures["pseudo_mask_miou"].items()]
    if "group_seed_miou" in figures:
        rows.insert(1, ("group seed", "train", f"{figures['group_seed_miou']:.4f}"))
    rows += [(f"segmenter round {r}", "val", f"{v:.4f}") for r, v in figures["val_miou_by_round"].items()]
    print_table(rows, ("stage", "split", "mIoU"))
    ratio = f"{figures['ratio_to_full']:.3f}" if figures["ratio_to_full"] is not None else "n/a"
    print(f"tags-only val mIoU {figures['tags_only_val_miou']:.4f}; ratio to full supervision {ratio}")
    settings_out = {"pipeline": {k: v for k, v in vars(main_cfg).items() if k not in ("out", "progress")}, "quick": args.quick}
    path = save_results("tags_to_model_quick" if args.quick else "tags_to_model", {"msrc_objects": figures}, settings_out, started)
    print(f"wrote {path} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
