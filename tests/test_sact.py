"""SACT: halting semantics against a literal re-implementation of the official loop, FLOPs
accounting vs FlopCounterMode on the real sparse execution, masked vs real execution, per-sample
decisions, gate-value gradients, attacks unchanged, training smoke run.

Checks go against independent computations: the official ``spatially_adaptive_computation_time``
loop (cumulative sum, finished flags, remainder, ponder cost) written out with dense ops,
``FlopCounterMode`` over the gathered execution of single samples, FLOPs counted by hand, finite
differences, and each sample run alone.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json

import pytest
import torch
import torch.nn.functional as F

from dynattack import cost
from dynattack.errors import DynattackError
from dynattack.gates import Trace, gate_mode, iter_gates
from dynattack.models import get_spec, load_weights
from dynattack.models.sact import LOGIT_SCALE, sact_cifar
from model_helpers import (
    assert_clear_of_threshold,
    assert_decisions_batch_independent,
    assert_flops_equal_real_execution,
    assert_logits_close,
    calibrate_bn,
    hard_run,
)

FMNIST = {"in_channels": 1, "num_classes": 10, "input_size": 28, "mean": (0.2860,), "std": (0.3530,)}


# A run gate's logit is LOGIT_SCALE (1 - eps - c) with c ~ 0.99 near its threshold: its float32
# rounding is ~4 ulp(1) = 5e-7, and the kernels' rounding of a halting logit z (~1e-6) reaches it
# scaled by LOGIT_SCALE sigmoid'(z) ~ 0.04. halting_shift keeps every such logit >= 3e-5 from 0
# on the test batch (the sigmoid is flat there); this margin is 40 times that rounding.
MARGIN = 2e-5


def run_event(trace: Trace, unit):
    return next(e for e in trace if e.name == unit.run_gate.name)


def halting_shift(z: torch.Tensor, c: torch.Tensor, eps: float) -> float:
    """The shift ``b`` of halting logits ``z`` (positions with cumulative halting ``c``) that stops
    the positions near the median and keeps the next run gate's logits
    ``LOGIT_SCALE (1 - eps - c - sigmoid(z + b))`` farthest from 0: ``b`` from the midpoints of
    neighbouring ``logit(1 - eps - c) - z`` between their quantiles 0.35 and 0.65."""
    v = (torch.logit(1 - eps - c) - z).double().sort().values
    i, j = int(0.35 * (len(v) - 1)), int(0.65 * (len(v) - 1)) + 1
    shifts = (v[i:j] + v[i + 1:j + 1]) / 2
    q = LOGIT_SCALE * (1 - eps - c.double() - torch.sigmoid(z.double() + shifts[:, None]))
    return float(shifts[q.abs().min(1).values.argmax()])


def centre_halting(model, x: torch.Tensor) -> None:
    """Shift each halting unit's bias (in forward order) so that about half the positions still
    pondering at its unit stop after it: a position goes on while ``z <= logit(1 - eps - c)``.
    The shift puts that threshold in the widest gap near the median, away from every position."""
    with torch.no_grad():
        for stage in model.stages:
            for i, unit in enumerate(stage[:-1]):
                seen = []
                hook = unit.halting.register_forward_hook(lambda mod, inp, out: seen.append(out))
                with Trace() as trace:
                    model(x)
                hook.remove()
                if i == 0:
                    c, on = torch.zeros_like(seen[0]), torch.ones_like(seen[0], dtype=torch.bool)
                else:
                    e = run_event(trace, unit)
                    c, on = 1 - model.eps - e.logit / LOGIT_SCALE, e.decision
                unit.halting.conv.bias += halting_shift(seen[0][on], c[on], model.eps)


@functools.lru_cache(maxsize=None)
def _small(depth: int, seed: int, batch: int):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = sact_cifar(depth, **FMNIST).eval()
    x = torch.rand(batch, 1, 28, 28, generator=gen) * torch.linspace(0.2, 1.0, batch).view(-1, 1, 1, 1)
    calibrate_bn(model, x, gen)
    centre_halting(model, x)
    return model, x


def small_sact(depth: int = 20, seed: int = 0, batch: int = 6):
    """A random-init SACT-20 on 1x28x28 in eval mode with mixed decisions on its batch."""
    model, x = _small(depth, seed, batch)
    return copy.deepcopy(model), x.clone()


def official_sact(model, x: torch.Tensor):
    """The official ``spatially_adaptive_computation_time`` loop (sact ``act.py``) on our units,
    dense: ``residual_mask`` = not finished, frozen positions keep their state. Our units are
    post-activation, so an updated position is ``relu(x + F(x))``. Returns (logits, the residual
    mask of every unit after the first, ponder cost summed over stages)."""
    eps = model.eps
    masks, ponder_total = [], 0.0
    with torch.no_grad():
        net = F.relu(model.bn1(model.conv1(model.normalize(x))))
        for stage in model.stages:
            for unit_idx, unit in enumerate(stage):
                if unit_idx == 0:
                    state = unit.dense(net)
                    shape = (state.shape[0], *state.shape[2:])
                    cumsum, finished = torch.zeros(shape), torch.zeros(shape, dtype=torch.bool)
                    remainder, ponder = torch.ones(shape), torch.ones(shape)  # ponder: the off-by-one fix
                    outputs = 0.0
                else:
                    residual_mask = ~finished
                    masks.append(residual_mask)
                    branch = unit.bn2(unit.conv2(F.relu(unit.bn1(unit.conv1(state)))))
                    state = torch.where(residual_mask[:, None], F.relu(state + branch), state)
                last = unit_idx == len(stage) - 1
                proba = torch.ones(shape) if last else torch.sigmoid(unit.halting(state))
                cumsum = cumsum + proba
                cur_finished = cumsum > 1 - eps  # official ">=": the tie has measure zero
                proba = torch.where(cur_finished, torch.zeros(shape), proba)
                just_finished = ~finished & cur_finished
                distrib = torch.where(just_finished, remainder, proba)
                ponder = ponder + torch.where(cur_finished, torch.where(just_finished, remainder, 0.0), 1.0)
                outputs = outputs + state * distrib[:, None]
                remainder = remainder - proba
                finished = cur_finished
            net = outputs
            ponder_total = ponder_total + ponder.flatten(1).mean(1)
        logits = model.fc(net.mean((2, 3)))
    return logits, masks, ponder_total


# -- semantics -----------------------------------------------------------------------------------


def test_gates_units_and_costs():
    model, x = small_sact()
    gates = dict(iter_gates(model))
    assert len(gates) == 2 * 2 * 3  # run and dilated gate of units 1 and 2 of each stage
    unit = model.layer2[1]
    assert unit.run_gate.controls == [unit.conv2, unit.halting.conv]
    assert model.layer2[2].run_gate.controls == [model.layer2[2].conv2]  # the last unit has no halting unit
    assert unit.dilate_gate.controls == [unit.conv1]
    assert model.layer2[0].halting is not None and not hasattr(model.layer2[0], "run_gate")
    _, trace = hard_run(model, x)
    assert [e.name for e in trace][:2] == ["layer1.1.run_gate", "layer1.1.dilate_gate"]
    assert trace.events[0].logit.shape == (len(x), 28, 28) and trace.events[4].logit.shape == (len(x), 14, 14)
    # unit costs: FLOPs per position of conv2 (+ the halting unit's 3x3 conv to 1 channel), conv1
    cost.calibrate(model, model.input_shape)
    assert float(unit.run_gate.unit_cost) == 2 * 9 * 32 * 32 + 2 * 9 * 32
    assert float(model.layer2[2].run_gate.unit_cost) == 2 * 9 * 32 * 32
    assert float(unit.dilate_gate.unit_cost) == 2 * 9 * 32 * 32
    for e in trace:
        assert torch.equal(e.decision, e.value >= e.tau), e.name


def test_halting_matches_the_official_loop():
    model, x = small_sact()
    logits, trace = hard_run(model, x)
    assert_clear_of_threshold(trace, MARGIN)
    ref_logits, ref_masks, ref_ponder = official_sact(model, x)
    runs = [e.decision for e in trace if e.name.endswith("run_gate")]
    assert len(runs) == len(ref_masks) == 6
    for ours, ref in zip(runs, ref_masks):
        assert torch.equal(ours, ref)
    rates = torch.stack([r.float().mean() for r in runs])
    assert ((rates > 0.05) & (rates < 0.95)).all(), "every unit must run at some positions and not others"
    assert_logits_close(logits, ref_logits)
    with torch.no_grad():
        _, ponder = model.forward_ponder(x)
    assert_logits_close(ponder, ref_ponder)
    # the dilated gate is the run mask's 3x3 neighbourhood, and holds it
    for run, dil in zip(trace.events[0::2], trace.events[1::2]):
        ref = F.max_pool2d(run.decision.float()[:, None], 3, 1, 1)[:, 0].bool()  # the official max-pool dilation
        assert torch.equal(dil.decision, ref) and (dil.decision | ~run.decision).all()


# -- FLOPs -----------------------------------------------------------------------------------------


def test_executed_flops_equal_flop_counter_on_real_execution():
    model, x = small_sact()
    prof = cost.calibrate(model, model.input_shape)
    assert_flops_equal_real_execution(model, x, prof, margin=MARGIN)
    # static, by hand: stem, each stage's first unit (convs, projection, halting conv), every
    # halting unit's global fc, classifier
    static = 2 * 9 * 1 * 16 * 784 + 2 * 64 * 10
    for cin, c, hw in ((16, 16, 784), (16, 32, 196), (32, 64, 49)):
        static += 2 * 9 * cin * c * hw + 2 * 9 * c * c * hw + (2 * cin * c * hw if cin != c else 0)
        static += 2 * 9 * c * hw + 2 * 2 * c
    assert prof.static == static


def test_masked_and_real_execution_give_the_same_logits():
    model, x = small_sact()
    logits, trace = hard_run(model, x)
    assert_clear_of_threshold(trace, MARGIN)
    with torch.no_grad(), Trace() as real:
        out = model.forward_conditional(x)
    assert torch.equal(real.flat("decision"), trace.flat("decision"))
    assert_logits_close(real.flat("logit"), trace.flat("logit"))
    assert_logits_close(out, logits)
    for i in range(len(x)):
        with torch.no_grad():
            assert_logits_close(model.forward_conditional(x[i:i + 1]), logits[i:i + 1])
    with torch.no_grad(), gate_mode(model, "train"):  # hard decisions too
        assert_logits_close(model.forward_conditional(x), model(x))


def test_decisions_do_not_depend_on_the_rest_of_the_batch():
    assert_decisions_batch_independent(*small_sact(), margin=MARGIN)


# -- gradients -------------------------------------------------------------------------------------


def tiny_sact():
    """SACT-14 with widths 2/3/4 on 1x8x8, double precision, mixed decisions."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = sact_cifar(14, in_channels=1, input_size=8, mean=(0.5,), std=(0.5,), widths=(2, 3, 4)).double().eval()
    x = torch.rand(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    calibrate_bn(model, x, gen)
    centre_halting(model, x)
    return model, x


def test_gate_values_carry_input_gradient_matching_finite_differences():
    model, x = tiny_sact()

    def values_of(inp):
        with Trace() as trace:
            model(inp)
        return trace, sum(e.value.sum() for e in trace if e.name.endswith("run_gate"))

    x = x.requires_grad_()
    trace, total = values_of(x)
    assert all(not e.mask.requires_grad for e in trace)  # hard forward: no gradient through decisions (FGM)
    decisions = trace.flat("decision")
    assert decisions.any() and not decisions.all()
    (grad,) = torch.autograd.grad(total, x)
    assert grad.abs().sum() > 0
    h = 1e-6
    flat = x.detach().flatten()
    for j in range(0, flat.numel(), 3):
        e = torch.zeros_like(flat)
        e[j] = h
        with torch.no_grad():
            up_trace, up = values_of((flat + e).view_as(x))
            down_trace, down = values_of((flat - e).view_as(x))
        assert torch.equal(up_trace.flat("decision"), decisions) and torch.equal(down_trace.flat("decision"), decisions)
        fd = ((up - down) / (2 * h)).item()
        assert abs(fd - grad.flatten()[j].item()) <= 1e-6 + 1e-5 * abs(fd)


def test_lgm_masks_are_soft_and_carry_gradient():
    model, x = tiny_sact()
    x = x.requires_grad_()
    with gate_mode(model, "lgm", lam=3.0), Trace() as trace:
        out = model(x)
    for e in trace:
        torch.testing.assert_close(e.mask, torch.sigmoid(3.0 * e.logit))
        assert e.mask.requires_grad
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.abs().sum() > 0


def test_ponder_gradient_raises_halting_in_training():
    model, x = tiny_sact()
    with gate_mode(model, "train"), Trace() as trace:
        _, ponder = model.forward_ponder(x)
    assert all(not e.mask.requires_grad for e in trace)  # the paper: no gradient through N
    ponder.sum().backward()
    for stage in model.stages:
        for unit in stage[:-1]:  # more halting, less remainder: every halting bias is pushed up
            assert unit.halting.conv.bias.grad.item() < 0


# -- attacks run unchanged -----------------------------------------------------------------------


def test_attacks_run_unchanged():
    from dynattack.attacks import IFGSM, ILFO, GradAuto

    model, x = small_sact(batch=2)
    res = GradAuto(model, steps=3, progress=False)(x)
    assert res.adv.shape == x.shape and torch.isfinite(res.flops_adv).all()
    assert (res.flops_adv >= res.flops_clean).all() and (res.flops_adv <= res.flops_full).all()
    assert len(res.gate_names) == 12
    assert ILFO(model, steps=2, progress=False)(x).adv.shape == x.shape
    for grad in ("fgm", "lgm", "lgm_st"):
        res = IFGSM(model, eps=8 / 255, steps=2, grad=grad, lam=10.0, progress=False)(x, torch.tensor([1, 7]))
        assert (res.adv - x).abs().max() <= 8 / 255 + 1e-6


# -- training ------------------------------------------------------------------------------------


def test_training_smoke_run_writes_weights_and_card(tmp_path, fashion_mnist_available):
    from dynattack.models.resnet import ResNet
    from dynattack.train import _recipe, train_model
    from dynattack.train.common import save_victim

    spec = get_spec("sact20-fmnist")
    assert _recipe(spec.family).__name__ == "train_sact" and spec.train_args["init_from"] == "resnet20-fmnist"
    # a static ResNet-20 loads into the backbone (only halting units missing)
    static = ResNet(20, **FMNIST)
    save_victim(static, "resnet20-fmnist", {"name": "resnet20-fmnist"}, tmp_path)
    init = tmp_path / "resnet20-fmnist.safetensors"
    path = train_model("sact20-fmnist", seed=0, out_dir=tmp_path, epochs=1, limit=64, log=lambda *_: None)
    saved = json.loads((tmp_path / "sact20-fmnist.json").read_text())
    assert path.exists() and saved["family"] == "sact" and saved["tau"] == spec.train_args["tau"]
    assert saved["init_from"] == "resnet20-fmnist"
    for key in ("accuracy", "compute_kept_pct", "compute_saved_pct", "ponder_mean", "flops_full", "train_command",
                "seed", "epochs", "train_seconds", "machine", "train_args"):
        assert key in saved
    assert 0 < saved["compute_kept_pct"] <= 100 and 6 <= saved["ponder_mean"] <= 12
    load_weights(get_spec("sact20-fmnist").build(), path)

    # deterministic given the seed
    spec = dataclasses.replace(spec, train_args={**spec.train_args, "batch_size": 32})
    train = functools.partial(_recipe(spec.family), spec, seed=0, epochs=1, limit=64, log=lambda *_: None)
    model, card = train(init_weights=init)
    assert all(g.mode == "hard" for _, g in iter_gates(model))
    model2, card2 = train(init_weights=init)
    assert card2["accuracy"] == card["accuracy"] and card2["flops_mean"] == card["flops_mean"]
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    # a missing or mismatched static checkpoint is refused with a clear message
    with pytest.raises(DynattackError, match="train resnet20-fmnist first"):
        train(init_weights=tmp_path / "missing.safetensors")
    save_victim(ResNet(14, **FMNIST), "resnet14", {"name": "resnet14"}, tmp_path)
    with pytest.raises(DynattackError, match="not a static ResNet of depth 20|does not fit"):
        train(init_weights=tmp_path / "resnet14.safetensors")
