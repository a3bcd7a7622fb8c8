"""Runs never lose data or give a silently wrong result: exact resume, run folders kept to their settings,
Ctrl-C, and `predict` that never overwrites its inputs (tiny generated data, real training)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cli_run import run_main
from frugalseg.data.synthetic import make_shapes_dataset
from frugalseg.stages import engine
from frugalseg.stages.train import TrainConfig, output_names, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _main(args: list[str], monkeypatch) -> tuple[int, str, str]:
    return run_main(args, monkeypatch)


def _common(data: Path, **extra) -> dict:
    return {**dict(data=str(data), arch="fcn", pretrained=False, epochs=3, batch_size=4, crop_size=48, progress=False),
            **extra}


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--arch", "fcn", "--pretrained", "false", "--epochs", "1",
            "--batch-size", "4", "--crop-size", "48", "--no-progress", *extra]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def _log_rows(run: Path) -> list[tuple[str, str, tuple[str, ...]]]:
    """(epoch, step, the columns filled) of every row of logs/metrics.csv."""
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return [(r["epoch"], r["step"], tuple(sorted(k for k, v in r.items() if v))) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "d", n_train=12, n_val=4, size=48, seed=3)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """The uninterrupted run, with one intra-op thread like the tests (a module fixture is made before the
    function-scoped `one_thread`, and another thread count sums floats in another order)."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(out=str(out), **_common(data)))
    finally:
        torch.set_num_threads(threads)
    return out


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(data, straight, tmp_path, monkeypatch):
    """Killed in the middle of epoch 1 (after epoch 0's checkpoint), then `--resume`: the same weights, bit for
    bit, and a log holding every step once (the killed attempt's rows after its checkpoint are dropped)."""
    out = tmp_path / "resumed"

    def stop_in_epoch_1(self, outputs, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine.SegmentationModule, "on_train_batch_end", stop_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(out), **_common(data)))
    assert (out / "checkpoints" / "last.ckpt").exists() and not (out / "stages" / "train.done").exists()
    monkeypatch.undo()
    train(TrainConfig(out=str(out), resume=True, **_common(data)))
    a, b = _weights(straight), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _log_rows(out) == _log_rows(straight) and len(_log_rows(out)) >= 3
    assert not list((out / "logs").glob("resume_*"))


def test_drop_rows_after_keeps_earlier_epochs_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss_step\n0,0,1.0\n0,1,0.9\n1,2,0.8\n1,3,0.7\n2,4")
    engine.drop_rows_after(path, 0)
    assert path.read_text().splitlines() == ["epoch,step,train/loss_step", "0,0,1.0", "0,1,0.9"]


def test_ctrl_c_during_train_says_how_to_resume_and_exits_130(data, tmp_path, monkeypatch):
    def interrupt(self, outputs, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.SegmentationModule, "on_train_batch_end", interrupt)
    code, _, err = _main(_train_args(data, tmp_path / "r"), monkeypatch)
    assert code == 130
    assert "interrupted: the run can continue with --resume" in err and "Traceback" not in err


def test_finished_run_refuses_other_settings_and_changes_nothing(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    code, _, err = _main(_train_args(data, out), monkeypatch)
    assert code == 0, err
    before = {p: p.read_bytes() for p in (out / "config.yaml", out / "report.html", out / "metrics" / "val.json")}
    code, _, err = _main(_train_args(data, out, "--lr", "0.5"), monkeypatch)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert f"{out} holds a finished run made with other settings (lr 0.01 there, 0.5 here)" in err
    assert all(p.read_bytes() == content for p, content in before.items())
    # the same settings re-run: not retrained; other devices/progress/workers are not other settings
    code, _, err = _main(_train_args(data, out, "--num-workers", "0", "--devices", "cpu"), monkeypatch)
    assert code == 0, err
    # a longer schedule needs --resume, and says so
    code, _, err = _main(_train_args(data, out, "--epochs", "2"), monkeypatch)
    assert code == 2 and "To continue it to a longer schedule, add --resume." in err


def test_resume_onto_a_checkpoint_of_other_classes_is_refused_before_writing(tmp_path, monkeypatch):
    data = make_shapes_dataset(tmp_path / "d", n_train=8, n_val=4, size=48, seed=5)
    out = tmp_path / "run"
    code, _, err = _main(_train_args(data, out), monkeypatch)
    assert code == 0, err
    classes = (data / "classes.txt").read_text().split()
    (data / "classes.txt").write_text("\n".join([classes[0], *reversed(classes[1:])]) + "\n")  # same data path
    config = (out / "config.yaml").read_bytes()
    code, _, err = _main(_train_args(data, out, "--resume"), monkeypatch)
    assert code == 2 and "--resume onto a checkpoint of other classes" in err and "Traceback" not in err, err
    assert str(out / "checkpoints" / "last.ckpt") in err
    assert (out / "config.yaml").read_bytes() == config


# ---- predict -------------------------------------------------------------------------------------------------
def test_predict_never_overwrites_inputs_and_keeps_colliding_names_apart(data, straight, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    src = sorted((data / "images").glob("*.png"))
    for k, p in enumerate(src[:3]):
        shutil.copy(p, folder / f"{k:03d}.png")
    Image.open(src[3]).convert("RGB").save(folder / "001.jpg")  # same stem as 001.png
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    inputs = {p.name: p.read_bytes() for p in folder.iterdir()}

    code, _, err = _main(["predict", str(folder), "--model", str(straight), "--out", str(folder)], monkeypatch)
    assert code == 2 and "holds input images" in err and "Choose another --out" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == inputs  # nothing written, nothing overwritten

    out = tmp_path / "masks"
    code, stdout, err = _main(["predict", str(folder), "--model", str(straight), "--out", str(out)], monkeypatch)
    assert code == 1, err
    assert "wrote 4 masks" in stdout and "1 input(s) skipped" in err and "broken.png" in err
    assert sorted(p.name for p in out.glob("*.png")) == ["000.png", "001.jpg.png", "001.png.png", "002.png"]
    assert len(list((out / "overlays").glob("*.jpg"))) == 4
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == inputs


def test_output_names_are_unique_for_same_names_in_two_folders(tmp_path):
    files = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "a" / "y.png", tmp_path / "a" / "y.jpg"]
    names = output_names(files)
    assert names == ["a_x.png", "b_x.png", "y.png", "y.jpg"]
    assert len(set(names)) == len(names)


def test_predict_mask_values_are_class_ids(straight, data, tmp_path):
    from frugalseg.stages.train import predict_files

    result = predict_files(straight / "model", [sorted((data / "images").glob("*.png"))[0]], tmp_path / "o",
                           overlays=False)
    assert not result.failed and len(result.written) == 1
    mask = np.asarray(Image.open(result.written[0]))
    assert mask.shape == (48, 48) and mask.max() < 4
    assert yaml.safe_load((straight / "config.yaml").read_text())["epochs"] == 3


def test_settings_guard_sees_a_moved_run_folder_as_the_same_run(tmp_path):
    """A run folder copied or moved with its inputs (a pipeline's segmenter and its mask folder) is the same run;
    an input elsewhere is another setting. YAML's lists and tuples, and defaults an older file lacks, are equal."""
    from frugalseg.runs import RunDir
    from frugalseg.stages.run_guard import setting_differences

    old = TrainConfig(data="/data/shapes", out="/old/run/segmenter", mask_dir="/old/run/regions", scale=(0.5, 2.0))
    RunDir(tmp_path / "new" / "segmenter").save_config(old)
    saved = yaml.safe_load((tmp_path / "new" / "segmenter" / "config.yaml").read_text())
    del saved["val_every"]  # written by an earlier version without it: its default
    (tmp_path / "new" / "segmenter" / "config.yaml").write_text(yaml.safe_dump(saved))
    run = RunDir(tmp_path / "new" / "segmenter")
    moved = TrainConfig(data="/data/shapes", out=str(tmp_path / "new" / "segmenter"),
                        mask_dir=str(tmp_path / "new" / "regions"), scale=(0.5, 2.0))
    assert setting_differences(run, moved) == {}
    elsewhere = TrainConfig(data="/data/shapes", out=str(tmp_path / "new" / "segmenter"), mask_dir="/old/run/other")
    assert setting_differences(run, elsewhere) == {"mask_dir": ("/old/run/regions", "/old/run/other")}


def test_resume_from_a_truncated_checkpoint_names_it_and_changes_nothing(data, straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    ckpt = out / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])
    config = (out / "config.yaml").read_text().replace(str(straight), str(out))
    (out / "config.yaml").write_text(config)
    args = ["train", "--data", str(data), "--out", str(out), "--arch", "fcn", "--pretrained", "false", "--epochs", "3",
            "--batch-size", "4", "--crop-size", "48", "--no-progress", "--resume"]
    code, _, err = _main(args, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{ckpt}: truncated or corrupt checkpoint" in err and "delete it to train from scratch" in err
    assert (out / "config.yaml").read_text() == config


def test_settings_guard_rules(tmp_path, monkeypatch):
    """Paths written another way are the same path; evaluation-only fields are free; --resume may lengthen the
    schedule, never shorten it; a folder without outputs takes new settings; a relative --out moved with its
    tree is the same run."""
    from frugalseg.runs import RunDir
    from frugalseg.stages.run_guard import claim_run_dir, setting_differences

    monkeypatch.chdir(tmp_path)
    run = RunDir("runs/p/round1/segmenter")
    run.save_config(TrainConfig(data="data/shapes", out="runs/p/round1/segmenter", mask_dir="runs/p/round1/regions",
                                epochs=5))
    same = TrainConfig(data="./data/shapes/", out="runs/p/round1/segmenter/", mask_dir="runs/p/round1/regions/",
                       epochs=5, val_split="test", val_every=3)
    assert setting_differences(run, same) == {}
    longer = TrainConfig(data="data/shapes", out="runs/p/round1/segmenter", mask_dir="runs/p/round1/regions",
                         epochs=8, resume=True)
    assert setting_differences(run, longer) == {}
    shorter = TrainConfig(data="data/shapes", out="runs/p/round1/segmenter", mask_dir="runs/p/round1/regions",
                          epochs=3, resume=True)
    assert setting_differences(run, shorter) == {"epochs": (5, 3)}
    shutil.copytree("runs/p", "runs/q")
    moved = TrainConfig(data="data/shapes", out="runs/q/round1/segmenter", mask_dir="runs/q/round1/regions", epochs=5)
    assert setting_differences(RunDir("runs/q/round1/segmenter"), moved) == {}
    other_data = TrainConfig(data="other/shapes", out="runs/q/round1/segmenter", mask_dir="runs/q/round1/regions",
                             epochs=5)
    assert setting_differences(RunDir("runs/q/round1/segmenter"), other_data) == {"data": ("data/shapes", "other/shapes")}
    # nothing trained yet (no checkpoint, not finished): the folder takes the new settings
    claim_run_dir(run, shorter, finished=False, started=False)
    assert yaml.safe_load((tmp_path / "runs/p/round1/segmenter/config.yaml").read_text())["epochs"] == 3
    with pytest.raises(Exception, match="holds a run made with other settings"):
        claim_run_dir(run, other_data, finished=False, started=True)


def test_resume_with_data_loading_workers_equals_the_uninterrupted_run(data, tmp_path, monkeypatch):
    """Worker processes draw their seeds from the loader's own generator, not the global RNG: a resumed run
    whose workers start again still ends with the weights of the uninterrupted one."""
    common = _common(data, epochs=2, num_workers=1)
    train(TrainConfig(out=str(tmp_path / "straight"), **common))

    def stop(self, outputs, batch, batch_idx):
        if self.current_epoch == 1 and batch_idx == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine.SegmentationModule, "on_train_batch_end", stop)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(tmp_path / "resumed"), **common))
    monkeypatch.undo()
    train(TrainConfig(out=str(tmp_path / "resumed"), resume=True, **common))
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _log_rows(tmp_path / "resumed") == _log_rows(tmp_path / "straight")


@pytest.mark.parametrize("command", [["classify", "--epochs", "1"], ["run", "--classifier-epochs", "1"]])
def test_a_missing_evaluation_split_is_named_before_anything_trains(tmp_path, monkeypatch, command):
    data = make_shapes_dataset(tmp_path / "d", n_train=6, n_val=2, size=48, seed=1)
    shutil.rmtree(data / "splits")  # no splits/: only 'train' exists, the default evaluation split 'val' does not
    out = tmp_path / "out"
    code, _, err = _main([command[0], "--data", str(data), "--out", str(out), *command[1:], "--no-progress"],
                         monkeypatch)
    assert code == 2 and "there is no splits/ folder, so no 'val' split" in err, err
    assert not out.exists()  # nothing trained, nothing written


def test_maps_folder_made_with_other_settings_is_refused(tmp_path, monkeypatch):
    """`cams` keeps the maps a folder holds: maps made with other settings (another method's knobs) must not be
    mixed into a run with these; showing more gallery images or mapping more images is the same run."""
    from frugalseg.runs import RunDir
    from frugalseg.stages.maps import MAPS_FREE_FIELDS, MapsConfig
    from frugalseg.stages.run_guard import claim_run_dir

    out = RunDir(tmp_path / "maps")
    first = MapsConfig(classifier="runs/c", out=str(out.path), method="advcam", restriction=7.0)
    claim_run_dir(out, first, finished=True, started=True, free=MAPS_FREE_FIELDS, rerun_hint=False)
    more = MapsConfig(classifier="runs/c", out=str(out.path), method="advcam", restriction=7.0, gallery_images=5,
                      limit=40)
    claim_run_dir(out, more, finished=True, started=True, free=MAPS_FREE_FIELDS, rerun_hint=False)
    other = MapsConfig(classifier="runs/c", out=str(out.path), method="advcam", restriction=0.0)
    with pytest.raises(Exception, match=r"holds a finished run made with other settings \(restriction 7.0 there"):
        claim_run_dir(out, other, finished=True, started=True, free=MAPS_FREE_FIELDS, rerun_hint=False)


def test_train_refuses_0_255_masks_with_validates_message_before_training(tmp_path, monkeypatch):
    """The common binary export (object = 255, i.e. void here): `train` refuses it with `data validate`'s
    message, exit 2, before a run folder exists (no silent val mIoU 1.0 over null classes)."""
    data = make_shapes_dataset(tmp_path / "d", n_train=6, n_val=2, size=48, seed=1)
    (data / "classes.txt").write_text("background\nobject\n")
    (data / "tags.csv").unlink()  # its tags name the shapes' classes
    for mask in (data / "masks").glob("*.png"):
        ids = np.asarray(Image.open(mask))
        Image.fromarray(np.where(ids > 0, 255, 0).astype(np.uint8)).save(mask)
    out = tmp_path / "run"
    code, _, err = _main(_train_args(data, out), monkeypatch)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "every mask holds only 0 and 255" in err and "Store the object as class 1" in err
    assert not out.exists()
