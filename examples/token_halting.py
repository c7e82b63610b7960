"""Token halting in a small vision transformer (A-ViT style): tokens stop being processed.

The image is cut into 16 4x4 patches; with a class token, 17 tokens go through 3 transformer
blocks. Before blocks 2 and 3 a halting gate decides, per token, whether it goes on (unit shape
``(17,)``); a halted token keeps its representation and is not processed again, so block 3's gate
is declared inside block 2's (``within=``). The class token always goes on (a constant logit).

A block run on n tokens costs ``a n + b n^2`` FLOPs (attention compares every pair of tokens),
so the cost is not split evenly over the units: ``Gate(controls=[block], tokens=1)`` says the
gate's units are the tokens on dimension 1 of the block's input, and ``dynattack.cost.calibrate``
measures the block on 1, 2, 3, 4 tokens with ``FlopCounterMode`` and fits the exact polynomial
(checked at half and all of the tokens). Nothing else is written for the cost.

``forward`` is the masked batch path: every block sees every token, halted ones are masked out of
attention as keys and keep their value. ``forward_conditional`` really drops tokens: each sample
runs each block on its active tokens only.

    python examples/token_halting.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynattack.gates import Gate, Trace, gate_mode

from _common import run_example, threshold_at_gap

DIM, HEADS, PATCH = 16, 2, 4
HALT_SCALE = 10.0  # go-on logit = scale x (score - threshold)
CLASS_TOKEN_LOGIT = 10.0  # the class token always goes on


class Block(nn.Module):
    """Pre-norm transformer block; ``key_mask`` (B, T) leaves masked tokens out as keys."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.qkv, self.proj = nn.LayerNorm(DIM), nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.norm2, self.mlp = nn.LayerNorm(DIM), nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(),
                                                                nn.Linear(2 * DIM, DIM))

    def attention(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (DIM // HEADS) ** 0.5
        w = (scores - scores.amax(-1, keepdim=True)).exp()
        if key_mask is not None:  # renormalised over the kept keys: exactly dropping the others when 0/1
            w = w * key_mask[:, None, None, :]
        w = w / w.sum(-1, keepdim=True)
        return self.proj((w @ v).transpose(1, 2).reshape(b, t, DIM))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = 1.0 if key_mask is None else key_mask[..., None]
        x = x + keep * self.attention(self.norm1(x), key_mask)
        return x + keep * self.mlp(self.norm2(x))


class TokenHaltingViT(nn.Module):
    input_shape = (3, 16, 16)
    num_classes = 10

    def __init__(self, seed: int = 0, depth: int = 3) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Linear(3 * PATCH * PATCH, DIM)
            self.cls = nn.Parameter(torch.randn(1, 1, DIM))
            self.pos = nn.Parameter(0.1 * torch.randn(1, 17, DIM))
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.halt = nn.ModuleList(nn.Linear(DIM, 1) for _ in range(depth - 1))  # before blocks 2..
            self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 10)
        self.register_buffer("thresholds", torch.zeros(depth - 1))
        gates, enclosing = [], None
        for block in self.blocks[1:]:
            enclosing = Gate(controls=[block], tokens=1, within=enclosing)
            gates.append(enclosing)
        self.gates = nn.ModuleList(gates)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(x, PATCH, stride=PATCH).transpose(1, 2)  # (B, 16, 48)
        t = self.embed(patches)
        return torch.cat([self.cls.expand(len(x), -1, -1), t], 1) + self.pos

    def go_on_logit(self, k: int, t: torch.Tensor) -> torch.Tensor:
        """(B, 17): tokens whose halting score is above gate k's threshold go on; the class token always."""
        q = HALT_SCALE * (self.halt[k](t).squeeze(-1) - self.thresholds[k])
        return torch.cat([torch.full_like(q[:, :1], CLASS_TOKEN_LOGIT), q[:, 1:]], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.blocks[0](self.tokens(x))
        active = None
        for k, block in enumerate(self.blocks[1:]):
            m = self.gates[k](self.go_on_logit(k, t))
            active = m if active is None else active * m  # a halted token stays halted
            t = block(t, key_mask=active)
        return self.head(self.norm(t[:, 0]))

    def forward_conditional(self, x: torch.Tensor) -> torch.Tensor:
        """Really drops tokens: each sample runs each block on its active tokens only."""
        out = []
        for xi in x.split(1):
            t = self.blocks[0](self.tokens(xi))
            active = torch.ones(t.shape[1], dtype=torch.bool)
            for k, block in enumerate(self.blocks[1:]):
                active = active & (self.gates[k](self.go_on_logit(k, t))[0] >= 0.5)
                idx = active.nonzero().squeeze(1)
                if idx.numel():  # every gate forced off: nothing goes on
                    t = t.index_copy(1, idx, block(t[:, idx]))
            out.append(self.head(self.norm(t[:, 0])))
        return torch.cat(out)

    @torch.no_grad()
    def fit_thresholds(self, images: torch.Tensor) -> None:
        """Thresholds that let about half the patch tokens go on at each gate (at a gap of scores)."""
        for k in range(len(self.thresholds)):
            with gate_mode(self, "hard"), Trace() as trace:
                self(images)
            scores = trace.events[k].logit[:, 1:] / HALT_SCALE + self.thresholds[k]
            self.thresholds[k] = threshold_at_gap(scores)


def main(n: int = 16, steps: int = 30, attacks: bool = True) -> dict:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model = TokenHaltingViT().eval()
    images = torch.rand((n, *model.input_shape), generator=torch.Generator().manual_seed(0))
    model.fit_thresholds(images)
    return run_example("token halting, 17 tokens x 3 blocks", model, images, steps, attacks)


if __name__ == "__main__":
    main()
