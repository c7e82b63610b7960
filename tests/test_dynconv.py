"""DynConv: FLOPs accounting vs FlopCounterMode on the real sparse execution, masked vs real
execution, per-sample decisions, official checkpoints, LGM gradients through both masks, energy
attacks unchanged, training smoke run.

Checks go against independent computations: ``FlopCounterMode`` over the gathered-patch
execution of single samples, a functional re-implementation of the official forward (written
from the official release's description) on an official-layout state_dict, finite differences,
and each sample run alone.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynattack import cost
from dynattack.errors import DynattackError
from dynattack.gates import Trace, gate_mode, iter_gates
from dynattack.models import get_spec, load_weights
from dynattack.models.dynconv import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    box3x3,
    dynconv_cifar,
    gumbel_straight_through,
    sparse_conv3x3,
    _channels_last_padded,
)
from model_helpers import (
    RandomStateDict,
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


def centre_masks(model, x: torch.Tensor) -> None:
    """Shift each mask unit's bias (block by block, in forward order) so its threshold falls in
    the widest gap between the batch's logits near their median: about half the positions of
    every block are kept, the rest skipped, none within rounding of the threshold."""
    with torch.no_grad():
        for block in model.blocks:
            with Trace() as trace:
                model(x)
            q = next(e.logit for e in trace if e.name == block.mask_gate.name)
            block.masker.maskconv.fc.bias -= split_at_gap(q)


@functools.lru_cache(maxsize=None)
def _small(depth: int, seed: int, batch: int):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = dynconv_cifar(depth, **FMNIST).eval()
    x = torch.rand(batch, 1, 28, 28, generator=gen) * torch.linspace(0.2, 1.0, batch).view(-1, 1, 1, 1)
    calibrate_bn(model, x, gen)
    centre_masks(model, x)
    return model, x


def small_dynconv(depth: int = 14, seed: int = 0, batch: int = 6):
    """A random-init DynConv-14 on 1x28x28 in eval mode with mixed masks on its batch."""
    model, x = _small(depth, seed, batch)
    return copy.deepcopy(model), x.clone()


# -- pieces ------------------------------------------------------------------------------------


def test_box_and_gathered_conv_against_dense_ops():
    gen = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 7, 9, generator=gen) > 0.7).float()
    ref = F.conv2d(mask[:, None], torch.ones(1, 1, 3, 3), padding=1)[:, 0]
    assert torch.equal(box3x3(mask), ref)
    for stride in (1, 2):
        conv = nn.Conv2d(5, 4, 3, stride, 1, bias=False)
        x = torch.randn(2, 5, 9, 8, generator=gen)
        dense = conv(x)
        h, w = dense.shape[2:]
        on = torch.rand(dense.shape[0], h, w, generator=gen) > 0.5
        rows = sparse_conv3x3(_channels_last_padded(x), conv, on.reshape(-1).nonzero().squeeze(1), h, w, 11, 10)
        assert_logits_close(rows, dense.permute(0, 2, 3, 1)[on])


def test_gates_units_and_costs():
    model, x = small_dynconv()
    gates = dict(iter_gates(model))
    assert len(gates) == 2 * 6  # mask and dilated mask of each of the 3 x 2 blocks
    block = model.layer2[0]
    assert block.mask_gate.controls == [block.conv2] and block.dilate_gate.controls == [block.conv1]
    _, trace = hard_run(model, x)
    assert [e.name for e in trace][:2] == ["layer1.0.mask_gate", "layer1.0.dilate_gate"]
    assert trace.events[2].logit.shape == (len(x), 28, 28) and trace.events[4].logit.shape == (len(x), 14, 14)
    # unit costs are the convs' FLOPs per output position: 2 * 9 * C_in * C_out
    cost.calibrate(model, model.input_shape)
    assert float(block.dilate_gate.unit_cost) == 2 * 9 * 16 * 32 and float(block.mask_gate.unit_cost) == 2 * 9 * 32 * 32
    # the dilated mask is the mask's 3x3 box > 0, and holds it
    for m, d in zip(trace.events[0::2], trace.events[1::2]):
        assert torch.equal(d.decision, box3x3(m.decision.float()) > 0)
        assert (d.decision | ~m.decision).all()


# -- FLOPs ------------------------------------------------------------------------------------


def test_executed_flops_equal_flop_counter_on_real_execution():
    model, x = small_dynconv()
    prof = cost.calibrate(model, model.input_shape)
    _, trace = hard_run(model, x)
    rates = torch.stack([e.decision.float().mean() for e in trace])
    assert ((rates > 0) & (rates < 1)).all(), "every mask must keep some positions and skip others"
    assert_flops_equal_real_execution(model, x, prof)
    # static: stem, mask units (conv + fc), shortcut projections and classifier
    with torch.no_grad():
        h, static = model._stem(x[:1]), 0
        for block in model.blocks:
            with FlopCounterMode(display=False) as inner:
                block.masker(h)
                block.shortcut(h)
            static += inner.get_total_flops()
            h = block(h)
    static += 2 * 9 * 1 * 16 * 28 * 28 + 2 * 64 * 10  # stem conv, classifier
    assert prof.static == static


def test_masked_and_real_execution_give_the_same_logits():
    model, x = small_dynconv()
    logits, trace = hard_run(model, x)
    assert_clear_of_threshold(trace)
    assert_real_path_matches(model, x, logits, trace)
    # in train mode (Gumbel straight-through, hard forward) the two paths agree as well
    with torch.no_grad(), gate_mode(model, "train"):
        torch.manual_seed(3)
        a = model(x)
        torch.manual_seed(3)
        b = model.forward_conditional(x)
    assert_logits_close(a, b)


def test_decisions_do_not_depend_on_the_rest_of_the_batch():
    assert_decisions_batch_independent(*small_dynconv())


# -- official checkpoints --------------------------------------------------------------------


def official_state_dict(n: int, seed: int = 0, in_channels: int = 3, num_classes: int = 10) -> dict:
    """Official DynConv ``ResNet_32x32(sparse=True)`` names and shapes, random values."""
    gen = torch.Generator().manual_seed(seed)
    sd = RandomStateDict(gen, batches_tracked=True)
    conv, bn = sd.conv, sd.bn

    conv("conv1", in_channels, 16, 3)
    bn("bn1", 16)
    cin = 16
    for k, width in enumerate((16, 32, 64), start=1):
        for i in range(n):
            block = f"layer{k}.{i}"
            conv(block + ".conv1", cin, width, 3)
            bn(block + ".bn1", width)
            conv(block + ".conv2", width, width, 3)
            bn(block + ".bn2", width)
            if cin != width:
                conv(block + ".downsample.0", cin, width, 1)
                bn(block + ".downsample.1", width)
            sd[block + ".masker.maskconv.fc.weight"] = torch.randn(1, cin, generator=gen) * 0.3
            sd[block + ".masker.maskconv.fc.bias"] = torch.randn(1, generator=gen) * 0.1
            conv(block + ".masker.maskconv.conv", cin, 1, 3, bias=True)
            cin = width
    sd["fc.weight"] = torch.randn(num_classes, 64, generator=gen) * 0.1
    sd["fc.bias"] = torch.zeros(num_classes)
    return dict(sd)


def official_forward(sd: dict, x: torch.Tensor, n: int, calibrate: bool = False):
    """The official sparse ResNet_32x32 forward in eval mode, on an official state_dict, with
    functional ops; ``x`` already normalised. Returns (logits, [(mask, dilated mask)] per block).
    ``calibrate``: every position runs and each BN stores the statistics of its input on ``x``
    into ``sd``."""

    def conv(name, h, stride=1, pad=1):
        return F.conv2d(h, sd[name + ".weight"], sd.get(name + ".bias"), stride, pad)

    def bn(name, h):
        if calibrate:  # store the batch statistics this BN normalises by
            sd[name + ".running_mean"], sd[name + ".running_var"] = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
        return F.batch_norm(h, sd[name + ".running_mean"], sd[name + ".running_var"], sd[name + ".weight"],
                            sd[name + ".bias"], False, 0.0, 1e-5)

    masks = []
    with torch.no_grad():
        x = F.relu(bn("bn1", conv("conv1", x)))
        for k in range(1, 4):
            for i in range(n):
                name, stride = f"layer{k}.{i}", 2 if (k > 1 and i == 0) else 1
                identity = x
                if name + ".downsample.0.weight" in sd:
                    identity = bn(name + ".downsample.1", conv(name + ".downsample.0", x, stride, 0))
                # Squeeze: conv3x3 (block stride) + fc(avg pool); Gumbel at inference: q >= 0
                z = conv(name + ".masker.maskconv.conv", x, stride)
                y = F.linear(x.mean((2, 3)), sd[name + ".masker.maskconv.fc.weight"], sd[name + ".masker.maskconv.fc.bias"])
                hard = ((z + y.view(-1, 1, 1, 1)) >= 0).float()
                hard = torch.ones_like(hard) if calibrate else hard
                dilate = F.conv2d(hard, torch.ones(1, 1, 3, 3), padding=1) > 0.5  # ExpandMask, stride 1
                masks.append((hard[:, 0].bool(), dilate[:, 0]))
                h = F.relu(bn(name + ".bn1", conv(name + ".conv1", x, stride)))
                h = bn(name + ".bn2", conv(name + ".conv2", h))
                x = F.relu(identity + h * hard)
        logits = F.linear(F.avg_pool2d(x, x.shape[-1]).flatten(1), sd["fc.weight"], sd["fc.bias"])
    return logits, masks


def test_official_checkpoint_gives_official_outputs(tmp_path):
    n = 2
    sd = official_state_dict(n)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 32, 32, generator=gen)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    official_forward(sd, (x - mean) / std, n, calibrate=True)
    ref_logits, ref_masks = official_forward(sd, (x - mean) / std, n)
    rates = torch.stack([m.float().mean() for m, _ in ref_masks])
    assert ((rates > 0) & (rates < 1)).any(), "the test batch must mix kept and skipped positions"

    # as the release saves it: {'state_dict', 'optimizer', 'epoch', 'best_prec1'}, DataParallel prefix
    path = tmp_path / "dynconv14_official.pth"
    opt_state = {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}]}
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "optimizer": opt_state, "epoch": 350,
                "best_prec1": 93.1}, path)
    model = dynconv_cifar(14).eval()  # CIFAR statistics and size by default
    load_weights(model, path)
    logits, trace = hard_run(model, x)
    assert_clear_of_threshold(trace)
    decisions = [(m.decision, d.decision) for m, d in zip(trace.events[0::2], trace.events[1::2])]
    for (m, d), (rm, rd) in zip(decisions, ref_masks):
        assert torch.equal(m, rm) and torch.equal(d, rd)
    assert_logits_close(logits, ref_logits)
    with torch.no_grad():
        assert_logits_close(model.forward_conditional(x), ref_logits)

    # the same tensors under our native layout load strictly and give the same outputs
    twin = dynconv_cifar(14).eval()
    twin.load_state_dict(sd | {"normalize.mean": mean, "normalize.std": std}, strict=True)
    twin_logits, twin_trace = hard_run(twin, x)
    assert torch.equal(twin_trace.flat("decision"), trace.flat("decision"))
    assert torch.equal(twin_logits, logits)


def test_mismatched_official_checkpoint_lists_keys(tmp_path):
    sd = official_state_dict(2)
    del sd["layer2.1.masker.maskconv.conv.weight"]
    sd["layer4.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(DynattackError) as err:
        load_weights(dynconv_cifar(14), path)
    assert "layer2.1.masker.maskconv.conv.weight" in str(err.value) and "layer4.0.conv1.weight" in str(err.value)


# -- gradients ------------------------------------------------------------------------------------


def tiny_dynconv():
    """DynConv-8 with widths 2/3/4 on 1x8x8, double precision, mixed masks."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = dynconv_cifar(8, in_channels=1, input_size=8, mean=(0.5,), std=(0.5,), widths=(2, 3, 4)).double().eval()
    x = torch.rand(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    calibrate_bn(model, x, gen)
    centre_masks(model, x)
    return model, x


def test_lgm_gradient_flows_through_both_masks_and_matches_finite_differences():
    model, x = tiny_dynconv()
    lam = 2.0
    w = torch.randn(2, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss_of(inp):
        with gate_mode(model, "lgm", lam=lam):
            return (model(inp) * w).sum()

    x = x.requires_grad_()
    with gate_mode(model, "lgm", lam=lam), Trace() as trace:
        out = (model(x) * w).sum()
    for e in trace:
        e.mask.retain_grad()
    out.backward()
    for m, d in zip(trace.events[0::2], trace.events[1::2]):
        assert m.mask.grad is not None and m.mask.grad.abs().sum() > 0, m.name
        assert d.mask.grad is not None and d.mask.grad.abs().sum() > 0, d.name
        # the REFERENCE soft masks: sigmoid(lam q) and sigmoid(lam (box(soft mask) - 0.5))
        torch.testing.assert_close(m.mask, torch.sigmoid(lam * m.logit))
        torch.testing.assert_close(d.mask, torch.sigmoid(lam * (box3x3(m.mask) - 0.5)))
    # autograd equals central finite differences of the soft network (input and mask parameters)
    grad = x.grad.clone()
    h = 1e-6
    flat = x.detach().flatten()
    for j in range(0, flat.numel(), 5):
        e = torch.zeros_like(flat)
        e[j] = h
        fd = (loss_of((flat + e).view_as(x)) - loss_of((flat - e).view_as(x))) / (2 * h)
        assert abs(fd.item() - grad.flatten()[j].item()) <= 1e-6 + 1e-5 * abs(fd.item())
    bias = model.layer2[0].masker.maskconv.fc.bias
    (g_bias,) = torch.autograd.grad(loss_of(x.detach()), bias)
    with torch.no_grad():
        bias += h
        up = loss_of(x.detach())
        bias -= 2 * h
        down = loss_of(x.detach())
        bias += h
    assert g_bias.abs().item() > 0
    torch.testing.assert_close(g_bias, ((up - down) / (2 * h)).view(1), atol=1e-6, rtol=1e-5)


def test_hard_mode_forward_has_no_gradient_through_the_masks_but_values_do():
    model, x = tiny_dynconv()
    x = x.requires_grad_()
    with Trace() as trace:
        out = model(x)
    assert all(not e.mask.requires_grad for e in trace)
    # FGM: the input gradient equals that of the network with the masks frozen as constants
    (g_hard,) = torch.autograd.grad(out.sum(), x)
    masks = [e.mask.detach() for e in trace]
    frozen = iter(masks)
    for b in model.blocks:
        b.masks = lambda _x, it=frozen: (next(it), next(it))  # instance attribute shadows the method
    try:
        (g_frozen,) = torch.autograd.grad(model(x).sum(), x)
    finally:
        for b in model.blocks:
            del b.masks
    torch.testing.assert_close(g_hard, g_frozen)
    # the trace values of both masks carry gradient (what energy attacks descend)
    with Trace() as trace:
        model(x)
    for e in trace:
        assert e.value.requires_grad, e.name


def test_gumbel_estimator_is_straight_through_and_noise_can_be_switched_off():
    model, x = small_dynconv()
    gate = model.layer1[0].mask_gate
    q = torch.linspace(-3, 3, 13, requires_grad=True)
    gate.gumbel_noise, gate.temperature = False, 2.0
    out = gumbel_straight_through(gate, q)
    assert torch.equal(out.detach(), (q >= 0).float())
    out.sum().backward()
    torch.testing.assert_close(q.grad, torch.sigmoid(q / 2) * (1 - torch.sigmoid(q / 2)) / 2)
    gate.gumbel_noise = True
    torch.manual_seed(0)
    noisy = gumbel_straight_through(gate, torch.zeros(10000))
    assert 0.45 < noisy.mean() < 0.55 and set(noisy.unique().tolist()) == {0.0, 1.0}


# -- attacks run unchanged --------------------------------------------------------------------


def test_energy_attacks_run_unchanged():
    from dynattack.attacks import ILFO, GradAuto

    model, x = small_dynconv(batch=2)
    res = GradAuto(model, steps=3, progress=False)(x)
    assert res.adv.shape == x.shape and torch.isfinite(res.flops_adv).all()
    assert (res.flops_adv >= res.flops_clean).all() and (res.flops_adv <= res.flops_full).all()
    assert len(res.gate_names) == 12
    res = ILFO(model, steps=2, progress=False)(x)
    assert res.adv.shape == x.shape


@pytest.mark.parametrize("grad", ["fgm", "lgm", "lgm_st"])
def test_accuracy_attacks_run_unchanged(grad):
    from dynattack.attacks import IFGSM

    model, x = small_dynconv(batch=2)
    labels = torch.tensor([1, 7])
    res = IFGSM(model, eps=8 / 255, steps=2, grad=grad, lam=10.0, progress=False)(x, labels)
    assert res.adv.shape == x.shape and (res.adv - x).abs().max() <= 8 / 255 + 1e-6


# -- training -------------------------------------------------------------------------------------


def test_sparsity_loss_matches_hand_count():
    from dynattack.train.dynconv import bounds, sparsity_loss

    assert bounds(0.0, 0.5) == (0.5, 0.5) and bounds(1.0, 0.5) == pytest.approx((0.0, 1.0))
    model, x = small_dynconv()
    c1, c2 = (c.float() for c in model.block_costs())
    _, trace = hard_run(model, x)
    loss, frac, per_block = sparsity_loss(trace, c1, c2, 0.5, 1.0)
    used = sum(e.decision.sum().item() * float(e.unit_cost) for e in trace) / len(x)
    full = sum(e.decision[0].numel() * float(e.unit_cost) for e in trace)
    assert frac.item() == pytest.approx(used / full, rel=1e-6)
    assert loss.item() == pytest.approx((used / full - 0.5) ** 2, rel=1e-5)  # bounds fully open
    ex = cost.executed_flops(model, trace)
    assert frac.item() == pytest.approx(((ex - cost.profile(model).static).mean() / full).item(), rel=1e-6)


def test_all_on_dynconv_is_the_static_resnet_it_can_start_from(tmp_path):
    from dynattack.models.resnet import ResNet
    from dynattack.train.dynconv import static_backbone

    torch.manual_seed(0)
    static = ResNet(14, **FMNIST).eval()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    calibrate_bn(static, x, torch.Generator().manual_seed(0))
    model = dynconv_cifar(14, **FMNIST).eval()
    missing, unexpected = model.load_state_dict(static_backbone(model, static.state_dict()), strict=False)
    assert not unexpected and missing and all(".masker." in k for k in missing)
    with torch.no_grad(), gate_mode(model, "hard", force="on"):
        assert_logits_close(model(x), static(x))
        assert_logits_close(model.forward_conditional(x), static(x))


def test_training_smoke_run_writes_weights_and_card(tmp_path, fashion_mnist_available):
    from dynattack.models.resnet import ResNet
    from dynattack.train import _recipe, train_model
    from dynattack.train.common import save_victim

    spec = get_spec("dynconv20-fmnist")
    assert _recipe(spec.family).__name__ == "train_dynconv" and spec.train_args["init_from"] == "resnet20-fmnist"
    # as `dynattack train dynconv20-fmnist --out DIR` runs it: the static backbone is found in DIR
    save_victim(ResNet(20, **FMNIST), "resnet20-fmnist", {"name": "resnet20-fmnist"}, tmp_path)
    init = tmp_path / "resnet20-fmnist.safetensors"
    path = train_model("dynconv20-fmnist", seed=0, out_dir=tmp_path, epochs=1, limit=128, log=lambda *_: None)
    saved = json.loads((tmp_path / "dynconv20-fmnist.json").read_text())
    assert path.exists() and saved["budget"] == 0.5 and saved["family"] == "dynconv"
    assert saved["init_from"] == "resnet20-fmnist"
    for key in ("accuracy", "compute_kept_pct", "compute_saved_pct", "sparse_conv_kept_pct", "flops_full",
                "train_command", "seed", "epochs", "train_seconds", "machine", "train_args"):
        assert key in saved
    assert 0 < saved["compute_kept_pct"] <= 100
    load_weights(get_spec("dynconv20-fmnist").build(), path)

    # a short warm-up with every gate on is exercised too; deterministic given the seed
    spec = dataclasses.replace(spec, train_args={**spec.train_args, "batch_size": 64, "warmup_frac": 0.3})
    train = functools.partial(_recipe(spec.family), spec, seed=0, epochs=1, limit=192, log=lambda *_: None)
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
