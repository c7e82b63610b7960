"""SDN: Shallow-Deep Networks (Kaya et al., ICML 2019), the multi-exit victim DeepSloth (Hong et
al., ICLR 2021) slows down.

A CIFAR-style ResNet 6n+2 backbone (widths 16/32/64, the zoo's ``BasicBlock`` with its
shortcut, :func:`~dynattack.models.resnet.build_gated_resnet`'s module names, so the static
ResNet's weights load into it) with **internal classifiers** (ICs) after some of its blocks:

- **where**: SDN's spread, an IC after the block whose cumulative cost is nearest to 15, 30,
  45, 60, 75 and 90 % of the backbone (:func:`sdn_positions`); on ResNet-20 (9 blocks of equal
  cost) after blocks 1, 3, 4, 5, 7 and 8 (1-based), i.e. 6 ICs plus the final classifier;
- **an IC** is SDN's ``InternalClassifier``: feature reduction by mixed max-average pooling,
  ``alpha max_pool(x) + (1 - alpha) avg_pool(x)`` with a learned ``alpha`` and a kernel
  ``int(size / 4)`` (28x28 and 14x14 maps go to 4x4; 7x7 maps are not reduced), then one
  linear layer. SDN feeds the IC the block's sum before its last ReLU; here it reads the
  block's output (after the ReLU), the same tensor the next block reads;
- **exit rule** (SDN's ``early_exit``, DeepSloth's "network_output" variant): a sample stops at
  the first IC whose max softmax is ``>=`` its threshold (``thresholds``, a buffer: it ships in
  the safetensors file); a sample no IC is confident enough about takes the final classifier.

**The gates.** Exit ``k`` is a :class:`~dynattack.gates.Gate` whose one unit per sample is
"continue past exit k", logit ``q_k = CONFIDENCE_SCALE (threshold_k - max softmax_k)``, strict
(``q > 0`` continues, so a confidence equal to the threshold exits, as SDN's ``>=``). It
``controls`` what runs only when the sample goes on: the blocks up to the next IC and that IC
(the last exit: the remaining blocks and the final classifier), and it is declared
``within`` the exit before it (the later blocks run only where every earlier exit continued).
:func:`dynattack.cost.calibrate` measures the rest; no FLOPs function here. Static: the stem,
the blocks up to the first IC and the first IC. The energy attacks push ``G = sigmoid(q)``
up, i.e. lower every IC's confidence below its threshold: DeepSloth's objective.

``CONFIDENCE_SCALE`` 50: ``q`` moves by 0.5 per 0.01 of confidence, so LGM's
``sigmoid(lam q)`` at ``lam = 1`` is soft over the few hundredths of confidence around the
threshold, where decisions flip, and the sign test is exact (a positive scale keeps the sign of
a float difference).

**Two paths, the same logits and decisions.**

* ``forward``: the masked batch path, used by the attacks and by LGM. Every block and IC runs
  on the whole batch; the output is ``(1 - m_1) o_1 + m_1 ((1 - m_2) o_2 + m_2 (...))`` with
  ``m_k`` the gate masks (0/1 in hard mode, so exactly the exit's logits; ``sigmoid(lam q)`` in
  LGM, through which the gradient reaches the exit decisions). Chosen over a sub-batch forward
  (``examples/subbatch_early_exit.py``) because every gate then runs on every row: the attacks'
  losses and LGM see each exit's confidence for every sample (an exited row of a sub-batch path
  never gets the later exits' gradients, the very ones an energy attack needs to keep a
  sample going past the next exit), and the batch stays dense for training.
* ``forward_conditional``: the real batched early exit. Rows that exit leave the batch; later
  blocks, ICs and gates run only on the rows still going, each later gate called as
  ``gate(q, rows=idx)``. ``FlopCounterMode`` over it is what the trace of either path counts.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..gates import Gate, iter_gates
from .resnet import he_init, BasicBlock, build_gated_resnet, downsample, stage_layout

CONFIDENCE_SCALE = 50.0  # q = scale x (threshold - max softmax)
SDN_FRACTIONS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)  # SDN's IC placement, fractions of the backbone's cost
DEFAULT_THRESHOLD = 0.9


class ResidualUnit(BasicBlock):
    """The zoo's BasicBlock with its shortcut: ``relu(branch(x) + shortcut(x))``; module names
    ``conv1/bn1/conv2/bn2/downsample`` as the other gated families (the static ResNet maps on)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(cin, cout, stride)
        self.downsample = downsample(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(super().forward(x) + shortcut)


def reduction_kernel(size: int) -> int:
    """SDN's ``feature_reduction_formula``: pooling kernel ``int(size / 4)`` (maps of 4 or more)."""
    return int(size / 4) if size >= 4 else 1


class InternalClassifier(nn.Module):
    """SDN's IC: mixed max-average pooling (learned ``alpha``) to ~4x4, then a linear layer."""

    def __init__(self, channels: int, size: int, num_classes: int) -> None:
        super().__init__()
        self.kernel = reduction_kernel(size)
        reduced = size // self.kernel
        self.alpha = nn.Parameter(torch.full((1,), 0.5))
        self.linear = nn.Linear(channels * reduced * reduced, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel > 1:
            x = self.alpha * F.max_pool2d(x, self.kernel) + (1 - self.alpha) * F.avg_pool2d(x, self.kernel)
        return self.linear(x.flatten(1))


def sdn_positions(n_blocks: int, fractions=SDN_FRACTIONS) -> tuple[int, ...]:
    """0-based indices of the blocks an IC follows: for each fraction, the block after which the
    backbone's cumulative cost is nearest to it (blocks of equal cost), deduplicated; never the
    last block (the final classifier is there)."""
    out = []
    for f in fractions:
        j = min(max(round(f * n_blocks) - 1, 0), n_blocks - 2)
        if j not in out:
            out.append(j)
    return tuple(out)


class SDNResNet(nn.Module):
    """A multi-exit ResNet 6n+2: ICs after the blocks ``ic_after`` (0-based), confidence exits.

    ``forward``: masked batch path; ``forward_conditional``: exited rows leave the batch;
    ``exit_logits``: every exit's logits (ICs then final), the training objective's inputs.
    """

    family = "early_exit"

    def __init__(
        self,
        depth: int = 20,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        mean: tuple[float, ...] = (0.2860,),
        std: tuple[float, ...] = (0.3530,),
        widths: tuple[int, int, int] = (16, 32, 64),
        ic_after: tuple[int, ...] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> None:
        super().__init__()
        n = stage_layout(depth)
        build_gated_resnet(self, lambda cin, width, stride, i: ResidualUnit(cin, width, stride), depth=depth,
                           in_channels=in_channels, num_classes=num_classes, input_size=input_size, mean=mean,
                           std=std, widths=widths, sequential=False)
        blocks = self.blocks
        ic_after = tuple(sdn_positions(len(blocks)) if ic_after is None else ic_after)
        if not ic_after or list(ic_after) != sorted(set(ic_after)) or ic_after[0] < 0 or ic_after[-1] >= len(blocks) - 1:
            raise ValueError(f"ic_after must be increasing block indices in 0..{len(blocks) - 2}, got {ic_after}")
        self.ic_after = ic_after
        sizes = []
        size = input_size
        for k in range(3):
            for i in range(n):
                if k > 0 and i == 0:
                    size = (size + 1) // 2  # the strided 3x3 conv, padding 1
                sizes.append((widths[k], size))
        self.ics = nn.ModuleList([InternalClassifier(*sizes[j], num_classes) for j in ic_after])
        self.register_buffer("thresholds", torch.full((len(ic_after),), float(threshold)))
        he_init(self)
        exits, previous = [], None
        for k, j in enumerate(ic_after):
            stop = ic_after[k + 1] if k + 1 < len(ic_after) else len(blocks) - 1
            later = blocks[j + 1:stop + 1] + ([self.ics[k + 1]] if k + 1 < len(ic_after) else [self.fc])
            gate = Gate(controls=later, strict=True, within=previous)
            exits.append(gate)
            previous = gate
        self.exits = nn.ModuleList(exits)
        list(iter_gates(self))  # names the gates "exits.0", "exits.1", ...


    @property
    def stages(self) -> list[nn.ModuleList]:
        return [self.layer1, self.layer2, self.layer3]

    @property
    def blocks(self) -> list[ResidualUnit]:
        return [b for stage in self.stages for b in stage]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(self.normalize(x))))

    def final(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def continue_logit(self, k: int, logits: torch.Tensor) -> torch.Tensor:
        """Go on past exit ``k`` while its IC's max softmax is below the threshold."""
        return CONFIDENCE_SCALE * (self.thresholds[k] - logits.softmax(1).amax(1))

    # -- forward paths ---------------------------------------------------------------------

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, ICs in depth order then the final classifier, every block run."""
        h = self.stem(x)
        outs, k = [], 0
        for j, block in enumerate(self.blocks):
            h = block(h)
            if k < len(self.ic_after) and j == self.ic_after[k]:
                outs.append(self.ics[k](h))
                k += 1
        return outs + [self.final(h)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.exit_logits(x)
        masks = [gate(self.continue_logit(k, o))[:, None] for k, (gate, o) in enumerate(zip(self.exits, outs))]
        out = outs[-1]
        for o, m in zip(reversed(outs[:-1]), reversed(masks)):
            out = (1 - m) * o + m * out
        return out

    def forward_conditional(self, x: torch.Tensor) -> torch.Tensor:
        """Really exits: the rows that stop at an exit leave the batch; later blocks, ICs and
        gates run on the rows still going (hard decisions, or forced gates)."""
        rows = torch.arange(x.shape[0], device=x.device)
        h = self.stem(x)
        out, k = None, 0
        for j, block in enumerate(self.blocks):
            h = block(h)
            if k < len(self.ic_after) and j == self.ic_after[k]:
                o = self.ics[k](h)
                if out is None:
                    out = o.new_zeros(x.shape[0], o.shape[1])
                m = self.exits[k](self.continue_logit(k, o), rows=None if k == 0 else rows)
                go = m.detach() >= 0.5
                out = out.index_copy(0, rows[~go], o[~go])
                rows, h = rows[go], h[go]
                if not rows.numel():
                    return out
                k += 1
        return out.index_copy(0, rows, self.final(h))

    # -- exits -------------------------------------------------------------------------------

    def set_threshold(self, threshold: float | torch.Tensor) -> None:
        """One confidence threshold for every IC (a float), or one per IC."""
        t = torch.as_tensor(threshold, dtype=self.thresholds.dtype, device=self.thresholds.device)
        self.thresholds.copy_(t.expand_as(self.thresholds))


def sdn_cifar(depth: int = 20, in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
              mean: tuple[float, ...] = (0.2860,), std: tuple[float, ...] = (0.3530,),
              widths: tuple[int, int, int] = (16, 32, 64), ic_after: tuple[int, ...] | None = None,
              threshold: float = DEFAULT_THRESHOLD) -> SDNResNet:
    """SDN over a CIFAR-style ResNet 6n+2 (SDN's own CIFAR model is ResNet-56)."""
    return SDNResNet(depth, in_channels, num_classes, input_size, mean, std, widths, ic_after, threshold)
