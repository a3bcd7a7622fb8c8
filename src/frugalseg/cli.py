"""The `frugalseg` command: parses options, builds a config, calls a stage. Nothing else lives here.

Options of `train` are generated from `TrainConfig`'s fields and, for `train --semi METHOD`, from the
semi-supervised methods' configs (`frugalseg.semi.methods()`), so the dataclasses are the single source of
truth for names, types, defaults and `--help`. Errors caused by input print one clear line (exit 2);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import click

from frugalseg.cpu_allocator import tune_cpu_allocator
from frugalseg.errors import FrugalsegError

log = logging.getLogger("frugalseg")

HELP = {
    "data": "Dataset folder (VOC, folders, SSL4MIS HDF5, MSD NIfTI) or task name (msrc-objects, acdc, la2018, ...).",
    "out": "Run directory to write (config, checkpoints, metrics, predictions, report.html).",
    "arch": "Model: ocr or fcn head on a timm backbone, or unet2d for medical slices; with --semi: unet (2D/3D) or vnet (3D).",
    "backbone": "Any timm model name; tf_efficientnet_lite0/1/2 have offline ImageNet weights.",
    "aux_stage": "Backbone stage feeding the auxiliary head (OCR's soft object regions): last (HRNet-OCR) or penultimate (ResNet-OCR).",
    "pretrained": "true (ImageNet weights), false (random init), or a path to a weight file.",
    "policy": "Augmentation: crop (rescale/crop/flip, natural images) or resize (fixed size + rot90/flip, medical).",
    "crop_size": "Training crop (crop policy) or the fixed input size (resize policy).",
    "mask_fraction": "Label budget: train with masks of this fraction of images (seeded by --budget-seed).",
    "mask_count": "Label budget: train with masks of this many images.",
    "labelled_ids": "Label budget: exactly these sample ids have masks (repeat the option, or @file with one id a line).",
    "precision": "auto = bf16/16-mixed on GPU, 32 on CPU; or any Lightning precision string.",
    "devices": "Lightning devices (auto, 1, 4, ...). For several GPUs/nodes launch with torchrun or srun.",
    "resume": "Continue from the run's last checkpoint.",
    "peak_stimulation": "PRM: train with peak stimulation (class score = mean response at local maxima).",
    "frozen_stages": "Backbone feature stages kept frozen (IRN: up to stride 8).",
    "method": "cam (forward pass), advcam (anti-adversarial climbing) or prm (peak response maps + instances).",
    "classifier": "A classify run directory.",
    "maps_from": "Reuse another run's maps folder (its cams/: same classifier, method and images) instead of computing maps.",
    "scales": "Image scales for maps (repeat the option: --scales 1.0 --scales 0.5).",
    "autocast": "AdvCAM network passes in bf16: auto (GPU only), bf16 (also on CPUs with bf16 support), off.",
    "limit": "Only the first N images of the split (a fixed, stated subset).",
    "restriction": "AdvCAM lambda: weight of the restriction penalty (fractional allowed).",
    "step_size": "AdvCAM xi: step per climb, after max-normalising the gradient.",
    "mask_threshold": "AdvCAM tau: restriction mask = map > tau * max, rebuilt every step.",
    "gradcam_scale": "AdvCAM: penalise the reference's Grad-CAM-scaled maps (else raw CAM values).",
    "background_classes": "Class names merged into background (repeat the option).",
    "mask_dir": "Train on the masks in this folder (<id>.png in the dataset's class ids, 255 = ignore), e.g. pseudo-masks.",
    "seeds": "Where seeds come from: cam, advcam, prm, or group (co-attention over groups of images sharing a tag).",
    "refine": "crf: dense-CRF pseudo-masks with confidence-based ignore regions; none: seeds go straight to mining.",
    "rounds": "MCOF iterations: mine regions from the seeds, train a segmenter on them, its predictions seed the next.",
    "saliency_rounds": "Rounds that refine regions with saliency under a Bayesian rule (MCOF: the first only).",
    "round_seeds": "Rounds >= 2 start from the last predictions (MCOF) or where they agree with the last mined regions (agreement).",
    "init_from": "Start from the weights of an exported model (a run's model/ folder or a .ckpt) of the same network.",
    "segmenter_init": "Round >= 2 segmenters: continue from the previous round's model (previous) or start from ImageNet weights.",
    "continue_lr_mult": "Round >= 2 segmenters that continue from the previous round's model train at lr times this.",
    "calibration_fraction": "Masks of this fraction of training images choose the background threshold (seeds, CRF); they are not scored.",
    "region_class_balanced": "Mining: weigh the region classifier's classes by inverse frequency (off: background keeps its weight).",
    "fg_threshold": "CRF pseudo-masks: foreground where the CRF of maps vs this background level says so (AdvCAM 0.35).",
    "bg_threshold": "CRF pseudo-masks: background where the CRF of maps vs this level says so; between = ignore (0.15).",
    "ignore_classes": "Class names turned into void, excluded from loss and metrics (repeat the option).",
    # semi-supervised training (train --semi)
    "labelled_patients": "Labelled set: every slice of the first N patients of the list (SSL4MIS/DTC protocol: 3 or 7 on ACDC).",
    "labelled_fraction": "Labelled set: this fraction of the patients (cases), drawn with --budget-seed; the rest is unlabelled.",
    "budget_seed": "Seed of the label-budget draw.",
    "unlabelled_limit": "Use only the first N unlabelled samples.",
    "val_limit": "Evaluate on the first N validation cases only.",
    "dims": "2 (slices) or 3 (volumes) [default: the training split's].",
    "channels": "U-Net channels per level, e.g. 16,32,64,128,256.",
    "dropout": "Dropout [default: 0 for the U-Net, 0.5 for the V-Net].",
    "patch_size": "Training patch: one size (square/cube) or one per axis, e.g. 256 or 112,112,80 [default: by dims].",
    "labelled_batch_size": "Labelled samples per batch (per model for co-training) [default: by dims and method].",
    "unlabelled_batch_size": "Unlabelled samples per batch [default: by dims and method; 0 for --semi none].",
    "augment": "ssl4mis (rot90/flip or ±20° rotation in 2D, RandomRotFlip in 3D), rotflip, or none.",
    "iterations": "Training iterations [default: 30000 in 2D (SSL4MIS), 6000 in 3D (DTC)].",
    "epoch_steps": "Iterations per epoch: checkpoint and validation interval.",
    "rampup_every": "Iterations per unit of the consistency ramps (SSL4MIS/DTC: 150).",
    "lr_schedule": "poly (power 0.9) or step (x0.1 every --lr-step) [default: poly in 2D, step in 3D].",
    "val_overlap": "Sliding-window overlap of 3D inference.",
    "largest_component": "Keep each class's largest connected component in evaluation (DTC's nms).",
    "n_models": "Number K >= 2 of co-trained models.",
    "adversarial": "Co-training's adversarial view-difference (diversity) term.",
    "consistency": "Maximum consistency weight [default: by dims: 0.1 in 2D; DTC 1.0 in 3D].",
    "consistency_rampup": "Consistency ramp-up length in units of --rampup-every iterations.",
    "beta": "DTC: weight of the level-set (SDF) regression.",
    "k": "DTC: k of the transform sigmoid(-k * sdf).",
    "ema_decay": "Mean teacher: EMA decay of the teacher.",
    "evaluate": "Mean teacher: the network evaluated and exported as model/ (student or teacher).",
    "network": "Supervised-only baseline: plain (U-Net/V-Net) or levelset (DTC's network, level-set head unused).",
    "views": "Co-training views of the labelled set: split (disjoint by patient) or bootstrap.",
    "view_overlap": "Co-training: fraction of labelled patients every model sees.",
}


# Where a field means something else in another command's config.
HELP_BY_CONFIG = {
    "MapsConfig": {
        "out": "Folder for the maps [default: <classifier>/maps_<method>_<split>].",
        "data": "Dataset to map [default: the classifier's].",
        "split": "Split(s) to map; '+' joins splits (train+val).",
        "batch_size": "Images per batch (AdvCAM climbs all their tagged classes at once).",
    },
    "ClassifyConfig": {
        "out": "Run directory for the classifier (config, checkpoints, model/, metrics/).",
        "train_split": "Split(s) whose tags train the classifier; '+' joins splits (train+val).",
        "eval_split": "Split for per-class AP / F1 (empty to skip).",
        "crop_size": "Training crop after the random rescale.",
        "base_size": "Longer image side before the random scale factor.",
    },
}


def _click_type(tp: Any) -> tuple[Any, dict]:
    """Map a dataclass annotation to a click type and extra option settings."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _click_type(args[0])
        if set(args) == {bool, str}:
            return _BoolOrPath(), {}
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


class _BoolOrPath(click.ParamType):
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


class _Sizes(click.ParamType):
    """A list of integers written 112,112,80 or 112x112x80 (or one integer)."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return [int(v) for v in value]
        try:
            return [int(v) for v in str(value).replace("x", ",").split(",") if v.strip()]
        except ValueError:
            self.fail(f"'{value}' is not a list of integers such as 112,112,80.", param, ctx)


CUSTOM_TYPES = {"patch_size": _Sizes(), "channels": _Sizes()}
ALIASES = {"n_models": ("--models",)}  # `frugalseg train --semi cotrain --models 3`


def _field_default(fld: dataclasses.Field):
    if fld.default is not dataclasses.MISSING:
        return fld.default
    if fld.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return fld.default_factory()  # type: ignore[misc]
    return None


def merged_config_options(classes: dict[str, type]):
    """Decorator adding one --option per field of several dataclasses (e.g. `train` and `train --semi X`).

    `classes` maps a label (shown in --help) to a config class; the first is the command's own. A field
    of several classes gets one option whose choices are the union of theirs; its help names the
    defaults that differ, and options of some classes only are marked with their labels.
    """
    labels = list(classes)

    def decorate(f):
        merged: dict[str, dict] = {}
        for label, cls in classes.items():
            hints = typing.get_type_hints(cls)
            by_dims = set(cls.protocol(2)) | set(cls.protocol(3)) if hasattr(cls, "protocol") else set()
            for fld in dataclasses.fields(cls):
                if fld.name.startswith("_") or fld.name == "semi":
                    continue
                entry = merged.setdefault(fld.name, {"types": [], "defaults": {}, "cls": cls})
                entry["types"].append(hints[fld.name])
                default = _field_default(fld)
                entry["defaults"][label] = "by dims" if default is None and fld.name in by_dims else default
        for name, entry in reversed(list(merged.items())):
            kinds = [_click_type(t) for t in entry["types"]]
            tp, extra = kinds[0]
            choices = [c for k, _ in kinds if isinstance(k, click.Choice) for c in k.choices]
            if choices:
                tp = click.Choice(list(dict.fromkeys(choices)))
            elif any(k is not tp for k, _ in kinds):
                tp = str if not all(k in (int, float) for k, _ in kinds) else float
            tp = CUSTOM_TYPES.get(name, tp)
            if name in CUSTOM_TYPES:
                extra = {}
            help_text = HELP_BY_CONFIG.get(entry["cls"].__name__, {}).get(name) or HELP.get(name, "")
            owners = list(entry["defaults"])
            if owners != labels:
                help_text = f"[{_owners_label(owners, labels)}] {help_text}"
            if "[default:" not in help_text:
                help_text = f"{help_text} [default: {_defaults_text(entry['defaults'])}]"
            opt = "--" + name.replace("_", "-")
            if tp is bool:
                f = click.option(f"{opt}/--no-{name.replace('_', '-')}", name, default=None, help=help_text)(f)
            else:
                f = click.option(opt, *ALIASES.get(name, ()), name, type=tp, default=None, show_default=False,
                                 help=help_text, **extra)(f)
        return f

    return decorate


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


def config_options(cls):
    """Decorator adding one --option per dataclass field (defaults shown, None = use the field default)."""

    def decorate(f):
        hints = typing.get_type_hints(cls)
        for fld in reversed(dataclasses.fields(cls)):
            if fld.name.startswith("_"):
                continue
            tp, extra = _click_type(hints[fld.name])
            default = fld.default if fld.default is not dataclasses.MISSING else None
            name = "--" + fld.name.replace("_", "-")
            help_text = HELP_BY_CONFIG.get(cls.__name__, {}).get(fld.name) or HELP.get(fld.name, "")
            if tp is bool:
                f = click.option(f"{name}/--no-{fld.name.replace('_', '-')}", fld.name, default=None,
                                 help=f"{help_text} [default: {default}]")(f)
            else:
                f = click.option(name, fld.name, type=tp, default=None, show_default=False,
                                 help=f"{help_text} [default: {default}]", **extra)(f)
        return f

    return decorate


def build_config(cls, options: dict, config_file: str | None):
    from frugalseg.config import load_config

    given = {k: v for k, v in options.items() if v is not None and v != ()}
    for k, v in list(given.items()):
        if isinstance(v, tuple) and k == "labelled_ids":
            given[k] = _expand_ids(v)
    if config_file:
        return load_config(config_file, cls, **given)
    return cls(**given)


def _expand_ids(values) -> list[str]:
    out: list[str] = []
    for v in values:
        if v.startswith("@"):
            out += [line.strip() for line in Path(v[1:]).read_text().splitlines() if line.strip()]
        else:
            out.append(v)
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
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


def _quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (GPU/TPU lines, tips) out of the user's way.

    Lightning sets its loggers to INFO with a handler of its own *when imported*, which happens lazily inside
    the commands, after this group callback. So the levels are set now and again right after that import,
    through a one-shot import hook; and propagation is cut so nothing prints twice.
    """
    import importlib.abc
    import sys

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


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _train_configs() -> dict[str, type]:
    """`train`'s option sources: TrainConfig, then each --semi method's config."""
    from frugalseg.config import TrainConfig
    from frugalseg.semi import methods

    return {"train": TrainConfig, **{f"--semi {name}": cls for name, (cls, _) in methods().items()}}


SEMI_HELP = ("Semi-supervised training on labelled + unlabelled images (2D slices or 3D volumes, e.g. acdc, "
             "la2018): dtc (dual-task consistency), cotrain (deep co-training of --models K networks), meanteacher, "
             "or none (the supervised-only baseline on the same labelled set and batches). The labelled set is "
             "--labelled-patients N, --labelled-fraction F or --labelled-ids; the rest is unlabelled.")


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Re-run from a saved config.yaml; other options override it.")
@click.option("--semi", type=click.Choice(["dtc", "cotrain", "meanteacher", "none"]), default=None, help=SEMI_HELP)
@merged_config_options(_train_configs())
def train(config_file: str | None, semi: str | None, **options) -> None:
    """Train a segmentation model with masks (optionally a label budget), evaluate and report.

    With --semi METHOD, train semi-supervised on labelled + unlabelled images instead; options marked
    [--semi ...] belong to those methods only, options marked [train] to supervised training only.
    Progress, checkpoints every epoch and --resume work the same way in both.
    """
    cls, run_train = _train_target(semi, config_file)
    cfg = build_config(cls, _options_for(cls, options, semi), config_file)
    _print_result(run_train(cfg))


def _train_target(semi: str | None, config_file: str | None):
    """(config class, train function) for `train [--semi X] [--config file]`."""
    from frugalseg.config import TrainConfig
    from frugalseg.errors import ConfigError

    saved = None
    if config_file and Path(config_file).exists():
        import yaml

        saved = (yaml.safe_load(Path(config_file).read_text()) or {}).get("semi") or None
    if semi is not None and saved is not None and semi != saved:
        raise ConfigError(f"{config_file} is a --semi {saved} run; it cannot be re-run with --semi {semi}.")
    semi = semi or saved
    if semi is None:
        from frugalseg.supervised import train as run_train

        return TrainConfig, run_train
    from frugalseg.semi import methods

    return methods()[semi]


def _options_for(cls, options: dict, semi: str | None) -> dict:
    """The options of `cls`; a clear error for a given option that belongs to another mode."""
    from frugalseg.errors import ConfigError

    names = {f.name for f in dataclasses.fields(cls)}
    given = {k for k, v in options.items() if v is not None and v != ()}
    foreign = sorted(given - names)
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
    for name in sorted(given & names):  # merged options offer every mode's choices: check this mode's
        choice, _ = _click_type(hints[name])
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
    if val.get("miou") is not None and not result.get("method"):
        line += f"  val mIoU {val['miou']:.4f}"
    if val.get("case_mean_dice") is not None:
        line += f"  val mean Dice {val['case_mean_dice']:.4f}"
    if result.get("method") and val.get("case_mean_hd95") is not None:
        line += f"  HD95 {val['case_mean_hd95']:.2f} {val.get('surface_units', '')}".rstrip()
    click.echo(line)
    if (Path(result["run"]) / "report.html").exists():
        click.echo(f"report: {Path(result['run']) / 'report.html'}")


@cli.command("eval")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--split", default="val", show_default=True)
@click.option("--data", default=None, help="Evaluate on another dataset than the one trained on (same classes).")
def eval_cmd(run: str, split: str, data: str | None) -> None:
    """Evaluate a trained run on a split: metrics/<split>.json, predictions, report.html."""
    from frugalseg.supervised import evaluate_run

    m = evaluate_run(run, split=split, data=data)
    keys = ("dataset", "samples", "miou", "mean_dice", "mean_dice_foreground", "case_mean_dice", "case_mean_hd95", "surface_units")
    _echo_json({k: m[k] for k in keys if k in m})


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model_path", required=True, type=click.Path(exists=True),
              help="A run directory, its model/ export folder, or a .ckpt file.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for masks (PNG / NIfTI) and overlays.")
@click.option("--overlays/--no-overlays", default=True, show_default=True)
def predict(inputs: tuple[str, ...], model_path: str, out: str, overlays: bool) -> None:
    """Predict masks for image files, folders or volumes."""
    from frugalseg.supervised import predict_files

    p = Path(model_path)
    if p.is_dir() and (p / "model" / "config.json").exists():
        p = p / "model"
    written = predict_files(p, inputs, out, overlays=overlays)
    click.echo(f"wrote {len(written)} masks to {out}")


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Re-run from a saved config.yaml; other options override it.")
@config_options(__import__("frugalseg.weak.classify", fromlist=["ClassifyConfig"]).ClassifyConfig)
def classify(config_file: str | None, **options) -> None:
    """Train a multi-label tag classifier on image tags (masks ignored); per-class AP / F1."""
    from frugalseg.weak.classify import ClassifyConfig, train_classifier

    cfg = build_config(ClassifyConfig, options, config_file)
    result = train_classifier(cfg)
    line = f"run: {result['run']}"
    ev = result.get("eval")
    if ev and ev.get("mAP") is not None:
        line += f"  {ev['dataset']} tag mAP {ev['mAP']:.4f}  mean F1 {ev['mean_f1']:.4f}"
    click.echo(line)


@cli.command()
@config_options(__import__("frugalseg.weak.maps_stage", fromlist=["MapsConfig"]).MapsConfig)
def cams(**options) -> None:
    """Class maps (cam | advcam | prm) for a split: one .npz per image, maps.json, gallery.html."""
    from frugalseg.weak.maps_stage import MapsConfig, default_out, make_maps

    cfg = build_config(MapsConfig, options, None)
    m = make_maps(cfg)
    rate = f", {m['images_per_s_now']:.3f} images/s" if m["images_per_s_now"] else ""
    click.echo(f"{m['method']} maps for {m['images']} images in {default_out(cfg)} ({m['computed_now']} computed now{rate})")
    click.echo(f"gallery: {default_out(cfg) / 'gallery.html'}")


@cli.command("run")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Re-run from a saved config.yaml; other options override it.")
@config_options(__import__("frugalseg.weak.pipeline", fromlist=["PipelineConfig"]).PipelineConfig)
def run_cmd(config_file: str | None, **options) -> None:
    """Tags to a segmentation model: classifier, seeds, CRF, mining rounds with a segmenter; resumable."""
    from frugalseg.weak.pipeline import PipelineConfig, run_pipeline

    cfg = build_config(PipelineConfig, options, config_file)
    summary = run_pipeline(cfg)
    for r in summary["stages"]:
        v = "-" if r["miou"] is None else f"{r['miou']:.4f}"
        click.echo(f"{r['stage']:22s} {r['split']} pseudo-mask mIoU {v}")
    if summary["final_val_miou"] is not None:
        click.echo(f"final segmenter: {summary['val_split']} mIoU {summary['final_val_miou']:.4f}")
    click.echo(f"report: {Path(cfg.out) / 'report.html'}")


@cli.command("eval-seeds")
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
    from frugalseg.weak.maps_stage import eval_seeds, parse_sweep
    from frugalseg.weak.seeds import format_sweep_table

    res = eval_seeds(maps_dir, split=split, data=data, threshold=threshold, threshold_from=threshold_from,
                     sweep=parse_sweep(sweep) if sweep else None)
    f = res["fixed"]
    t = "argmax over tags" if res["fixed_threshold"] is None else f"threshold {res['fixed_threshold']:.2f} ({res['fixed_threshold_source']})"
    click.echo(f"{res['method']} seeds on {res['split']} ({res['images']} images), {t}: mIoU {f['miou']:.4f}")
    if res["sweep"]:
        click.echo(format_sweep_table(res["sweep"]))



@cli.group()
def datasets() -> None:
    """Public datasets: list and download (with checksums)."""


@datasets.command("list")
def datasets_list() -> None:
    from frugalseg.data.download import CATALOGUE

    for name, src in CATALOGUE.items():
        click.echo(f"{name:12s} {src.description}")


@datasets.command("download")
@click.argument("name")
@click.option("--root", type=click.Path(file_okay=False), default=None, help="Data root (default $FRUGALSEG_DATA or ~/.cache/frugalseg/datasets).")
@click.option("--force", is_flag=True, help="Download and extract again even if present.")
def datasets_download(name: str, root: str | None, force: bool) -> None:
    from frugalseg.data.download import download_dataset

    path = download_dataset(name, Path(root) if root else None, force=force)
    click.echo(f"{name}: {path}")


@cli.group()
def data() -> None:
    """Inspect datasets."""


@data.command("validate")
@click.argument("source")
@click.option("--split", default="train", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def data_validate(source: str, split: str, as_json: bool) -> None:
    """Read every image and mask once and list every problem found (exit 1 if any)."""
    from frugalseg.data import open_dataset
    from frugalseg.data.validate import validate_dataset

    report = validate_dataset(open_dataset(source, split))
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


@cli.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--epochs", default=20, show_default=True)
def demo(out: str, epochs: int) -> None:
    """Generate a small shapes dataset and train/evaluate an OCR model on it (no download needed)."""
    from frugalseg.config import TrainConfig
    from frugalseg.data.synthetic import make_shapes_dataset
    from frugalseg.supervised import train as run_train

    data_dir = make_shapes_dataset(Path(out).parent / "demo-data", n_train=96, n_val=16)
    cfg = TrainConfig(data=str(data_dir), out=out, arch="ocr", epochs=epochs, crop_size=128, scale=(0.75, 1.25),
                      batch_size=8, lr=0.01)
    click.echo(f"demo: training OCR on {data_dir} ({epochs} epochs, CPU-sized)")
    _print_result(run_train(cfg))


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except FrugalsegError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: the run can continue with --resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
