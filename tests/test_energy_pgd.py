"""EnergyPGD, the budgeted energy attack: it never leaves the eps ball or [0, 1] (every iterate, no
tolerance), restarts never lose FLOPs against one restart of the same seed, and on toys whose gate
logits are known functions of the pixels it switches units on within 8/255 (checked from the
pixels, by hand, not from the attack's own accounting)."""
import pytest
import torch

from dynattack import cost
from dynattack.attacks import ATTACKS, EnergyPGD
from dynattack.errors import DynattackError
from toy_models import ToyConflict, ToyGated, ToyShapes, toy_images


def calibrated(model):
    cost.calibrate(model, model.input_shape)
    return model.eval()


class Recorded(EnergyPGD):
    """EnergyPGD that keeps every input its gradient forward ran (every iterate of every restart;
    with ``early_stop=False`` every restart runs on the whole batch, so ``idx`` indexes it)."""

    seen: list

    def __call__(self, images, labels=None):
        self.seen = []
        return super().__call__(images, labels)

    def forward_input(self, state, idx):
        self.seen.append((idx.clone(), state["adv"][idx].clone()))
        return super().forward_input(state, idx)


def assert_in_ball(x, adv, eps):
    """|adv - x| <= eps and 0 <= adv <= 1, elementwise, computed in float64, with no tolerance."""
    d = (adv.double() - x.double()).abs()
    assert float(d.max()) <= eps, float(d.max()) - eps
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1


@pytest.mark.parametrize("eps", [1 / 255, 8 / 255, 16 / 255, 0.3])
@pytest.mark.parametrize("grad", ["fgm", "lgm"])
def test_every_iterate_stays_in_the_ball_and_the_box(eps, grad):
    for model in (ToyGated(), ToyShapes(), ToyConflict()):
        model = calibrated(model)
        x = toy_images(model, 5)
        if isinstance(model, ToyGated):
            x[:, 0, 3, 3] = 1.0  # saturated pixels on both sides: the box cuts the ball
            x[:, 0, 3, 2] = 0.0
        # a large step: every sign step overshoots, so the projection does all the work
        atk = Recorded(model, eps=eps, steps=8, alpha=eps, grad=grad, restarts=2, early_stop=False, progress=False)
        res = atk(x)
        assert atk.seen
        assert len(atk.seen) == 2 * 8  # both restarts, every iteration
        for idx, adv in atk.seen:
            assert_in_ball(x[idx], adv, eps)
        assert_in_ball(x, res.adv, eps)
        assert torch.equal(res.linf <= eps, torch.ones(len(x), dtype=torch.bool))


def test_random_start_is_inside_the_ball_and_seeded():
    model = calibrated(ToyShapes())
    x = toy_images(model, 4)
    a = Recorded(model, eps=4 / 255, steps=1, progress=False, seed=3)
    a(x)
    start = a.seen[0][1]
    assert_in_ball(x, start, 4 / 255)
    assert not torch.equal(start, x)
    b = Recorded(model, eps=4 / 255, steps=1, progress=False, seed=3)
    b(x)
    assert torch.equal(b.seen[0][1], start)


def hand_decisions(adv):
    """ToyConflict's gates from the pixels (tests/toy_models.py): (gate_a on, gate_b on)."""
    p = adv.double().flatten(1)
    q_a = 20 * (p[:, 0] - p[:, 1]) + 1
    q_b = 20 * (p[:, 1] - p[:, 0]) + 20 * (p[:, 2] - 0.5) - 0.5
    return q_a >= 0, q_b >= 0


@pytest.mark.parametrize("grad", ["fgm", "lgm", "lgm_st"])
def test_switches_units_on_within_8_of_255(grad):
    model = calibrated(ToyConflict())
    x = toy_images(model, 6)
    a0, b0 = hand_decisions(x)
    assert bool(a0.all()) and not bool(b0.any())  # clean: gate_b off everywhere
    res = EnergyPGD(model, eps=8 / 255, steps=20, grad=grad, progress=False)(x)
    a, b = hand_decisions(res.adv)
    assert bool((a & b).all())  # both on, from the pixels
    assert bool(res.success.all())
    assert bool((res.flops_adv > res.flops_clean).all())
    assert res.recovery_pct == pytest.approx(100.0)
    assert_in_ball(x, res.adv, 8 / 255)


def test_no_budget_no_change_on_an_unreachable_gate():
    """ToyGated's gates need the mean at 0.5 or a corner at 0.7: out of reach from ~0.2 within 8/255,
    so the attack returns the clean images (nothing better found) and says so."""
    model = calibrated(ToyGated())
    x = toy_images(model, 4)
    res = EnergyPGD(model, eps=8 / 255, steps=10, progress=False)(x)
    assert torch.equal(res.flops_adv, res.flops_clean)
    assert torch.equal(res.adv, x)
    assert not bool(res.success.any())


@pytest.fixture(scope="module")
def hrl():
    from dynattack import create_model
    from dynattack.data import load_fashion_mnist

    try:
        images, _ = load_fashion_mnist("test")
    except DynattackError as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
    return create_model("skipnet38-rnn-hrl"), images[:4].clone()


def test_restarts_never_lower_the_flops(hrl):
    model, x = hrl
    one = EnergyPGD(model, eps=8 / 255, steps=10, restarts=1, seed=5, progress=False)(x)
    more = EnergyPGD(model, eps=8 / 255, steps=10, restarts=3, seed=5, progress=False)(x)
    assert bool((more.flops_adv >= one.flops_adv).all())
    assert bool((more.iterations >= one.iterations).all())
    # restart 0 is the one-restart run: where no later restart did better, the same input
    same = more.flops_adv == one.flops_adv
    assert torch.equal(more.adv[same & (more.l2 == one.l2)], one.adv[same & (more.l2 == one.l2)])
    assert_in_ball(x, more.adv, 8 / 255)
    # the per-sample figures describe the returned input, measured on the hard network again
    from dynattack.gates import Trace

    with torch.no_grad(), Trace() as trace:
        model(more.adv)
    assert torch.equal(cost.executed_flops(model, trace).double(), more.flops_adv)


def test_parameters_are_checked():
    model = calibrated(ToyGated())
    for kw in ({"eps": 0}, {"eps": 2}, {"eps": -1 / 255}, {"restarts": 0}, {"grad": "soft"}, {"lam": 0},
               {"alpha": -1.0}, {"random_start": "yes"}, {"restarts": 2, "random_start": False}):
        with pytest.raises(DynattackError):
            EnergyPGD(model, **kw)
    assert ATTACKS["energy-pgd"] is EnergyPGD
    p = EnergyPGD(model, eps=8 / 255, steps=10).params()
    assert p["alpha"] == pytest.approx(2.5 * (8 / 255) / 10)
    assert {"eps", "alpha", "random_start", "restarts", "grad", "lam", "steps", "seed"} <= set(p)
