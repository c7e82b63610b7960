"""Helpers shared by the victim-family tests: varied BN statistics and random tensors in the
official checkpoint layouts."""
from __future__ import annotations

import math

import torch
from torch import nn


def randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Random BN affine and running statistics: makes features, hence gate logits, vary."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
                m.running_mean.normal_(0.0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)


class RandomStateDict(dict):
    """A state_dict filled layer by layer with random tensors of the right shapes."""

    def __init__(self, gen: torch.Generator, batches_tracked: bool) -> None:
        super().__init__()
        self.gen, self.batches_tracked = gen, batches_tracked

    def conv(self, name: str, cin: int, cout: int, k: int, bias: bool = False) -> None:
        self[name + ".weight"] = torch.randn(cout, cin, k, k, generator=self.gen) * math.sqrt(2.0 / (k * k * cout))
        if bias:
            self[name + ".bias"] = torch.randn(cout, generator=self.gen) * 0.1

    def bn(self, name: str, c: int) -> None:
        self[name + ".weight"] = torch.rand(c, generator=self.gen) + 0.5
        self[name + ".bias"] = torch.randn(c, generator=self.gen) * 0.2
        self[name + ".running_mean"] = torch.randn(c, generator=self.gen) * 0.2
        self[name + ".running_var"] = torch.rand(c, generator=self.gen) + 0.5
        if self.batches_tracked:
            self[name + ".num_batches_tracked"] = torch.tensor(1000)
