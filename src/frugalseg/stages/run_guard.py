"""Before a training stage writes into its run folder: is this folder this run's?

A run folder holds a model trained with the settings in its config.yaml. Re-running a command into it with
other settings must not skip training and then rewrite config.yaml and report.html with settings the model
was not trained with; `--resume` onto a checkpoint of other classes must not rewrite config.yaml and then fail
inside torch. `claim_run_dir` checks both before the stage writes anything, and then saves the config.

What may differ between the saved and the given settings:
- fields that change no output (`stages.options.NO_OUTPUT`: where to write, devices, workers, progress,
  resume) and fields that only decide what is evaluated (`EVALUATION_FIELDS`), always;
- with `--resume`, a longer schedule (`SCHEDULE_FIELDS`): continuing a run to more epochs or iterations is
  what `--resume` is for (the learning-rate schedule then follows the new length, as stated in `--help`);
- paths written another way (`runs/x` and `runs/x/`), and paths into a run tree (`RUN_TREE_PATHS`) of a run
  folder moved or copied with its tree;
- anything, when the folder holds no output yet (a run that failed before its first checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection
from typing import Any

from frugalseg.data.io import jsonable
from frugalseg.data.labels import LabelSpec
from frugalseg.errors import ConfigError, DataError
from frugalseg.export import check_checkpoint
from frugalseg.runs import RunDir
from frugalseg.stages.options import NO_OUTPUT, read_config_file

#: Settings that decide what is evaluated and how often, not the model: a finished run may be evaluated on
#: another split without being another run.
EVALUATION_FIELDS = frozenset({"val_split", "eval_split", "val_every", "eval_batch_size", "val_limit"})
#: Schedule lengths a `--resume` may increase (a shorter schedule would export the longer run's model
#: under the shorter run's settings). -1 means no limit.
SCHEDULE_FIELDS = frozenset({"epochs", "max_steps", "iterations"})
#: Paths that point into the run's own tree (a pipeline's segmenter reads its round's masks and the previous
#: round's model): compared relative to the run folder, so a moved or copied tree is the same run.
RUN_TREE_PATHS = frozenset({"mask_dir", "init_from", "classifier", "init_classifier"})


def _free_fields(cfg: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cfg) if f.metadata.get("stage") == NO_OUTPUT} | EVALUATION_FIELDS


def setting_differences(run: RunDir, cfg: Any, free: Collection[str] = ()) -> dict[str, tuple[Any, Any]]:
    """{field: (saved value, given value)} for each field that differs from the run's config.yaml and matters
    (see the module docstring); {} when there is no config.yaml yet. A field the saved file lacks (written by
    an earlier version) counts as its default."""
    path = run / "config.yaml"
    if not path.exists():
        return {}
    saved = read_config_file(path)
    given = json.loads(json.dumps(jsonable(cfg)))
    defaults = json.loads(json.dumps(jsonable({f.name: _default(f) for f in dataclasses.fields(cfg)})))
    free = _free_fields(cfg) | set(free)
    resume = bool(getattr(cfg, "resume", False))
    diff = {}
    for name, value in given.items():
        there = saved.get(name, defaults.get(name))
        if name in free or there == value or _same_path(there, value):
            continue
        if resume and name in SCHEDULE_FIELDS and _not_shorter(there, value):
            continue
        if name in RUN_TREE_PATHS and _same_place(there, value, saved.get("out"), given.get("out")):
            continue
        diff[name] = (there, value)
    return diff


def _same_path(there: Any, here: Any) -> bool:
    """`runs/x`, `runs/x/` and `./runs/x` (from the same working directory) name one folder."""
    return isinstance(there, str) and isinstance(here, str) and bool(there) and bool(here) and (
        os.path.abspath(there) == os.path.abspath(here))


def _not_shorter(there: Any, here: Any) -> bool:
    if not (isinstance(there, int) and isinstance(here, int)):
        return False
    unlimited = lambda v: v < 0  # noqa: E731 - max_steps / epochs -1: no limit
    return unlimited(here) or (not unlimited(there) and here >= there)


def _same_place(there: Any, here: Any, out_there: Any, out_here: Any) -> bool:
    """Two paths at the same place relative to their run folders (a tree moved or copied whole)."""
    if not all(isinstance(v, str) and v for v in (there, here, out_there, out_here)):
        return False
    return (os.path.relpath(os.path.abspath(there), os.path.abspath(out_there))
            == os.path.relpath(os.path.abspath(here), os.path.abspath(out_here)))


def _default(fld: dataclasses.Field) -> Any:
    if fld.default is not dataclasses.MISSING:
        return fld.default
    return fld.default_factory() if fld.default_factory is not dataclasses.MISSING else None


def _describe(diff: dict[str, tuple[Any, Any]], limit: int = 4) -> str:
    parts = [f"{name} {there!r} there, {here!r} here" for name, (there, here) in list(diff.items())[:limit]]
    more = len(diff) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def claim_run_dir(run: RunDir, cfg: Any, labels: LabelSpec | None = None, *, finished: bool, started: bool,
                  free: Collection[str] = (), rerun_hint: bool = True) -> None:
    """Refuse a run folder made with other settings, or a `--resume` checkpoint of other classes, before
    anything is written (ConfigError / DataError naming the folder and what to do); then save config.yaml.

    `finished`: whether the stage already finished in this folder (a rerun then skips its work); `started`:
    whether an unfinished attempt left outputs a rerun would continue from (a checkpoint, maps); `free`: fields
    of `cfg` beyond the module's rule that leave the folder's outputs valid (e.g. how many maps to show);
    `rerun_hint`: the command takes `--config`, so the message offers it."""
    diff = setting_differences(run, cfg, free) if finished or started else {}
    if diff:
        what = "a finished run" if finished else "a run"
        resumable = (set(diff) <= SCHEDULE_FIELDS and hasattr(cfg, "resume")
                     and all(_not_shorter(there, here) for there, here in diff.values()))
        hint = (" To continue it to a longer schedule, add --resume." if resumable and not cfg.resume else "")
        again = f"re-run it with its own settings (--config {run / 'config.yaml'}), " if rerun_hint else ""
        raise ConfigError(
            f"{run.path} holds {what} made with other settings ({_describe(diff)}); nothing was changed. Choose "
            f"another --out, {again}or delete the folder to start over.{hint}")
    if getattr(cfg, "resume", False) and run.last_checkpoint.exists() and labels is not None:
        meta = check_checkpoint(run.last_checkpoint)
        saved_labels = meta.get("labels")
        if saved_labels is not None and tuple(saved_labels.get("names", ())) != tuple(labels.names):
            raise DataError(
                f"{run.last_checkpoint}: --resume onto a checkpoint of other classes ({', '.join(saved_labels['names'])}"
                f" there, {', '.join(labels.names)} here); nothing was changed. Use the run's own data and class "
                "options, or another --out.")
    run.save_config(cfg)
