"""A-ViT: a vision transformer whose tokens halt (Yin et al., "A-ViT: Adaptive Tokens for
Efficient Vision Transformer", CVPR 2022), and its static counterpart.

A small ViT for 28x28x1 images: 4x4 patches (49 patch tokens) plus a class token, width 64,
6 pre-norm blocks of 4-head self-attention and an MLP of ratio 2, a final LayerNorm and a linear
head on the class token. :class:`ViT` is the static network; :class:`AViT` has the same
parameters (the static weights load into it as they are) and halts tokens:

- **halting score** (A-ViT's ``h = sigmoid(gamma x_0 - beta)``): after each block ``l`` but the
  last, token ``k``'s score is ``h_k^l = sigmoid(halt_scale t_{k,0}^l + halt_center)``, with
  ``t_{k,0}^l`` the first channel of the token's representation (the residual stream, before
  any norm), ``halt_scale`` and ``halt_center`` fixed numbers of the architecture (A-ViT's
  ``gate_scale`` and ``gate_center``), no extra parameters;
- **cumulative halting**: ``c_k^l = sum_{j <= l} h_k^j``; the token runs block ``l + 1`` while
  ``c_k^l < 1 - eps`` (``eps`` 0.01, A-ViT's ``mask_token = c_token < 1 - eps``), and once halted
  it keeps its representation and is never processed again. Block 0 runs every token;
- **the class token always runs** (the classifier reads it after the last block). A-ViT lets
  the class token halt too and classifies a halting-weighted average of its states; here it is
  never halted, so the output is the class token after the last block, as the static ViT's.

**The gates.** Before each block ``l >= 1`` a :class:`~dynattack.gates.Gate` with unit shape
``(50,)`` says "token k still runs block l": ``Gate(controls=[block], tokens=1,
within=previous_gate)``. Its logit is ``HALT_LOGIT_SCALE ((1 - eps) - c_k^{l-1})``, strict
(``q > 0``: a token whose cumulative score equals ``1 - eps`` halts, as A-ViT's ``<``); a float
difference has the sign of the exact difference and a positive scale keeps it, so the decision
is exactly A-ViT's rule. The class token's logit is the constant ``CLASS_TOKEN_LOGIT``.
``within`` the previous gate: a halted token stays halted (``c`` only grows, so the raw
decisions agree; the nesting makes the cost model see it). :func:`dynattack.cost.calibrate`
measures each block on 1..4 tokens and fits its FLOPs as ``a n + b n^2`` of the active tokens.

**Two paths, the same logits.**

* ``forward``: the masked batch path (attacks, LGM, training). Every block sees every token;
  the running mask ``m = prod_l gate_l`` leaves halted tokens out of attention as keys (the
  softmax is renormalised over the kept keys, exactly dropping the others when ``m`` is 0/1)
  and keeps their value (``x + m attn``, ``x + m mlp``). In ``lgm`` mode ``m`` is a product of
  ``sigmoid(lam q)``, through which the gradient reaches the halting scores; in ``train`` mode
  the gate's straight-through estimator (hard forward, gradient of ``sigmoid(q)``).
* ``forward_conditional``: the real path, which **drops** halted tokens: each gate decides for
  the whole batch, then each sample runs the block on its active tokens only (gathered, then
  written back); halted tokens are not computed at all. ``FlopCounterMode`` over it is what the
  trace counts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..gates import Gate, iter_gates

HALT_LOGIT_SCALE = 10.0  # gate logit = scale x ((1 - eps) - cumulative halting score)
CLASS_TOKEN_LOGIT = 50.0  # the class token always runs (sigmoid(lam 50) ~ 1 for LGM's slopes)


class Attention(nn.Module):
    """Multi-head self-attention; ``key_mask`` (B, T) weighs each key (0: left out)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5  # (B, H, T, T)
        if key_mask is None:
            w = scores.softmax(-1)
        else:
            m = key_mask[:, None, None, :]
            # max over the kept keys: a left-out key with a larger score cannot underflow the rest
            top = scores.masked_fill(m <= 0, float("-inf")).amax(-1, keepdim=True).detach()
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # no key kept: all 0
            e = (scores - top).exp() * m
            w = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
        return self.proj((w @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block. ``key_mask`` (B, T): tokens that run (1) or are halted (0):
    halted tokens are left out as keys and keep their value."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        if key_mask is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        keep = key_mask[..., None]
        x = x + keep * self.attn(self.norm1(x), key_mask)
        return x + keep * self.mlp(self.norm2(x))


class ViT(nn.Module):
    """The static ViT (no halting): patch embedding, class token, learned positions, blocks,
    final norm, linear head on the class token."""

    family = "vit"

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28, patch: int = 4,
                 dim: int = 64, depth: int = 6, heads: int = 4, mlp_ratio: float = 2.0,
                 mean: tuple[float, ...] = (0.2860,), std: tuple[float, ...] = (0.3530,)) -> None:
        super().__init__()
        if input_size % patch:
            raise ValueError(f"input size {input_size} is not a multiple of the patch size {patch}")
        self.input_shape = (in_channels, input_size, input_size)
        self.num_classes = num_classes
        self.patch, self.dim, self.depth = patch, dim, depth
        self.tokens_per_sample = (input_size // patch) ** 2 + 1
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, self.tokens_per_sample, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init()

    def _init(self) -> None:
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim): class token then the patch tokens (row-major), positions added."""
        patches = F.unfold((x - self.mean) / self.std, self.patch, stride=self.patch).transpose(1, 2)
        t = self.embed(patches)
        return torch.cat([self.cls.expand(len(x), -1, -1), t], 1) + self.pos

    def classify(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(t[:, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        for block in self.blocks:
            t = block(t)
        return self.classify(t)


class AViT(ViT):
    """The token-halting ViT (A-ViT): the static ViT's parameters, a halting gate per block
    after the first (module docstring). ``forward``: masked batch path; ``forward_conditional``:
    drops halted tokens; ``halting_scores``: the per-block scores training reads."""

    family = "token_vit"

    def __init__(self, *args, halt_scale: float = 10.0, halt_center: float = -10.0, eps: float = 0.01,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.halt_scale, self.halt_center, self.eps = float(halt_scale), float(halt_center), float(eps)
        gates, previous = [], None
        for block in self.blocks[1:]:
            previous = Gate(controls=[block], tokens=1, strict=True, within=previous)
            gates.append(previous)
        self.gates = nn.ModuleList(gates)
        list(iter_gates(self))  # names the gates "gates.0", "gates.1", ...

    def halting_score(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T): A-ViT's ``sigmoid(gamma t_0 + beta)`` of each token's first channel."""
        return torch.sigmoid(self.halt_scale * t[..., 0] + self.halt_center)

    def go_on_logit(self, c: torch.Tensor) -> torch.Tensor:
        """(B, T) gate logits from the cumulative halting scores ``c``: positive while
        ``c < 1 - eps``; the class token's is the constant ``CLASS_TOKEN_LOGIT``."""
        q = HALT_LOGIT_SCALE * ((1.0 - self.eps) - c[:, 1:])
        return torch.cat([torch.full_like(c[:, :1], CLASS_TOKEN_LOGIT), q], 1)

    def run(self, x: torch.Tensor, scores: list | None = None) -> torch.Tensor:
        """The masked batch path; ``scores`` (a list) receives each block's (B, T) halting score
        and the running mask before each gated block, as pairs ``(h, m)``."""
        t = self.blocks[0](self.tokens(x))
        c, m = None, None
        for gate, block in zip(self.gates, self.blocks[1:]):
            h = self.halting_score(t)
            c = h if c is None else c + h
            g = gate(self.go_on_logit(c))
            m = g if m is None else m * g  # a halted token stays halted
            if scores is not None:
                scores.append((h, m))
            t = block(t, key_mask=m)
        return self.classify(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def forward_conditional(self, x: torch.Tensor) -> torch.Tensor:
        """Really drops halted tokens (hard decisions, or forced gates): block 0 runs the batch;
        each later gate decides for the whole batch once, then each sample runs the block on its
        active tokens only (gathered, then written back); halted tokens are not computed."""
        t = self.blocks[0](self.tokens(x))
        c, active = None, None
        for gate, block in zip(self.gates, self.blocks[1:]):
            h = self.halting_score(t)
            c = h if c is None else c + h
            go = gate(self.go_on_logit(c)) >= 0.5
            active = go if active is None else active & go
            if bool(active.all()):
                t = block(t)
                continue
            rows = []
            for i in range(len(x)):
                ti, idx = t[i:i + 1], active[i].nonzero().squeeze(1)
                if idx.numel() == ti.shape[1]:
                    ti = block(ti)
                elif idx.numel():  # every unit forced off: the block does not run
                    ti = ti.index_copy(1, idx, block(ti.index_select(1, idx)))
                rows.append(ti)
            t = rows[0] if len(rows) == 1 else torch.cat(rows)
        return self.classify(t)


_FMNIST = {"in_channels": 1, "num_classes": 10, "input_size": 28, "mean": (0.2860,), "std": (0.3530,)}


def vit_fmnist(**kwargs) -> ViT:
    """The static ViT for Fashion-MNIST (patch 4, width 64, 6 blocks, 4 heads, MLP ratio 2)."""
    return ViT(**{**_FMNIST, **kwargs})


def avit_fmnist(**kwargs) -> AViT:
    """The token-halting A-ViT for Fashion-MNIST, same architecture as :func:`vit_fmnist`."""
    return AViT(**{**_FMNIST, **kwargs})
