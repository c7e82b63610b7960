"""Mixture of experts (MLP-Mixer, top-p routing): the routing rule against a direct
sort-and-cumulative-sum per token, FLOPs counted by hand and equal to FlopCounterMode on the real
path (each expert on its routed tokens only), masked vs real logits, batch-independent
decisions, the LGM gradient into the router, load imbalance against a count by hand, attacks
unchanged, the shipped weights and cards, a training smoke run.

The test network is a 2-block Mixer of width 32 with LayerNorm before every mixing MLP, so its
activations stay O(1); its routers' weights are scaled up so that routing is peaked and differs
from token to token (at initialisation every router is near-indifferent and top-p takes every
expert). Tolerances come from the logits' scale (``model_helpers``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dynattack import cost
from dynattack.gates import Trace, gate_mode, iter_gates
from dynattack.models import get_spec, load_weights
from dynattack.models.moe import (
    ROUTE_SCALE,
    MLPMixer,
    experts_per_token,
    load_imbalance,
    mass_above,
    top_p_logit,
)
from model_helpers import (
    DECISION_MARGIN,
    assert_decisions_batch_independent,
    assert_flops_equal_real_execution,
    assert_logits_close,
    assert_real_path_matches,
    fmnist_images,
    hard_run,
)

FMNIST = {"in_channels": 1, "num_classes": 10, "input_size": 28, "mean": (0.2860,), "std": (0.3530,)}
SMALL = {"dim": 32, "depth": 2, "token_hidden": 32, "expert_hidden": 48, "experts": 4, "top_p": 0.8}


@functools.lru_cache(maxsize=None)
def _small(batch: int):
    torch.manual_seed(0)
    model = MLPMixer(**FMNIST, **SMALL).eval()
    with torch.no_grad():
        for layer in model.moe_layers:
            layer.router.weight.mul_(6.0)
    cost.calibrate(model, model.input_shape)
    x = fmnist_images(64)
    with torch.no_grad(), Trace() as trace:
        model(x)
    q = torch.cat([e.logit.reshape(len(x), -1) for e in trace], 1)
    flops = cost.executed_flops(model, trace)
    keep, seen = [], set()
    for i in range(len(x)):  # samples whose every routing logit is clear of 0, distinct FLOPs
        if q[i].abs().min() >= 10 * DECISION_MARGIN and float(flops[i]) not in seen:
            keep.append(i)
            seen.add(float(flops[i]))
        if len(keep) == batch:
            break
    assert len(keep) == batch
    return model, x[keep]


def small_moe(batch: int = 6):
    model, x = _small(batch)
    return model, x.clone()


def mlp_flops(cin, hidden, cout, rows):
    return 2 * rows * (cin * hidden + hidden * cout)


# -- the routing rule ------------------------------------------------------------------------------


def direct_top_p(prob: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(decisions, mass above) of each token by a plain loop: experts by descending probability
    (ties: lower index first), taken while the probability already taken is below ``p``."""
    flat = prob.reshape(-1, prob.shape[-1]).tolist()
    on, above = [], []
    for row in flat:
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        taken, d, a = 0.0, [False] * len(row), [0.0] * len(row)
        for e in order:
            a[e] = taken
            d[e] = taken < p
            taken += row[e]
        on.append(d)
        above.append(a)
    return torch.tensor(on).reshape(prob.shape), torch.tensor(above, dtype=prob.dtype).reshape(prob.shape)


def test_top_p_rule_against_sort_and_cumsum():
    gen = torch.Generator().manual_seed(0)
    prob = (torch.randn(200, 4, generator=gen, dtype=torch.float64) * 2).softmax(-1)
    # exact ties and masses exactly at p (dyadic: no rounding): the rule is "strictly below p"
    exact = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.25, 0.125, 0.125], [0.125, 0.125, 0.25, 0.5],
                          [0.75, 0.125, 0.0625, 0.0625], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    for p, probs in ((0.8, prob), (0.5, prob), (0.75, exact), (0.8, exact), (1.0, exact)):
        want_on, want_above = direct_top_p(probs, p)
        assert torch.equal(mass_above(probs), want_above)
        q = top_p_logit(probs, p)
        assert torch.equal(q, ROUTE_SCALE * (p - want_above))
        assert torch.equal(q > 0, want_on)
        assert (q > 0).any(-1).all()  # at least one expert per token: the top one
    on = top_p_logit(exact, 0.75) > 0
    assert on.tolist()[0] == [True, True, True, False]  # a tie: the lower index ranks higher
    assert on.tolist()[1] == [True, True, False, False]  # 0.5 + 0.25 reaches p = 0.75: stop
    assert on.tolist()[3] == [True, False, False, False]
    # all on (every expert for every token) needs the smallest probability above 1 - p
    flat = torch.full((1, 4), 0.25, dtype=torch.float64)
    assert (top_p_logit(flat, 0.8) > 0).all() and not (top_p_logit(flat, 0.75) > 0).all()


def test_gates_declarations_and_costs_by_hand():
    model, _ = small_moe()
    gates = dict(iter_gates(model))
    assert list(gates) == ["blocks.0.channel.route", "blocks.1.channel.route"]
    for layer in model.moe_layers:
        assert layer.route.experts == list(layer.experts) and layer.route.strict
    prof = cost.profile(model)
    t, d, e = 49, 32, 4
    expert = mlp_flops(d, 48, d, t)
    static = 2 * 16 * d * t + 2 * (mlp_flops(t, 32, t, d) + 2 * d * e * t) + 2 * d * 10
    assert prof.static == static
    assert prof.gated == {name: e * expert for name in gates}
    assert prof.units == {name: t * e for name in gates}
    assert prof.full == static + 2 * e * expert
    for g in gates.values():
        assert float(g.unit_cost) == expert / t


# -- the two paths ---------------------------------------------------------------------------------


def test_executed_flops_equal_flop_counter_on_real_execution():
    model, x = small_moe()
    flops = assert_flops_equal_real_execution(model, x, cost.profile(model))
    assert (flops < cost.profile(model).full).all()


def test_real_path_runs_each_expert_on_its_routed_tokens_only():
    model, x = small_moe(batch=2)
    _, trace = hard_run(model, x[:1])
    rows = {}
    def seen(key):
        def hook(module, args, out):
            rows[key] = args[0].shape[0]
        return hook

    hooks = [ex.register_forward_hook(seen((i, j)))
             for i, layer in enumerate(model.moe_layers) for j, ex in enumerate(layer.experts)]
    try:
        with torch.no_grad():
            model.forward_conditional(x[:1])
    finally:
        for h in hooks:
            h.remove()
    for i, event in enumerate(trace):
        for j in range(4):
            routed = int(event.decision[0, :, j].sum())
            assert rows.get((i, j), 0) == routed  # not run at all where no token chose it


def test_masked_and_real_execution_give_the_same_logits_and_decisions():
    model, x = small_moe()
    logits, trace = hard_run(model, x)
    assert_real_path_matches(model, x, logits, trace)
    with torch.no_grad(), gate_mode(model, "hard", force="on"):
        assert_logits_close(model.forward_conditional(x), model(x))


def test_decisions_do_not_depend_on_the_rest_of_the_batch():
    assert_decisions_batch_independent(*small_moe())


def test_lgm_masks_are_soft_and_the_gradient_reaches_the_router():
    model, x = small_moe(batch=3)
    routers = [layer.router.weight for layer in model.moe_layers]
    with gate_mode(model, "lgm", lam=0.5), Trace() as trace:
        out = model(x)
    for e in trace:
        torch.testing.assert_close(e.mask, torch.sigmoid(0.5 * e.logit))
    # through the decisions alone (not the probability weights): the masks' sum
    grads = torch.autograd.grad(sum(e.mask.sum() for e in trace), routers)
    assert all(g.abs().sum() > 0 for g in grads)
    assert torch.isfinite(out).all()
    with Trace() as hard:
        model(x)
    assert not any(e.mask.requires_grad for e in hard)  # FGM: no gradient through a hard decision


def test_load_imbalance_and_experts_per_token_by_hand():
    model, x = small_moe()
    _, trace = hard_run(model, x)
    got = load_imbalance(trace, model)
    ratios = []
    for e in trace:
        load = [0] * 4
        for b in range(len(x)):
            for t in range(49):
                for j in range(4):
                    load[j] += bool(e.decision[b, t, j])
        ratios.append(max(load) / (sum(load) / 4))
        assert got[e.name] == pytest.approx(ratios[-1], rel=1e-12)
    assert got["mean"] == pytest.approx(sum(ratios) / len(ratios)) and got["max"] == max(ratios)
    total = sum(int(e.decision.sum()) for e in trace)
    assert experts_per_token(trace, model) == pytest.approx(total / (len(trace) * len(x) * 49))


def test_attacks_run_unchanged():
    from dynattack.attacks import FGSM, GradAuto

    model, x = small_moe(batch=2)
    res = GradAuto(model, steps=3, progress=False)(x)
    assert res.adv.shape == x.shape and torch.isfinite(res.flops_adv).all()
    assert (res.flops_adv <= res.flops_full).all() and len(res.gate_names) == 2
    for grad in ("fgm", "lgm"):
        adv = FGSM(model, eps=8 / 255, grad=grad, progress=False)(x, torch.tensor([0, 1])).adv
        assert (adv - x).abs().max() <= 8 / 255 + 1e-6


# -- the shipped victims -----------------------------------------------------------------------------

SHIPPED_N = 500


def test_shipped_weights_load_and_match_their_cards():
    from dynattack.models import create_model, read_card
    from dynattack.train.common import evaluate

    card, static = read_card("moe-mixer-fmnist"), read_card("mixer-fmnist")
    if card is None or static is None:
        pytest.skip("moe-mixer-fmnist / mixer-fmnist are not shipped")
    from dynattack.data import load_fashion_mnist

    x, y = (t[:SHIPPED_N] for t in load_fashion_mnist("test")[:2])
    model = create_model("moe-mixer-fmnist")
    assert cost.profile(model).full == card["flops_full"]
    got = evaluate(model, x, y)
    fpc = math.sqrt(1 - SHIPPED_N / 10000)  # the first 500 of the card's 10000 test images
    acc = card["accuracy"]
    assert abs(got["accuracy"] - acc) <= 4 * math.sqrt(acc * (1 - acc) / SHIPPED_N) * fpc + 1e-9
    assert abs(got["compute_kept_pct"] - card["compute_kept_pct"]) <= 5.0
    dense = create_model("mixer-fmnist")
    assert not list(iter_gates(dense)) and cost.profile(dense).full == static["flops_full"]
    # issue 17's targets, as the cards state them
    assert card["accuracy"] >= static["accuracy"] - 0.03
    assert card["compute_kept_pct"] <= 70.0
    assert card["input_dependence"]["varying_decisions_pct"] >= 25.0


def test_training_smoke_run_writes_weights_and_card(tmp_path, fashion_mnist_available):
    from dynattack.train import _recipe, train_model

    spec = get_spec("moe-mixer-fmnist")
    assert spec.family == "moe" and _recipe(spec.family).__name__ == "train_moe"
    path = train_model("moe-mixer-fmnist", seed=0, out_dir=tmp_path, epochs=1, limit=64, log=lambda *_: None)
    saved = json.loads((tmp_path / "moe-mixer-fmnist.json").read_text())
    for key in ("accuracy", "compute_kept_pct", "input_dependence", "experts_per_token", "load_imbalance_mean",
                "top_p", "all_on", "train_command", "seed", "machine"):
        assert key in saved
    load_weights(get_spec("moe-mixer-fmnist").build(), path)
    # deterministic given the seed
    spec = dataclasses.replace(spec, train_args={**spec.train_args, "batch_size": 32})
    train = functools.partial(_recipe(spec.family), spec, seed=0, epochs=1, limit=64, log=lambda *_: None)
    (model, card), (model2, card2) = train(), train()
    assert card2["accuracy"] == card["accuracy"] and card2["experts_per_token"] == card["experts_per_token"]
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
