"""Command-line options generated from config dataclasses: names, types, defaults and help come from the
fields themselves (`frugalseg.stages.options.option(default, "help")`), so there is no second table to keep.

`config_options(cls)` adds one `--option` per field of one config; `merged_config_options({label: cls})`
adds the union of several configs' fields to one command (`train` and `train --semi METHOD`), marking
options that belong to some of them only and naming the defaults that differ. `build_config` turns the
parsed options (None = not given) into the config, optionally on top of a saved config.yaml.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click


class BoolOrPath(click.ParamType):
    """true / false, or a path (e.g. `--pretrained weights.pth`)."""

    name = "BOOL|PATH"

    def convert(self, value, param, ctx):
        if isinstance(value, bool):
            return value
        low = str(value).lower()
        if low in ("true", "yes", "1"):
            return True
        if low in ("false", "no", "0", "none"):
            return False
        return str(value)


class Sizes(click.ParamType):
    """A list of integers written 112,112,80 or 112x112x80 (or one integer)."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return [int(v) for v in value]
        try:
            return [int(v) for v in str(value).replace("x", ",").split(",") if v.strip()]
        except ValueError:
            self.fail(f"'{value}' is not a list of integers such as 112,112,80.", param, ctx)


CUSTOM_TYPES = {"patch_size": Sizes(), "channels": Sizes()}
ALIASES = {"n_models": ("--models",)}  # `frugalseg train --semi cotrain --models 3`


def click_type(tp: Any) -> tuple[Any, dict]:
    """A dataclass annotation as a click type plus extra option settings (multiple, nargs)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return click_type(args[0])
        if set(args) == {bool, str}:
            return BoolOrPath(), {}
        return str, {}
    if origin is Literal:
        return click.Choice([str(a) for a in get_args(tp)]), {}
    if origin is tuple and get_args(tp)[-1] is Ellipsis:  # variable length: repeat the option
        return get_args(tp)[0], {"multiple": True}
    if origin is tuple:
        return get_args(tp)[0], {"nargs": len(get_args(tp))}
    if origin is list:
        return get_args(tp)[0], {"multiple": True}
    return tp, {}


def _cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields offered as options: not private, not `cli=False`, not in the class's `CLI_HIDDEN` (inherited
    machinery a command does not use, e.g. `--resume` for map making)."""
    hidden = set(getattr(cls, "CLI_HIDDEN", ()))
    return [f for f in dataclasses.fields(cls) if not f.name.startswith("_") and f.metadata.get("cli", True)
            and f.name != "semi" and f.name not in hidden]


def _default(fld: dataclasses.Field) -> Any:
    if fld.default is not dataclasses.MISSING:
        return fld.default
    if fld.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return fld.default_factory()  # type: ignore[misc]
    return None


def _add_option(f, name: str, tp: Any, extra: dict, help_text: str):
    flag = "--" + name.replace("_", "-")
    if tp is bool:
        return click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=None, help=help_text)(f)
    if name in CUSTOM_TYPES:
        tp, extra = CUSTOM_TYPES[name], {}
    return click.option(flag, *ALIASES.get(name, ()), name, type=tp, default=None, show_default=False,
                        help=help_text, **extra)(f)


def config_options(cls: type):
    """Decorator adding one --option per field of `cls` (None = not given: the field's default applies)."""

    def decorate(f):
        hints = typing.get_type_hints(cls)
        for fld in reversed(_cli_fields(cls)):
            tp, extra = click_type(hints[fld.name])
            text = fld.metadata.get("help", "")
            if "[default:" not in text:
                text = f"{text} [default: {_default(fld)}]"
            f = _add_option(f, fld.name, tp, extra, text)
        return f

    return decorate


def merged_config_options(classes: dict[str, type]):
    """Decorator adding the union of several configs' fields (e.g. `train` and `train --semi X`).

    `classes` maps a label (shown in --help) to a config class; the first is the command's own. A field of
    several classes gets one option whose choices are the union of theirs; its help names the defaults that
    differ, and options of some classes only are marked with their labels.
    """
    labels = list(classes)

    def decorate(f):
        merged: dict[str, dict] = {}
        for label, cls in classes.items():
            hints = typing.get_type_hints(cls)
            by_dims = set(cls.protocol(2)) | set(cls.protocol(3)) if hasattr(cls, "protocol") else set()
            for fld in _cli_fields(cls):
                entry = merged.setdefault(fld.name, {"types": [], "defaults": {}, "help": ""})
                entry["types"].append(hints[fld.name])
                entry["help"] = entry["help"] or fld.metadata.get("help", "")
                default = _default(fld)
                entry["defaults"][label] = "by dims" if default is None and fld.name in by_dims else default
        for name, entry in reversed(list(merged.items())):
            kinds = [click_type(t) for t in entry["types"]]
            tp, extra = kinds[0]
            choices = [c for k, _ in kinds if isinstance(k, click.Choice) for c in k.choices]
            if choices:
                tp = click.Choice(list(dict.fromkeys(choices)))
            elif any(not _same_type(k, tp) for k, _ in kinds):
                tp = str if not all(k in (int, float) for k, _ in kinds) else float
            help_text = entry["help"]
            owners = list(entry["defaults"])
            if owners != labels:
                help_text = f"[{_owners_label(owners, labels)}] {help_text}"
            if "[default:" not in help_text:
                help_text = f"{help_text} [default: {_defaults_text(entry['defaults'])}]"
            f = _add_option(f, name, tp, extra, help_text)
        return f

    return decorate


def _same_type(a: Any, b: Any) -> bool:
    """The same click type: the same class, or two instances of one ParamType class (e.g. BoolOrPath)."""
    return a is b or (isinstance(a, click.ParamType) and type(a) is type(b))


def _owners_label(owners: list[str], labels: list[str]) -> str:
    """'train', '--semi' (every method), or '--semi cotrain|dtc'."""
    semi = [o.split(" ", 1)[1] for o in owners if o.startswith("--semi ")]
    all_semi = [o for o in labels if o.startswith("--semi ")]
    parts = [o for o in owners if not o.startswith("--semi ")]
    if semi:
        parts.append("--semi" if len(semi) == len(all_semi) else "--semi " + "|".join(semi))
    return ", ".join(parts)


def _defaults_text(defaults: dict) -> str:
    """One default, or the defaults per mode where they differ (semi methods grouped when they agree)."""
    values = {k: str(v) for k, v in defaults.items()}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    semi = {k.split(" ", 1)[1]: v for k, v in values.items() if k.startswith("--semi ")}
    parts = [f"{k}: {v}" for k, v in values.items() if not k.startswith("--semi ")]
    if len(set(semi.values())) == 1:
        parts.append(f"--semi: {next(iter(semi.values()))}")
    else:
        parts += [f"--semi {k}: {v}" for k, v in semi.items()]
    return "; ".join(parts)


def given(options: dict) -> dict:
    """The options the user gave (click passes None / () for the others)."""
    return {k: v for k, v in options.items() if v is not None and v != ()}


def build_config(cls: type, options: dict, config_file: str | None, load_config) -> Any:
    """The config of `cls` from the given options, on top of `config_file` (a saved config.yaml) if any.

    Every value is checked as the config is made (types, declared ranges): a wrong option is one line naming
    it (`--crop-size 0: must be >= 1 (...)`), a wrong value of the file names the file and the key."""
    from frugalseg.stages.options import OptionValueError

    values = given(options)
    if "labelled_ids" in values:
        values["labelled_ids"] = expand_ids(values["labelled_ids"])
    try:
        if config_file:
            return load_config(config_file, cls, **values)
        return cls(**values)
    except OptionValueError as exc:
        if exc.source is None and exc.name in values:  # a value given on the command line
            raise exc.located("cli") from None
        raise


def expand_ids(values) -> list[str]:
    """Ids given on the command line; `@file` reads one id a line."""
    out: list[str] = []
    for v in values:
        if v.startswith("@"):
            if not Path(v[1:]).is_file():
                from frugalseg.errors import ConfigError

                raise ConfigError(f"--labelled-ids {v}: no file {v[1:]} (@FILE lists one sample id a line).")
            out += [line.strip() for line in Path(v[1:]).read_text().splitlines() if line.strip()]
        else:
            out.append(v)
    return out
