"""SkipNet: official checkpoints, masked vs real skipping, FLOPs accounting, per-sample gates,
ImageNet layouts, SP/HRL training smoke runs.

Checks go against independent computations: a functional re-implementation of the official
forward (written from the official release's description), ``FlopCounterMode`` over the real
skipping path, and each sample run alone.
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
from dynattack.models.skipnet import CIFAR10_MEAN, CIFAR10_STD, skipnet_cifar, skipnet_imagenet
from model_helpers import RandomStateDict, assert_clear_of_threshold, assert_logits_close, calibrate_bn, split_at_gap

FMNIST = {"in_channels": 1, "num_classes": 10, "input_size": 28, "mean": (0.2860,), "std": (0.3530,)}
GATES = ["rnn", "ffgate1", "ffgate2"]


# -- helpers ------------------------------------------------------------------------------------


def gate_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, gate logits (B, G), decisions (B, G)) of the masked forward in hard mode."""
    with torch.no_grad(), Trace() as trace:
        out = model(x)
    return out, trace.flat("logit"), trace.flat("decision")


def diversify(model, x: torch.Tensor) -> None:
    """Centre the gate logits on the batch median so some samples run a block and others skip
    it, with no logit within rounding of the threshold."""
    with torch.no_grad():
        if model.gate_type == "rnn":
            # one bias is shared by all RNN gates: amplify how much the embeddings differ between
            # samples, then pick the bias that mixes decisions in the most blocks
            for _, _, source in model.layout:
                if source is not None:
                    getattr(model, source)[1].weight.mul_(10.0)

            def mixed(bias):  # blocks with mixed decisions, then the logits' distance from 0
                model.control.proj.bias.fill_(bias)
                _, q, decisions = gate_logits(model, x)
                rate = decisions.float().mean(0)
                return int(((rate > 0) & (rate < 1)).sum()), q.abs().min().item()

            model.control.proj.bias.fill_(max(torch.linspace(-3, 3, 61).tolist(), key=mixed))
            return
        for k, (_, _, source) in enumerate(model.layout):  # one FF gate at a time, in forward order
            if source is None:
                continue
            _, q, _ = gate_logits(model, x)
            column = [n for n, _, s in model.layout if s is not None].index(model.layout[k][0])
            getattr(model, source).linear_layer.bias[1] -= split_at_gap(q[:, column])


def small_skipnet(gate: str, seed: int = 0, batch: int = 12):
    """A random-init SkipNet-14 on 1x28x28 in eval mode, with varied decisions on its batch."""
    model, x = _small_skipnet(gate, seed, batch)
    return copy.deepcopy(model), x.clone()


@functools.lru_cache(maxsize=None)
def _small_skipnet(gate: str, seed: int, batch: int):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = skipnet_cifar(14, gate=gate, **FMNIST).eval()
    # images with different brightness and texture: their gate features differ
    x = torch.rand(batch, 1, 28, 28, generator=gen) * torch.linspace(0.1, 1.0, batch).view(-1, 1, 1, 1)
    calibrate_bn(model, x, gen)
    diversify(model, x)
    return model, x


# -- the official layout ------------------------------------------------------------------------


def official_state_dict(n: int, gate: str, seed: int = 0, in_channels: int = 3, num_classes: int = 10) -> dict:
    """A state_dict with the official CIFAR SkipNet names and shapes (random values), as the
    release's ResNetRecurrentGateSP / ResNetFeedForwardSP hold them. PyTorch-0.3 era: no
    ``num_batches_tracked``. Blocks carry their shortcut as ``.downsample`` too; every block
    (the last included) has a gate."""
    gen = torch.Generator().manual_seed(seed)
    sd = RandomStateDict(gen, batches_tracked=False)
    conv, bn = sd.conv, sd.bn

    conv("conv1", in_channels, 16, 3)
    bn("bn1", 16)
    cin = 16
    for g, width in enumerate((16, 32, 64), start=1):
        for i in range(n):
            block = f"group{g}_layer{i}"
            conv(block + ".conv1", cin, width, 3)
            bn(block + ".bn1", width)
            conv(block + ".conv2", width, width, 3)
            bn(block + ".bn2", width)
            if cin != width:
                conv(f"group{g}_ds{i}.0", cin, width, 1)
                bn(f"group{g}_ds{i}.1", width)
                for key in [k for k in sd if k.startswith(f"group{g}_ds{i}.")]:
                    sd[block + ".downsample." + key.split(".", 1)[1]] = sd[key]
            gate_name = f"group{g}_gate{i}"
            if gate == "rnn":
                conv(gate_name + ".1", width, 10, 1, bias=True)
            else:
                if gate == "ffgate1":
                    conv(gate_name + ".conv1", width, width, 3)
                    bn(gate_name + ".bn1", width)
                    conv(gate_name + ".conv2", width, width, 3)
                    bn(gate_name + ".bn2", width)
                else:
                    conv(gate_name + ".conv1", width, width, 3)
                    bn(gate_name + ".bn1", width)
                conv(gate_name + ".linear_layer", width, 2, 1, bias=True)
            cin = width
    if gate == "rnn":
        for key, shape in [("weight_ih_l0", (40, 10)), ("weight_hh_l0", (40, 10)), ("bias_ih_l0", (40,)),
                           ("bias_hh_l0", (40,))]:
            sd["control.rnn." + key] = (torch.rand(shape, generator=gen) - 0.5) * 0.6
        sd["control.proj.weight"] = torch.randn(1, 10, generator=gen)
        sd["control.proj.bias"] = torch.zeros(1)
    sd["fc.weight"] = torch.randn(num_classes, 64, generator=gen) * 0.1
    sd["fc.bias"] = torch.zeros(num_classes)
    return dict(sd)


def official_forward(sd: dict, x: torch.Tensor, n: int, gate: str, calibrate: bool = False):
    """The official SkipNet forward (eval mode), written with functional ops on the official
    state_dict; ``x`` is already normalised as the official loaders do. Returns (logits,
    decisions (B, gated blocks), execute probabilities (B, gated blocks)). ``calibrate``: every
    block runs and each BN stores the statistics of its input on ``x`` into ``sd``."""

    def conv(name, h, stride=1, pad=1):
        return F.conv2d(h, sd[name + ".weight"], sd.get(name + ".bias"), stride, pad)

    def bn(name, h):
        if calibrate:  # store the batch statistics this BN normalises by
            sd[name + ".running_mean"], sd[name + ".running_var"] = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
        return F.batch_norm(h, sd[name + ".running_mean"], sd[name + ".running_var"], sd[name + ".weight"],
                            sd[name + ".bias"], False, 0.0, 1e-5)

    def block(name, h, stride):
        out = bn(name + ".bn2", conv(name + ".conv2", F.relu(bn(name + ".bn1", conv(name + ".conv1", h, stride)))))
        if name + ".downsample.0.weight" in sd:
            h = bn(name + ".downsample.1", conv(name + ".downsample.0", h, stride, 0))
        return F.relu(out + h)

    lstm = nn.LSTM(10, 10)
    if gate == "rnn":
        lstm.load_state_dict({k[len("control.rnn."):]: v for k, v in sd.items() if k.startswith("control.rnn.")})
    hidden = None

    def gate_prob(name, h):  # the probability of executing the next block
        nonlocal hidden
        pooled = lambda t: F.avg_pool2d(t, t.shape[-1])  # AvgPool2d(pool_size): the whole map
        if gate == "rnn":
            emb = conv(name + ".1", pooled(h), 1, 0)
            out, hidden = lstm(emb.view(1, h.shape[0], -1), hidden)
            return torch.sigmoid(F.linear(out[0], sd["control.proj.weight"], sd["control.proj.bias"])).view(-1)
        if gate == "ffgate1":
            h = F.max_pool2d(h, 2)
            h = F.relu(bn(name + ".bn1", conv(name + ".conv1", h)))
            h = F.relu(bn(name + ".bn2", conv(name + ".conv2", h, 2)))
        else:
            h = F.relu(bn(name + ".bn1", conv(name + ".conv1", h, 2)))
        return conv(name + ".linear_layer", pooled(h), 1, 0).flatten(1).softmax(1)[:, 1]

    with torch.no_grad():
        x = F.relu(bn("bn1", conv("conv1", x)))
        x = block("group1_layer0", x, 1)
        prob = gate_prob("group1_gate0", x)
        prev, decisions, probs = x, [], []
        for g in range(1, 4):
            for i in range(int(g == 1), n):
                mask = (torch.ones_like(prob) if calibrate else (prob > 0.5).float()).view(-1, 1, 1, 1)
                decisions.append(mask.view(-1).bool())
                probs.append(prob)
                stride = 2 if (g > 1 and i == 0) else 1
                if f"group{g}_ds{i}.0.weight" in sd:
                    prev = bn(f"group{g}_ds{i}.1", conv(f"group{g}_ds{i}.0", prev, stride, 0))
                x = block(f"group{g}_layer{i}", x, stride)
                prev = x = mask * x + (1 - mask) * prev
                prob = gate_prob(f"group{g}_gate{i}", x)  # the last one decides nothing
        logits = F.linear(F.avg_pool2d(x, x.shape[-1]).flatten(1), sd["fc.weight"], sd["fc.bias"])
    return logits, torch.stack(decisions, 1), torch.stack(probs, 1)


def save_official(sd: dict, path) -> None:
    """As the release saved it: DataParallel's ``module.`` prefix inside ``{'state_dict': ...}``."""
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "iter": 64000}, path)


def centre_official_gates(sd: dict, x: torch.Tensor, n: int, gate: str) -> None:
    """Shift the official gate biases so each gate's threshold sits in the widest gap between its
    batch's logits near the median: some samples run each block, others skip it, none on a tie."""
    if gate == "rnn":
        probs = official_forward(sd, x, n, gate)[2]
        sd["control.proj.bias"] = sd["control.proj.bias"] - split_at_gap(torch.logit(probs.double()))
        return
    names = [f"group{g}_gate{i}" for g in range(1, 4) for i in range(n)][:-1]
    for k, name in enumerate(names):
        probs = official_forward(sd, x, n, gate)[2]
        bias = sd[name + ".linear_layer.bias"].clone()
        bias[1] -= split_at_gap(torch.logit(probs[:, k].double()))
        sd[name + ".linear_layer.bias"] = bias


@pytest.mark.parametrize("gate", ["rnn", "ffgate1"])
def test_official_checkpoint_gives_official_outputs(gate, tmp_path):
    n = 2
    sd = official_state_dict(n, gate)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(10, 3, 32, 32, generator=gen) * torch.linspace(0.2, 1.0, 10).view(-1, 1, 1, 1)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    official_forward(sd, (x - mean) / std, n, gate, calibrate=True)
    centre_official_gates(sd, (x - mean) / std, n, gate)
    ref_logits, ref_decisions, _ = official_forward(sd, (x - mean) / std, n, gate)
    assert 0 < ref_decisions.float().mean() < 1, "the test batch must mix run and skipped blocks"

    path = tmp_path / "skipnet14_official.pth"
    save_official(sd, path)
    model = skipnet_cifar(14, gate=gate, input_size=32).eval()  # CIFAR statistics by default
    load_weights(model, path)
    logits, q, decisions = gate_logits(model, x)
    assert_clear_of_threshold(q)
    assert torch.equal(decisions, ref_decisions)
    assert_logits_close(logits, ref_logits)

    # the same tensors under our native names load strictly and give the same outputs
    native = {k: v for k, v in sd.items() if ".downsample." not in k and not k.startswith("group3_gate1.")}
    native |= {"normalize.mean": mean, "normalize.std": std}
    native |= {k: torch.tensor(0) for k in model.state_dict() if k.endswith("num_batches_tracked")}
    twin = skipnet_cifar(14, gate=gate, input_size=32).eval()
    twin.load_state_dict(native, strict=True)
    twin_logits, _, twin_decisions = gate_logits(twin, x)
    assert torch.equal(twin_decisions, decisions)
    assert torch.equal(twin_logits, logits)


def test_mismatched_official_checkpoint_lists_keys(tmp_path):
    sd = official_state_dict(2, "rnn")
    del sd["group2_layer1.conv1.weight"]
    sd["group4_layer0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "wrong.pth"
    save_official(sd, path)
    model = skipnet_cifar(14, gate="rnn", input_size=32)
    with pytest.raises(DynattackError) as err:
        load_weights(model, path)
    assert "group2_layer1.conv1.weight" in str(err.value) and "group4_layer0.conv1.weight" in str(err.value)
    # an FF checkpoint does not fit an RNN model either
    save_official(official_state_dict(2, "ffgate1"), path)
    with pytest.raises(DynattackError, match="control.rnn.weight_ih_l0"):
        load_weights(model, path)


# -- masked batch path vs real skipping --------------------------------------------------------


@pytest.mark.parametrize("gate", GATES)
def test_real_skipping_matches_masked_path(gate):
    model, x = small_skipnet(gate)
    logits, q, decisions = gate_logits(model, x)
    assert_clear_of_threshold(q)
    per_block = decisions.float().mean(0)
    assert ((per_block > 0) & (per_block < 1)).any(), "some block must run for some samples only"
    assert decisions.float().sum(1).unique().numel() > 1, "samples must run different numbers of blocks"
    with torch.no_grad(), Trace() as trace:
        skipped = model.forward_conditional(x)
    assert torch.equal(trace.flat("decision"), decisions)
    assert_logits_close(skipped, logits)
    for i in range(len(x)):  # batch 1: blocks are simply not run
        with torch.no_grad():
            assert_logits_close(model.forward_conditional(x[i:i + 1]), logits[i:i + 1])


def test_forced_gates_and_gate_api():
    model, x = small_skipnet("rnn")
    gates = dict(iter_gates(model))
    assert len(gates) == 3 * 2 - 1  # every block but the first
    assert all(g.tau == 0.5 and g.value_fn is torch.sigmoid for g in gates.values())
    assert gates["gates.group2_layer0"].controls == [model.group2_layer0]
    with torch.no_grad(), gate_mode(model, "hard", force="on"), Trace() as trace:
        model.forward_conditional(x)
    assert trace.flat("decision").all()


# -- FLOPs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", GATES)
def test_executed_flops_equal_flop_counter_on_real_skipping(gate):
    model, x = small_skipnet(gate)
    prof = cost.calibrate(model, model.input_shape)
    with torch.no_grad(), Trace() as trace:
        model(x)
    assert_clear_of_threshold(trace)
    flops = cost.executed_flops(model, trace)
    assert flops.unique().numel() > 1
    for i in range(len(x)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.forward_conditional(x[i:i + 1])
        assert counter.get_total_flops() == flops[i].item()
    with torch.no_grad(), FlopCounterMode(display=False) as counter, gate_mode(model, "hard", force="on"):
        model.forward_conditional(x[:1])
    assert counter.get_total_flops() == prof.full
    # the shortcut projections are static cost: they run when their block is skipped
    with torch.no_grad(), FlopCounterMode(display=False) as counter, gate_mode(model, "hard", force="off"):
        model.forward_conditional(x[:1])
    assert counter.get_total_flops() == prof.static
    # a gate controls its block's residual branch only; the shortcut projection is static
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.group2_layer0(torch.zeros(1, 16, 28, 28))
    assert prof.gated["gates.group2_layer0"] == counter.get_total_flops()


# -- gates are per sample ----------------------------------------------------------------------


@pytest.mark.parametrize("gate", GATES)
def test_decisions_do_not_depend_on_the_rest_of_the_batch(gate):
    model, x = small_skipnet(gate)
    _, q, decisions = gate_logits(model, x)
    assert_clear_of_threshold(q)
    others = torch.rand(5, *x.shape[1:], generator=torch.Generator().manual_seed(7))
    for i in range(len(x)):
        _, q_alone, alone = gate_logits(model, x[i:i + 1])
        _, q_mixed, mixed = gate_logits(model, torch.cat([others, x[i:i + 1]]))
        assert torch.equal(alone[0], decisions[i]) and torch.equal(mixed[-1], decisions[i])
        assert_logits_close(q_alone[0], q[i])


# -- ImageNet layouts -------------------------------------------------------------------------


def test_imagenet_skipnet50_forward_and_101_layout():
    torch.manual_seed(0)
    model = skipnet_imagenet(50).eval()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad(), Trace() as trace:
        logits = model(x)
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert trace.flat("decision").shape == (2, 3 + 4 + 6 + 3 - 1)
    assert_clear_of_threshold(trace)
    with torch.no_grad():
        assert_logits_close(model.forward_conditional(x), logits)
    sd = model.state_dict()
    assert sd["control.proj.weight"].shape == (1, 10, 1, 1)  # a 1x1 conv in the ImageNet release
    assert sd["group1_ds0.0.weight"].shape == (256, 64, 1, 1) and sd["group4_gate1.1.weight"].shape == (10, 2048, 1, 1)
    assert "group4_gate2.1.weight" not in sd  # the last block's gate decides nothing

    deep = skipnet_imagenet(101)
    assert len(dict(iter_gates(deep))) == 3 + 4 + 23 + 3 - 1
    assert "group3_layer22.conv3.weight" in deep.state_dict()


# -- training smoke runs ----------------------------------------------------------------------


def _smoke_spec(name: str, **over):
    spec = get_spec(name)
    return dataclasses.replace(spec, train_args={**spec.train_args, "batch_size": 64, **over})


def test_sp_then_hrl_training_smoke(tmp_path, fashion_mnist_available):
    from dynattack.train.common import save_victim
    from dynattack.train.skipnet import train_skipnet

    sp = _smoke_spec("skipnet38-rnn-sp", warmup_epochs=0.5)
    model, card = train_skipnet(sp, seed=0, epochs=1, limit=192, log=lambda *_: None)
    path = save_victim(model, sp.name, card, tmp_path)
    saved = json.loads((tmp_path / "skipnet38-rnn-sp.json").read_text())
    assert path.exists() and saved["training"] == "sp" and saved["gate"] == "rnn"
    for key in ("accuracy", "compute_kept_pct", "flops_full", "train_command", "seed", "epochs", "train_seconds",
                "machine"):
        assert key in saved
    assert 0 < saved["compute_kept_pct"] <= 100

    hrl = _smoke_spec("skipnet38-rnn-hrl")
    with pytest.raises(DynattackError, match="train skipnet38-rnn-sp first"):
        train_skipnet(hrl, epochs=1, limit=64, sp_weights=tmp_path / "missing.safetensors")
    model, card = train_skipnet(hrl, seed=0, epochs=1, limit=192, sp_weights=path, log=lambda *_: None)
    save_victim(model, hrl.name, card, tmp_path)
    # deterministic given the seed, sampled gate decisions included
    again, _ = train_skipnet(hrl, seed=0, epochs=1, limit=192, sp_weights=path, log=lambda *_: None)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    saved = json.loads((tmp_path / "skipnet38-rnn-hrl.json").read_text())
    assert saved["training"] == "hrl" and saved["init_from"] == "skipnet38-rnn-sp"
    assert (tmp_path / "skipnet38-rnn-hrl.safetensors").exists()
    # back in hard mode, with the default estimator: decisions are deterministic again
    assert all(g.mode == "hard" for _, g in iter_gates(model))
