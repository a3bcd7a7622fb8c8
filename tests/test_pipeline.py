"""`frugalseg run`: the tags-to-model chain on a tiny generated dataset; resume and bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from frugalseg.data import open_dataset
from frugalseg.data.io import read_label_png, write_label_png
from frugalseg.data.labels import LabelSpec
from frugalseg.data.samples import with_mask_folder
from frugalseg.errors import ConfigError, DataError
from frugalseg.export import save_export
from frugalseg.models import build_model
from frugalseg.runs import RunDir
from frugalseg.stages import pipeline
from frugalseg.stages.options import option, unclassified_fields
from frugalseg.stages.pipeline import (
    PipelineConfig,
    mask_file,
    needs_run,
    restart_stage,
    run_pipeline,
    stage_calibrate,
    stage_is_current,
    stage_key,
)
from frugalseg.stages.train import init_weights
from frugalseg.weak.mining import agreement
from frugalseg.weak.seeds import evaluate_seeds, iter_seed_items


def tiny(shapes: Path, out: Path, **kw) -> PipelineConfig:
    base = dict(data=str(shapes), out=str(out), limit=8, classifier_epochs=1, scales=(1.0,), rounds=1, seg_epochs=1,
                crop_size=64, batch_size=4, crf_workers=0, progress=False)
    base.update(kw)
    return PipelineConfig(**base)


def copy_run(src: Path, dst: Path) -> Path:
    """A finished run to change settings on (the shared one stays as it is for the other tests)."""
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def base_run(shapes_dataset, tmp_path_factory) -> tuple[Path, dict]:
    """One finished tags-to-model run (cam seeds, CRF, one mining round; 4 images) that several tests start from."""
    run = tmp_path_factory.mktemp("pipeline") / "base"
    return run, run_pipeline(tiny(shapes_dataset, run, limit=4))


@pytest.fixture(scope="module")
def two_round_run(shapes_dataset, base_run, tmp_path_factory) -> tuple[Path, dict]:
    """The base run continued with a second round (round 1 is current and kept)."""
    run = copy_run(base_run[0], tmp_path_factory.mktemp("pipeline2") / "two_rounds")
    return run, run_pipeline(tiny(shapes_dataset, run, limit=4, rounds=2))


def no_recomputation_before_the_crf(monkeypatch) -> None:
    """The classifier and maps stages would fail if they ran."""
    monkeypatch.setattr("frugalseg.stages.pipeline.train_classifier", lambda *a, **k: pytest.fail("classifier retrained"))
    monkeypatch.setattr("frugalseg.stages.pipeline.make_maps", lambda *a, **k: pytest.fail("maps recomputed"))


def test_run_writes_every_stage_and_resumes_after_an_interrupted_stage(shapes_dataset, tmp_path, monkeypatch):
    cfg = tiny(shapes_dataset, tmp_path / "run", limit=4, mask_fraction=0.5)  # masks + tags
    real_crf = pipeline.stage_crf

    def crash(*args):
        raise KeyboardInterrupt  # killed while refining

    monkeypatch.setattr(pipeline, "stage_crf", crash)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg)
    stages = {p.stem for p in (tmp_path / "run" / "stages").glob("*.done")}
    assert stages == {"classify", "maps", "seeds"}

    # Second call: finished stages are not redone (their functions would fail if called).
    monkeypatch.setattr(pipeline, "stage_crf", real_crf)
    no_recomputation_before_the_crf(monkeypatch)
    summary = run_pipeline(cfg)
    names = [r["stage"] for r in summary["stages"]]
    assert names == ["seed", "crf", "round1_regions", "round1_predictions"]
    for r in summary["stages"]:
        assert 0.0 <= r["miou"] <= 1.0 and r["split"] == "train"
    assert 0.0 <= summary["final_val_miou"] <= 1.0
    run = tmp_path / "run"
    assert len(list((run / "crf").glob("*.png"))) == 4 and len(list((run / "round1" / "predictions").glob("*.png"))) == 4
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["train_images"] == 4
    assert on_disk["val_by_round"] == summary["val_by_round"] and list(summary["val_by_round"]) == ["1"]
    page = (run / "report.html").read_text()
    assert "Pseudo-mask mIoU per stage" in page and page.count("report_assets/") == 4

    # A pseudo-mask never holds a class outside the image's tags (+ background).
    ds = open_dataset(str(shapes_dataset), "train")
    masked = json.loads((run / "budget.json").read_text())["mask"]
    assert len(masked) == 2 and summary["masked_images"] == 2  # half of the 4 images the run uses (limit=4)
    assert set(masked) <= {s.id for s in ds.samples[:4]}
    for sid in masked:  # the budget's masks replace the mined regions of their images
        s = next(x for x in ds.samples if x.id == sid)
        assert (read_label_png(mask_file(run / "round1" / "regions", sid)) == ds.read_mask(s)).all()
    for s in ds.samples[:4]:
        for folder in ("crf", "round1/regions", "round1/predictions"):
            present = set(np.unique(read_label_png(mask_file(run / folder, s.id))).tolist()) - {0, 255}
            assert present <= set(ds.tags_of(s)), (folder, s.id)


def test_a_run_that_differs_only_after_the_maps_reuses_them(shapes_dataset, base_run, tmp_path, monkeypatch):
    run, summary = base_run
    no_recomputation_before_the_crf(monkeypatch)
    reuse = tiny(shapes_dataset, tmp_path / "tags_only", limit=4, rounds=0, classifier=str(run / "classifier"),
                 maps_from=str(run / "cams"))
    again = run_pipeline(reuse)
    assert again["stages"][0]["miou"] == summary["stages"][0]["miou"]  # the same maps give the same seeds
    assert not (tmp_path / "tags_only" / "cams").exists()
    with pytest.raises(ConfigError, match="its maps are 'cam', this run asks for 'advcam'"):
        run_pipeline(tiny(shapes_dataset, tmp_path / "x", limit=4, seeds="advcam", classifier=str(run / "classifier"),
                          maps_from=str(run / "cams")))
    with pytest.raises(ConfigError, match="no maps.json there"):
        run_pipeline(tiny(shapes_dataset, tmp_path / "y", limit=4, classifier=str(run / "classifier"),
                          maps_from=str(run)))


def test_a_changed_setting_redoes_its_stage_and_the_later_ones_only(shapes_dataset, base_run, tmp_path, monkeypatch):
    run = copy_run(base_run[0], tmp_path / "run")
    first = base_run[1]["stage_seconds"]
    before = json.loads((run / "stages" / "crf.done").read_text())
    (run / "round1" / "segmenter" / "stale.txt").write_text("from the old round")
    no_recomputation_before_the_crf(monkeypatch)
    summary = run_pipeline(tiny(shapes_dataset, run, limit=4, fg_threshold=0.5, bg_threshold=0.3))
    after = json.loads((run / "stages" / "crf.done").read_text())
    # skipped stages keep the time of the invocation that ran them
    assert summary["stage_seconds"]["classify"] == first["classify"] and first["classify"] > 0
    assert (before["fg_threshold"], after["fg_threshold"]) == (0.35, 0.5)
    assert not (run / "round1" / "segmenter" / "stale.txt").exists()  # the round was redone from scratch
    assert json.loads((run / "stages" / "round1_predictions.done").read_text())["key"]["fg_threshold"] == 0.5
    assert [r["stage"] for r in summary["stages"]] == ["seed", "crf", "round1_regions", "round1_predictions"]
    # Unchanged settings: nothing is redone (the CRF would fail if called).
    monkeypatch.setattr("frugalseg.stages.pipeline.refine_dataset", lambda *a, **k: pytest.fail("CRF redone"))
    run_pipeline(tiny(shapes_dataset, run, limit=4, fg_threshold=0.5, bg_threshold=0.3))


def test_settings_a_stage_does_not_use_leave_it_current(shapes_dataset, base_run, tmp_path, monkeypatch):
    run = copy_run(base_run[0], tmp_path / "run")
    regions_marker = (run / "stages" / "round1_regions.done").read_text()
    no_recomputation_before_the_crf(monkeypatch)
    monkeypatch.setattr("frugalseg.stages.pipeline.refine_dataset", lambda *a, **k: pytest.fail("CRF redone"))
    monkeypatch.setattr("frugalseg.stages.pipeline.mine_round", lambda *a, **k: pytest.fail("round 1 regions mined again"))
    monkeypatch.setattr("frugalseg.stages.pipeline.train", lambda *a, **k: None)  # a finished segmenter is a no-op
    # Without calibration or a label budget, budget_seed draws nothing: no stage is redone.
    run_pipeline(tiny(shapes_dataset, run, limit=4, budget_seed=3))
    # Round 1's confidence threshold acts on its predictions only: those are redone, its regions kept.
    before = (run / "round1" / "predictions").stat().st_mtime_ns
    run_pipeline(tiny(shapes_dataset, run, limit=4, budget_seed=3, prediction_confidence=0.8))
    assert (run / "stages" / "round1_regions.done").read_text() == regions_marker
    done = json.loads((run / "stages" / "round1_predictions.done").read_text())
    assert done["key"]["prediction_confidence"] == 0.8 and (run / "round1" / "predictions").stat().st_mtime_ns != before


def test_second_round_seeds_are_the_agreement_of_round_one(shapes_dataset, two_round_run):
    run, summary = two_round_run
    assert [r["stage"] for r in summary["stages"]] == ["seed", "crf", "round1_regions", "round1_predictions",
                                                        "round2_seeds", "round2_regions", "round2_predictions"]
    for s in open_dataset(str(shapes_dataset), "train").samples[:4]:
        p, q = (read_label_png(mask_file(run / "round1" / f, s.id)) for f in ("predictions", "regions"))
        assert (read_label_png(mask_file(run / "round2" / "seeds", s.id)) == np.where(p == q, p, 255)).all()
    seg = yaml.safe_load((run / "round2" / "segmenter" / "config.yaml").read_text())
    assert seg["init_from"] == str(run / "round1" / "segmenter" / "model")  # round 2 continues from round 1
    assert yaml.safe_load((run / "round1" / "segmenter" / "config.yaml").read_text())["init_from"] is None


def test_the_run_model_is_the_round_best_on_calibration_masks(shapes_dataset, two_round_run, tmp_path, monkeypatch):
    run, summary = two_round_run
    # no calibration masks: the last round is the model
    assert summary["final_round"] == 2 and summary["round_choice"]["chosen_on"].startswith("last round")
    assert summary["final_val_miou"] == summary["val_by_round"]["2"]["miou"] == summary["last_round_val_miou"]
    assert (run / "model" / "ROUND").read_text().strip() == "2" and (run / "model" / "config.json").exists()
    # with calibration masks, each round's segmenter is scored on them and the best (earliest on a tie) is the model
    run = copy_run(run, tmp_path / "run")
    ds = pipeline.open_training_images(tiny(shapes_dataset, run, limit=4, rounds=2))
    ids = tuple(s.id for s in ds.samples[:2])
    th = pipeline.Thresholds(seed=0.3, fg=0.3, bg=0.1, calibration_ids=ids)
    scored: list[str] = []

    def fake_score(model_dir, cal, device="cpu"):
        scored.append(model_dir.parent.parent.name)
        assert sorted(s.id for s in cal.samples) == sorted(ids)  # the calibration images, nothing else
        return {"round1": 0.61, "round2": 0.55}[model_dir.parent.parent.name]

    monkeypatch.setattr(pipeline, "score_segmenter", fake_score)
    choice = pipeline.pick_best_round(tiny(shapes_dataset, run, limit=4, rounds=2), RunDir(run), ds, th, {})
    assert choice.round == 1 and choice.calibration_miou_by_round == {"1": 0.61, "2": 0.55}
    assert choice.calibration_images == 2 and not choice.calibration_masks_trained
    pipeline.pick_best_round(tiny(shapes_dataset, run, limit=4, rounds=2), RunDir(run), ds, th, {})
    assert scored == ["round1", "round2"]  # kept per round: not scored again
    assert pipeline.publish_model(RunDir(run), 1) == run / "model"
    assert (run / "model" / "ROUND").read_text().strip() == "1" and not (run / "model.tmp").exists()


def test_mcof_round_seeds_redo_round_two_only(shapes_dataset, two_round_run, tmp_path, monkeypatch):
    run = copy_run(two_round_run[0], tmp_path / "run")
    no_recomputation_before_the_crf(monkeypatch)
    # MCOF's own rule: round 2 mines from the predictions as they are; changing it redoes round 2 only.
    marker = run / "stages" / "round1_predictions.done"
    stamp = marker.stat().st_mtime_ns
    again = run_pipeline(tiny(shapes_dataset, run, limit=4, rounds=2, round_seeds="predictions"))
    assert [r["stage"] for r in again["stages"]][4] == "round2_regions"
    assert marker.stat().st_mtime_ns == stamp  # round 1 untouched
    assert json.loads((run / "stages" / "round2_regions.done").read_text())["key"]["round_seeds"] == ["predictions"]


def test_a_slower_continuing_segmenter_redoes_round_two_only(shapes_dataset, two_round_run, tmp_path, monkeypatch):
    run = copy_run(two_round_run[0], tmp_path / "run")
    no_recomputation_before_the_crf(monkeypatch)
    marker = run / "stages" / "round1_predictions.done"
    stamp = marker.stat().st_mtime_ns
    # a continuing segmenter at a tenth of the learning rate: round 2 retrains at lr/10, round 1 stays as it was
    run_pipeline(tiny(shapes_dataset, run, limit=4, rounds=2, continue_lr_mult=0.1))
    lr = {r: yaml.safe_load((run / f"round{r}" / "segmenter" / "config.yaml").read_text())["lr"] for r in (1, 2)}
    assert lr[2] == pytest.approx(lr[1] * 0.1)
    assert json.loads((run / "stages" / "round2_regions.done").read_text())["key"]["continue_lr_mult"] == [0.1]
    assert marker.stat().st_mtime_ns == stamp


def test_run_refuses_a_dataset_without_tags(tmp_path):
    root = tmp_path / "untagged"
    (root / "images").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / "images" / f"im{i}.png")
    (root / "classes.txt").write_text("background\ncat\n")
    with pytest.raises(DataError, match="no image of split 'train' has image-level tags"):
        run_pipeline(PipelineConfig(data=str(root), out=str(tmp_path / "out"), val_split=None))


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="No dataset given"):
        PipelineConfig().validate()
    with pytest.raises(ConfigError, match="bg_threshold <= fg_threshold"):
        PipelineConfig(data="x", fg_threshold=0.1, bg_threshold=0.3).validate()
    with pytest.raises(ConfigError, match="continue_lr_mult must be > 0"):
        PipelineConfig(data="x", continue_lr_mult=0).validate()
    with pytest.raises(ConfigError, match="not a classify run"):
        pipeline.stage_classify(PipelineConfig(data="x", classifier=str(tmp_path)), None)


def test_mask_folder_dataset_keeps_tags_and_skips_missing(shapes_dataset, tmp_path):
    ds = open_dataset(str(shapes_dataset), "train")
    s0, s1 = ds.samples[:2]
    mask = np.full(ds.read_mask(s0).shape, 255, np.uint8)
    mask[:4, :4] = 0
    write_label_png(tmp_path / f"{s0.id}.png", mask, ds.labels.palette_bytes())
    pseudo = with_mask_folder(ds, tmp_path)
    assert [s.id for s in pseudo.samples] == [s0.id]
    assert pseudo.tags_of(pseudo.samples[0]) == ds.tags_of(s0)  # tags of the dataset, not of the pseudo-mask
    assert (pseudo.read_mask(pseudo.samples[0]) == mask).all()
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    with pytest.raises(DataError, match="no mask named after a sample"):
        with_mask_folder(ds, tmp_path)


def test_no_mining_rounds_train_on_the_crf_masks_as_they_are(shapes_dataset, base_run, tmp_path, monkeypatch):
    run = copy_run(base_run[0], tmp_path / "run")
    no_recomputation_before_the_crf(monkeypatch)
    summary = run_pipeline(tiny(shapes_dataset, run, limit=4, mining=False))
    assert [r["stage"] for r in summary["stages"]] == ["seed", "crf", "round1_regions", "round1_predictions"]
    assert not (run / "round1" / "mining_stats.json").exists()
    for s in open_dataset(str(shapes_dataset), "train").samples[:4]:
        assert (read_label_png(mask_file(run / "round1" / "regions", s.id)) == read_label_png(mask_file(run / "crf", s.id))).all()


def test_calibration_chooses_the_threshold_on_a_few_masks_and_scores_the_others(shapes_dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    summary = run_pipeline(tiny(shapes_dataset, run, rounds=0, calibration_fraction=0.25))
    calib = json.loads((run / "calibration.json").read_text())
    assert len(calib["ids"]) == 2 and summary["scored_images"] == 6 and summary["train_images"] == 8
    rows = {r["threshold"]: r["miou"] for r in calib["sweep"]["rows"]}
    best = max(rows.values())
    assert rows[calib["seed_threshold"]] == best  # the best threshold of the sweep on the calibration images ...
    assert calib["seed_threshold"] == min(t for t, v in rows.items() if v == best)  # ... ties to the lowest
    assert calib["fg_threshold"] == calib["seed_threshold"]
    assert calib["bg_threshold"] == pytest.approx(max(0.0, calib["seed_threshold"] - 0.2))
    assert summary["thresholds"] == {"seed": calib["seed_threshold"], "fg": calib["fg_threshold"],
                                     "bg": calib["bg_threshold"], "calibration_images": 2}
    assert json.loads((run / "stages" / "seeds.done").read_text())["threshold"] == calib["seed_threshold"]
    assert json.loads((run / "stages" / "crf.done").read_text())["fg_threshold"] == calib["fg_threshold"]
    # The seed figure is the seed mIoU of the six other images at the chosen threshold.
    ds = open_dataset(str(shapes_dataset), "train")
    others = ds.with_samples([s for s in ds.samples[:8] if s.id not in calib["ids"]])
    ref = evaluate_seeds(iter_seed_items(run / "cams", others), ds.labels.num_classes, ds.labels.names,
                         ds.labels.background, (calib["seed_threshold"],))
    assert summary["stages"][0]["miou"] == pytest.approx(ref["results"][0]["miou"], abs=1e-6)
    assert "calibration images whose masks" in (run / "report.html").read_text()
    assert 0.0 <= summary["stages"][0]["miou_calibration_images"] <= 1.0

    with pytest.raises(ConfigError, match="calibration_fraction must be in"):
        tiny(shapes_dataset, run, calibration_fraction=1.0).validate()


def test_calibration_needs_masks_and_a_background_class(shapes_dataset, tmp_path):
    cfg = tiny(shapes_dataset, tmp_path / "run", calibration_fraction=0.5)
    ds = pipeline.open_training_images(cfg)
    no_masks = ds.with_samples([dataclasses_replace(s, mask=None) for s in ds.samples])
    with pytest.raises(DataError, match="needs masks on 4 of the 8 training images"):
        stage_calibrate(cfg, RunDir(tmp_path / "run"), tmp_path, no_masks)


def dataclasses_replace(sample, **kw):
    return dataclasses.replace(sample, **kw)


def test_agreement_keeps_only_pixels_where_prediction_and_region_agree():
    pred = {"a": np.array([[0, 1], [2, 255]], np.uint8)}
    region = {"a": np.array([[0, 2], [2, 255]], np.uint8)}
    assert agreement(pred, region)["a"].tolist() == [[0, 255], [2, 255]]
    with pytest.raises(DataError, match="no mined region mask for b"):
        agreement({"b": pred["a"]}, region)


def test_init_from_loads_every_weight_and_names_a_different_network(tmp_path):
    spec = {"arch": "fcn", "num_classes": 3, "in_chans": 3, "backbone": "tf_efficientnet_lite0", "output_stride": 16,
            "aux_stage": "penultimate"}
    torch.manual_seed(0)
    source = build_model(spec, pretrained=False)
    save_export(source, spec, LabelSpec(("background", "a", "b")), tmp_path / "model")
    target = build_model(spec, pretrained=False)
    init_weights(target, spec, tmp_path / "model")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="a different network \\(num_classes 3 there vs 5 here\\)"):
        init_weights(build_model({**spec, "num_classes": 5}), {**spec, "num_classes": 5}, tmp_path / "model")
    with pytest.raises(ConfigError, match="no such export folder"):
        init_weights(target, spec, tmp_path / "nothing")


def test_a_marker_holding_a_retired_field_still_matches(tmp_path):
    run = RunDir(tmp_path / "run")
    run.mark_done("crf", key={"fg": 0.5, "budget_seed": 0})  # written before budget_seed left this key
    assert run.stage_done("crf", {"fg": 0.5}, retired=("budget_seed",))
    assert not run.stage_done("crf", {"fg": 0.5})  # not retired: a different key
    assert not run.stage_done("crf", {"fg": 0.5, "budget_seed": 1}, retired=("budget_seed",))  # in the key: compared
    assert not run.stage_done("crf", {"fg": 0.6}, retired=("budget_seed",))
    assert run.stage_made_with_other_settings("crf", {"fg": 0.6}, retired=("budget_seed",))
    assert not run.stage_made_with_other_settings("crf", {"fg": 0.5}, retired=("budget_seed",))


def test_partial_outputs_of_a_killed_stage_are_dropped_when_the_settings_changed(tmp_path):
    run = RunDir(tmp_path / "run")
    out = tmp_path / "run" / "crf"
    assert not stage_is_current(run, "crf", {"fg": 0.5})
    assert needs_run(run, "crf", {"fg": 0.5}, out)  # about to run: the settings are noted
    out.mkdir()
    (out / "a.png").write_text("half-made at fg 0.5")  # ... and the run is killed here
    assert needs_run(run, "crf", {"fg": 0.5}, out) and (out / "a.png").exists()  # same settings: resume
    assert not stage_is_current(run, "crf", {"fg": 0.6}) and out.exists()  # the predicate removes nothing
    restart_stage(run, "crf", {"fg": 0.6}, out)
    assert not out.exists()  # other settings: start clean
    run.mark_done("crf", key={"fg": 0.6})
    assert stage_is_current(run, "crf", {"fg": 0.6}) and not needs_run(run, "crf", {"fg": 0.6}, out)
    out.mkdir()
    restart_stage(run, "crf", {"fg": 0.7}, out)  # a finished stage with other settings: outputs and marker go
    assert not out.exists() and not run.stage_done("crf")


# ---- cache keys: every field says which stage's output it changes -----------------------------------------------
# The keys as they were written by hand before they were derived from the fields (markers of existing runs hold
# them): a change here redoes finished runs, so it must be deliberate.
DATA = {"data", "train_split", "background_classes", "ignore_classes", "seed", "precision"}
EXPECTED_KEYS = {"classify": DATA | {"classifier", "classifier_epochs"}}
EXPECTED_KEYS["group"] = EXPECTED_KEYS["classify"] | {"limit", "group_size", "group_epochs"}
EXPECTED_KEYS["maps"] = EXPECTED_KEYS["group"] | {"seeds", "maps_from", "scales", "steps", "restriction"}
EXPECTED_KEYS["calibrate"] = EXPECTED_KEYS["maps"] | {"calibration_fraction", "budget_seed", "mask_fraction",
                                                      "fg_threshold", "bg_threshold"}
EXPECTED_KEYS["seeds"] = EXPECTED_KEYS["calibrate"]
EXPECTED_KEYS["crf"] = EXPECTED_KEYS["calibrate"] | {"refine"}
EXPECTED_KEYS["round"] = EXPECTED_KEYS["crf"] | {"superpixel_method", "min_coverage", "mining", "expand_only",
                                                 "mining_confidence", "region_class_balanced", "seg_arch",
                                                 "seg_epochs", "crop_size", "batch_size", "lr"}


def test_every_pipeline_field_says_which_stage_it_changes():
    assert unclassified_fields(PipelineConfig) == []

    @dataclasses.dataclass
    class WithANewField(PipelineConfig):
        new_threshold: float = option(0.5, "A setting someone added without a stage.")

    assert unclassified_fields(WithANewField) == ["new_threshold"]
    with pytest.raises(ConfigError, match=r"\['new_threshold'\] declare no stage"):
        stage_key(WithANewField(data="x"), "crf")


def test_stage_keys_are_the_fields_of_the_stage_and_every_stage_before_it():
    cfg = PipelineConfig(data="x", mask_fraction=0.5)  # something is drawn: budget_seed counts
    for stage, expected in EXPECTED_KEYS.items():
        assert set(stage_key(cfg, stage)) == expected, stage
    assert "budget_seed" not in stage_key(PipelineConfig(data="x"), "crf")  # nothing drawn
    assert stage_key(cfg, "classify", prm=True)["prm"] is True
    # IRN's settings key the irn stage and every later one, but only in runs that use IRN
    irn = dataclasses.replace(cfg, refine="irn")
    assert set(stage_key(irn, "irn")) == EXPECTED_KEYS["crf"] | set(pipeline.IRN_FIELDS)
    assert set(pipeline.IRN_FIELDS) <= set(stage_key(irn, "round"))
    assert set(stage_key(cfg, "irn")) == EXPECTED_KEYS["crf"]

    class FakeLabels:
        background = 0

    ds = type("FakeDataset", (), {"labels": FakeLabels()})()
    one = pipeline.round_key(cfg, 1, ds)
    assert set(one) == EXPECTED_KEYS["round"] | {"round", "saliency"} and one["saliency"] == [True]
    two = pipeline.round_key(dataclasses.replace(cfg, continue_lr_mult=0.1), 2, ds)
    assert set(two) == EXPECTED_KEYS["round"] | {"round", "saliency", "round_seeds", "segmenter_init",
                                                 "prediction_confidence", "continue_lr_mult"}
    assert two["saliency"] == [True, False] and two["continue_lr_mult"] == [0.1]
    assert set(pipeline.predictions_key(cfg, 1, ds)) == set(one) | {"prediction_confidence"}
    # the fields outside every key change no cached output, or enter the round keys in their own shape
    keyed = (set().union(*EXPECTED_KEYS.values()) | {"prediction_confidence"} | set(pipeline.PER_ROUND_FIELDS)
             | set(pipeline.IRN_FIELDS))
    unkeyed = {f.name for f in dataclasses.fields(PipelineConfig)} - keyed
    assert unkeyed == {"out", "val_split", "crf_workers", "devices", "strategy", "num_workers", "resume", "progress"}


def test_calibration_with_a_label_budget_uses_the_budget_masks(shapes_dataset, tmp_path):
    run = tmp_path / "run"
    summary = run_pipeline(tiny(shapes_dataset, run, rounds=0, mask_fraction=0.25, calibration_fraction=0.25))
    calib = json.loads((run / "calibration.json").read_text())["ids"]
    assert sorted(calib) == sorted(json.loads((run / "budget.json").read_text())["mask"])
    assert summary["scored_images"] == 6
    with pytest.raises(DataError, match="within the label budget"):  # (the classifier and maps of the first run)
        run_pipeline(tiny(shapes_dataset, tmp_path / "more", rounds=0, mask_fraction=0.25, calibration_fraction=0.5,
                          classifier=str(run / "classifier"), maps_from=str(run / "cams")))


def test_irn_refinement_stage_and_its_resume(shapes_dataset, base_run, tmp_path, monkeypatch):
    run = copy_run(base_run[0], tmp_path / "run")
    no_recomputation_before_the_crf(monkeypatch)
    cfg = tiny(shapes_dataset, run, limit=4, refine="irn+crf", irn_epochs=1, irn_crop=64, irn_batch_size=2,
               irn_steps=8)
    summary = run_pipeline(cfg)
    names = [r["stage"] for r in summary["stages"]]
    assert names == ["seed", "crf", "irn", "irn_crf", "round1_regions", "round1_predictions"]
    ds = open_dataset(shapes_dataset, "train")
    for folder in ("irn", "irn_crf"):
        masks = sorted((run / folder).glob("*.png"))
        assert len(masks) == 4
        m = read_label_png(masks[0])
        assert m.shape == (64, 64) and set(np.unique(m)) <= set(range(len(ds.labels.names))) | {255}
    assert (run / "irn" / "net.pt").exists() and len(list((run / "irn" / "walk").glob("*.npz"))) == 4
    th = json.loads((run / "irn" / "threshold.json").read_text())
    assert th["bg_threshold"] == 0.25 and th["chosen_on"] == "default"  # no calibration masks in this run
    key = json.loads((run / "stages" / "irn.done").read_text())["key"]
    assert key["irn_steps"] == 8 and key["refine"] == "irn+crf"
    # IRN's settings are not in the keys of runs without IRN: the base run's markers hold none of them
    assert not any(k.startswith("irn_") for k in json.loads((base_run[0] / "stages" / "crf.done").read_text())["key"])
    # finished: nothing is trained or walked again
    with monkeypatch.context() as m:
        m.setattr("frugalseg.weak.irn.train_irn", lambda *a, **k: pytest.fail("IRN retrained"))
        m.setattr("frugalseg.stages.pipeline.refine_dataset", lambda *a, **k: pytest.fail("CRF redone"))
        run_pipeline(cfg)
    # with calibration masks the walked maps' background level is chosen on them, from a sweep
    run_pipeline(dataclasses.replace(cfg, calibration_fraction=0.5))
    th = json.loads((run / "irn" / "threshold.json").read_text())
    assert th["chosen_on"] == "calibration images" and th["bg_threshold"] in [float(t) for t in th["calibration_sweep"]]
    summary = json.loads((run / "summary.json").read_text())  # the one round, scored on the calibration masks
    assert summary["round_choice"]["chosen_on"] == "calibration images" and summary["final_round"] == 1
    assert 0 <= summary["round_choice"]["calibration_miou_by_round"]["1"] <= 1
