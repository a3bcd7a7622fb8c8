"""Every HTML page frugalseg writes, and the overlay pictures they are made of.

- `write_report(run_dir, ds=...)` (`report.html`): the report of a training run (metrics, curves, gallery);
- `report.gallery.write_cam_gallery` / `write_maps_gallery`: class maps, seeds and truth per image;
- `report.pipeline.write_pipeline_report`: a tags-to-model run, pseudo-mask mIoU per stage and per round.

The three share one page shell and stylesheet (`report.html.html_page`) and name per-sample pictures with
`data.io.sample_file`. `overlay`, `colourise`, `panel` and `legend` are plain numpy-in, numpy-out helpers
that are as useful in a notebook as in a report. Pages read what stages wrote; they never recompute a metric.
"""

from frugalseg.report.html import write_report
from frugalseg.report.overlays import boundary, colourise, legend, overlay, panel

__all__ = ["boundary", "colourise", "legend", "overlay", "panel", "write_report"]
