"""Routing: a mixture of experts choosing the top 2 of 4 experts for each token.

Tokens are the 16 4x4 patches of the image. The router's gate has one unit per (token, expert)
pair, unit shape ``(16, 4)``: "this token runs through this expert". Its logit is the router
score less the midpoint between the 2nd and 3rd best scores of the token, so exactly the top 2
are on (``q >= 0``) and no logit sits at the threshold. ``Gate(experts=[...])`` declares that
expert ``e`` is decided by the units ``[..., e]``: it costs its FLOPs x the tokens routed to it /
16. The experts have different widths, so which expert runs matters: energy attacks push the
routing towards the expensive experts. "All on" for a router is every token through every
expert (the forced-on network); top-2 routing cannot reach it, so GradAuto and ILFO report no
all-on success, only FLOPs won back.

``forward`` is the masked batch path (every expert on every token, weighted by the mask);
``forward_conditional`` runs each expert on its routed tokens only.

    python examples/moe_topk.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynattack.gates import Gate

from _common import run_example

TOP_K, HIDDEN = 2, (8, 16, 32, 64)


class TopKMoE(nn.Module):
    input_shape = (3, 16, 16)
    num_classes = 10

    def __init__(self, seed: int = 0, dim: int = 16) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Linear(3 * 16, dim)
            self.router = nn.Linear(dim, len(HIDDEN))
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, h), nn.ReLU(), nn.Linear(h, dim)) for h in HIDDEN)
            self.head = nn.Linear(dim, 10)
        self.route = Gate(experts=list(self.experts))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 16, dim)``: the embedded 4x4 patches."""
        patches = F.unfold(x, 4, stride=4).transpose(1, 2)  # (B, 16, 48)
        return self.embed(patches)

    def route_logit(self, t: torch.Tensor) -> torch.Tensor:
        """Router score less the midpoint of the k-th and (k+1)-th best: >= 0 on the top k."""
        s = self.router(t)
        top = s.topk(TOP_K + 1, dim=-1).values
        return s - (top[..., TOP_K - 1:TOP_K] + top[..., TOP_K:]) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        m = self.route(self.route_logit(t))  # (B, 16, E)
        h = t + sum(m[..., e:e + 1] * expert(t) for e, expert in enumerate(self.experts))
        return self.head(h.mean(1))

    def forward_conditional(self, x: torch.Tensor) -> torch.Tensor:
        """Each expert runs on the tokens routed to it only."""
        t = self.tokens(x)
        m = self.route(self.route_logit(t))
        h = t.reshape(-1, t.shape[-1])
        out = h.clone()
        for e, expert in enumerate(self.experts):
            rows = (m[..., e].reshape(-1) >= 0.5).nonzero().squeeze(1)
            if rows.numel():
                out = out.index_add(0, rows, m[..., e].reshape(-1)[rows, None] * expert(h[rows]))
        return self.head(out.reshape(t.shape).mean(1))


def main(n: int = 16, steps: int = 30, attacks: bool = True) -> dict:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model = TopKMoE().eval()
    images = torch.rand((n, *model.input_shape), generator=torch.Generator().manual_seed(0))
    return run_example("top-2 routing among 4 experts", model, images, steps, attacks)


if __name__ == "__main__":
    main()
