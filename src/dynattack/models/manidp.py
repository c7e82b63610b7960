"""ManiDP-style dynamic channel pruning (Tang et al., "Manifold Regularized Dynamic Network
Pruning", CVPR 2021): a ResNet whose blocks run only the channels a per-input saliency keeps.

Block ``layer{k}.{i}`` of a CIFAR-style ResNet 6n+2 (widths 16/32/64, BasicBlocks) has two mask
blocks, as in the official release:

- ``mb1`` reads the block input ``x`` and decides the output channels of ``conv1`` (applied after
  ``bn1`` and the ReLU);
- ``mb2`` reads the *masked* output of the first conv and decides the output channels of ``conv2``
  (applied after ``bn2``, before the shortcut is added).

A mask block computes the channel **saliency** ``s = clamp(relu(fc2(relu(fc1(GAP(h))))), max=1000)``
(``fc1`` without bias, ``fc2`` with bias initialised to 1) and keeps channel ``c`` when
``s_c >= thre``, ``thre`` a per-mask-block buffer (training sets it to the k-th largest
dataset-average saliency). The official mask multiplies each kept channel by its saliency:
``mask = s * 1[s >= thre]``; so does ours, ``s * m`` with ``m`` the gate's mask.

Gate (``mb{1,2}.gate``, unit = one channel, ``G = sigmoid(q)``, ``tau = 0.5``): with ``z`` the
clamped pre-ReLU saliency, ``q = z - thre`` when ``thre > 0`` and ``q = s - thre`` otherwise. Both
give ``q >= 0`` exactly when ``s >= thre`` (IEEE subtraction keeps the sign of ``a - b``), i.e.
the official keep rule; with a positive threshold the logit of a channel whose ReLU is dead still
moves with the input, so pruned channels carry gradient for attacks and LGM. In ``train`` mode
the mask is the hard keep rule with no gradient through it (official): the saliency factor
``s`` carries the gradient to the mask block.

Costs, declared: ``mb1``'s gate controls ``conv1`` (its output channels) and feeds ``conv2`` (its
input channels: conv2 reads only the channels ``mb1`` kept); ``mb2``'s gate controls ``conv2``.
So :func:`dynattack.cost.calibrate` measures and :func:`dynattack.cost.executed_flops` counts,
per block, ``n1 * F1 / C + n1 * n2 * F2 / C^2`` (``n1, n2`` the kept counts, ``F1, F2`` the
convs' FLOPs, ``C`` the block width: active-in x active-out), with no family rule. Static:
stem, mask blocks (their FCs), shortcut projections, classifier.
:meth:`ManiDPResNet.forward_conditional` slices the conv and BN weights to the kept channels of
each sample (batch 1 per sample), so ``FlopCounterMode`` counts exactly that work.

Names: ``conv1``/``bn1``/``layer{k}.{i}``/``fc`` as the static ResNet maps onto them (see
:func:`dynattack.train.common.static_backbone`), mask blocks ``mb1``/``mb2`` with ``fc1``,
``fc2`` and ``thre`` as in the official code. No trained ManiDP model was released, so there is
no official checkpoint layout to load.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..gates import Gate, iter_gates
from .resnet import he_init, build_gated_resnet, downsample

# The official CIFAR loaders' input statistics.
CIFAR10_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)


def keep_rule(gate: Gate, logit: torch.Tensor) -> torch.Tensor:
    """ManiDP's training mask: the hard keep rule, no gradient through it (official)."""
    return (logit >= 0).to(logit.dtype)


class MaskBlock(nn.Module):
    """Channel saliency and keep decision of one mask (see the module docstring)."""

    def __init__(self, cin: int, cout: int, hidden: int, controls: list[nn.Module], clamp_max: float = 1000.0,
                 feeds: list[nn.Module] | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cin, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, cout)
        nn.init.kaiming_normal_(self.fc1.weight)  # the official initialisation: every channel starts salient
        nn.init.kaiming_normal_(self.fc2.weight)
        nn.init.ones_(self.fc2.bias)
        self.clamp_max = float(clamp_max)
        self.register_buffer("thre", torch.zeros(()))  # 0 keeps every channel (s >= 0)
        self.gate = Gate(train_estimator=keep_rule, controls=controls, feeds=feeds)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pooled``: ``(B, C_in)`` globally averaged features. Returns (saliency, gate mask),
        each ``(B, C_out)``; the block multiplies its channels by ``saliency * mask``."""
        z = self.fc2(F.relu(self.fc1(pooled))).clamp(max=self.clamp_max)
        s = F.relu(z)
        q = torch.where(self.thre > 0, z, s) - self.thre
        return s, self.gate(q)


def _bn_channels(bn: nn.BatchNorm2d, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Eval-mode BN of the channels ``idx`` only."""
    return F.batch_norm(h, bn.running_mean[idx], bn.running_var[idx], bn.weight[idx], bn.bias[idx], False, 0.0, bn.eps)


class ManiDPBlock(nn.Module):
    """A BasicBlock whose two convolutions' output channels are gated per input."""

    def __init__(self, cin: int, cout: int, stride: int = 1, reduction: int = 1, clamp_max: float = 1000.0) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample(cin, cout, stride)
        self.mb1 = MaskBlock(cin, cout, cout // reduction, [self.conv1], clamp_max, feeds=[self.conv2])
        self.mb2 = MaskBlock(cout, cout, cout // reduction, [self.conv2], clamp_max)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: torch.Tensor, record: list | None = None) -> torch.Tensor:
        """The masked batch path. ``record`` (a list) receives ``(saliency, pooled feature)`` per
        mask: the features the manifold term aligns the saliencies with (official: after
        ``bn1`` + ReLU, and after ``bn2``, both before masking)."""
        s1, m1 = self.mb1(x.mean((2, 3)))
        h = F.relu(self.bn1(self.conv1(x)))
        if record is not None:
            record.append((s1, h.mean((2, 3))))
        h = h * (s1 * m1)[:, :, None, None]
        s2, m2 = self.mb2(h.mean((2, 3)))
        o = self.bn2(self.conv2(h))
        if record is not None:
            record.append((s2, o.mean((2, 3))))
        return F.relu(o * (s2 * m2)[:, :, None, None] + self.shortcut(x))

    def forward_conditional(self, x: torch.Tensor) -> torch.Tensor:
        """Real execution: per sample, conv1 computes only the channels ``mb1`` keeps and conv2
        only those ``mb2`` keeps, reading only the kept conv1 channels (weights sliced). The mask
        blocks, the shortcut and the residual sum run batched (their cost is static). Uses the BN
        running statistics; equals :meth:`forward` whenever the masks are hard in forward (hard,
        lgm_st, train, forced gates)."""
        b, c = x.shape[0], self.conv1.out_channels
        s1, m1 = self.mb1(x.mean((2, 3)))
        scale1, on1 = s1 * m1, m1.detach() >= 0.5
        kept, pooled = [], []
        for i in range(b):
            a1 = on1[i].nonzero().squeeze(1)
            h = None
            if a1.numel():
                h = F.conv2d(x[i:i + 1], self.conv1.weight.index_select(0, a1), None, self.stride, 1)
                h = F.relu(_bn_channels(self.bn1, h, a1)) * scale1[i, a1][None, :, None, None]
                pooled.append(x.new_zeros(c).index_copy(0, a1, h.mean((2, 3))[0]))
            else:
                pooled.append(x.new_zeros(c))
            kept.append((a1, h))
        s2, m2 = self.mb2(torch.stack(pooled))
        scale2, on2 = s2 * m2, m2.detach() >= 0.5
        s = self.shortcut(x)
        out = []
        for i, (a1, h) in enumerate(kept):
            a2 = on2[i].nonzero().squeeze(1)
            if not a2.numel():
                out.append(s[i:i + 1])
                continue
            if h is None:  # no input channel: conv2 outputs zeros (no work), BN still shifts them
                o = x.new_zeros(1, a2.numel(), *s.shape[2:])
            else:
                o = F.conv2d(h, self.conv2.weight.index_select(0, a2).index_select(1, a1), None, 1, 1)
            o = _bn_channels(self.bn2, o, a2) * scale2[i, a2][None, :, None, None]
            out.append(s[i:i + 1].index_add(1, a2, o))
        return F.relu(torch.cat(out))


class ManiDPResNet(nn.Module):
    """ManiDP over a CIFAR-style ResNet 6n+2, any input channels and size.

    ``forward`` is the masked batch path; ``forward_conditional`` runs only the kept channels
    (same logits in hard mode). ``reduction``: the mask blocks' hidden width is ``C // reduction``
    (the official CIFAR setting, squeeze rate 2 halved below 80 channels, is 1).
    """

    family = "manidp"

    def __init__(
        self,
        depth: int = 20,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
        widths: tuple[int, int, int] = (16, 32, 64),
        reduction: int = 1,
        clamp_max: float = 1000.0,
    ) -> None:
        super().__init__()
        build_gated_resnet(self, lambda cin, width, stride, i: ManiDPBlock(cin, width, stride, reduction, clamp_max),
                           depth=depth, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                           mean=mean, std=std, widths=widths)
        he_init(self)
        list(iter_gates(self))  # names the gates: "layer1.0.mb1.gate", "layer1.0.mb2.gate", ...


    @property
    def blocks(self) -> list[ManiDPBlock]:
        return [b for k in (1, 2, 3) for b in getattr(self, f"layer{k}")]

    @property
    def mask_blocks(self) -> list[MaskBlock]:
        """Every mask block in forward order (``mb1``, ``mb2`` of each block)."""
        return [mb for b in self.blocks for mb in (b.mb1, b.mb2)]

    # -- forward paths ---------------------------------------------------------------------

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(self.normalize(x))))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def forward(self, x: torch.Tensor, record: list | None = None) -> torch.Tensor:
        """Logits; ``record`` (a list) receives ``(saliency, pooled feature)`` of every mask block
        in forward order, for training's lasso and manifold terms."""
        x = self._stem(x)
        for block in self.blocks:
            x = block(x, record)
        return self._head(x)

    def forward_conditional(self, x: torch.Tensor) -> torch.Tensor:
        """Really pruned: each sample's convolutions run on its kept channels only."""
        x = self._stem(x)
        for block in self.blocks:
            x = block.forward_conditional(x)
        return self._head(x)


def manidp_cifar(depth: int = 20, in_channels: int = 3, num_classes: int = 10, input_size: int = 32,
                 mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD,
                 widths: tuple[int, int, int] = (16, 32, 64), reduction: int = 1) -> ManiDPResNet:
    """ManiDP-ResNet (6n+2): 20, 32 and 56 in the official CIFAR code."""
    return ManiDPResNet(depth, in_channels, num_classes, input_size, mean, std, widths, reduction)
