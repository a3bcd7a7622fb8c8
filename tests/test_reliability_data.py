"""Bad datasets give one clear DataError (file, what is wrong, what to do), never a silently wrong result;
`frugalseg data validate` lists every problem at once. Tiny generated datasets only."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from frugalseg.cli import cli
from frugalseg.data import open_dataset, open_split
from frugalseg.data.folders import load_folders
from frugalseg.data.io import write_label_png
from frugalseg.data.labels import LabelSpec
from frugalseg.data.validate import check_masks_for_training, validate_dataset, validate_source
from frugalseg.data.voc import load_voc
from frugalseg.errors import DataError

SIZE = 8


def square(value: int, size: int = SIZE) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[2:5, 2:5] = value
    return m


def make_folders(root: Path, ids=("a", "b", "c"), masks: dict | None = None, classes: str | None = "background\ncell\n",
                 tags: str | None = None, splits: dict | None = None, ext: str = ".png") -> Path:
    (root / "images").mkdir(parents=True)
    for k, i in enumerate(ids):
        Image.fromarray(np.full((SIZE, SIZE, 3), 30 * k, np.uint8)).save(root / "images" / f"{i}{ext}")
    spec = LabelSpec(tuple(f"c{k}" for k in range(8)))
    for i, m in (masks or {}).items():
        write_label_png(root / "masks" / f"{i}.png", m, spec.palette_bytes())
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    if tags is not None:
        (root / "tags.csv").write_text(tags)
    for name, lines in (splits or {}).items():
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{name}.txt").write_text(lines)
    return root


def make_voc(root: Path, ids=("a", "b", "c"), with_mask=("a", "b", "c"), split="train") -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    spec = LabelSpec(("background", "cell"))
    for i in ids:
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(root / "JPEGImages" / f"{i}.png")
    for i in with_mask:
        write_label_png(root / "SegmentationClass" / f"{i}.png", square(1), spec.palette_bytes())
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("background\ncell\n")
    return root


def validate_cli(*args: str):
    return CliRunner().invoke(cli, ["data", "validate", *args])


# ---- 1. masks a model cannot learn from: refused before training, with validate's message ----------------
def test_binary_0_255_masks_refused_with_validates_message(tmp_path):
    root = make_folders(tmp_path / "bin", masks={i: square(255) for i in "abc"})
    ds = open_dataset(root, "train")
    with pytest.raises(DataError) as caught:
        check_masks_for_training(ds)
    message = str(caught.value)
    assert "every mask holds only 0 and 255" in message and "Store the object as class 1" in message
    assert str(root / "masks") in message  # names the folder
    assert validate_dataset(ds, progress=False)["problems"] == [message]  # one text, shared
    res = validate_cli(str(root))
    assert res.exit_code == 1 and f"problem: {message}" in res.output


def test_binary_masks_detected_even_when_some_masks_are_empty(tmp_path):
    """Empty masks (no object in the image) must not hide that the others are 0/255 masks."""
    root = make_folders(tmp_path / "bin", masks={"a": square(255), "b": np.zeros((SIZE, SIZE), np.uint8),
                                                 "c": square(255)})
    with pytest.raises(DataError, match="look like 0/255 binary masks"):
        check_masks_for_training(open_dataset(root, "train"))


def test_masks_without_any_foreground_class_refused(tmp_path):
    root = make_folders(tmp_path / "bg", masks={i: np.zeros((SIZE, SIZE), np.uint8) for i in "abc"})
    with pytest.raises(DataError, match="no mask of bg:train holds a foreground class") as caught:
        check_masks_for_training(open_dataset(root, "train"))
    assert "0/255" not in str(caught.value)


def test_class_map_leaving_nothing_to_learn_is_not_called_binary(tmp_path):
    """Ignoring the only class turns its pixels into 255 after the map; the stored masks are not 0/255 ones."""
    root = make_folders(tmp_path / "ign", masks={i: square(1) for i in "abc"})
    check_masks_for_training(open_split(root, "train"))  # class 1 is there: fine
    ds = open_split(root, "train", ignore_classes=["cell"])
    with pytest.raises(DataError, match="holds a foreground class") as caught:
        check_masks_for_training(ds)
    assert "0/255" not in str(caught.value) and "--ignore-classes" in str(caught.value)


def test_good_masks_pass_after_reading_one(tmp_path, monkeypatch):
    root = make_folders(tmp_path / "ok", masks={i: square(1) for i in "abc"})
    ds = open_dataset(root, "train")
    reads = []
    original = type(ds).read_raw_mask
    monkeypatch.setattr(type(ds), "read_raw_mask", lambda self, s: reads.append(s.id) or original(self, s))
    check_masks_for_training(ds)
    assert reads == ["a"]  # stops at the first mask holding a real class


def test_unknown_class_id_and_missing_mask_file(tmp_path):
    root = make_folders(tmp_path / "bad", masks={"a": square(7), "b": square(1), "c": square(1)})
    with pytest.raises(DataError, match=r"a\.png: mask holds class ids \[7\] outside 0\.\.1"):
        check_masks_for_training(open_dataset(root, "train"))
    ds = open_dataset(root, "train")
    from dataclasses import replace

    broken = ds.with_samples([replace(ds.samples[0], mask=None), *ds.samples[1:]])
    with pytest.raises(DataError, match="1 samples are to be trained on masks but have no mask file, e.g. 'a'"):
        check_masks_for_training(broken)
    check_masks_for_training(ds.with_supervision("tags"))  # nothing trains on masks: nothing to check


# ---- 2. folders without splits/: only 'train' exists ------------------------------------------------------
def test_folders_without_splits_have_only_train(tmp_path):
    root = make_folders(tmp_path / "nosplit", masks={i: square(1) for i in "abc"})
    assert [s.id for s in open_dataset(root, "train")] == ["a", "b", "c"]
    with pytest.raises(DataError) as caught:
        open_dataset(root, "val")
    message = str(caught.value)
    assert f"{root}: there is no splits/ folder, so no 'val' split" in message
    assert "splits/train.txt and splits/val.txt" in message
    assert "--train-split train:fit --val-split train:holdout" in message and "--val-split ''" in message
    fit, held = open_dataset(root, "train:fit"), open_dataset(root, "train:holdout")
    assert {s.id for s in fit} | {s.id for s in held} == {"a", "b", "c"} and not {s.id for s in fit} & {s.id for s in held}


def test_folders_with_splits_list_available_ones(tmp_path):
    root = make_folders(tmp_path / "s", masks={i: square(1) for i in "abc"}, splits={"train": "a\nb\n", "val": "c\n"})
    assert [s.id for s in open_dataset(root, "val")] == ["c"]
    with pytest.raises(DataError, match=r"no split 'test' \(no splits/test.txt\); available splits: \['train', 'val'\]"):
        open_dataset(root, "test")


def test_train_refuses_to_validate_on_its_training_images(tmp_path):
    """The CLI's default --val-split val on a splitless folder: one clear line, exit 2, before any training."""
    root = make_folders(tmp_path / "nosplit", masks={i: square(1) for i in "abc"})
    proc = subprocess.run([sys.executable, "-m", "frugalseg.cli", "train", "--data", str(root), "--out",
                           str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "no splits/ folder, so no 'val' split" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_dataset_has_splits(tmp_path):
    from frugalseg.data.synthetic import make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "shapes", n_train=3, n_val=2, size=32)
    train, val = open_dataset(root, "train"), open_dataset(root, "val")
    assert len(train) == 3 and len(val) == 2 and not {s.id for s in train} & {s.id for s in val}


# ---- 3. class names without classes.txt ----------------------------------------------------------------
def test_masks_without_classes_txt_refused(tmp_path):
    root = make_folders(tmp_path / "nocls", masks={i: square(1) for i in "abc"}, classes=None)
    with pytest.raises(DataError) as caught:
        open_dataset(root, "train")
    message = str(caught.value)
    assert message.startswith(f"{root}: masks/ holds masks but there is no classes.txt")
    assert "Masks hold class ids and classes.txt must name them" in message and "background first" in message


def test_tags_only_classes_sorted_and_announced_once(tmp_path, caplog):
    one = make_folders(tmp_path / "one", classes=None, tags="image_id,tags\na,nucleus;cytoplasm\nb,cytoplasm\n")
    two = make_folders(tmp_path / "two", classes=None, tags="image_id,tags\nb,cytoplasm\na,nucleus;cytoplasm\n")
    with caplog.at_level(logging.WARNING, logger="frugalseg"):
        ds1 = open_dataset(one, "train")
        open_dataset(one, "train")
    ds2 = open_dataset(two, "train")
    assert ds1.labels.names == ds2.labels.names == ("background", "cytoplasm", "nucleus")
    assert ds1.samples[0].tags == ds2.samples[0].tags == frozenset({1, 2})
    assert ds1.samples[1].tags == frozenset({1})
    records = [r for r in caplog.records if r.getMessage().startswith(f"{one}: no classes.txt")]
    assert len(records) == 1 and records[0].name.startswith("frugalseg.data")
    assert records[0].getMessage() == (f"{one}: no classes.txt; classes inferred from tags.csv: background, "
                                       "cytoplasm, nucleus (write classes.txt to fix the order)")


# ---- 4. unknown tag names -----------------------------------------------------------------------------
def test_unknown_tag_name_names_file_line_image_and_known_classes(tmp_path):
    root = make_folders(tmp_path / "t", classes="background\ncat\ndog\n",
                        tags="image_id,tags\na,cat\nb,dog;hrose\n")
    with pytest.raises(DataError) as caught:
        open_dataset(root, "train")
    assert str(caught.value) == (f"{root / 'tags.csv'}:3: Unknown class name 'hrose' for image 'b'. Known classes: "
                                 "background, cat, dog. Fix the tag, or add the class to classes.txt.")


# ---- 5. data validate lists every problem ------------------------------------------------------------
def test_validate_lists_every_structural_problem(tmp_path):
    root = make_folders(
        tmp_path / "many", ids=("a", "b", "c", "d"), classes="background\ncat\n",
        masks={"a": square(1), "ghost": square(1), "b": square(255)},
        tags="image_id,tags\nc,cat;horse\nnobody,cat\n", splits={"train": "a\nb\nc\nd\nmissing\nd\n"},
    )
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(root / "images" / "a.jpg")  # a.png and a.jpg
    res = validate_cli(str(root))
    assert res.exit_code == 1, res.output
    problems = [line for line in res.output.splitlines() if line.startswith("problem: ")]
    expected = ["several files (a.jpg, a.png)", "listed twice, e.g. 'd' (lines 4 and 6)",
                "1 listed images are not in images/, e.g. ['missing']", "masks without a matching image in images/: ['ghost']",
                "tags for 1 images that do not exist in images/: ['nobody']", "Unknown class name 'horse' for image 'c'"]
    for part in expected:
        assert sum(part in p for p in problems) == 1, (part, problems)
    assert len(problems) == len(expected) and f"{len(expected)} problem(s)" in res.output
    # the loader still fails fast on the first of them
    with pytest.raises(DataError, match="several files"):
        open_dataset(root, "train")


def test_validate_json_and_unopenable_source(tmp_path):
    root = make_folders(tmp_path / "ok", masks={i: square(1) for i in "abc"})
    assert validate_source(root, progress=False)["ok"]
    res = validate_cli(str(root), "--split", "val")
    assert res.exit_code != 0 and "no splits/ folder" in str(res.exception)  # nothing to open: the one error


# ---- 6. VOC: a listed image without its mask ---------------------------------------------------------
def test_voc_image_without_mask_refused_up_front(tmp_path):
    root = make_voc(tmp_path / "voc", with_mask=("a", "c"))
    with pytest.raises(DataError) as caught:
        load_voc(root, "train")
    message = str(caught.value)
    assert "1 of 3 listed images have no mask, e.g. 'b'" in message
    assert f"(expected {root / 'SegmentationClass' / 'b.png'})" in message and "remove these ids from train.txt" in message
    res = validate_cli(str(root))
    assert res.exit_code == 1 and "have no mask, e.g. 'b'" in res.output


def test_voc_split_without_any_mask_is_images_only(tmp_path, caplog):
    root = make_voc(tmp_path / "voc", ids=("a", "b"), with_mask=(), split="test")
    with caplog.at_level(logging.WARNING, logger="frugalseg"):
        ds = load_voc(root, "test")
    assert [s.supervision for s in ds] == ["none", "none"] and all(s.mask is None for s in ds)
    assert any("holds images only" in r.getMessage() for r in caplog.records)


# ---- 7. other members of these classes ---------------------------------------------------------------
def test_text_files_with_bom_and_crlf(tmp_path):
    root = make_folders(tmp_path / "win", masks={i: square(1) for i in "abc"}, classes=None,
                        splits={"train": "\ufeffa\r\nb\r\n", "val": "c\r\n"})
    (root / "classes.txt").write_bytes("\ufeffbackground\r\ncell\r\n".encode())
    (root / "tags.csv").write_bytes("\ufeffimage_id,tags\r\na,cell\r\n".encode())
    ds = open_dataset(root, "train")
    assert [s.id for s in ds] == ["a", "b"] and ds.labels.names == ("background", "cell")
    assert ds.labels.background == 0 and ds.samples[0].tags == frozenset({1})


def test_labelme_background_name_is_background(tmp_path):
    root = make_folders(tmp_path / "lm", masks={i: square(1) for i in "abc"}, classes="_background_\ncell\n")
    assert open_dataset(root, "train").labels.background == 0


def test_tags_csv_pitfalls(tmp_path):
    root = make_folders(tmp_path / "t", classes="background\ncat\ndog\n", tags="a,cat\nb,dog\n")
    with pytest.raises(DataError, match=r"tags.csv:1: the first line \('a,cat'\) names an image.*Add a header line"):
        open_dataset(root, "train")
    (root / "tags.csv").write_text("image_id,tags\na,cat\nb,dog\na,dog\n")
    with pytest.raises(DataError, match=r"tags.csv:4: image 'a' is tagged again \(first on line 2\).*a,cat;dog"):
        open_dataset(root, "train")
    (root / "tags.csv").write_text("image_id,tags\na,cat,dog\na,cat,dog\nb,bg\n")  # tags in columns; a repeat
    ds = open_dataset(root, "train")
    assert [s.tags for s in ds] == [frozenset({1, 2}), frozenset({0}), None]
    (root / "tags.csv").write_text("image_id,tags\na.png,cat\n")
    with pytest.raises(DataError, match=r"\['a.png'\]\. Ids are file names without extension"):
        open_dataset(root, "train")


def test_split_file_pitfalls(tmp_path):
    root = make_folders(tmp_path / "s", masks={i: square(1) for i in "abc"}, splits={"train": "\n\n", "val": "c.png\n"})
    with pytest.raises(DataError, match=r"splits/train.txt: the split lists no images"):
        open_dataset(root, "train")
    with pytest.raises(DataError, match=r"\['c.png'\]\. Ids are file names without extension"):
        open_dataset(root, "val")


def test_duplicate_stems_refused(tmp_path):
    root = make_folders(tmp_path / "dup", masks={i: square(1) for i in "abc"})
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(root / "images" / "b.jpg")
    with pytest.raises(DataError, match=r"images: 1 id\(s\) have several files \(b.jpg, b.png\)"):
        load_folders(root)


def test_duplicate_class_names_named_with_line(tmp_path):
    root = make_folders(tmp_path / "dc", masks={i: square(1) for i in "abc"}, classes="background\ncell\ncell\n")
    with pytest.raises(DataError, match=r"classes.txt:3: class 'cell' is named again \(first on line 2\)"):
        open_dataset(root, "train")


def test_size_mismatch_reported_by_validate(tmp_path):
    root = make_folders(tmp_path / "sz", masks={"a": square(1), "b": square(1, size=6), "c": square(1)})
    report = validate_source(root, progress=False)
    assert len(report["problems"]) == 1 and "image size (8, 8) does not match mask size (6, 6)" in report["problems"][0]


def test_jpeg_masks_are_refused_not_skipped(tmp_path):
    root = make_folders(tmp_path / "jpg", masks={"a": square(1), "b": square(1)})
    Image.fromarray(square(1)).save(root / "masks" / "c.jpg")
    with pytest.raises(DataError, match=r"masks: 1 masks are JPEG/WebP files, e.g. \['c.jpg'\].*Save masks as PNG"):
        open_dataset(root, "train")


def test_train_and_val_must_not_share_images(tmp_path):
    root = make_folders(tmp_path / "leak", masks={i: square(1) for i in "abc"},
                        splits={"train": "a\nb\n", "val": "b\nc\n", "trainval": "a\nb\nc\n"})
    with pytest.raises(DataError, match=r"val.txt: 1 images are also listed in train.txt, e.g. \['b'\]"):
        open_dataset(root, "val")
    with pytest.raises(DataError, match=r"train.txt: 1 images are also listed in val.txt"):
        open_dataset(root, "train")
    assert len(open_dataset(root, "trainval")) == 3  # a union by design
    voc = make_voc(tmp_path / "voc")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("c\n")
    with pytest.raises(DataError, match=r"train.txt: 1 images are also listed in val.txt, e.g. \['c'\]"):
        load_voc(voc, "train")


def test_validate_without_classes_txt_still_checks_the_rest(tmp_path):
    root = make_folders(tmp_path / "nocls", masks={"a": square(1), "ghost": square(1)}, classes=None)
    report = validate_source(root, progress=False)
    assert len(report["problems"]) == 2
    assert "masks without a matching image" in report["problems"][0]
    assert "there is no classes.txt" in report["problems"][1]


# ---- 8. a folder where a file is expected (or a file where a folder is), an unreadable folder -------------
# Root ignores permissions, so a folder in a file's place stands for "cannot be read" (and a monkeypatched
# iterdir for a permission error): each gives one DataError naming the path, never a traceback.
@pytest.mark.parametrize("where", ["classes.txt", "tags.csv", "splits/train.txt"])
def test_folders_a_folder_in_place_of_a_text_file_is_named(tmp_path, where):
    root = make_folders(tmp_path / "f", masks={i: square(1) for i in "abc"}, classes=None,
                        splits={"val": "c\n"} if where.startswith("splits") else None)
    if where != "classes.txt":
        (root / "classes.txt").write_text("background\ncell\n")
    (root / where).mkdir(parents=True)
    with pytest.raises(DataError) as caught:
        open_dataset(root, "train")
    assert str(caught.value).startswith(f"{root / where}: is a folder, but a file is expected here")
    with pytest.raises(DataError, match=f"^{root / where}: is a folder"):  # validate: the same one error
        validate_source(root, progress=False)


@pytest.mark.parametrize("where", ["classes.txt", "ImageSets/Segmentation/train.txt"])
def test_voc_a_folder_in_place_of_a_text_file_is_named(tmp_path, where):
    root = make_voc(tmp_path / "voc")
    (root / where).unlink()
    (root / where).mkdir()
    with pytest.raises(DataError, match=rf"^{root / where}: is a folder, but a file is expected here"):
        load_voc(root, "train")


def test_a_file_in_place_of_an_image_or_mask_folder_is_named(tmp_path):
    root = make_folders(tmp_path / "f", masks={i: square(1) for i in "abc"})
    for p in (root / "images").iterdir():
        p.unlink()
    (root / "images").rmdir()
    (root / "images").write_text("not a folder")
    for opener in (lambda: open_dataset(root, "train"), lambda: load_folders(root)):
        with pytest.raises(DataError, match=rf"^{root / 'images'}: is a file, but images/ must be a folder"):
            opener()
    root = make_folders(tmp_path / "g")
    (root / "masks").write_text("not a folder")
    with pytest.raises(DataError, match=rf"^{root / 'masks'}: is a file, but masks/ must be a folder"):
        open_dataset(root, "train")
    voc = make_voc(tmp_path / "voc")
    for p in (voc / "SegmentationClass").iterdir():
        p.unlink()
    (voc / "SegmentationClass").rmdir()
    (voc / "SegmentationClass").write_text("not a folder")
    with pytest.raises(DataError, match=rf"^{voc / 'SegmentationClass'}: is a file, but SegmentationClass/"):
        load_voc(voc, "train")


def test_an_unreadable_image_folder_is_named(tmp_path, monkeypatch):
    root = make_folders(tmp_path / "f", masks={i: square(1) for i in "abc"})
    real_iterdir = Path.iterdir

    def refuse(self):
        if self.name == "images":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(DataError, match=rf"^{root / 'images'}: permission denied"):
        open_dataset(root, "train")
