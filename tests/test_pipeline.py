"""`frugalseg run`: the tags-to-model chain on a tiny generated dataset; resume and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from frugalseg.errors import ConfigError, DataError
from frugalseg.weak import pipeline
from frugalseg.weak.pipeline import PipelineConfig, run_pipeline


def tiny(shapes: Path, out: Path, **kw) -> PipelineConfig:
    base = dict(data=str(shapes), out=str(out), limit=8, classifier_epochs=1, scales=(1.0,), rounds=1, seg_epochs=1,
                crop_size=64, batch_size=4, crf_workers=0, progress=False)
    base.update(kw)
    return PipelineConfig(**base)


def test_run_writes_every_stage_and_resumes_after_an_interrupted_stage(shapes_dataset, tmp_path, monkeypatch):
    cfg = tiny(shapes_dataset, tmp_path / "run", mask_fraction=0.25)  # masks + tags
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
    monkeypatch.setattr("frugalseg.weak.classify.train_classifier", lambda *a, **k: pytest.fail("classifier retrained"))
    monkeypatch.setattr("frugalseg.weak.maps_stage.make_maps", lambda *a, **k: pytest.fail("maps recomputed"))
    summary = run_pipeline(cfg)
    names = [r["stage"] for r in summary["stages"]]
    assert names == ["seed", "crf", "round1_regions", "round1_predictions"]
    for r in summary["stages"]:
        assert 0.0 <= r["miou"] <= 1.0 and r["split"] == "train"
    assert 0.0 <= summary["final_val_miou"] <= 1.0
    run = tmp_path / "run"
    assert len(list((run / "crf").glob("*.png"))) == 8 and len(list((run / "round1" / "predictions").glob("*.png"))) == 8
    assert json.loads((run / "summary.json").read_text())["train_images"] == 8
    page = (run / "report.html").read_text()
    assert "Pseudo-mask mIoU per stage" in page and page.count("report_assets/") == 8

    # A pseudo-mask never holds a class outside the image's tags (+ background).
    from frugalseg.data import open_dataset
    from frugalseg.data.io import read_label_png
    from frugalseg.weak.pipeline import mask_file

    ds = open_dataset(str(shapes_dataset), "train")
    masked = json.loads((run / "budget.json").read_text())["mask"]
    assert len(masked) == 2 and summary["masked_images"] == 2  # 25 % of the 8 images the run uses (limit=8)
    assert set(masked) <= {s.id for s in ds.samples[:8]}
    for sid in masked:  # the budget's masks replace the mined regions of their images
        s = next(x for x in ds.samples if x.id == sid)
        assert (read_label_png(mask_file(run / "round1" / "regions", sid)) == ds.read_mask(s)).all()
    for s in ds.samples[:8]:
        for folder in ("crf", "round1/regions", "round1/predictions"):
            present = set(np.unique(read_label_png(mask_file(run / folder, s.id))).tolist()) - {0, 255}
            assert present <= set(ds.tags_of(s)), (folder, s.id)

    # A second run that differs only after the maps (tags only) reuses them (make_maps is still a failure).
    reuse = tiny(shapes_dataset, tmp_path / "tags_only", rounds=0, classifier=str(run / "classifier"),
                 maps_from=str(run / "cams"))
    again = run_pipeline(reuse)
    assert again["stages"][0]["miou"] == summary["stages"][0]["miou"]  # the same maps give the same seeds
    assert not (tmp_path / "tags_only" / "cams").exists()
    with pytest.raises(ConfigError, match="its maps are 'cam', this run asks for 'advcam'"):
        run_pipeline(tiny(shapes_dataset, tmp_path / "x", seeds="advcam", classifier=str(run / "classifier"),
                          maps_from=str(run / "cams")))
    with pytest.raises(ConfigError, match="no maps.json there"):
        run_pipeline(tiny(shapes_dataset, tmp_path / "y", classifier=str(run / "classifier"), maps_from=str(run)))


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
    with pytest.raises(ConfigError, match="not a classify run"):
        pipeline.stage_classify(PipelineConfig(data="x", classifier=str(tmp_path)), None)


def test_mask_folder_dataset_keeps_tags_and_skips_missing(shapes_dataset, tmp_path):
    from frugalseg.data import open_dataset
    from frugalseg.data.io import write_label_png
    from frugalseg.data.samples import with_mask_folder

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


def test_no_mining_rounds_train_on_the_crf_masks_as_they_are(shapes_dataset, tmp_path):
    from frugalseg.data import open_dataset
    from frugalseg.data.io import read_label_png
    from frugalseg.weak.pipeline import mask_file

    run = tmp_path / "run"
    summary = run_pipeline(tiny(shapes_dataset, run, limit=4, mining=False))
    assert [r["stage"] for r in summary["stages"]] == ["seed", "crf", "round1_regions", "round1_predictions"]
    assert not (run / "round1" / "mining_stats.json").exists()
    for s in open_dataset(str(shapes_dataset), "train").samples[:4]:
        assert (read_label_png(mask_file(run / "round1" / "regions", s.id)) == read_label_png(mask_file(run / "crf", s.id))).all()
