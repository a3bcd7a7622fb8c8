"""Synthetic pairs: cGAN networks and losses, conditioning, the mask shape model, Fréchet distance, the stage
(train, sample, resume, novelty) and training with extra pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from frugalseg.errors import ConfigError, DataError
from frugalseg.models.gan import MultiScaleDiscriminator, PatchDiscriminator, UNetGenerator, receptive_field
from frugalseg.synth.cgan import discriminator_loss, generator_loss, render
from frugalseg.synth.conditioning import boundary_map, condition, instance_map
from frugalseg.synth.frechet import frechet_distance
from frugalseg.synth.masks import ShapeModel, aligned_nearest, nearest_mask_iou

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- networks ---------------------------------------------------------------------------------------
def test_patchgan_sees_70_pixels_and_generator_keeps_size():
    assert receptive_field(3) == 70
    assert receptive_field(1) == 16
    g = UNetGenerator(4, 3, ngf=8, depth=4)
    y = g(torch.randn(2, 4, 32, 48))
    assert y.shape == (2, 3, 32, 48) and y.abs().max() <= 1
    with pytest.raises(ValueError, match="multiple of 16"):
        g(torch.randn(1, 4, 30, 32))


def test_patchgan_logit_grid_and_multiscale_features():
    d = PatchDiscriminator(7, ndf=8, n_layers=3)
    feats = d.features(torch.randn(1, 7, 64, 64))
    assert len(feats) == 5 and feats[-1].shape == (1, 1, 6, 6)
    ms = MultiScaleDiscriminator(7, ndf=8, n_layers=3, num_d=2).features(torch.randn(1, 7, 64, 64))
    assert [f[-1].shape[-1] for f in ms] == [6, 2]


def test_sampling_noise_is_dropout_and_render_pads_any_size():
    torch.manual_seed(0)
    g = UNetGenerator(4, 3, ngf=8, depth=4, dropout=0.5).sample_mode()
    cond = condition(torch.zeros(1, 30, 37, dtype=torch.long), 3)
    a, b = render(g, cond), render(g, cond)
    assert a.shape == (1, 3, 30, 37) and 0 <= a.min() and a.max() <= 1
    assert not torch.allclose(a, b)  # dropout on: another draw
    g.eval()
    assert torch.allclose(render(g, cond), render(g, cond))  # dropout off: deterministic


# ---- conditioning -------------------------------------------------------------------------------------
def test_boundary_map_marks_both_sides_of_instance_edges():
    inst = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3]])
    b = boundary_map(inst)
    assert b.tolist() == [[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_instances_split_touching_components_of_one_class_only_when_apart():
    m = np.array([[1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0]], dtype=np.uint8)
    inst = instance_map(m)
    assert len(np.unique(inst[m == 1])) == 2 and len(np.unique(inst[m == 0])) == 1


def test_condition_one_hot_void_and_unknown_ids():
    m = torch.tensor([[[0, 1], [2, 255]]])
    c = condition(m, 3)
    assert c.shape == (1, 4, 2, 2)
    assert c[0, :3, 1, 1].sum() == 0  # void: no class
    assert c[0, 2, 1, 0] == 1 and c[0, 1, 0, 1] == 1
    with pytest.raises(ValueError, match=r"class ids \[5\] outside 0..2"):
        condition(torch.tensor([[[5]]]), 3)


# ---- losses -------------------------------------------------------------------------------------------
class _ConstD(torch.nn.Module):
    """A 'discriminator' returning the mean of the image channels as its logit, and the image as a feature."""

    def features(self, x):
        img = x[:, -3:]
        return [img, img.mean(1, keepdim=True)]


def test_lsgan_losses_match_hand_computation():
    d = _ConstD()
    cond = torch.zeros(1, 4, 2, 2)
    real, fake = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    # real logits 1 -> (1-1)^2 = 0; fake logits 0 -> 0^2 = 0
    assert discriminator_loss(d, cond, real, fake, "lsgan").item() == pytest.approx(0.0)
    assert discriminator_loss(d, cond, fake, real, "lsgan").item() == pytest.approx(0.5 * (1 + 1))
    t = generator_loss(d, cond, real, fake, "lsgan", l1_weight=100, fm_weight=10)
    # adversarial (0-1)^2 = 1; L1 = 1; feature matching: one intermediate layer, weight 4/1, L1 1
    assert t["adversarial"].item() == pytest.approx(1.0) and t["l1"].item() == pytest.approx(1.0)
    assert t["feature_matching"].item() == pytest.approx(4.0)
    assert t["loss"].item() == pytest.approx(1 + 100 + 40)
    same = generator_loss(d, cond, real, real.clone(), "vanilla", fm_weight=10)
    assert same["l1"].item() == 0 and same["feature_matching"].item() == 0
    with pytest.raises(ValueError, match="unknown GAN loss"):
        discriminator_loss(d, cond, real, fake, "wgan")


# ---- shape model --------------------------------------------------------------------------------------
def _cell(size: int, cy: int, cx: int, r: float, rn: float, rng) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    ang = np.arctan2(yy - cy, xx - cx)
    rad = r * (1 + 0.1 * np.sin(3 * ang + rng.uniform(0, 6)))
    d = np.hypot(yy - cy, xx - cx)
    m = np.zeros((size, size), np.uint8)
    m[d < rad] = 1
    m[d < rn] = 2
    return m


def test_shape_model_draws_new_nested_objects_of_the_training_kind():
    rng = np.random.default_rng(0)
    train = [_cell(64, 32, 32, rng.uniform(12, 18), rng.uniform(5, 8), rng) for _ in range(6)]
    model = ShapeModel.fit(train, 3)
    assert model.window % 2 == 1 and len(model.sd) >= 1
    draws = [model.sample(np.random.default_rng(i)) for i in range(10)]
    for m in draws:
        assert m.shape == (64, 64) and set(np.unique(m)) <= {0, 1, 2}
        nucleus = m == 2
        assert nucleus.any() and ((m > 0) | ~nucleus).all()
        from scipy import ndimage
        assert ndimage.label(m > 0)[1] == 1  # one cell, as in every training mask
        area = (m > 0).sum()
        assert 0.4 * np.pi * 12**2 < area < 1.6 * np.pi * 18**2
    assert aligned_nearest(train[0], train, 3, model.window) == (1.0, 0)
    assert nearest_mask_iou(train[1], train, 3) == 1.0
    novelty = [aligned_nearest(m, train, 3, model.window)[0] for m in draws]
    assert max(novelty) < 1.0 and min(novelty) > 0.3
    again = ShapeModel.from_arrays(model.to_arrays())
    assert np.array_equal(again.sample(np.random.default_rng(3)), model.sample(np.random.default_rng(3)))


def test_shape_model_places_several_objects_without_overlap():
    rng = np.random.default_rng(1)
    two = []
    for _ in range(4):
        a = _cell(96, 25, 25, 10, 4, rng)
        b = _cell(96, 70, 70, 10, 4, rng)
        two.append(np.maximum(a, b))
    model = ShapeModel.fit(two, 3)
    from scipy import ndimage
    for i in range(5):
        m = model.sample(np.random.default_rng(i))
        assert ndimage.label(m > 0, structure=np.ones((3, 3)))[1] == 2


def test_shape_model_refuses_masks_without_objects():
    with pytest.raises(ValueError, match="no object"):
        ShapeModel.fit([np.zeros((8, 8), np.uint8)], 3)
    with pytest.raises(ValueError, match="no masks"):
        ShapeModel.fit([], 3)


# ---- Fréchet distance ---------------------------------------------------------------------------------
def test_frechet_distance_of_gaussians():
    r = np.random.default_rng(0)
    a = r.normal(size=(4000, 3))
    b = r.normal(size=(4000, 3)) + np.array([2.0, 0, 0])
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(4.0, abs=0.25)
    with pytest.raises(ValueError, match="same C"):
        frechet_distance(a, b[:, :2])


# ---- mixed sampler ------------------------------------------------------------------------------------
def test_mixed_shuffle_draws_every_real_pair_once_and_walks_the_extra_set():
    from frugalseg.data.torchdata import MixedShuffle

    s = MixedShuffle(10, 50, 0.5, seed=3)
    seen = []
    for epoch in range(5):
        s.set_epoch(epoch)
        order = list(s)
        assert len(order) == 20 and sorted(i for i in order if i < 10) == list(range(10))
        seen += [i for i in order if i >= 10]
    assert sorted(seen) == list(range(10, 60))  # 5 epochs x 10 draws: the 50 extra pairs once each
    s.set_epoch(2)
    first = list(s)
    s.set_epoch(2)
    assert list(s) == first
    assert len(MixedShuffle(10, 500, 0.2)) == 12  # 10 real + round(10 * 0.2 / 0.8) extra
    with pytest.raises(ValueError):
        MixedShuffle(10, 5, 1.0)


# ---- the stage, end to end on real blood-smear images ---------------------------------------------------
def _tiny(tmp_path, **kw):
    from frugalseg.stages.synth import SynthTrainConfig

    base = dict(data="wbc1", train_split="train:fit", labelled_count=3, budget_seed=1, out=str(tmp_path / "synth"),
                ngf=8, ndf=8, depth=4, crop_size=64, iterations=4, epoch_iterations=2, batch_size=2,
                progress=False, gallery=2, devices="cpu")
    return SynthTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    from frugalseg.stages.synth import train_synth

    from conftest import DATA_ROOT

    tmp = tmp_path_factory.mktemp("synth")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:  # module scope: the autouse data-root fixture has not run yet
        mp.setenv("FRUGALSEG_DATA", str(DATA_ROOT))
        cfg = _tiny(tmp)
        result = train_synth(cfg)
    torch.set_num_threads(threads)
    return cfg, result, tmp


def test_synth_train_uses_only_the_budgets_labelled_images(synth_run):
    from frugalseg.data import apply_budget, open_split
    from frugalseg.stages.train import TrainConfig, budget_of

    cfg, result, _ = synth_run
    run = result["run"]
    ids = json.loads(open(f"{run}/training_masks.json").read())["ids"]
    ds = apply_budget(open_split("wbc1", "train:fit"),
                      budget_of(TrainConfig(data="wbc1", mask_count=3, budget_seed=1)))
    assert sorted(ids) == sorted(s.id for s in ds.by_supervision("mask")) and len(ids) == 3
    holdout = {s.id for s in open_split("wbc1", "train:holdout")}
    assert not set(ids) & holdout
    assert result["iterations"] == 4
    html = open(f"{run}/report.html").read()
    assert "nearest real" in html and html.count("synthetic image</figcaption>") == 2


def test_synth_sample_writes_a_folder_dataset_and_resumes(synth_run, tmp_path):
    from frugalseg.data import open_dataset
    from frugalseg.stages.synth import sample_synth

    _, result, _ = synth_run
    out = tmp_path / "pairs"
    summary = sample_synth(result["run"], 4, out, progress=False)
    ds = open_dataset(out)
    assert len(ds) == 4 and ds.labels.names == ("background", "cytoplasm", "nucleus")
    image, mask = ds.read_pair(ds[0])
    assert image.shape[:2] == mask.shape == (120, 120) and set(np.unique(mask)) <= {0, 1, 2}
    assert summary["novelty"]["nearest_iou_aligned"]["max"] < 1.0
    with pytest.raises(ConfigError, match="already exists"):
        sample_synth(result["run"], 4, out, progress=False)
    # an interrupted sampling: the partial folder holds 2 complete pairs; the rerun adds the rest, same pairs
    out2 = tmp_path / "pairs2"
    sample_synth(result["run"], 4, out2, progress=False)
    partial = tmp_path / "pairs3.partial"
    import shutil
    shutil.copytree(out2, partial)
    for i in (2, 3):
        (partial / "images" / f"synth_{i:05d}.png").unlink()
    settings = json.loads((out2 / "synth.json").read_text())["settings"]
    (partial / "synth.json").write_text(json.dumps({"settings": settings}))
    sample_synth(result["run"], 4, tmp_path / "pairs3", progress=False)
    for i in range(4):
        a = (out2 / "images" / f"synth_{i:05d}.png").read_bytes()
        assert a == (tmp_path / "pairs3" / "images" / f"synth_{i:05d}.png").read_bytes()
    real = sample_synth(result["run"], 3, tmp_path / "rerendered", masks="real", progress=False)
    assert real["novelty"]["nearest_iou_placed"]["mean"] == 1.0


def test_void_far_background_keeps_a_ring_around_objects():
    from frugalseg.synth.masks import void_far_background

    mask = np.zeros((20, 20), np.uint8)
    mask[8:12, 8:12] = 1
    mask[9:11, 9:11] = 2
    mask[0, 19] = 255
    out = void_far_background(mask, 3)
    assert (out[8:12, 8:12] == mask[8:12, 8:12]).all()  # objects untouched
    assert out[8, 5] == 0 and out[8, 4] == 255  # 3 px from the object: kept; 4 px: void
    assert out[0, 0] == 255 and out[0, 19] == 255 and out.dtype == np.uint8
    assert (void_far_background(np.zeros((5, 5), np.uint8), 2) == 0).all()  # no object: unchanged


def test_synth_sample_voids_far_background_with_the_same_images(synth_run, tmp_path):
    from frugalseg.data import open_dataset
    from frugalseg.stages.synth import sample_synth

    _, result, _ = synth_run
    plain = sample_synth(result["run"], 2, tmp_path / "plain", progress=False)
    voided = sample_synth(result["run"], 2, tmp_path / "voided", progress=False, void_background_beyond=4)
    for i in range(2):
        name = f"synth_{i:05d}.png"
        assert (tmp_path / "plain" / "images" / name).read_bytes() == \
            (tmp_path / "voided" / "images" / name).read_bytes()
    ds = open_dataset(tmp_path / "voided")
    m = ds.read_mask(ds[0])
    assert 255 in m and {1, 2} <= set(np.unique(m))
    assert voided["novelty"] == plain["novelty"]  # void is background to the shape comparison
    with pytest.raises(ConfigError, match="void-background-beyond"):
        sample_synth(result["run"], 2, tmp_path / "bad", progress=False, void_background_beyond=-1)


def test_synth_sample_refuses_a_run_without_generator(tmp_path):
    from frugalseg.stages.synth import sample_synth

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no trained generator"):
        sample_synth(tmp_path / "empty", 2, tmp_path / "o", progress=False)


def test_synth_train_refuses_a_crop_the_generator_cannot_take_and_float_images(tmp_path):
    from frugalseg.stages.synth import train_synth

    with pytest.raises(ConfigError, match="multiple of 2\\*\\*depth"):
        train_synth(_tiny(tmp_path, crop_size=60))
    with pytest.raises(DataError, match="8-bit RGB"):
        train_synth(_tiny(tmp_path, data="acdc", train_split="train"))
    with pytest.raises(ConfigError, match="too large for the smallest labelled image \\(120 px"):
        train_synth(_tiny(tmp_path, crop_size=256))  # wbc1 is 120 x 120: reflection padding cannot reach 256
    assert not (tmp_path / "synth").exists()


def test_synth_train_refuses_masks_without_objects(tmp_path):
    from PIL import Image

    from frugalseg.stages.synth import train_synth

    data = tmp_path / "blank"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 90 + i, np.uint8)).save(data / "images" / f"b{i}.png")
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(data / "masks" / f"b{i}.png")
    (data / "classes.txt").write_text("background\ncell\n")
    with pytest.raises(DataError, match="no mask of blank:train holds a foreground class"):
        train_synth(_tiny(tmp_path, data=str(data), train_split="train", labelled_count=None))


def test_train_with_extra_pairs_and_refusal_of_other_classes(synth_run, tmp_path, shapes_dataset):
    from frugalseg.stages.synth import sample_synth
    from frugalseg.stages.train import TrainConfig, train

    _, result, _ = synth_run
    pairs = tmp_path / "pairs"
    sample_synth(result["run"], 6, pairs, progress=False)
    cfg = TrainConfig(data="wbc1", train_split="train:fit", val_split=None, arch="unet2d", mask_count=3, epochs=-1,
                      max_steps=2, batch_size=2, crop_size=64, pretrained=False, extra_data=str(pairs),
                      extra_weight=0.5, out=str(tmp_path / "seg"), progress=False, devices="cpu")
    out = train(cfg)
    assert (tmp_path / "seg" / "model" / "model.safetensors").exists() and out["train_seconds"] > 0
    bad = TrainConfig(**{**cfg.__dict__, "extra_data": str(shapes_dataset), "out": str(tmp_path / "seg2")})
    with pytest.raises(DataError, match="differ from the training data"):
        train(bad)
    assert not (tmp_path / "seg2").exists()


def test_synth_train_resumes_to_a_longer_schedule(tmp_path):
    import json as _json

    from safetensors.torch import load_file

    from frugalseg.stages.synth import train_synth

    first = train_synth(_tiny(tmp_path, gallery=0))
    before = load_file(tmp_path / "synth" / "generator" / "model.safetensors")
    again = train_synth(_tiny(tmp_path, gallery=0))  # finished: not retrained
    assert again["gan_seconds"] == first["gan_seconds"]
    longer = train_synth(_tiny(tmp_path, gallery=0, iterations=6, resume=True))
    assert longer["iterations"] == 6
    after = load_file(tmp_path / "synth" / "generator" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    epochs = {int(r["epoch"]) for r in __import__("csv").DictReader(open(tmp_path / "synth" / "logs" / "metrics.csv"))}
    assert epochs == {0, 1, 2}
    with pytest.raises(ConfigError, match="other settings"):
        train_synth(_tiny(tmp_path, gallery=0, ngf=16))
    assert _json.loads((tmp_path / "synth" / "summary.json").read_text())["iterations"] == 6
