"""The run report and its overlay helpers, on a tiny generated run directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from frugalseg.data.folders import load_folders
from frugalseg.data.io import write_label_png
from frugalseg.data.labels import LabelSpec
from frugalseg.metrics import confusion_matrix, summarise
from frugalseg.report import colourise, overlay, panel, write_report
from frugalseg.report.overlays import VOID_COLOUR, boundary, legend
from frugalseg.runs import RunDir
from frugalseg.stages.train import TrainConfig

H, W = 40, 56


def _square(y: int, x: int, size: int = 16) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[y : y + size, x : x + size] = 1
    return m


def _make_run(tmp_path: Path) -> tuple[Path, object, dict]:
    """3 images with one square each; 'circle' never appears, so its metrics are null.

    Predictions: img0 perfect, img1 misses the square (worst), img2 shifted (in between).
    """
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    (data / "classes.txt").write_text("background\nsquare\ncircle\n")
    rng = np.random.default_rng(0)
    truths = {"img0": _square(8, 10), "img1": _square(12, 30), "img2": _square(20, 4)}
    truths["img0"][0, :] = 255  # a void row: excluded everywhere
    preds = {"img0": truths["img0"].copy(), "img1": np.zeros((H, W), np.uint8), "img2": _square(24, 10)}
    preds["img0"][0, :] = 0
    spec = LabelSpec(names=("background", "square", "circle"))
    for sid, truth in truths.items():
        rgb = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        rgb[truth == 1] = (200, 180, 40)
        Image.fromarray(rgb).save(data / "images" / f"{sid}.png")
        write_label_png(data / "masks" / f"{sid}.png", truth, spec.palette_bytes())
    ds = load_folders(data)

    run = tmp_path / "runs" / "demo"
    for sid, pred in preds.items():
        write_label_png(run / "predictions" / "val" / f"{sid}.png", pred, spec.palette_bytes())
    cm = sum(
        confusion_matrix(torch.from_numpy(preds[s]), torch.from_numpy(truths[s]), 3) for s in truths
    )
    metrics = summarise(cm, ds.labels.names, background=0)
    metrics.update(split="val", dataset="shapes", model="fcn-test", kind="2d")
    (run / "metrics").mkdir()
    (run / "metrics" / "val.json").write_text(json.dumps(metrics, indent=2))
    (run / "budget.json").write_text(json.dumps({"budget": "2 masks", "mask": ["img0", "img1"], "tags": ["img2"], "none": []}))
    # the config exactly as a training run saves it (flat fields); a string that would be markup if not escaped
    RunDir(run).save_config(TrainConfig(data=str(data), out=str(run), arch="fcn", mask_dir="<script>alert(1)</script>"))
    (run / "logs").mkdir()
    (run / "logs" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/miou,val/mean_dice\n"
        "0,9,0.9,,\n0,9,,0.31,0.40\n1,19,0.6,,\n1,19,,0.45,0.52\n2,29,0.4,nan,\n2,29,,0.52,0.60\n"
    )
    return run, ds, metrics


def test_report_contents_gallery_order_and_atomicity(tmp_path: Path) -> None:
    run, ds, metrics = _make_run(tmp_path)
    out = write_report(run, ds=ds, split="val")

    assert out == run / "report.html" and out.exists()
    page = out.read_text()
    for name in ("background", "square", "circle"):
        assert f"{name}</td>" in page or f"{name} <span" in page
    assert json.dumps(metrics["miou"]) in page  # the headline shows the exact JSON value
    assert f"{100 * metrics['miou']:.2f}" in page
    assert metrics["per_class"]["circle"]["iou"] is None
    assert 'title="absent from truth and prediction">—</span>' in page
    assert "shapes" in page and "fcn-test" in page and "2 masks" in page
    assert "arch: fcn" in page and "lr: 0.01" in page  # the resolved config, shown as saved
    assert "<svg" in page and "val/miou" in page and "train/loss" in page  # curves
    assert "&lt;script&gt;" in page and "<script>" not in page  # config escaped

    # gallery: thumbnails exist, are referenced relatively, and appear worst first
    refs = re.findall(r'<img src="(report_assets/[^"]+\.jpg)"', page)
    assert len(refs) == 3 * 4  # image, truth, prediction, errors for each sample
    for ref in refs:
        assert (run / ref).is_file()
    order = [re.search(rf"#\d+ {sid}<", page).start() for sid in ("img1", "img2", "img0")]
    assert order == sorted(order)
    assert "missed:" in page  # img1 missed its square
    assert "1.000" in page  # img0 is perfect (void row excluded)

    leftovers = [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_report_rewrite_prunes_stale_thumbnails(tmp_path: Path) -> None:
    run, ds, _ = _make_run(tmp_path)
    write_report(run, ds=ds, max_images=3)
    write_report(run, ds=ds, max_images=1, title="Second")
    page = (run / "report.html").read_text()
    assert "<h1>Second</h1>" in page
    files = sorted(p.name for p in (run / "report_assets").iterdir())
    assert len(files) == 4 and all("img1" in f for f in files)  # only the worst image remains


def test_report_without_dataset_csv_or_metrics(tmp_path: Path) -> None:
    run = tmp_path / "bare"
    run.mkdir()
    RunDir(run).save_config(TrainConfig(data="voc2012", arch="fcn"))
    page = write_report(run).read_text()
    assert "No metrics/val.json" in page
    assert "dataset: <b>voc2012</b>" in page and "model: <b>fcn</b>" in page  # names from the config's own fields
    assert "report_assets" not in page and "<svg" not in page
    assert not (run / "report_assets").exists()


def test_report_volume_flags_empty_predictions(tmp_path: Path) -> None:
    run = tmp_path / "vol"
    (run / "metrics").mkdir(parents=True)
    cm = torch.tensor([[90, 2, 0], [3, 20, 0], [4, 0, 0]])
    m = summarise(cm, ["background", "LV", "RV"], background=0)
    m.update(
        split="test", dataset="acdc", model="unet", kind="volume",
        surface={"LV": {"hd95": 3.25, "asd": 1.1, "units": "mm", "empty_pred_cases": 0},
                 "RV": {"hd95": None, "asd": None, "units": "mm", "empty_pred_cases": 2}},
        per_case=[{"id": "case01", "dice": {"LV": 0.9, "RV": 0.0}, "hd95": {"LV": 3.0, "RV": None},
                   "asd": {"LV": 1.0, "RV": None}, "empty_pred": {"LV": False, "RV": True}},
                  {"id": "case02", "dice": {"LV": 0.8, "RV": 0.0}, "hd95": {"LV": 3.5, "RV": 0.0},
                   "asd": {"LV": 1.2, "RV": 0.0}, "empty_pred": {"LV": False, "RV": True}}],
    )
    (run / "metrics" / "test.json").write_text(json.dumps(m))
    page = write_report(run, split="test").read_text()
    assert "HD95 (mm)" in page and "3.25" in page
    assert re.search(r'class="value">2</div>', page)  # two empty predictions flagged
    assert page.count(">empty</span>") == 4  # HD95 and ASD cells of both cases, never a 0 distance
    assert page.index("case02") < page.index("case01")  # worst mean Dice first


# ---- overlays ---------------------------------------------------------------------------------
SPEC = LabelSpec(names=("background", "a", "b"))


def _mask() -> np.ndarray:
    m = np.zeros((12, 16), dtype=np.uint8)
    m[2:8, 3:9] = 1
    m[9:, 10:] = 2
    m[0, :] = 255
    return m


def test_colourise_maps_ids_to_palette_and_void_to_neutral() -> None:
    rgb = colourise(_mask(), SPEC)
    assert rgb.shape == (12, 16, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[4, 4]) == tuple(SPEC.palette[1])
    assert tuple(rgb[10, 12]) == tuple(SPEC.palette[2])
    assert tuple(rgb[0, 0]) == VOID_COLOUR and VOID_COLOUR not in SPEC.palette


def test_overlay_rgb_and_float_greyscale() -> None:
    m = _mask()
    rgb = np.full((12, 16, 3), 200, dtype=np.uint8)
    out = overlay(rgb, m, SPEC, alpha=0.5)
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (200, 200, 200)  # void untouched
    assert tuple(out[5, 5]) != (200, 200, 200)  # foreground tinted
    assert tuple(out[2, 3]) == tuple(SPEC.palette[1])  # contour in the class colour

    ct = np.linspace(-1000.0, 3000.0, 12 * 16, dtype=np.float32).reshape(12, 16)
    ct[0, 0] = 1e6  # an outlier the 99th percentile window ignores
    out = overlay(ct, m, SPEC)
    assert out.shape == (12, 16, 3) and out.dtype == np.uint8
    assert out[11, 0].max() > 200  # bright end not washed out by the outlier


def test_boundary_panel_and_legend() -> None:
    edge = boundary(_mask())
    assert edge[2, 3] and not edge[5, 5]
    img = panel([np.zeros((10, 20, 3), np.uint8), np.ones((20, 10), np.float32)], ["x", "y"])
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    with pytest.raises(ValueError):
        panel([np.zeros((4, 4), np.uint8)], ["a", "b"])
    key = legend(SPEC, [1, 2])
    assert key.dtype == np.uint8 and key.shape[2] == 3
