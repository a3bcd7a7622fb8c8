"""The report of a tags-to-model run (`frugalseg run`): pseudo-mask mIoU per stage and per round, and each
image's seeds, pseudo-masks and predictions side by side.

Everything shown comes from what the run wrote: `summary.json` (as `summary`) and each stage's mask folder
(`<safe id>.png`, `data.io.sample_file`); nothing is recomputed here.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any, Sequence

from frugalseg.data.io import make_folder, read_label_png, sample_file, write_rgb
from frugalseg.data.samples import SegDataset
from frugalseg.report.html import write_page
from frugalseg.report.overlays import colourise, panel

ASSETS_DIR = "report_assets"
PIPELINE_CSS = """
.row img{max-width:100%;height:auto}.row p{margin:.8em 0 .2em;font-weight:bold}
"""


def write_pipeline_report(run_dir: Path | str, ds: SegDataset, stages: Sequence[tuple[str, Path | str]],
                          summary: dict[str, Any], max_images: int = 16) -> Path:
    """`run_dir/report.html`: the per-stage mIoU table of `summary` and, for the first `max_images` images
    of `ds`, one panel of the image, its truth and every stage's mask (`stages`: (name, mask folder))."""
    run_dir = Path(run_dir)
    assets = run_dir / ASSETS_DIR
    make_folder(assets)
    rows_html = []
    for s in ds.samples[:max_images]:
        image = ds.read_image(s)
        tiles, titles = [image], ["image"]
        if s.mask is not None:
            tiles.append(colourise(ds.read_mask(s), ds.labels))
            titles.append("truth")
        for name, folder in stages:
            f = sample_file(folder, s.id, ".png")
            if f.exists():
                tiles.append(colourise(read_label_png(f), ds.labels))
                titles.append(name.replace("_", " "))
        path = sample_file(assets, s.id, ".jpg")
        write_rgb(path, panel(tiles, titles))
        rows_html.append(f'<div class="row"><p>{escape(s.id)}</p><img src="{ASSETS_DIR}/{path.name}"></div>')
    table = "".join(
        f"<tr><td>{escape(r['stage'])}</td><td>{escape(str(r['split']))}</td><td class=\"n\">{_fmt(r['miou'])}</td>"
        f"<td class=\"n\">{_fmt(r['miou_labelled'])}</td><td class=\"n\">{_fmt(r['labelled_fraction'])}</td></tr>"
        for r in summary["stages"])
    choice = summary.get("round_choice") or {}
    calib = choice.get("calibration_miou_by_round", {})
    final = summary.get("final_round")
    val_rows = "".join(f"<tr><td>round {r}{' (chosen)' if str(r) == str(final) else ''}</td>"
                       f"<td>{escape(str(summary['val_split']))}</td><td class=\"n\">{_fmt(v['miou'])}</td>"
                       f"<td class=\"n\">{_fmt(calib.get(str(r)))}</td></tr>"
                       for r, v in summary["val_by_round"].items())
    chosen = (f"<p>The run's model (<code>model/</code>) is round {final}'s segmenter, chosen on "
              f"{escape(str(choice.get('chosen_on')))}"
              + (f" ({choice['calibration_images']} images; their masks also trained the segmenters)"
                 if choice.get("calibration_masks_trained") else
                 f" ({choice['calibration_images']} images)" if choice.get("calibration_images") else "")
              + "; the validation split chose nothing.</p>") if final is not None else ""
    cfg = summary["config"]
    body = f"""<header><h1>From tags to a segmentation model</h1></header>
<section id="summary"><p>{summary['train_images']} training images ({escape(str(cfg['train_split']))}), seeds from
<b>{escape(str(cfg['seeds']))}</b>, refinement {escape(str(cfg['refine']))}, {cfg['rounds']} mining rounds;
{summary['seconds']:.0f} s. Training-image masks are used only to score the stages below{_calibration_note(summary)}.</p></section>
<section id="stages"><h2>Pseudo-mask mIoU per stage (training images)</h2>
<table><tr><th>stage</th><th>split</th><th>mIoU (ignore = background)</th><th>mIoU of labelled pixels</th><th>labelled fraction</th></tr>{table}</table></section>
<section id="rounds"><h2>Segmenter per round</h2>{chosen}<table><tr><th>round</th><th>split</th><th>mIoU</th>
<th>mIoU on calibration images</th></tr>{val_rows}</table></section>
<section id="images"><h2>Per image</h2>{''.join(rows_html)}</section>"""
    return write_page(run_dir / "report.html", "frugalseg run: tags to model", body, css=PIPELINE_CSS,
                      footer=f" from <code>{escape(run_dir.name)}/</code>.")


def _calibration_note(summary: dict) -> str:
    th = summary.get("thresholds") or {}
    if not th.get("calibration_images"):
        return ", never to choose anything"
    return (f" ({summary['scored_images']} images), except {th['calibration_images']} calibration images whose masks "
            f"chose the background threshold {th['seed']} (CRF planes {th['fg']} / {th['bg']}) and which are not scored")


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.4f}"
