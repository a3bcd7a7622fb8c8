"""The `frugalseg` command: parses options, builds a config, calls one stage. Nothing else lives here.

Commands are built only when they run (or their `--help` is asked for): `frugalseg --help` imports
neither torch nor any stage. Options come from the stage configs' fields (`frugalseg.cli.options`), so the
dataclasses are the single source of truth for names, types, defaults and help. Errors caused by input
print one clear line (exit 2); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click

from frugalseg.cpu_allocator import tune_cpu_allocator
from frugalseg.errors import FrugalsegError

log = logging.getLogger("frugalseg")


class LazyGroup(click.Group):
    """A click group whose commands are made by builder functions the first time they are needed; the
    command list in `--help` uses each builder's one-line summary, so listing imports nothing."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[Callable[[], click.Command], str]] | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            self.add_command(self.lazy[name][0](), name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy and name not in self.commands:
                rows.append((name, self.lazy[name][1]))
            else:
                cmd = super().get_command(ctx, name)
                if cmd is not None and not cmd.hidden:
                    rows.append((name, cmd.get_short_help_str(formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


CONFIG_OPTION_HELP = "Re-run from a saved config.yaml; other options override it."


def _config_option():
    return click.option("--config", "config_file", type=click.Path(dir_okay=False), help=CONFIG_OPTION_HELP)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


# ---- train / eval / predict / demo ------------------------------------------------------------------
SEMI_HELP = ("Semi-supervised training on labelled + unlabelled images (2D slices or 3D volumes, e.g. acdc, "
             "la2018): dtc (dual-task consistency), cotrain (deep co-training of --models K networks), meanteacher, "
             "or none (the supervised-only baseline on the same labelled set and batches). The labelled set is "
             "--labelled-patients N, --labelled-fraction F or --labelled-ids; the rest is unlabelled.")


def _train_configs() -> dict[str, type]:
    """`train`'s option sources: TrainConfig, then each --semi method's config."""
    from frugalseg.stages.semi import SEMI_METHODS
    from frugalseg.stages.train import TrainConfig

    return {"train": TrainConfig, **{f"--semi {name}": cls for name, (cls, _) in SEMI_METHODS.items()}}


def _train_command() -> click.Command:
    from frugalseg.cli.options import merged_config_options

    @click.command()
    @_config_option()
    @click.option("--semi", type=click.Choice(["dtc", "cotrain", "meanteacher", "none"]), default=None, help=SEMI_HELP)
    @merged_config_options(_train_configs())
    def train(config_file: str | None, semi: str | None, **options) -> None:
        """Train a segmentation model with masks (optionally a label budget), evaluate and report.

        With --semi METHOD, train semi-supervised on labelled + unlabelled images instead; options marked
        [--semi ...] belong to those methods only, options marked [train] to supervised training only.
        Progress, checkpoints every epoch and --resume work the same way in both.
        """
        from frugalseg.cli.options import build_config
        from frugalseg.stages.options import load_config

        cls, run_train = _train_target(semi, config_file)
        cfg = build_config(cls, _options_for(cls, options, semi), config_file, load_config)
        _print_result(run_train(cfg))

    return train


def _train_target(semi: str | None, config_file: str | None):
    """(config class, train function) for `train [--semi X] [--config file]`."""
    from frugalseg.errors import ConfigError
    from frugalseg.stages.semi import SEMI_METHODS
    from frugalseg.stages.train import TrainConfig, train

    from frugalseg.stages.options import read_config_file

    saved = read_config_file(config_file).get("semi") or None if config_file else None
    if semi is not None and saved is not None and semi != saved:
        raise ConfigError(f"{config_file} is a --semi {saved} run; it cannot be re-run with --semi {semi}.")
    semi = semi or saved
    if semi is None:
        return TrainConfig, train
    return SEMI_METHODS[semi]


def _options_for(cls: type, options: dict, semi: str | None) -> dict:
    """The options of `cls`; a clear error for a given option that belongs to another mode."""
    import dataclasses
    import typing

    from frugalseg.cli.options import click_type, given
    from frugalseg.errors import ConfigError

    names = {f.name for f in dataclasses.fields(cls)}
    chosen = set(given(options))
    foreign = sorted(chosen - names)
    if foreign:
        opts = ", ".join("--" + n.replace("_", "-") for n in foreign)
        what = "is an option" if len(foreign) == 1 else "are options"
        if semi is None:
            raise ConfigError(f"{opts} {what} of semi-supervised training: add --semi dtc|cotrain|meanteacher|none "
                              "(see frugalseg train --help).")
        owners = [label for label, c in _train_configs().items() if foreign[0] in {f.name for f in dataclasses.fields(c)}]
        hint = ""
        if set(foreign) & {"mask_fraction", "mask_count"}:
            hint = (" Semi-supervised runs choose the labelled set with --labelled-patients, --labelled-fraction "
                    "(of the patients) or --labelled-ids.")
        owners = ["supervised training (no --semi)" if o == "train" else o for o in owners]
        raise ConfigError(f"{opts} {what} of {' / '.join(owners)}, not of --semi {semi}.{hint}")
    hints = typing.get_type_hints(cls)
    for name in sorted(chosen & names):  # merged options offer every mode's choices: check this mode's
        choice, _ = click_type(hints[name])
        if isinstance(choice, click.Choice) and str(options[name]) not in choice.choices:
            mode = f"--semi {semi}" if semi else "supervised training (no --semi)"
            raise ConfigError(f"--{name.replace('_', '-')} {options[name]} is not a choice of {mode}: "
                              f"{', '.join(choice.choices)}.")
    return {k: v for k, v in options.items() if k in names}


def _print_result(result: dict) -> None:
    val = result.get("val") or {}
    line = f"run: {result['run']}"
    if result.get("method"):
        line += f"  (--semi {result['method']}, {result['labelled']} labelled / {result['unlabelled']} unlabelled)"
    natural = (val.get("model") or {}).get("arch") in ("ocr", "fcn")  # scored by mIoU, semi-supervised or not
    if val.get("miou") is not None and (natural or not result.get("method")):
        line += f"  val mIoU {val['miou']:.4f}"
    if ((result.get("method") and not natural) or val.get("kind") == "volume") and val.get("case_mean_dice") is not None:
        line += f"  val mean Dice {val['case_mean_dice']:.4f}"
    if result.get("method") and val.get("case_mean_hd95") is not None:
        line += f"  HD95 {val['case_mean_hd95']:.2f} {val.get('surface_units', '')}".rstrip()
    click.echo(line)
    if (Path(result["run"]) / "report.html").exists():
        click.echo(f"report: {Path(result['run']) / 'report.html'}")


def _eval_command() -> click.Command:
    @click.command("eval")
    @click.argument("run", type=click.Path(exists=True, file_okay=False))
    @click.option("--split", default="val", show_default=True)
    @click.option("--data", default=None, help="Evaluate on another dataset than the one trained on (same classes).")
    def eval_cmd(run: str, split: str, data: str | None) -> None:
        """Evaluate a trained run on a split: metrics/<split>.json, predictions, report.html."""
        from frugalseg.stages.train import evaluate_run

        m = evaluate_run(run, split=split, data=data)
        keys = ("dataset", "samples", "miou", "mean_dice", "mean_dice_foreground", "case_mean_dice",
                "case_mean_hd95", "surface_units")
        _echo_json({k: m[k] for k in keys if k in m})

    return eval_cmd


def _predict_command() -> click.Command:
    @click.command()
    @click.argument("inputs", nargs=-1, required=True, type=click.Path())
    @click.option("--model", "model_path", required=True, type=click.Path(exists=True),
                  help="A run directory, its model/ export folder, or a .ckpt file.")
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for masks (PNG / NIfTI) and overlays.")
    @click.option("--overlays/--no-overlays", default=True, show_default=True)
    def predict(inputs: tuple[str, ...], model_path: str, out: str, overlays: bool) -> None:
        """Predict masks for image files, folders or volumes."""
        from frugalseg.stages.train import predict_files

        p = Path(model_path)
        if p.is_dir() and (p / "model" / "config.json").exists():
            p = p / "model"
        result = predict_files(p, inputs, out, overlays=overlays)
        click.echo(f"wrote {len(result.written)} masks to {out}")
        if result.failed:
            click.echo(f"{len(result.failed)} input(s) skipped:", err=True)
            for path, reason in result.failed.items():
                click.echo(f"  {reason if path in reason else f'{path}: {reason}'}", err=True)
            sys.exit(1)

    return predict


def _demo_command() -> click.Command:
    @click.command()
    @click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
    @click.option("--epochs", default=20, show_default=True)
    @click.option("--masks", "n_masks", default=24, show_default=True,
                  help="Training images that keep their masks; the others are unlabelled.")
    def demo(out: str, epochs: int, n_masks: int) -> None:
        """The product's loop on a generated shapes dataset (no download): a model from masks for a few
        images, then what to annotate next among the unlabelled ones, and the command that opens the page."""
        from frugalseg.data.synthetic import make_shapes_dataset
        from frugalseg.stages.query import QueryConfig, query
        from frugalseg.stages.train import TrainConfig, train

        data_dir = make_shapes_dataset(Path(out).parent / "demo-data", n_train=96, n_val=16)
        unlabelled = _keep_few_masks(data_dir, n_masks)
        cfg = TrainConfig(data=str(data_dir), out=out, arch="ocr", epochs=epochs, crop_size=128, scale=(0.75, 1.25),
                          batch_size=8, lr=0.01)
        click.echo(f"demo: training OCR on {data_dir}: masks for {n_masks} images, {unlabelled} unlabelled "
                   f"({epochs} epochs, CPU-sized)")
        _print_result(train(cfg))
        click.echo("demo: ranking the unlabelled images' superpixels (uncertainty + geometric prior)")
        result = query(QueryConfig(run=out, regions=12, n_segments=150))
        click.echo(f"demo: {result['queries']} regions to annotate next: {Path(result['out']) / 'queries.html'}")
        click.echo(f"demo: answer them in your browser: frugalseg annotate {result['out']}  "
                   f"(answers become masks in {result['masks']}; then train again)")

    return demo


def _keep_few_masks(data_dir: Path, n_masks: int) -> int:
    """Remove the masks of all training images but the first `n_masks` (once): the demo's cheap labels."""
    marker = data_dir / "demo_labelled.txt"
    train_ids = (data_dir / "splits" / "train.txt").read_text().split()
    if not marker.exists():
        for stem in train_ids[n_masks:]:
            (data_dir / "masks" / f"{stem}.png").unlink(missing_ok=True)
        marker.write_text("\n".join(train_ids[:n_masks]) + "\n")
    return sum(not (data_dir / "masks" / f"{stem}.png").exists() for stem in train_ids)


# ---- tags: classify / cams / eval-seeds / run ----------------------------------------------------------
def _classify_command() -> click.Command:
    from frugalseg.cli.options import config_options
    from frugalseg.stages.classify import ClassifyConfig

    @click.command()
    @_config_option()
    @config_options(ClassifyConfig)
    def classify(config_file: str | None, **options) -> None:
        """Train a multi-label tag classifier on image tags (masks ignored); per-class AP / F1."""
        from frugalseg.cli.options import build_config
        from frugalseg.stages.classify import train_classifier
        from frugalseg.stages.options import load_config

        result = train_classifier(build_config(ClassifyConfig, options, config_file, load_config))
        line = f"run: {result['run']}"
        ev = result.get("eval")
        if ev and ev.get("mAP") is not None:
            line += f"  {ev['dataset']} tag mAP {ev['mAP']:.4f}  mean F1 {ev['mean_f1']:.4f}"
        click.echo(line)

    return classify


def _cams_command() -> click.Command:
    from frugalseg.cli.options import config_options
    from frugalseg.stages.maps import MapsConfig

    @click.command()
    @config_options(MapsConfig)
    def cams(**options) -> None:
        """Class maps (cam | advcam | prm) for a split: one .npz per image, maps.json, gallery.html."""
        from frugalseg.cli.options import build_config
        from frugalseg.stages.maps import default_out, make_maps
        from frugalseg.stages.options import load_config

        cfg = build_config(MapsConfig, options, None, load_config)
        m = make_maps(cfg)
        rate = f", {m['images_per_s_now']:.3f} images/s" if m["images_per_s_now"] else ""
        click.echo(f"{m['method']} maps for {m['images']} images in {default_out(cfg)} ({m['computed_now']} computed now{rate})")
        click.echo(f"gallery: {default_out(cfg) / 'gallery.html'}")

    return cams


def _run_command() -> click.Command:
    from frugalseg.cli.options import config_options
    from frugalseg.stages.pipeline import PipelineConfig

    @click.command("run")
    @_config_option()
    @config_options(PipelineConfig)
    def run_cmd(config_file: str | None, **options) -> None:
        """Tags to a segmentation model: classifier, seeds, CRF, mining rounds with a segmenter; resumable."""
        from frugalseg.cli.options import build_config
        from frugalseg.stages.options import load_config
        from frugalseg.stages.pipeline import run_pipeline

        cfg = build_config(PipelineConfig, options, config_file, load_config)
        summary = run_pipeline(cfg)
        for r in summary["stages"]:
            v = "-" if r["miou"] is None else f"{r['miou']:.4f}"
            click.echo(f"{r['stage']:22s} {r['split']} pseudo-mask mIoU {v}")
        if summary["final_val_miou"] is not None:
            choice = summary.get("round_choice") or {}
            click.echo(f"final segmenter (round {summary['final_round']}, {choice.get('chosen_on', 'last round')}): "
                       f"{summary['val_split']} mIoU {summary['final_val_miou']:.4f}")
        click.echo(f"report: {Path(cfg.out) / 'report.html'}")

    return run_cmd


def _eval_seeds_command() -> click.Command:
    @click.command("eval-seeds")
    @click.argument("maps_dir", type=click.Path(exists=True, file_okay=False))
    @click.option("--split", default=None, help="Split whose masks to score against [default: the maps' split].")
    @click.option("--data", default=None, help="Dataset [default: the classifier's].")
    @click.option("--threshold", type=float, default=None, help="Fixed background threshold [default: 0.15, IRN].")
    @click.option("--threshold-from", type=click.Path(exists=True, dir_okay=False),
                  help="Use the threshold chosen by a sweep on another split (a seeds_<split>.json).")
    @click.option("--sweep", default=None, help="Also report a sweep over this split, e.g. 0.05:0.6:0.05 (reported as a sweep).")
    def eval_seeds_cmd(maps_dir: str, split: str | None, data: str | None, threshold: float | None,
                       threshold_from: str | None, sweep: str | None) -> None:
        """Seed mIoU of class maps against masks: fixed threshold, and a sweep reported as such."""
        from frugalseg.stages.maps import eval_seeds, parse_sweep
        from frugalseg.weak.seeds import format_sweep_table

        res = eval_seeds(maps_dir, split=split, data=data, threshold=threshold, threshold_from=threshold_from,
                         sweep=parse_sweep(sweep) if sweep else None)
        f = res["fixed"]
        t = ("argmax over tags" if res["fixed_threshold"] is None
             else f"threshold {res['fixed_threshold']:.2f} ({res['fixed_threshold_source']})")
        click.echo(f"{res['method']} seeds on {res['split']} ({res['images']} images), {t}: mIoU {f['miou']:.4f}")
        if res["sweep"]:
            click.echo(format_sweep_table(res["sweep"]))

    return eval_seeds_cmd


# ---- data sets --------------------------------------------------------------------------------------------
def _datasets_command() -> click.Command:
    @click.group()
    def datasets() -> None:
        """Public datasets: list and download (with checksums)."""

    @datasets.command("list")
    def datasets_list() -> None:
        from frugalseg.data.download import CATALOGUE

        for name, src in CATALOGUE.items():
            click.echo(f"{name:12s} {src.description}")

    @datasets.command("download")
    @click.argument("name")
    @click.option("--root", type=click.Path(file_okay=False), default=None,
                  help="Data root (default $FRUGALSEG_DATA or ~/.cache/frugalseg/datasets).")
    @click.option("--force", is_flag=True, help="Download and extract again even if present.")
    def datasets_download(name: str, root: str | None, force: bool) -> None:
        from frugalseg.data.download import download_dataset

        path = download_dataset(name, Path(root) if root else None, force=force)
        click.echo(f"{name}: {path}")

    return datasets


def _data_command() -> click.Command:
    @click.group()
    def data() -> None:
        """Inspect datasets."""

    @data.command("validate")
    @click.argument("source")
    @click.option("--split", default="train", show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
    def data_validate(source: str, split: str, as_json: bool) -> None:
        """Read every image and mask once and list every problem found (exit 1 if any)."""
        from frugalseg.data.validate import validate_source

        report = validate_source(source, split)
        if as_json:
            _echo_json(report)
        else:
            click.echo(f"{report['dataset']}: {report['samples']} samples, {report['with_mask']} with masks, "
                       f"{report['with_tags_only']} with tags only, {report['unlabelled']} unlabelled")
            for name, v in report["classes"].items():
                click.echo(f"  {name:20s} {v['images']:6d} images {v['pixels']:12d} px")
            for p in report["problems"]:
                click.echo(f"problem: {p}")
            click.echo("ok" if report["ok"] else f"{len(report['problems'])} problem(s)")
        if not report["ok"]:
            sys.exit(1)

    return data


# ---- self-supervised pretraining ---------------------------------------------------------------------------
def _pretrain_command() -> click.Command:
    from frugalseg.cli.options import config_options
    from frugalseg.stages.pretrain import PretrainConfig

    @click.command()
    @_config_option()
    @config_options(PretrainConfig)
    def pretrain(config_file: str | None, **options) -> None:
        """Pretrain a segmenter's encoder without ImageNet: colorize, rotation, or mixmatch (after a proxy, with
        --init); then `train --pretrained RUN`."""
        from frugalseg.cli.options import build_config
        from frugalseg.stages.options import load_config
        from frugalseg.stages.pretrain import pretrain as run_pretrain

        result = run_pretrain(build_config(PretrainConfig, options, config_file, load_config))
        click.echo(f"run: {result['run']}  {result['task']} on {result['images']} images ({result['seconds']} s); "
                   f"weights: {result['weights']}")

    return pretrain


# ---- synthetic pairs ------------------------------------------------------------------------------------
def _synth_command() -> click.Command:
    from frugalseg.cli.options import config_options
    from frugalseg.stages.synth import SynthTrainConfig

    @click.group()
    def synth() -> None:
        """Synthetic image/mask pairs: a mask → image cGAN and a mask shape model."""

    @synth.command("train")
    @_config_option()
    @config_options(SynthTrainConfig)
    def synth_train(config_file: str | None, **options) -> None:
        """Train the shape model and the cGAN on the labelled images of a label budget (resumable)."""
        from frugalseg.cli.options import build_config
        from frugalseg.stages.options import load_config
        from frugalseg.stages.synth import train_synth

        result = train_synth(build_config(SynthTrainConfig, options, config_file, load_config))
        click.echo(f"run: {result['run']}  ({result['labelled_images']} labelled images, GAN "
                   f"{result['gan_seconds']} s)")
        if result.get("report"):
            click.echo(f"report: {result['report']}")

    @synth.command("sample")
    @click.option("--run", "run_path", required=True, type=click.Path(exists=True, file_okay=False),
                  help="A finished `synth train` run.")
    @click.option("--n", type=int, required=True, help="Number of pairs to write.")
    @click.option("--out", required=True, type=click.Path(file_okay=False),
                  help="New folder dataset to write (images/, masks/, classes.txt).")
    @click.option("--masks", type=click.Choice(["shapes", "real"]), default="shapes", show_default=True,
                  help="shapes: new masks from the shape model; real: the training masks re-rendered (ablation).")
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--temperature", type=float, default=1.0, show_default=True,
                  help="Scale of the shape model's mode coefficients (below 1: closer to the mean shape).")
    @click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
    @click.option("--void-background-beyond", type=float, default=None,
                  help="Make background pixels farther than this many pixels from every object void (255) in the "
                       "written masks: what the masks do not label (e.g. red cells around a white cell) the "
                       "generator cannot draw, so its backgrounds should not teach what background looks like.")
    def synth_sample(run_path: str, n: int, out: str, masks: str, seed: int, temperature: float, device: str,
                     void_background_beyond: float | None) -> None:
        """Write N synthetic pairs as a folder dataset; train with `train --extra-data OUT`."""
        from frugalseg.stages.synth import sample_synth

        result = sample_synth(run_path, n, out, masks=masks, seed=seed, temperature=temperature, device=device,
                              void_background_beyond=void_background_beyond)
        nov = result["novelty"]["nearest_iou_aligned"]
        click.echo(f"{n} pairs in {out} ({result['seconds_this_call']} s); mask shape IoU with the nearest "
                   f"training mask: mean {nov['mean']:.3f}, max {nov['max']:.3f}")

    return synth


# ---- active learning: query / annotate ------------------------------------------------------------------
def _query_command() -> click.Command:
    from frugalseg.cli.options import config_options
    from frugalseg.stages.query import QueryConfig

    @click.command()
    @click.argument("run", type=click.Path(exists=True, file_okay=False))
    @config_options(QueryConfig)
    def query(run: str, **options) -> None:
        """What to annotate next: rank the superpixels of a dataset's images by the run's uncertainty (with
        the geometric prior of Konyushkova et al. by default) and write queries.json and queries.html."""
        from frugalseg.cli.options import build_config
        from frugalseg.stages.options import load_config
        from frugalseg.stages.query import query as run_query

        result = run_query(build_config(QueryConfig, {**options, "run": run}, None, load_config))
        click.echo(f"{result['queries']} queries from {result['images_scored']} images: "
                   f"{Path(result['out']) / 'queries.html'}")
        click.echo(f"answer them: {result['annotate']}   (answers go to {result['masks']})")

    return query


def _annotate_command() -> click.Command:
    @click.command()
    @click.argument("queries", type=click.Path(exists=True, file_okay=False))
    @click.option("--port", default=8765, show_default=True, help="Port on 127.0.0.1 (0: any free port).")
    @click.option("--masks", default=None, type=click.Path(file_okay=False),
                  help="Write answers here instead of the folder queries.json names.")
    @click.option("--open-browser/--no-open-browser", default=False, show_default=True)
    def annotate(queries: str, port: int, masks: str | None, open_browser: bool) -> None:
        """Serve the annotation page for a queries folder on 127.0.0.1: paint or correct each queried
        region with the dataset's classes and save; answers become partial masks (255 outside them)."""
        from frugalseg.stages.annotate import serve

        serve(Path(queries), port=port, masks=masks, open_browser=open_browser, echo=click.echo)

    return annotate


# name -> (builder, one-line summary shown by `frugalseg --help` without building the command)
COMMANDS: dict[str, tuple[Callable[[], click.Command], str]] = {
    "train": (_train_command, "Train a segmentation model with masks, or semi-supervised with --semi."),
    "eval": (_eval_command, "Evaluate a trained run on a split: metrics, predictions, report.html."),
    "predict": (_predict_command, "Predict masks for image files, folders or volumes."),
    "classify": (_classify_command, "Train a multi-label tag classifier on image tags; per-class AP / F1."),
    "cams": (_cams_command, "Class maps (cam | advcam | prm) for a split, with a gallery."),
    "eval-seeds": (_eval_seeds_command, "Seed mIoU of class maps against masks: fixed threshold and sweeps."),
    "run": (_run_command, "Tags to a segmentation model: classifier, seeds, CRF, mining rounds; resumable."),
    "datasets": (_datasets_command, "Public datasets: list and download (with checksums)."),
    "data": (_data_command, "Inspect datasets (validate)."),
    "demo": (_demo_command, "The whole loop on generated data: few masks, a model, what to annotate next."),
    "pretrain": (_pretrain_command, "Self-supervised encoder pretraining (colorize, rotation) and mix-and-match tuning."),
    "synth": (_synth_command, "Synthetic image/mask pairs: train a mask → image cGAN, sample a folder dataset."),
    "query": (_query_command, "What to annotate next: queries.json and a page of regions, from a trained run."),
    "annotate": (_annotate_command, "Serve a local page to answer queries; answers become partial masks."),
}


@click.group(cls=LazyGroup, lazy=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="frugalseg")
def cli(verbose: int) -> None:
    """frugalseg: segmentation models from cheap supervision (tags, few masks, nothing)."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("frugalseg").setLevel(logging.INFO if verbose == 0 else level)
    if verbose < 2:
        _quiet_lightning()
    tune_cpu_allocator()
    import warnings

    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # The semi-supervised batches split each epoch between workers and ranks themselves (`semi.batches`).
    warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__` defined.*")
    # Validation is off (--val-every 0 / no split): the step exists for when it is on.
    warnings.filterwarnings("ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*")


def _quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (GPU/TPU lines, tips) out of the user's way.

    Lightning sets its loggers to INFO with a handler of its own *when imported*, which happens lazily inside
    the commands, after this group callback. So the levels are set now and again right after that import,
    through a one-shot import hook; and propagation is cut so nothing prints twice.
    """
    import importlib.abc

    names = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
             "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")

    def apply() -> None:
        for name in names:
            lg = logging.getLogger(name)
            lg.setLevel(logging.WARNING)
            lg.propagate = False if lg.handlers else lg.propagate

    apply()
    if "lightning.pytorch" in sys.modules:
        return

    class _AfterLightning(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname == "lightning.pytorch.trainer":  # imported once lightning.pytorch has set up logging
                apply()
            return None

    sys.meta_path.insert(0, _AfterLightning())


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except FrugalsegError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort as exc:  # click turns Ctrl-C into Abort
        click.echo(_interrupted_message() if isinstance(exc.__cause__, KeyboardInterrupt) else "aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo(_interrupted_message(), err=True)
        sys.exit(130)


#: What an interrupted command leaves, and how to continue it.
INTERRUPTED = {
    "train": "interrupted: the run can continue with --resume (from its last epoch's checkpoint)",
    "classify": "interrupted: the run can continue with --resume (from its last epoch's checkpoint)",
    "run": "interrupted: run the same command again; finished stages are kept and training resumes",
    "cams": "interrupted: run the same command again; the maps already written are kept",
}


def _interrupted_message() -> str:
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    return INTERRUPTED.get(command, "interrupted: nothing half-written was left; run the command again")
