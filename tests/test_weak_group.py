"""Group-wise semantic mining: graph pieces, group sampling, loss, and a tiny train -> maps -> seeds run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from frugalseg.data import open_dataset
from frugalseg.errors import ConfigError, DataError
from frugalseg.models.group_net import GraphDropout, GroupGraph, GroupNet, GroupOutput, group_loss
from frugalseg.models.tag_classifier import TagClassifier
from frugalseg.stages.group import GroupConfig, GroupMapsConfig, make_group_maps, train_group_classifier
from frugalseg.stages.maps import eval_seeds
from frugalseg.weak.classify import classifier_spec, save_classifier
from frugalseg.weak.group import group_maps, load_group_classifier, sample_groups
from frugalseg.weak.maps_io import load_maps, maps_path


def _graph(k: int = 5, n_std: float = 0.3, **kw) -> GroupGraph:
    torch.manual_seed(0)
    g = GroupGraph(k, **kw)
    for m in g.modules():  # larger than the reference's 0.01 init, so messages visibly matter
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=n_std)
    return g.eval()


@pytest.fixture(scope="module")
def net() -> GroupNet:
    torch.manual_seed(0)
    m = GroupNet(4, pretrained=False)
    for mod in m.graph.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.normal_(mod.weight, std=0.3)
    torch.nn.init.normal_(m.base.classifier.weight, std=0.1)
    return m.eval()


# ---- graph -----------------------------------------------------------------------------------------------
def test_coattention_message_matches_hand_computation_and_shapes():
    g = _graph(5, proj_channels=3)
    recv, send = torch.randn(2, 5, 6, 7), torch.randn(2, 5, 4, 9)  # maps of different sizes
    m = g.message(recv, send)
    assert m.shape == (2, 5, 6, 7)
    e_r = torch.einsum("dk,bkl->bdl", g.proj_receiver.weight[:, :, 0, 0], recv.flatten(2)) + g.proj_receiver.bias[:, None]
    e_s = torch.einsum("dk,bkl->bdl", g.proj_sender.weight[:, :, 0, 0], send.flatten(2)) + g.proj_sender.bias[:, None]
    p = torch.softmax(torch.einsum("bdl,bdm->blm", e_r, e_s), dim=2)  # receiver position l over sender positions m
    att = torch.einsum("bkm,blm->bkl", send.flatten(2), p)
    gate = torch.sigmoid(torch.einsum("k,bkl->bl", g.gate.weight[0, :, 0, 0], att))[:, None]
    assert (m.flatten(2) - att * gate).abs().max() < 1e-5
    for n in (2, 3, 4):
        nodes = torch.randn(2, n, 5, 6, 7)
        agg = g.aggregate(nodes)
        assert agg.shape == (2, n, 5, 6, 7)
        # node 0's incoming message is the mean of the messages from nodes 1..n-1, then the 3x3 fusion
        mean = sum(g.message(nodes[:, 0], nodes[:, j]) for j in range(1, n)) / (n - 1)
        assert (agg[:, 0] - g.fusion(mean)).abs().max() < 1e-5
        assert g(nodes).shape == (2, n, 5, 6, 7)
    with pytest.raises(ValueError, match="at least 2 images"):
        g.aggregate(torch.randn(1, 1, 5, 6, 7))


def test_permuting_the_group_permutes_the_outputs(net):
    torch.manual_seed(1)
    x = torch.rand(1, 4, 3, 64, 64)
    perm = torch.tensor([2, 0, 3, 1])
    a, b = net(x), net(x[:, perm])
    for name in ("maps", "nodes", "pre_logits", "post_logits"):
        assert (getattr(a, name)[:, perm] - getattr(b, name)).abs().max().item() < 1e-5, name
    assert (a.nodes - a.maps).abs().max() > 1e-3  # the graph did change the maps


def test_graph_dropout_statistics_mask_and_formula():
    gdl = GraphDropout(drop_rate=0.8, drop_th=0.7).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4000, 3, 5, 5) + 0.1
    out = gdl(x, gen)
    chose_drop = gdl.last_drop
    assert abs(chose_drop.float().mean().item() - 0.8) < 0.025
    att = x.mean(1, keepdim=True)
    dropped = att >= 0.7 * att.flatten(1).amax(1).view(-1, 1, 1, 1)
    expect_drop = torch.where(dropped, x / 2, x)
    expect_imp = (x * torch.sigmoid(att) + x) / 2
    d = chose_drop.view(-1, 1, 1, 1)
    assert torch.equal(out, torch.where(d, expect_drop, expect_imp))
    # from the output alone: a node whose attention peak is halved took the drop mask
    assert torch.equal((out == x / 2).flatten(1).any(1), chose_drop)

    # the drop mask is exactly attention >= 0.7 * max (the threshold itself included); 4 equal channels -> exact means
    vals = torch.tensor([1.0, 0.7, 0.69, 0.2, -0.3, 0.0])
    x = vals.view(1, 1, 2, 3).expand(1, 4, 2, 3).contiguous()
    sure = GraphDropout(drop_rate=1.0, drop_th=0.7).train()
    out = sure(x)
    assert torch.equal(sure.drop_mask(x.mean(1, keepdim=True)).flatten(), torch.tensor([0.0, 0.0, 1, 1, 1, 1]))
    assert torch.equal(out, (x * torch.tensor([0.0, 0, 1, 1, 1, 1]).view(1, 1, 2, 3) + x) / 2)
    never = GraphDropout(drop_rate=0.0).train()
    assert torch.allclose(never(x), (x * torch.sigmoid(x.mean(1, keepdim=True)) + x) / 2)
    # eval: off by default, on with in_eval (the reference)
    assert torch.equal(GraphDropout().eval()(x), x)
    assert not torch.equal(GraphDropout(drop_rate=1.0, in_eval=True).eval()(x), x)
    with pytest.raises(ConfigError):
        GraphDropout(drop_rate=1.5)


def test_eval_is_deterministic_and_reference_mode_is_not(net):
    x = torch.rand(1, 3, 3, 64, 64)
    a, b = net(x), net(x)
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.post_logits, b.post_logits)
    net.graph.gdl.in_eval = True
    try:
        # random per call (a drop-mask choice changes nothing where the attention max is negative, so
        # compare a few draws)
        draws = [net(x, torch.Generator().manual_seed(s)).nodes for s in range(4)]
        assert any(not torch.equal(d, a.nodes) for d in draws)
        assert any(not torch.equal(d, draws[0]) for d in draws[1:])
    finally:
        net.graph.gdl.in_eval = False


def test_group_loss_is_the_reference_formula():
    torch.manual_seed(3)
    pre, post = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    y = torch.tensor([[[1.0, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0]]])
    out = GroupOutput(maps=torch.zeros(1), nodes=torch.zeros(1), pre_logits=pre, post_logits=post)
    l = F.multilabel_soft_margin_loss
    ref = (0.4 * sum(l(pre[:, n], y[:, n]) for n in range(3)) + sum(l(post[:, n], y[:, n]) for n in range(3))) / 6
    assert abs(group_loss(out, y).item() - ref.item()) < 1e-6
    two = GroupOutput(maps=torch.zeros(1), nodes=torch.zeros(1), pre_logits=pre.repeat(2, 1, 1), post_logits=post.repeat(2, 1, 1))
    assert abs(group_loss(two, y.repeat(2, 1, 1)).item() - ref.item()) < 1e-6


def test_param_groups_follow_the_reference_multipliers(net):
    groups = net.param_groups(1e-3)
    assert sorted(round(g["lr"], 6) for g in groups) == [0.001, 0.002, 0.01, 0.02]
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in net.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(ids) == len(set(ids))
    new = {id(p) for p in list(net.graph.parameters()) + list(net.base.classifier.parameters())}
    for g in groups:
        assert all((id(p) in new) == (g["lr"] >= 0.01) for p in g["params"])


# ---- groups ----------------------------------------------------------------------------------------------
def test_sample_groups_prefers_identical_tags_and_falls_back():
    tags = [[1], [1], [1], [1], [1, 2], [1, 2], [3], [2], [2, 4], [], [0]]
    g = sample_groups(tags, 3, seed=5)
    assert g == sample_groups(tags, 3, seed=5)
    assert len(g) == len(tags) and all(len(x) == 3 and x[0] == i for i, x in enumerate(g))
    assert all(len(set(x)) == 3 for x in g)  # distinct, never the anchor again
    for i in range(4):  # enough identical images: only those
        assert all(tags[j] == [1] for j in g[i][1:])
    for i in (4, 5):  # one identical image, then one sharing a class
        other = 5 if i == 4 else 4
        assert other in g[i][1:]
        extra = [j for j in g[i][1:] if j != other][0]
        assert set(tags[extra]) & {1, 2}
    # anchor 7 ({2}): no identical image; one random class (2), which 4, 5, 8 have
    assert all(2 in tags[j] for j in g[7][1:])
    # a class with a single image (3), and an untagged anchor with no twin: any image
    assert len(set(g[6])) == 3 and len(set(g[9])) == 3
    # the seed matters, and so does the anchor: different seeds give different draws somewhere
    assert any(sample_groups(tags, 3, seed=s) != g for s in range(6, 10))
    # a group does not depend on how many anchors there are after it
    assert sample_groups(tags[:8] + tags[8:], 4, seed=(1, 2))[3] == sample_groups(tags, 4, seed=(1, 2))[3]
    # fewer images than the group size: repeats, still the right length
    assert [len(x) for x in sample_groups([[1], [1]], 4, seed=0)] == [4, 4]
    assert sample_groups([[1]], 3, seed=0) == [[0, 0, 0]]


def test_sample_groups_errors():
    with pytest.raises(DataError, match="carries a tag"):
        sample_groups([[], [], []], 3)
    with pytest.raises(DataError, match="empty"):
        sample_groups([], 3)
    with pytest.raises(ConfigError, match="group_size"):
        sample_groups([[1]], 1)


def test_group_maps_shapes_flip_and_partner_resize(net):
    torch.manual_seed(4)
    images = [torch.rand(3, 48, 64), torch.rand(3, 64, 40), torch.rand(3, 48, 64)]
    res = group_maps(net, images, [[1, 3], [1], []], scales=(1.0, 0.5), flips=True)
    assert [r.keys.tolist() for r in res] == [[1, 3], [1], []]
    assert res[0].high_res.shape == (2, 48, 64) and res[0].cam.shape == (2, 12, 16)
    assert res[1].high_res.shape == (1, 64, 40) and res[2].high_res.shape == (0, 48, 64)
    assert abs(res[0].high_res.amax().item() - 1.0) < 1e-3 and res[0].high_res.min() >= 0
    # the mirrored group gives the mirrored maps
    mirrored = group_maps(net, [i.flip(-1) for i in images], [[1, 3], [1], []], scales=(1.0,), flips=True)
    plain = group_maps(net, images, [[1, 3], [1], []], scales=(1.0,), flips=True)
    assert (mirrored[0].high_res.flip(-1) - plain[0].high_res).abs().max() < 1e-4
    with pytest.raises(ValueError, match="outside"):
        group_maps(net, images, [[9], [], []])


def test_group_map_readouts_are_the_network_maps_they_name(net):
    """plain = the pre-graph maps, graph = the post-graph node states, mean = their average (the reference)."""
    torch.manual_seed(5)
    images = [torch.rand(3, 48, 64) for _ in range(3)]
    tags = [[1, 3], [], []]
    net.eval()
    with torch.no_grad():
        out = net(torch.stack(images)[None])
        by = {name: group_maps(net, images, tags, scales=(1.0,), flips=False, readout=name)[0] for name in
              ("mean", "graph", "plain")}
    for name, raw in (("plain", out.maps), ("graph", out.nodes), ("mean", (out.maps + out.nodes) / 2)):
        expected = torch.nn.functional.relu(raw[0, 0, [1, 3]].float())
        expected = torch.nn.functional.interpolate(expected[None], size=(48, 64), mode="bilinear",
                                                   align_corners=False)[0]
        expected = expected / (expected.flatten(1).amax(1)[:, None, None] + 1e-5)
        assert torch.allclose(by[name].high_res, expected, atol=1e-5), name
    assert (by["plain"].high_res - by["graph"].high_res).abs().max() > 1e-3  # the messages change the maps
    with pytest.raises(ConfigError, match="readout"):
        group_maps(net, images, tags, readout="max")


# ---- end to end ------------------------------------------------------------------------------------------
def test_train_then_make_group_maps_then_seeds(shapes_dataset, tmp_path):
    labels = open_dataset(shapes_dataset, "train").labels
    torch.manual_seed(123)
    clf = TagClassifier(3, pretrained=False, peak_stimulation=True, bias=True)  # a PRM classifier: its head has a bias
    save_classifier(clf, classifier_spec(labels, peak_stimulation=True), labels, tmp_path / "cls" / "model")

    run = tmp_path / "group"
    cfg = GroupConfig(data=str(shapes_dataset), out=str(run), limit=6, init_classifier=str(tmp_path / "cls"),
                      epochs=1, batch_size=2, input_size=64, crop_size=64, precision="32-true", progress=False)
    res = train_group_classifier(cfg)
    assert res["images"] == 6 and (run / "model" / "model.safetensors").exists() and (run / "checkpoints" / "last.ckpt").exists()
    model, spec, _ = load_group_classifier(run)
    assert spec["kind"] == "group_classifier" and spec["group_size"] == 3 and spec["class_ids"] == [1, 2, 3]
    # the frozen stem came from the classifier run, not from a fresh initialisation
    assert torch.equal(model.base.backbone.conv_stem.weight, clf.backbone.conv_stem.weight)
    assert spec["bias"] and model.base.classifier.bias is not None
    assert train_group_classifier(cfg).get("skipped")  # finished: a rerun does not train again

    out = tmp_path / "maps"
    mcfg = GroupMapsConfig(classifier=str(run), out=str(out), split="val", gallery_images=2, progress=False)
    manifest = make_group_maps(mcfg)
    plain = make_group_maps(dataclasses.replace(mcfg, out=str(tmp_path / "plain"), readout="plain",
                                                gallery_images=0))
    assert plain["settings"]["readout"] == "plain" and plain["computed_now"] == 4
    assert manifest["computed_now"] == 4 and manifest["method"] == "group"
    ds = open_dataset(shapes_dataset, "val")
    for s in ds.samples:
        m = load_maps(maps_path(out, s.id), image_size=(64, 64), num_classes=4)
        assert m.cam.shape[1:] == (16, 16) and sorted(m.keys.tolist()) == sorted(ds.tags_of(s))
        assert m.meta["method"] == "group" and m.meta["group"][0] == s.id and len(m.meta["group"]) == 3
    assert (out / "gallery.html").exists()
    seeds = eval_seeds(out)
    assert seeds["method"] == "group" and seeds["images"] == 4 and 0.0 <= seeds["fixed"]["miou"] <= 1.0
    assert make_group_maps(mcfg)["computed_now"] == 0  # resume: existing files are skipped


def test_training_without_tags_is_a_clear_error(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in ("a", "b"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "masks" / f"{i}.png")  # background only
    (tmp_path / "classes.txt").write_text("background\ncat\n")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train.txt").write_text("a\nb\n")
    cfg = GroupConfig(data=str(tmp_path), out=str(tmp_path / "r"), pretrained=False, progress=False)
    with pytest.raises(DataError, match="no image carries a foreground tag"):
        train_group_classifier(cfg)
    for i in ("a", "b"):  # no masks, no tags.csv: nothing is labelled at all
        (tmp_path / "masks" / f"{i}.png").unlink()
    with pytest.raises(DataError, match="no image has tags or a mask"):
        train_group_classifier(cfg)
