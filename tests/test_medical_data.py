"""Medical and microscopy loaders: SSL4MIS HDF5 (ACDC, LA), MSD NIfTI, WBC, ISBI-2012."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from frugalseg.data import open_dataset
from frugalseg.data.hdf5 import first_patients_ids, load_hdf5, patient_of
from frugalseg.data.isbi import load_isbi, read_stack
from frugalseg.data.wbc import CELL_TYPES, load_wbc, read_cell_types
from frugalseg.errors import DataError

h5py = pytest.importorskip("h5py")


def shared_data(name: str) -> Path:
    """A real dataset under $FRUGALSEG_DATA (default: ../shared/data next to the project), else skip."""
    root = Path(os.environ.get("FRUGALSEG_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    path = root / name
    if not path.exists():
        pytest.skip(f"real dataset {path} not available (set FRUGALSEG_DATA)")
    return path


def _write_h5(path: Path, **datasets: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)


# ---- ACDC (SSL4MIS 2D) ---------------------------------------------------------------------------
def test_acdc_train_slices_keep_list_order_and_protocol_counts():
    root = shared_data("acdc")
    ds = load_hdf5(root, "train")
    listed = [line.strip() for line in (root / "train_slices.list").read_text().splitlines() if line.strip()]
    assert [s.id for s in ds] == listed  # order matters: the protocol labels the first N slices
    assert len(ds) == 944 and ds.ndim == 2
    assert ds.labels.names == ("background", "RV", "Myo", "LV") and ds.labels.background == 0
    assert patient_of("patient004_frame01_slice_1") == "patient004"
    assert patient_of("patient004_frame01") == "patient004"
    # any other id (an LA volume, an image) is its own patient: never cut at an underscore
    assert patient_of("0RZDK210BSMWAA6467LU") == "0RZDK210BSMWAA6467LU" and patient_of("case_12") == "case_12"
    three, seven = first_patients_ids(ds, 3), first_patients_ids(ds, 7)
    assert len(three) == 68 and len(seven) == 136  # SSL4MIS patients_to_slices for ACDC
    assert list(three) == listed[:68] and list(seven) == listed[:136]
    assert len({patient_of(i) for i in seven}) == 7
    image, mask = ds.read_pair(ds[0])
    assert image.dtype == np.float32 and image.ndim == 2 and mask.shape == image.shape
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) <= {0, 1, 2, 3}
    assert ds[0].spacing is None and ds[0].image == ds[0].mask
    with pytest.raises(DataError, match="only 50"):
        first_patients_ids(ds, 51)


def test_acdc_val_volumes_and_task_name():
    shared_data("acdc")
    val = open_dataset("acdc", "val")  # task name resolved under $FRUGALSEG_DATA
    assert len(val) == 20 and val.ndim == 3
    image, mask = val.read_pair(val[0])
    assert image.ndim == 3 and image.dtype == np.float32 and mask.shape == image.shape
    assert set(np.unique(mask).tolist()) <= {0, 1, 2, 3}


# ---- LA 2018 (UA-MT / DTC 3D) ----------------------------------------------------------------------
def test_la2018_volumes():
    root = shared_data("la2018")
    train, test = load_hdf5(root, "train"), open_dataset(root, "test")
    assert len(train) == 8 and len(test) == 2 and train.ndim == test.ndim == 3
    assert train.labels.names == ("background", "left_atrium")
    assert train[0].image == root / train[0].id / "mri_norm2.h5"
    image, mask = test.read_pair(test[0])
    assert image.ndim == 3 and image.dtype == np.float32 and image.shape == mask.shape
    assert set(np.unique(mask).tolist()) == {0, 1}
    with pytest.raises(DataError, match=r"no split 'val'.*available splits: \['test', 'train'\]"):
        load_hdf5(root, "val")


# ---- HDF5 layout and errors on generated files ----------------------------------------------------
def test_hdf5_generated_layout_class_inference_and_errors(tmp_path):
    root = tmp_path / "mini"
    img = np.zeros((8, 6), np.float32)
    lab = np.zeros((8, 6), np.uint8)
    lab[2:4, 2:4] = 2
    for i in ("p1_frame01_slice_2", "p1_frame01_slice_1", "p2_frame01_slice_1"):
        _write_h5(root / "data" / "slices" / f"{i}.h5", image=img, label=lab)
    (root / "train_slices.list").write_text("p1_frame01_slice_2\np1_frame01_slice_1\np2_frame01_slice_1\n")
    ds = load_hdf5(root)
    assert ds.labels.names == ("background", "class_1", "class_2")  # inferred from the first label
    assert [s.id for s in ds] == ["p1_frame01_slice_2", "p1_frame01_slice_1", "p2_frame01_slice_1"]
    assert first_patients_ids(ds, 1) == ("p1_frame01_slice_2", "p1_frame01_slice_1")
    (root / "classes.txt").write_text("background\nliver\ntumour\n")
    assert load_hdf5(root).labels.names == ("background", "liver", "tumour")
    assert load_hdf5(root, class_names=("bg", "a", "b")).labels.names == ("bg", "a", "b")

    with pytest.raises(DataError, match=r"no split 'val' \(no val.list\)"):
        load_hdf5(root, "val")
    (root / "val.list").write_text("p9_frame01\n")
    with pytest.raises(DataError, match=r"val.list: 1 of 1 listed cases have no .h5 file, e.g. 'p9_frame01'"):
        load_hdf5(root, "val")

    # A file without 'label': the error names the file and the keys it holds.
    _write_h5(root / "data" / "p9_frame01.h5", image=np.zeros((2, 8, 6), np.float32))
    val = load_hdf5(root, "val")
    assert val.ndim == 3
    with pytest.raises(DataError, match=r"p9_frame01.h5: no dataset 'label' .*found keys \['image'\]"):
        val.read_mask(val[0])

    # A corrupt (truncated / non-HDF5) file.
    (root / "data" / "p9_frame01.h5").write_bytes(b"\x89HDF\r\n\x1a\nthis is not really hdf5")
    with pytest.raises(DataError, match=r"p9_frame01.h5: cannot read HDF5 file"):
        val.read_image(val[0])


# ---- MSD NIfTI ---------------------------------------------------------------------------------
def _write_msd(root: Path) -> dict[str, np.ndarray]:
    nib = pytest.importorskip("nibabel")
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    affine = np.diag([0.5, 0.7, 2.0, 1.0])  # zooms in nibabel's (x, y, z) order
    for case in ("case_001", "case_002", "case_003"):
        xyz = rng.random((5, 4, 3)).astype(np.float32)
        lab = (xyz > 0.6).astype(np.uint8)
        arrays[case] = xyz
        folder = "imagesTs" if case == "case_003" else "imagesTr"
        nib.save(nib.Nifti1Image(xyz, affine), str(root / folder / f"{case}.nii.gz"))
        if folder == "imagesTr":
            nib.save(nib.Nifti1Image(lab, affine), str(root / "labelsTr" / f"{case}.nii.gz"))
    meta = {
        "name": "Tiny",
        "labels": {"0": "background", "1": "tumour"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                     for c in ("case_001", "case_002")],
        "test": ["./imagesTs/case_003.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return arrays


def test_msd_nifti_layout_axis_order_and_spacing(tmp_path):
    from frugalseg.data.nifti import load_msd

    root = tmp_path / "Task99_Tiny"
    arrays = _write_msd(root)
    train = load_msd(root, "train")
    assert [s.id for s in train] == ["case_001", "case_002"] and train.ndim == 3
    assert train.labels.names == ("background", "tumour")
    s = train[0]
    assert s.spacing == pytest.approx((2.0, 0.7, 0.5))  # (z, y, x), like the arrays
    image, mask = train.read_pair(s)
    assert image.shape == (3, 4, 5) and image.dtype == np.float32
    np.testing.assert_allclose(image, arrays["case_001"].transpose(2, 1, 0))
    np.testing.assert_array_equal(mask, (arrays["case_001"] > 0.6).transpose(2, 1, 0))
    assert image[2, 1, 4] == pytest.approx(arrays["case_001"][4, 1, 2])  # [z, y, x] == nibabel [x, y, z]

    test = open_dataset(root, "test")  # layout detected from dataset.json + imagesTr/
    assert len(test) == 1 and test[0].mask is None and test[0].supervision == "none"
    with pytest.raises(DataError, match="no 'validation' list.*holdout"):
        load_msd(root, "val")


def test_msd_errors_4d_and_missing_files(tmp_path):
    nib = pytest.importorskip("nibabel")
    from frugalseg.data.nifti import load_msd, read_nifti_image

    root = tmp_path / "Task98"
    _write_msd(root)
    four_d = root / "imagesTr" / "case_001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 4, 3, 2), np.float32), np.eye(4)), str(four_d))
    with pytest.raises(DataError, match="multi-modal"):
        load_msd(root, "train")
    with pytest.raises(DataError, match="multi-modal"):
        read_nifti_image(four_d)
    (root / "labelsTr" / "case_002.nii.gz").unlink()
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = meta["training"][1:]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="case_002.nii.gz, which does not exist"):
        load_msd(root, "train")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    with pytest.raises(DataError, match="bad.nii.gz: cannot read NIfTI"):
        read_nifti_image(bad)


def test_write_nifti_roundtrip_atomic_and_reference(tmp_path):
    pytest.importorskip("nibabel")
    from frugalseg.data.nifti import read_nifti_mask, read_nifti_spacing, write_nifti

    pred = np.zeros((3, 4, 5), np.uint8)
    pred[1, 2, 3] = 2
    out = tmp_path / "preds" / "case.nii.gz"
    write_nifti(out, pred, (2.0, 0.7, 0.5))
    np.testing.assert_array_equal(read_nifti_mask(out), pred)
    assert read_nifti_spacing(out) == pytest.approx((2.0, 0.7, 0.5))
    assert sorted(p.name for p in out.parent.iterdir()) == ["case.nii.gz"]  # no temporary files left

    again = tmp_path / "preds" / "again.nii"
    write_nifti(again, pred.astype(bool), None, reference=out)  # spacing taken from the reference affine
    assert read_nifti_spacing(again) == pytest.approx((2.0, 0.7, 0.5))
    np.testing.assert_array_equal(read_nifti_mask(again), pred > 0)


# ---- WBC and ISBI-2012 (raster masks through class maps) --------------------------------------------
def test_wbc_masks_map_grey_levels_to_ids():
    root = shared_data("wbc")
    ds = load_wbc(root / "dataset1")
    assert len(ds) == 300 and ds.labels.names == ("background", "cytoplasm", "nucleus")
    image, mask = ds.read_pair(ds[0])
    assert image.shape == (120, 120, 3) and mask.shape == (120, 120)
    assert set(np.unique(mask).tolist()) == {0, 1, 2}  # stored 0 / 128 / 255
    assert ds.tags_of(ds[0]) == frozenset({1, 2})
    types = read_cell_types(root / "dataset1")
    assert len(types) == 300 and set(types.values()) <= set(CELL_TYPES.values()) and ds[0].id in types
    assert ds[0].tags is None  # cell type is metadata, not a segmentation tag
    ds2 = open_dataset("wbc2")
    assert len(ds2) == 100 and ds2.read_mask(ds2[0]).shape == (300, 300)
    with pytest.raises(DataError, match="ships no split"):
        load_wbc(root / "dataset1", "val")


def test_isbi_membrane_ids_sections_and_stack():
    root = shared_data("isbi2012")
    train = load_isbi(root, "train")
    assert [s.id for s in train] == [str(k) for k in range(30)]  # numeric, not lexicographic, order
    assert train.labels.names == ("background", "membrane")
    image, mask = train.read_pair(train[0])
    assert image.shape == (512, 512, 3) and mask.shape == (512, 512)
    assert set(np.unique(mask).tolist()) == {0, 1}
    from PIL import Image

    raw = np.asarray(Image.open(train[0].mask))
    np.testing.assert_array_equal(mask == 1, raw == 0)  # stored 0 = membrane -> class 1
    assert 0.05 < (mask == 1).mean() < 0.5  # membranes are the thin minority class
    test = load_isbi(root, "test")
    assert len(test) == 30 and all(s.mask is None and s.supervision == "none" for s in test)
    volume, masks = read_stack(train.with_samples(train.samples[:3]))
    assert volume.shape == (3, 512, 512) and volume.dtype == np.uint8 and masks.shape == (3, 512, 512)
    assert read_stack(test.with_samples(test.samples[:2]))[1] is None
