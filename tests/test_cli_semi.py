"""`frugalseg train --semi dtc|cotrain|meanteacher|none`: tiny real ACDC runs, resume, re-run, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import data_path
from cli_run import run_main
from frugalseg.cli import cli

pytest.importorskip("monai")


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(semi: str, out: Path, *extra: str) -> list[str]:
    return ["train", "--semi", semi, "--data", "acdc", "--out", str(out), "--unlabelled-limit", "4",
            "--patch-size", "32", "--channels", "4,8", "--labelled-batch-size", "1", "--unlabelled-batch-size", "1",
            "--iterations", "2", "--val-limit", "1", "--val-every", "0", "--no-progress", *extra]


def _main(args: list[str], monkeypatch) -> tuple[int, str]:
    """Run the real entry point (`frugalseg ...`): exit code and stderr."""
    code, _, err = run_main(args, monkeypatch)
    return code, err


EXPECTED = {
    "dtc": ("model", "levelset_unet2d"),
    "cotrain": ("models", "unet2d"),
    "meanteacher": ("model", "unet2d"),
    "none": ("model", "unet2d"),
}


@pytest.mark.parametrize("semi", ["dtc", "cotrain", "meanteacher", "none"])
def test_train_semi_tiny_acdc_run_writes_the_run_directory(tmp_path, semi):
    data_path("acdc")
    out = tmp_path / semi
    extra = ["--labelled-patients", "3", "--models", "3", "--no-adversarial"] if semi == "cotrain" else \
        ["--labelled-patients", "1"]
    res = CliRunner().invoke(cli, _tiny(semi, out, *extra), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert f"(--semi {semi}," in res.output and "val mean Dice" in res.output and "HD95" in res.output
    for rel in ("config.yaml", "budget.json", "checkpoints/last.ckpt", "logs/metrics.csv", "metrics/val.json",
                "stages/train.done"):
        assert (out / rel).exists(), rel
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["semi"] == semi and saved["dims"] == 2 and saved["patch_size"] == [32, 32]
    assert saved["iterations"] == 2 and saved["val_split"] == "val"
    folder, arch = EXPECTED[semi]
    budget = json.loads((out / "budget.json").read_text())
    if semi == "cotrain":
        assert saved["n_models"] == 3 and saved["adversarial"] is False
        assert len(budget["streams"]) == 3 and (out / "views.json").exists()
        assert sorted((out / "models" / "members").iterdir()) == [out / "models" / "members" / str(k) for k in range(3)]
        spec = json.loads((out / "models" / "ensemble.json").read_text())["model"]
    else:
        spec = json.loads((out / folder / "config.json").read_text())["model"]
    assert spec["arch"] == arch and spec["method"] == semi
    assert len(budget["unlabelled"]) == (0 if semi == "none" else 4)
    metrics = json.loads((out / "metrics" / "val.json").read_text())
    assert metrics["method"] == semi and metrics["samples"] == 1 and metrics["kind"] == "volume"
    case = metrics["per_case"][0]  # one case: the case means are its values, Jaccard follows from Dice
    assert metrics["case_mean_dice"] == pytest.approx(sum(case["dice"].values()) / 3)
    assert case["jaccard"] == pytest.approx({c: d / (2 - d) for c, d in case["dice"].items()})
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_finished_run_is_skipped_resume_continues_and_config_reruns(tmp_path):
    data_path("acdc")
    out = tmp_path / "dtc"
    args = _tiny("dtc", out, "--labelled-patients", "1")
    assert CliRunner().invoke(cli, args, catch_exceptions=False).exit_code == 0
    stamp = (out / "checkpoints" / "last.ckpt").stat().st_mtime
    res = CliRunner().invoke(cli, args, catch_exceptions=False)  # finished: not retrained
    assert res.exit_code == 0 and (out / "checkpoints" / "last.ckpt").stat().st_mtime == stamp
    res = CliRunner().invoke(cli, [*args, "--iterations", "4", "--resume"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    # the saved config knows its method: --config re-runs it (options still override)
    again = tmp_path / "again"
    res = CliRunner().invoke(cli, ["train", "--config", str(out / "config.yaml"), "--out", str(again),
                                   "--iterations", "2", "--no-resume"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((again / "config.yaml").read_text())["semi"] == "dtc" and (again / "model").is_dir()


@pytest.mark.parametrize("args, message", [
    (["--semi", "meanteacher", "--labelled-fraction", "0.005"],
     "labelled_fraction=0.005 of the 50 patients of acdc:train selects no patient"),
    (["--semi", "dtc"], "exactly one of labelled_patients, labelled_fraction, labelled_ids"),
    (["--semi", "dtc", "--labelled-patients", "1", "--labelled-fraction", "0.1"], "exactly one of"),
    (["--iterations", "5"], "--iterations is an option of semi-supervised training: add --semi"),
    (["--semi", "dtc", "--labelled-patients", "1", "--models", "3"],
     "--n-models is an option of --semi cotrain, not of --semi dtc"),
    (["--semi", "none", "--labelled-patients", "1", "--mask-fraction", "0.1"],
     "choose the labelled set with --labelled-patients, --labelled-fraction"),
    (["--semi", "cotrain", "--labelled-patients", "2", "--models", "3"], "need at least 3 labelled patients"),
    (["--semi", "dtc", "--labelled-patients", "1", "--patch-size", "64,64,64"], "must give 1 or 2 sizes for 2D"),
    (["--semi", "dtc", "--labelled-patients", "1", "--arch", "ocr"],
     "--arch ocr is not a choice of --semi dtc: DTC's level-set head"),
    (["--arch", "vnet"], "--arch vnet is not a choice of supervised training (no --semi): ocr, fcn, unet2d"),
])
def test_semi_input_errors_give_one_clear_line(tmp_path, monkeypatch, args, message):
    data_path("acdc")
    code, err = _main(["train", "--data", "acdc", "--out", str(tmp_path / "r"), *args], monkeypatch)
    assert code == 2, err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_unknown_method_and_config_of_another_method(tmp_path, monkeypatch):
    res = CliRunner().invoke(cli, ["train", "--semi", "fixmatch", "--data", "acdc"])
    assert res.exit_code == 2 and "Invalid value for '--semi'" in res.output
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"semi": "dtc", "data": "acdc", "labelled_patients": 1}))
    code, err = _main(["train", "--config", str(cfg), "--semi", "cotrain"], monkeypatch)
    assert code == 2 and "is a --semi dtc run; it cannot be re-run with --semi cotrain" in err


def test_a_run_written_before_the_natural_image_options_is_still_its_own_run(tmp_path):
    """config.yaml files written before --arch ocr/fcn, --jitter, --scale ... existed lack those keys: the same
    command finds the finished run and skips it (the new options at their defaults change nothing)."""
    data_path("acdc")
    out = tmp_path / "old"
    args = _tiny("meanteacher", out, "--labelled-patients", "1")
    assert CliRunner().invoke(cli, args, catch_exceptions=False).exit_code == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    for key in ("backbone", "pretrained", "output_stride", "aux_stage", "aux_weight", "scale", "base_size", "jitter"):
        saved.pop(key)
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    again = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert "val mean Dice" in again.output
