"""Seeds from CAMs on hand-made maps, seed evaluation with hand-computed mIoU, size bins, the gallery."""

from __future__ import annotations

import json

import numpy as np
import pytest

from frugalseg.data.labels import LabelSpec
from frugalseg.errors import DataError
from frugalseg.report.gallery import CamRow, colormap, write_cam_gallery
from frugalseg.weak.maps_io import CamMaps
from frugalseg.weak.seeds import (
    _size_bin,
    choose_threshold,
    evaluate_seeds,
    format_sweep_table,
    seed_from_maps,
    sweep_table,
)

V = 255
NAMES = ("background", "a", "b")


def _cm(keys, high) -> CamMaps:
    high = np.asarray(high, dtype=np.float32)
    return CamMaps(keys=np.asarray(keys), cam=high[:, ::2, ::2], high_res=high)


# ---- seed_from_maps -----------------------------------------------------------------------------
MAP1 = [[0.9, 0.1, 0.0], [0.5, 0.2, 0.25], [0.0, 0.0, 0.3]]
MAP2 = [[0.2, 0.8, 0.0], [0.6, 0.1, 0.0], [0.25, 0.0, 0.3]]


def test_seed_with_background_threshold_plane():
    maps = np.array([MAP1, MAP2])
    seed = seed_from_maps(maps, [1, 2], 0.25, 0)
    # 0.25 equals the threshold -> background (the plane comes first); 0.3 vs 0.3 -> first key
    assert seed.dtype == np.uint8
    assert seed.tolist() == [[1, 2, 0], [2, 0, 0], [0, 0, 1]]
    assert seed_from_maps(maps, [1, 2], 0.5, 0).tolist() == [[1, 2, 0], [2, 0, 0], [0, 0, 0]]
    assert seed_from_maps(maps, [1, 2], 0.1, 0).tolist() == [[1, 2, 0], [2, 1, 1], [2, 0, 1]]
    # background at another index, and an image without tags
    assert seed_from_maps(maps, [1, 2], 0.5, 3).tolist() == [[1, 2, 3], [2, 3, 3], [3, 3, 3]]
    assert (seed_from_maps(np.zeros((0, 3, 3)), [], 0.15, 0) == 0).all()


def test_seed_threshold_compared_in_float32_like_irn():
    maps = np.full((1, 1, 2), 0.15, dtype=np.float32)
    assert seed_from_maps(maps, [1], 0.15, 0).tolist() == [[0, 0]]


def test_seed_without_background_is_argmax_over_tags():
    maps = np.array([MAP1, MAP2])
    seed = seed_from_maps(maps, [2, 0], 0.99, None)  # threshold ignored
    # ties (0.3 vs 0.3, and 0 vs 0 at (0, 2) and (2, 1)) go to the first key
    assert seed.tolist() == [[2, 0, 2], [0, 2, 2], [0, 2, 2]]
    assert (seed_from_maps(np.zeros((0, 3, 3)), [], None, None) == V).all()
    with pytest.raises(ValueError, match=r"3 class id\(s\) but 2 map"):
        seed_from_maps(maps, [1, 2, 3], 0.1, 0)


# ---- evaluate_seeds -----------------------------------------------------------------------------
def _items(log: list[str]):
    """Two scored images, one without truth, one without maps (hand-computed below)."""
    truth_a = np.array([[1, 1, 0, 0], [1, V, 0, 0]], np.uint8)
    maps_a = _cm([1], [[[0.9, 0.4, 0.4, 0.1], [0.3, 0.9, 0.1, 0.1]]])
    truth_b = np.array([[2, 2, 2, 2], [0, 0, 0, 0]], np.uint8)
    maps_b = _cm([2], [[[0.9, 0.9, 0.3, 0.1], [0.3, 0.1, 0.1, 0.1]]])
    for item in [("a", maps_a, truth_a), ("b", maps_b, truth_b), ("c", maps_a, None), ("d", None, truth_a)]:
        log.append(item[0])
        yield item


def test_evaluate_seeds_two_thresholds_one_pass():
    log: list[str] = []
    res = evaluate_seeds(_items(log), 3, NAMES, 0, thresholds=[0.5, 0.2], split="train")
    assert log == ["a", "b", "c", "d"]  # the generator was consumed once for both thresholds
    assert res["images"] == 2 and res["skipped_no_truth"] == 1 and res["skipped_no_maps"] == 1
    assert res["skipped_no_truth_ids"] == ["c"] and res["skipped_no_maps_ids"] == ["d"]
    at = {r["threshold"]: r for r in res["results"]}
    assert [r["threshold"] for r in res["results"]] == [0.2, 0.5]
    # t=0.2: cm rows=truth: bg [6,1,1], a [0,3,0], b [1,0,3] (void pixel excluded)
    ious = at[0.2]["per_class"]
    assert ious["background"]["iou"] == pytest.approx(6 / 9, abs=1e-6)
    assert ious["a"]["iou"] == pytest.approx(3 / 4, abs=1e-6)
    assert ious["b"]["iou"] == pytest.approx(3 / 5, abs=1e-6)
    assert at[0.2]["miou"] == pytest.approx((6 / 9 + 3 / 4 + 3 / 5) / 3, abs=1e-6)
    assert at[0.2]["pixels"] == 15
    # t=0.5: bg [8,0,0], a [2,1,0], b [2,0,2]
    assert at[0.5]["miou"] == pytest.approx((8 / 12 + 1 / 3 + 2 / 4) / 3, abs=1e-6)
    assert choose_threshold(res) == 0.2
    json.dumps(res)  # JSON-ready


def test_sweep_table_names_the_oracle():
    res = evaluate_seeds(_items([]), 3, NAMES, 0, thresholds=[0.2, 0.5], split="train")
    table = sweep_table(res)
    assert table["kind"] == "sweep" and table["split"] == "train"
    assert table["best_threshold_on_this_split"] == 0.2
    assert table["best_miou_on_this_split"] == res["results"][0]["miou"]
    assert [r["threshold"] for r in table["rows"]] == [0.2, 0.5]
    assert set(table["rows"][0]) == {"threshold", "miou", "miou_small", "miou_medium", "miou_large"}
    text = format_sweep_table(table)
    assert "on train" in text and "oracle" in text and "*   0.200" in text
    json.dumps(table)


def test_choose_threshold_ties_and_no_background():
    res = {"results": [{"threshold": 0.3, "miou": 0.5}, {"threshold": 0.1, "miou": 0.5}, {"threshold": 0.2, "miou": 0.4}]}
    assert choose_threshold(res) == 0.1
    truth = np.array([[1, 2]], np.uint8)
    nb = evaluate_seeds([("x", _cm([1, 2], [[[0.9, 0.1]], [[0.2, 0.3]]]), truth)], 3, ("s", "a", "b"), None, [0.1, 0.5])
    assert [r["threshold"] for r in nb["results"]] == [None] and nb["results"][0]["per_class"]["b"]["iou"] == 1.0
    assert choose_threshold(nb) is None and sweep_table(nb)["best_threshold_on_this_split"] is None
    with pytest.raises(ValueError, match="no seed results"):
        choose_threshold({})


def test_size_bins():
    assert [_size_bin(f) for f in (0.0499, 0.05, 0.2, 0.2001)] == ["small", "medium", "medium", "large"]
    # S: 20 void pixels; of the 80 valid, class a covers 2 (2.5 %: small), class b 4 (exactly 5 %: medium)
    ts = np.zeros((10, 10), np.uint8)
    ts[:2] = V
    ts[2, :2] = 1
    ts[3, :4] = 2
    ma, mb = np.zeros((10, 10)), np.zeros((10, 10))
    ma[2, :3] = 1.0  # both a pixels + one false positive
    ma[0, 0] = 1.0  # on void: not judged
    mb[3, :3] = 1.0  # 3 of the 4 b pixels
    # L: class a covers 50 % (large); the map adds 10 false positives
    tl = np.zeros((10, 10), np.uint8)
    tl[:5] = 1
    ml = np.zeros((1, 10, 10))
    ml[0, :6] = 1.0
    items = [("s", _cm([1, 2], [ma, mb]), ts), ("l", _cm([1], ml), tl)]
    by = evaluate_seeds(items, 3, NAMES, 0, [0.5])["results"][0]["by_object_size"]
    assert by["small"]["miou"] == pytest.approx(2 / 3, abs=1e-6) and by["small"]["pairs"] == 1
    assert by["medium"]["miou"] == pytest.approx(3 / 4, abs=1e-6)
    assert by["medium"]["per_class"] == {"b": {"iou": 0.75, "images": 1}}
    assert by["large"]["per_class"]["a"]["iou"] == pytest.approx(50 / 60, abs=1e-6)
    assert by["large"]["miou"] == pytest.approx(50 / 60, abs=1e-6)


def test_evaluate_seeds_errors_name_the_sample():
    truth = np.zeros((2, 2), np.uint8)
    with pytest.raises(DataError, match=r"x: the maps are 2×3 but the mask is 2×2"):
        evaluate_seeds([("x", _cm([1], np.zeros((1, 2, 3))), truth)], 3, NAMES, 0)
    with pytest.raises(DataError, match=r"x: maps are given for class id\(s\) \[0\]"):
        evaluate_seeds([("x", _cm([0], np.zeros((1, 2, 2))), truth)], 3, NAMES, 0)
    truth[0, 0] = 7
    with pytest.raises(DataError, match=r"x: mask holds class ids \[7\] outside 0\.\.2"):
        evaluate_seeds([("x", _cm([1], np.zeros((1, 2, 2))), truth)], 3, NAMES, 0)


# ---- gallery -------------------------------------------------------------------------------------
def test_colormap_endpoints():
    assert colormap(np.array([0.0, 1.0, 2.0])).tolist() == [[68, 1, 84], [253, 231, 37], [253, 231, 37]]


def test_gallery_writes_page_and_assets(tmp_path):
    labels = LabelSpec(names=NAMES)
    rng = np.random.default_rng(0)
    H, W = 16, 20
    rows = []
    for i in range(3):
        high = rng.random((2, H, W)).astype(np.float32)
        truth = rng.integers(0, 3, (H, W)).astype(np.uint8)
        truth[0] = V
        rows.append(CamRow(f"img {i}", rng.integers(0, 255, (H, W, 3), dtype=np.uint8), _cm([1, 2], high), truth))
    rows[1].seed = np.zeros((H, W), np.uint8)
    rows[2] = (rows[2].sample_id, rows[2].image.astype(np.float32) / 255, rows[2].maps)  # tuple, float image, no truth

    out = tmp_path / "report" / "cams.html"
    write_cam_gallery(out, rows, labels, "CAMs <train>", threshold=0.15, summary="seed mIoU 48.3 %")
    html = out.read_text()
    assets = tmp_path / "report" / "cams_assets"
    jpgs = sorted(p.name for p in assets.iterdir())
    assert len(jpgs) == 5 + 5 + 4  # image, 2 heat maps, seed, truth (the last row has no truth)
    for name in jpgs:
        assert f'src="cams_assets/{name}"' in html
    assert "CAMs &lt;train&gt;" in html and "seed mIoU 48.3 %" in html and "<style>" in html
    assert "a (peak" in html and "seed (threshold 0.15)" in html and "ground truth" in html
    assert "<script" not in html and "http" not in html
    leftovers = [p for p in (tmp_path / "report").rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []

    def lazy():  # only max_images rows are read; the rest would fail
        yield rows[0]
        raise AssertionError("read past max_images")

    write_cam_gallery(out, lazy(), labels, "again", max_images=1)
    assert len(list(assets.iterdir())) == 4  # stale thumbnails of the earlier page are pruned (no seed now)
