"""Group-wise semantic mining (Li et al., AAAI 2021, "Group-Wise Semantic Mining for WSSS"): the network.

A group is N images that share tags (the anchor and N-1 partners). Each image goes through the tag
classifier (backbone + 1x1 class-map conv, `TagClassifier`) to K class maps; the maps of the N images
are the nodes of a fully connected graph, and T rounds of message passing let each image's maps borrow
evidence from the others:

    message  m_{j->i} = gate(att) * att,  att = x_j . softmax_j(E_i^T E_j)   (co-attention, on i's grid)
    node i   h_i <- GDL(ConvGRU(fuse(mean_{j != i} m_{j->i}), h_i))
    readout  post-graph logits = GAP(h_i)

The graph works on the K-channel class maps themselves (the reference's `all_channel = 20`, VOC's class
count), not on deep features: what flows between images is "where does class c respond", and the
post-graph maps stay class maps, averaged with the plain ones at map time.

Where this differs from the reference (github.com/Lixy1997/Group-WSSS, `models/vgg_gnn.py`):
- Backbone: any `TagClassifier` backbone (default tf_efficientnet_lite0, output stride 16) instead of
  VGG16-D1 (OS8) with three 3x3 conv layers before the class-map conv.
- Aggregation: the reference concatenates the two incoming messages of its fixed N=3 group and fuses them
  with one shared 3x3 conv (2K -> K). Which message lands in which half depends on the node's identity
  (the anchor gets [partner1, partner2], partner1 gets [anchor, partner2], ...), so it is neither
  permutation invariant nor defined for another N. Here the N-1 messages are averaged and the shared
  3x3 conv maps K -> K. That is the reference's conv with its two weight halves tied (conv(cat[a, b])
  with W_a = W_b = W/2 is W * mean(a, b)), it works for any group size, and it treats the partners as the
  unordered, exchangeable sample they are; the mean (not the sum) keeps the scale independent of N.
  Permuting the images of a group therefore permutes the outputs (up to float rounding).
- Graph dropout (GDL, ADL-style) is applied in training only by default. The reference applies it in
  eval mode too (it has no mode switch), which makes its maps random; `gdl_in_eval=True` mimics that.
- The projection width d is an option (default 10). The reference uses d = K // 2 (= 10 for VOC's 20).
- The reference also defines an unused `extra_linear_e` and a `message_fun` (conv + ReLU) that is never
  called: the fused message is *not* passed through a ReLU there, nor here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from frugalseg.errors import ConfigError
from frugalseg.models.tag_classifier import TagClassifier


class ConvGRUCell(nn.Module):
    """Convolutional GRU cell (the reference's, kernel 1 by default): h' = (1 - z) h + z tanh(W [x, r h])."""

    def __init__(self, channels: int, kernel_size: int = 1):
        super().__init__()
        pad = kernel_size // 2
        self.reset_gate = nn.Conv2d(2 * channels, channels, kernel_size, padding=pad)
        self.update_gate = nn.Conv2d(2 * channels, channels, kernel_size, padding=pad)
        self.out_gate = nn.Conv2d(2 * channels, channels, kernel_size, padding=pad)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        xh = torch.cat([x, h], dim=1)
        z = torch.sigmoid(self.update_gate(xh))
        r = torch.sigmoid(self.reset_gate(xh))
        candidate = torch.tanh(self.out_gate(torch.cat([x, h * r], dim=1)))
        return h * (1 - z) + candidate * z


class GraphDropout(nn.Module):
    """Graph dropout layer (GDL), ADL-style, as the reference applies it to every updated node.

    attention = channel mean of x (B, 1, h, w). For each node, with probability `drop_rate` the selection
    map is the drop mask (0 where attention >= drop_th * max attention, else 1), otherwise the importance
    map sigmoid(attention); out = (x * sel + x) / 2. One draw per node (the reference draws once per call,
    and calls it once per node with batch 1). As in the reference, the threshold is drop_th * max even when
    the max is negative (then nothing is dropped).

    Active in training mode; in eval mode only with `in_eval=True` (the reference's behaviour, random maps).
    `last_drop` holds the per-node choices (True = drop mask) of the last active call, for inspection.
    """

    def __init__(self, drop_rate: float = 0.8, drop_th: float = 0.7, in_eval: bool = False):
        super().__init__()
        if not 0 <= drop_rate <= 1:
            raise ConfigError(f"drop_rate must be in [0, 1], got {drop_rate}.")
        if not 0 <= drop_th <= 1:
            raise ConfigError(f"drop_th must be in [0, 1], got {drop_th}.")
        self.drop_rate = drop_rate
        self.drop_th = drop_th
        self.in_eval = in_eval
        self.last_drop: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self.training or self.in_eval

    @staticmethod
    def attention(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1, keepdim=True)

    def drop_mask(self, attention: torch.Tensor) -> torch.Tensor:
        """1 where attention < drop_th * (per-node max), 0 elsewhere (the most activated region is dropped)."""
        threshold = attention.flatten(1).amax(1).view(-1, 1, 1, 1) * self.drop_th
        return (attention < threshold).to(attention.dtype)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.active:
            return x
        att = self.attention(x)
        use_drop = torch.rand(x.shape[0], generator=generator, device="cpu") < self.drop_rate
        self.last_drop = use_drop
        use_drop = use_drop.to(x.device).view(-1, 1, 1, 1)
        selected = torch.where(use_drop, self.drop_mask(att), torch.sigmoid(att))
        return (x * selected + x) / 2

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, drop_th={self.drop_th}, in_eval={self.in_eval}"


class GroupGraph(nn.Module):
    """Message passing over the class maps of the images of a group (the reference's 'extra' GNN layers)."""

    def __init__(self, channels: int, proj_channels: int = 10, rounds: int = 3, drop_rate: float = 0.8,
                 drop_th: float = 0.7, gdl_in_eval: bool = False):
        super().__init__()
        if rounds < 1:
            raise ConfigError(f"rounds (message-passing steps) must be >= 1, got {rounds}.")
        if proj_channels < 1:
            raise ConfigError(f"proj_channels must be >= 1, got {proj_channels}.")
        self.channels = channels
        self.rounds = rounds
        self.proj_receiver = nn.Conv2d(channels, proj_channels, 1)  # reference: extra_proja (exemplar)
        self.proj_sender = nn.Conv2d(channels, proj_channels, 1)  # reference: extra_projb (query)
        self.gate = nn.Conv2d(channels, 1, 1, bias=False)
        self.fusion = nn.Conv2d(channels, channels, 3, padding=1)
        self.gru = ConvGRUCell(channels, kernel_size=1)
        self.gdl = GraphDropout(drop_rate, drop_th, gdl_in_eval)
        for m in self.modules():  # the reference's init for its new layers
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def message(self, receiver: torch.Tensor, sender: torch.Tensor) -> torch.Tensor:
        """Co-attention message m_{sender -> receiver}: (B, K, h_r, w_r) on the receiver's grid.

        E_r, E_s = 1x1 projections to d channels; A = E_r^T E_s (B, L_r, L_s); each receiver position
        attends over the sender's positions (softmax over L_s, the reference's softmax(A^T, dim=1)); the
        attended map is the sender's class maps read through that attention, gated by sigmoid(1x1 conv).
        The two maps may differ in size.
        """
        b, k, h, w = receiver.shape
        e_r = self.proj_receiver(receiver).flatten(2)  # (B, d, L_r)
        e_s = self.proj_sender(sender).flatten(2)  # (B, d, L_s)
        affinity = torch.bmm(e_r.transpose(1, 2), e_s)  # (B, L_r, L_s)
        weights = F.softmax(affinity, dim=2)
        attended = torch.bmm(sender.flatten(2), weights.transpose(1, 2)).view(b, k, h, w)  # (B, K, L_r)
        return attended * torch.sigmoid(self.gate(attended))

    def aggregate(self, nodes: torch.Tensor) -> torch.Tensor:
        """Mean of the N-1 incoming messages of every node, fused by the shared 3x3 conv: (G, N, K, h, w).

        The senders of node i are reached by rolling the group by 1..N-1: each roll is one batched call
        over all G*N nodes, and no node sends to itself.
        """
        g, n = nodes.shape[:2]
        if n < 2:
            raise ValueError(f"a group needs at least 2 images for message passing, got {n}.")
        receivers = nodes.flatten(0, 1)
        total = None
        for shift in range(1, n):
            senders = nodes.roll(shifts=-shift, dims=1).flatten(0, 1)
            m = self.message(receivers, senders)
            total = m if total is None else total + m
        return self.fusion(total / (n - 1)).unflatten(0, (g, n))

    def forward(self, nodes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(G, N, K, h, w) class maps -> node states after `rounds` of message passing, same shape."""
        for _ in range(self.rounds):
            fused = self.aggregate(nodes)
            updated = self.gru(fused.flatten(0, 1), nodes.flatten(0, 1))
            nodes = self.gdl(updated, generator).unflatten(0, nodes.shape[:2])
        return nodes


@dataclass
class GroupOutput:
    """Per image of each group: class maps before (`maps`) and after (`nodes`) the graph, and their GAP logits."""

    maps: torch.Tensor  # (G, N, K, h, w)
    nodes: torch.Tensor  # (G, N, K, h, w)
    pre_logits: torch.Tensor  # (G, N, K)
    post_logits: torch.Tensor  # (G, N, K)


class GroupNet(nn.Module):
    """Tag classifier + group graph. Input: groups of same-size images (G, N, 3, H, W) in [0, 1]."""

    def __init__(
        self,
        num_classes: int,
        backbone: str = "tf_efficientnet_lite0",
        pretrained: bool | str | Path = True,
        output_stride: int = 16,
        freeze_bn: bool = True,
        frozen_stages: int = 3,
        proj_channels: int = 10,
        rounds: int = 3,
        drop_rate: float = 0.8,
        drop_th: float = 0.7,
        gdl_in_eval: bool = False,
        bias: bool = False,
        in_chans: int = 3,
    ):
        super().__init__()
        # Pre-graph logits are GAP of the class maps whatever the base was trained with (peak stimulation
        # included): the reference's readout. `bias` only lets a PRM-trained classifier's head be loaded.
        self.base = TagClassifier(num_classes, backbone=backbone, pretrained=pretrained, output_stride=output_stride,
                                  freeze_bn=freeze_bn, frozen_stages=frozen_stages, bias=bias, in_chans=in_chans)
        self.graph = GroupGraph(num_classes, proj_channels, rounds, drop_rate, drop_th, gdl_in_eval)

    @property
    def num_classes(self) -> int:
        return self.base.classifier.out_channels

    def forward(self, groups: torch.Tensor, generator: torch.Generator | None = None) -> GroupOutput:
        if groups.ndim != 5:
            raise ValueError(f"GroupNet expects groups (G, N, 3, H, W), got shape {tuple(groups.shape)}.")
        g, n = groups.shape[:2]
        maps = self.base.class_maps(groups.flatten(0, 1)).unflatten(0, (g, n))
        nodes = self.graph(maps, generator)
        return GroupOutput(maps=maps, nodes=nodes, pre_logits=maps.mean(dim=(3, 4)), post_logits=nodes.mean(dim=(3, 4)))

    def param_groups(self, lr: float, new_lr_mult: float = 10.0, bias_lr_mult: float = 2.0) -> list[dict]:
        """The reference's four groups: backbone weights at lr, backbone biases at lr x bias_lr_mult, new
        layers (class-map conv and graph) at lr x new_lr_mult, their biases at lr x new_lr_mult x bias_lr_mult.
        Frozen backbone parameters are left out."""
        groups: dict[tuple[bool, bool], list] = {(new, bias): [] for new in (False, True) for bias in (False, True)}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            new = not name.startswith("base.backbone.")
            groups[(new, name.endswith("bias"))].append(p)
        out = []
        for (new, bias), params in groups.items():
            if params:
                mult = (new_lr_mult if new else 1.0) * (bias_lr_mult if bias else 1.0)
                out.append({"params": params, "lr": lr * mult})
        return out


def group_loss(out: GroupOutput, targets: torch.Tensor, pre_weight: float = 0.4) -> torch.Tensor:
    """[pre_weight * sum_n MLSM(pre-graph logits_n) + sum_n MLSM(post-graph logits_n)] / (2N), averaged over groups.

    The reference (train.py, N=3): (0.4 * (l(x11) + l(x22) + l(x33)) + (l(x1) + l(x2) + l(x3))) / 6, where
    each l is multilabel_soft_margin_loss (itself a mean over classes). With G groups this is the mean over
    all G*N images of (pre_weight * pre + post) / 2.
    """
    t = targets.flatten(0, 1).float()
    pre = F.multilabel_soft_margin_loss(out.pre_logits.flatten(0, 1).float(), t)
    post = F.multilabel_soft_margin_loss(out.post_logits.flatten(0, 1).float(), t)
    return (pre_weight * pre + post) / 2
