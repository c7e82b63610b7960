"""Tiny hand-made gated victims for attack tests.

Gate logits are simple known functions of the input (means, single pixels), computed without
any matmul or convolution, so FlopCounterMode charges nothing to them and every unit cost can be
counted by hand: a 3x3 convolution with padding 1 on an HxW map costs 2 * Cout * Cin * 9 * H * W
FLOPs, a Linear 2 * in * out. Weights come from a fixed seed without touching the global RNG.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from dynattack.gates import Gate


def conv_flops(cin: int, cout: int, h: int, w: int) -> int:
    return 2 * cout * cin * 9 * h * w


@contextlib.contextmanager
def _seeded(seed: int):
    """Build weights from ``seed`` without changing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class ToyGated(nn.Module):
    """Input (1, 4, 4); scalar gates (unit shape ``()``), sigmoid value, tau 0.5.

    * ``gate_mean``:   q = 8 (mean(x) - 0.5)   controls ``conv_a`` (1 -> 8 channels)
    * ``gate_corner``: q = 8 (x[0, 0, 0] - 0.7) controls ``conv_b`` (1 -> 4 channels)
    * ``gate_dead`` (``dead_gate=True``): q = -1 whatever the input, controls ``conv_c``
      (1 -> 2 channels): no attack can switch it on.
    """

    input_shape = (1, 4, 4)
    COST = {"gate_mean": conv_flops(1, 8, 4, 4), "gate_corner": conv_flops(1, 4, 4, 4), "gate_dead": conv_flops(1, 2, 4, 4)}

    def __init__(self, dead_gate: bool = False) -> None:
        super().__init__()
        with _seeded(0):
            self.conv_a = nn.Conv2d(1, 8, 3, padding=1)
            self.conv_b = nn.Conv2d(1, 4, 3, padding=1)
            self.conv_c = nn.Conv2d(1, 2, 3, padding=1) if dead_gate else None
            channels = 8 + 4 + (2 if dead_gate else 0)
            self.head = nn.Linear(channels * 16, 3)
        self.gate_mean = Gate(controls=[self.conv_a])
        self.gate_corner = Gate(controls=[self.conv_b])
        self.gate_dead = Gate(controls=[self.conv_c]) if dead_gate else None
        self.static_flops = 2 * channels * 16 * 3

    def forward(self, x):
        b = x.shape[0]
        q_mean = 8 * (x.mean((1, 2, 3)) - 0.5)
        q_corner = 8 * (x[:, 0, 0, 0] - 0.7)
        feats = [
            self.gate_mean(q_mean).view(b, 1, 1, 1) * self.conv_a(x),
            self.gate_corner(q_corner).view(b, 1, 1, 1) * self.conv_b(x),
        ]
        if self.gate_dead is not None:
            q_dead = torch.full((b,), -1.0, device=x.device)
            feats.append(self.gate_dead(q_dead).view(b, 1, 1, 1) * self.conv_c(x))
        return self.head(torch.cat(feats, 1).flatten(1))


class ToyShapes(nn.Module):
    """Input (2, 4, 4); a channel gate of unit shape ``(4,)`` and a spatial gate of unit shape
    ``(4, 4)``.

    * ``gate_ch``: q_c = 8 (mean(x) - theta_c), theta = (0.35, 0.4, 0.45, 0.5); masks the output
      channels of ``conv_ch`` (2 -> 4 channels): one unit = one channel.
    * ``gate_sp``: q_hw = 8 (x[1, h, w] - 0.55); masks the positions of ``conv_sp``
      (2 -> 3 channels): one unit = one position.
    """

    input_shape = (2, 4, 4)
    UNIT_COST = {"gate_ch": conv_flops(2, 4, 4, 4) / 4, "gate_sp": conv_flops(2, 3, 4, 4) / 16}

    def __init__(self) -> None:
        super().__init__()
        with _seeded(1):
            self.conv_ch = nn.Conv2d(2, 4, 3, padding=1)
            self.conv_sp = nn.Conv2d(2, 3, 3, padding=1)
            self.head = nn.Linear(7 * 16, 3)
        self.register_buffer("theta", torch.tensor([0.35, 0.4, 0.45, 0.5]))
        self.gate_ch = Gate(controls=[self.conv_ch])
        self.gate_sp = Gate(controls=[self.conv_sp])

    def forward(self, x):
        q_ch = 8 * (x.mean((1, 2, 3))[:, None] - self.theta)  # (B, 4)
        q_sp = 8 * (x[:, 1] - 0.55)  # (B, 4, 4)
        h = torch.cat([
            self.gate_ch(q_ch)[:, :, None, None] * self.conv_ch(x),
            self.gate_sp(q_sp)[:, None] * self.conv_sp(x),
        ], 1)
        return self.head(h.flatten(1))


class ToyConflict(nn.Module):
    """Input (1, 2, 2), pixels p0..p3 in reading order; two scalar gates whose gradients conflict.

    * ``gate_a``: q = 20 (p0 - p1) + 1                      (on at p = 0.5)
    * ``gate_b``: q = 20 (p1 - p0) + 20 (p2 - 0.5) - 0.5    (off at p = 0.5)

    Near p = 0.5 the gradient switching ``gate_b`` on, (-1, 1, 1, 0), has an obtuse angle with the
    one keeping ``gate_a`` on, (1, -1, 0, 0); its component orthogonal to the latter, (0, 0, 1, 0),
    switches ``gate_b`` on through p2 alone without touching ``gate_a``.
    """

    input_shape = (1, 2, 2)

    def __init__(self) -> None:
        super().__init__()
        with _seeded(2):
            self.conv_a = nn.Conv2d(1, 2, 3, padding=1)
            self.conv_b = nn.Conv2d(1, 3, 3, padding=1)
            self.head = nn.Linear(5 * 4, 2)
        self.gate_a = Gate(controls=[self.conv_a])
        self.gate_b = Gate(controls=[self.conv_b])

    def forward(self, x):
        b = x.shape[0]
        p = x.flatten(1)
        q_a = 20 * (p[:, 0] - p[:, 1]) + 1
        q_b = 20 * (p[:, 1] - p[:, 0]) + 20 * (p[:, 2] - 0.5) - 0.5
        h = torch.cat([
            self.gate_a(q_a).view(b, 1, 1, 1) * self.conv_a(x),
            self.gate_b(q_b).view(b, 1, 1, 1) * self.conv_b(x),
        ], 1)
        return self.head(h.flatten(1))


def toy_images(model: nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    """Clean inputs on which the toy's gates (but the always-on ones) are off."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, *model.input_shape)
    if isinstance(model, ToyConflict):
        return 0.5 + 0.01 * (torch.rand(shape, generator=g) - 0.5)
    if isinstance(model, ToyShapes):
        return 0.1 + 0.3 * torch.rand(shape, generator=g)
    x = 0.4 * torch.rand(shape, generator=g)
    x[:, 0, 1, 1] = 0.0  # exact 0 and 1 pixels: the tanh map must keep them exact and movable
    x[:, 0, 2, 2] = torch.tensor([0.0, 1.0] * (n // 2) + [1.0] * (n % 2))[:n]
    return x
