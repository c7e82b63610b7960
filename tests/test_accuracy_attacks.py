"""Accuracy attacks (FGSM, I-FGSM, PGD, MI-FGSM) with FGM / LGM / LGM-ST gradients.

Gradients are checked against finite differences of hand-written copies of the toys (no Gate, no
attack code), budgets and pixel masks exactly, FGSM and I-FGSM against closed-form computations on
a static linear model.
"""
import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dynattack import cost
from dynattack.attacks import ATTACKS, FGSM, IFGSM, MIFGSM, PGD
from dynattack.attacks.ifgsm import kurakin_steps
from dynattack.errors import DynattackError
from dynattack.gates import Gate
from dynattack.runner import RunConfig, build_attack, run_attack, summarize

from toy_models import ToyGated, ToyShapes

ATTACKS_DIR = Path(__file__).resolve().parents[1] / "src" / "dynattack" / "attacks"
ALL = [FGSM, IFGSM, PGD, MIFGSM]


def seeded_rand(shape, seed, lo=0.0, hi=1.0, dtype=torch.float32):
    return lo + (hi - lo) * torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def hard_predict(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def spy(cls):
    """A subclass recording every input gradient the attack computes (before masking)."""
    grads = []

    class Spy(cls):
        def gradient(self, fwd, leaf, labels):
            loss, g = super().gradient(fwd, leaf, labels)
            grads.append(g.detach().clone())
            return loss, g

    return Spy, grads


# --------------------------------------------------------------------------- hand-written toys


def toy_logits(model, x, mask_of):
    """The toys of tests/toy_models.py rewritten by hand; ``mask_of(name, q)`` gives each gate's mask."""
    if isinstance(model, ToyGated):
        b = x.shape[0]
        q_mean = 8 * (x.mean((1, 2, 3)) - 0.5)
        q_corner = 8 * (x[:, 0, 0, 0] - 0.7)
        a = F.conv2d(x, model.conv_a.weight, model.conv_a.bias, padding=1)
        c = F.conv2d(x, model.conv_b.weight, model.conv_b.bias, padding=1)
        h = torch.cat([mask_of("gate_mean", q_mean).view(b, 1, 1, 1) * a,
                       mask_of("gate_corner", q_corner).view(b, 1, 1, 1) * c], 1)
    else:
        q_ch = 8 * (x.mean((1, 2, 3))[:, None] - torch.tensor([0.35, 0.4, 0.45, 0.5], dtype=x.dtype))
        q_sp = 8 * (x[:, 1] - 0.55)
        a = F.conv2d(x, model.conv_ch.weight, model.conv_ch.bias, padding=1)
        c = F.conv2d(x, model.conv_sp.weight, model.conv_sp.bias, padding=1)
        h = torch.cat([mask_of("gate_ch", q_ch)[:, :, None, None] * a, mask_of("gate_sp", q_sp)[:, None] * c], 1)
    return F.linear(h.flatten(1), model.head.weight, model.head.bias)


def finite_difference(f, x, h=1e-6):
    """``(B, ...)`` central differences of a per-sample function ``f: (B, ...) -> (B,)`` (samples
    are independent, so one coordinate is perturbed in every sample at once)."""
    flat = x.reshape(x.shape[0], -1)
    out = torch.zeros_like(flat)
    for j in range(flat.shape[1]):
        e = torch.zeros_like(flat)
        e[:, j] = h
        out[:, j] = (f((flat + e).view_as(x)) - f((flat - e).view_as(x))) / (2 * h)
    return out.view_as(x)


def near_boundary_inputs(model, n=3):
    """Inputs whose gate logits sit near 0, where the gate term of the LGM gradient is large."""
    if isinstance(model, ToyGated):
        x = seeded_rand((n, 1, 4, 4), 11, 0.45, 0.55, torch.float64)
        x[:, 0, 0, 0] = torch.tensor([0.66, 0.71, 0.74], dtype=torch.float64)[:n]
    else:
        x = seeded_rand((n, 2, 4, 4), 12, 0.2, 0.7, torch.float64)
    return x


@pytest.mark.parametrize("toy", [ToyGated, ToyShapes])
@pytest.mark.parametrize("grad,lam", [("lgm", 0.5), ("lgm", 3.0), ("lgm_st", 2.0), ("fgm", 1.0)])
def test_input_gradient_matches_finite_differences(toy, grad, lam):
    """lgm: the soft network sigmoid(lam q); fgm: the hard network with its decisions held fixed
    (masks are constants); lgm_st: hard at x0, sigmoid slope around it. Double precision."""
    model = toy()
    cost.calibrate(model, model.input_shape)
    model.double()
    x0 = near_boundary_inputs(model)
    y = torch.tensor([0, 1, 2])
    Spy, grads = spy(FGSM)
    Spy(model, eps=1 / 255, grad=grad, lam=lam, progress=False)(x0, y)
    used = grads[0]

    with torch.no_grad():
        q0 = {}
        toy_logits(model, x0, lambda name, q: q0.setdefault(name, q) * 0 + 1)
    hard0 = {k: (v >= 0).double() for k, v in q0.items()}

    def soft(name, q):
        return torch.sigmoid(lam * q)

    def fixed(name, q):
        return hard0[name]

    def straight_through(name, q):
        return hard0[name] + torch.sigmoid(lam * q) - torch.sigmoid(lam * q0[name])

    mask_of = {"lgm": soft, "fgm": fixed, "lgm_st": straight_through}[grad]
    with torch.no_grad():
        ref = finite_difference(lambda x: F.cross_entropy(toy_logits(model, x, mask_of), y, reduction="none"), x0)
        hard_ref = finite_difference(lambda x: F.cross_entropy(toy_logits(model, x, fixed), y, reduction="none"), x0)
    torch.testing.assert_close(used, ref, rtol=1e-6, atol=1e-8)
    if grad != "fgm":  # the gate term is really there: not the FGM gradient
        assert (used - hard_ref).norm() > 1e-2 * hard_ref.norm()


class SoftFoolsHard(nn.Module):
    """Class 0 whatever the input in the hard network (its gate is always off), class 1 in the soft
    network for lam <= 1 (sigmoid(lam q) >= 0.23 adds +-10 to the logits)."""

    input_shape = (1, 2, 2)

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[0.05, -0.05, 0.02, 0.0], [0.0, 0.03, -0.02, 0.01]]))
            self.lin.bias.copy_(torch.tensor([1.0, 0.0]))
        self.gate = Gate(controls=[self.lin])

    def forward(self, x):
        p = x.flatten(1)
        q = -1 + 0.1 * (p.sum(1) - 2)  # in [-1.2, -0.8]
        return self.lin(p) + self.gate(q)[:, None] * torch.tensor([-10.0, 10.0])


@pytest.mark.parametrize("cls", ALL)
def test_every_verdict_comes_from_the_hard_network(cls):
    model = SoftFoolsHard()
    x = seeded_rand((4, 1, 2, 2), 3)
    y = torch.zeros(4, dtype=torch.long)
    kw = {} if cls is FGSM else {"early_stop": True, "steps": 5}
    res = cls(model, eps=0.1, grad="lgm", lam=0.5, history=True, progress=False, **kw)(x, y)
    soft_loss = res.history["loss"][0]
    assert (soft_loss > 5).all()  # the gradient forward was the soft network: it predicts class 1
    assert not res.success.any() and (res.adv_pred == 0).all()
    assert (res.success_iteration == -1).all()
    assert (res.iterations == res.params["steps"]).all()  # no early stop on the soft verdict
    assert (res.flops_adv == res.flops_clean).all()
    assert model.gate.mode == "hard"


# --------------------------------------------------------------------------- closed forms


def linear_victim(seed=0, d=32, k=4):
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, k))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(k, d, generator=torch.Generator().manual_seed(seed)))
        model[1].bias.copy_(torch.randn(k, generator=torch.Generator().manual_seed(seed + 1)))
    return model


def linear_ce_grad(model, x, y):
    """grad_x CE(Wx + b, y) = W^T (softmax(Wx + b) - onehot(y)), by hand."""
    W, b = model[1].weight.detach(), model[1].bias.detach()
    p = torch.softmax(x.flatten(1) @ W.T + b, 1)
    return ((p - F.one_hot(y, W.shape[0]).to(p.dtype)) @ W).view_as(x)


@pytest.mark.parametrize("targeted", [False, True])
def test_fgsm_on_a_static_model_is_the_hand_computation(targeted):
    model = linear_victim()
    x = seeded_rand((5, 2, 4, 4), 1)
    y = torch.tensor([0, 1, 2, 3, 1])
    eps = 8 / 255
    sign = -1 if targeted else 1
    expected = (x + sign * eps * linear_ce_grad(model, x, y).sign()).clamp(0, 1)
    for grad in ("fgm", "lgm"):  # no gates: both modes are plain FGSM
        res = FGSM(model, eps=eps, grad=grad, targeted=targeted, progress=False)(x, y)
        torch.testing.assert_close(res.adv, expected, rtol=0, atol=1e-6)
        assert (res.iterations == 1).all()


def test_ifgsm_final_iterate_is_the_hand_loop():
    model = linear_victim(seed=4)
    x = seeded_rand((4, 2, 4, 4), 2)
    y = torch.tensor([3, 2, 1, 0])
    eps, alpha, steps = 0.05, 0.02, 6
    adv = x.clone()
    for _ in range(steps):
        adv = adv + alpha * linear_ce_grad(model, adv, y).sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    res = IFGSM(model, eps=eps, alpha=alpha, steps=steps, progress=False)(x, y)
    torch.testing.assert_close(res.adv, adv, rtol=0, atol=1e-6)
    assert (res.iterations == steps).all()


def test_default_iterations_and_steps():
    # min(e + 4, 1.25 e), e = 255 eps, rounded down, at least 1
    assert [kurakin_steps(e / 255) for e in (0.5, 1, 2, 4, 8, 16)] == [1, 1, 2, 5, 10, 20]
    model = ToyGated()
    atk = IFGSM(model, eps=8 / 255, progress=False)
    assert atk.steps == 10 and math.isclose(atk.alpha, 0.8 / 255)
    assert IFGSM(model, eps=8 / 255, steps=4, progress=False).alpha == pytest.approx(2 / 255)
    pgd = PGD(model, eps=8 / 255, progress=False)
    assert pgd.steps == 10 and pgd.alpha == pytest.approx(2 / 255) and pgd.random_start
    mi = MIFGSM(model, eps=8 / 255, progress=False)
    assert mi.steps == 10 and mi.alpha == pytest.approx(0.8 / 255) and mi.mu == 1.0
    fgsm = FGSM(model, eps=4 / 255, progress=False)
    assert fgsm.steps == 1 and fgsm.alpha == 4 / 255
    assert (IFGSM.keep_best, atk.keep_best, pgd.keep_best, mi.keep_best, fgsm.keep_best) == (True, False, True, True, False)


def test_momentum_is_l1_normalised():
    """MI-FGSM on a linear victim, by hand: m <- mu m + g / |g|_1, x <- proj(x + alpha sign(m))."""
    model = linear_victim(seed=7)
    x = seeded_rand((3, 2, 4, 4), 5)
    y = torch.tensor([0, 2, 1])
    eps, alpha, steps, mu = 0.1, 0.03, 5, 0.7
    adv, m = x.clone(), torch.zeros_like(x)
    for _ in range(steps):
        g = linear_ce_grad(model, adv, y)
        m = mu * m + g / g.flatten(1).abs().sum(1).view(-1, 1, 1, 1)
        adv = torch.min(torch.max(adv + alpha * m.sign(), x - eps), x + eps).clamp(0, 1)
    res = MIFGSM(model, eps=eps, alpha=alpha, steps=steps, mu=mu, keep="final", progress=False)(x, y)
    torch.testing.assert_close(res.adv, adv, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- budgets and masks


class AnyShapeGated(nn.Module):
    """Any (C, H, W): a scalar gate on the image mean and a spatial gate on the channel mean."""

    def __init__(self, channels: int, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv_a = nn.Conv2d(channels, 4, 3, padding=1)
            self.conv_b = nn.Conv2d(channels, 3, 3, padding=1)
            self.head = nn.Linear(7, 3)
        self.gate_mean = Gate(controls=[self.conv_a])
        self.gate_sp = Gate(controls=[self.conv_b])

    def forward(self, x):
        q1 = 8 * (x.mean((1, 2, 3)) - 0.5)
        q2 = 8 * (x.mean(1) - 0.5)
        h = torch.cat([self.gate_mean(q1)[:, None, None, None] * self.conv_a(x),
                       self.gate_sp(q2)[:, None] * self.conv_b(x)], 1)
        return self.head(h.mean((2, 3)))


def changed_positions(x, adv):
    """``(H, W)`` bool: positions where any image of the batch changed in any channel."""
    return (adv != x).any(0).any(0)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(2, 6), w=st.integers(2, 6),
    eps=st.floats(1e-3, 1.0), cls=st.sampled_from(ALL), grad=st.sampled_from(["fgm", "lgm", "lgm_st"]),
    valid=st.sampled_from([1.0, 0.5, 0.2, 0.05]), targeted=st.booleans(), seed=st.integers(0, 2**16),
)
def test_outputs_stay_in_the_box_the_ball_and_the_mask(b, c, h, w, eps, cls, grad, valid, targeted, seed):
    model = AnyShapeGated(c, seed=seed % 7)
    x = seeded_rand((b, c, h, w), seed)
    x[..., 0, 0] = 0.0  # pixels on the box boundary
    x[..., -1, -1] = 1.0
    y = torch.randint(0, 3, (b,), generator=torch.Generator().manual_seed(seed + 1))
    kw = {} if cls is FGSM else {"steps": 4}
    res = cls(model, eps=eps, grad=grad, lam=2.0, targeted=targeted, valid_pixels=valid, seed=seed,
              progress=False, **kw)(x, y)
    assert res.adv.shape == x.shape and res.adv.dtype == x.dtype
    assert res.adv.min() >= 0 and res.adv.max() <= 1
    assert ((res.adv.double() - x.double()).abs() <= eps).all()  # exactly, no tolerance
    assert (res.linf <= eps).all()
    k = max(1, round(valid * h * w))
    assert int(changed_positions(x, res.adv).sum()) <= k
    with torch.no_grad():
        assert (model(res.adv).argmax(1) == res.adv_pred).all()


@pytest.mark.parametrize("valid", [0.5, 0.2, 0.05])
def test_valid_pixel_mask_is_exact_shared_and_seeded(valid):
    """PGD's random start moves every allowed pixel (almost surely): the changed positions ARE the
    mask. It holds round(p H W) positions, the same in every channel and every image, the same
    for every batch at one seed, and pixels outside are bit-for-bit the clean ones."""
    model = AnyShapeGated(3)
    h, w = 8, 10
    k = round(valid * h * w)
    x1, x2 = seeded_rand((4, 3, h, w), 1, 0.1, 0.9), seeded_rand((2, 3, h, w), 2, 0.1, 0.9)
    y1, y2 = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2])
    masks = []
    for x, y, seed in ((x1, y1, 5), (x2, y2, 5), (x1, y1, 6)):
        res = PGD(model, eps=0.1, steps=3, valid_pixels=valid, seed=seed, keep="final", progress=False)(x, y)
        moved = res.adv != x  # (B, C, H, W)
        pos = moved.any(0).any(0)
        assert int(pos.sum()) == k
        assert (moved == pos.expand_as(moved)).all()  # every image, every channel
        assert torch.equal(res.adv[:, :, ~pos], x[:, :, ~pos])
        masks.append(pos)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    # iterative attacks without random start only ever move inside that mask
    for cls in (IFGSM, MIFGSM, FGSM):
        res = cls(model, eps=0.2, valid_pixels=valid, seed=5, grad="lgm", progress=False)(x1, y1)
        assert not (changed_positions(x1, res.adv) & ~masks[0]).any()


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("cls", [IFGSM, PGD, MIFGSM])
@pytest.mark.parametrize("grad", ["fgm", "lgm"])
def test_targeted_attacks_move_towards_the_target(cls, grad):
    model = ToyShapes()
    x = seeded_rand((6, 2, 4, 4), 3)
    pred = hard_predict(model, x)
    target = (pred + 1) % 3
    res = cls(model, eps=0.3, steps=20, grad=grad, lam=2.0, targeted=True, progress=False)(x, target)
    with torch.no_grad():
        before = F.cross_entropy(model(x), target, reduction="none")
        after = F.cross_entropy(model(res.adv), target, reduction="none")
    assert (after < before).all()
    assert res.success.sum() >= 4
    assert (res.adv_pred[res.success] == target[res.success]).all()


def test_keep_best_returns_the_least_distorted_success():
    model = ToyShapes()
    x = seeded_rand((6, 2, 4, 4), 3)
    y = hard_predict(model, x)
    final = PGD(model, eps=0.3, steps=15, keep="final", progress=False)(x, y)
    best = PGD(model, eps=0.3, steps=15, keep="best", history=True, progress=False)(x, y)
    assert best.success.sum() >= final.success.sum() and best.success.any()
    assert (hard_predict(model, best.adv)[best.success] != y[best.success]).all()
    both = best.success & final.success
    assert (best.l2[both] <= final.l2[both] + 1e-12).all()
    # early stop: the sample stops at its first success and returns that input
    es = PGD(model, eps=0.3, steps=15, keep="final", early_stop=True, progress=False)(x, y)
    assert (es.success_iteration[es.success] == es.iterations[es.success]).all()
    assert (hard_predict(model, es.adv)[es.success] != y[es.success]).all()


@pytest.mark.parametrize("cls,kw", [
    (FGSM, {"grad": "lgm", "lam": 2.0}),
    (IFGSM, {"valid_pixels": 0.5, "steps": 8}),
    (MIFGSM, {"grad": "lgm_st", "lam": 1.5, "steps": 8}),
    (PGD, {"grad": "lgm", "random_start": False, "valid_pixels": 0.3, "steps": 8}),
])
def test_samples_are_independent_of_the_batch(cls, kw):
    model = ToyShapes()
    x = seeded_rand((5, 2, 4, 4), 7)
    others = seeded_rand((5, 2, 4, 4), 8)
    others[3] = x[0]
    y = torch.tensor([0, 1, 2, 1, 0])
    y_others = torch.tensor([2, 2, 1, 0, 1])
    y_others[3] = y[0]
    batch = cls(model, eps=0.2, progress=False, **kw)(x, y)
    swapped = cls(model, eps=0.2, progress=False, **kw)(others, y_others)
    alone = cls(model, eps=0.2, progress=False, **kw)(x[2:3], y[2:3])
    torch.testing.assert_close(swapped.adv[3], batch.adv[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(alone.adv[0], batch.adv[2], rtol=0, atol=1e-6)
    assert alone.adv_pred[0] == batch.adv_pred[2] and swapped.adv_pred[3] == batch.adv_pred[0]


def test_pgd_random_start_is_seeded():
    model = ToyShapes()
    x = seeded_rand((3, 2, 4, 4), 9)
    y = hard_predict(model, x)
    a = PGD(model, eps=0.1, steps=2, seed=3, progress=False)(x, y)
    b = PGD(model, eps=0.1, steps=2, seed=3, progress=False)(x, y)
    c = PGD(model, eps=0.1, steps=2, seed=4, progress=False)(x, y)
    assert torch.equal(a.adv, b.adv) and not torch.equal(a.adv, c.adv)


def test_lgm_changes_the_attack_on_a_gated_model():
    """The soft gradient is not a no-op: FGM and LGM FGSM give different adversarial images."""
    model = ToyGated()
    x = near_boundary_inputs(model).float()
    y = torch.tensor([0, 1, 2])
    fgm = FGSM(model, eps=0.05, grad="fgm", progress=False)(x, y)
    lgm = FGSM(model, eps=0.05, grad="lgm", lam=0.5, progress=False)(x, y)
    assert not torch.equal(fgm.adv, lgm.adv)
    assert fgm.params["grad"] == "fgm" and lgm.params["grad"] == "lgm" and lgm.params["lam"] == 0.5


# --------------------------------------------------------------------------- parameters and plumbing


@pytest.mark.parametrize("cls", ALL)
def test_parameter_validation(cls):
    model = ToyGated()
    bad = [dict(eps=0), dict(eps=-0.1), dict(eps=1.5), dict(eps=8), dict(eps=float("nan")), dict(eps="8/255"),
           dict(eps=True), dict(valid_pixels=0), dict(valid_pixels=1.5), dict(grad="soft"), dict(lam=0),
           dict(targeted="yes"), dict(seed=1.5)]
    if cls is not FGSM:
        bad += [dict(alpha=0), dict(alpha=-1.0), dict(steps=-1), dict(keep="last"), dict(early_stop=1)]
    if cls is MIFGSM:
        bad += [dict(mu=-1.0), dict(mu=float("inf"))]
    if cls is PGD:
        bad += [dict(random_start="no")]
    for kw in bad:
        with pytest.raises(DynattackError) as info:
            cls(model, **kw)
        assert "\n" not in str(info.value)
    atk = cls(model, eps=0.1, progress=False)
    x = seeded_rand((2, 1, 4, 4), 0)
    with pytest.raises(DynattackError):
        atk(x)  # labels required
    with pytest.raises(DynattackError):
        atk(x * 2, torch.tensor([0, 1]))


def test_registry_and_command_line_parameters(tmp_path):
    assert {ATTACKS[k] for k in ("fgsm", "ifgsm", "pgd", "mifgsm")} == set(ALL)
    model = ToyShapes()
    cli = {"eps": 8 / 255, "grad": "lgm", "lam": 0.5}
    for name in ("fgsm", "ifgsm", "pgd", "mifgsm"):
        atk = build_attack(name, model, {**cli, **({} if name == "fgsm" else {"steps": 3})}, progress=False)
        assert atk.eps == 8 / 255 and atk.grad == "lgm" and atk.grad_lam == 0.5
    with pytest.raises(DynattackError):
        build_attack("fgsm", model, {"steps": 3}, progress=False)  # FGSM is one step
    with pytest.raises(DynattackError):
        build_attack("ifgsm", model, {"eps": 8.0}, progress=False)  # 8 meant 8/255
    # a run directory's summary carries the accuracy figures
    x = seeded_rand((6, 2, 4, 4), 3)
    y = hard_predict(model, x)
    atk = build_attack("ifgsm", model, {**cli, "steps": 3}, progress=False)
    config = RunConfig(victim="toy", attack="ifgsm", params=atk.params(), n=6, batch_size=4)
    records = run_attack(model, atk, config, x, y, tmp_path / "run", progress=False)
    summary = summarize(records, config.to_json())
    assert summary["clean_acc"] == 1.0 and summary["adv_acc"] < 1.0
    assert summary["arch_change_pct"] is not None and 0 <= summary["arch_change_pct"] <= 100


def test_attack_files_import_no_model_family():
    allowed_top = {"torch", "tqdm", "dataclasses", "typing", "math", "time", "contextlib", "__future__"}
    allowed_ours = {"gates", "cost", "metrics", "errors", "attacks"}
    for name in ("fgsm.py", "ifgsm.py", "pgd.py", "mifgsm.py"):
        tree = ast.parse((ATTACKS_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in allowed_top for a in node.names), (name, ast.dump(node))
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 0:
                    assert mod.split(".")[0] in allowed_top, (name, mod)
                elif node.level == 1:  # a sibling attack or the base
                    assert mod in {"base", "ifgsm"}, (name, mod)
                else:
                    assert (mod.split(".")[0] if mod else "") in allowed_ours, (name, mod)
