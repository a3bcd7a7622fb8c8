"""Run reports: a self-contained HTML page per run directory, and the overlay pictures it is made of.

`write_report(run_dir, ds=...)` is the entry point; `overlay`, `colourise`, `panel` and `legend` are
plain numpy-in, numpy-out helpers that are as useful in a notebook as in the report.
"""

from frugalseg.report.html import write_report
from frugalseg.report.overlays import boundary, colourise, legend, overlay, panel

__all__ = ["boundary", "colourise", "legend", "overlay", "panel", "write_report"]
