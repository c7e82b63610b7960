"""Mixture of experts: an MLP-Mixer whose channel-mixing MLPs are sparse mixtures of experts
(Sparse-MLP / V-MoE style) with **dynamic top-p routing** (Huang et al., 2024, "Harder tasks
need more experts: dynamic routing in MoE models").

**The network.** The image is cut into 4x4 patches (28x28 -> 7x7 = 49 tokens), each embedded to
``dim`` channels; then ``depth`` Mixer blocks, each ``x + token_mlp(LN(x)^T)^T`` (token mixing:
one MLP over the 49 positions, shared by the channels) and ``x + channel(LN(x))`` (channel
mixing); then LayerNorm, the mean over tokens and a linear classifier. In the dynamic victim the
channel-mixing MLP of every block (``moe_every`` 1) is a :class:`MoELayer`: a linear router
``dim -> E`` and ``E`` experts, each an MLP ``dim -> hidden -> dim`` (GELU). The static
counterpart (:func:`mixer_fmnist`) is the same Mixer with one dense channel MLP per block of
hidden width ``E x hidden``: exactly the FLOPs of the MoE with every expert on for every token
(the dynamic victim's all-on network, router aside), and its accuracy is what routing must keep.

**Top-p routing.** Per token, the router's probabilities ``P = softmax(router(h))`` are ranked
(descending; ties: the lower expert index ranks higher, a stable sort) and experts are taken in
that order until their cumulative probability reaches ``p`` (at least one). Expert ``e`` runs on
token ``t`` iff the probability mass ranked strictly above it is below ``p``:
``mass_above(t, e) < p``. Its logit is ``q = ROUTE_SCALE (p - mass_above)``, decided strictly
(``q > 0``: a mass exactly ``p`` stops; the sign of a float difference is exact and a positive
scale keeps it). The top expert has ``mass_above = 0``: always on. The expert output is weighted
by its router probability (not renormalised over the chosen experts, as V-MoE):
``channel(h) = sum_e m_e P_e expert_e(h)``, ``m`` the gate's mask (0/1 hard; ``sigmoid(lam q)``
in LGM, so the gradient reaches the routing through ``q`` as well as through ``P``).

**All on** is every expert for every token: the last-ranked expert runs iff the other ``E - 1``
hold less than ``p``, i.e. iff the smallest probability exceeds ``1 - p``. With ``E = 4`` this is
reachable only for ``p > 0.75`` (uniform probabilities give 3/4 above the last): the victim uses
``p = 0.8``, so all-on is reached where each token's router is close to indifferent (every
probability above 0.2). An energy attack wins FLOPs by flattening the routers.

**The gates.** One :class:`~dynattack.gates.Gate` per MoE layer, units ``(T, E)``,
``Gate(experts=[...])``: expert ``e`` costs its FLOPs x its routed tokens / T
(:func:`dynattack.cost.calibrate` measures them; no FLOPs function here). Router, token mixing,
embedding and head are static.

**Two paths, the same logits.**

* ``forward``: the masked batch path (every expert on every token, weighted by ``m P``), used by
  training, the attacks and LGM;
* ``forward_conditional``: the real path: each expert runs only on the (sample, token) rows
  routed to it (gather with ``index_select``, scatter with ``index_add``); an expert no token
  chose does not run. ``FlopCounterMode`` over it is what the trace of either path counts.

:func:`load_imbalance` measures the experts' load (max expert load / mean load over a batch, per
MoE layer) from a trace: an energy attack that flattens routing also evens or skews the load.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..gates import Gate, Trace, iter_gates
from .resnet import Normalize

ROUTE_SCALE = 20.0  # q = scale x (p - mass ranked above): 1 unit of q per 0.05 of probability mass
TOP_P = 0.8


def mass_above(prob: torch.Tensor) -> torch.Tensor:
    """``(..., E)``: for each expert, the router probability mass ranked strictly above it
    (descending order; ties: the lower index ranks higher), summed in rank order."""
    order = prob.argsort(dim=-1, descending=True, stable=True)
    ranked = prob.gather(-1, order)
    above = torch.cat([torch.zeros_like(ranked[..., :1]), ranked[..., :-1].cumsum(-1)], dim=-1)
    return torch.zeros_like(prob).scatter(-1, order, above)


def top_p_logit(prob: torch.Tensor, p: float, scale: float = ROUTE_SCALE) -> torch.Tensor:
    """``q = scale (p - mass_above)``: > 0 exactly on the experts top-p routing takes."""
    return scale * (p - mass_above(prob))


class MLP(nn.Module):
    """``fc2(gelu(fc1(x)))``."""

    def __init__(self, cin: int, hidden: int, cout: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cin, hidden)
        self.fc2 = nn.Linear(hidden, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MoELayer(nn.Module):
    """A channel-mixing mixture of experts with top-p routing (see the module docstring)."""

    def __init__(self, dim: int, hidden: int, experts: int, p: float = TOP_P, scale: float = ROUTE_SCALE) -> None:
        super().__init__()
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top-p routing needs 0 < p <= 1, got {p}")
        self.p, self.scale = float(p), float(scale)
        self.router = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(MLP(dim, hidden, dim) for _ in range(experts))
        self.route = Gate(experts=list(self.experts), strict=True)
        self.last_prob: torch.Tensor | None = None  # (B, T, E) of the last forward: the training losses read it

    def routing(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(router probabilities, gate mask), each ``(B, T, E)``."""
        prob = self.router(h).softmax(-1)
        self.last_prob = prob
        return prob, self.route(top_p_logit(prob, self.p, self.scale))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        prob, m = self.routing(h)
        w = m * prob
        return sum(w[..., e:e + 1] * expert(h) for e, expert in enumerate(self.experts))

    def forward_conditional(self, h: torch.Tensor) -> torch.Tensor:
        """Each expert on its routed (sample, token) rows only."""
        prob, m = self.routing(h)
        w = (m * prob).reshape(-1, prob.shape[-1])
        on = m.detach().reshape(-1, prob.shape[-1]) >= 0.5
        flat = h.reshape(-1, h.shape[-1])
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows = on[:, e].nonzero().squeeze(1)
            if rows.numel():
                out = out.index_add(0, rows, w[rows, e:e + 1] * expert(flat.index_select(0, rows)))
        return out.reshape(h.shape)


class MixerBlock(nn.Module):
    """``x + token_mlp(LN(x)^T)^T``, then ``x + channel(LN(x))`` (a dense MLP or a MoE layer)."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel: nn.Module) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = MLP(tokens, token_hidden, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.channel = channel

    def forward(self, x: torch.Tensor, real: bool = False) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        h = self.norm2(x)
        if real and isinstance(self.channel, MoELayer):
            return x + self.channel.forward_conditional(h)
        return x + self.channel(h)


class MLPMixer(nn.Module):
    """MLP-Mixer for small images; ``experts`` > 0: MoE channel mixing in every ``moe_every``-th
    block (from the first), else dense channel MLPs of hidden ``channel_hidden``."""

    family = "moe"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        mean: tuple[float, ...] = (0.2860,),
        std: tuple[float, ...] = (0.3530,),
        patch: int = 4,
        dim: int = 64,
        depth: int = 6,
        token_hidden: int = 64,
        channel_hidden: int = 512,
        experts: int = 0,
        expert_hidden: int = 128,
        moe_every: int = 1,
        top_p: float = TOP_P,
    ) -> None:
        super().__init__()
        if input_size % patch:
            raise ValueError(f"input size {input_size} is not a multiple of the patch {patch}")
        self.input_shape = (in_channels, input_size, input_size)
        self.num_classes = num_classes
        self.tokens = (input_size // patch) ** 2
        self.normalize = Normalize(mean, std)
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        blocks = []
        for i in range(depth):
            if experts and i % moe_every == 0:
                channel = MoELayer(dim, expert_hidden, experts, top_p)
            else:
                channel = MLP(dim, channel_hidden, dim)
            blocks.append(MixerBlock(self.tokens, dim, token_hidden, channel))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        list(iter_gates(self))  # names the gates "blocks.0.channel.route", ...

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.channel for b in self.blocks if isinstance(b.channel, MoELayer)]

    def _run(self, x: torch.Tensor, real: bool) -> torch.Tensor:
        h = self.embed(self.normalize(x)).flatten(2).transpose(1, 2)  # (B, T, dim)
        for block in self.blocks:
            h = block(h, real)
        return self.head(self.norm(h).mean(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, real=False)

    def forward_conditional(self, x: torch.Tensor) -> torch.Tensor:
        """Each expert runs on the tokens routed to it only (hard decisions, or forced gates)."""
        return self._run(x, real=True)


def load_imbalance(trace: Trace, model: MLPMixer | None = None) -> dict[str, float]:
    """Expert load imbalance of a traced batch: per MoE gate, ``max_e load_e / mean_e load_e``
    with ``load_e`` the (sample, token) pairs routed to expert ``e`` over the batch (1: every
    expert equally loaded; ``E``: one expert takes everything). Returns ``{gate name: ratio}``
    plus ``"mean"`` (over the gates) and ``"max"``. ``model``: only its gates count (default:
    every event whose units are ``(T, E)``)."""
    names = None if model is None else {layer.route.name for layer in model.moe_layers}
    out = {}
    for e in trace:
        if (names is None and e.decision.dim() == 3) or (names is not None and e.name in names):
            load = e.decision.reshape(-1, e.decision.shape[-1]).sum(0).double()
            out[e.name] = float(load.max() / load.mean())
    if not out:
        raise ValueError("the trace holds no routing gate")
    values = list(out.values())
    return {**out, "mean": sum(values) / len(values), "max": max(values)}


def experts_per_token(trace: Trace, model: MLPMixer | None = None) -> float:
    """Mean number of experts a token ran through, over the batch and the MoE layers."""
    names = None if model is None else {layer.route.name for layer in model.moe_layers}
    counts = [e.decision.sum(-1).double().mean() for e in trace
              if (names is None and e.decision.dim() == 3) or (names is not None and e.name in names)]
    return float(torch.stack(counts).mean())


def moe_mixer_fmnist(**kw) -> MLPMixer:
    """The dynamic victim: every Mixer block's channel MLP a 4-expert top-p MoE."""
    return MLPMixer(**{"experts": 4, **kw})


def mixer_fmnist(**kw) -> MLPMixer:
    """The static counterpart: the same Mixer, dense channel MLPs of the 4 experts' total width."""
    kw.setdefault("channel_hidden", 4 * kw.pop("expert_hidden", 128))
    return MLPMixer(**{**kw, "experts": 0})
