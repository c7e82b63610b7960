"""SDN early exit: the exit rule against a literal re-implementation of SDN's ``early_exit``,
FLOPs accounting vs FlopCounterMode on the real batched early exit, masked vs real execution,
per-sample decisions, exit rates and DeepSloth's early-exit efficacy against a hand computation,
attacks unchanged, the runner's summary, the shipped card, training smoke run.

Checks go against independent computations: SDN's per-sample loop (first IC whose max softmax
is >= the threshold, else the final classifier) over the exits' logits, ``FlopCounterMode`` over
the real execution of single samples, FLOPs counted by hand, ``numpy``'s trapezoid over
DeepSloth's points, each sample run alone.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dynattack import cost, metrics, runner
from dynattack.gates import Trace, gate_mode, iter_gates
from dynattack.models import get_spec, load_weights
from dynattack.models.early_exit import CONFIDENCE_SCALE, sdn_cifar, sdn_positions
from model_helpers import (
    DECISION_MARGIN,
    assert_clear_of_threshold,
    assert_decisions_batch_independent,
    assert_logits_close,
    calibrate_bn,
    fmnist_images,
    hard_run,
    split_at_gap,
)

FMNIST = {"in_channels": 1, "num_classes": 10, "input_size": 28, "mean": (0.2860,), "std": (0.3530,)}
IC_AFTER = (2, 5)  # the small test network: an IC at the end of stages 1 and 2, then the final classifier


def conv_flops(cin, cout, k, hw):
    return 2 * k * k * cin * cout * hw


def set_thresholds_at_gaps(model, x: torch.Tensor) -> None:
    """Per-IC thresholds in the widest gap of the confidences of the samples still running at
    that IC, near their median: every exit stops some samples and lets others go, and every gate
    logit ``scale (threshold - confidence)`` stays far from 0."""
    with torch.no_grad():
        outs = model.exit_logits(x)
    going = torch.ones(len(x), dtype=torch.bool)
    thresholds = []
    for o in outs[:-1]:
        conf = o.softmax(1).amax(1)
        t = split_at_gap(conf[going])
        thresholds.append(t)
        going &= conf < t
    model.thresholds.copy_(torch.tensor(thresholds))


@functools.lru_cache(maxsize=None)
def _small(batch: int, ic_after: tuple[int, ...]):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = sdn_cifar(20, ic_after=ic_after, **FMNIST).eval()
    x = fmnist_images(64)
    calibrate_bn(model, x, gen)
    with torch.no_grad():
        for ic in model.ics:  # random ICs at a modest scale: confidences spread over (0.1, 1)
            ic.linear.weight.mul_(4.0)
    xb = x[:batch]
    set_thresholds_at_gaps(model, xb)
    cost.calibrate(model, model.input_shape)
    return model, xb


def small_sdn(batch: int = 12, ic_after: tuple[int, ...] = IC_AFTER):
    """A random-init SDN-20 (BN calibrated on Fashion-MNIST) whose batch exits at every exit."""
    model, x = _small(batch, ic_after)
    model = copy.deepcopy(model)
    cost.calibrate(model, model.input_shape)
    return model, x.clone()


def sdn_early_exit(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDN's ``early_exit`` (DeepSloth's "network_output" variant), one sample at a time: the
    first IC whose max softmax is >= its threshold, else the final classifier. Returns (logits,
    exit index)."""
    logits, exits = [], []
    with torch.no_grad():
        for xi in x.split(1):
            outs = model.exit_logits(xi)
            for k, o in enumerate(outs[:-1]):
                if torch.max(torch.softmax(o[0], 0)) >= model.thresholds[k]:
                    break
            else:
                k = len(outs) - 1
            logits.append(outs[k])
            exits.append(k)
    return torch.cat(logits), torch.tensor(exits)


# -- semantics -------------------------------------------------------------------------------------


def test_gates_declarations_and_costs_by_hand():
    model, x = small_sdn()
    gates = dict(iter_gates(model))
    assert list(gates) == ["exits.0", "exits.1"]
    assert model.exits[0].within is None and model.exits[1].within is model.exits[0]
    assert model.exits[0].controls == model.blocks[3:6] + [model.ics[1]]
    assert model.exits[1].controls == model.blocks[6:9] + [model.fc]
    assert all(g.strict for g in gates.values())
    assert "thresholds" in model.state_dict()
    prof = cost.calibrate(model, model.input_shape)
    assert prof.parents == {"exits.1": "exits.0"}
    stage1 = 3 * 2 * conv_flops(16, 16, 3, 784)
    static = conv_flops(1, 16, 3, 784) + stage1 + 2 * 16 * 16 * 10  # stem, stage 1, IC 1 (16 x 4 x 4 -> 10)
    stage2 = conv_flops(16, 32, 3, 196) + conv_flops(32, 32, 3, 196) + conv_flops(16, 32, 1, 196) \
        + 2 * 2 * conv_flops(32, 32, 3, 196)
    stage3 = conv_flops(32, 64, 3, 49) + conv_flops(64, 64, 3, 49) + conv_flops(32, 64, 1, 49) \
        + 2 * 2 * conv_flops(64, 64, 3, 49)
    assert prof.static == static
    assert prof.gated == {"exits.0": stage2 + 2 * 32 * 16 * 10, "exits.1": stage3 + 2 * 64 * 10}
    assert prof.full == static + prof.gated["exits.0"] + prof.gated["exits.1"]
    # SDN's spread on ResNet-20: after blocks 1, 3, 4, 5, 7, 8 (1-based)
    assert sdn_positions(9) == (0, 2, 3, 4, 6, 7)


def test_exit_rule_matches_sdn_early_exit():
    model, x = small_sdn()
    logits, trace = hard_run(model, x)
    assert_clear_of_threshold(trace)
    ref_logits, ref_exits = sdn_early_exit(model, x)
    assert torch.equal(metrics.exit_index(trace, cost.profile(model).parents), ref_exits)
    assert set(ref_exits.tolist()) == {0, 1, 2}, "every exit must stop some samples"
    assert_logits_close(logits, ref_logits)
    for e, k in zip(trace, range(2)):  # the logit and the value crossing tau with the decision
        conf = model.exit_logits(x)[k].softmax(1).amax(1).detach()
        torch.testing.assert_close(e.logit, CONFIDENCE_SCALE * (model.thresholds[k] - conf))
        assert torch.equal(e.decision, e.value > e.tau)


# -- FLOPs -----------------------------------------------------------------------------------------


def test_executed_flops_equal_flop_counter_on_real_execution():
    model, x = small_sdn()
    prof = cost.profile(model)
    _, trace = hard_run(model, x)
    assert_clear_of_threshold(trace)
    flops = cost.executed_flops(model, trace)
    assert flops.unique().numel() == 3  # one figure per exit
    for i in range(len(x)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.forward_conditional(x[i:i + 1])
        assert counter.get_total_flops() == flops[i].item()
    with torch.no_grad(), Trace() as real, FlopCounterMode(display=False) as counter:
        model.forward_conditional(x)
    assert counter.get_total_flops() == flops.sum().item()
    assert torch.equal(cost.executed_flops(model, real), flops)  # the real path's trace counts the same
    for force, expected in (("on", prof.full), ("off", prof.static)):
        with torch.no_grad(), gate_mode(model, "hard", force=force), Trace() as forced:
            with FlopCounterMode(display=False) as counter:
                model.forward_conditional(x[:1])
        assert counter.get_total_flops() == expected == cost.executed_flops(model, forced).item()


def test_masked_and_real_execution_give_the_same_logits_and_decisions():
    model, x = small_sdn()
    logits, trace = hard_run(model, x)
    with torch.no_grad(), Trace() as real:
        out = model.forward_conditional(x)
    parents = cost.profile(model).parents
    assert torch.equal(metrics.exit_index(real, parents), metrics.exit_index(trace, parents))
    ev = real.events[1]  # exit 2 ran on the rows exit 1 let through, and only those
    assert ev.rows is not None and torch.equal(ev.rows, trace.events[0].decision.nonzero().flatten())
    assert_logits_close(ev.logit, trace.events[1].logit[ev.rows])
    assert_logits_close(out, logits)
    for i in range(len(x)):
        with torch.no_grad():
            assert_logits_close(model.forward_conditional(x[i:i + 1]), logits[i:i + 1])


def test_decisions_do_not_depend_on_the_rest_of_the_batch():
    assert_decisions_batch_independent(*small_sdn())


def test_lgm_masks_are_soft_and_reach_the_input():
    model, x = small_sdn(batch=4)
    x = x.requires_grad_()
    with gate_mode(model, "lgm", lam=2.0), Trace() as trace:
        out = model(x)
    for e in trace:
        torch.testing.assert_close(e.mask, torch.sigmoid(2.0 * e.logit))
        assert e.mask.requires_grad
    (g,) = torch.autograd.grad(sum(e.value.sum() for e in trace), x)
    assert g.abs().sum() > 0 and torch.isfinite(out).all()


# -- exit rates and efficacy -------------------------------------------------------------------------


def test_exit_rates_and_efficacy_against_a_hand_computation():
    model, x = small_sdn()
    prof = cost.profile(model)
    _, trace = hard_run(model, x)
    _, ref_exits = sdn_early_exit(model, x)
    rates = [float((ref_exits == k).double().mean()) for k in range(3)]
    # DeepSloth's c_i: FLOPs of a sample stopping at each exit over the full network's, measured
    # on the real execution of one sample that stops there
    measured = {}
    for i, k in enumerate(ref_exits.tolist()):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.forward_conditional(x[i:i + 1])
        measured[k] = counter.get_total_flops() / prof.full
    c = [measured[k] for k in range(3)]
    assert c[-1] == 1.0
    hand = float(np.trapz([0.0] + list(np.cumsum(rates)), x=[0.0] + c)) if hasattr(np, "trapz") else \
        float(np.trapezoid([0.0] + list(np.cumsum(rates)), x=[0.0] + c))
    figures = metrics.early_exit_figures(trace, prof.full, prof.parents)
    assert figures["exit_rates"] == pytest.approx(rates, abs=1e-15)
    assert figures["cost_fractions"] == pytest.approx(c, rel=1e-12)
    assert figures["efficacy"] == pytest.approx(hand, rel=1e-12)
    # the relation to compute kept stated in the docstring
    kept = float(cost.executed_flops(model, trace).mean()) / prof.full
    prev = float(np.mean([([0.0] + c)[k] for k in ref_exits.tolist()]))
    assert figures["efficacy"] == pytest.approx(1 - (kept + prev) / 2, rel=1e-12)
    per = metrics.sample_efficacy(metrics.exit_index(trace, prof.parents), torch.tensor(c, dtype=torch.float64))
    assert float(per.mean()) == pytest.approx(hand, rel=1e-12)
    # batches pooled; extremes: every sample at the first exit / at the final classifier
    _, t1 = hard_run(model, x[:5])
    _, t2 = hard_run(model, x[5:])
    pooled = metrics.early_exit_figures([t1, t2], prof.full, prof.parents)
    assert pooled["exit_rates"] == pytest.approx(rates) and pooled["efficacy"] == pytest.approx(hand)
    assert metrics.early_exit_efficacy([1.0, 0.0, 0.0], c) == pytest.approx(1 - c[0] / 2)
    assert metrics.early_exit_efficacy([0.0, 0.0, 1.0], c) == pytest.approx((1 - c[1]) / 2)


def test_exit_chain_needs_nested_scalar_gates():
    from toy_models import ToyGated

    toy = ToyGated()
    cost.calibrate(toy, toy.input_shape)
    with torch.no_grad(), Trace() as trace:
        toy(torch.rand(3, *toy.input_shape))
    assert metrics.exit_chain(trace, cost.profile(toy).parents) is None  # scalar gates, not nested
    model, x = small_sdn(batch=4)
    _, trace = hard_run(model, x)
    assert metrics.exit_chain(trace, {}) is None  # the masked path's nesting is declared, not in its rows
    with torch.no_grad(), Trace() as real:
        model.forward_conditional(x)
    assert [e.name for e in metrics.exit_chain(real, {})] == ["exits.0", "exits.1"]  # nested by rows


# -- attacks and the runner ------------------------------------------------------------------------


def test_attacks_run_unchanged_and_summary_holds_exit_figures(tmp_path):
    from dynattack.attacks import FGSM, GradAuto
    from dynattack.runner import RunConfig

    model, x = small_sdn(batch=4)
    res = GradAuto(model, steps=3, progress=False)(x)
    assert res.adv.shape == x.shape and torch.isfinite(res.flops_adv).all()
    assert (res.flops_adv >= res.flops_clean).all() and (res.flops_adv <= res.flops_full).all()
    assert len(res.gate_names) == 2
    labels = torch.tensor([0, 1, 2, 3])
    for grad in ("fgm", "lgm"):
        adv = FGSM(model, eps=8 / 255, grad=grad, progress=False)(x, labels).adv
        assert (adv - x).abs().max() <= 8 / 255 + 1e-6

    cfg = RunConfig(victim="sdn-small", attack="gradauto", params={"steps": 3}, n=4, batch_size=2, seed=0)
    runner.run_attack(model, GradAuto(model, steps=3, progress=False), cfg, x, labels, tmp_path / "run", progress=False)
    summary = runner.finish_run(model, tmp_path / "run", x, latency_n=0, report=False)
    assert set(summary) == set(runner.SUMMARY_KEYS)
    prof = cost.profile(model)
    traces = {}
    for tag, images in (("clean", x), ("adv", runner.load_adversarial(tmp_path / "run")[1])):
        _, traces[tag] = hard_run(model, images)
        expected = metrics.early_exit_figures(traces[tag], prof.full, prof.parents)
        assert summary[f"exit_rates_{tag}"] == pytest.approx(expected["exit_rates"])
        assert summary[f"early_exit_efficacy_{tag}"] == pytest.approx(expected["efficacy"])
    from dynattack.report.page import _exit_table, _summary_table
    from dynattack.report.run import load_run

    run = load_run(tmp_path / "run")
    table = _exit_table(run)
    assert "Early exits" in table and table.count("<tr>") == 1 + 3  # header, two exits, final
    assert "Early-exit efficacy, adversarial" in _summary_table(run)
    # a victim without exits: null
    records = [dict(r, exits=None) for r in runner.read_records(tmp_path / "run")]
    s = runner.summarize(records, {"victim": "v", "attack": "a"})
    assert s["exit_rates_clean"] is None and s["early_exit_efficacy_adv"] is None


# -- the shipped victim ----------------------------------------------------------------------------


SHIPPED_N = 500


def test_shipped_card_figures_on_the_first_test_images():
    from dynattack.models import create_model, read_card

    card = read_card("sdn20-fmnist")
    if card is None:
        pytest.skip("sdn20-fmnist is not shipped")
    from dynattack.data import load_fashion_mnist

    x, y = (t[:SHIPPED_N] for t in load_fashion_mnist("test")[:2])
    model = create_model("sdn20-fmnist")
    assert torch.equal(model.thresholds, torch.full_like(model.thresholds, card["confidence_threshold"]))
    prof = cost.profile(model)
    assert prof.full == card["flops_full"] and [j + 1 for j in model.ic_after] == card["ic_after_blocks"]
    _, trace = hard_run(model, x)
    figures = metrics.early_exit_figures(trace, prof.full, prof.parents)
    assert figures["cost_fractions"] == pytest.approx([f / prof.full for f in card["exit_flops"]], rel=1e-12)
    # the first SHIPPED_N test images are a sample without replacement of the card's 10000: each
    # exit's rate within 4 standard errors of the card's (finite-population corrected)
    fpc = math.sqrt(1 - SHIPPED_N / 10000)
    for got, want in zip(figures["exit_rates"], card["exit_rates"]):
        assert abs(got - want) <= 4 * math.sqrt(want * (1 - want) / SHIPPED_N) * fpc + 1e-9
    per = metrics.sample_efficacy(metrics.exit_index(trace, prof.parents), torch.tensor(figures["cost_fractions"], dtype=torch.float64))
    assert abs(figures["efficacy"] - card["early_exit_efficacy"]) <= 4 * float(per.std()) / math.sqrt(SHIPPED_N) * fpc
    assert card["accuracy"] >= 0.9256 - 0.03 and card["compute_kept_pct"] <= 70.0


# -- training --------------------------------------------------------------------------------------


def test_training_smoke_run_writes_weights_and_card(tmp_path, fashion_mnist_available):
    from dynattack.models.resnet import ResNet
    from dynattack.train import _recipe, train_model
    from dynattack.train.common import save_victim

    spec = get_spec("sdn20-fmnist")
    assert spec.family == "early_exit" and _recipe(spec.family).__name__ == "train_early_exit"
    assert spec.train_args["init_from"] == "resnet20-fmnist"
    save_victim(ResNet(20, **FMNIST), "resnet20-fmnist", {"name": "resnet20-fmnist"}, tmp_path)
    init = tmp_path / "resnet20-fmnist.safetensors"
    path = train_model("sdn20-fmnist", seed=0, out_dir=tmp_path, epochs=1, limit=64, log=lambda *_: None)
    saved = json.loads((tmp_path / "sdn20-fmnist.json").read_text())
    assert saved["family"] == "early_exit" and saved["init_from"] == "resnet20-fmnist"
    for key in ("accuracy", "compute_kept_pct", "confidence_threshold", "threshold_rule", "exit_rates",
                "early_exit_efficacy", "exit_accuracy", "exit_flops", "train_command", "seed", "machine"):
        assert key in saved
    assert len(saved["exit_rates"]) == 7 and sum(saved["exit_rates"]) == pytest.approx(1.0)
    model = load_weights(get_spec("sdn20-fmnist").build(), path)
    assert float(model.thresholds[0]) == pytest.approx(saved["confidence_threshold"])
    # deterministic given the seed
    spec = dataclasses.replace(spec, train_args={**spec.train_args, "batch_size": 32})
    train = functools.partial(_recipe(spec.family), spec, seed=0, epochs=1, limit=64, log=lambda *_: None)
    model, card = train(init_weights=init)
    model2, card2 = train(init_weights=init)
    assert card2["accuracy"] == card["accuracy"] and card2["exit_rates"] == card["exit_rates"]
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
