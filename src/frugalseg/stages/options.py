"""The machinery fields every stage config shares, and the field helper that documents each option.

A stage config is a dataclass that inherits `RunOptions` (data, output folder, class remapping, seed,
precision, devices, strategy, workers, resume, progress) and adds its method's fields. Every field is
declared with `option(default, "help text", ...)`: the text is the CLI's `--help` (`frugalseg.cli` reads it
from the field, there is no second table) and, for stages with cached outputs, `stage=` says which stage's
output the field changes (`stage_fields`), so a cache key can never miss a field: a test fails on any field
of such a config that is not classified.

Defaults follow the papers where a method has one; machinery defaults run on a CPU (precision "auto" is
32-bit there, bf16/16-mixed on a GPU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import yaml

from frugalseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: `stage=` value of fields that change no output (where to write, how much to print, parallel workers).
NO_OUTPUT = "none"


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, stage: str | None = None,
           cli: bool = True) -> Any:
    """A dataclass field with its help text (`--help`) and, for cached stages, the stage whose output it
    changes (`stage`; `NO_OUTPUT` for fields that change nothing). `cli=False` keeps it off the command line."""
    metadata = {"help": help, "stage": stage, "cli": cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def help_of(fld: dataclasses.Field) -> str:
    return fld.metadata.get("help", "")


def option_like(cls: type, name: str, default: Any = dataclasses.MISSING, *, factory: Any = None) -> Any:
    """Field `name` of config class `cls` (help text, stage, cli) with another default: how a stage config
    changes a shared field's default (`out="runs/train"`, the semi-supervised seed 1337) without repeating
    its documentation."""
    fld = next(f for f in dataclasses.fields(cls) if f.name == name)
    return option(default, help_of(fld), factory=factory, stage=fld.metadata.get("stage"),
                  cli=fld.metadata.get("cli", True))


@dataclass
class RunOptions:
    """Where data comes from and goes to, and how the run is executed: the fields every stage shares."""

    data: str = option("", "Dataset folder (VOC, folders, SSL4MIS HDF5, MSD NIfTI) or task name (msrc-objects, "
                           "acdc, la2018, ...).", stage="data")
    out: str = option("runs/run", "Run directory to write (config, checkpoints, metrics, predictions, report.html).",
                      stage=NO_OUTPUT)
    background_classes: list[str] | None = option(None, "Class names merged into background (repeat the option).",
                                                  stage="data")
    ignore_classes: list[str] | None = option(None, "Class names turned into void, excluded from loss and metrics "
                                                    "(repeat the option).", stage="data")
    seed: int = option(0, "Random seed of initialisation, data order and augmentation.", stage="data")
    precision: str = option("auto", "auto = bf16/16-mixed on GPU, 32 on CPU; or any Lightning precision string.",
                            stage="data")
    devices: str = option("auto", "Lightning devices (auto, 1, 4, ...). For several GPUs/nodes launch with "
                                  "torchrun or srun.", stage=NO_OUTPUT)
    strategy: str = option("auto", "Lightning strategy (auto, ddp, ...).", stage=NO_OUTPUT)
    num_workers: int = option(0, "Data-loading worker processes.", stage=NO_OUTPUT)
    resume: bool = option(False, "Continue from the run's last checkpoint.", stage=NO_OUTPUT)
    progress: bool = option(True, "Progress bars.", stage=NO_OUTPUT)

    def check_data(self) -> None:
        if not self.data:
            raise ConfigError("No dataset given: pass --data FOLDER or a task name such as msrc-objects.")


RUN_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(RunOptions))


def run_options_of(cfg: Any, **overrides: Any) -> dict[str, Any]:
    """The machinery fields of `cfg`, as keyword arguments for another stage's config: how a chain of stages
    (`frugalseg run`) hands data, seed, precision, devices and the rest to each stage it runs."""
    return {**{name: getattr(cfg, name) for name in RUN_OPTION_NAMES if hasattr(cfg, name)}, **overrides}


def device_of(devices: str | int | None = "auto") -> "torch.device":
    """The device inference runs on, from a `devices` option: "cpu" forces the CPU; anything else takes the
    first GPU when there is one (inference runs in one process; multi-GPU is for training)."""
    import torch  # not at module level: config classes load without torch, so `--help` stays fast

    if str(devices).lower() == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def stage_fields(cls: type, stages: Iterable[str]) -> tuple[str, ...]:
    """The fields of config class `cls` whose `stage` is one of `stages` (in declaration order)."""
    wanted = set(stages)
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("stage") in wanted)


def unclassified_fields(cls: type) -> list[str]:
    """Fields of `cls` that declare no stage: each must say which output it changes (or `NO_OUTPUT`)."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("stage")]


def check_common(cfg: Any) -> None:
    """Checks every training config shares: a dataset, a schedule, a batch, a valid output stride."""
    if not cfg.data:
        raise ConfigError("No dataset given: pass --data FOLDER or a task name such as msrc-objects.")
    if cfg.epochs < 1 and cfg.max_steps < 1:
        raise ConfigError("epochs must be >= 1.")
    if cfg.batch_size < 1:
        raise ConfigError("batch_size must be >= 1.")
    if getattr(cfg, "output_stride", 16) not in (8, 16, 32):
        raise ConfigError("output_stride must be 8, 16 or 32.")


def load_config(path: str | Path, cls: type, **overrides: Any) -> Any:
    """A `cls` config from a saved config.yaml, with `overrides` (None values ignored) on top.

    Unknown keys are an error (typos should not pass silently); lists read back for tuple fields (e.g.
    `scale`) become tuples again."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Config file {path} does not exist.")
    data = yaml.safe_load(path.read_text()) or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown config keys {unknown}.")
    for name, value in data.items():
        if isinstance(value, list) and isinstance(fields[name].default, tuple):
            data[name] = tuple(value)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**data)
