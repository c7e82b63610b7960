"""The gate and cost model on small networks of each kind (issue 15): executed FLOPs counted from
a trace equal ``FlopCounterMode`` over a real execution that skips the work, sample by sample,
for early exit with nested gates, channel gates on consecutive convolutions, a sub-batch early
exit, top-k routing, token halting (quadratic attention) and a gate nested by structure; every mis-declaration is one DynattackError naming the gate.
The examples in ``examples/`` are the models; each also runs end to end here (fast setting)."""
import importlib
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynattack import cost
from dynattack.errors import DynattackError
from dynattack.gates import Gate, Trace, force_gates
from model_helpers import assert_clear_of_threshold, assert_logits_close

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
EXAMPLES = ["early_exit", "channel_gates", "subbatch_early_exit", "moe_topk", "token_halting"]


def flops_of(fn, x):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops()


def traced(model, x):
    with torch.no_grad(), Trace() as trace:
        out = model(x)
    return out, trace


def real(model):
    return getattr(model, "forward_conditional", model)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_flops_equal_real_execution_per_sample(name):
    run = importlib.import_module(name).main(n=24, attacks=False)
    model, x = run["model"], run["images"]
    out, trace = traced(model, x)
    # the real path decides again: no logit within rounding of 0 (router scores are O(1) float32
    # sums of 16 terms, rounding ~1e-7: 1e-5 keeps 100x of it; 384 tokens leave no 1e-4 gap)
    margin = 1e-5 if name == "moe_topk" else 1e-4
    assert_clear_of_threshold(torch.cat([e.logit.flatten() for e in trace]), margin)
    counted = cost.executed_flops(model, trace)
    assert torch.equal(counted, run["counted"])
    for i in range(len(x)):  # FlopCounterMode on the sample alone, really skipping
        assert counted[i].item() == flops_of(real(model), x[i:i + 1])
        with torch.no_grad():
            assert_logits_close(real(model)(x[i:i + 1]), out[i:i + 1])
    assert flops_of(real(model), x) == counted.sum().item()  # and on the whole batch
    for force, expected in (("on", cost.full_flops(model)), ("off", cost.profile(model).static)):
        with force_gates(model, force):
            _, forced = traced(model, x[:2])
            assert flops_of(real(model), x[:1]) == expected
        assert cost.executed_flops(model, forced).tolist() == [expected] * 2
    assert run["max_rel_error"] == 0.0


def test_early_exit_inputs_exercise_the_nesting():
    """Stage 3 runs only where both exits continue: on these inputs exit 2 alone would continue
    where exit 1 stopped, so counting its units without the nesting is wrong (by stage 3's cost)."""
    run = importlib.import_module("early_exit").main(n=24, attacks=False)
    model, x = run["model"], run["images"]
    _, trace = traced(model, x)
    d1, d2 = (e.decision for e in trace)
    assert (~d1 & d2).any() and (d1 & d2).any() and (d1 & ~d2).any() and (~d1 & ~d2).any()
    assert cost.profile(model).parents == {"exit2": "exit1"}
    stage3 = flops_of(model.stage3, torch.zeros(1, 16, 8, 8)) + 2 * 32 * 10
    naive = run["counted"] + (~d1 & d2).double() * stage3
    assert (naive != run["measured"]).any()


def test_channel_gates_inputs_exercise_the_products():
    """Each fed layer sees a different number of kept input channels per sample, and the costs
    are the products: conv k costs 2 k^2 HW n_{k-1} n_k, written out here from the shapes."""
    run = importlib.import_module("channel_gates").main(n=24, attacks=False)
    model, x = run["model"], run["images"]
    _, trace = traced(model, x)
    n = [e.decision.sum(1).double() for e in trace]
    for k in range(3):
        assert n[k].unique().numel() > 2 and (n[k] < model.gates[k].controls[0].out_channels).all()
    sizes, hand = (16, 8, 4), torch.zeros(len(x), dtype=torch.float64)
    n_in = [torch.full_like(n[0], 3.0)] + n
    for k in range(3):
        hand += 2 * 9 * sizes[k] ** 2 * n_in[k] * n[k]
    hand += 2 * 10 * n[2]  # the classifier reads the kept channels of the last conv
    static = sum(2 * lin.in_features * lin.out_features for lin in model.saliency)
    assert torch.equal(run["counted"], hand + static)


def test_subbatch_gate_event_carries_its_rows_and_scatters():
    run = importlib.import_module("subbatch_early_exit").main(n=24, attacks=False)
    model, x = run["model"], run["images"]
    _, trace = traced(model, x)
    first, second = trace.events
    assert first.rows is None and second.rows is not None
    assert torch.equal(second.rows, first.decision.nonzero().squeeze(1))
    assert trace.batch_size() == len(x)
    decisions = trace.flat("decision")
    assert decisions.shape == (len(x), 2) and not decisions[~first.decision, 1].any()
    assert run["counted"].unique().numel() == 3  # rows exiting after stage 1, after stage 2, running all


def test_topk_routing_costs_the_chosen_experts():
    """Expert e (hidden width h_e) costs 4 dim h_e FLOPs per token routed to it, written out."""
    moe = importlib.import_module("moe_topk")
    run = moe.main(n=24, attacks=False)
    model, x = run["model"], run["images"]
    _, trace = traced(model, x)
    (route,) = trace.events
    per_expert = route.decision.sum(1).double()  # (B, E) tokens routed to each expert
    assert (route.decision.sum(2) == moe.TOP_K).all() and per_expert.unique().numel() > 4
    dim, tokens = model.embed.out_features, 16
    static = tokens * (2 * 48 * dim + 2 * dim * len(moe.HIDDEN)) + 2 * dim * 10
    hand = static + (per_expert * torch.tensor([4.0 * dim * h for h in moe.HIDDEN], dtype=torch.float64)).sum(1)
    assert torch.equal(run["counted"], hand)


def test_token_halting_costs_a_measured_quadratic_in_the_active_tokens():
    """A block on n tokens costs 16 d^2 n (qkv, proj, MLP) + 4 d n^2 (scores, weights x values),
    written out from the shapes; a linear split over the tokens would be wrong on these inputs."""
    run = importlib.import_module("token_halting").main(n=24, attacks=False)
    model, x = run["model"], run["images"]
    prof = cost.profile(model)
    d = model.embed.out_features
    assert [(t.out_gate, t.poly) for t in prof.terms] == \
        [("gates.0", (0.0, 16.0 * d * d, 4.0 * d, 0.0)), ("gates.1", (0.0, 16.0 * d * d, 4.0 * d, 0.0))]
    assert prof.parents == {"gates.1": "gates.0"}
    _, trace = traced(model, x)
    g1, g2 = (e.decision for e in trace)
    n1, n2 = g1.sum(1).double(), (g1 & g2).sum(1).double()
    assert n1.unique().numel() > 3 and n2.unique().numel() > 3 and (n2 < n1).any()
    block = lambda n: 16 * d * d * n + 4 * d * n * n
    assert torch.equal(run["counted"], prof.static + block(n1) + block(n2))
    linear = prof.static + (n1 + n2) / 17 * block(17.0)
    assert (linear != run["measured"]).all()


class TokenModule(nn.Module):
    """Runs on tokens ``(B, T, 4)``: ``kind`` 'fixed' needs all T tokens, 'quartic' costs n^4."""

    def __init__(self, kind):
        super().__init__()
        self.kind, self.lin, self.pos = kind, nn.Linear(4, 4), nn.Parameter(torch.zeros(1, 6, 4))

    def forward(self, t):
        if self.kind == "fixed":
            return self.lin(t + self.pos)
        a = t @ t.transpose(1, 2)  # (B, n, n)
        return self.lin(t) + (a.reshape(len(t), -1, 1) @ a.reshape(len(t), 1, -1)).mean((1, 2))[:, None, None]


class Tokens(nn.Module):
    input_shape = (6, 4)

    def __init__(self, kind, units=6, tokens=1):
        super().__init__()
        self.body = TokenModule(kind)
        self.gate = Gate(controls=[self.body], tokens=tokens)
        self.units = units

    def forward(self, x):
        m = self.gate(x[:, :self.units, 0] - 0.5)
        return (self.body(x) * m[..., :1, None]).mean(1)


@pytest.mark.parametrize("kind, units, tokens, message", [
    ("fixed", 6, 1, "TokenModule failed on 2 of its 6 tokens"),
    ("quartic", 6, 1, "the FLOPs of body (gate gate) are not a polynomial of degree <= 3"),
    ("quartic", 5, 1, "gate gate has 5 token units, but no input of body has 5 entries on dimension 1"),
    ("quartic", 6, 2, "no input of body has 6 entries on dimension 2"),
])
def test_token_gate_misdeclarations_are_named(kind, units, tokens, message):
    model = Tokens(kind, units, tokens).eval()
    with pytest.raises(DynattackError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cost.calibrate(model, model.input_shape)


# --------------------------------------------------------------------------- nesting by structure


class GatedBlock(nn.Module):
    """A residual block with a gated second conv inside: its gate is called inside the block."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(4, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.gate = Gate(controls=[self.conv_b])

    def forward(self, h):
        a = F.relu(self.conv_a(h))
        m = self.gate(100 * (a.mean((1, 2, 3)) - 0.0336))
        return h + a + m.view(-1, 1, 1, 1) * self.conv_b(a)

    def forward_conditional(self, h):
        a = F.relu(self.conv_a(h))
        out = h + a
        return out + self.conv_b(a) if self.gate(100 * (a.mean((1, 2, 3)) - 0.0336)).item() >= 0.5 else out


class NestedByStructure(nn.Module):
    """A skippable block (``block_gate``) holding a gated conv (``block.gate``): nothing declares
    the nesting; calibration sees the inner gate called, and its conv run, inside the block."""

    input_shape = (1, 6, 6)

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.block = GatedBlock()
            self.head = nn.Linear(4, 3)
        self.block_gate = Gate(controls=[self.block])

    def forward(self, x):
        h = F.relu(self.stem(x))
        m = self.block_gate(100 * (h.mean((1, 2, 3)) - 0.115))
        return self.head((h + m.view(-1, 1, 1, 1) * (self.block(h) - h)).mean((2, 3)))

    def forward_conditional(self, x):
        out = []
        for xi in x.split(1):
            h = F.relu(self.stem(xi))
            if self.block_gate(100 * (h.mean((1, 2, 3)) - 0.115)).item() >= 0.5:
                h = self.block.forward_conditional(h)
            out.append(self.head(h.mean((2, 3))))
        return torch.cat(out)


def test_nesting_derived_from_structure_and_nested_cost_not_counted_twice():
    model = NestedByStructure().eval()
    prof = cost.calibrate(model, model.input_shape)
    assert prof.parents == {"block.gate": "block_gate"}
    conv = 2 * 4 * 4 * 9 * 36
    assert prof.gated == {"block_gate": conv, "block.gate": conv}  # conv_a only: conv_b is the inner gate's
    x = torch.rand(64, 1, 6, 6, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.2, 1.4, 64).view(-1, 1, 1, 1)
    out, trace = traced(model, x)
    assert_clear_of_threshold(trace)
    outer, inner = (e.decision for e in trace)
    assert (~outer & inner).any() and (outer & inner).any() and (outer & ~inner).any()
    counted = cost.executed_flops(model, trace)
    for i in range(len(x)):
        assert counted[i].item() == flops_of(model.forward_conditional, x[i:i + 1])


def test_empty_batch_counts_no_flops():
    model = NestedByStructure().eval()
    cost.calibrate(model, model.input_shape)
    _, trace = traced(model, torch.rand(0, 1, 6, 6))
    counted = cost.executed_flops(model, trace)
    assert counted.shape == (0,) and counted.dtype == torch.float64


# --------------------------------------------------------------------------- errors, never silence


class Two(nn.Module):
    """Two gates (logit shapes ``shapes``) over two convs; ``twice``: g1 is called twice."""

    input_shape = (2, 4, 4)

    def __init__(self, twice=False, shapes=((), ())):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.g1 = Gate(controls=[self.conv1])
        self.g2 = Gate(controls=[self.conv2])
        self.twice, self.shapes = twice, shapes

    def logit(self, x, shape):
        return (x.mean((1, 2, 3)) - 0.5).view(-1, *[1] * len(shape)).expand(-1, *shape)

    def forward(self, x):
        a = self.act(self.conv1(x)) * self.g1(self.logit(x, self.shapes[0])).reshape(len(x), -1)[:, :1, None, None]
        if self.twice:
            self.g1(self.logit(x, self.shapes[0]))
        b = self.conv2(a) * self.g2(self.logit(x, self.shapes[1])).reshape(len(x), -1)[:, :1, None, None]
        return b.mean((2, 3))


@pytest.mark.parametrize("declare, message", [
    (dict(g2=lambda m: {}), "gate g2 controls nothing"),
    (dict(g2=lambda m: {"controls": [m.conv1]}), "controlled by two gates, g1 and g2"),
    (dict(g2=lambda m: {"controls": [m.conv2], "feeds": [m.conv2]}, g1=lambda m: {"controls": [m.conv1], "feeds": [m.conv2]}),
     "fed by two gates, g1 and g2"),
    (dict(g2=lambda m: {"controls": [nn.Conv2d(2, 2, 1)]}), "gate g2 controls a Conv2d that is not a module of Two"),
    (dict(g2=lambda m: {"controls": [m.act]}), "gate g2's modules ran no FLOPs"),
    (dict(g2=lambda m: {"controls": [m.conv2], "within": Gate()}), "gate g2 is declared within a gate that is not"),
    (dict(g1=lambda m: {"controls": [m.conv1], "within": "g2"}, g2=lambda m: {"controls": [m.conv2], "within": "g1"}),
     "enclose each other"),
    (dict(g1=lambda m: {"controls": [m.conv1], "feeds": [m.conv2]}, shapes=((3,), ())), "gate g1 feeds conv2, which reads 2"),
    (dict(g2=lambda m: {"controls": [m.conv2], "within": "g1"}, shapes=((2,), (3,))), "gate g2 (units (3,)) is nested in gate g1"),
    (dict(g1=lambda m: {"experts": [m.conv1, m.act]}, shapes=((3,), ())), "gate g1 routes to 2 experts but its unit shape is"),
    (dict(twice=True), "gate g1 was called twice in one forward"),
])
def test_misdeclarations_are_one_named_error_at_calibration(declare, message):
    model = _two(**declare)
    with pytest.raises(DynattackError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cost.calibrate(model, model.input_shape)


def _two(g1=None, g2=None, twice=False, shapes=((), ())):
    """``Two`` with its gates replaced by ``Gate(**g(model))``; a ``within`` given as a name is
    the model's gate of that name (set once both gates exist)."""
    model = Two(twice=twice, shapes=shapes)
    declared = {name: g(model) for name, g in (("g1", g1), ("g2", g2)) if g is not None}
    for name, kwargs in declared.items():
        setattr(model, name, Gate(**{k: v for k, v in kwargs.items() if k != "within"}))
    for name, kwargs in declared.items():
        if "within" in kwargs:
            within = kwargs["within"]
            getattr(model, name)._within = [getattr(model, within) if isinstance(within, str) else within]
    return model.eval()


def test_trace_errors_name_the_gate():
    model = _two(g2=lambda m: {"controls": [m.conv2], "within": "g1"})
    cost.calibrate(model, model.input_shape)
    x = torch.rand(4, 2, 4, 4)
    _, trace = traced(model, x)
    assert cost.executed_flops(model, trace).shape == (4,)
    del trace.events[0]  # the enclosing gate's event gone
    trace.forward_starts[:] = [0]
    with pytest.raises(DynattackError, match="gate g2 is nested in gate g1, which this forward did not call"):
        cost.executed_flops(model, trace)
    _, trace = traced(model, x)
    trace.events.append(trace.events[1])
    with pytest.raises(DynattackError, match="gate g2 was called twice in one forward"):
        cost.executed_flops(model, trace)


def test_subbatch_rows_checked():
    model = _two()
    cost.calibrate(model, model.input_shape)
    for rows, message in ((None, "gate g2 ran on 2 rows of a batch of 4 without saying which"),
                          (torch.tensor([1, 1]), "gate g2 was called with rows that are not 2 distinct"),
                          (torch.tensor([0, 4]), "gate g2 was called with rows that are not 2 distinct")):
        with torch.no_grad(), Trace() as trace:
            model(torch.rand(4, 2, 4, 4))
        e = trace.events[1]
        e.logit, e.decision, e.rows = e.logit[:2], e.decision[:2], rows
        with pytest.raises(DynattackError, match=message):
            cost.executed_flops(model, trace)


def test_gate_not_run_at_calibration_is_refused():
    model = _two()
    cost.calibrate(model, model.input_shape)
    _, trace = traced(model, torch.rand(2, 2, 4, 4))
    trace.events[1].name = "g3"
    with pytest.raises(DynattackError, match="gate g3 did not run when Two was calibrated"):
        cost.executed_flops(model, trace)


def test_manidp_cost_is_a_declaration():
    """ManiDP has no family rule: its second conv is a product term of the two channel gates."""
    from dynattack.models.manidp import ManiDPResNet

    model = ManiDPResNet(depth=8, input_size=8).eval()
    assert not hasattr(model, "executed_flops")
    prof = cost.calibrate(model, (3, 8, 8))
    products = [t for t in prof.terms if t.in_gate is not None]
    assert [(t.in_gate, t.out_gate, t.modules) for t in products[:1]] == \
        [("layer1.0.mb1.gate", "layer1.0.mb2.gate", ["layer1.0.conv2"])]
    assert products[0].flops == 2 * 9 * 16 * 16 * 8 * 8


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_declare_check_and_attack(name, capsys):
    run = importlib.import_module(name).main(n=4, steps=3)
    printed = capsys.readouterr().out
    assert "max relative FLOPs error vs FlopCounterMode (real execution, per sample): 0" in printed
    assert set(run["figures"]) == {"GradAuto", "ILFO", "FGSM-fgm", "FGSM-lgm"}
    for figs in run["figures"].values():
        assert all(math.isfinite(v) or math.isnan(v) for v in figs.values())
        assert figs["flops_adv"] > 0


def test_subbatch_execution_rates_count_absent_rows_as_off():
    """Execution rates (metrics, the runner's per-sample records) of a gate called on the rows
    still running: a row that exited before it ran none of its units."""
    from dynattack import metrics
    from dynattack.runner import _gate_on_fractions

    run = importlib.import_module("subbatch_early_exit").main(n=24, attacks=False)
    model, x = run["model"], run["images"]
    _, trace = traced(model, x)
    first, second = trace.events
    hand = torch.zeros(len(x), dtype=torch.float64)
    hand[second.rows] = second.decision.double().reshape(len(second.rows), -1).mean(1)
    fractions = _gate_on_fractions(trace, len(x))
    assert torch.equal(fractions[:, 1], hand) and torch.equal(fractions[:, 0], first.decision.double())
    rates = metrics.execution_rates(trace)
    assert rates[second.name] == pytest.approx(float(hand.mean()), abs=1e-12)
