"""The FGM loop of the accuracy attacks does no redundant work, and its shortcuts change no result.

* Without a random start the first gradient forward runs the hard network on the clean images:
  that forward is the clean evaluation, so ``steps`` iterations cost ``steps`` forwards with a
  graph plus one to evaluate the final iterate (torchattacks' PGD runs ``steps``, and one more
  forward is needed to know its adversarial accuracy).
* The exact eps-ball clip is the float64 clip-and-round, computed once per call as two bounds.

Every result is compared with the generic path (the same attack made to evaluate the clean
images by a forward of their own) and, for the clip, with a float64 computation written here.
"""
import pytest
import torch

from dynattack import cost
from dynattack.attacks import FGSM, IFGSM, MIFGSM, PGD

from toy_models import ToyShapes


def seeded_rand(shape, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def generic(cls):
    """``cls`` evaluating the clean images with a forward of their own (the path before the shortcut)."""
    return type(f"Generic{cls.__name__}", (cls,), {"starts_at_clean": False})


def counted_run(atk, x, y):
    """Run ``atk``; return the result and, per forward of the victim, whether it built a graph."""
    calls = []
    handle = atk.model.register_forward_hook(lambda m, inputs, out: calls.append(out.requires_grad))
    try:
        return atk(x, y), calls
    finally:
        handle.remove()


def assert_same_result(a, b):
    for name in ("adv", "flops_clean", "flops_adv", "l2", "iterations", "success_iteration", "success",
                 "clean_pred", "adv_pred"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.history is None) == (b.history is None)
    for k, v in (a.history or {}).items():
        assert torch.equal(v.nan_to_num(-7.0), b.history[k].nan_to_num(-7.0)), k


def victim():
    model = ToyShapes()
    cost.profile(model, model.input_shape)  # calibrated outside the counted forwards
    return model


CASES = [  # (attack, keyword arguments, forwards with a graph, forwards without)
    (IFGSM, {"steps": 4}, 4, 1),
    (PGD, {"steps": 4, "random_start": False, "keep": "final", "history": True}, 4, 1),
    (PGD, {"steps": 4, "random_start": False}, 4, 1),  # keep="best"
    (MIFGSM, {"steps": 3, "valid_pixels": 0.5}, 3, 1),
    (FGSM, {}, 1, 1),
    (PGD, {"steps": 4}, 4, 2),  # random start: the clean images need their own forward
    (IFGSM, {"steps": 3, "grad": "lgm", "lam": 2.0}, 3, 1 + 3 + 1),  # soft gradient forwards: hard ones too
]


@pytest.mark.parametrize("cls,kw,graph,plain", CASES)
def test_the_clean_evaluation_is_the_first_gradient_forward(cls, kw, graph, plain):
    model = victim()
    x = seeded_rand((6, 2, 4, 4), 1)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    res, calls = counted_run(cls(model, eps=0.2, progress=False, **kw), x, y)
    assert (calls.count(True), calls.count(False)) == (graph, plain)
    ref = generic(cls)(model, eps=0.2, progress=False, **kw)(x, y)
    assert_same_result(res, ref)
    with torch.no_grad():
        assert torch.equal(res.clean_pred, model(x).argmax(1))


def test_early_stop_with_samples_fooled_from_the_start_takes_a_forward_of_its_own():
    """Rows already stopped at iteration 0: the clean forward covers rows the gradient must not."""
    model = victim()
    x = seeded_rand((6, 2, 4, 4), 2)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = pred.clone()
    y[:2] = (pred[:2] + 1) % 3  # misclassified when clean
    kw = {"steps": 4, "random_start": False, "early_stop": True, "history": True}
    res = PGD(model, eps=0.2, progress=False, **kw)(x, y)
    assert (res.iterations[:2] == 0).all() and (res.success_iteration[:2] == 0).all()
    assert_same_result(res, generic(PGD)(model, eps=0.2, progress=False, **kw)(x, y))


def float64_clip(x_new, x, eps):
    """Clip ``x_new - x`` to [-eps, eps] in float64, into [0, 1], round; one ulp back towards ``x``
    where the rounding left the ball."""
    x64 = x.double()
    out = (x64 + (x_new.double() - x64).clamp(-eps, eps)).clamp(0, 1).to(x.dtype)
    return torch.where((out.double() - x64).abs() > eps, torch.nextafter(out, x), out)


@pytest.mark.parametrize("eps", [8 / 255, 1 / 255, 0.3, 1e-3, 2.5 * 8 / 255 / 7])
def test_ball_clip_is_the_float64_projection(eps):
    atk = IFGSM(torch.nn.Linear(1, 1), eps=eps, progress=False)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randint(0, 256, (4000,), generator=g).float() / 255, torch.rand(4000, generator=g),
                   torch.tensor([0.0, 1.0, 0.5, 1 - 2 ** -24])])
    lo, hi = atk.ball(x)
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    # every value of the ball lies between lo and hi, and the next values beyond are out of it
    assert ((hi.double() - x.double()) <= eps).all() and ((x.double() - lo.double()) <= eps).all()
    assert ((hi == 1) | (torch.nextafter(hi, up).double() - x.double() > eps)).all()
    assert ((lo == 0) | (x.double() - torch.nextafter(lo, down).double() > eps)).all()
    step = 2 * eps / 3
    iterate = atk.project(x + step * (2 * torch.rand(x.shape, generator=g) - 1), x, None)
    # (lo's successor only where lo > 0: 2^-149 next to x is a difference float64 cannot hold)
    tries = [x + eps, x - eps, hi, lo, torch.nextafter(hi, up), torch.nextafter(lo, down),
             torch.nextafter(hi, down), torch.where(lo > 0, torch.nextafter(lo, up), lo), iterate + step, iterate - step,
             x + 3 * eps, x - 3 * eps, (x.double() + eps).float(), (x.double() - eps).float()]
    for x_new in tries:
        assert torch.equal(atk.project(x_new, x, None), float64_clip(x_new, x, eps))
        assert torch.equal(atk.project(x_new, x, None, (lo, hi)), float64_clip(x_new, x, eps))
