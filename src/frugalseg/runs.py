"""Run directories: resolved config, artefacts written atomically, stage markers for resume.

Every command writes under `runs/<name>/`. A stage that finished writes `stages/<stage>.done` (JSON
with its outputs) last, so a rerun can skip it; anything written before that marker is considered
incomplete and is rewritten. Files are written to a temporary name and renamed (see `data.io.atomic_path`).
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

from frugalseg.data.io import (STALE_AFTER_S, atomic_path, jsonable, make_folder, read_json,
                               remove_stale_temporaries, write_json)
from frugalseg.errors import DataError


def _settings(key: dict) -> Any:
    """A stage key as it reads back from its marker (tuples become lists, paths strings)."""
    return json.loads(json.dumps(jsonable(key)))


def _same_settings(recorded: Any, key: dict, retired: Collection[str] = ()) -> bool:
    want = _settings(key)
    if isinstance(recorded, dict) and retired:
        recorded = {k: v for k, v in recorded.items() if k in want or k not in retired}
    return recorded == want


def machine_info() -> dict[str, Any]:
    """What a figure was measured on: stated next to every benchmark number."""
    import os

    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def git_commit(cwd: Path | None = None) -> str | None:
    """HEAD, with `-dirty` when tracked code differs from it. Benchmark result files are left out of that check:
    a benchmark that adds to its own results file would otherwise always call the code it ran dirty."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() or None
        if commit is None:
            return None
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        # a git without exclude pathspecs fails the first: then any change counts, rather than none
        for args in (status + ["--", ":/", ":(top,exclude)benchmarks/results"], status):
            dirty = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=5)
            if dirty.returncode == 0:
                return f"{commit}{'-dirty' if dirty.stdout.strip() else ''}"
        return f"{commit}-unknown"
    except (OSError, subprocess.SubprocessError):
        return None


class RunDir:
    """A run's folder and its conventional sub-paths."""

    def __init__(self, path: str | Path):
        """Open (create) the run folder: an `OutputError` naming it when it cannot be created, and the temporary
        files a killed process left in it removed (`data.io.remove_stale_temporaries`)."""
        self.path = make_folder(path)
        remove_stale_temporaries(self.path)
        legacy = self.checkpoints / ".last.ckpt.tmp"  # the checkpoint temporary of versions before atomic_path's names
        try:
            if legacy.exists() and time.time() - legacy.stat().st_mtime > STALE_AFTER_S:
                legacy.unlink()
        except OSError:  # best effort, as remove_stale_temporaries (a read-only run is still readable)
            pass

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    def save_config(self, config: Any) -> Path:
        path = self.path / "config.yaml"
        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(jsonable(config), sort_keys=False))
        return path

    def _marker(self, stage: str, kind: str = "done") -> Path:
        return self.path / "stages" / f"{stage}.{kind}"

    def _record(self, stage: str, kind: str) -> dict:
        """A stage marker's record; a `DataError` naming the marker when it is damaged (edited or truncated
        outside frugalseg, whose writes are atomic)."""
        path = self._marker(stage, kind)
        record = read_json(path)
        if not isinstance(record, dict):
            raise DataError(f"{path}: not a stage marker (a JSON object was expected); the file is damaged: delete "
                            f"it so the stage '{stage}' runs again.")
        return record

    def _recorded_key(self, stage: str, kind: str) -> Any:
        """The settings a stage marker records."""
        return self._record(stage, kind).get("key")

    def stage_info(self, stage: str) -> dict:
        """What `mark_done` recorded for a finished `stage` (seconds, iterations, ...); {} if it has not finished."""
        return self._record(stage, "done") if self._marker(stage).exists() else {}

    def stage_done(self, stage: str, key: dict | None = None, retired: Collection[str] = ()) -> bool:
        """Whether `stage` finished; with `key` (the settings it depends on), only if it finished with those.
        `retired`: fields earlier versions recorded for this stage although it does not depend on them; a marker
        holding one that `key` lacks still matches (so an existing run is not redone for a key that got leaner)."""
        if not self._marker(stage).exists():
            return False
        return key is None or _same_settings(self._recorded_key(stage, "done"), key, retired)

    def stage_made_with_other_settings(self, stage: str, key: dict, retired: Collection[str] = ()) -> bool:
        """True when `stage` finished, or was started by a run that was killed, with settings other than `key`:
        its outputs, whole or partial, are stale."""
        return any(self._marker(stage, kind).exists()
                   and not _same_settings(self._recorded_key(stage, kind), key, retired)
                   for kind in ("done", "started"))

    def mark_started(self, stage: str, key: dict) -> None:
        """Note the settings a stage is about to run with, so a killed run's partial outputs are resumed only by
        a run with the same settings."""
        write_json(self._marker(stage, "started"), {"key": key})

    def clear_stage(self, stage: str) -> None:
        self._marker(stage).unlink(missing_ok=True)

    def mark_done(self, stage: str, info: dict | None = None, key: dict | None = None) -> None:
        record = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **(info or {})}
        if key is not None:
            record["key"] = key
        write_json(self._marker(stage), record)

    def write_metrics(self, split: str, metrics: dict) -> Path:
        path = self.path / "metrics" / f"{split}.json"
        write_json(path, metrics)
        return path
