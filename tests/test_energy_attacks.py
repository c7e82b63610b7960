"""Energy attacks (ILFO, GradAuto) and the attack base, on hand-made gated toys whose gate logits
and unit costs are known in closed form (tests/toy_models.py)."""
import ast
import functools
import math
from pathlib import Path

import pytest
import torch

from dynattack import cost
from dynattack.attacks import ILFO, AccuracyAttack, GradAuto
from dynattack.attacks.base import PerSampleAdam, gate_units, victim_context, vjp
from dynattack.attacks.gradauto import rectify, tanh_space
from dynattack.errors import DynattackError
from dynattack.gates import Trace, iter_gates

from toy_models import ToyConflict, ToyGated, ToyShapes, conv_flops, toy_images

ATTACKS_DIR = Path(__file__).resolve().parents[1] / "src" / "dynattack" / "attacks"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny convolutions: a second thread only adds contention on a 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def decisions(model, x):
    with torch.no_grad(), Trace() as t:
        model(x)
    return {e.name: e.decision.clone() for e in t}


# --------------------------------------------------------------------------- costs and units


def test_unit_costs_and_weights_match_hand_count():
    model = ToyGated(dead_gate=True)
    prof = cost.calibrate(model, model.input_shape)
    assert prof.gated == {k: float(v) for k, v in ToyGated.COST.items()}
    assert prof.static == model.static_flops
    shapes = ToyShapes()
    cost.calibrate(shapes, shapes.input_shape)
    with torch.no_grad(), Trace() as t:
        shapes(toy_images(shapes, 3))
    u = gate_units(t, 3)
    c_ch, c_sp = ToyShapes.UNIT_COST["gate_ch"], ToyShapes.UNIT_COST["gate_sp"]
    expected = torch.tensor([c_ch] * 4 + [c_sp] * 16) / (4 * c_ch + 16 * c_sp)
    assert u.value.shape == (3, 20) and u.sizes == [4, 16]
    torch.testing.assert_close(u.weight.double(), expected.double())
    assert c_ch == conv_flops(2, 4, 4, 4) / 4


# --------------------------------------------------------------------------- GradAuto pieces


def test_tanh_space_zero_delta_is_exactly_the_input():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 7, 7, generator=g)
    x[:, :, 0] = 0.0
    x[:, :, 1] = 1.0
    x[:, :, 2] = 1e-8
    x[:, :, 3] = 1 - 1e-7
    for eps in (1e-6, 1e-3, 0.1):
        w = torch.atanh((2 * x - 1).clamp(-(1 - eps), 1 - eps))
        out, _ = tanh_space(x, w, torch.tanh(w), torch.zeros_like(x))
        assert torch.equal(out, x)
    model = ToyGated()
    imgs = toy_images(model, 4)
    res = GradAuto(model, steps=0, progress=False)(imgs)
    assert torch.equal(res.adv, imgs)
    assert (res.psnr == math.inf).all()


def test_contrast_compressed_start_is_the_compressed_image():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 6, 6, generator=g)
    x[:, :, 0] = 0.0
    x[:, :, 1] = 1.0
    for c in (1.0, 0.5, 0.1):
        atk = GradAuto(ToyGated(), start_contrast=c, progress=False)
        state = atk.init_state(x, None, None)
        start = atk.candidate(state, torch.arange(3))
        # atanh / tanh round trip in float32 near +-1: a few ulp of 1
        torch.testing.assert_close(start, 0.5 + c * (x - 0.5), rtol=0, atol=1e-6)
        assert c < 1 or torch.equal(start, x)


def test_tanh_jacobian_matches_autograd():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, 5, 5, generator=g)
    x[:, :, 0] = 0.0  # saturated pixels: the clamp's bound passes the gradient, beyond it does not
    x[:, :, 1] = 1.0
    w = torch.atanh((2 * x - 1).clamp(-0.7, 0.7))
    delta = torch.randn(2, 1, 5, 5, generator=g) * 0.5
    delta[0, 0, 0] = 0.0  # exactly at the bound
    delta = delta.requires_grad_()
    out, jac = tanh_space(x, w, torch.tanh(w), delta)
    assert ((out == 0) | (out == 1)).any() and (jac == 0).any() and (jac[0, 0, 0] > 0).all()
    upstream = torch.randn(out.shape, generator=g)
    (auto,) = torch.autograd.grad((out * upstream).sum(), delta)
    torch.testing.assert_close(upstream * jac.detach(), auto, rtol=1e-5, atol=1e-7)


def test_per_sample_adam_is_torch_adam_per_row():
    g = torch.Generator().manual_seed(3)
    grads = torch.randn(6, 3, 4, generator=g)
    param = torch.zeros(3, 4)
    ours = PerSampleAdam(param, lr=0.05)
    refs = [torch.zeros(4, requires_grad=True) for _ in range(3)]
    opts = [torch.optim.Adam([r], lr=0.05) for r in refs]
    for step in range(6):
        rows = torch.tensor([0, 1]) if step % 2 else torch.tensor([0, 1, 2])  # row 2 pauses
        ours.step(rows, grads[step, rows])
        for r in rows.tolist():
            refs[r].grad = grads[step, r].clone()
            opts[r].step()
    for r in range(3):
        torch.testing.assert_close(param[r], refs[r].detach(), rtol=1e-4, atol=1e-5)  # float32 op order


def test_rectify_norm_is_K_and_removes_the_opposed_component():
    g = torch.Generator().manual_seed(2)
    gc = torch.randn(8, 3, 5, 5, generator=g)
    gf = torch.randn(8, 3, 5, 5, generator=g)
    gf[:4] = -gc[:4] + 0.3 * gf[:4]  # conflicting samples
    gf[4] = gc[4]  # agreeing sample
    gf[5] = 0  # nothing on yet
    gc[6] = 0  # nothing off any more
    flat_c, flat_f = gc.flatten(1).double(), gf.flatten(1).double()
    dot = (flat_c * flat_f).sum(1)
    assert (dot[:4] < 0).all() and dot[4] > 0
    for K in (1e-3, 1.0, 100.0):
        out = rectify(gc, gf, K=K, magnitude=True).flatten(1).double()
        norms = out.norm(dim=1)
        nonzero = flat_c.norm(dim=1) > 0
        torch.testing.assert_close(norms[nonzero], torch.full_like(norms[nonzero], K), rtol=1e-5, atol=0)
        assert norms[6] == 0
        inner = (out * flat_f).sum(1)
        assert (inner >= -1e-5 * norms * flat_f.norm(dim=1)).all()
        # independent computation in float64: reject the component along g_F where opposed
        coef = torch.where(dot < 0, dot / (flat_f * flat_f).sum(1).clamp_min(1e-300), torch.zeros_like(dot))
        ref = flat_c - coef[:, None] * flat_f
        ref = torch.where(ref.norm(dim=1, keepdim=True) > 0, K * ref / ref.norm(dim=1, keepdim=True).clamp_min(1e-300), ref)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-6 * K)
    # direction only: norms untouched where nothing is opposed
    out = rectify(gc, gf, magnitude=False)
    torch.testing.assert_close(out[4:], gc[4:])


def test_gradauto_history_on_conflicting_gates():
    model = ToyConflict()
    x = toy_images(model, 3)
    res = GradAuto(model, K=0.5, steps=60, progress=False, history=True)(x)
    assert (res.recovery == 100).all()
    h = res.history
    T = h["active"].shape[0]
    assert h["gate_value"].shape == (T, 3, 2) and h["flops"].shape == (T, 3)
    assert res.gate_names == ["gate_a", "gate_b"]
    assert (h["angle_cf"][0] > 90).all()  # the two gradients conflict at the start
    ran = h["grad_norm_c"] > 0
    torch.testing.assert_close(h["grad_norm_rect"][ran], torch.full_like(h["grad_norm_rect"][ran], 0.5), rtol=1e-5, atol=0)
    cos = h["cos_rect"][torch.isfinite(h["cos_rect"])]
    assert cos.numel() > 0 and (cos >= -1e-5).all()
    # gate_a stayed on all along: RD kept it from being pushed down
    assert (h["gate_on"][..., 0][h["active"]] == 1).all()


# --------------------------------------------------------------------------- whole attacks


@pytest.mark.parametrize("toy", [ToyGated, ToyShapes])
@pytest.mark.parametrize("attack", [GradAuto, ILFO])
def test_full_recovery_on_toys(toy, attack):
    """Scalar gates and gates of unit shape (C,) and (H, W) alike, without new code."""
    model = toy()
    x = toy_images(model, 4)
    res = attack(model, progress=False)(x)
    assert (res.flops_clean < res.flops_full).all()
    assert (res.recovery == 100).all() and res.success.all()
    assert res.recovery_pct == 100
    assert res.adv.shape == x.shape and res.adv.min() >= 0 and res.adv.max() <= 1
    on = decisions(model, res.adv)
    assert all(d.all() for d in on.values())
    torch.testing.assert_close(res.l2, (res.adv - x).flatten(1).norm(dim=1).double())


@pytest.mark.parametrize("attack", [GradAuto, ILFO])
def test_switches_on_exactly_the_reachable_gates(attack):
    model = ToyGated(dead_gate=True)
    x = toy_images(model, 2)
    res = attack(model, steps=150, progress=False)(x)
    on = decisions(model, res.adv)
    assert on["gate_mean"].all() and on["gate_corner"].all() and not on["gate_dead"].any()
    expected = ToyGated.COST["gate_mean"] + ToyGated.COST["gate_corner"] + model.static_flops
    assert (res.flops_adv == expected).all()
    assert not res.success.any() and (res.iterations == 150).all()  # never all on: no early stop


def test_gradauto_early_stop_skips_finished_samples():
    model = ToyShapes()
    x = toy_images(model, 4)
    cost.calibrate(model, model.input_shape)  # its forward is not the attack's
    rows = []
    hook = model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    res = GradAuto(model, keep_optimising_distortion=False, progress=False)(x)
    hook.remove()
    # clean + one per iteration, the last one finding the last sample done (no final forward)
    assert len(rows) == 1 + int(res.iterations.max()) + 1
    assert res.iterations.unique().numel() > 1  # samples finished at different iterations
    assert rows[1:] == sorted(rows[1:], reverse=True) and rows[-1] < 4
    assert (res.success_iteration == res.iterations).all()


def test_backward_passes_per_iteration(monkeypatch):
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = ToyConflict()
    x = toy_images(model, 2)
    GradAuto(model, steps=20, early_stop=False, progress=False)(x)
    assert 20 < len(calls) <= 40  # g_C and g_F: at most two vector-Jacobian products
    calls.clear()
    ILFO(model, steps=20, progress=False)(x)
    assert len(calls) == 20


def project_all_on_toy(x, rounds=20000):
    """Dykstra's alternating projections onto ToyGated's three convex all-on constraints."""
    y = x.flatten(1).double().clone()
    sets = [lambda z: z + (0.5 - z.mean(1, keepdim=True)).clamp_min(0),
            lambda z: torch.cat([z[:, :1].clamp_min(0.7), z[:, 1:]], 1),
            lambda z: z.clamp(0, 1)]
    corr = [torch.zeros_like(y) for _ in sets]
    for _ in range(rounds):
        for i, proj in enumerate(sets):
            z = proj(y + corr[i])
            corr[i] = y + corr[i] - z
            y = z
    return y


def test_keep_optimising_distortion_lowers_distortion_and_stays_on():
    model = ToyGated()
    x = toy_images(model, 4)
    plain = GradAuto(model, keep_optimising_distortion=False, progress=False)(x)
    polished = GradAuto(model, keep_optimising_distortion=True, progress=False, history=True)(x)
    assert (polished.recovery == 100).all()
    assert all(d.all() for d in decisions(model, polished.adv).values())
    assert (polished.adv >= 0).all() and (polished.adv <= 1).all()
    assert (polished.l2 <= plain.l2 + 1e-9).all()
    # ToyGated's all-on set is {mean(x) >= 0.5} & {x[0] >= 0.7} & [0, 1]^16, convex: its least
    # distorted point is the Euclidean projection, computed independently (Dykstra's algorithm)
    exact = (project_all_on_toy(x) - x.flatten(1).double()).norm(dim=1)
    assert (polished.l2 >= exact - 1e-6).all() and (polished.l2 <= 1.005 * exact).all()
    # the search runs to the last iteration, crossing the boundary both ways (the radius shrinks
    # off it and grows back), and each sample returns its least distorted all-on iterate
    h = polished.history
    assert (polished.iterations == 300).all()
    searching = h["on_boundary"].bool()
    assert searching[-1].all()
    all_on = h["gate_on"].amin(2) == 1
    for b in range(4):
        assert (~all_on[:, b][searching[:, b]]).any() and all_on[:, b][searching[:, b]].any()
        best = h["l2"][:, b][all_on[:, b]].min()  # (the iterate after the last update is offered too)
        assert polished.l2[b] <= best + 1e-9


@pytest.mark.parametrize("attack", [GradAuto, ILFO])
def test_samples_are_independent_of_the_batch(attack):
    model = ToyGated()
    x = toy_images(model, 4)
    others = toy_images(model, 4, seed=5)
    others[0] = x[0]
    batch = attack(model, steps=120, progress=False)(x)
    swapped = attack(model, steps=120, progress=False)(others)
    alone = attack(model, steps=120, progress=False)(x[1:2])
    torch.testing.assert_close(swapped.adv[0], batch.adv[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(alone.adv[0], batch.adv[1], rtol=0, atol=1e-6)
    assert alone.iterations[0] == batch.iterations[1] and alone.flops_adv[0] == batch.flops_adv[1]


def test_modes_and_training_flags_are_restored():
    model = ToyShapes()
    model.train()
    model.conv_sp.eval()
    model.gate_ch.mode, model.gate_ch.lam = "lgm", 2.5
    model.gate_sp.mode, model.gate_sp.force = "train", "off"
    before = [(g.mode, g.lam, g.force) for _, g in iter_gates(model)]
    flags = [m.training for m in model.modules()]
    x = toy_images(model, 2)
    GradAuto(model, steps=5, progress=False)(x)
    ILFO(model, steps=5, progress=False)(x)

    def boom(ev, labels):
        raise RuntimeError("criterion failed")

    atk = GradAuto(model, steps=5, progress=False)
    atk.criterion = boom
    with pytest.raises(RuntimeError):
        atk(x)
    assert [(g.mode, g.lam, g.force) for _, g in iter_gates(model)] == before
    assert [m.training for m in model.modules()] == flags


class _OwnNorm(torch.nn.BatchNorm2d):
    def forward(self, x):  # a subclass with its own forward is left alone
        return super().forward(x) * 2


def test_attack_context_batchnorm_same_outputs_and_input_gradient():
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 3), _OwnNorm(4), torch.nn.Flatten(),
                                torch.nn.Linear(64, 6), torch.nn.BatchNorm1d(6))
    x = torch.rand(16, 2, 8, 8, generator=gen)
    with torch.no_grad():  # calibrated statistics (O(1) activations) and non-trivial affine parameters
        model.train()
        for _ in range(20):
            model(x)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
    model.eval()
    w = torch.randn(16, 6, generator=gen)

    def run():
        leaf = x.clone().requires_grad_()
        out = model(leaf)
        return out.detach(), torch.autograd.grad((out * w).sum(), leaf)[0]

    out_ref, g_ref = run()
    with victim_context(model):
        assert isinstance(vars(model[1]).get("forward"), functools.partial)  # the closed-form backward runs
        assert "forward" not in vars(model[4])
        with victim_context(model):  # nested: the inner context leaves the outer's in place
            pass
        assert "forward" in vars(model[1])
        out, g = run()
    assert torch.equal(out, out_ref)  # PyTorch's own forward
    # float32 rounding of two algebraically equal gradients: the relative scale is ~1e-7
    assert (g - g_ref).abs().max() <= 1e-5 * g_ref.abs().max()
    with pytest.raises(RuntimeError), victim_context(model):
        raise RuntimeError("inside")
    assert all("forward" not in vars(m) for m in model.modules())


def test_attack_files_import_no_model_family():
    allowed_top = {"torch", "tqdm", "dataclasses", "typing", "math", "time", "contextlib", "functools",
                   "__future__"}
    allowed_ours = {"gates", "cost", "metrics", "errors", "prediction", "attacks"}
    files = sorted(ATTACKS_DIR.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "base.py", "ilfo.py", "gradauto.py"}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                for a in node.names:
                    assert a.name.split(".")[0] in allowed_top, (f.name, a.name)
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 0:
                    top = mod.split(".")[0]
                    if top == "dynattack":
                        assert mod.split(".")[1] in allowed_ours, (f.name, mod)
                    else:
                        assert top in allowed_top, (f.name, mod)
                elif node.level == 1:  # inside attacks/
                    assert "models" not in mod, (f.name, mod)
                else:  # from ..x import y / from .. import y
                    names = [mod.split(".")[0]] if mod else [a.name for a in node.names]
                    assert set(names) <= allowed_ours, (f.name, mod, names)


def test_parameter_validation():
    model = ToyGated()
    bad = [dict(K=0), dict(K=-1.0), dict(steps=-1), dict(steps=2.5), dict(lr="a"), dict(rd_start=-1),
           dict(tanh_eps=1.0), dict(early_stop="yes"), dict(K=float("nan")), dict(start_contrast=0),
           dict(start_contrast=1.5)]
    for kw in bad:
        with pytest.raises(DynattackError):
            GradAuto(model, **kw)
    for kw in [dict(lam=0), dict(batch_ref=0), dict(lr=-0.1)]:
        with pytest.raises(DynattackError):
            ILFO(model, **kw)
    atk = GradAuto(model, steps=1, progress=False)
    for x in [torch.rand(2, 1, 4, 4) * 2, torch.zeros(2, 1, 4, 4, dtype=torch.long), torch.full((1, 1, 4, 4), float("nan"))]:
        with pytest.raises(DynattackError):
            atk(x)
    with pytest.raises(DynattackError):
        GradAuto(torch.nn.Linear(16, 3), steps=1, progress=False)(torch.rand(2, 16))  # no gates


# --------------------------------------------------------------------------- accuracy attacks plug in


class _SignStep(AccuracyAttack):
    """A minimal I-FGSM written on the base, as FGSM/PGD will be: only the hooks."""

    name = "sign-step"

    def __init__(self, model, eps, alpha, **kw):
        super().__init__(model, **kw)
        self.eps, self.alpha = eps, alpha

    def init_state(self, images, labels, clean):
        return {"x": images, "labels": labels, "adv": images.clone()}

    def forward_input(self, state, idx):
        leaf = state["adv"][idx].requires_grad_()
        return leaf, leaf

    def step(self, state, idx, leaf, fwd, keep, it):
        loss = torch.nn.functional.cross_entropy(fwd.logits, state["labels"][idx], reduction="none")
        g = vjp(loss, leaf)
        x = state["x"][idx]
        adv = torch.min(torch.max(leaf.detach() + self.alpha * g.sign(), x - self.eps), x + self.eps).clamp(0, 1)
        state["adv"][idx[keep]] = adv[keep]
        return {"loss": loss.detach()}


@pytest.mark.parametrize("grad", ["fgm", "lgm"])
def test_accuracy_attack_plugs_into_the_base(grad):
    model = ToyShapes()
    x = torch.rand(6, *model.input_shape, generator=torch.Generator().manual_seed(3))  # some units on
    with torch.no_grad():
        labels = model(x).argmax(1)
    with pytest.raises(DynattackError):
        _SignStep(model, 0.3, 0.05, steps=10, progress=False)(x)  # labels required
    res = _SignStep(model, 0.3, 0.05, steps=10, grad=grad, lam=2.0, early_stop=True, progress=False)(x, labels)
    assert (res.clean_pred == labels).all()
    assert res.success.any()
    assert (res.adv_pred[res.success] != labels[res.success]).all()
    with torch.no_grad():
        assert (model(res.adv).argmax(1) == res.adv_pred).all()  # figures come from the hard network
    assert (res.linf <= 0.3 + 1e-6).all()
    assert (res.iterations[res.success] == res.success_iteration[res.success]).all()
    assert model.gate_ch.mode == "hard"


def test_static_victim_and_inference_mode_caller():
    """A victim without gates runs everything (recovery NaN); callers may hold inference_mode."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        labels = model(x).argmax(1)
    toy = ToyGated()
    with torch.inference_mode():
        res = _SignStep(model, 0.5, 0.1, steps=4, progress=False)(x, labels)
        energy = GradAuto(toy, steps=3, early_stop=False, progress=False)(toy_images(toy, 2))
    assert (res.flops_adv == res.flops_full).all() and res.recovery.isnan().all()
    assert (energy.iterations == 3).all()


# --------------------------------------------------------------------------- ILFO's per-sample figures


class IterateSpy(ILFO):
    """Records every input the gradient forward runs on (ILFO's unclipped iterates)."""

    def forward_input(self, state, idx):
        x, leaf = super().forward_input(state, idx)
        self.seen.append(x.detach().clone())
        return x, leaf


def toy_all_on(x):
    """ToyGated's two reachable gates in closed form: mean(x) >= 0.5 and x[0, 0, 0] >= 0.7."""
    return (x.mean((1, 2, 3)) >= 0.5) & (x[:, 0, 0, 0] >= 0.7)


def test_ilfo_success_iteration_is_the_first_all_on_iterate_as_run():
    model = ToyGated()
    x = toy_images(model, 4)
    x[3] = 0.8  # all on from the start: iteration 0
    atk = IterateSpy(model, steps=40, progress=False, history=True)
    atk.seen = []
    res = atk(x)
    assert res.success_iteration_of == "iterate" and len(atk.seen) == 40
    on = torch.stack([toy_all_on(s) for s in atk.seen])  # (T, B): iteration t ran seen[t]
    expected = torch.where(on.any(0), on.int().argmax(0), -1)
    # it used to be `steps` for every sample that succeeded, whatever its iterates did
    assert torch.equal(res.success_iteration, expected)
    assert res.success_iteration[3] == 0 and (res.success_iteration[:3] > 0).all()
    assert (res.success_iteration < 40).all() and (res.iterations == 40).all()  # ILFO runs every step
    assert torch.equal(res.history["gate_on"].amin(2) == 1, on)  # the history describes the same inputs
    assert torch.equal(res.success, toy_all_on(res.adv))  # success: the returned, clamped input


def test_ilfo_never_returns_a_non_finite_input():
    """A step that would overflow (here forced with a huge lr x hinge weight; ManiDP's own
    gradients did it at the defaults) is not taken: the returned input stays finite."""
    from dynattack.attacks import ILFO
    from toy_models import ToyGated, toy_images

    model = ToyGated().eval()
    cost.calibrate(model, model.input_shape)
    res = ILFO(model, steps=5, lr=1e10, hinge_weight=1e38, progress=False)(toy_images(model, 4))
    assert torch.isfinite(res.adv).all() and torch.isfinite(res.flops_adv).all()
