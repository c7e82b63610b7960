"""Dynamics-aware energy attacks (issue 16, item 1): GradAuto and ILFO with ``grad=fgm|lgm|lgm_st``,
the slope schedule ``lam -> lam_end`` and the forced-on fixed-point objective.

* lam -> large: the LGM gradient of the complexity loss tends to the hard (FGM) one, on a tiny
  model whose every unit is computed (the masked batch path) and whose later gate reads the block
  an earlier gate controls, so at a small slope the two gradients differ.
* ToyChain, solvable by hand: gate B can only switch on once gate A's block runs, and the hard
  gradient points away from A; the dynamics-aware attacks reach all-on, FGM with the same steps
  does not (checked from the pixels, not from the attack's accounting).
* fixed_point on a zoo SkipNet: every per-sample figure re-measured on the hard network, and a
  returned input whose forced-on logits are all >= 0 is all-on in the natural run.
"""
import math

import pytest
import torch
from torch import nn

from dynattack import cost
from dynattack.attacks import ILFO, GradAuto
from dynattack.errors import DynattackError
from dynattack.gates import Gate, Trace, force_gates
from toy_models import ToyConflict, toy_images


class ToyChain(nn.Module):
    """Input (1, 2, 2), pixels p0..p3; the decision of ``gate_b`` reads the block ``gate_a`` controls.

    * ``gate_a``: q_a = 4 (0.5 - p0) - 1, controls ``conv_a`` (1 -> 2 channels, weights 1/9, bias 1:
      every output is sum(p) / 9 + 1, in [1, 1.45] on [0, 1] inputs);
    * ``gate_b``: q_b = -2.5 + 4 (p0 - 0.5) + 6 mean(m_a conv_a(x)), controls ``conv_b`` (1 -> 16
      channels: 8x the cost of A).

    With A off, q_b <= -2.5 + 2 = -0.5 < 0 for every input in [0, 1]: B can never switch on alone.
    With A on (p0 < 0.25), q_b >= -2.5 - 2 + 6 = 1.5 > 0: both on. At p = 0.5 the cost-weighted
    hard gradient of the complexity loss on p0 is dominated by B's direct term (+4, weight 8/9),
    which pushes p0 up and A further off; through A's soft mask (lgm) B's term points down.
    """

    input_shape = (1, 2, 2)

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(1, 2, 3, padding=1)
        self.conv_b = nn.Conv2d(1, 16, 3, padding=1)
        self.head = nn.Linear(18 * 4, 2)
        with torch.no_grad():
            self.conv_a.weight.fill_(1 / 9)
            self.conv_a.bias.fill_(1.0)
            self.conv_b.weight.fill_(1 / 9)
            self.conv_b.bias.zero_()
            self.head.weight.fill_(0.01)
            self.head.bias.zero_()
        self.gate_a = Gate(controls=[self.conv_a])
        self.gate_b = Gate(controls=[self.conv_b])

    def forward(self, x):
        b = x.shape[0]
        p0 = x.flatten(1)[:, 0]
        h_a = self.gate_a(4 * (0.5 - p0) - 1).view(b, 1, 1, 1) * self.conv_a(x)
        q_b = -2.5 + 4 * (p0 - 0.5) + 6 * h_a.mean((1, 2, 3))
        h_b = self.gate_b(q_b).view(b, 1, 1, 1) * self.conv_b(x)
        return self.head(torch.cat([h_a, h_b], 1).flatten(1))


def chain():
    model = ToyChain()
    cost.calibrate(model, model.input_shape)
    return model.eval()


def chain_images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 0.04 * (torch.rand(n, *ToyChain.input_shape, generator=g) - 0.5)


def chain_on(x):
    """Both gates' hard decisions from the pixels (the formulas of the docstring, not the model)."""
    p = x.flatten(1)
    q_a = 4 * (0.5 - p[:, 0]) - 1
    a = q_a >= 0
    q_b = -2.5 + 4 * (p[:, 0] - 0.5) + 6 * a.double() * (p.sum(1) / 9 + 1)
    return a, q_b >= 0


def _cos(a, b):
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_lgm_gradient_tends_to_the_hard_one_as_lam_grows():
    model = chain()
    # gate A off (q_a = -1 and -0.2: the soft mask's slope is far from 0 at lam = 1), B off
    x = torch.tensor([0.5, 0.3, 0.6, 0.4]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    x[1, 0, 0, 0] = 0.3
    a, b = chain_on(x)
    assert not bool(a.any() or b.any())
    hard = GradAuto(model, steps=1, progress=False).objective_gradient(x)
    assert bool((hard.flatten(1).norm(dim=1) > 0).all())
    assert bool((hard.flatten(1)[:, 1:] == 0).all())  # FGM: only p0 reaches a decision (A's block is off)
    for grad in ("lgm", "lgm_st"):
        soft = GradAuto(model, steps=1, grad=grad, lam=1.0, progress=False).objective_gradient(x)
        assert bool((_cos(soft, hard) < 0.9).all())  # at a soft slope the surrogate sees A's block
        sharp = GradAuto(model, steps=1, grad=grad, lam=200.0, progress=False).objective_gradient(x)
        assert bool((_cos(sharp, hard) > 0.999).all()), (grad, _cos(sharp, hard))


def test_lam_schedule_is_geometric_from_lam_to_lam_end():
    model = chain()
    atk = GradAuto(model, steps=5, grad="lgm", lam=0.5, lam_end=8.0, progress=False, history=True,
                   keep_optimising_distortion=False, early_stop=False)
    assert [atk.lam_at(t) for t in range(5)] == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0])
    res = atk(chain_images(2))
    assert res.history["lam"][:, 0].tolist() == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0])
    assert GradAuto(model, steps=5, grad="lgm", lam=3.0, progress=False).lam_at(4) == 3.0  # no annealing
    assert res.params["lam"] == 0.5 and res.params["lam_end"] == 8.0 and res.params["grad"] == "lgm"


@pytest.mark.parametrize("kw", [dict(grad="lgm"), dict(grad="lgm", lam=0.5, lam_end=20.0),
                                dict(grad="lgm_st"), dict(objective="fixed_point")])
def test_dynamics_aware_attack_reaches_all_on_where_the_hard_one_cannot(kw):
    model = chain()
    x = chain_images(4)
    a, b = chain_on(x)
    assert not bool(a.any() or b.any())
    hard = GradAuto(model, steps=100, progress=False)(x)
    a, b = chain_on(hard.adv)
    assert not bool(a.any() or b.any()) and not bool(hard.success.any())
    assert torch.equal(hard.flops_adv, hard.flops_clean)

    res = GradAuto(model, steps=100, progress=False, **kw)(x)
    a, b = chain_on(res.adv)
    assert bool((a & b).all()), kw
    assert bool(res.success.all()) and torch.equal(res.flops_adv, res.flops_full)
    p0 = res.adv.flatten(1)[:, 0]
    assert bool((p0 < 0.25).all())
    # the minimum-norm search keeps the least distorted all-on input: A needs p0 below 0.25
    assert bool((res.l2 < 0.35).all()), res.l2


@pytest.mark.parametrize("kw", [dict(grad="lgm", lam=0.5, lam_end=20.0), dict(grad="lgm_st", lam=2.0),
                                dict(objective="fixed_point")])
def test_rectification_and_search_hold_in_every_mode(kw):
    """ToyConflict (gate_a on, gate_b's gradient against it): with each mode the rectified
    magnitude is K, the rectified gradient never opposes g_F, gate_a stays on, every sample ends
    all-on, and the minimum-norm search then runs (and returns no more distortion than the first
    all-on iterate)."""
    model = ToyConflict()
    x = toy_images(model, 3)
    res = GradAuto(model, K=0.5, steps=60, progress=False, history=True, **kw)(x)
    assert bool((res.recovery == 100).all()) and bool(res.success.all())
    h = res.history
    ran = h["grad_norm_c"] > 0
    assert bool(ran.any())
    torch.testing.assert_close(h["grad_norm_rect"][ran], torch.full_like(h["grad_norm_rect"][ran], 0.5), rtol=1e-5, atol=0)
    cos = h["cos_rect"][torch.isfinite(h["cos_rect"])]
    assert cos.numel() > 0 and bool((cos >= -1e-5).all())
    assert bool((h["gate_on"][..., 0][h["active"]] == 1).all())
    searching = h["on_boundary"] == 1
    assert bool(searching.any(0).all())  # every sample reached the search
    first = (h["gate_on"].min(2).values == 1) & h["active"]
    t0 = first.double().argmax(0)
    assert bool((res.l2 <= h["l2"][t0, torch.arange(3)] + 1e-12).all())


def test_ilfo_takes_the_dynamics_options():
    model = chain()
    x = chain_images(2)
    for kw in [dict(grad="lgm", lam=0.5, lam_end=10.0), dict(objective="fixed_point"), dict(grad="lgm_st")]:
        res = ILFO(model, steps=20, progress=False, **kw)(x)
        assert res.params["grad"] == kw.get("grad", "fgm") and res.params["hinge_weight"] == 1e6
        with torch.no_grad(), Trace() as trace:
            model(res.adv)
        assert torch.equal(cost.executed_flops(model, trace).double(), res.flops_adv)


def test_parameter_checks():
    model = chain()
    bad = [dict(grad="soft"), dict(lam=0), dict(lam_end=2.0), dict(grad="lgm", lam_end=-1.0),
           dict(grad="lgm", lam_end=float("inf")), dict(objective="ceiling"),
           dict(objective="fixed_point", grad="lgm"), dict(fp_margin=-0.1), dict(fp_margin=True)]
    for kw in bad:
        for cls in (GradAuto, ILFO):
            with pytest.raises(DynattackError) as err:
                cls(model, **kw)
            assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def ff_sp():
    from dynattack import create_model
    from dynattack.data import load_fashion_mnist

    try:
        images, _ = load_fashion_mnist("test")
    except DynattackError as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
    return create_model("skipnet38-ff-sp"), images[:4].clone()


def test_fixed_point_figures_are_the_hard_network_s(ff_sp):
    model, x = ff_sp
    res = GradAuto(model, steps=40, objective="fixed_point", progress=False)(x)
    with torch.no_grad(), Trace() as trace:
        model(res.adv)
    flops = cost.executed_flops(model, trace).double()
    all_on = torch.stack([e.decision.reshape(len(x), -1).all(1) for e in trace], 1).all(1)
    assert torch.equal(flops, res.flops_adv)
    assert torch.equal(all_on, res.success)
    assert torch.equal(res.flops_adv[res.success], res.flops_full[res.success])
    assert res.recovery_pct > 0 and bool(res.success.any())
    # the fixed point: forced-on logits all >= 0 <=> the natural run is all-on (rows clear of 0)
    with torch.no_grad(), force_gates(model, "on"), Trace() as forced:
        model(res.adv)
    q_min = torch.stack([e.logit.reshape(len(x), -1).min(1).values for e in forced], 1).min(1).values
    clear = q_min.abs() > 1e-3
    assert bool(clear.any())
    assert torch.equal((q_min >= 0)[clear], all_on[clear])
    assert math.isfinite(res.psnr_db)
