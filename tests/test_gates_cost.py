"""Gates, trace and FLOPs accounting against independent computations: finite differences and
FlopCounterMode over a hand-written real conditional execution."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynattack import cost
from dynattack.gates import Gate, Trace, force_gates, gate_mode, iter_gates
from model_helpers import assert_clear_of_threshold, assert_logits_close


class ToyGated(nn.Module):
    """A static stem, one block gate (scalar unit) and one channel gate (4 units)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.branch = nn.Conv2d(4, 4, 3, padding=1)
        self.block_gate = Gate(controls=[self.branch])
        self.wide = nn.Conv2d(4, 4, 3, padding=1)
        self.channel_logits = nn.Linear(4, 4)
        self.channel_gate = Gate(controls=[self.wide])
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        q1 = h.mean((1, 2, 3)) - 0.3
        h = h + self.block_gate(q1).view(-1, 1, 1, 1) * self.branch(h)
        q2 = self.channel_logits(h.mean((2, 3)))
        h = self.channel_gate(q2)[:, :, None, None] * self.wide(h)
        return self.head(h.mean((2, 3)))

    def forward_conditional(self, x):
        """Batch of one: really skip the branch, really slice the channels."""
        assert x.shape[0] == 1
        h = F.relu(self.stem(x))
        if h.mean() - 0.3 >= 0:
            h = h + self.branch(h)
        keep = (self.channel_logits(h.mean((2, 3)))[0] >= 0).nonzero().flatten()
        out = torch.zeros(1, 4, *h.shape[2:])
        if len(keep):
            out[:, keep] = F.conv2d(h, self.wide.weight[keep], self.wide.bias[keep], padding=1)
        return self.head(out.mean((2, 3)))


def flops_of(fn, x):
    with FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops()


def test_executed_flops_equal_flop_counter_on_real_execution():
    model = ToyGated().eval()
    cost.calibrate(model, (1, 8, 8))
    x = torch.rand(16, 1, 8, 8) * torch.linspace(0, 1.5, 16).view(-1, 1, 1, 1)
    with torch.no_grad(), Trace() as trace:
        masked = model(x)
    traced = cost.executed_flops(model, trace)
    decisions = trace.flat("decision")
    assert_clear_of_threshold(trace)  # forward_conditional decides again, on one sample
    assert decisions.shape == (16, 5)
    assert 0 < decisions.float().mean() < 1, "the toy input should give mixed decisions"
    for i in range(len(x)):
        with torch.no_grad():
            real = model.forward_conditional(x[i:i + 1])
        assert_logits_close(real, masked[i:i + 1])
        assert traced[i].item() == flops_of(model.forward_conditional, x[i:i + 1])


def test_full_and_static_flops():
    model = ToyGated().eval()
    prof = cost.calibrate(model, (1, 8, 8))
    with force_gates(model, "on"), torch.no_grad():
        assert prof.full == flops_of(model, torch.rand(1, 1, 8, 8))
    # stem + channel logits + head run always; branch and wide are gated
    static = flops_of(model.stem, torch.rand(1, 1, 8, 8)) + 2 * 4 * 4 + 2 * 4 * 3
    assert prof.static == static
    assert cost.full_flops(model) == prof.full


def test_recovery_definitions():
    clean = torch.tensor([50.0, 80.0, 100.0])
    adv = torch.tensor([100.0, 90.0, 100.0])
    per = cost.recovery_per_sample(clean, adv, 100.0)
    assert per[0] == 100 and per[1] == 50 and torch.isnan(per[2])
    assert cost.recovery_aggregate(clean, adv, 100.0) == pytest.approx(60 / 70 * 100)


@pytest.mark.parametrize("lam", [0.5, 2.0, 10.0])
def test_lgm_gradient_matches_finite_difference_of_soft_gate(lam):
    gate = Gate()
    q = torch.tensor([-1.3, -0.2, 0.0, 0.4, 2.0], dtype=torch.float64, requires_grad=True)
    gate.mode, gate.lam = "lgm", lam
    (grad,) = torch.autograd.grad(gate(q).sum(), q)
    h = 1e-6
    fd = (torch.sigmoid(lam * (q.detach() + h)) - torch.sigmoid(lam * (q.detach() - h))) / (2 * h)
    assert torch.allclose(grad, fd, atol=1e-8)


def test_hard_gate_passes_no_gradient_and_lgm_st_is_hard_forward():
    gate = Gate()
    q = torch.tensor([-0.5, 0.0, 0.5], requires_grad=True)
    hard = gate(q)
    assert not hard.requires_grad and hard.tolist() == [0.0, 1.0, 1.0]
    gate.mode, gate.lam = "lgm_st", 3.0
    st = gate(q)
    assert st.tolist() == [0.0, 1.0, 1.0]
    (grad,) = torch.autograd.grad(st.sum(), q)
    s = torch.sigmoid(3.0 * q.detach())
    assert torch.allclose(grad, 3.0 * s * (1 - s))


def test_trace_records_events_and_gate_mode_restores():
    model = ToyGated()
    with gate_mode(model, "lgm", lam=4.0):
        assert all(g.mode == "lgm" and g.lam == 4.0 for _, g in iter_gates(model))
        with Trace() as outer, Trace() as inner:
            model(torch.rand(2, 1, 8, 8))
    assert all(g.mode == "hard" and g.lam == 1.0 for _, g in iter_gates(model))
    assert [e.name for e in outer] == ["block_gate", "channel_gate"] == [e.name for e in inner]
    event = outer.events[1]
    assert event.logit.shape == event.value.shape == event.decision.shape == (2, 4)
    assert event.tau == 0.5 and event.decision.dtype == torch.bool
    assert torch.equal(event.decision, event.logit >= 0)
    assert torch.equal(event.value >= event.tau, event.decision)
    with pytest.raises(ValueError):
        with gate_mode(model, "soft"):
            pass


def test_forced_gates_run_everything():
    model = ToyGated().eval()
    with force_gates(model, "on"), Trace() as trace, torch.no_grad():
        model(torch.zeros(3, 1, 8, 8))
    assert trace.flat("decision").all()
    with force_gates(model, "off"), Trace() as trace, torch.no_grad():
        model(torch.zeros(3, 1, 8, 8))
    assert not trace.flat("decision").any()


def test_batch1_latency_times_every_series_interleaved():
    model = ToyGated().eval()
    cost.calibrate(model, (1, 8, 8))
    x = torch.rand(4, 1, 8, 8)
    lat = cost.batch1_latency_ms(model, {"clean": (x, None), "on": (x, "on"), "off": (x, "off")}, repeats=1, warmup=1)
    assert list(lat) == ["clean", "on", "off"]
    assert all(v > 0 and v < float("inf") for v in lat.values())
