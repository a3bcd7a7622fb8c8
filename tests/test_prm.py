"""Peak Response Maps: the backward rule and its release, batched = per-peak PRMs, proposals, the retrieval
score on a hand-computed case, NMS merging, and the instance metrics on hand-made masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input

from frugalseg.errors import ConfigError, DataError
from frugalseg.weak.prm import (
    Instance,
    Peak,
    background_masks,
    instance_ap,
    instance_nms,
    peak_backprop,
    peak_precision,
    peak_response_maps,
    peak_response_maps_loop,
    prm_class_maps,
    prm_instances,
    proposal_contours,
    retrieval_scores,
    retrieve_instances,
    superpixel_proposals,
)


def _same_conv(*args, **kwargs) -> nn.Conv2d:
    from timm.layers import Conv2dSame

    return Conv2dSame(*args, **kwargs)


class TinyMapper(nn.Module):
    """Conv/BN/ReLU stack producing (B, K, h, w) class maps; has every conv geometry the rule must respect."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            _same_conv(8, 8, 3, stride=2, groups=8),  # depthwise, asymmetric "same" padding
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2),
            nn.ReLU(),
            nn.Conv2d(8, num_classes, 1, bias=True),
        )
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics and affine
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.1, 0.1)

    def class_maps(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    forward = class_maps


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return TinyMapper().eval()


def _image(h: int = 24, w: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g)


# ---------------------------------------------------------------------------------------- backward rule


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2),
        lambda: nn.Conv2d(4, 4, 3, stride=1, padding=2, dilation=2, groups=4),
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"),
        lambda: _same_conv(4, 6, 3, stride=2),
    ],
)
def test_rule_matches_the_excitation_backprop_formula(conv):
    torch.manual_seed(1)
    conv = conv()
    x = torch.randn(2, 4, 9, 10, requires_grad=True)
    with torch.no_grad():
        plain = conv(x)
    with peak_backprop(conv):
        out = conv(x)
    assert torch.equal(out, plain)  # forward unchanged
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, g)
    assert conv.weight.grad is None  # no parameter gradient through the rule

    # reference: (x - offset) * conv^T(g / conv(x - offset, W+), W+), on the padded input, per batch item
    xs = x.detach() - x.detach().amin(dim=(1, 2, 3), keepdim=True)
    if isinstance(conv, nn.Conv2d) and type(conv).__name__ == "Conv2dSame":
        ph, pw = max((5 - 1) * 2 + 3 - 9, 0), max((5 - 1) * 2 + 3 - 10, 0)
        pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        xp = F.pad(xs, pads)
    elif conv.padding_mode == "reflect":
        pads = (1, 1, 1, 1)
        xp = F.pad(xs, pads, mode="reflect")
    else:
        pads, xp = None, xs
    padding = conv.padding if pads is None else 0
    wp = conv.weight.detach().clamp(min=0)
    norm = F.conv2d(xp, wp, None, conv.stride, padding, conv.dilation, conv.groups)
    ratio = torch.where(norm < 1e-10, torch.zeros_like(g), g / (norm + 1e-10))
    back = conv2d_input(xp.shape, wp, ratio, conv.stride, padding, conv.dilation, conv.groups)
    if conv.padding_mode == "reflect":  # gradient of reflect padding, by autograd on the padding alone
        xr = xs.clone().requires_grad_(True)
        (back,) = torch.autograd.grad(F.pad(xr, pads, mode="reflect"), xr, back)
    elif pads is not None:
        back = back[..., pads[2] : xp.shape[2] - pads[3], pads[0] : xp.shape[3] - pads[1]]
    torch.testing.assert_close(got, xs * back, rtol=1e-5, atol=1e-6)


def test_context_restores_forward_and_gradients(tiny):
    x = _image()[None].requires_grad_(True)
    convs = [m for m in tiny.modules() if isinstance(m, nn.Conv2d)]
    marker = convs[0].forward = lambda t, _c=convs[0]: nn.Conv2d.forward(_c, t)  # a pre-existing instance patch

    def run():
        tiny.zero_grad()
        x.grad = None
        out = tiny(x)
        out[0, 1].sum().backward()
        return out.detach(), x.grad.clone(), [p.grad.clone() for p in tiny.parameters()]

    before = run()
    with peak_backprop(tiny):
        out = tiny(x)
        assert torch.equal(out.detach(), before[0])
        (inside,) = torch.autograd.grad(out[0, 1].sum(), x)
        assert not torch.allclose(inside, before[1])  # the rule is active
    with pytest.raises(RuntimeError, match="boom"), peak_backprop(tiny):
        raise RuntimeError("boom")
    after = run()
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert all(torch.equal(a, b) for a, b in zip(after[2], before[2]))
    assert convs[0].__dict__["forward"] is marker
    assert all("forward" not in c.__dict__ for c in convs[1:])


def test_shared_batch_computes_one_item_and_refuses_different_items(tiny):
    x = _image()[None].repeat(3, 1, 1, 1).requires_grad_(True)
    seed = torch.randn(3, 3, 12, 14)
    with peak_backprop(tiny):
        out = tiny(x)
        (plain,) = torch.autograd.grad(out, x, seed)
    with peak_backprop(tiny, shared_batch=True):
        shared_out = tiny(x)
        (shared,) = torch.autograd.grad(shared_out, x, seed)
        with pytest.raises(ConfigError, match="items differ"):
            tiny(torch.rand(2, 3, 24, 28))
    torch.testing.assert_close(shared_out, out)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-7)


def test_unsupported_conv_is_refused_before_patching(tiny):
    class Standardised(nn.Conv2d):
        def forward(self, x):
            return super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 3, 1), Standardised(3, 3, 1))
    with pytest.raises(ConfigError, match="Standardised"), peak_backprop(model):
        pass
    assert "forward" not in model[0].__dict__


# ---------------------------------------------------------------------------------------- PRMs


def test_batched_equals_loop_and_maps_are_distributions(tiny):
    image = _image()
    kw = dict(classes=[0, 2], peak_threshold=float("-inf"), class_threshold=float("-inf"), max_peaks=7, upsample=2)
    tiny.train()
    requires = [p.requires_grad for p in tiny.parameters()]
    batched = peak_response_maps(tiny, image, chunk_size=3, **kw)
    loop = peak_response_maps_loop(tiny, image, **kw)
    assert tiny.training and [p.requires_grad for p in tiny.parameters()] == requires  # flags restored
    assert len(batched) == len(loop) == 7
    values = [p.value for p in batched]
    assert values == sorted(values, reverse=True)
    for a, b in zip(batched, loop):
        assert (a.class_id, a.y, a.x, a.map_y, a.map_x) == (b.class_id, b.y, b.x, b.map_y, b.map_x)
        assert a.class_id in (0, 2) and 0 <= a.y < 24 and 0 <= a.x < 28
        assert a.response.shape == (24, 28)
        assert float((a.response - b.response).abs().max()) <= 1e-5
        torch.testing.assert_close(a.response, b.response, rtol=1e-4, atol=1e-8)
        assert float(a.response.min()) >= 0
        assert abs(float(a.response.sum()) - 1) < 1e-5


def test_tag_classifier_batched_equals_loop():
    """The real backbone (depthwise and Conv2dSame convs, ReLU6, BN) through the normalised-input path."""
    from frugalseg.models.tag_classifier import TagClassifier

    torch.manual_seed(0)
    model = TagClassifier(2, backbone="tf_efficientnet_lite0", pretrained=False, peak_stimulation=True, bias=True)
    image = _image(48, 64)
    kw = dict(peak_threshold=float("-inf"), class_threshold=float("-inf"), max_peaks=3)
    batched = peak_response_maps(model, image, [0, 1], chunk_size=2, **kw)
    loop = peak_response_maps_loop(model, image, [0, 1], **kw)
    assert len(batched) == len(loop) == 3
    for a, b in zip(batched, loop):
        assert float((a.response - b.response).abs().max()) <= 1e-5
        assert abs(float(a.response.sum()) - 1) < 1e-4 and float(a.response.min()) >= 0


def test_peak_position_and_response_of_a_known_receptive_field():
    """One stride-4 conv with positive weights: the peak is the bright block, its PRM is that block only."""
    model = nn.Conv2d(3, 1, 4, stride=4, bias=False)
    nn.init.constant_(model.weight, 1.0)
    image = torch.full((3, 16, 20), 0.1)
    image[:, 8:12, 12:16] = 0.9
    (peak,) = peak_response_maps(model, image, peak_threshold=10.0)
    assert (peak.map_y, peak.map_x) == (2, 3)
    assert 8 <= peak.y < 12 and 12 <= peak.x < 16
    outside = peak.response.clone()
    outside[8:12, 12:16] = 0
    assert float(outside.abs().max()) == 0
    torch.testing.assert_close(peak.response[8:12, 12:16], torch.full((4, 4), 1 / 16))


def test_bad_inputs_give_clear_errors(tiny):
    with pytest.raises(DataError, match="one image of shape \\(3, H, W\\).*a batch"):
        peak_response_maps(tiny, _image()[None])
    with pytest.raises(DataError, match="shape \\(3, H, W\\)"):
        peak_response_maps(tiny, torch.rand(24, 28))
    with pytest.raises(DataError, match="class ids \\[5\\] are outside the model's class maps \\(0..2\\)"):
        peak_response_maps(tiny, _image(), classes=[0, 5])
    with pytest.raises(ConfigError, match="chunk_size"):
        peak_response_maps(tiny, _image(), chunk_size=0)
    with pytest.raises(DataError, match="numpy"):
        superpixel_proposals(_image())


# ---------------------------------------------------------------------------------------- proposals


def test_superpixel_proposals_limits_and_recovery():
    rng = np.random.default_rng(0)
    image = np.full((48, 64, 3), 0.2, np.float32)
    image[10:30, 8:28] = (0.9, 0.1, 0.1)
    image[20:44, 36:60] = (0.1, 0.2, 0.9)
    image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1).astype(np.float32)
    area = 48 * 64
    props = superpixel_proposals(image, proposal_count=60)
    assert props.dtype == bool and props.ndim == 3 and props.shape[1:] == (48, 64) and 0 < len(props) <= 60
    sizes = props.reshape(len(props), -1).sum(1)
    assert (sizes >= 2e-5 * area).all() and (sizes < 0.85 * area).all()
    assert len({p.tobytes() for p in props}) == len(props)  # no duplicates
    for y0, y1, x0, x1 in ((10, 30, 8, 28), (20, 44, 36, 60)):
        box = np.zeros((48, 64), bool)
        box[y0:y1, x0:x1] = True
        ious = (props & box).sum((1, 2)) / (props | box).sum((1, 2))
        assert ious.max() > 0.8
    tight = superpixel_proposals((image * 255).astype(np.uint8), proposal_count=500, size_limit=(0.05, 0.3))
    sizes = tight.reshape(len(tight), -1).sum(1)
    assert len(tight) > 0 and (sizes >= 0.05 * area).all() and (sizes < 0.3 * area).all()


# ---------------------------------------------------------------------------------------- retrieval


def _peak(class_id, y, x, response, value=1.0):
    return Peak(class_id, y, x, value, response)


def test_score_formula_on_a_hand_computed_case():
    prm = torch.zeros(8, 8)
    prm[3, 3], prm[3, 4], prm[0, 0] = 0.5, 0.25, 0.25
    a = np.zeros((8, 8), bool)
    a[2:5, 2:5] = True  # 3x3: holds 0.75 of the PRM; its 5x5 gradient is the 7x7 square rows/cols 0..6 -> 1.0
    b = np.zeros((8, 8), bool)
    b[0:4, 0:4] = True  # 4x4 at the corner: 0.75 inside; contour excludes the eroded corner (0,0) -> 0.75
    cmap = torch.zeros(1, 8, 8)
    cmap[0, 2:6, 2:6] = 1.0  # mean 0.25: Q = the 48 pixels below 0.95 * 0.25; b covers 12 of them, a none
    q = background_masks(cmap, (8, 8), 0.95)
    assert int(q.sum()) == 48
    contours = proposal_contours(torch.from_numpy(np.stack([a, b])), 5)
    assert int(contours[0].sum()) == 49 and not bool(contours[1, 0, 0]) and bool(contours[1, 3, 3])
    scores = retrieval_scores(prm[None], torch.from_numpy(np.stack([a, b])), contours, q, alpha=0.8, beta=0.01)
    torch.testing.assert_close(scores, torch.tensor([[0.8 * 0.75 + 1.0 - 0.0, 0.8 * 0.75 + 0.75 - 0.01 * 12]]))
    # end to end, and beta large enough to flip the choice only through Q
    (inst,) = retrieve_instances([_peak(0, 3, 3, prm)], np.stack([b, a]), cmap, beta=0.01)
    assert np.array_equal(inst.mask, a) and inst.score == pytest.approx(1.6)
    (inst,) = retrieve_instances([_peak(0, 3, 3, prm)], np.stack([b, a]), cmap, beta=0.0, alpha=10.0, contour_width=1)
    assert inst.score == pytest.approx(7.5)  # contour_width 1 -> empty contour; ties go to the first (b)
    assert np.array_equal(inst.mask, b)


def test_nms_merges_suppressed_responses():
    r1, r2, r3 = torch.zeros(3, 10, 10)
    r1[2, 2] = r2[3, 3] = r3[8, 8] = 1.0
    big = np.zeros((10, 10), bool)
    big[0:6, 0:6] = True
    inner = np.zeros((10, 10), bool)
    inner[1:6, 1:6] = True  # IoU with big = 25/36 >= 0.3
    far = np.zeros((10, 10), bool)
    far[7:10, 7:10] = True
    p1, p2, p3 = _peak(1, 2, 2, r1), _peak(1, 3, 3, r2), _peak(1, 8, 8, r3)
    insts = [Instance(1, inner, 1.0, p2, r2.clone()), Instance(1, big, 2.0, p1, r1.clone()), Instance(1, far, 0.5, p3, r3.clone())]
    kept = instance_nms(insts, iou=0.3)
    assert [k.score for k in kept] == [2.0, 0.5]
    assert kept[0].merged == [p2] and torch.equal(kept[0].response, r1 + r2)
    assert torch.equal(kept[1].response, r3)
    other = [Instance(1, big, 2.0, p1, r1), Instance(2, inner, 1.0, p2, r2)]
    assert len(instance_nms(other, 0.3)) == 1  # the reference is class-agnostic
    assert len(instance_nms(other, 0.3, class_agnostic=False)) == 2


def test_prm_instances_end_to_end(tiny):
    image = _image()
    peak_kwargs = dict(peak_threshold=float("-inf"), class_threshold=float("-inf"), max_peaks=4)
    insts = prm_instances(tiny, image, [0, 1], peak_kwargs=peak_kwargs, proposal_kwargs=dict(proposal_count=30))
    assert 0 < len(insts) <= 4
    assert all(i.mask.shape == (24, 28) and i.mask.dtype == bool and i.class_id in (0, 1) for i in insts)
    assert [i.score for i in insts] == sorted((i.score for i in insts), reverse=True)
    maps = prm_class_maps(insts, [0, 1], (24, 28))
    assert maps.shape == (2, 24, 28) and maps.min() >= 0 and maps.max() == pytest.approx(1.0)


def test_prm_class_maps_scale_by_best_positive_score():
    m1, m2, m3 = np.zeros((3, 4, 4), bool)
    m1[0, :] = m2[:2, 0] = m3[3, 3] = True
    dummy = _peak(0, 0, 0, torch.zeros(4, 4))
    insts = [Instance(4, m1, 2.0, dummy, dummy.response), Instance(4, m2, 1.0, dummy, dummy.response), Instance(7, m3, -1.0, dummy, dummy.response)]
    maps = prm_class_maps(insts, [7, 4], (4, 4))
    assert maps.shape == (2, 4, 4) and maps.dtype == np.float32
    assert maps[0].max() == 0  # negative score contributes nothing
    assert maps[1, 0, 0] == 1.0 and maps[1, 1, 0] == 0.5 and maps[1, 2, 2] == 0


# ---------------------------------------------------------------------------------------- evaluation


def _gt():
    gt = np.zeros((12, 12), np.uint8)
    gt[1:4, 1:4] = 1
    gt[6:10, 6:10] = 1
    gt[1:4, 7:10] = 2
    gt[0, 1:4] = 255  # void border
    return gt


def _inst(mask_slices, cls, score):
    m = np.zeros((12, 12), bool)
    m[mask_slices] = True
    return Instance(cls, m, score, _peak(cls, 0, 0, torch.zeros(0)), torch.zeros(0))


def test_instance_ap_hand_made_cases():
    gt = _gt()
    a = (slice(0, 4), slice(1, 4))  # includes the void row: IoU ignores it -> 1.0
    b = (slice(6, 10), slice(6, 10))
    c = (slice(1, 4), slice(7, 10))
    perfect = instance_ap([[_inst(a, 1, 0.9), _inst(b, 1, 0.8), _inst(c, 2, 0.7)]], [gt])
    assert perfect["ap"] == {1: 1.0, 2: 1.0} and perfect["mAP"] == 1.0
    assert perfect["num_gt"] == {1: 2, 2: 1}
    assert perfect["gt_instances"] == "connected components of the semantic masks"
    # a false positive ranked first: precision 1/2 at recall 1/2, 2/3 at recall 1 -> AP 2/3
    fp = instance_ap([[_inst((slice(10, 12), slice(0, 3)), 1, 0.95), _inst(a, 1, 0.9), _inst(b, 1, 0.8)]], [gt], classes=[1])
    assert fp["ap"][1] == pytest.approx(2 / 3)
    # a missed instance: recall stops at 1/2
    missed = instance_ap([[_inst(a, 1, 0.9)]], [gt], classes=[1])
    assert missed["ap"][1] == pytest.approx(0.5)
    # a duplicate of a matched instance is a false positive; a class without ground truth is left out of mAP
    dup = instance_ap([[_inst(a, 1, 0.9), _inst(a, 1, 0.8), _inst(b, 1, 0.7)], []], [gt, np.zeros((12, 12), np.uint8)], classes=[1, 3])
    assert dup["ap"][1] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3) and dup["ap"][3] is None
    assert dup["mAP"] == pytest.approx(dup["ap"][1])
    with pytest.raises(DataError, match="2 prediction lists but 1"):
        instance_ap([[], []], [gt])


def test_peak_precision_counts_void_as_outside():
    gt = _gt()
    peaks = [_peak(1, 2, 2, None), _peak(1, 0, 2, None), _peak(1, 2, 8, None), _peak(0, 2, 8, None)]
    assert peak_precision(peaks, gt) == pytest.approx(1 / 4)  # inside / void / wrong class / wrong class
    assert peak_precision(peaks, gt, label_of=[2, 1]) == pytest.approx(2 / 4)
    assert np.isnan(peak_precision([], gt))
    with pytest.raises(DataError, match="outside"):
        peak_precision([_peak(1, 20, 2, None)], gt)
