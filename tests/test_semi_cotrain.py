"""Deep co-training: generalised JSD, FGSM/VAT, views, labelled-set errors, batches, tiny real runs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import data_path
from frugalseg.data.labels import LabelSpec
from frugalseg.data.samples import Sample, SegDataset
from frugalseg.errors import ConfigError
from frugalseg.semi.adversarial import fgsm, kl_divergence, vat
from frugalseg.semi.batches import SemiBatches, select_labelled, split_batch
from frugalseg.semi.cotrain import (
    EnsembleSegmenter, adversarial_pairs, assign_views, cotrain_ramp, cotraining_loss, generalized_jsd, load_ensemble,
)
from frugalseg.stages.semi import CoTrainConfig, train_cotrain


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- generalised Jensen–Shannon divergence ----------------------------------------------------------
def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p / q).log()).sum()


def test_jsd_two_distributions_matches_kl_closed_form():
    p = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1)
    q = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1)
    m = (p + q) / 2
    expected = 0.5 * _kl(p.flatten(), m.flatten()) + 0.5 * _kl(q.flatten(), m.flatten())
    got = generalized_jsd([p, q])
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    assert got.item() == pytest.approx(0.1017492, abs=1e-6)  # by hand: 0.5·0.0871782 + 0.5·0.1163202
    # disjoint supports: the maximum for two distributions, ln 2 (0·log 0 counts as 0)
    a = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    b = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    assert generalized_jsd([a, b]).item() == pytest.approx(math.log(2), abs=1e-6)


def test_jsd_nonnegative_zero_iff_equal_and_symmetric():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 4, 5, 6, generator=g)  # K=3 models, B=2, 4 classes, 5×6
    probs = logits.softmax(2)
    jsd_map = generalized_jsd(probs, reduction="none")
    assert jsd_map.shape == (2, 5, 6) and bool((jsd_map >= 0).all()) and jsd_map.mean() > 0.01
    same = generalized_jsd([probs[0], probs[0], probs[0]], reduction="none")
    assert same.abs().max().item() < 1e-6
    # one pixel differs: only that pixel is non-zero
    other = probs[0].clone()
    other[0, :, 2, 3] = torch.tensor([0.7, 0.1, 0.1, 0.1])
    jm = generalized_jsd([probs[0], other], reduction="none")
    assert jm[0, 2, 3] > 1e-3 and (jm.flatten().topk(2).values[1] < 1e-6)
    for perm in ([1, 0, 2], [2, 1, 0], [1, 2, 0]):
        assert generalized_jsd(probs[perm]).item() == pytest.approx(generalized_jsd(probs).item(), abs=1e-6)
    # the log-probability path (used in training) gives the same value, 3D maps too
    log_probs = logits.log_softmax(2)
    assert generalized_jsd(log_probs, log_probs=True).item() == pytest.approx(generalized_jsd(probs).item(), abs=1e-5)
    vol = torch.randn(2, 1, 3, 2, 3, 4, generator=g).softmax(2)
    assert generalized_jsd(vol, reduction="none").shape == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="at least two"):
        generalized_jsd(probs[:1])


# ---- adversarial examples ------------------------------------------------------------------------------
def _tiny_net(dims: int, classes: int = 3) -> nn.Module:
    conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
    return nn.Sequential(conv(1, 8, 3, padding=1), bn(8), nn.ReLU(), conv(8, 8, 3, padding=1), nn.ReLU(),
                         conv(8, classes, 1))


def _ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


@pytest.mark.parametrize("dims", [2, 3])
def test_fgsm_raises_ce_more_than_random_sign_noise_and_leaves_model_untouched(dims):
    torch.manual_seed(0)
    model = _tiny_net(dims)
    shape = (4, 1, 12, 12) if dims == 2 else (2, 1, 6, 8, 8)
    x = torch.rand(shape)
    y = torch.randint(0, 3, (shape[0], *shape[2:]))
    y[0, 0] = 255  # void pixels are ignored
    model.train()
    bn = model[1]
    stats = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    eps = 0.05
    x_adv = fgsm(model, x, y, eps)
    assert model.training and bn.training  # mode restored
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.num_batches_tracked, stats[1])
    assert all(p.grad is None for p in model.parameters())
    assert not x_adv.requires_grad and x_adv.shape == x.shape
    assert (x_adv - x).abs().max().item() == pytest.approx(eps, abs=1e-6)
    model.eval()
    clean, adv = _ce(model, x, y.clamp(max=2)), _ce(model, x_adv, y.clamp(max=2))
    rand = [_ce(model, x + eps * torch.randn(shape).sign(), y.clamp(max=2)) for _ in range(5)]
    assert adv > max(rand) and adv - clean > 3 * max(abs(r - clean) for r in rand)
    # clamping keeps the valid range
    assert fgsm(model, x, y, 0.5, clamp=(0.0, 1.0)).min() >= 0.0
    # train-mode attack (batch statistics) also restores everything
    model.train()
    fgsm(model, x, y, eps, eval_mode=False)
    assert torch.equal(bn.num_batches_tracked, stats[1]) and bn.track_running_stats and model.training
    with pytest.raises(ValueError, match="target shape"):
        fgsm(model, x, y[:, :4], eps)


def _kl_to(model, x, x2):
    with torch.no_grad():
        return kl_divergence(model(x), model(x2)).mean().item()


@pytest.mark.parametrize("dims", [2, 3])
def test_vat_raises_kl_more_than_random_direction_of_same_norm(dims):
    torch.manual_seed(1)
    model = _tiny_net(dims).train()
    shape = (3, 1, 12, 12) if dims == 2 else (2, 1, 6, 8, 8)
    x = torch.rand(shape)
    eps = 0.5
    x_adv = vat(model, x, xi=1e-3, eps=eps, power_iterations=1, generator=torch.Generator().manual_seed(0))
    assert model.training and all(p.grad is None for p in model.parameters())
    r = (x_adv - x).flatten(1).norm(dim=1)
    assert torch.allclose(r, torch.full_like(r, eps), atol=1e-4)  # per-sample L2 norm eps
    model.eval()
    adv = _kl_to(model, x, x_adv)
    rand = []
    for _ in range(5):
        d = torch.randn(shape)
        d = d / d.flatten(1).norm(dim=1).view(-1, *([1] * (len(shape) - 1)))
        rand.append(_kl_to(model, x, x + eps * d))
    assert adv > 1.5 * max(rand)  # 1.7–4.4× over seeds and 2D/3D nets
    # more power iterations converge further towards the most sensitive direction
    x4 = vat(model, x, xi=1e-3, eps=eps, power_iterations=4, generator=torch.Generator().manual_seed(0))
    assert _kl_to(model, x, x4) > adv


# ---- views, ramps, ensemble ------------------------------------------------------------------------------
def _ids(patients: int, slices: int = 3) -> list[str]:
    return [f"patient{p:03d}_frame01_slice_{s}" for p in range(1, patients + 1) for s in range(slices)]


def test_views_split_disjoint_complete_deterministic_by_patient_and_image():
    from frugalseg.data.hdf5 import patient_of

    ids = _ids(7)
    views = assign_views(ids, 3, seed=0, group=patient_of)
    assert views == assign_views(ids, 3, seed=0, group=patient_of)  # deterministic
    assert views != assign_views(ids, 3, seed=1, group=patient_of)
    assert sorted(i for v in views for i in v) == sorted(ids)  # complete, and disjoint (no repeats)
    patients = [{patient_of(i) for i in v} for v in views]
    assert sorted(len(p) for p in patients) == [2, 2, 3]  # near-equal parts of 7 patients
    assert all(not (a & b) for k, a in enumerate(patients) for b in patients[k + 1:])
    assert all(list(v) == [i for i in ids if i in set(v)] for v in views)  # dataset order kept
    by_image = assign_views(ids, 2, seed=0)
    assert sorted(len(v) for v in by_image) == [10, 11] and not set(by_image[0]) & set(by_image[1])
    # overlap 1: every model sees everything; overlap 0.5: 2 of 4 patients shared, the rest split
    assert assign_views(ids, 3, overlap=1.0, group=patient_of) == [tuple(ids)] * 3
    half = [{patient_of(i) for i in v} for v in assign_views(_ids(4), 2, overlap=0.5, group=patient_of)]
    assert len(half[0] & half[1]) == 2 and len(half[0] | half[1]) == 4
    boot = assign_views(ids, 2, mode="bootstrap", seed=3, group=patient_of)
    assert boot == assign_views(ids, 2, mode="bootstrap", seed=3, group=patient_of)
    assert all(v and set(v) <= set(ids) for v in boot)
    with pytest.raises(ConfigError, match="need at least 3 labelled patients; there are 2"):
        assign_views(_ids(2), 3, group=patient_of)


def test_pairs_ramp_and_ensemble():
    assert adversarial_pairs(2) == [(0, 1), (1, 0)] == adversarial_pairs(2, "all")
    assert len(adversarial_pairs(3, "all")) == 6 and adversarial_pairs(3, "ring") == [(0, 1), (1, 2), (2, 0)]
    assert cotrain_ramp(0, 100, 1.0) == 0.0 and cotrain_ramp(100, 100, 1.0) == 1.0 == cotrain_ramp(500, 100, 1.0)
    assert cotrain_ramp(50, 100, 0.005) == pytest.approx(0.005 * math.exp(-1.25))
    assert cotrain_ramp(0, 0, 0.5) == 0.5
    torch.manual_seed(0)
    a, b = nn.Conv2d(1, 3, 1), nn.Conv2d(1, 3, 1)
    x = torch.randn(2, 1, 4, 4)
    ens = EnsembleSegmenter([a, b])
    with torch.no_grad():
        assert torch.allclose(ens(x).softmax(1), (a(x).softmax(1) + b(x).softmax(1)) / 2, atol=1e-6)


# ---- labelled-set selection ----------------------------------------------------------------------------
def _fake_ds(patients: int) -> SegDataset:
    samples = [Sample(id=i, image=Path(f"/nowhere/{i}.h5"), mask=Path(f"/nowhere/{i}.h5")) for i in _ids(patients)]
    return SegDataset(name="fake", samples=samples, labels=LabelSpec(names=("background", "fg")))


def test_labelled_selection_and_clear_errors_when_nothing_is_selected():
    ds = _fake_ds(10)
    assert select_labelled(ds, patients=2) == tuple(_ids(2))
    chosen = select_labelled(ds, fraction=0.3, seed=4)
    assert len(chosen) == 9 and chosen == select_labelled(ds, fraction=0.3, seed=4)  # 3 whole patients, seeded
    with pytest.raises(ConfigError, match=r"labelled_fraction=0.04 of the 10 patients of fake selects no patient"):
        select_labelled(ds, fraction=0.04)
    with pytest.raises(ConfigError, match="labelled_ids is empty: it selects no image"):
        CoTrainConfig(data="fake", labelled_patients=None, labelled_ids=[]).validate()
    with pytest.raises(ConfigError, match="names slices not in fake"):
        select_labelled(ds, ids=["patient099_x"])
    with pytest.raises(ConfigError, match="exactly one of"):
        CoTrainConfig(data="fake", labelled_patients=2, labelled_fraction=0.5).validate()
    with pytest.raises(ConfigError, match="n_models must be >= 2"):
        CoTrainConfig(data="fake", n_models=1).validate()


# ---- batches and one co-training step on real ACDC slices ------------------------------------------------
@pytest.fixture(scope="module")
def acdc_slices():
    from frugalseg.data.hdf5 import load_hdf5

    return load_hdf5(data_path("acdc"), "train")


def test_semi_batches_labelled_first_void_unlabelled_deterministic(acdc_slices):
    streams, unlabelled = [[0, 1, 2], [5, 6]], [40, 41, 42, 43]
    kw = dict(labelled_batch_size=2, unlabelled_batch_size=3, steps=4, patch_size=32, seed=7)
    batches = SemiBatches(acdc_slices, streams, unlabelled, **kw)
    b = batches.batch(1)
    assert b["image"].shape == (7, 1, 32, 32) and b["mask"].shape == (7, 32, 32)
    assert b["labelled"].tolist() == [True] * 4 + [False] * 3
    assert b["stream"].tolist() == [0, 0, 1, 1, -1, -1, -1]
    assert set(b["index"][:2].tolist()) <= {0, 1, 2} and set(b["index"][2:4].tolist()) <= {5, 6}
    assert bool((b["mask"][4:] == 255).all()) and bool((b["mask"][:4] < 4).all())
    again = SemiBatches(acdc_slices, streams, unlabelled, **kw).batch(1)
    assert torch.equal(b["image"], again["image"]) and torch.equal(b["index"], again["index"])
    assert len(list(iter(batches))) == 4
    lab, unl = split_batch(b)
    assert lab["image"].shape[0] == 4 and unl["image"].shape[0] == 3
    # every labelled sample of a stream is drawn once per pass (permutation cycles)
    drawn = [i for k in range(3) for i in batches.batch(k)["index"][:2].tolist()]
    assert sorted(drawn) == [0, 0, 1, 1, 2, 2]


def test_cotraining_loss_terms_on_a_real_batch(acdc_slices):
    from frugalseg.models.medical import unet2d

    torch.manual_seed(0)
    batches = SemiBatches(acdc_slices, [[0, 1], [20, 21], [30, 31]], [60, 61], labelled_batch_size=1,
                          unlabelled_batch_size=2, steps=1, patch_size=32)
    lab, unl = split_batch(batches.batch(0))
    models = [unet2d(1, 4, channels=(4, 8)) for _ in range(3)]
    out = cotraining_loss(models, lab["image"], lab["mask"], lab["stream"], unl["image"], w_cot=1.0, w_dif=0.5,
                          adv_source="both", generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(out[k]) for k in ("loss", "sup", "jsd", "dif"))
    assert out["jsd"] > 0 and out["dif"] > 0 and out["sup"] > 0
    out["loss"].backward()
    assert all(p.grad is not None for m in models for p in m.parameters())
    off = cotraining_loss(models, lab["image"], lab["mask"], lab["stream"], unl["image"], w_cot=1.0, w_dif=0.5,
                          adversarial=False)
    assert off["dif"].item() == 0.0


def test_adversarial_forward_leaves_batchnorm_running_statistics_unless_asked():
    """The diversity term's forward passes on adversarial examples use batch statistics but must not move the
    running ones: with them frozen, the running statistics after a step equal those of the same step without
    the adversarial term (the attacks run in eval mode); `adv_bn_update=True` lets them in, as the official code."""
    import copy

    torch.manual_seed(0)
    base = [_tiny_net(2) for _ in range(2)]
    x_lab, y_lab = torch.rand(4, 1, 12, 12), torch.randint(0, 3, (4, 12, 12))
    stream, x_unl = torch.tensor([0, 0, 1, 1]), torch.rand(3, 1, 12, 12)

    def running_after(adversarial: bool, update: bool) -> list[torch.Tensor]:
        models = copy.deepcopy(base)
        out = cotraining_loss(models, x_lab, y_lab, stream, x_unl, w_cot=1.0, w_dif=1.0, adversarial=adversarial,
                              adv_source="both", adv_bn_update=update, loss_kind="ce",
                              generator=torch.Generator().manual_seed(0))
        assert out["dif"].item() > 0 if adversarial else out["dif"].item() == 0
        assert all(m.training for m in models)
        return [m[1].running_var.clone() for m in models]

    without = running_after(False, False)
    frozen = running_after(True, False)
    leaked = running_after(True, True)
    assert all(torch.equal(a, b) for a, b in zip(without, frozen))
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(without, leaked))


@pytest.mark.parametrize("k", [2, 3])
def test_three_iteration_cotraining_runs_finish_with_finite_losses(tmp_path, k):
    data_path("acdc")
    cfg = CoTrainConfig(
        data="acdc", out=str(tmp_path / f"cot{k}"), n_models=k, labelled_patients=3, unlabelled_limit=6,
        patch_size=32, labelled_batch_size=1, unlabelled_batch_size=2, iterations=3, epoch_steps=2,
        ramp_epochs=0, adv_pairs="all" if k == 2 else "ring", val_limit=1, val_every=0, progress=False,
    )
    res = train_cotrain(cfg)
    assert len(res["views"]) == k and all(n > 0 for n in res["views"])
    rows = list(csv.DictReader(open(tmp_path / f"cot{k}" / "logs" / "metrics.csv")))
    losses = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses)  # 3 epochs of 1 iteration
    val = res["val"]
    assert val["kind"] == "volume" and val["samples"] == 1
    assert val["case_mean_dice"] == pytest.approx(sum(val["per_case"][0]["dice"].values()) / 3)
    assert set(val["surface"]) == {"RV", "Myo", "LV"}
    run = Path(res["run"])
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "views.json").exists()
    ens, spec, labels = load_ensemble(run / "models")
    assert len(ens.members) == k and labels.names == ("background", "RV", "Myo", "LV")
    if k == 2:  # a finished run is not retrained: same metrics from the exported ensemble
        again = train_cotrain(cfg)
        assert again["val"]["case_mean_dice"] == pytest.approx(val["case_mean_dice"], abs=1e-9)
