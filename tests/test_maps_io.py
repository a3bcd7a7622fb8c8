"""CAM map files: round trip, atomic writes, and every load error with its message."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from frugalseg.data.io import safe_name
from frugalseg.errors import DataError
from frugalseg.weak.maps_io import CamMaps, load_maps, maps_path, save_maps


def _maps(n: int = 2, h: int = 4, w: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = np.arange(1, n + 1)
    return keys, rng.random((n, h // 2 + 1, w // 2 + 1)), rng.random((n, h, w))


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_round_trip_float16_and_meta(tmp_path):
    keys, cam, high = _maps()
    high[0, 0, 0], high[1, 0, 0] = 1.0, 0.0
    path = save_maps(maps_path(tmp_path, "2007_000032"), keys, cam, high, method="cam", scales=[1.0, 0.5])
    assert path == tmp_path / "maps" / "2007_000032.npz" and path.exists()
    got = load_maps(path, image_size=(4, 5), num_classes=3)
    assert isinstance(got, CamMaps)
    assert got.keys.tolist() == [1, 2] and got.cam.dtype == np.float32 and got.high_res.dtype == np.float32
    np.testing.assert_allclose(got.high_res, high, atol=5e-4)  # float16: step <= 2^-11 in [0, 1]
    np.testing.assert_allclose(got.cam, cam, atol=5e-4)
    assert got.high_res[0, 0, 0] == 1.0 and got.high_res[1, 0, 0] == 0.0
    assert got.meta == {"method": "cam", "scales": [1.0, 0.5]}
    assert got.image_size == (4, 5) and len(got) == 2
    np.testing.assert_array_equal(got.map_of(2), got.high_res[1])
    with np.load(path) as z:
        assert z["high_res"].dtype == np.float16 and z["cam"].dtype == np.float16
    assert _leftovers(path.parent) == []


def test_save_without_npz_suffix_and_no_tags(tmp_path):
    path = save_maps(tmp_path / "plain_name", np.zeros(0, int), np.zeros((0, 2, 2)), np.zeros((0, 8, 8)))
    assert path == tmp_path / "plain_name" and path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain_name"]  # no "plain_name.npz", no temp file
    got = load_maps(path, image_size=(8, 8))
    assert got.keys.shape == (0,) and got.high_res.shape == (0, 8, 8)


def test_save_rejects_unnormalised_maps_and_keeps_old_file(tmp_path):
    keys, cam, high = _maps()
    path = save_maps(tmp_path / "a.npz", keys, cam, high)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"normalised to \[0, 1\]"):
        save_maps(path, keys, cam, high * 10)
    with pytest.raises(ValueError, match="duplicate"):
        save_maps(path, [1, 1], cam, high)
    assert path.read_bytes() == before and _leftovers(tmp_path) == []


def test_maps_path_safe_names():
    assert safe_name("2007_000032") == "2007_000032"
    a, b = safe_name("case 1/slice 3"), safe_name("case_1_slice_3")
    assert "/" not in a and " " not in a and a != b and re.fullmatch(r"case_1_slice_3-[0-9a-f]{8}", a)
    assert maps_path("run", "../x").parent == Path("run") / "maps"


def _raw(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_load_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.npz not found"):
        load_maps(tmp_path / "nope.npz")


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_load_corrupt_file(tmp_path, content):
    keys, cam, high = _maps(h=40, w=50)
    good = save_maps(tmp_path / "good.npz", keys, cam, high)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file" if content == "garbage" else good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=r"map file .*bad\.npz cannot be read .*corrupt or truncated"):
        load_maps(bad)


def test_load_missing_arrays(tmp_path):
    keys, cam, _ = _maps()
    p = _raw(tmp_path / "m.npz", keys=keys, cam=cam)
    with pytest.raises(DataError, match=r"m\.npz lacks the array\(s\) \['high_res'\]"):
        load_maps(p)


def test_load_count_mismatch(tmp_path):
    keys, cam, high = _maps()
    p = _raw(tmp_path / "m.npz", keys=keys, cam=cam, high_res=high[:1])
    with pytest.raises(DataError, match=r"holds 2 class id\(s\) \[1, 2\] but 1 'high_res' map"):
        load_maps(p)


def test_load_image_size_mismatch(tmp_path):
    keys, cam, high = _maps(h=4, w=5)
    p = save_maps(tmp_path / "m.npz", keys, cam, high)
    with pytest.raises(DataError, match=r"m\.npz has shape \(2, 4, 5\), the image is 6×7"):
        load_maps(p, image_size=(6, 7))


def test_load_class_id_out_of_range(tmp_path):
    _, cam, high = _maps()
    p = save_maps(tmp_path / "m.npz", [1, 5], cam, high)
    with pytest.raises(DataError, match=r"class id\(s\) \[5\] outside 0\.\.2 \(the label spec has 3 classes\)"):
        load_maps(p, num_classes=3)
    assert load_maps(p, num_classes=6).keys.tolist() == [1, 5]


def test_load_duplicate_keys(tmp_path):
    _, cam, high = _maps()
    p = _raw(tmp_path / "m.npz", keys=np.array([2, 2]), cam=cam, high_res=high)
    with pytest.raises(DataError, match=r"duplicate class id\(s\) \[2\]"):
        load_maps(p)


def test_load_non_finite(tmp_path):
    keys, cam, high = _maps()
    high[0, 1, 1] = np.nan
    p = _raw(tmp_path / "m.npz", keys=keys, cam=cam, high_res=high)
    with pytest.raises(DataError, match="NaN or infinite"):
        load_maps(p)
