"""Helpers shared by the victim-family tests: BN statistics calibrated on data, float
tolerances derived from the logits' scale, decisions kept clear of their thresholds, random
tensors in the official checkpoint layouts, a traced hard forward, the batch-independence,
real-path and FLOPs-vs-real-execution checks, Fashion-MNIST test images."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynattack import cost
from dynattack.gates import Trace, gate_mode


# Logits that differ only in summation order (another CPU's kernels, thread count, batch size,
# gathered instead of masked execution) agree within a few hundred float32 ulps of their scale:
# each of the ~20 layers rounds a dot product of up to 9 * 64 terms of O(1) activations. The
# largest difference measured on the calibrated test models is ~60 ulps (ManiDP, one sample vs
# its batch); one wrongly masked unit or skipped block moves logits by far more (2e-4 to 1).
LOGIT_ULPS = 256
# Every gate logit of a test batch stays this far from the decision threshold q = 0: ~6 times
# the largest difference measured near it (1.6e-5: a sample alone vs in its batch, on the
# default, AVX2 and SSE-level kernels too), so that rounding cannot flip a decision. Families
# whose logits round otherwise (SACT, ManiDP) state their own margin; the batches keep more.
DECISION_MARGIN = 1e-4


def fmnist_images(n: int) -> torch.Tensor:
    """The first ``n`` Fashion-MNIST test images (random images where the dataset is missing)."""
    from dynattack.data import load_fashion_mnist
    from dynattack.errors import DynattackError

    try:
        return load_fashion_mnist("test")[0][:n].clone()
    except DynattackError:
        return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def calibrate_bn(model: nn.Module, x: torch.Tensor, gen: torch.Generator | None = None) -> None:
    """BN running statistics measured on ``x`` with every gate on (after a random affine at
    modest scale drawn from ``gen``, if given): each BN output is standardised, then scaled by
    its affine, so activations and logits stay O(1) however deep the network. One forward with
    the BNs in train mode suffices: each normalises by its batch statistics, which it also
    stores (``momentum=None``), so in eval mode every BN sees the inputs it was calibrated on."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in bns:
            if gen is not None:
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
            m.reset_running_stats()
            m.momentum, m.training = None, True
        try:
            with gate_mode(model, "hard", force="on"):
                model(x)
        finally:
            for m in bns:
                m.momentum, m.training = 0.1, False


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = LOGIT_ULPS) -> None:
    """Equal up to summation order: ``|actual - expected| <= ulps * eps * max(1, max |expected|)``."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=ulps * torch.finfo(expected.dtype).eps * scale, rtol=0)


def assert_clear_of_threshold(trace: Trace | torch.Tensor, margin: float = DECISION_MARGIN) -> None:
    """No gate logit of the traced batch (or of a tensor of logits) sits within ``margin`` of
    its threshold 0."""
    q = (trace.flat("logit") if isinstance(trace, Trace) else trace).abs().min().item()
    assert q >= margin, f"a gate logit sits {q:.2e} from its threshold (< {margin:.0e}): rounding could flip it"


def split_at_gap(values: torch.Tensor, lo: float = 0.35, hi: float = 0.65) -> float:
    """The midpoint of the widest gap between neighbouring ``values`` within quantiles
    ``[lo, hi]``: a threshold there splits the values near the median and lies as far as
    possible from each of them."""
    v = values.flatten().double().sort().values
    i, j = int(lo * (v.numel() - 1)), max(int(hi * (v.numel() - 1)), int(lo * (v.numel() - 1)) + 1)
    k = i + int((v[i + 1:j + 1] - v[i:j]).argmax())
    return float(v[k] + v[k + 1]) / 2


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


def assert_real_path_matches(model: nn.Module, x: torch.Tensor, logits: torch.Tensor, trace: Trace) -> None:
    """The real conditional path takes the hard forward's decisions (``trace``) and gives its
    ``logits``, on the batch and on each sample alone."""
    with torch.no_grad(), Trace() as real:
        out = model.forward_conditional(x)
    assert torch.equal(real.flat("decision"), trace.flat("decision"))
    assert_logits_close(out, logits)
    for i in range(len(x)):
        with torch.no_grad():
            assert_logits_close(model.forward_conditional(x[i:i + 1]), logits[i:i + 1])


def assert_decisions_batch_independent(model: nn.Module, x: torch.Tensor, margin: float = DECISION_MARGIN) -> None:
    """Each sample's hard decisions are the same alone, in its batch and among other inputs, and
    its gate logits agree up to summation order (the batch's logits are clear of the threshold,
    so equal decisions are a check, not luck)."""
    _, trace = hard_run(model, x)
    assert_clear_of_threshold(trace, margin)
    decisions, q = trace.flat("decision"), trace.flat("logit")
    others = torch.rand(3, *x.shape[1:], generator=torch.Generator().manual_seed(7))
    for i in range(len(x)):
        _, alone = hard_run(model, x[i:i + 1])
        _, mixed = hard_run(model, torch.cat([others, x[i:i + 1]]))
        assert torch.equal(alone.flat("decision")[0], decisions[i])
        assert torch.equal(mixed.flat("decision")[-1], decisions[i])
        assert_logits_close(alone.flat("logit")[0], q[i])
        assert_logits_close(mixed.flat("logit")[-1], q[i])


def assert_flops_equal_real_execution(model: nn.Module, x: torch.Tensor, prof, margin: float = DECISION_MARGIN) -> torch.Tensor:
    """``cost.executed_flops`` of the hard forward equals ``FlopCounterMode`` over the real
    conditional execution: of each sample alone, of the batch (the sum), and with every gate
    forced on (``prof.full``) and off (``prof.static``). Returns the per-sample FLOPs."""
    _, trace = hard_run(model, x)
    assert_clear_of_threshold(trace, margin)
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
