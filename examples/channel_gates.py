"""Dynamic width: channel gates on consecutive convolutions (ManiDP-style saliency per layer).

Layer ``k``'s gate keeps some output channels of ``conv{k}``: it ``controls`` that conv (its
output channels) and ``feeds`` the next one (its input channels: the next conv reads only the
kept channels). A conv between two channel gates so costs ``FLOPs x active-in / C_in x
active-out / C_out``; the last gate feeds the classifier. Declared once here, measured by
``dynattack.cost.calibrate``, no ``executed_flops`` of our own.

``forward`` is the masked batch path; ``forward_conditional`` slices every weight to the kept
input and output channels of each sample.

    python examples/channel_gates.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynattack.gates import Gate

from _common import run_example, threshold_at_gap

WIDTHS = (3, 16, 24, 32)
STRIDES = (1, 2, 2)


class ChannelGatedNet(nn.Module):
    input_shape = (3, 16, 16)
    num_classes = 10

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pairs = list(zip(WIDTHS, WIDTHS[1:]))
            self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, s, 1, bias=False) for (a, b), s in zip(pairs, STRIDES))
            self.saliency = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)  # channel logits from GAP
            self.head = nn.Linear(WIDTHS[-1], 10)
        for k, width in enumerate(WIDTHS[1:]):
            self.register_buffer(f"theta{k}", torch.zeros(width))
        readers = list(self.convs[1:]) + [self.head]
        self.gates = nn.ModuleList(Gate(controls=[conv], feeds=[reader]) for conv, reader in zip(self.convs, readers))

    def channel_logit(self, k: int, pooled: torch.Tensor) -> torch.Tensor:
        return self.saliency[k](pooled) - getattr(self, f"theta{k}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for k, (conv, gate) in enumerate(zip(self.convs, self.gates)):
            m = gate(self.channel_logit(k, h.mean((2, 3))))
            h = F.relu(conv(h)) * m[:, :, None, None]
        return self.head(h.mean((2, 3)))

    def forward_conditional(self, x: torch.Tensor) -> torch.Tensor:
        """Really pruned: per sample, each conv computes only its kept output channels from the
        kept input channels (weights sliced); the classifier reads the kept channels only."""
        out = []
        for xi in x.split(1):
            h, kept_in = xi, torch.arange(WIDTHS[0])
            for k, (conv, gate) in enumerate(zip(self.convs, self.gates)):
                pooled = xi.new_zeros(1, WIDTHS[k]).index_copy(1, kept_in, h.mean((2, 3)))
                kept = (gate(self.channel_logit(k, pooled))[0] >= 0.5).nonzero().squeeze(1)
                size = (h.shape[2] - 1) // STRIDES[k] + 1
                if kept_in.numel() and kept.numel():
                    h = F.relu(F.conv2d(h, conv.weight[kept][:, kept_in], None, STRIDES[k], 1))
                else:  # no input or no output channel: nothing to compute
                    h = xi.new_zeros(1, kept.numel(), size, size)
                kept_in = kept
            out.append(F.linear(h.mean((2, 3)), self.head.weight[:, kept_in], self.head.bias))
        return torch.cat(out)

    @torch.no_grad()
    def fit_thresholds(self, images: torch.Tensor) -> None:
        """Per channel, a threshold keeping it on about half the images, layer after layer."""
        h = images
        for k, (conv, gate) in enumerate(zip(self.convs, self.gates)):
            s = self.saliency[k](h.mean((2, 3)))
            setattr(self, f"theta{k}", torch.tensor([threshold_at_gap(s[:, c]) for c in range(s.shape[1])]))
            h = F.relu(conv(h)) * (self.channel_logit(k, h.mean((2, 3))) >= 0)[:, :, None, None]


def main(n: int = 16, steps: int = 30, attacks: bool = True) -> dict:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model = ChannelGatedNet().eval()
    images = torch.rand((n, *model.input_shape), generator=torch.Generator().manual_seed(0))
    model.fit_thresholds(images)
    return run_example("channel gates on consecutive convs", model, images, steps, attacks)


if __name__ == "__main__":
    main()
