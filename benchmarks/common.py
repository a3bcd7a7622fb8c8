"""Shared benchmark plumbing: result files with settings, machine, date and commit; a printed table."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from frugalseg.cpu_allocator import allocator_description, tune_cpu_allocator  # noqa: E402
from frugalseg.data.io import read_json, write_json  # noqa: E402
from frugalseg.runs import git_commit, machine_info  # noqa: E402

tune_cpu_allocator()  # as the frugalseg command does: the figures time what users run

# FRUGALSEG_RESULTS: where a benchmark run from another checkout (a worktree kept at one commit while work goes
# on) writes its records, e.g. the main checkout's benchmarks/results.
RESULTS = Path(os.environ.get("FRUGALSEG_RESULTS", ROOT / "benchmarks" / "results"))


def default_data_root() -> Path:
    return Path(os.environ.get("FRUGALSEG_DATA", ROOT.parent / "shared" / "data"))


def machine_tag(machine: dict) -> str:
    """A short name for where a figure was measured: the GPU model, else the CPU core count."""
    if machine.get("gpu"):
        return machine["gpu"].lower().replace(" ", "-")
    return f"cpu-{machine.get('cpu_count')}core"


def save_results(name: str, figures: dict, settings: dict, started: float) -> Path:
    """Merge `figures` into benchmarks/results/<name>.json (sections measured separately keep each other).

    A section re-measured on a *different* machine does not erase the old one: the old figures move to
    `<section>@<machine tag>` (e.g. `msrc_objects@nvidia-h200`), so a CPU rerun and a GPU run sit side by side.
    """
    path = RESULTS / f"{name}.json"
    old = read_json(path) if path.exists() else {}
    provenance = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git_commit": git_commit(ROOT),
        "allocator": allocator_description(),
    }
    old_figures, old_measured = dict(old.get("figures", {})), dict(old.get("measured_on", {}))
    for key in figures:
        if key in old_figures and key in old_measured:
            tag = machine_tag(old_measured[key].get("machine", {}))
            if tag != machine_tag(provenance["machine"]):
                old_figures[f"{key}@{tag}"] = old_figures.pop(key)
                old_measured[f"{key}@{tag}"] = old_measured.pop(key)
    merged_figures = {**old_figures, **figures}
    # Sections are measured separately (a GPU for long training runs, this CPU for throughput), so each
    # top-level figure key records where and when it was measured.
    measured_on = {**old_measured, **{key: provenance for key in figures}}
    data = {
        "benchmark": name,
        "figures": merged_figures,
        "measured_on": measured_on,
        "settings": {**old.get("settings", {}), **settings},
        **provenance,
        "wall_seconds_last_run": round(time.time() - started, 1),
    }
    write_json(path, data)
    return path


def mean_sd(values: list[float | None], digits: int | None = 4) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None from one value) of the values that are not None, rounded to
    `digits` (None: not rounded); (None, None) when there are none."""
    import statistics

    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else None
    if digits is None:
        return mean, sd
    return round(mean, digits), (round(sd, digits) if sd is not None else None)


def as_json(value: object) -> object:
    """`value` as it reads back from a JSON file (tuples as lists, paths and other objects as strings)."""
    return json.loads(json.dumps(value, default=str))


def recorded(records: Path, name: str, settings: dict, run: Callable[[], dict], keep: bool = True,
             defaults: dict | None = None) -> dict:
    """The figures of one benchmark run, `name`: from its record `<records>/<name>.json` when that was made with
    `settings`, else `run()`'s, then kept as the record (unless `keep` is false, as in --quick) with machine,
    date and commit. Long studies resume run by run this way.

    `defaults` (a config's field defaults) lets a record made before the config gained a field still match
    while the new field holds its default: the code that made the record behaved as the default does, so
    re-running would only overwrite the record's timings with a no-op's."""
    settings = as_json(settings)
    path = records / f"{name}.json"
    if keep and path.exists():
        record = read_json(path)
        kept = record["settings"]
        added = settings.keys() - kept.keys()
        new_fields_at_default = defaults is not None and all(
            k in defaults and settings[k] == as_json(defaults[k]) for k in added)
        if kept.keys() <= settings.keys() and all(kept[k] == settings[k] for k in kept) and \
                (not added or new_fields_at_default):
            print(f"  {name}: from its record ({record['date']})", flush=True)
            return record["figures"]
        print(f"  {name}: its record was made with other settings; run again", flush=True)
    figures = run()
    if keep:
        write_json(path, {"settings": settings, "figures": figures, "machine": machine_info(),
                          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "git_commit": git_commit(ROOT)})
    return figures


def print_table(rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(header, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))
