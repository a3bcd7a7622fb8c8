"""Deep co-training for semi-supervised segmentation (Peng, Estrada, Pedersoli, Desrosiers; Pattern
Recognition 2020), generalised to K ≥ 2 models.

An ensemble of K networks, trained jointly with one optimiser on

    L = Σ_k L_sup(f_k on its view)  +  λ_cot(t) · JSD(f_1..f_K on unlabelled)  +  λ_dif(t) · L_dif

- **Views.** Model k is supervised only on its own subset ("view") of the labelled images
  (`assign_views`). Default: a seeded *disjoint* split by patient that covers the labelled set
  (`overlap=0`: the "exclusive labelled sets" of the official code's first version and the paper's
  "different subset of labelled images"); `overlap=f` shares a fraction f of the units with every model
  and splits the rest (the later official ACDC config used `partition_overlap: 1`, i.e. every model sees
  every labelled image); `mode="bootstrap"` draws, per model, as many units as there are, with
  replacement (the view is the set drawn). Units are patients by default (slices of one patient are
  near-duplicates, so splitting slices would not give different views).
- **Agreement.** The generalised Jensen–Shannon divergence of the K softmax maps on the same unlabelled
  batch: H(mean_k p_k) − mean_k H(p_k) per pixel, averaged over pixels (`generalized_jsd`, the
  official JSD_2D). It is ≥ 0, zero iff all K distributions agree, and symmetric in the models.
- **Diversity** (the view-difference loss of Deep Co-Training). Per attacked model i and step, a coin
  (p = 0.5, as the official code) picks either an FGSM example of a labelled image of model i's view
  (CE against the ground truth, eps = 0.05 per pixel) or a VAT example of the unlabelled batch
  (one power iteration, L2 norm eps = 0.05 per sample); each other model j must then match model i's
  clean prediction on it: KL(p_i(x) ‖ p_j(x_adv_i)), with p_i(x) detached (the target; the official
  code lets gradient reach model i through the target too). `pairs="all"`: model i's adversarials go
  to every j ≠ i; `pairs="ring"`: only to j = i + 1 mod K. For K = 2 both equal the official code,
  which only supports 2 models. The term is the mean over pairs. `adversarial=False` drops it.
  Model j's forward pass on the adversarial examples normalises with their batch statistics but leaves its
  BatchNorm running statistics alone (`adv_bn_update=False`; the official code lets them in): FGSM at
  eps = 0.05 per pixel is high-frequency noise of L2 norm ~14 on a 160² crop, not data, and the running
  statistics are what every eval-mode prediction normalises with. (A principle, not a measured gain: the
  first msrc-objects co-training run, with them let in, collapsed to background, but so does supervised-only
  training at the same 2 labelled images a step; README, semi-supervision findings.)
- **Ramps.** λ(t) = λ_max · exp(−5 (1 − t/T)²), 0 at t = 0 and λ_max for t ≥ T (the official
  RampScheduler, the same Gaussian ramp as Qiao et al. and Laine & Aila), t in "epochs" of
  `rampup_every` iterations. Defaults λ_cot = 1, λ_dif = 0.005, T = 100: the official ACDC config
  (the paper's own table of values was not available; Qiao et al.'s classification values are
  λ_cot = 10, λ_dif = 0.5, T = 80, the official trainer's constructor defaults).
- **Prediction.** The ensemble's mean softmax (`EnsembleSegmenter`).
- **Data.** The batches, schedule, resume and evaluation every semi-supervised method shares
  (`frugalseg.semi.batches`, `frugalseg.stages.semi`, `frugalseg.evaluation`), with one labelled stream
  per model (its view). The step module is `CoTrainStep`; its configuration `CoTrainConfig` (defaults:
  the official ACDC config) is in `frugalseg.stages.semi`.

Deliberate differences from the official code (jizongFox/Deep-Co-Training-for-Semi-Supervised-Image-
Segmentation): one summed loss and one optimiser step per batch (`cotraining.py` does three separate
zero_grad/step calls, `cotraining_totalloss.py` sums, as here); VAT's probe xi = 1e-3 instead of 1e-6
(1e-6 drowns in float32 rounding, see `semi.adversarial`); the VAT KL uses every class (the official
generator sums over the foreground classes only); K ≥ 2. One official `Segmentator.predict` revision
returns `softmax(img)` instead of the softmax of the prediction when `logit=False`, which makes its JSD
and adversarial losses constant; nothing of that survives here.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from frugalseg.data.io import read_json, write_text
from frugalseg.data.labels import IGNORE_INDEX, LabelSpec
from frugalseg.errors import ConfigError, DataError
from frugalseg.export import load_export, save_export
from frugalseg.losses import LossKind
from frugalseg.models import first_output
from frugalseg.semi.adversarial import batchnorm_statistics_frozen, fgsm, kl_divergence, vat
from frugalseg.semi.batches import split_batch
from frugalseg.semi.step import SemiStep, segment, supervised_with_aux

__all__ = [
    "CoTrainStep", "EnsembleSegmenter", "adversarial_pairs", "assign_views", "cotrain_ramp", "cotraining_loss",
    "generalized_jsd", "load_ensemble", "save_ensemble",
]


# ---- the pieces ----------------------------------------------------------------------------------
def _entropy(p: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return -(p * log_p).sum(1)


def generalized_jsd(dists: Sequence[torch.Tensor] | torch.Tensor, *, log_probs: bool = False,
                    reduction: str = "mean") -> torch.Tensor:
    """Generalised Jensen–Shannon divergence H(mean_k p_k) − mean_k H(p_k) of K class distributions.

    `dists`: K tensors (B, C, *spatial) (or one (K, B, C, *spatial) tensor) of probabilities, or of
    log-probabilities with `log_probs=True` (the exact, epsilon-free path training uses: log of the mean
    is a logsumexp). With probabilities, 0·log 0 is taken as 0 (log of the smallest positive float).
    `reduction`: "mean" over pixels and batch, or "none" for the (B, *spatial) map. Natural log (nats).
    """
    stack = torch.stack(list(dists)) if not torch.is_tensor(dists) else dists
    if stack.shape[0] < 2:
        raise ValueError(f"generalized_jsd needs at least two distributions, got {stack.shape[0]}.")
    stack = stack.float()
    k = stack.shape[0]
    if log_probs:
        log_p = stack
        p = log_p.exp()
        log_mean = torch.logsumexp(log_p, dim=0) - math.log(k)
    else:
        p = stack
        tiny = torch.finfo(p.dtype).tiny
        log_p = p.clamp_min(tiny).log()
        log_mean = p.mean(0).clamp_min(tiny).log()
    mean = p.mean(0)
    jsd = _entropy(mean, log_mean) - torch.stack([_entropy(p[i], log_p[i]) for i in range(k)]).mean(0)
    if reduction == "none":
        return jsd
    if reduction == "mean":
        return jsd.mean()
    raise ValueError(f"unknown reduction '{reduction}' (mean, none)")


def assign_views(
    ids: Sequence[str],
    n_models: int,
    *,
    mode: str = "split",
    overlap: float = 0.0,
    seed: int = 0,
    group: Callable[[str], str] | None = None,
) -> list[tuple[str, ...]]:
    """Each model's labelled ids (in the order of `ids`), deterministic in (ids, n_models, mode, overlap, seed).

    Units are `group(id)` (e.g. the patient) or the ids themselves. `mode="split"`: a seeded
    permutation of the units; the first round(overlap × n) go to every model, the rest are cut into
    n_models near-equal disjoint parts. So overlap=0 gives disjoint views whose union is the labelled
    set, overlap=1 gives every model every unit. `mode="bootstrap"`: each model draws n units with
    replacement (its view is the set of distinct units drawn, about 63% of them). Every view must be
    non-empty.
    """
    if n_models < 1:
        raise ConfigError(f"n_models must be >= 1, got {n_models}.")
    if not 0.0 <= overlap <= 1.0:
        raise ConfigError(f"view overlap must be in [0, 1], got {overlap}.")
    unit_of = group or (lambda i: i)
    units: list[str] = []
    for i in ids:
        u = unit_of(i)
        if u not in units:
            units.append(u)
    if not units:
        raise ConfigError("No labelled image to split between the co-trained models.")
    rng = np.random.default_rng(seed)
    n = len(units)
    if mode == "split":
        order = rng.permutation(n)
        n_shared = int(round(overlap * n))
        shared = set(order[:n_shared].tolist())
        parts = np.array_split(order[n_shared:], n_models)
        chosen = [shared | set(part.tolist()) for part in parts]
    elif mode == "bootstrap":
        chosen = [set(rng.integers(0, n, size=n).tolist()) for _ in range(n_models)]
    else:
        raise ConfigError(f"unknown view mode '{mode}' (split, bootstrap)")
    empty = [k for k, c in enumerate(chosen) if not c]
    if empty:
        what = "patients" if group is not None else "images"
        raise ConfigError(
            f"{n_models} models with disjoint views need at least {n_models} labelled {what}; there are {n}, "
            f"so model {empty[0]} would get none. Label more, lower n_models, or raise view_overlap."
        )
    views = []
    for c in chosen:
        names = {units[u] for u in c}
        views.append(tuple(i for i in ids if unit_of(i) in names))
    return views


def adversarial_pairs(n_models: int, pairs: str = "all") -> list[tuple[int, int]]:
    """(attacked model i, model j that must resist i's adversarials) for every used pair."""
    if n_models < 2:
        return []
    if pairs == "all":
        return [(i, j) for i in range(n_models) for j in range(n_models) if i != j]
    if pairs == "ring":
        return [(i, (i + 1) % n_models) for i in range(n_models)]
    raise ConfigError(f"unknown adversarial pairs '{pairs}' (all, ring)")


def cotrain_ramp(t: float, length: float, max_value: float, mult: float = -5.0) -> float:
    """The official RampScheduler: 0 at t = 0, max·exp(mult·(1 − t/T)²) below T, max from T on; T = 0: max."""
    if length <= 0:
        return float(max_value)
    if t <= 0:
        return 0.0
    if t >= length:
        return float(max_value)
    return float(max_value * math.exp(mult * (1.0 - t / length) ** 2))


class EnsembleSegmenter(nn.Module):
    """Mean softmax of K segmentation networks, returned as log-probabilities.

    softmax(log(mean p)) = mean p, so everything that softmaxes a model's output (inference, evaluation)
    reads the ensemble's mean softmax unchanged.
    """

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([first_output(m(x)).float().softmax(1) for m in self.members]).mean(0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def cotraining_loss(
    models: Sequence[nn.Module],
    x_lab: torch.Tensor,
    y_lab: torch.Tensor,
    stream: torch.Tensor,
    x_unl: torch.Tensor,
    *,
    w_cot: float,
    w_dif: float,
    adversarial: bool = True,
    pairs: str = "all",
    adv_source: str = "coin",
    fgsm_eps: float = 0.05,
    vat_xi: float = 1e-3,
    vat_eps: float = 0.05,
    vat_power_iterations: int = 1,
    clamp: Sequence[float] | None = (0.0, 1.0),
    attack_eval_mode: bool = True,
    adv_bn_update: bool = False,
    loss_kind: LossKind = "dice_ce",
    ignore_index: int = IGNORE_INDEX,
    generator: torch.Generator | None = None,
    aux_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The co-training loss of one batch and its terms (loss, sup, jsd, dif).

    `stream[b]` is the model whose view labelled sample b belongs to; `x_unl` the unlabelled batch.
    The diversity term is computed only when `adversarial` and `w_dif > 0` (it costs one attack per
    model and one forward/backward per pair). Model j's forward pass on model i's adversarial examples
    normalises with its batch statistics but, unless `adv_bn_update`, leaves BatchNorm's running statistics
    as they are (see the module docstring). `aux_weight` > 0 adds each model's auxiliary-head loss (ocr / fcn).
    """
    k = len(models)
    sup_terms, lab_logits = [], []
    for m, model in enumerate(models):
        sel = stream == m
        if not bool(sel.any()):
            raise ValueError(f"cotraining_loss: the labelled batch has no sample of model {m}'s view.")
        logits, aux = segment(model, x_lab[sel], aux_weight > 0)
        lab_logits.append(logits)
        sup_terms.append(supervised_with_aux(logits, aux, y_lab[sel], loss_kind, aux_weight, ignore_index))
    sup = torch.stack(sup_terms).sum()
    unl_logits = [first_output(model(x_unl)) for model in models]
    jsd = generalized_jsd([F.log_softmax(z.float(), 1) for z in unl_logits], log_probs=True)
    dif = sup.new_zeros(())
    if adversarial and w_dif > 0 and k >= 2:
        terms = []
        by_attacker: dict[int, list[int]] = {}
        for i, j in adversarial_pairs(k, pairs):
            by_attacker.setdefault(i, []).append(j)
        for i, targets in by_attacker.items():
            if adv_source == "both":
                sources = ["fgsm", "vat"]
            elif adv_source == "coin":
                sources = ["fgsm" if float(torch.rand((), generator=generator)) < 0.5 else "vat"]
            else:
                raise ConfigError(f"unknown adversarial source '{adv_source}' (coin, both)")
            for source in sources:
                if source == "fgsm":
                    sel = stream == i
                    clean, x_adv = lab_logits[i].detach(), fgsm(
                        models[i], x_lab[sel], y_lab[sel], fgsm_eps, ignore_index, clamp=clamp,
                        eval_mode=attack_eval_mode)
                else:
                    clean, x_adv = unl_logits[i].detach(), vat(
                        models[i], x_unl, vat_xi, vat_eps, vat_power_iterations, clamp=clamp,
                        eval_mode=attack_eval_mode, generator=generator)
                for j in targets:
                    with (contextlib.nullcontext() if adv_bn_update else batchnorm_statistics_frozen(models[j])):
                        terms.append(kl_divergence(clean, first_output(models[j](x_adv))).mean())
        dif = torch.stack(terms).mean()
    loss = sup + w_cot * jsd + w_dif * dif
    return {"loss": loss, "sup": sup.detach(), "jsd": jsd.detach(), "dif": dif.detach()}


# ---- the step module -----------------------------------------------------------------------------------
class CoTrainStep(SemiStep):
    """K models (`models`), one optimiser; the batches hold one labelled stream per model (its view) and
    an unlabelled block. Predicts, validates and exports the ensemble (`models/`: members + ensemble.json).

    Ramps (`cotrain_ramp`) run in units of `rampup_every` iterations; `seed` seeds each step's coin and
    VAT directions (seed · 1000003 + step: the same on resume)."""

    kind: ClassVar[str] = "cotrain"

    def __init__(self, models: Sequence[nn.Module], *, lambda_cot: float = 1.0, lambda_dif: float = 0.005,
                 ramp_epochs: float = 100.0, ramp_mult: float = -5.0, rampup_every: int = 150,
                 adversarial: bool = True, pairs: str = "all", adv_source: str = "coin", fgsm_eps: float = 0.05,
                 vat_xi: float = 1e-3, vat_eps: float = 0.05, vat_power_iterations: int = 1,
                 clamp: Sequence[float] | None = (0.0, 1.0), attack_eval_mode: bool = True,
                 adv_bn_update: bool = False, loss: LossKind = "dice_ce",
                 seed: int = 0, ignore_index: int = IGNORE_INDEX, aux_weight: float = 0.0):
        if len(models) < 2:
            raise ConfigError("co-training needs at least two models.")
        super().__init__()
        self.models = nn.ModuleList(models)
        self.lambda_cot, self.lambda_dif, self.ramp_epochs, self.ramp_mult = lambda_cot, lambda_dif, ramp_epochs, ramp_mult
        self.rampup_every = rampup_every
        self.attack = dict(adversarial=adversarial, pairs=pairs, adv_source=adv_source, fgsm_eps=fgsm_eps,
                           vat_xi=vat_xi, vat_eps=vat_eps, vat_power_iterations=vat_power_iterations, clamp=clamp,
                           attack_eval_mode=attack_eval_mode, adv_bn_update=adv_bn_update)
        self.loss, self.seed, self.ignore_index, self.aux_weight = loss, seed, ignore_index, aux_weight

    @property
    def predictor(self) -> nn.Module:
        return EnsembleSegmenter(list(self.models))

    def weights(self, step: int) -> tuple[float, float]:
        """(λ_cot, λ_dif) at iteration `step`."""
        t = step // max(1, self.rampup_every)
        return (cotrain_ramp(t, self.ramp_epochs, self.lambda_cot, self.ramp_mult),
                cotrain_ramp(t, self.ramp_epochs, self.lambda_dif, self.ramp_mult))

    def terms(self, batch: dict, step: int) -> dict[str, torch.Tensor | float]:
        lab, unl = split_batch(batch)
        w_cot, w_dif = self.weights(step)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        out = cotraining_loss(list(self.models), lab["image"], lab["mask"], lab["stream"], unl["image"],
                              w_cot=w_cot, w_dif=w_dif, **self.attack, loss_kind=self.loss,
                              ignore_index=self.ignore_index, generator=gen, aux_weight=self.aux_weight)
        return {**out, "w_cot": w_cot, "w_dif": w_dif}

    def export(self, folder: Path, spec: dict, labels: LabelSpec) -> None:
        save_ensemble(list(self.models), spec, labels, Path(folder) / "models")

    @staticmethod
    def load_predictor(folder: Path) -> nn.Module:
        return load_ensemble(Path(folder) / "models")[0]

    def checkpoint_extra(self) -> dict:
        return {"n_models": len(self.models)}


# ---- export ----------------------------------------------------------------------------------------------
ENSEMBLE_FILE = "ensemble.json"


def save_ensemble(models: Sequence[nn.Module], spec: dict, labels: LabelSpec, out_dir: Path) -> Path:
    """Each member as a standard export (members/<k>/) plus ensemble.json (combine = mean softmax)."""
    out_dir = Path(out_dir)
    for k, m in enumerate(models):
        save_export(m, spec, labels, out_dir / "members" / str(k))
    write_text(out_dir / ENSEMBLE_FILE, json.dumps(
        {"format_version": 1, "combine": "mean_softmax", "members": [f"members/{k}" for k in range(len(models))],
         "model": spec, "labels": labels.to_dict()}, indent=2))
    return out_dir


def load_ensemble(path: str | Path) -> tuple[EnsembleSegmenter, dict, LabelSpec]:
    """The ensemble written by co-training (a folder holding ensemble.json), eval mode, CPU."""
    path = Path(path)
    if not (path / ENSEMBLE_FILE).exists():
        raise DataError(f"{path}: no {ENSEMBLE_FILE}; expected the models/ folder of a co-training run.")
    meta = read_json(path / ENSEMBLE_FILE)
    members = [load_export(path / rel)[0] for rel in meta["members"]]
    return EnsembleSegmenter(members).eval(), meta["model"], LabelSpec.from_dict(meta["labels"])
