"""The report page of a synthesis run (`frugalseg synth train`): what the GAN draws, beside what it learnt from.

Each row: a mask drawn from the shape model, the generator's image for it, and the real training image
whose mask is nearest in shape (IoU after centring and the best of 8 rotations/reflections, shown) with
that mask. A synthetic image that copies its nearest real image, or a mask that repeats a training mask
(IoU near 1), shows here at a glance. Loss curves follow from logs/metrics.csv.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from frugalseg.data.labels import LabelSpec
from frugalseg.report.html import ASSETS_DIR, _save_jpeg, curves_html, write_page
from frugalseg.report.overlays import colourise

__all__ = ["write_synth_page"]

SYNTH_CSS = """
table.synth td{vertical-align:top;padding:4px}table.synth img{max-width:200px;display:block}
table.synth figcaption{font-size:12px;color:var(--muted)}
"""


def _img(run_dir: Path, name: str, rgb: np.ndarray, caption: str) -> str:
    _save_jpeg(run_dir / ASSETS_DIR / name, np.ascontiguousarray(rgb))
    return f'<figure><img src="{ASSETS_DIR}/{escape(name)}" alt=""><figcaption>{escape(caption)}</figcaption></figure>'


def write_synth_page(run_dir: Path | str, rows: Sequence[dict], labels: LabelSpec, facts: dict[str, Any]) -> Path:
    run_dir = Path(run_dir)
    (run_dir / ASSETS_DIR).mkdir(parents=True, exist_ok=True)
    fact_html = "".join(f"<li><b>{escape(str(k))}</b>: {escape(str(v))}</li>" for k, v in facts.items())
    body = [f"<h1>Synthetic pairs: {escape(run_dir.name)}</h1><ul>{fact_html}</ul>"]
    if rows:
        cells = []
        for i, r in enumerate(rows):
            cells.append(
                "<tr><td>" + _img(run_dir, f"synth_{i}_mask.jpg", colourise(r["mask"], labels), "drawn mask")
                + "</td><td>" + _img(run_dir, f"synth_{i}_image.jpg", r["synthetic"], "synthetic image")
                + "</td><td>" + _img(run_dir, f"synth_{i}_real.jpg", r["nearest_image"],
                                     f"nearest real: {r['nearest_id']}")
                + "</td><td>" + _img(run_dir, f"synth_{i}_realmask.jpg", colourise(r["nearest_mask"], labels),
                                     f"its mask (shape IoU {r['iou']:.2f})")
                + "</td></tr>")
        body.append('<h2>Drawn masks, synthetic images, nearest real pair</h2><table class="synth">'
                    + "".join(cells) + "</table>")
    else:
        body.append("<p>No generator yet: training has not finished.</p>")
    log_csv = run_dir / "logs" / "metrics.csv"
    if log_csv.exists():
        body.append("<h2>Training</h2>" + curves_html(log_csv))
    return write_page(run_dir / "report.html", f"frugalseg synth: {run_dir.name}", "".join(body), css=SYNTH_CSS,
                      footer=f" from <code>{escape(str(run_dir))}</code>.")
