"""Helpers shared by the victim-family tests: varied BN statistics, random tensors in the
official checkpoint layouts, a traced hard forward and the batch-independence check."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynattack import cost
from dynattack.gates import Trace, gate_mode


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


def hard_run(model: nn.Module, x: torch.Tensor):
    """(logits, trace) of the hard network on ``x``, no gradient."""
    with torch.no_grad(), Trace() as trace:
        out = model(x)
    return out, trace


def assert_decisions_batch_independent(model: nn.Module, x: torch.Tensor, rtol: float = 1e-5) -> None:
    """Each sample's hard decisions are the same alone, in its batch and among other inputs, and
    its gate logits agree within float tolerance."""
    _, trace = hard_run(model, x)
    decisions, q = trace.flat("decision"), trace.flat("logit")
    others = torch.rand(3, *x.shape[1:], generator=torch.Generator().manual_seed(7))
    for i in range(len(x)):
        _, alone = hard_run(model, x[i:i + 1])
        _, mixed = hard_run(model, torch.cat([others, x[i:i + 1]]))
        assert torch.equal(alone.flat("decision")[0], decisions[i])
        assert torch.equal(mixed.flat("decision")[-1], decisions[i])
        torch.testing.assert_close(alone.flat("logit")[0], q[i], atol=1e-5, rtol=rtol)


def assert_flops_equal_real_execution(model: nn.Module, x: torch.Tensor, prof) -> torch.Tensor:
    """``cost.executed_flops`` of the hard forward equals ``FlopCounterMode`` over the real
    conditional execution: of each sample alone, of the batch (the sum), and with every gate
    forced on (``prof.full``) and off (``prof.static``). Returns the per-sample FLOPs."""
    _, trace = hard_run(model, x)
    flops = cost.executed_flops(model, trace)
    assert flops.unique().numel() == len(x)
    for i in range(len(x)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.forward_conditional(x[i:i + 1])
        assert counter.get_total_flops() == flops[i].item()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.forward_conditional(x)
    assert counter.get_total_flops() == flops.sum().item()
    for force, expected in (("on", prof.full), ("off", prof.static)):
        with torch.no_grad(), gate_mode(model, "hard", force=force), Trace() as forced:
            with FlopCounterMode(display=False) as counter:
                model.forward_conditional(x[:1])
        assert counter.get_total_flops() == expected == cost.executed_flops(model, forced).item()
    return flops
