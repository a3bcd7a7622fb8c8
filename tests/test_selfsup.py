"""Self-supervision: colour space and proxy targets, encoders, mix-and-match patches / graph / triplet loss, the
pretrain stage and loading its weights into segmenters."""

from __future__ import annotations

import math

import pytest
import torch

from frugalseg.errors import DataError
from frugalseg.selfsup.encoders import make_encoder, unet_down_blocks
from frugalseg.selfsup.mixmatch import class_graph_triplets, sample_patches, triplet_loss
from frugalseg.selfsup.proxies import (CHROMA_BINS, HUE_BINS, colorization_loss, colorization_targets, lightness_input,
                                       rgb_to_lab, rotation_batch)

pytestmark = pytest.mark.usefixtures("one_thread")


def _pixel(r, g, b):
    return torch.tensor([r, g, b], dtype=torch.float32).view(1, 3, 1, 1)


def test_lab_of_known_colours_and_colorization_targets():
    assert rgb_to_lab(_pixel(1, 1, 1)).flatten().tolist() == pytest.approx([100, 0, 0], abs=0.05)
    assert rgb_to_lab(_pixel(1, 0, 0)).flatten().tolist() == pytest.approx([53.24, 80.09, 67.20], abs=0.05)
    assert rgb_to_lab(_pixel(0, 0, 0)).flatten().tolist() == pytest.approx([0, 0, 0], abs=0.05)
    grey = torch.full((1, 3, 4, 4), 0.5)
    t = colorization_targets(grey, (2, 2))
    assert (t["chroma"] == 0).all() and t["hue_weight"].max() < 1e-3
    red = _pixel(1, 0, 0).expand(1, 3, 4, 4)
    t = colorization_targets(red, (1, 1))
    hue = math.atan2(67.20, 80.09)
    assert int(t["hue"]) == int((hue + math.pi) / (2 * math.pi) * HUE_BINS)
    assert int(t["chroma"]) == CHROMA_BINS - 1  # chroma 104.5 is past the binned range: the last bin
    x = lightness_input(red)
    assert x.shape == (1, 3, 4, 4) and torch.allclose(x, torch.full_like(x, 0.5324), atol=1e-3)
    logits = torch.zeros(1, HUE_BINS + CHROMA_BINS, 1, 1)
    assert colorization_loss(logits, t).item() == pytest.approx(2 * math.log(32), rel=1e-5)


def test_rotation_batch_rotates_and_labels():
    img = torch.arange(16.0).view(1, 1, 4, 4)
    x, y = rotation_batch(img)
    assert y.tolist() == [0, 1, 2, 3] and torch.equal(x[2], torch.rot90(img[0], 2, dims=(-2, -1)))
    with pytest.raises(ValueError, match="square"):
        rotation_batch(torch.zeros(1, 1, 4, 5))


def test_unet_encoder_is_the_unets_own_down_path():
    from frugalseg.models import build_model
    from frugalseg.models.backbones import load_network_weights

    enc = make_encoder("unet2d", 1, channels=(8, 16, 32, 64), num_classes=4)
    assert len(unet_down_blocks(enc.network)) == 4
    feats = enc(torch.rand(2, 1, 64, 64))
    assert [f.shape[1] for f in feats] == [8, 16, 32, 64] and feats[0].shape[-1] == 32
    assert enc.embedding(torch.rand(3, 1, 64, 64)).shape == (3, 64 * 4 * 4)  # bottleneck 8×8 at 64 px, pooled
    assert enc.embedding(torch.rand(3, 1, 16, 16), grid=4).shape == (3, 64 * 2 * 2)  # fewer cells than the grid
    seg = build_model({"arch": "unet2d", "in_chans": 1, "num_classes": 4, "channels": [8, 16, 32, 64]})
    for p in enc.network.parameters():
        p.data.fill_(0.25)
    path = _save(enc.saved_state())
    load_network_weights(seg, path)
    assert all(torch.all(p == 0.25) for p in seg.parameters())
    other = build_model({"arch": "unet2d", "in_chans": 1, "num_classes": 4, "channels": [8, 16, 32, 64, 128]})
    with pytest.raises(DataError, match="weights of another network"):
        load_network_weights(other, path)


def _save(state: dict) -> str:
    import tempfile

    from safetensors.torch import save_file

    f = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
    save_file(state, f.name)
    return f.name


def test_patches_take_their_seed_pixels_class_with_the_background_share():
    img = torch.rand(2, 3, 40, 40)
    mask = torch.zeros(2, 40, 40, dtype=torch.long)
    mask[0, 10:30, 10:30] = 3
    mask[1] = 255
    mask[1, :5, :5] = 0  # only background and void
    g = torch.Generator().manual_seed(0)
    p, lab = sample_patches(img, mask, per_image=10, sides=(8, 16), out_size=12, bg_ratio=0.2, generator=g)
    assert p.shape == (20, 3, 12, 12)
    assert lab[:10].tolist().count(0) == 2 and lab[:10].tolist().count(3) == 8
    assert lab[10:].tolist() == [0] * 10
    p, lab = sample_patches(img, torch.full((2, 40, 40), 255), per_image=4, sides=(8, 8), out_size=8)
    assert len(p) == 0 and len(lab) == 0


def test_patch_is_centred_on_its_seed():
    img = torch.zeros(1, 1, 21, 21)
    img[0, 0, 10, 10] = 1.0
    mask = torch.full((1, 21, 21), 255)
    mask[0, 10, 10] = 1
    p, lab = sample_patches(img, mask, per_image=1, sides=(6, 6), out_size=6, bg_ratio=0.0)
    assert lab.tolist() == [1] and p[0, 0, 3, 3] == 1 and p.sum() == 1


def test_class_graph_links_each_new_node_to_earlier_nodes():
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 0])
    t = class_graph_triplets(labels, torch.Generator().manual_seed(1))
    assert len(t) == 7 and sorted(t[:, 0].tolist()) == list(range(7))
    assert all(labels[a] == labels[p] and labels[a] != labels[n] for a, p, n in t.tolist())
    assert len(class_graph_triplets(torch.tensor([4, 4, 4]))) == 0  # one class: no negative


def test_triplet_loss_by_hand():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # a=0, p=1 (d 0), n=2 (d 2): max(0, 2.1 + 0 - 2) = 0.1; n=3 (d 4): 0
    t = torch.tensor([[0, 1, 2], [0, 1, 3]])
    assert triplet_loss(emb, t, 2.1).item() == pytest.approx(0.1 / 4)
    assert triplet_loss(emb * 5, t, 2.1).item() == pytest.approx(0.1 / 4)  # normalised first


def test_pretrain_stage_then_train_loads_the_backbone(tmp_path):
    from safetensors.torch import load_file

    from frugalseg.models import build_model
    from frugalseg.stages.pretrain import PretrainConfig, pretrain

    common = dict(data="msrc-objects", iterations=2, epoch_iterations=2, batch_size=2, crop_size=64, progress=False,
                  devices="cpu")
    proxy = pretrain(PretrainConfig(task="rotation", out=str(tmp_path / "rot"), **common))
    mm = pretrain(PretrainConfig(task="mixmatch", init=proxy["run"], mask_count=4, patch_resize=32,
                                 patch_sides=(16, 48), out=str(tmp_path / "mm"), **common))
    assert mm["images"] == 4 and mm["task"] == "mixmatch"
    saved = load_file(mm["weights"])
    model = build_model({"arch": "ocr", "num_classes": 16, "in_chans": 3, "backbone": "tf_efficientnet_lite0"},
                        pretrained=mm["run"])
    got = model.backbone.state_dict()
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    assert not torch.equal(load_file(proxy["weights"])["conv_stem.weight"], saved["conv_stem.weight"])
    with pytest.raises(DataError, match="colour"):
        pretrain(PretrainConfig(task="colorize", data="acdc", out=str(tmp_path / "c")))
    with pytest.raises(DataError, match="weights of another network"):
        pretrain(PretrainConfig(task="mixmatch", arch="unet2d", init=proxy["run"], out=str(tmp_path / "x"),
                                **{**common, "data": "acdc"}))
    assert not (tmp_path / "c").exists() and not (tmp_path / "x").exists()


def test_unet_patch_embeddings_differ_between_patches():
    """The U-Net's blocks end in InstanceNorm: a global average of its bottleneck is nearly the same for every
    patch (M&M's triplet loss then cannot move); the grid embedding keeps them apart."""
    torch.manual_seed(0)
    enc = make_encoder("unet2d", 1, channels=(8, 16, 32, 64), num_classes=4).eval()
    x = torch.rand(6, 1, 64, 64)
    x[3:] = x[3:] * torch.linspace(0, 1, 64).view(1, 1, 1, 64)  # three patches with a ramp
    with torch.no_grad():
        grid = torch.nn.functional.normalize(enc.embedding(x), dim=1)
        mean = torch.nn.functional.normalize(enc(x)[-1].mean((-2, -1)), dim=1)
    spread = lambda e: torch.cdist(e, e).pow(2).mean().item()  # noqa: E731
    assert spread(grid) > 3 * spread(mean) and spread(grid) > 0.01


def test_resume_of_a_finished_pretraining_keeps_its_record(tmp_path):
    import json as _json

    from frugalseg.stages.pretrain import PretrainConfig, pretrain

    cfg = dict(task="rotation", data="msrc-objects", iterations=2, epoch_iterations=2, batch_size=2, crop_size=64,
               progress=False, devices="cpu", out=str(tmp_path / "rot"))
    first = pretrain(PretrainConfig(**cfg))
    done = (tmp_path / "rot" / "stages" / "pretrain.done").read_text()
    again = pretrain(PretrainConfig(**cfg, resume=True))  # same schedule: nothing to train, nothing rewritten
    assert (tmp_path / "rot" / "stages" / "pretrain.done").read_text() == done
    assert again["seconds"] == first["seconds"] and _json.loads(done)["iterations"] == 2


def test_pretrain_crops_never_pad_a_small_image():
    """A black band from padding would tell a rotation's angle: proxy crops stay inside the image."""
    from frugalseg.data.transforms import CropTransform

    image = torch.rand(3, 40, 90) + 0.5  # no pixel is 0 in the image itself
    mask = torch.zeros(40, 90, dtype=torch.long)
    for seed in range(20):
        out, m = CropTransform(crop=64, scale=(0.5, 1.0), pad=False)(image, mask, torch.Generator().manual_seed(seed))
        assert out.shape == (3, 64, 64) and bool((out > 0.3).all()) and bool((m == 0).all())


def test_weights_of_another_backbone_are_refused(tmp_path):
    """lite1's features share every lite0 tensor name and shape: a lite1 pretrain run or weight file must not load
    silently into lite0."""
    import json

    from safetensors.torch import save_file

    from frugalseg.errors import ConfigError, DataError
    from frugalseg.models.backbones import create_backbone

    lite1 = create_backbone("tf_efficientnet_lite1", pretrained=False, output_stride=32)
    run = tmp_path / "pre"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in lite1.model.state_dict().items()}, str(run / "weights.safetensors"))
    (run / "pretrain.json").write_text(json.dumps({"arch": "ocr", "backbone": "tf_efficientnet_lite1"}))
    with pytest.raises(ConfigError, match="not the tf_efficientnet_lite0 backbone"):
        create_backbone("tf_efficientnet_lite0", pretrained=str(run), output_stride=32)
    with pytest.raises(DataError, match="another network than tf_efficientnet_lite0"):
        create_backbone("tf_efficientnet_lite0", pretrained=str(run / "weights.safetensors"), output_stride=32)
    with pytest.raises(ConfigError, match="no such weight file"):
        create_backbone("tf_efficientnet_lite0", pretrained=str(tmp_path / "missing.safetensors"), output_stride=32)
