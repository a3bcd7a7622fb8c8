"""The machinery fields every stage config shares, and the field helper that documents each option.

A stage config is a dataclass that inherits `RunOptions` (data, output folder, class remapping, seed,
precision, devices, strategy, workers, resume, progress) and adds its method's fields. Every field is
declared with `option(default, "help text", ...)`: the text is the CLI's `--help` (`frugalseg.cli` reads it
from the field, there is no second table) and, for stages with cached outputs, `stage=` says which stage's
output the field changes (`stage_fields`), so a cache key can never miss a field: a test fails on any field
of such a config that is not classified.

Every value is checked when a config is made, however it is made (the CLI, `load_config` from a saved
config.yaml, Python code): its type against the field's annotation (`check_values`, run by
`RunOptions.__post_init__`) and, for numbers, against the range the field declares (`option(..., ge=1)`,
`gt=0`, `le=`, `lt=`, `choices=`, `check=`). A wrong value is one `ConfigError` line naming the field, the
value and what it must be, before anything is written or trained. A numeric field with no sensible range says
so (`unbounded="why"`); `undeclared_ranges` lists those that say nothing, and a test fails on any.

Defaults follow the papers where a method has one; machinery defaults run on a CPU (precision "auto" is
32-bit there, bf16/16-mixed on a GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, get_args, get_origin

import yaml

from frugalseg.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from frugalseg.losses import LossKind

#: `stage=` value of fields that change no output (where to write, how much to print, parallel workers).
NO_OUTPUT = "none"
#: Largest seed Lightning's `seed_everything` takes (a larger or negative one is silently replaced by a random one).
MAX_SEED = 2**32 - 1


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, stage: str | None = None,
           cli: bool = True, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, choices: Iterable[Any] | None = None,
           check: Callable[[Any], str | None] | None = None, unbounded: str | None = None) -> Any:
    """A dataclass field with its help text (`--help`) and, for cached stages, the stage whose output it
    changes (`stage`; `NO_OUTPUT` for fields that change nothing). `cli=False` keeps it off the command line.

    The values a number may take (checked when a config is made, see `check_values`; for a list or tuple of
    numbers, each of them; `None` is never range-checked): `ge` (>=), `gt` (>), `le` (<=), `lt` (<), `choices`
    (one of these), `check` (a function of the whole value returning what is wrong, e.g. `ascending`, or None).
    A numeric field without any of those says why: `unbounded="..."`."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    metadata = {"help": help, "stage": stage, "cli": cli, "bounds": bounds,
                "choices": tuple(choices) if choices is not None else None, "check": check, "unbounded": unbounded}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def help_of(fld: dataclasses.Field) -> str:
    return fld.metadata.get("help", "")


def option_like(cls: type, name: str, default: Any = dataclasses.MISSING, *, factory: Any = None) -> Any:
    """Field `name` of config class `cls` (help text, stage, cli, range) with another default: how a stage
    config changes a shared field's default (`out="runs/train"`, the semi-supervised seed 1337) without
    repeating its documentation."""
    fld = next(f for f in dataclasses.fields(cls) if f.name == name)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=fld.metadata)
    return dataclasses.field(default=default, metadata=fld.metadata)


# ---- value checks: types from the annotations, ranges from the declarations ---------------------------
def ascending(value: Any) -> str | None:
    """`check=` of a (min, max) range: two values, min <= max."""
    if len(value) != 2:
        return "must be two values (min max)"
    if value[0] > value[1]:
        return "must be (min max) with min <= max"
    return None


def minus_one_or_positive(value: int) -> str | None:
    """`check=` of a limit where -1 means none (`max_steps`, `epochs` with `max_steps`)."""
    return None if value == -1 or value >= 1 else "must be -1 (no limit) or >= 1"


class OptionValueError(ConfigError):
    """A config value that does not fit its field: the wrong type, or outside the declared range.

    The message names the value where the user wrote it: `source` None (Python: the field name), "cli"
    (the option, `--crop-size 0: ...`) or the path of a config file (`config.yaml: crop_size: ...`)."""

    def __init__(self, name: str, value: Any, problem: str, *, kind: str, hint: str = "",
                 source: str | Path | None = None):
        self.name, self.value, self.problem, self.kind = name, value, problem, kind
        self.hint, self.source = hint, source
        super().__init__(self._render())

    def located(self, source: str | Path) -> "OptionValueError":
        """The same error, named where the value came from ("cli" or a config file)."""
        return OptionValueError(self.name, self.value, self.problem, kind=self.kind, hint=self.hint, source=source)

    def _render(self) -> str:
        hint = f" ({self.hint})" if self.hint else ""
        flag = "--" + self.name.replace("_", "-")
        if self.kind == "type":  # the problem already shows the value
            where = self.name if self.source is None else flag if self.source == "cli" else f"{self.source}: {self.name}"
            return f"{where}: {self.problem}."
        if self.source == "cli":
            return f"{flag} {_cli_text(self.value)}: {self.problem}{hint}."
        if self.source is None:
            return f"{self.name} {self.problem}, got {self.value!r}{hint}."
        return f"{self.source}: {self.name}: {self.problem}, got {self.value!r}{hint}."


def _cli_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


class _NoFit(Exception):
    pass


_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "true/false values"), type(None): ("None (null)", "None values")}
# PyYAML (YAML 1.1) reads 1e-3 as a string (it wants 1.0e-3); a float field takes such a number
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType)


def _expected(tp: Any, plural: bool = False) -> str:
    """Words for what annotation `tp` accepts ("an integer", "2 numbers", "one of 'sgd', 'adam'")."""
    origin, args = get_origin(tp), get_args(tp)
    if _is_union(tp):
        return " or ".join(_expected(a, plural) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"{len(args)} {_expected(args[0], plural=True)}"
    if origin in (tuple, list):
        return f"a list of {_expected(args[0], plural=True)}"
    words = _WORDS.get(tp)
    if words is None:
        return getattr(tp, "__name__", str(tp))
    return words[1] if plural else words[0]


def _fit(value: Any, tp: Any, beside_bool: bool = False) -> Any:
    """`value` as annotation `tp` wants it (int for float, list for tuple, a path for str, ...); `_NoFit`
    when it is not one. `beside_bool`: in a `bool | str` field an integer is not taken for a string."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _NoFit
    if _is_union(tp):
        for arg in args:
            try:
                return _fit(value, arg, beside_bool or bool in args)
            except _NoFit:
                pass
        raise _NoFit
    if origin is Literal:
        for arg in args:
            if type(value) is type(arg) and value == arg:
                return arg
        raise _NoFit
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _NoFit
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _NoFit
            items = [_fit(v, a) for v, a in zip(value, args)]
        else:
            items = [_fit(v, args[0]) if args else v for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _NoFit
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise _NoFit
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
        raise _NoFit
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        # `devices: 1`, `precision: 16` in a YAML file: the command line reads them as the strings they mean
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and not beside_bool:
            return str(value)
        raise _NoFit
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _NoFit
    return value


def _fmt(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def range_text(fld: dataclasses.Field) -> str:
    """The declared range of a field in words (">= 1", "in (0, 1]", "one of 8, 16, 32"; "" if none)."""
    b = fld.metadata.get("bounds") or {}
    choices = fld.metadata.get("choices")
    if choices:
        return "one of " + ", ".join(_fmt(c) for c in choices)
    low = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    high = ("]", b["le"]) if "le" in b else (")", b["lt"]) if "lt" in b else None
    if low and high:
        return f"in {low[0]}{_fmt(low[1])}, {_fmt(high[1])}{high[0]}"
    if low:
        return (">= " if low[0] == "[" else "> ") + _fmt(low[1])
    if high:
        return ("<= " if high[0] == "]" else "< ") + _fmt(high[1])
    return ""


def _in_range(x: Any, fld: dataclasses.Field) -> bool:
    b = fld.metadata.get("bounds") or {}
    choices = fld.metadata.get("choices")
    if choices and x not in choices:
        return False
    return not (("ge" in b and not x >= b["ge"]) or ("gt" in b and not x > b["gt"])
                or ("le" in b and not x <= b["le"]) or ("lt" in b and not x < b["lt"]))


def _hint(fld: dataclasses.Field) -> str:
    return help_of(fld).split(" [default:")[0].strip().rstrip(".")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def check_value(cls: type, name: str, value: Any) -> Any:
    """`value` for field `name` of config class `cls`, converted as its annotation wants; `OptionValueError`
    (a `ConfigError`) when its type is wrong or it is outside the field's declared range."""
    fld = _fields(cls)[name]
    tp = _hints(cls)[name]
    try:
        value = _fit(value, tp)
    except _NoFit:
        raise OptionValueError(name, value, f"expected {_expected(tp)}, got {value!r} ({type(value).__name__})",
                               kind="type") from None
    if value is None:
        return value
    items = value if isinstance(value, (list, tuple)) else (value,)
    scalars = [x for x in items if isinstance(x, (int, float)) and not isinstance(x, bool)]
    if not all(_in_range(x, fld) for x in scalars):
        must = "must all be" if isinstance(value, (list, tuple)) else "must be"
        raise OptionValueError(name, value, f"{must} {range_text(fld)}", kind="range", hint=_hint(fld))
    check = fld.metadata.get("check")
    problem = check(value) if check is not None else None
    if problem:
        raise OptionValueError(name, value, problem, kind="range", hint=_hint(fld))
    return value


def check_values(cfg: Any) -> None:
    """Check (and convert in place) every field of config `cfg`: see `check_value`."""
    for fld in dataclasses.fields(cfg):
        value = getattr(cfg, fld.name)
        fitted = check_value(type(cfg), fld.name, value)
        if fitted is not value:
            setattr(cfg, fld.name, fitted)


def _is_numeric(tp: Any) -> bool:
    if tp in (int, float):
        return True
    return any(_is_numeric(a) for a in get_args(tp) if a is not Ellipsis)


def undeclared_ranges(cls: type) -> list[str]:
    """Numeric fields of `cls` (numbers, lists of numbers) that declare no range and no `unbounded` reason."""
    hints = _hints(cls)
    out = []
    for fld in dataclasses.fields(cls):
        meta = fld.metadata
        declared = meta.get("bounds") or meta.get("choices") or meta.get("check") or meta.get("unbounded")
        if _is_numeric(hints[fld.name]) and not declared:
            out.append(fld.name)
    return out


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
    seed: int = option(0, "Random seed of initialisation, data order and augmentation.", stage="data", ge=0,
                       le=MAX_SEED)
    precision: str = option("auto", "auto = bf16/16-mixed on GPU, 32 on CPU; or any Lightning precision string.",
                            stage="data")
    devices: str = option("auto", "Lightning devices (auto, 1, 4, ...), or cpu to stay on the CPU where a "
                                  "GPU is. For several GPUs/nodes launch with torchrun or srun.", stage=NO_OUTPUT)
    strategy: str = option("auto", "Lightning strategy (auto, ddp, ...).", stage=NO_OUTPUT)
    num_workers: int = option(0, "Data-loading worker processes.", stage=NO_OUTPUT, ge=0)
    resume: bool = option(False, "Continue from the run's last checkpoint.", stage=NO_OUTPUT)
    progress: bool = option(True, "Progress bars.", stage=NO_OUTPUT)

    def __post_init__(self) -> None:
        # every config, however made (CLI, load_config, Python): types and declared ranges, before any work
        check_values(self)

    def check_data(self) -> None:
        if not self.data:
            raise ConfigError("No dataset given: pass --data FOLDER or a task name such as msrc-objects.")


@dataclass
class LalOptions:
    """The locally adaptive learning loss's options (`--loss lal`, `losses.LocallyAdaptiveLoss`): one declaration for
    supervised and semi-supervised training, whose configs both offer the loss."""

    lal_window: int = option(9, "--loss lal: window side in pixels/voxels (odd: centred on a pixel).", ge=1,
                             check=lambda v: None if v % 2 else "must be odd")
    lal_stride: int = option(4, "--loss lal: window stride.", ge=1)
    lal_sigma: float | None = option(None, "--loss lal: sigma of the Gaussian weight on the chessboard distance to "
                                           "the window centre [default: window / 3].", gt=0)
    lal_k: float = option(5.0, "--loss lal: Minkowski pooling exponent over the window costs (5: best on VOC).", gt=0)

    def loss_kind(self) -> LossKind:
        """The config's supervised loss as `losses.segmentation_loss` takes it: the `loss` name its class declares,
        or for "lal" the loss with these options (torch is imported here, not when a config loads)."""
        from frugalseg.losses import LocallyAdaptiveLoss

        loss = getattr(self, "loss")
        return LocallyAdaptiveLoss(self.lal_window, self.lal_stride, self.lal_sigma, self.lal_k) if loss == "lal" \
            else loss


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
    """Checks every training config shares beyond its fields' own ranges: a dataset and a schedule that trains
    (Lightning stops at once with max_epochs 0; epochs -1 is no epoch limit, for a max_steps run)."""
    if not cfg.data:
        raise ConfigError("No dataset given: pass --data FOLDER or a task name such as msrc-objects.")
    if cfg.epochs == -1 and cfg.max_steps == -1:
        raise ConfigError("epochs -1 (no epoch limit) needs max_steps >= 1; or give epochs >= 1.")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a config file (a run's config.yaml); a one-line `ConfigError` for a missing file, a
    folder, a file that is not YAML or not a mapping of `key: value` lines."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"Config file {path} does not exist.")
    if path.is_dir():
        raise ConfigError(f"Config file {path} is a folder; give the config.yaml inside it.")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; expected a YAML config such as a run's config.yaml.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({what}{where}).") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of `key: value` lines (like a run's config.yaml), got a "
                          f"{type(data).__name__}.")
    return data


def load_config(path: str | Path, cls: type, **overrides: Any) -> Any:
    """A `cls` config from a saved config.yaml, with `overrides` (None values ignored) on top.

    Unknown keys are an error (typos should not pass silently); every value is checked against its field
    (`check_values`: lists read back for tuple fields such as `scale` become tuples again), and a wrong one
    names the file and the key."""
    path = Path(path)
    data = read_config_file(path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown config keys {unknown}.")
    given = {k: v for k, v in overrides.items() if v is not None}
    for name, value in data.items():  # the file's values first, so a wrong one names the file
        if name not in given:
            try:
                data[name] = check_value(cls, name, value)
            except OptionValueError as exc:
                raise exc.located(path) from None
    data.update(given)
    return cls(**data)
