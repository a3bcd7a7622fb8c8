"""A tiny real run through the CLI: train -> eval -> predict, resume, re-run from config, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from frugalseg.cli import cli
from frugalseg.export import load_export


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--arch", "fcn", "--pretrained", "false",
            "--epochs", "1", "--batch-size", "4", "--crop-size", "64", "--no-progress", *extra]


@pytest.fixture(scope="module")
def trained_run(shapes_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    res = CliRunner().invoke(cli, _train_args(shapes_dataset, out), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "val mIoU" in res.output
    return out


def test_run_directory_contents(trained_run):
    for rel in ("config.yaml", "checkpoints/last.ckpt", "model/model.safetensors", "model/config.json",
                "metrics/val.json", "stages/train.done", "logs/metrics.csv", "report.html"):
        assert (trained_run / rel).exists(), rel
    preds = sorted((trained_run / "predictions" / "val").glob("*.png"))
    assert len(preds) == 4 and Image.open(preds[0]).mode == "P"
    metrics = json.loads((trained_run / "metrics" / "val.json").read_text())
    assert metrics["split"] == "val" and metrics["samples"] == 4 and metrics["kind"] == "2d"
    assert set(metrics["per_class"]) == {"background", "disc", "square", "triangle"}
    ious = [c["iou"] for c in metrics["per_class"].values() if c["iou"] is not None]
    assert metrics["miou"] == pytest.approx(sum(ious) / len(ious), abs=1e-5)  # one confusion matrix, one mean
    # the evaluation schema every run writes (supervised or semi-supervised, 2D or volumes)
    assert {"case_mean_dice", "case_mean_jaccard", "case_mean_hd95", "case_mean_asd", "surface", "per_case",
            "surface_units"} <= set(metrics) and len(metrics["per_case"]) == 4 and metrics["surface_units"] == "pixel"
    assert not list(trained_run.rglob("*.tmp"))  # atomic writes left nothing behind
    assert [p.relative_to(trained_run).as_posix() for p in trained_run.rglob("*.ckpt")] == ["checkpoints/last.ckpt"]


def test_checkpoint_and_export_carry_label_spec(trained_run):
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["frugalseg"]["labels"]["names"] == ["background", "disc", "square", "triangle"]
    assert ckpt["frugalseg"]["format_version"] == 1
    m1, spec, labels = load_export(trained_run / "model")
    m2, _, _ = load_export(trained_run / "checkpoints" / "last.ckpt")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m1(x), m2(x), atol=1e-5)
    assert spec["arch"] == "fcn" and labels.num_classes == 4


def test_eval_command_reproduces_metrics(trained_run):
    before = json.loads((trained_run / "metrics" / "val.json").read_text())["miou"]
    res = CliRunner().invoke(cli, ["eval", str(trained_run), "--split", "val"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["miou"] == pytest.approx(before, abs=1e-6)


def test_predict_writes_masks_and_overlays(trained_run, shapes_dataset, tmp_path):
    images = sorted((shapes_dataset / "images").glob("*.png"))[:2]
    res = CliRunner().invoke(cli, ["predict", *map(str, images), "--model", str(trained_run), "--out", str(tmp_path)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = sorted(tmp_path.glob("*.png"))
    assert [p.stem for p in out] == [p.stem for p in images]
    mask = np.asarray(Image.open(out[0]))
    assert mask.shape == (64, 64) and mask.max() < 4
    assert len(list((tmp_path / "overlays").glob("*.jpg"))) == 2


def test_finished_run_is_skipped_and_resume_continues(trained_run, shapes_dataset):
    stamp = (trained_run / "checkpoints" / "last.ckpt").stat().st_mtime
    res = CliRunner().invoke(cli, _train_args(shapes_dataset, trained_run), catch_exceptions=False)
    assert res.exit_code == 0 and (trained_run / "checkpoints" / "last.ckpt").stat().st_mtime == stamp
    # resume to a longer schedule continues from epoch 1, not from scratch
    res = CliRunner().invoke(cli, _train_args(shapes_dataset, trained_run, "--epochs", "2", "--resume"), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6  # 12 images / batch 4 = 3 steps per epoch, 2 epochs in all
    # the log holds epoch 0 from the first fit and epoch 1 from the resumed one, each once
    import csv

    with open(trained_run / "logs" / "metrics.csv", newline="") as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    assert epochs == [0, 1]
    assert not list((trained_run / "logs").glob("resume_*"))


def test_rerun_from_saved_config(trained_run, tmp_path):
    cfg = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert cfg["arch"] == "fcn" and cfg["crop_size"] == 64
    res = CliRunner().invoke(cli, ["train", "--config", str(trained_run / "config.yaml"), "--out", str(tmp_path / "again"),
                                   "--max-steps", "1"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())["crop_size"] == 64


def test_label_budget_is_recorded(shapes_dataset, tmp_path):
    out = tmp_path / "budget"
    res = CliRunner().invoke(cli, _train_args(shapes_dataset, out, "--mask-fraction", "0.5", "--val-every", "5"),
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    budget = json.loads((out / "budget.json").read_text())
    assert len(budget["mask"]) == 6 and len(budget["none"]) == 6
    # checkpoints follow training epochs, not the (here sparser) validation interval
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1  # 6 masked images, batch 4, drop_last: 1 step


def test_checkpoint_written_every_epoch_without_validation(tmp_path):
    """last.ckpt exists after epoch 0 even when validation never runs (resume after a kill mid-run)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from frugalseg.stages.engine import LastCheckpoint

    seen = []

    class Probe(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            seen.append((tmp_path / "last.ckpt").exists())

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def training_step(self, batch, i):
            return self.lin(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_epochs=3, callbacks=[LastCheckpoint(tmp_path / "last.ckpt"), Probe()], logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2))
    assert seen == [False, True, True]
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 6


def test_cli_bad_input_gives_one_clear_line(tmp_path):
    (tmp_path / "images").mkdir()
    proc = subprocess.run([sys.executable, "-m", "frugalseg.cli", "train", "--data", str(tmp_path), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "no images found" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "frugalseg.cli", "data", "validate", str(tmp_path / "nothing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "neither a folder nor a known dataset" in proc.stderr


@pytest.mark.usefixtures("one_thread")
def test_segmenter_beats_predicting_background(shapes_dataset, tmp_path):
    """Not only plumbing: a small U-Net trained for a few seconds clearly beats the all-background prediction
    (the mIoU it would get is the background's pixel share over the number of classes)."""
    out = tmp_path / "unet"
    res = CliRunner().invoke(cli, ["train", "--data", str(shapes_dataset), "--out", str(out), "--arch", "unet2d",
                                   "--policy", "resize", "--crop-size", "64", "--epochs", "10", "--lr", "0.05",
                                   "--loss", "dice_ce", "--batch-size", "4", "--val-every", "100", "--no-progress"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics" / "val.json").read_text())
    per_class = metrics["per_class"]
    background_share = per_class["background"]["pixels"] / sum(c["pixels"] for c in per_class.values())
    all_background_miou = background_share / len(per_class)  # IoU 0 for every foreground class
    assert metrics["miou"] > 2 * all_background_miou  # measured: 0.69 against 0.21
    assert all(per_class[c]["iou"] > 0.2 for c in ("disc", "square", "triangle"))


def test_same_seed_same_weights(shapes_dataset, tmp_path):
    """Seeded runs are reproducible on CPU: same seed -> identical weights, other seed -> different."""
    from safetensors.torch import load_file

    states = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        res = CliRunner().invoke(cli, _train_args(shapes_dataset, tmp_path / name, "--max-steps", "2", "--seed", seed,
                                                  "--val-split", ""), catch_exceptions=False)
        assert res.exit_code == 0, res.output
        states.append(load_file(str(tmp_path / name / "model" / "model.safetensors")))
    key = "head.cls.weight"
    assert torch.equal(states[0][key], states[1][key])
    assert not torch.equal(states[0][key], states[2][key])
