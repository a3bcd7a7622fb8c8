"""Every config value is checked when a config is made, however it is made (Python, a saved config.yaml, the
command line): its type from the field's annotation, its range from the field's `option(..., ge=/gt=/le=/lt=/
choices=/check=)`. A wrong value is one `ConfigError` line naming the field, the value and what it must be."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import frugalseg.stages
from cli_run import run_main
from frugalseg.errors import ConfigError
from frugalseg.stages.options import OptionValueError, RunOptions, load_config, option, undeclared_ranges


def _config_classes() -> list[type]:
    """Every config class of every stage module (RunOptions and all its subclasses)."""
    for module in pkgutil.iter_modules(frugalseg.stages.__path__):
        importlib.import_module(f"frugalseg.stages.{module.name}")
    found, todo = set(), [RunOptions]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("frugalseg.") and cls not in found:
            found.add(cls)
            todo += cls.__subclasses__()
    return sorted(found, key=lambda c: c.__name__)


CONFIGS = _config_classes()
CONFIG_IDS = [c.__name__ for c in CONFIGS]


def test_the_stage_configs_are_all_found():
    names = set(CONFIG_IDS)
    assert {"RunOptions", "TrainConfig", "SemiConfig", "DTCConfig", "MeanTeacherConfig", "CoTrainConfig",
            "SupervisedOnlyConfig", "ClassifyConfig", "MapsConfig", "GroupConfig", "GroupMapsConfig",
            "PipelineConfig"} <= names


# ---- types --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CONFIGS, ids=CONFIG_IDS)
def test_defaults_are_valid_and_every_field_rejects_a_wrong_type(cls):
    cls()  # the declared defaults pass their own checks
    for fld in dataclasses.fields(cls):
        with pytest.raises(OptionValueError) as info:
            cls(**{fld.name: object()})
        assert info.value.name == fld.name
        assert str(info.value).startswith(f"{fld.name}: expected ") and "(object)." in str(info.value)


@pytest.mark.parametrize("cls, kwargs, message", [
    ("TrainConfig", dict(epochs="one"), "epochs: expected an integer, got 'one' (str)."),
    ("TrainConfig", dict(arch="unet"), "arch: expected one of 'ocr', 'fcn', 'unet2d', got 'unet' (str)."),
    ("TrainConfig", dict(scale=(0.5, 1.0, 2.0)), "scale: expected 2 numbers, got (0.5, 1.0, 2.0) (tuple)."),
    ("TrainConfig", dict(pretrained=1), "pretrained: expected true or false or a string, got 1 (int)."),
    ("RunOptions", dict(progress="yes"), "progress: expected true or false, got 'yes' (str)."),
    ("RunOptions", dict(num_workers=2.0), "num_workers: expected an integer, got 2.0 (float)."),
    ("SemiConfig", dict(channels=[16, "32"]), "channels: expected a list of integers, got [16, '32'] (list)."),
    ("DTCConfig", dict(k="big"), "k: expected a number, got 'big' (str)."),
    ("MeanTeacherConfig", dict(consistency=True), "consistency: expected a number or None (null), got True (bool)."),
    ("CoTrainConfig", dict(adversarial="no"), "adversarial: expected true or false, got 'no' (str)."),
    ("SupervisedOnlyConfig", dict(network="fancy"), "network: expected one of 'plain', 'levelset', got 'fancy'"),
    ("ClassifyConfig", dict(scale=0.5), "scale: expected 2 numbers, got 0.5 (float)."),
    ("MapsConfig", dict(method="gradcam"), "method: expected one of 'cam', 'advcam', 'prm', got 'gradcam'"),
    ("GroupConfig", dict(lr_steps=(5, "ten")), "lr_steps: expected a list of integers, got (5, 'ten') (tuple)."),
    ("GroupMapsConfig", dict(flips=0), "flips: expected true or false, got 0 (int)."),
    ("PipelineConfig", dict(rounds=1.5), "rounds: expected an integer, got 1.5 (float)."),
])
def test_a_wrong_type_names_the_field_and_what_it_expects(cls, kwargs, message):
    with pytest.raises(ConfigError) as info:
        _config(cls)(**kwargs)
    assert str(info.value).startswith(message)


def _config(name: str) -> type:
    return next(c for c in CONFIGS if c.__name__ == name)


def test_sensible_conversions():
    train = _config("TrainConfig")
    cfg = train(lr=1, scale=[0.5, 1], out=Path("runs/x"), devices=1, labelled_ids=("a", "b"), mask_fraction=None,
                epochs=np.int64(3), weight_decay="1e-4")  # PyYAML reads 1e-4 (no dot) as a string
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.scale == (0.5, 1.0) and isinstance(cfg.scale, tuple)
    assert cfg.out == "runs/x" and cfg.devices == "1" and cfg.labelled_ids == ["a", "b"]
    assert cfg.epochs == 3 and type(cfg.epochs) is int and cfg.weight_decay == 1e-4
    assert train(pretrained="weights.pth").pretrained == "weights.pth" and train(pretrained=False).pretrained is False
    assert _config("CoTrainConfig")(patch_size=32).patch_size == 32  # one size for every axis
    assert _config("CoTrainConfig")(patch_size=(32, 24)).patch_size == [32, 24]
    with pytest.raises(ConfigError, match="weight_decay: expected a number, got 'nan'"):
        train(weight_decay="nan")


# ---- ranges -------------------------------------------------------------------------------------------
def _scalar_and_shape(tp):
    """(the number type, a function shaping one number into the annotation's container)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
        scalar = [a for a in args if a in (int, float)]
        return (scalar[0], lambda x: x) if scalar else _scalar_and_shape(args[0])
    origin = typing.get_origin(tp)
    if origin is tuple and args[-1] is not Ellipsis:
        return args[0], lambda x: (x,) * len(args)
    if origin in (tuple, list):
        return args[0], (lambda x: (x,)) if origin is tuple else (lambda x: [x])
    return tp, lambda x: x


def _just_outside(fld):
    meta = fld.metadata
    bounds, choices = meta.get("bounds") or {}, meta.get("choices")
    if choices:
        return max(choices) + 1
    if "ge" in bounds:
        return bounds["ge"] - 1
    if "gt" in bounds:
        return bounds["gt"]
    if "le" in bounds:
        return bounds["le"] + 1
    if "lt" in bounds:
        return bounds["lt"]
    return None


@pytest.mark.parametrize("cls", CONFIGS, ids=CONFIG_IDS)
def test_every_declared_range_rejects_a_value_just_outside_it(cls):
    hints = typing.get_type_hints(cls)
    tried = 0
    for fld in dataclasses.fields(cls):
        bad = _just_outside(fld)
        if bad is None:
            continue
        scalar, shape = _scalar_and_shape(hints[fld.name])
        value = shape(scalar(bad))
        with pytest.raises(OptionValueError) as info:
            cls(**{fld.name: value})
        assert info.value.name == fld.name and info.value.kind == "range", str(info.value)
        assert str(info.value).startswith(f"{fld.name} must ") and "\n" not in str(info.value)
        tried += 1
    assert tried >= 2  # every config has ranged fields (seed, num_workers at least)


@pytest.mark.parametrize("cls, kwargs, message", [
    ("TrainConfig", dict(crop_size=0), "crop_size must be >= 1, got 0 (Training crop (crop policy)"),
    ("TrainConfig", dict(scale=(2.0, 0.5)), "scale must be (min max) with min <= max, got (2.0, 0.5)"),
    ("TrainConfig", dict(epochs=0), "epochs must be -1 (no limit) or >= 1, got 0"),
    ("TrainConfig", dict(lr=0), "lr must be > 0, got 0.0"),
    ("RunOptions", dict(seed=-1), "seed must be in [0, 4294967295], got -1"),
    ("SemiConfig", dict(dims=4), "dims must be one of 2, 3, got 4"),
    ("SemiConfig", dict(patch_size=[64, 0]), "patch_size must all be >= 1, got [64, 0]"),
    ("DTCConfig", dict(consistency=-0.1), "consistency must be >= 0, got -0.1"),
    ("MeanTeacherConfig", dict(ema_decay=1.0), "ema_decay must be in [0, 1), got 1.0"),
    ("CoTrainConfig", dict(n_models=1), "n_models must be >= 2, got 1"),
    ("CoTrainConfig", dict(adv_clamp=[1.0, 0.0]), "adv_clamp must be (min max) with min <= max"),
    ("SupervisedOnlyConfig", dict(labelled_fraction=1.5), "labelled_fraction must be in (0, 1], got 1.5"),
    ("ClassifyConfig", dict(output_stride=12), "output_stride must be one of 8, 16, 32, got 12"),
    ("MapsConfig", dict(scales=(1.0, 0.0)), "scales must all be > 0, got (1.0, 0.0)"),
    ("GroupConfig", dict(color_jitter=(0.3, 0.3, 0.3, 0.6)), "color_jitter must have hue (the last) <= 0.5"),
    ("GroupMapsConfig", dict(gallery_threshold=1.5), "gallery_threshold must be in [0, 1], got 1.5"),
    ("PipelineConfig", dict(calibration_fraction=1.0), "calibration_fraction must be in (0, 1), got 1.0"),
])
def test_an_out_of_range_value_names_the_field_the_value_and_the_range(cls, kwargs, message):
    with pytest.raises(ConfigError) as info:
        _config(cls)(**kwargs)
    assert str(info.value).startswith(message)


def test_epochs_minus_one_needs_max_steps():
    train = _config("TrainConfig")
    assert train(data="x", epochs=-1, max_steps=5).validate().epochs == -1
    with pytest.raises(ConfigError, match="epochs -1 \\(no epoch limit\\) needs max_steps >= 1"):
        train(data="x", epochs=-1).validate()
    with pytest.raises(ConfigError, match="max_steps must be -1 \\(no limit\\) or >= 1, got 0"):
        train(max_steps=0)


def test_values_set_by_code_after_construction_are_not_rechecked_but_replace_is():
    cfg = _config("TrainConfig")(crop_size=64)
    with pytest.raises(ConfigError, match="crop_size must be >= 1"):
        dataclasses.replace(cfg, crop_size=0)


@pytest.mark.parametrize("cls", CONFIGS, ids=CONFIG_IDS)
def test_every_numeric_field_declares_its_range(cls):
    assert undeclared_ranges(cls) == [], (
        f"{cls.__name__}: numeric fields without a declared range; give option(..., ge=/gt=/le=/lt=/choices=/check=) "
        "or unbounded='why'")


def test_a_numeric_field_without_a_range_is_found():
    @dataclasses.dataclass
    class NewConfig(RunOptions):
        steps: int = option(3, "Steps.")
        ratio: list[float] | None = option(None, "Ratios.")
        ok: float = option(0.5, "Bounded.", ge=0)
        free: float = option(0.0, "Free.", unbounded="any real offset")
        name: str = option("x", "Not a number.")

    assert undeclared_ranges(NewConfig) == ["steps", "ratio"]


# ---- config files -------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_saved_config_with_a_wrong_value_names_the_file_and_the_key(tmp_path):
    train = _config("TrainConfig")
    bad = _write(tmp_path / "config.yaml", "data: x\nepochs: one\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, train)
    assert str(info.value) == f"{bad}: epochs: expected an integer, got 'one' (str)."
    low = _write(tmp_path / "low.yaml", "data: x\ncrop_size: 0\n")
    with pytest.raises(ConfigError, match=f"^{low}: crop_size: must be >= 1, got 0 \\(Training crop"):
        load_config(low, train)
    assert load_config(low, train, crop_size=32).crop_size == 32  # the value given on top replaces the file's
    with pytest.raises(ConfigError, match="^crop_size must be >= 1, got -3"):  # a wrong override is not the file's
        load_config(low, train, crop_size=-3)
    ok = _write(tmp_path / "ok.yaml", "data: x\nscale: [0.5, 1]\nlr: 1e-3\n")
    cfg = load_config(ok, train)
    assert cfg.scale == (0.5, 1.0) and cfg.lr == 1e-3


@pytest.mark.parametrize("text, message", [
    ("data: x\nepochs: [1\n", "not valid YAML (expected ',' or ']'"),
    ("- data\n- x\n", "expected a mapping of `key: value` lines (like a run's config.yaml), got a list."),
    ("just words\n", "got a str."),
    ("data: x\n1: 2\n", "unknown config keys ['1']"),
])
def test_a_config_file_that_is_not_a_mapping_is_one_clear_line(tmp_path, text, message):
    path = _write(tmp_path / "config.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path, _config("TrainConfig"))
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path, _config("TrainConfig"))


# ---- the command line ---------------------------------------------------------------------------------
def _tiny_folder(root: Path) -> Path:
    """images/, masks/, classes.txt, splits/train.txt and val.txt: four 16x16 images with a square."""
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("background\nsquare\n")
    rng = np.random.default_rng(0)
    for i in range(4):
        mask = np.zeros((16, 16), np.uint8)
        mask[4:10, 4:10] = 1
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    (root / "splits" / "train.txt").write_text("s0\ns1\ns2\n")
    (root / "splits" / "val.txt").write_text("s3\n")
    return root


def _main(args: list[str], monkeypatch) -> tuple[int, str]:
    """Run the real entry point (`frugalseg ...`): exit code and stderr."""
    code, _, err = run_main(args, monkeypatch)
    return code, err


def _one_line_error(code: int, err: str, start: str) -> None:
    assert code == 2, err
    assert err.startswith(f"error: {start}"), err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_cli_out_of_range_option_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    data, out = _tiny_folder(tmp_path / "tiny"), tmp_path / "run"
    code, err = _main(["train", "--data", str(data), "--out", str(out), "--crop-size", "0"], monkeypatch)
    _one_line_error(code, err, "--crop-size 0: must be >= 1 (Training crop")
    code, err = _main(["train", "--data", str(data), "--out", str(out), "--scale", "2", "1"], monkeypatch)
    _one_line_error(code, err, "--scale 2.0 1.0: must be (min max) with min <= max")
    code, err = _main(["train", "--semi", "dtc", "--data", str(data), "--out", str(out), "--labelled-patients", "0"],
                      monkeypatch)
    _one_line_error(code, err, "--labelled-patients 0: must be >= 1")
    code, err = _main(["run", "--data", str(data), "--out", str(out), "--calibration-fraction", "1"], monkeypatch)
    _one_line_error(code, err, "--calibration-fraction 1.0: must be in (0, 1)")
    assert not out.exists()


def test_cli_config_file_with_a_wrong_value_is_one_line(tmp_path, monkeypatch):
    data, out = _tiny_folder(tmp_path / "tiny"), tmp_path / "run"
    cfg = _write(tmp_path / "config.yaml", yaml.safe_dump({"data": str(data), "out": str(out), "epochs": "one"}))
    code, err = _main(["train", "--config", str(cfg)], monkeypatch)
    _one_line_error(code, err, f"{cfg}: epochs: expected an integer, got 'one' (str).")
    low = _write(tmp_path / "low.yaml", yaml.safe_dump({"data": str(data), "out": str(out), "crop_size": 0}))
    code, err = _main(["train", "--config", str(low), "--crop-size", "32", "--epochs", "0"], monkeypatch)
    _one_line_error(code, err, "--epochs 0: must be -1 (no limit) or >= 1")
    code, err = _main(["train", "--config", str(low)], monkeypatch)
    _one_line_error(code, err, f"{low}: crop_size: must be >= 1, got 0")
    bad = _write(tmp_path / "bad.yaml", "data: x\nepochs: [1\n")
    code, err = _main(["classify", "--config", str(bad)], monkeypatch)
    _one_line_error(code, err, f"{bad}: not valid YAML")
    listed = _write(tmp_path / "list.yaml", "- data\n- x\n")
    code, err = _main(["run", "--config", str(listed)], monkeypatch)
    _one_line_error(code, err, f"{listed}: expected a mapping")
    assert not out.exists()


@pytest.mark.parametrize("text, message", [("data: x\nepochs: [1\n", "not valid YAML"),
                                           ("- data\n- x\n", "expected a mapping")])
def test_cli_train_config_that_is_not_a_mapping_is_one_line(tmp_path, monkeypatch, text, message):
    bad = _write(tmp_path / "bad.yaml", text)
    code, err = _main(["train", "--config", str(bad)], monkeypatch)
    _one_line_error(code, err, f"{bad}: {message}")
