"""Token-halting ViT (A-ViT): the halting rule against a literal per-token loop, FLOPs
accounting vs FlopCounterMode on the real path that drops tokens, masked vs real logits,
per-sample decisions, LGM gradients to the halting scores, attacks unchanged, the shipped
weights and cards, a training smoke run.

The small test network is a random-init A-ViT of depth 4 at realistic scales: weights of std
~1/sqrt(fan-in) (LayerNorm keeps every block's input O(1), the residual stream stays a few
units), its halting centre set from the data so that tokens halt before every gated block.
"""
from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dynattack import cost
from dynattack.gates import Trace, gate_mode, iter_gates
from dynattack.models import get_spec
from dynattack.models.vit import CLASS_TOKEN_LOGIT, HALT_LOGIT_SCALE, AViT, ViT
from model_helpers import (
    DECISION_MARGIN,
    assert_clear_of_threshold,
    assert_decisions_batch_independent,
    assert_flops_equal_real_execution,
    assert_logits_close,
    fmnist_images,
    hard_run,
)

DIM, HEADS, HIDDEN, TOKENS = 64, 4, 128, 50


@functools.lru_cache(maxsize=None)
def _small():
    torch.manual_seed(0)
    model = AViT(depth=4, dim=DIM, heads=HEADS, halt_scale=10.0, halt_center=0.0).eval()
    x = fmnist_images(12)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(6.0)  # trunc-normal std 0.02 -> 0.12 ~ 1/sqrt(64)
        t0 = model.blocks[0](model.tokens(x))[..., 0]
        centre = -10.0 * float(t0.median())  # h ~ 1/2 for the median token after block 0
        for shift in [0.05 * i for i in range(40)]:  # then the nearest centre whose batch logits
            model.halt_center = centre + shift  # all stay 10x the test margin clear of q = 0
            _, trace = hard_run(model, x)
            if trace.flat("logit").abs().min() >= 10 * DECISION_MARGIN:
                break
        else:
            raise AssertionError("no halting centre keeps the test batch clear of the threshold")
    cost.calibrate(model, model.input_shape)
    return model, x


def small_avit():
    model, x = _small()
    model = copy.deepcopy(model)
    cost.calibrate(model, model.input_shape)
    return model, x.clone()


def block_flops(n: int) -> int:
    """FLOPs of one block on n tokens: qkv, scores, weights x values, projection, MLP."""
    return 2 * n * DIM * 3 * DIM + 2 * n * n * DIM + 2 * n * n * DIM + 2 * n * DIM * DIM + 2 * 2 * n * DIM * HIDDEN


def avit_reference(model: AViT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A-ViT's rule, one sample and one token at a time, in plain Python: after each block but
    the last, h = sigmoid(gamma t_0 + beta), c += h; a patch token runs the next block while
    c < 1 - eps and it has not halted; the class token always runs. Blocks run on the list of
    running tokens only. Returns (logits, (B, L - 1, T) runs-next-block decisions)."""
    logits, runs = [], []
    with torch.no_grad():
        for xi in x.split(1):
            t = model.blocks[0](model.tokens(xi))[0]  # (T, D)
            c = [0.0] * t.shape[0]
            running = [True] * t.shape[0]
            dec = []
            for block in model.blocks[1:]:
                for k in range(t.shape[0]):
                    c[k] += float(torch.sigmoid(model.halt_scale * t[k, 0] + model.halt_center))
                    if k > 0 and not c[k] < torch.tensor(1 - model.eps, dtype=torch.float32).item():
                        running[k] = False
                dec.append(list(running))
                idx = [k for k in range(t.shape[0]) if running[k]]
                new = block(t[idx][None])[0]
                t = t.clone()
                for j, k in enumerate(idx):
                    t[k] = new[j]
            logits.append(model.classify(t[None]))
            runs.append(torch.tensor(dec))
    return torch.cat(logits), torch.stack(runs)


# -- semantics ------------------------------------------------------------------------------------


def test_gate_declarations_and_costs_by_hand():
    model, _ = small_avit()
    gates = dict(iter_gates(model))
    assert list(gates) == ["gates.0", "gates.1", "gates.2"]
    for k, g in enumerate(model.gates):
        assert g.controls == [model.blocks[k + 1]] and g.tokens == 1 and g.strict
        assert g.within is (model.gates[k - 1] if k else None)
    prof = cost.profile(model)
    assert prof.parents == {"gates.1": "gates.0", "gates.2": "gates.1"}
    embed, head = 2 * 49 * 16 * DIM, 2 * DIM * 10
    assert prof.static == embed + block_flops(TOKENS) + head
    assert prof.gated == {name: block_flops(TOKENS) for name in gates}
    poly = [t.poly for t in prof.terms if t.poly is not None]
    assert len(poly) == 3 and all(p[0] == 0 and p[1] == block_flops(1) - 4 * DIM and p[2] == 4 * DIM for p in poly)
    # the static ViT has the same parameters: its weights load into A-ViT as they are
    assert set(ViT(depth=4).state_dict()) == set(model.state_dict())


def test_halting_rule_matches_a_literal_per_token_loop():
    model, x = small_avit()
    logits, trace = hard_run(model, x)
    assert_clear_of_threshold(trace)
    ref_logits, ref_runs = avit_reference(model, x)
    nested = torch.stack([e.decision for e in trace], 1).cumprod(1).bool()  # (B, L - 1, T)
    assert torch.equal(nested, ref_runs)
    for k in range(nested.shape[1]):  # tokens halt before every gated block, and the class token never
        assert 0 < nested[:, k, 1:].float().mean() < 1
    assert nested[:, :, 0].all() and all((e.logit[:, 0] == CLASS_TOKEN_LOGIT).all() for e in trace)
    for e in trace:  # the logit is scale x ((1 - eps) - c), its value crosses tau with the decision
        assert torch.equal(e.decision[:, 1:], e.logit[:, 1:] > 0)
        assert torch.equal(e.decision, e.value > e.tau)
    assert_logits_close(logits, ref_logits)


def test_executed_flops_equal_flop_counter_on_the_real_path():
    model, x = small_avit()
    prof = cost.profile(model)
    flops = assert_flops_equal_real_execution(model, x, prof)
    # independent count from the reference loop's decisions: block cost at its active tokens
    _, runs = avit_reference(model, x)
    hand = [prof.static + sum(block_flops(int(r.sum())) for r in runs[i]) for i in range(len(x))]
    assert flops.tolist() == hand
    with torch.no_grad(), Trace() as real:  # the real path's trace counts the same
        model.forward_conditional(x)
    assert torch.equal(cost.executed_flops(model, real), flops)


def test_masked_and_real_paths_give_the_same_logits():
    model, x = small_avit()
    logits, trace = hard_run(model, x)
    with torch.no_grad(), Trace() as real:
        out = model.forward_conditional(x)
    assert_logits_close(out, logits)
    assert torch.equal(real.flat("decision"), trace.flat("decision"))
    assert_logits_close(real.flat("logit"), trace.flat("logit"))
    with torch.no_grad(), gate_mode(model, "hard", force="on"):  # all on: the static ViT's logits
        static = ViT(depth=4, dim=DIM, heads=HEADS)
        static.load_state_dict(model.state_dict())
        assert_logits_close(model(x), static.eval()(x))
        assert_logits_close(model.forward_conditional(x), static(x))


def test_decisions_do_not_depend_on_the_rest_of_the_batch():
    assert_decisions_batch_independent(*small_avit())


def test_lgm_masks_are_soft_and_carry_gradient_to_the_halting_scores():
    model, x = small_avit()
    x = x[:4].clone().requires_grad_()
    scores = []
    with gate_mode(model, "lgm", lam=0.5), Trace() as trace:
        out = model.run(x, scores)
    for e in trace:
        torch.testing.assert_close(e.mask, torch.sigmoid(0.5 * e.logit))
    hs = [h for h, _ in scores]
    grads = torch.autograd.grad(out.logsumexp(1).sum(), hs + [x])
    for g in grads[:-1]:  # every block's halting scores of the patch tokens get a gradient
        assert torch.isfinite(g).all() and g[:, 1:].abs().sum() > 0
    assert grads[-1].abs().sum() > 0
    # hard mode: no gradient through the decisions
    scores = []
    with gate_mode(model, "hard"):
        out = model.run(x, scores)
    assert not any(m.requires_grad for _, m in scores)


def test_attacks_run_unchanged():
    from dynattack.attacks import FGSM, GradAuto

    model, x = small_avit()
    x = x[:3]
    res = GradAuto(model, steps=3, progress=False)(x)
    assert res.adv.shape == x.shape and torch.isfinite(res.flops_adv).all()
    assert (res.flops_adv >= res.flops_clean).all() and (res.flops_adv <= res.flops_full).all()
    assert len(res.gate_names) == 3
    for grad in ("fgm", "lgm"):
        adv = FGSM(model, eps=8 / 255, grad=grad, progress=False)(x, torch.tensor([0, 1, 2])).adv
        assert (adv - x).abs().max() <= 8 / 255 + 1e-6


# -- the shipped victims ----------------------------------------------------------------------------

SHIPPED_N = 500


@pytest.mark.parametrize("name", ["vit-fmnist", "avit-fmnist"])
def test_shipped_weights_load_and_evaluate(name):
    from dynattack.data import load_fashion_mnist
    from dynattack.models import create_model, read_card
    from dynattack.train.common import evaluate

    card = read_card(name)
    assert card is not None, f"{name} ships its card"
    x, y = (t[:SHIPPED_N] for t in load_fashion_mnist("test")[:2])
    model = create_model(name)
    assert cost.profile(model).full == card["flops_full"]
    got = evaluate(model, x, y)
    # the first SHIPPED_N test images are a sample of the card's 10000: within 4 standard errors
    fpc = math.sqrt(1 - SHIPPED_N / 10000)
    acc = card["accuracy"]
    assert abs(got["accuracy"] - acc) <= 4 * math.sqrt(acc * (1 - acc) / SHIPPED_N) * fpc + 1e-9
    if name == "avit-fmnist":
        static = read_card("vit-fmnist")
        assert card["accuracy"] >= static["accuracy"] - 0.03 and card["compute_kept_pct"] <= 70.0
        assert card["input_dependence"]["varying_decisions_pct"] >= 25.0
        assert abs(got["compute_kept_pct"] - card["compute_kept_pct"]) <= 5.0
        assert card["init_from"] == "vit-fmnist"


# -- training -------------------------------------------------------------------------------------


def test_training_smoke_run_writes_weights_and_card(tmp_path, fashion_mnist_available):
    from dynattack.train import _recipe, train_model
    from dynattack.train.common import save_victim
    from dynattack.train.vit import halting_losses, target_distribution

    spec = get_spec("avit-fmnist")
    assert spec.family == "token_vit" and _recipe(spec.family).__name__ == "train_vit"
    assert _recipe(get_spec("vit-fmnist").family).__name__ == "train_vit"
    save_victim(get_spec("vit-fmnist").build(), "vit-fmnist", {"name": "vit-fmnist"}, tmp_path)
    train_model("avit-fmnist", seed=0, out_dir=tmp_path, epochs=1, limit=64, log=lambda *_: None)
    saved = json.loads((tmp_path / "avit-fmnist.json").read_text())
    for key in ("accuracy", "compute_kept_pct", "input_dependence", "token_run_rate", "init_from", "train_command"):
        assert key in saved
    # the ponder loss by hand: two blocks of halting scores, one token halting after the first
    h = [torch.tensor([[0.3, 0.2, 0.99]]), torch.tensor([[0.3, 0.5, 0.1]])]
    m = [torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])]
    ponder, prior = halting_losses(list(zip(h, m)), target_distribution(2, 0.0))
    # patch tokens: (1 + 2) + (1 - 0.2 - 0.5) and (1 + 0) + (1 - 0)
    assert ponder.item() == pytest.approx(((3 + 0.3) + 2) / 2)
    assert prior.item() >= 0
