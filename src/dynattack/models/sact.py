"""SACT (Figurnov et al., CVPR 2017): Spatially Adaptive Computation Time for residual networks.

Each stage of a CIFAR-style ResNet 6n+2 (widths 16/32/64, BasicBlocks) is one ACT block of n
residual units, pondered per spatial position:

- **halting unit** after every unit but the last of a stage (``halting``): a per-position
  halting score ``h = sigmoid(conv3x3(x) + fc(GAP(x)))`` of the unit's output ``x``, the
  REFERENCE.md form (the module is DynConv's :class:`~dynattack.models.dynconv.Squeeze`, bias
  -3 in its 3x3 conv so every unit runs at the start of training). The last unit halts.
- **cumulative halting** ``c_l = sum_{j<l} m_j h_j`` before unit ``l``: a position runs unit
  ``l`` while ``c_l <= 1 - eps`` (``eps = 0.01``) and stops for good once it exceeds it (the
  paper writes ``>=``; the tie has measure zero and the gate's ``q >= 0`` convention settles it).
  The first unit of a stage always runs (``m_0 = 1``, no gate, static cost).
- **output**: the halting distribution ``p_l = m_l m_{l+1} h_l + (m_l - m_{l+1}) (1 - c_l)``
  (``m_n = 0``) weights the unit outputs, ``sum_l p_l x_l``: ``h_l`` while the position goes on,
  the remainder ``R = 1 - c_l`` on the unit where it stops, 0 after. Ponder cost per position
  ``N + R`` with ``N = sum_l m_l`` units run; :meth:`SACTResNet.forward_ponder` returns its mean
  over positions summed over stages (the official ``add_all_ponder_costs``), the training
  objective's ``tau`` term.
- **frozen positions**: a unit updates only the positions still pondering, as the official
  ``residual_mask``: ``x_l = relu(x + m_l F(x))``. Unit states are ReLU outputs, so a stopped
  position passes ``relu(x) = x`` on unchanged; this is DynConv's residual rule
  (:func:`~dynattack.models.dynconv.masked_residual`), reused.

**The gate.** "Position still computing at unit ``l``" is the gate ``run_gate`` of unit ``l``
(``l >= 1``), with per-position logit ``q_l = 4 (1 - eps - c_l)``, ``G = sigmoid(q_l)``,
``tau = 0.5``. Why this logit:

* the sign test is exact: ``q_l >= 0`` is ``c_l <= 1 - eps`` computed in floating point (a
  positive scale keeps signs; a float difference is 0 only for equal operands), and the
  network runs on the gate's own decision, so masked path, real path and trace agree by
  construction;
* energy attacks get a useful gradient: ``G`` depends on the input through every earlier
  halting score (``dG/dh_j = -4 G (1 - G) m_j``), so pushing ``G`` up lowers the halting scores
  of the units before it, the only way SACT can be made to compute longer. The scale 4 makes
  ``dG/dc = -1`` at the threshold (``G ~ 0.5 + (1 - eps - c)``: the value moves one for one with
  the remaining halting budget) and saturates only far from it, so units that are off still
  pull (``G (1 - G) >= 0.1`` while ``|1 - eps - c| <= 0.5``, and ``c`` of a gated unit lies in
  ``[0, l)``); a much larger scale would flatten the gradient of every unit not at the boundary.
  A smaller one breaks ``G >= tau`` iff ``q >= 0`` in float32: at the smallest nonzero gap
  (``c`` one ulp above ``1 - eps``, 6e-8) ``sigmoid`` rounds to exactly 0.5 for scales 1 and 2,
  not for 4.

The hard forward has no gradient through the decisions (FGM); the halting distribution is
continuous and carries gradient. In ``train`` mode the decisions are hard too, without a
surrogate (the paper: the ponder cost's gradient flows through the remainder only); ``lgm``
uses ``sigmoid(lam q)`` as every family.

**Costs.** The first conv of a unit must produce its output on the 3x3 neighbourhood of every
pondering position (the second conv reads it there): as in the official CIFAR code, conv1 runs
on the mask dilated by a 3x3 box, conv2 and the halting unit's 3x3 conv on the mask. The dilated
mask is its own gate event ``dilate_gate`` with logit ``box(mask) - 0.5`` (DynConv's
:func:`~dynattack.models.dynconv.masks_from_logit`), so ``run_gate`` controls conv2 and the
halting conv, ``dilate_gate`` conv1, and :func:`dynattack.cost.calibrate` measures both per
position. Static: stem, first unit of every stage (with its halting unit and the strided
shortcut), the halting units' global ``fc``, classifier. The weighted sum of unit outputs is
element-wise bookkeeping, uncounted like every elementwise op (and in the official FLOPs).
:meth:`SACTResNet.forward_conditional` really runs conv1 / conv2 / the halting conv on the
gathered active positions only (:func:`~dynattack.models.dynconv.sparse_conv3x3`).

Forced gates: ``on`` runs every unit everywhere with the same halting distribution formula
(remainder on the last unit, negative where ``c`` passed 1): the all-on network's FLOPs and
latency, not a network anyone trained; ``off`` keeps the first unit of every stage.

Module names follow DynConv's (``conv1``, ``bn1``, ``layer{k}.{i}.conv1/bn1/conv2/bn2``,
``layer{k}.{i}.downsample``, ``fc``) plus ``layer{k}.{i}.halting.conv/fc``, so a static
ResNet's weights map onto the backbone (:func:`dynattack.train.common.static_backbone`).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..gates import Gate, iter_gates
from .dynconv import (
    Squeeze,
    _channels_last_padded,
    masked_residual,
    masks_from_logit,
    sparse_conv3x3,
    sparse_residual,
)
from .resnet import he_init, build_gated_resnet, downsample, stage_layout

EPS = 0.01  # a position stops once its cumulative halting exceeds 1 - EPS (the paper's epsilon)
LOGIT_SCALE = 4.0  # q = LOGIT_SCALE * (1 - EPS - c): dG/dc = -1 at the threshold (module docstring)
HALTING_BIAS = -3.0  # the paper's initial halting bias: h ~ 0.05, every unit runs at first


def hard_decision(gate: Gate, logit: torch.Tensor) -> torch.Tensor:
    """SACT's training estimator: the hard decision, no gradient (ACT does not differentiate
    the number of units; the ponder cost reaches the halting scores through the remainder)."""
    return (logit.detach() >= 0).to(logit.dtype)


class SACTBlock(nn.Module):
    """One residual unit of a SACT stage: a BasicBlock, its halting unit (all units but the last)
    and, for every unit but the first, the pondering gate and its dilated twin."""

    def __init__(self, cin: int, cout: int, stride: int, gated: bool, halting: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample(cin, cout, stride)
        if gated and self.downsample is not None:
            raise ValueError("a gated SACT unit keeps its shape (only the first unit of a stage strides)")
        self.halting = Squeeze(cout) if halting else None
        if gated:
            controls = [self.conv2] + ([self.halting.conv] if halting else [])
            self.run_gate = Gate(train_estimator=hard_decision, controls=controls)
            self.dilate_gate = Gate(train_estimator=hard_decision, controls=[self.conv1])

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The ungated first unit: a plain BasicBlock."""
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))

    def halting_score(self, x: torch.Tensor, m: torch.Tensor | None, sparse: bool) -> torch.Tensor:
        """``h = sigmoid(conv3x3(x) + fc(GAP(x)))`` of this unit's output ``x``, ``(B, H, W)``.

        ``m``: the unit's mask (None: every position). ``sparse``: the 3x3 conv runs on the
        gathered positions of ``m`` only (0 elsewhere, where ``m`` zeroes it anyway); the global
        ``fc`` always runs.
        """
        unit = self.halting
        on = None if m is None else m.detach() >= 0.5
        if not sparse or on is None or bool(on.all()):
            return torch.sigmoid(unit(x))
        b, _, h, w = x.shape
        glob = unit.fc(x.mean((2, 3)))  # (B, 1)
        out = x.new_zeros(b * h * w)
        if bool(on.any()):
            flat = on.reshape(-1).nonzero().squeeze(1)
            z = sparse_conv3x3(_channels_last_padded(x), unit.conv, flat, h, w, h + 2, w + 2)[:, 0]
            out = out.index_copy(0, flat, torch.sigmoid(z + unit.conv.bias + glob[:, 0][flat // (h * w)]))
        return out.view(b, h, w)


class SACTResNet(nn.Module):
    """SACT over a CIFAR-style ResNet 6n+2 (n >= 2 units per stage), any input channels and size.

    ``forward`` is the masked batch path (dense convolutions times the masks);
    ``forward_conditional`` convolves only the pondering positions (same logits in hard mode);
    ``forward_ponder`` also returns the ponder cost.
    """

    family = "sact"

    def __init__(
        self,
        depth: int = 20,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        mean: tuple[float, ...] = (0.2860,),
        std: tuple[float, ...] = (0.3530,),
        widths: tuple[int, int, int] = (16, 32, 64),
        eps: float = EPS,
    ) -> None:
        super().__init__()
        n = stage_layout(depth)
        if n < 2:
            raise ValueError(f"SACT needs at least 2 units per stage (depth >= 14), got depth {depth}")
        self.eps = float(eps)
        build_gated_resnet(self, lambda cin, width, stride, i: SACTBlock(cin, width, stride, gated=i > 0,
                                                                         halting=i < n - 1),
                           depth=depth, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                           mean=mean, std=std, widths=widths, sequential=False)
        he_init(self)
        list(iter_gates(self))  # names the gates: "layer1.1.run_gate", "layer1.1.dilate_gate", ...

        with torch.no_grad():
            for b in self.blocks:
                if b.halting is not None:
                    b.halting.conv.bias.fill_(HALTING_BIAS)
                    b.halting.fc.bias.zero_()

    @property
    def stages(self) -> list[nn.ModuleList]:
        return [self.layer1, self.layer2, self.layer3]

    @property
    def blocks(self) -> list[SACTBlock]:
        return [b for stage in self.stages for b in stage]

    # -- forward paths ---------------------------------------------------------------------

    def _stage(self, units: nn.ModuleList, x: torch.Tensor, sparse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One ACT block: (halting-distribution-weighted output, ponder cost per sample)."""
        x = units[0].dense(x)
        b, _, h, w = x.shape
        m = x.new_ones(b, h, w)  # m_l: position runs unit l (the first unit always runs)
        c = x.new_zeros(b, h, w)  # c_l: cumulative halting before unit l
        d = None  # the dilated mask of unit i, set with m while closing unit i - 1
        out, ponder = 0.0, x.new_zeros(b, h, w)
        for i, unit in enumerate(units):
            if i > 0:
                x = (sparse_residual if sparse else masked_residual)(unit, x, m, d)
            if unit.halting is not None:
                hal = unit.halting_score(x, None if i == 0 else m, sparse)
                c_next = c + m * hal
                m_next, d = masks_from_logit(units[i + 1].run_gate, units[i + 1].dilate_gate,
                                             LOGIT_SCALE * (1.0 - self.eps - c_next))
                p = m * m_next * hal + (m - m_next) * (1.0 - c)
            else:  # the last unit halts: the remainder
                c_next, m_next = c, torch.zeros_like(m)
                p = m * (1.0 - c)
            out = out + p[:, None] * x
            ponder = ponder + m + (m - m_next) * (1.0 - c)  # N + R
            c, m = c_next, m_next
        return out, ponder.flatten(1).mean(1)

    def _run(self, x: torch.Tensor, sparse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))
        ponder = 0.0
        for units in self.stages:
            x, rho = self._stage(units, x, sparse)
            ponder = ponder + rho
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1)), ponder

    def forward_ponder(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked batch path: (logits, ponder cost ``(B,)`` = sum over stages of the mean over
        positions of N + R)."""
        return self._run(x, sparse=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, sparse=False)[0]

    def forward_conditional(self, x: torch.Tensor) -> torch.Tensor:
        """Really sparse: each gated unit's convolutions and halting conv run on its pondering
        positions only (conv1 on their 3x3 dilation). Eval-mode BN."""
        return self._run(x, sparse=True)[0]

    # -- cost ------------------------------------------------------------------------------


def sact_cifar(depth: int = 20, in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
               mean: tuple[float, ...] = (0.2860,), std: tuple[float, ...] = (0.3530,),
               widths: tuple[int, int, int] = (16, 32, 64), eps: float = EPS) -> SACTResNet:
    """SACT-ResNet (6n+2); the paper's CIFAR models are ResNet-32 and -110."""
    return SACTResNet(depth, in_channels, num_classes, input_size, mean, std, widths, eps)
