"""ManiDP: the keep rule, FLOPs accounting vs FlopCounterMode on the real channel-sliced
execution, masked vs real execution, per-sample decisions, gradients, attacks unchanged,
training pieces and a training smoke run.

Checks go against independent computations: the saliency written out from the mask block's
weights, ``FlopCounterMode`` over the weight-sliced execution of single samples, a hand count of
``2 * 9 * H * W * (C_in * n1 + n1 * n2)`` per block, explicit loops, and each sample run alone.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dynattack import cost
from dynattack.errors import DynattackError
from dynattack.gates import Trace, gate_mode, iter_gates
from dynattack.models import get_spec, load_weights
from dynattack.models.manidp import MaskBlock, manidp_cifar
from model_helpers import (
    DECISION_MARGIN,
    assert_clear_of_threshold,
    assert_decisions_batch_independent,
    assert_flops_equal_real_execution,
    assert_logits_close,
    assert_real_path_matches,
    calibrate_bn,
    hard_run,
    split_at_gap,
)

FMNIST = {"in_channels": 1, "num_classes": 10, "input_size": 28, "mean": (0.2860,), "std": (0.3530,)}
# A gate logit is a saliency minus its threshold, computed from pooled features as large as ~50
# in the last blocks: its rounding is that of O(50) numbers (measured: <= 8e-5 between a sample
# alone and in its batch). set_thresholds leaves every saliency >= 5e-3 from its threshold.
MARGIN = 1e-3


def calibrate(model, x: torch.Tensor, gen: torch.Generator) -> None:
    """BN statistics from ``x``, and saliencies at the scale of a trained model: a block's output
    channels are multiplied by their saliency, so random-init saliencies of size ~10 would grow
    activations tenfold per block. Mask block by mask block (forward order), ``fc2`` is rescaled
    so the pre-ReLU saliencies have mean absolute value 1 on ``x``; BN is recalibrated after."""
    calibrate_bn(model, x, gen)
    for mb in model.mask_blocks:
        seen = []
        hook = mb.fc2.register_forward_hook(lambda mod, inp, out: seen.append(out))
        with torch.no_grad(), gate_mode(model, "hard", force="on"):
            model(x)
        hook.remove()
        with torch.no_grad():
            scale = 1.0 / seen[0].abs().mean()
            mb.fc2.weight.mul_(scale)
            mb.fc2.bias.mul_(scale)
        calibrate_bn(model, x)


def set_thresholds(model, x: torch.Tensor) -> None:
    """Mask block by mask block (forward order), put the threshold at the midpoint of the widest
    gap between neighbouring saliencies of the batch near their median: channels are kept and
    pruned in every mask, and no saliency sits within rounding of a threshold."""
    with torch.no_grad():
        for i, mb in enumerate(model.mask_blocks):
            record = []
            model(x, record)
            mb.thre.fill_(split_at_gap(record[i][0].unique()))  # zero saliencies count once


@functools.lru_cache(maxsize=None)
def _small(depth: int, seed: int, batch: int):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = manidp_cifar(depth, **FMNIST).eval()
    x = torch.rand(batch, 1, 28, 28, generator=gen) * torch.linspace(0.2, 1.0, batch).view(-1, 1, 1, 1)
    calibrate(model, x, gen)
    set_thresholds(model, x)
    cost.calibrate(model, model.input_shape)
    return model, x


def small_manidp(depth: int = 14, seed: int = 0, batch: int = 6):
    """A random-init ManiDP-14 on 1x28x28 in eval mode, BN calibrated on its batch, mixed channel
    decisions clear of their thresholds."""
    model, x = _small(depth, seed, batch)
    return copy.deepcopy(model), x.clone()


# -- gates ------------------------------------------------------------------------------------


def test_gates_units_and_costs():
    model, x = small_manidp()
    gates = dict(iter_gates(model))
    assert len(gates) == 2 * 6  # two masks in each of the 3 x 2 blocks
    block = model.layer2[0]
    assert block.mb1.gate.controls == [block.conv1] and block.mb2.gate.controls == [block.conv2]
    _, trace = hard_run(model, x)
    assert [e.name for e in trace][:2] == ["layer1.0.mb1.gate", "layer1.0.mb2.gate"]
    assert trace.events[4].logit.shape == (len(x), 32) and trace.events[4].tau == 0.5
    # per-channel unit costs: a conv's FLOPs per output channel, 2 * 9 * C_in * H_out * W_out
    assert float(block.mb1.gate.unit_cost) == 2 * 9 * 16 * 14 * 14
    assert float(block.mb2.gate.unit_cost) == 2 * 9 * 32 * 14 * 14


@pytest.mark.parametrize("thre", [0.4, 0.0, -0.3, 0.8, 1e6])
def test_decision_is_the_official_keep_rule(thre):
    torch.manual_seed(0)
    mb = MaskBlock(12, 10, 10, [], clamp_max=0.8)
    pooled = torch.rand(7, 12, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mb.thre.fill_(thre)
    with Trace() as trace:
        s, m = mb(pooled)
    # the official saliency: clamp(relu(fc2(relu(fc1(x)))), max), written out
    ref = (F.relu(pooled @ mb.fc1.weight.t()) @ mb.fc2.weight.t() + mb.fc2.bias).relu().clamp(max=0.8)
    assert_logits_close(s, ref)  # F.linear and matmul + add may sum in another order
    # ties are exact only where both clamp (0.8) or both ReLUs are dead (0); no other saliency
    # is within rounding of the threshold, so the keep rule must decide the same on both
    tie = ref == thre
    assert torch.equal(s == thre, tie) and ((ref - thre).abs()[~tie] >= DECISION_MARGIN).all()
    keep = ref >= thre
    assert thre != 0.4 or (keep.any() and not keep.all())
    assert thre != 0.8 or keep.any()  # clamped saliencies equal to the threshold are kept
    (event,) = trace.events
    assert torch.equal(event.decision, keep) and torch.equal(m, keep.float())
    assert torch.equal(event.value >= event.tau, keep)
    if 0 < thre < 1:  # pruned channels whose ReLU is dead still move with the input (G not saturated)
        dead = (pooled @ mb.fc1.weight.t()).relu() @ mb.fc2.weight.t() + mb.fc2.bias < 0
        assert dead.any()
        (g,) = torch.autograd.grad((event.value * dead).sum(), pooled)
        assert g.abs().sum() > 0


# -- FLOPs ------------------------------------------------------------------------------------


def hand_count(model, trace, static: float) -> torch.Tensor:
    """Per sample: static + sum over blocks of 2 * 9 * H * W * (C_in * n1 + n1 * n2)."""
    total = torch.full((trace.events[0].logit.shape[0],), static, dtype=torch.float64)
    size = 28
    for block, a, b in zip(model.blocks, trace.events[0::2], trace.events[1::2]):
        size //= block.stride
        n1, n2 = a.decision.sum(1).double(), b.decision.sum(1).double()
        total += 2 * 9 * size * size * (block.conv1.in_channels * n1 + n1 * n2)
    return total


def test_executed_flops_equal_flop_counter_on_real_execution():
    model, x = small_manidp()
    prof = cost.profile(model)
    _, trace = hard_run(model, x)
    rates = torch.stack([e.decision.float().mean() for e in trace])
    assert ((rates > 0) & (rates < 1)).all(), "every mask must keep some channels and prune others"
    flops = assert_flops_equal_real_execution(model, x, prof, margin=MARGIN)
    assert torch.equal(flops, hand_count(model, trace, prof.static))
    # static: stem, mask blocks (2 FCs each), shortcut projections, classifier
    fcs = sum(2 * mb.fc1.in_features * mb.fc1.out_features + 2 * mb.fc2.in_features * mb.fc2.out_features
              for mb in model.mask_blocks)
    shortcuts = 2 * (16 * 32 * 14 * 14 + 32 * 64 * 7 * 7)
    assert prof.static == 2 * 9 * 16 * 28 * 28 + fcs + shortcuts + 2 * 64 * 10


def test_block_with_no_first_conv_channel_still_adds_its_bn_shift():
    model, x = small_manidp()
    block = model.layer2[1]
    block.mb1.thre.fill_(1e6)  # conv1 runs no channel
    # mb2 sees zeros, saliency relu(fc2.bias) (all equal, > 0): conv2 keeps all, outputs bn2(0)
    block.mb2.thre.fill_(float(block.mb2.fc2.bias.detach().min()) / 2)
    logits, trace = hard_run(model, x)
    assert_clear_of_threshold(trace, MARGIN)
    i = [e.name for e in trace].index("layer2.1.mb1.gate")
    assert not trace.events[i].decision.any() and trace.events[i + 1].decision.any()
    flops = cost.executed_flops(model, trace)
    assert torch.equal(flops, hand_count(model, trace, cost.profile(model).static))
    for j in range(2):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            out = model.forward_conditional(x[j:j + 1])
        assert counter.get_total_flops() == flops[j].item()
        assert_logits_close(out, logits[j:j + 1])


def test_masked_and_real_execution_give_the_same_logits():
    model, x = small_manidp()
    logits, trace = hard_run(model, x)
    assert_clear_of_threshold(trace, MARGIN)  # set_thresholds' half-gaps are far above rounding
    assert_real_path_matches(model, x, logits, trace)
    # the training mask (hard keep rule) and LGM's straight-through mask run the same network
    for mode in ("train", "lgm_st"):
        with torch.no_grad(), gate_mode(model, mode, lam=2.0):
            assert_logits_close(model.forward_conditional(x), model(x))
            assert_logits_close(model(x), logits)


def test_decisions_do_not_depend_on_the_rest_of_the_batch():
    assert_decisions_batch_independent(*small_manidp(), margin=MARGIN)


# -- gradients ------------------------------------------------------------------------------------


def test_gradients_per_mode():
    model, x = small_manidp(batch=2)
    x = x.requires_grad_()
    with Trace() as trace:
        out = model(x)
    assert all(not e.mask.requires_grad and e.value.requires_grad for e in trace)  # FGM; attacks push G
    (g,) = torch.autograd.grad(sum(e.value.sum() for e in trace), x)
    assert g.abs().sum() > 0
    with gate_mode(model, "lgm", lam=3.0), Trace() as trace:
        out = model(x)
    for e in trace:
        torch.testing.assert_close(e.mask, torch.sigmoid(3.0 * e.logit))
        e.mask.retain_grad()
    out.sum().backward()
    assert all(e.mask.grad is not None and e.mask.grad.abs().sum() > 0 for e in trace)


def test_energy_and_accuracy_attacks_run_unchanged():
    from dynattack.attacks import IFGSM, GradAuto

    model, x = small_manidp(batch=2)
    res = GradAuto(model, steps=3, progress=False)(x)
    assert res.adv.shape == x.shape and torch.isfinite(res.flops_adv).all()
    assert (res.flops_adv >= res.flops_clean).all() and (res.flops_adv <= res.flops_full).all()
    res = IFGSM(model, eps=8 / 255, steps=2, grad="lgm", lam=10.0, progress=False)(x, torch.tensor([1, 7]))
    assert (res.adv - x).abs().max() <= 8 / 255 + 1e-6


# -- training -------------------------------------------------------------------------------------


def test_training_pieces():
    from dynattack.train.manidp import complexity_weights, keep_ratio, manifold_loss, threshold

    assert keep_ratio(0.0, 0.6, 0.5) == 1.0 and keep_ratio(0.25, 0.6, 0.5) == pytest.approx(0.8)
    assert keep_ratio(0.5, 0.6, 0.5) == pytest.approx(0.6) and keep_ratio(0.9, 0.6, 0.5) == pytest.approx(0.6)
    sal = torch.tensor([[0.5, 0.0, 2.0], [1.0, 0.0, 3.0]])  # (samples, channels): pairs are ranked
    assert threshold(sal, 0.5) == 1.0  # k = ceil(0.5 * 6) = 3: the third largest pair
    assert float((sal >= threshold(sal, 0.5)).double().mean()) == 0.5  # keep = fraction of pairs kept
    assert threshold(sal, 1.0) == torch.finfo(torch.float32).tiny  # zero-saliency channels never run
    w = complexity_weights(torch.tensor([0.0, 0.5, 1.0, 3.0]), loss_ref=2.0, thre_cls=0.5, gamma=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.25, 0.0, 0.0]))
    gen = torch.Generator().manual_seed(0)
    s, f = torch.rand(5, 4, generator=gen), torch.randn(5, 6, generator=gen)
    ref = sum((F.cosine_similarity(f[i], f[j], 0) - F.cosine_similarity(s[i], s[j], 0)) ** 2
              for i in range(5) for j in range(5)) / 25
    torch.testing.assert_close(manifold_loss(s, f), ref)


def test_all_on_manidp_from_a_static_resnet_is_that_resnet(tmp_path):
    from dynattack.models.resnet import ResNet
    from dynattack.train.common import save_victim
    from dynattack.train.manidp import _load_static

    torch.manual_seed(0)
    static = ResNet(14, **FMNIST).eval()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    calibrate_bn(static, x, torch.Generator().manual_seed(0))
    save_victim(static, "resnet14", {"name": "resnet14"}, tmp_path)
    model = manidp_cifar(14, **FMNIST).eval()
    _load_static(model, tmp_path / "resnet14.safetensors", "manidp14", "resnet14")
    with torch.no_grad(), Trace() as trace:
        assert_logits_close(model(x), static(x))
        assert_logits_close(model.forward_conditional(x), static(x))
    assert all(e.decision.all() for e in trace)
    with pytest.raises(DynattackError, match="not a static ResNet of depth 20|does not fit"):
        _load_static(manidp_cifar(20, **FMNIST), tmp_path / "resnet14.safetensors", "manidp20", "resnet14")


def test_training_smoke_run_writes_weights_and_card(tmp_path, fashion_mnist_available):
    from dynattack.models.resnet import ResNet
    from dynattack.train import _recipe, train_model
    from dynattack.train.common import save_victim

    spec = get_spec("manidp20-fmnist")
    assert _recipe(spec.family).__name__ == "train_manidp" and spec.train_args["init_from"] == "resnet20-fmnist"
    save_victim(ResNet(20, **FMNIST), "resnet20-fmnist", {"name": "resnet20-fmnist"}, tmp_path)
    spec = dataclasses.replace(spec, train_args={**spec.train_args, "batch_size": 32})
    train = functools.partial(_recipe(spec.family), spec, seed=0, epochs=1, limit=96, log=lambda *_: None,
                              init_weights=tmp_path / "resnet20-fmnist.safetensors")
    model, card = train()
    assert all(g.mode == "hard" for _, g in iter_gates(model))
    assert len(card["thresholds"]) == 18 and all(t > 0 for t in card["thresholds"])  # updated in training
    assert 0 < card["compute_kept_pct"] <= 100 and card["target_keep"] == 0.65
    model2, card2 = train()
    assert card2["accuracy"] == card["accuracy"] and card2["flops_mean"] == card["flops_mean"]
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    # as `dynattack train manidp20-fmnist --out DIR` runs it: the static backbone is found in DIR
    path = train_model("manidp20-fmnist", seed=0, out_dir=tmp_path, epochs=1, limit=64, log=lambda *_: None)
    saved = json.loads((tmp_path / "manidp20-fmnist.json").read_text())
    assert saved["family"] == "manidp" and saved["init_from"] == "resnet20-fmnist"
    for key in ("accuracy", "compute_kept_pct", "compute_saved_pct", "flops_full", "train_command", "seed",
                "epochs", "train_seconds", "machine", "train_args"):
        assert key in saved
    load_weights(get_spec("manidp20-fmnist").build(), path)
