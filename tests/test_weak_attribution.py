"""Tag classifier, CAM, AdvCAM (batched vs the reference-structured loop), peaks, and the cams/eval-seeds CLI."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from frugalseg.cli import cli
from frugalseg.models.peaks import find_peaks, peak_list, peak_stimulation
from frugalseg.models.tag_classifier import TagClassifier
from frugalseg.weak.advcam import (
    AdvCAMConfig,
    DepthwiseInputGrad,
    advcam_maps,
    climb_scale,
    count_passes,
    fold_batchnorm,
    with_depthwise_input_grad,
)
from frugalseg.weak.advcam_reference import advcam_reference
from frugalseg.weak.cam import cam_maps
from frugalseg.weak.maps_io import save_maps


@pytest.fixture(scope="module")
def model() -> TagClassifier:
    """ImageNet backbone, random head: a 'random model' whose maps are not degenerate."""
    torch.manual_seed(0)
    m = TagClassifier(5, pretrained=True).eval()
    torch.nn.init.normal_(m.classifier.weight, std=0.05)
    return m


def _max_diff(a, b) -> float:
    return max(max((x.high_res - y.high_res).abs().max().item(), (x.cam - y.cam).abs().max().item()) for x, y in zip(a, b))


def test_batched_advcam_equals_reference_loop_float32(model):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 48, 64)
    tags = [[1, 3], [0, 2, 4]]
    for cfg in (AdvCAMConfig(steps=3, scales=(1.0, 0.5)), AdvCAMConfig(steps=3, scales=(1.0,), clamp="previous", restriction=2.5)):
        batched = advcam_maps(model, images, tags, cfg)
        loop = [advcam_reference(model, images[b], tags[b], cfg) for b in range(2)]
        assert [m.keys.tolist() for m in batched] == tags
        assert _max_diff(batched, loop) <= 1e-4


def test_batched_advcam_equals_reference_loop_float64_long_climb(model):
    """Longer climbs: in float64 the two stay equal; in float32 rounding differences between any two
    implementations grow with T (the mask threshold and positive-pixel counts are discontinuous)."""
    m = TagClassifier(5, pretrained=True).eval().double()
    m.load_state_dict(model.state_dict())
    m.double()
    torch.manual_seed(2)
    image = torch.rand(1, 3, 48, 64, dtype=torch.float64)
    cfg = AdvCAMConfig(steps=8, scales=(1.0,))
    batched = advcam_maps(m, image, [[0, 3]], cfg)
    loop = [advcam_reference(m, image[0], [0, 3], cfg)]
    assert _max_diff(batched, loop) <= 1e-6


def test_first_step_of_advcam_is_cam(model):
    """T=1 accumulates only the map of the unperturbed image: AdvCAM reduces to (Grad-)CAM, max-normalised."""
    images = torch.rand(1, 3, 48, 64)
    adv = advcam_maps(model, images, [[2]], AdvCAMConfig(steps=1, scales=(1.0,), gradcam_scale=False))
    cam = cam_maps(model, images, [[2]], scales=(1.0,))
    assert torch.allclose(adv[0].high_res, cam[0].high_res, atol=1e-5)


def test_stride16_high_res_maps_are_irn_up_size_then_crop(model):
    """IRN's image-size maps: each scale's map resized to 16*ceil(H/16) x 16*ceil(W/16), cropped to H x W. On a
    side that is a multiple of 16 this is the plain resize; on msrc's 213 rows it is not."""
    from frugalseg.weak.cam import high_res_map

    maps = torch.rand(2, 14, 20)
    up = torch.nn.functional.interpolate(maps[None], size=(224, 320), mode="bilinear", align_corners=False)[0]
    assert torch.equal(high_res_map(maps, (213, 320), "stride16"), up[:, :213, :320])
    assert not torch.allclose(high_res_map(maps, (213, 320), "resize"), up[:, :213])
    assert torch.equal(high_res_map(maps, (224, 320), "stride16"), high_res_map(maps, (224, 320), "resize"))
    with pytest.raises(ValueError, match="stride16"):
        high_res_map(maps, (10, 10), "crop")
    images = torch.rand(1, 3, 40, 72)  # 40 rows: not a multiple of 16
    cam = cam_maps(model, images, [[1]], scales=(1.0, 0.5), high_res="stride16")
    adv = advcam_maps(model, images, [[1]], AdvCAMConfig(steps=1, scales=(1.0,), gradcam_scale=False,
                                                         high_res="stride16"))
    plain = cam_maps(model, images, [[1]], scales=(1.0, 0.5))
    assert cam[0].high_res.shape == plain[0].high_res.shape == (1, 40, 72)
    assert torch.equal(cam[0].cam, plain[0].cam)  # the stride-4 maps are the same either way
    assert (cam[0].high_res - plain[0].high_res).abs().max() > 1e-3
    ref = advcam_reference(model, images[0], [1], AdvCAMConfig(steps=1, scales=(1.0,), gradcam_scale=False,
                                                               high_res="stride16"))
    assert torch.allclose(adv[0].high_res, ref.high_res, atol=1e-5)


def test_climb_stays_in_original_range_and_restriction_holds_the_mask(model):
    torch.manual_seed(3)
    x0 = model.normalise(torch.rand(2, 3, 48, 64))
    targets = torch.tensor([1, 4])
    trace: list[torch.Tensor] = []
    climb_scale(model, x0, targets, 6, AdvCAMConfig(steps=6, step_size=5.0), trace=trace)
    pairs0 = trace[0].unflatten(0, (2, 2))
    lo, hi = pairs0.flatten(1).amin(1), pairs0.flatten(1).amax(1)
    for x in trace[1:]:
        p = x.unflatten(0, (2, 2)).flatten(1)
        assert (p.amin(1) >= lo - 1e-6).all() and (p.amax(1) <= hi + 1e-6).all()
    # with a strong restriction the already-high region changes less than without it
    def masked_change(lam: float) -> float:
        steps: list[torch.Tensor] = []
        climb_scale(model, x0[:1], targets[:1], 6, AdvCAMConfig(restriction=lam, gradcam_scale=False), trace=steps)
        with torch.no_grad():
            first, last = (torch.relu(model.maps_normalised(x)[:, 1]) for x in (steps[0], steps[-1]))
        a0, a1 = first[0] + first[1].flip(-1), last[0] + last[1].flip(-1)
        mask = a0 > 0.5 * a0.max()
        return float(((a1 - a0).abs() * mask).sum())

    assert masked_change(50.0) < 0.75 * masked_change(0.0)


def test_advcam_bad_input(model):
    with pytest.raises(ValueError, match="outside the classifier's 5 classes"):
        advcam_maps(model, torch.rand(1, 3, 32, 32), [[7]], AdvCAMConfig(steps=1, scales=(1.0,)))
    with pytest.raises(ValueError, match="2 images but 1 tag lists"):
        cam_maps(model, torch.rand(2, 3, 32, 32), [[1]])
    empty = advcam_maps(model, torch.rand(1, 3, 32, 32), [[]], AdvCAMConfig(steps=1, scales=(1.0,)))
    assert empty[0].keys.numel() == 0 and empty[0].high_res.shape == (0, 32, 32)
    mixed = cam_maps(model, torch.rand(2, 3, 32, 32), [[], [1]])
    assert mixed[0].high_res.shape == (0, 32, 32) and mixed[1].cam.shape == (1, 8, 8)


@contextlib.contextmanager
def counting_passes(backbone: torch.nn.Module):
    """Counts the backbone's forward passes, and the backward passes that reach its output features."""
    counts = {"forward": 0, "backward": 0}

    def on_forward(module, inputs, output):
        counts["forward"] += 1
        feats = output[-1] if isinstance(output, (list, tuple)) else output
        if feats.requires_grad:
            feats.register_hook(lambda grad: counts.__setitem__("backward", counts["backward"] + 1))

    handle = backbone.register_forward_hook(on_forward)
    try:
        yield counts
    finally:
        handle.remove()


def test_pass_counts_are_the_passes_each_climb_makes(model):
    """`count_passes` against the network passes really made, counted with hooks: per scale, the batched climb
    runs T forwards (all images and classes at once) and T - 1 input-only backwards (the last map needs no
    step); the reference loop runs T forwards and 2 T backwards (Grad-CAM, then the loss) per class."""
    cfg = AdvCAMConfig(steps=3, scales=(1.0, 0.5), fold_bn=False, depthwise_input_grad=False)  # T = 3, then 3 // 2
    tags = [[1, 3], [2]]
    images = torch.rand(2, 3, 32, 32)
    c = count_passes([len(t) for t in tags], cfg)
    with counting_passes(model.backbone) as batched:
        advcam_maps(model, images, tags, cfg)
    assert (batched["forward"], batched["backward"]) == (3 + 1, 2 + 0)  # one batch: every image in every pass
    assert (c["batched_forward_per_image"], c["batched_backward_per_image"]) == (batched["forward"], batched["backward"])
    with counting_passes(model.backbone) as loop:
        for image, t in zip(images, tags):
            advcam_reference(model, image, t, cfg)
    assert (loop["forward"], loop["backward"]) == (3 * 4, 2 * 3 * 4)  # 3 (image, class) pairs x 4 steps
    assert c["reference_forward_per_image"] == loop["forward"] / len(images)
    assert c["reference_backward_per_image"] == loop["backward"] / len(images)
    assert not model.backbone._forward_hooks  # the counter leaves no hook behind
    # the floor (one forward and one backward per step and scale, the last step forward only) is the batched count
    assert (c["floor_forward_per_image"], c["floor_backward_per_image"]) == (4, 2)


def test_peak_finder_on_hand_made_maps():
    m = torch.zeros(1, 2, 5, 5)
    m[0, 0, 1, 1], m[0, 0, 3, 3], m[0, 0, 3, 4] = 5.0, 3.0, 1.0
    m[0, 1] = 1.0  # a plateau: every position ties with its neighbours and with the median
    every = find_peaks(m, ties="all")
    assert every[0, 0, 1, 1] and every[0, 0, 3, 3] and not every[0, 0, 3, 4]
    assert every[0, 1].all()
    # zeros that tie their whole neighbourhood are peaks too (>= the median 0): the score is the mean over all
    assert torch.isclose(peak_stimulation(m, ties="all")[0, 0], m[0, 0][every[0, 0]].mean())
    # the reference's max-pool indices: a plateau gives one peak per window, its first position in scan order
    first = find_peaks(m)
    assert first[0, 0, 1, 1] and first[0, 0, 3, 3] and not first[0, 0, 3, 4]
    assert first[0, 1].sum() == 1 and first[0, 1, 0, 0]
    assert (first <= every).all()
    assert [p[:3] for p in peak_list(m[0], classes=[0], min_value=0.5)] == [(0, 1, 1), (0, 3, 3)]
    with pytest.raises(ValueError, match="odd"):
        find_peaks(m, window=2)


def test_peak_stimulation_gradient_as_the_reference():
    m = torch.zeros(1, 1, 5, 5)
    m[0, 0, 1, 1], m[0, 0, 3, 3] = 5.0, 3.0
    m[0, 0, 0, 4] = m[0, 0, 4, 0] = -1.0
    peaks = find_peaks(m)[0, 0]
    n = int(peaks.sum())
    x = m.clone().requires_grad_(True)
    score = peak_stimulation(x)
    assert torch.isclose(score[0, 0], m[0, 0][peaks].mean())  # forward: the mean over the peaks
    score.sum().backward()
    torch.testing.assert_close(x.grad[0, 0], peaks.float())  # backward: 1 at every peak, no 1/N
    y = m.clone().requires_grad_(True)
    peak_stimulation(y, official_backward=False).sum().backward()
    torch.testing.assert_close(y.grad[0, 0], peaks.float() / n)  # the exact gradient of the mean


def test_classifier_freezes_early_stages_and_bn(model):
    frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2")) for n in frozen)
    model.train()
    assert not model.backbone.bn1.training
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(model(x), model.class_maps(x).mean((2, 3)), atol=1e-6)


def test_classify_cams_eval_seeds_cli(shapes_dataset, tmp_path):
    run = tmp_path / "cls"
    r = CliRunner().invoke(cli, ["classify", "--data", str(shapes_dataset), "--out", str(run), "--epochs", "1",
                                 "--batch-size", "4", "--crop-size", "64", "--base-size", "64", "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    ev = json.loads((run / "metrics" / "classify_val.json").read_text())
    assert ev["split"] == "val" and set(ev["per_class"]) and all("ap" in v for v in ev["per_class"].values())
    maps_dir = tmp_path / "adv"
    r = CliRunner().invoke(cli, ["cams", "--classifier", str(run), "--method", "advcam", "--split", "val", "--out", str(maps_dir),
                                 "--steps", "2", "--scales", "1.0", "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    files = sorted(maps_dir.glob("maps/*.npz"))
    assert len(files) == 4 and (maps_dir / "gallery.html").exists()
    r = CliRunner().invoke(cli, ["eval-seeds", str(maps_dir), "--sweep", "0.1:0.3:0.1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    seeds = json.loads((maps_dir / "seeds_val.json").read_text())
    assert seeds["sweep"]["kind"] == "sweep" and seeds["fixed_threshold"] == 0.15 and seeds["images"] == 4
    assert 0.0 <= seeds["fixed"]["miou"] <= 1.0
    # a rerun skips finished images; a map file of the wrong shape gives a clear error
    save_maps(files[0], np.array([1]), np.zeros((1, 4, 4)), np.zeros((1, 10, 10)))
    r = CliRunner().invoke(cli, ["eval-seeds", str(maps_dir)])
    assert r.exit_code != 0 and "the image is 64" in str(r.exception)


def test_classify_without_tags_is_a_clear_error(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "classes.txt").write_text("background\ncat\n")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("a\n")
    r = CliRunner().invoke(cli, ["classify", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--eval-split", "",
                                 "--no-progress"])
    assert r.exit_code != 0
    assert "no image has tags or a mask" in str(r.exception)


def test_fold_batchnorm_is_exact_and_removes_bn(model):
    fused = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.backbone.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())  # the original is untouched
    x = torch.rand(2, 3, 48, 64)
    ref = model.class_maps(x)
    assert (fused.class_maps(x) - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6


@pytest.mark.parametrize("kernel,dilation,padding", [(3, 2, 2), (5, 2, 4), (5, 3, 1), ((3, 5), (2, 1), (2, 2))])
def test_depthwise_input_grad_equals_autograd(kernel, dilation, padding):
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(6, 6, kernel, padding=padding, dilation=dilation, groups=6).requires_grad_(False)
    wrapped = DepthwiseInputGrad(conv)
    x = torch.randn(2, 6, 11, 13, requires_grad=True)
    y_ref, y = conv(x), wrapped(x)
    assert torch.equal(y_ref, y)
    g = torch.randn_like(y)
    (ref,) = torch.autograd.grad(y_ref, x, g)
    (got,) = torch.autograd.grad(y, x, g)
    assert got.shape == x.shape
    assert (got - ref).abs().max() <= 1e-5
    conv.requires_grad_(True)  # a trainable kernel keeps autograd's own backward, weight gradient included
    (gw,) = torch.autograd.grad(wrapped(x).sum(), conv.weight)
    assert gw.shape == conv.weight.shape


def test_depthwise_input_grad_wraps_only_dilated_stride1_depthwise(model):
    assert not DepthwiseInputGrad.applies_to(torch.nn.Conv2d(4, 4, 3, stride=2, padding=2, dilation=2, groups=4))
    assert not DepthwiseInputGrad.applies_to(torch.nn.Conv2d(4, 4, 3, padding=1, groups=4))  # not dilated
    assert not DepthwiseInputGrad.applies_to(torch.nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=4))  # multiplier 2
    assert not DepthwiseInputGrad.applies_to(torch.nn.Conv2d(4, 4, 3, padding=5, dilation=2, groups=4))  # pad > d(k-1)
    wrapped = with_depthwise_input_grad(model)
    n = sum(isinstance(m, DepthwiseInputGrad) for m in wrapped.modules())
    assert n >= 4  # output stride 16: the last lite0 stages are dilated depthwise convolutions
    assert not any(isinstance(m, DepthwiseInputGrad) for m in model.modules())  # the original is untouched
    x = torch.rand(1, 3, 48, 64)
    assert torch.equal(wrapped.class_maps(x), model.class_maps(x))
