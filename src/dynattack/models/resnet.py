"""Static CIFAR-style ResNet 6n+2 (no gates): the pipeline's proof and the accuracy attacks'
static baseline. Its pieces (normalisation, BasicBlock) are shared by the gated families."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Normalize(nn.Module):
    """Inputs arrive in [0, 1]; normalisation lives inside the victim (DESIGN.md)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN; the residual branch only (the caller adds the shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


def downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    """1x1 projection shortcut where shape changes (SkipNet's `group{g}_ds{i}` layout)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def stage_layout(depth: int) -> int:
    """Blocks per stage of a 6n+2 ResNet."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR-style ResNet depth must be 6n+2 (8, 14, 20, 38, ...), got {depth}")
    return (depth - 2) // 6


def build_gated_resnet(model: nn.Module, make_block, *, depth: int, in_channels: int, num_classes: int,
                       input_size: int, mean, std, widths, sequential: bool = True) -> int:
    """Give ``model`` the layout the gated families share: ``normalize``, stem ``conv1``/``bn1``,
    stages ``layer1..3`` of ``make_block(cin, width, stride, index_in_stage)`` (an ``nn.Sequential``,
    or an ``nn.ModuleList`` when ``sequential`` is False) and the classifier ``fc``; these names
    map onto the static ResNet's (``train.common.static_backbone``). Returns the blocks per stage."""
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values, one per input channel")
    n = stage_layout(depth)
    model.depth = depth
    model.input_shape = (in_channels, input_size, input_size)
    model.num_classes = num_classes
    model.normalize = Normalize(mean, std)
    model.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
    model.bn1 = nn.BatchNorm2d(widths[0])
    cin = widths[0]
    for k, width in enumerate(widths, start=1):
        blocks = []
        for i in range(n):
            blocks.append(make_block(cin, width, 2 if (k > 1 and i == 0) else 1, i))
            cin = width
        setattr(model, f"layer{k}", nn.Sequential(*blocks) if sequential else nn.ModuleList(blocks))
    model.fc = nn.Linear(cin, num_classes)
    return n



def he_init(model: nn.Module) -> None:
    """The official initialisation of every ResNet-based family: He-normal convs over fan-out,
    unit BatchNorm (modules that initialise themselves afterwards, e.g. gate heads, keep theirs)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

class ResNet(nn.Module):
    """ResNet 6n+2 with widths 16/32/64 for any number of input channels and input size."""

    family = "resnet"

    def __init__(
        self,
        depth: int = 20,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        mean: tuple[float, ...] = (0.2860,),
        std: tuple[float, ...] = (0.3530,),
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        n = stage_layout(depth)
        self.input_shape = (in_channels, input_size, input_size)
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, shortcuts = [], []
        cin = widths[0]
        for g, width in enumerate(widths):
            for i in range(n):
                stride = 2 if (g > 0 and i == 0) else 1
                blocks.append(BasicBlock(cin, width, stride))
                shortcuts.append(downsample(cin, width, stride) or nn.Identity())
                cin = width
        self.blocks = nn.ModuleList(blocks)
        self.shortcuts = nn.ModuleList(shortcuts)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))
        for block, shortcut in zip(self.blocks, self.shortcuts):
            x = F.relu(block(x) + shortcut(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
