"""Data layer: VOC and folder layouts on real and generated data, label specs, budgets, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import data_path
from frugalseg.data import LabelBudget, apply_budget, open_dataset
from frugalseg.data.budget import first_n_ids, holdout
from frugalseg.data.folders import load_folders
from frugalseg.data.io import read_label_png, write_label_png
from frugalseg.data.labels import LabelSpec, merge_into_background, voc_palette
from frugalseg.data.validate import validate_dataset
from frugalseg.data.voc import load_voc
from frugalseg.errors import ConfigError, DataError


# ---- label specs ------------------------------------------------------------------------------
def test_voc_palette_known_colours():
    pal = voc_palette()
    assert pal[0] == (0, 0, 0) and pal[1] == (128, 0, 0) and pal[15] == (192, 128, 128)


def test_merge_into_background_builds_lut():
    spec = LabelSpec(("grass", "cow", "sky", "horse"), background=None)
    cmap = merge_into_background(spec, ["grass", "sky"], ignore=["horse"])
    assert cmap.target.names == ("background", "cow")
    assert cmap.lut[[0, 1, 2, 3, 255]].tolist() == [0, 1, 0, 255, 255]
    assert cmap.tags([1, 0, 3]) == frozenset({1})
    with pytest.raises(DataError, match="Unknown class name 'tree'"):
        merge_into_background(spec, ["tree"])


def test_check_mask_out_of_range_and_binary_hint(tmp_path):
    spec = LabelSpec(("background", "cell"))
    spec.check_mask(np.array([[0, 255]], dtype=np.uint8), "m.png")  # 255 is void: legal per mask
    with pytest.raises(DataError, match=r"class ids \[7\]"):
        spec.check_mask(np.array([[0, 7]], dtype=np.uint8), "m.png")


# ---- MSRC-21 in VOC layout ------------------------------------------------------------------------
def test_msrc21_voc_loader_real_data():
    root = data_path("msrc21")
    train = load_voc(root, "train")
    val = load_voc(root, "val")
    assert len(train) == 276 and len(val) == 59
    assert train.labels.names[0] == "building" and train.labels.background is None
    assert train.labels.num_classes == 21
    s = train[0]
    assert s.image.suffix == ".png"  # PNGs inside JPEGImages/: extension is whatever is on disk
    image, mask = train.read_pair(s)
    assert image.dtype == np.uint8 and image.shape[2] == 3 and image.shape[:2] == mask.shape
    assert set(np.unique(mask).tolist()) <= set(range(21)) | {255}


def test_msrc_objects_task_merges_stuff_into_background():
    ds = open_dataset("msrc-objects", "val")
    assert ds.labels.num_classes == 16 and ds.labels.names[0] == "background" and ds.labels.background == 0
    assert "grass" not in ds.labels.names and "cow" in ds.labels.names
    masks = [ds.read_mask(s) for s in ds.samples[:10]]
    assert all(set(np.unique(m).tolist()) <= set(range(16)) | {255} for m in masks)
    # tags derive from masks: every tag is a present non-background class
    for s, m in zip(ds.samples[:10], masks):
        tags = ds.tags_of(s)
        assert 0 not in tags and all((m == t).any() for t in tags)
    # 13 of the 59 val images hold only stuff classes, hence no object tag
    assert sum(len(ds.tags_of(s)) > 0 for s in ds.samples) == 46


def test_remap_composes_with_earlier_maps():
    """msrc-objects, then cow merged into background and sheep made void: masks follow both maps."""
    from frugalseg.data.voc import remap

    ds = open_dataset("msrc-objects", "train")
    cmap = merge_into_background(ds.labels, ["cow"], ignore=["sheep"])
    assert cmap.target.names[0] == "background" and "cow" not in cmap.target.names
    again = remap(ds, cmap)
    assert again.labels.num_classes == 14
    for s in ds.samples[:40]:
        before, after = ds.read_mask(s), again.read_mask(s)
        assert (after[before == ds.labels.index("cow")] == 0).all()
        assert (after[before == ds.labels.index("sheep")] == 255).all()
        car = before == ds.labels.index("car")
        assert (after[car] == again.labels.index("car")).all()


def _copy_voc_subset(tmp_path: Path, n: int = 3) -> Path:
    src = data_path("msrc21")
    dst = tmp_path / "voc"
    (dst / "JPEGImages").mkdir(parents=True)
    (dst / "SegmentationClass").mkdir()
    (dst / "ImageSets" / "Segmentation").mkdir(parents=True)
    ids = (src / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:n]
    for i in ids:
        shutil.copy(src / "JPEGImages" / f"{i}.png", dst / "JPEGImages" / f"{i}.png")
        shutil.copy(src / "SegmentationClass" / f"{i}.png", dst / "SegmentationClass" / f"{i}.png")
    (dst / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    shutil.copy(src / "classes.txt", dst / "classes.txt")
    return dst


def test_voc_wrong_layout_errors(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(DataError, match="not a PASCAL VOC layout"):
        load_voc(tmp_path, "train")
    with pytest.raises(DataError, match="unrecognised layout"):
        open_dataset(tmp_path)
    root = _copy_voc_subset(tmp_path / "x")
    with pytest.raises(DataError, match="no split 'val'.*available splits: \\['train'\\]"):
        load_voc(root, "val")


def test_voc_missing_image_listed(tmp_path):
    root = _copy_voc_subset(tmp_path)
    first = sorted((root / "JPEGImages").iterdir())[0]
    first.unlink()
    with pytest.raises(DataError, match="missing from JPEGImages"):
        load_voc(root, "train")


def test_size_mismatch_and_corrupt_and_unknown_id(tmp_path):
    root = _copy_voc_subset(tmp_path)
    ds = load_voc(root, "train")
    a, b, c = ds.samples
    # size mismatch
    Image.open(a.image).resize((50, 40)).save(a.image)
    with pytest.raises(DataError, match=r"image size \(40, 50\) does not match mask size"):
        ds.read_pair(a)
    # corrupt image
    b.image.write_bytes(b.image.read_bytes()[:100])
    with pytest.raises(DataError, match="cannot read image"):
        ds.read_image(b)
    # unknown class id in a mask
    m = read_label_png(c.mask)
    m[0, 0] = 42
    write_label_png(c.mask, m, LabelSpec(ds.labels.names, background=None).palette_bytes())
    with pytest.raises(DataError, match=r"class ids \[42\]"):
        ds.read_mask(c)
    report = validate_dataset(ds, progress=False)
    assert not report["ok"] and len(report["problems"]) == 3


def test_rgb_coloured_mask(tmp_path):
    spec = LabelSpec(("background", "a", "b"))
    ids = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    pal = list(spec.palette)
    rgb = np.array([[pal[0], pal[1]], [pal[2], (255, 255, 255)]], dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "m.png")
    assert (read_label_png(tmp_path / "m.png", palette=pal) == ids).all()
    rgb[0, 0] = (7, 8, 9)
    Image.fromarray(rgb).save(tmp_path / "m.png")
    with pytest.raises(DataError, match="RGB-coloured mask"):
        read_label_png(tmp_path / "m.png", palette=pal)


# ---- folders layout -------------------------------------------------------------------------------
def test_folders_with_tags_and_unlabelled(tmp_path):
    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(root / "images" / f"im{i}.jpg")
    write_label_png(root / "masks" / "im0.png", np.eye(8, dtype=np.uint8), LabelSpec(("background", "cat", "dog")).palette_bytes())
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    (root / "tags.csv").write_text("image_id,tags\nim1,cat;dog\nim2,dog\n")
    ds = load_folders(root)
    sup = {s.id: s.supervision for s in ds.samples}
    assert sup == {"im0": "mask", "im1": "tags", "im2": "tags", "im3": "none"}
    assert ds.tags_of(ds.samples[1]) == frozenset({1, 2})
    assert ds.tags_of(ds.samples[0]) == frozenset({1})  # derived from the mask
    (root / "tags.csv").write_text("image_id,tags\nim1,\n")
    with pytest.raises(DataError, match="empty tag list"):
        load_folders(root)
    (root / "tags.csv").write_text("image_id,tags\nim1,horse\n")
    with pytest.raises(DataError, match="Unknown class name 'horse'"):
        load_folders(root)
    (root / "tags.csv").unlink()
    write_label_png(root / "masks" / "ghost.png", np.zeros((8, 8), np.uint8), LabelSpec(("background", "x")).palette_bytes())
    with pytest.raises(DataError, match="masks without a matching image.*ghost"):
        load_folders(root)
    with pytest.raises(DataError, match="expected an images/ folder"):
        load_folders(tmp_path)


def test_validate_flags_binary_0_255_masks(tmp_path):
    root = tmp_path / "bin"
    (root / "images").mkdir(parents=True)
    spec = LabelSpec(("background", "cell"))
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / f"{i}.png")
        m = np.zeros((8, 8), np.uint8)
        m[2:5, 2:5] = 255
        write_label_png(root / "masks" / f"{i}.png", m, spec.palette_bytes())
    (root / "classes.txt").write_text("background\ncell\n")
    report = validate_dataset(load_folders(root), progress=False)
    assert not report["ok"] and "0/255 binary" in report["problems"][0]


def test_shapes_dataset_splits(shapes_dataset):
    train, val = open_dataset(shapes_dataset, "train"), open_dataset(shapes_dataset, "val")
    assert len(train) == 12 and len(val) == 4
    assert train.labels.names == ("background", "disc", "square", "triangle")
    assert validate_dataset(train, progress=False)["ok"]


# ---- budgets ----------------------------------------------------------------------------------------
def test_budget_reproducible_and_disjoint():
    ds = open_dataset("msrc-objects", "train")
    b = LabelBudget(mask_fraction=0.1, rest="tags", seed=3)
    one, two = apply_budget(ds, b), apply_budget(ds, b)
    ids1 = [s.id for s in one if s.supervision == "mask"]
    assert ids1 == [s.id for s in two if s.supervision == "mask"]
    assert len(ids1) == round(0.1 * 276)
    assert one.summary() == {"samples": 276, "mask": 28, "tags": 248, "none": 0}
    other = apply_budget(ds, LabelBudget(mask_fraction=0.1, seed=4))
    assert ids1 != [s.id for s in other if s.supervision == "mask"]
    # ground truth stays reachable for evaluation
    assert all(s.mask is not None for s in one)


def test_budget_errors_and_listed():
    ds = open_dataset("msrc-objects", "val")
    with pytest.raises(ConfigError, match="selects no image"):
        apply_budget(ds, LabelBudget(mask_fraction=0.001))
    with pytest.raises(ConfigError, match="not in"):
        apply_budget(ds, LabelBudget(listed=("nope",)))
    listed = apply_budget(ds, LabelBudget(listed=first_n_ids(ds, 5), rest="none"))
    assert listed.summary()["mask"] == 5 and listed.summary()["none"] == 54
    tr, va = holdout(ds, 0.2, seed=0)
    assert len(tr) + len(va) == 59 and not {s.id for s in tr} & {s.id for s in va}


def test_split_parts_fit_and_holdout_partition_train():
    train = open_dataset("msrc-objects", "train")
    fit = open_dataset("msrc-objects", "train:fit")
    held = open_dataset("msrc-objects", "train:holdout")
    fit_ids, held_ids = {s.id for s in fit.samples}, {s.id for s in held.samples}
    assert (len(fit_ids), len(held_ids)) == (221, 55)
    assert not fit_ids & held_ids and fit_ids | held_ids == {s.id for s in train.samples}
    assert held_ids == {s.id for s in open_dataset("msrc-objects", "train:holdout").samples}  # deterministic
    with pytest.raises(ConfigError, match="use 'train:fit' or 'train:holdout'"):
        open_dataset("msrc-objects", "train:test")


def _jitter(image, mask, generator):
    """A stand-in augmentation: one random number per (seed, epoch, index), written into the image."""
    return image * 0 + torch.rand((), generator=generator), mask


def test_persistent_workers_see_the_epoch(shapes_dataset):
    """set_epoch in the main process reaches persistent DataLoader workers (a plain attribute would not:
    every epoch would repeat epoch 0's augmentation)."""
    from torch.utils.data import DataLoader

    from frugalseg.data.torchdata import MaskedImages

    data = MaskedImages(open_dataset(str(shapes_dataset), "train"), _jitter)
    loader = DataLoader(data, batch_size=4, num_workers=1, persistent_workers=True)

    def epoch_values(epoch: int) -> torch.Tensor:
        data.set_epoch(epoch)
        return torch.cat([b["image"][:, 0, 0, 0] for b in loader])

    first, second, first_again = epoch_values(0), epoch_values(1), epoch_values(0)
    assert len(first) == len(data) and not torch.equal(first, second)
    assert torch.equal(first, first_again)  # the augmentation is a function of (seed, epoch, index)
    in_process = torch.stack([data[i]["image"][0, 0, 0] for i in range(len(data))])
    assert torch.equal(in_process, first)
