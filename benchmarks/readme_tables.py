"""Refill the README's benchmark tables from the results on disk (no benchmark is run).

    python benchmarks/readme_tables.py

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in README.md and comes from a
benchmark's own Markdown output, so every figure in the README is one a benchmark run wrote.
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import active  # noqa: E402
import selfsup  # noqa: E402
import semi  # noqa: E402
import synth  # noqa: E402
from common import RESULTS, ROOT  # noqa: E402


def _synth_fd() -> str:
    import json

    path = RESULTS / "synth.json"
    return synth.markdown_fd(json.loads(path.read_text())["figures"]) if path.exists() else ""

@functools.cache
def _synth_figs() -> dict:
    return synth.aggregate()  # two tables read it: aggregate once


@functools.cache
def _selfsup_figs() -> dict:
    return selfsup.aggregate()


TABLES = {
    "cpu_protocol": lambda: semi.markdown_table(semi.aggregate(semi.CPU_RECORDS)),
    "active": lambda: active.markdown(active.aggregate(active.RECORDS)),
    "plane_search": active.markdown_plane_search,
    "synth": lambda: synth.markdown(_synth_figs()),
    "synth_fd": _synth_fd,
    "synth_diagnosis": lambda: synth.markdown_diagnosis(_synth_figs()),
    "selfsup": lambda: selfsup.markdown(_selfsup_figs()),
    "selfsup_lal_classes": lambda: selfsup.markdown_lal_classes(_selfsup_figs()),
}


def fill(text: str, name: str, table: str) -> str:
    pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- table:{name} --> markers")
    return pattern.sub(lambda m: m.group(1) + (table + "\n" if table else "") + m.group(2), text)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, make in TABLES.items():
        text = fill(text, name, make())
    tmp = readme.with_name(".README.md.tmp")
    tmp.write_text(text)
    tmp.replace(readme)
    print(f"refilled {', '.join(TABLES)} in {readme}")


if __name__ == "__main__":
    main()
