"""Every attack and cost entry point checks its input against the victim (shape, dtype, labels)
with one DynattackError; a trace at another resolution is refused by executed_flops; a network
without ``input_shape`` is calibrated on the first shape it sees and refuses others until
recalibrated on purpose; ``AttackResult.psnr_db`` leaves unchanged samples out as summary.json.

The victims here are fully convolutional, so that a wrong resolution runs (and used to be
counted at the calibrated resolution) instead of failing inside the network."""
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynattack import cost, metrics
from dynattack.attacks import FGSM, ILFO, PGD, GradAuto, IFGSM, PointGradAuto, PointIFGSM, PointILFO
from dynattack.data import point_batch
from dynattack.data.points import PointCloud
from dynattack.errors import DynattackError
from dynattack.gates import Gate, Trace, force_gates
from dynattack.models.sparse_unet import SparseUNet


class Spatial(nn.Module):
    """Fully convolutional: a position gate ``q_hw = 8 (x_hw - 0.5)`` masks ``conv`` (1 -> 2
    channels, one unit = one position), then a global mean and a Linear to 3 classes. Runs at
    any resolution; its gated FLOPs grow with it."""

    def __init__(self, input_shape=(1, 4, 4), num_classes=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(2, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.gate = Gate(controls=[self.conv])
        if input_shape is not None:
            self.input_shape = input_shape
        if num_classes is not None:
            self.num_classes = num_classes

    def forward(self, x):
        h = self.gate(8 * (x[:, 0] - 0.5))[:, None] * self.conv(x)
        return self.head(h.mean((2, 3)))


def images(n=2, size=4, seed=0):
    return 0.4 * torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def labels(n=2):
    return torch.zeros(n, dtype=torch.long)


ATTACKS = [
    lambda m: ILFO(m, steps=2, progress=False),
    lambda m: GradAuto(m, steps=2, progress=False),
    lambda m: FGSM(m, eps=0.1, progress=False),
    lambda m: IFGSM(m, eps=0.1, steps=2, progress=False),
    lambda m: PGD(m, eps=0.1, steps=2, progress=False),
]


@pytest.mark.parametrize("make", ATTACKS)
@pytest.mark.parametrize("bad, what", [
    (images(size=8), "(B, 1, 4, 4)"),  # another resolution: used to run, FLOPs of the calibrated one
    (images(size=2), "(B, 1, 4, 4)"),
    (images().double(), "float32"),  # used to be a raw conv dtype error
    (images().repeat(1, 3, 1, 1), "(B, 1, 4, 4)"),  # channel count: a raw conv error
    (images()[0], "(B, 1, 4, 4)"),  # no batch dimension: conv2d took it as unbatched
])
def test_attacks_refuse_inputs_the_victim_does_not_take(make, bad, what):
    atk = make(Spatial())
    with pytest.raises(DynattackError, match=type(atk).__name__ + r":.*" + what.replace("(", r"\(").replace(")", r"\)")):
        atk(bad, labels(len(bad)))


@pytest.mark.parametrize("make", ATTACKS[2:])
@pytest.mark.parametrize("num_classes", [None, 3])
@pytest.mark.parametrize("label", [3, -1])
def test_labels_outside_the_classes_are_refused(make, num_classes, label):
    """Against ``num_classes`` where the model declares it, else the logits' width (3 here);
    these used to end in a raw cross-entropy error."""
    y = torch.tensor([0, label])
    with pytest.raises(DynattackError, match=rf"labels must lie in \[0, 3\), got {label}"):
        make(Spatial(num_classes=num_classes))(images(), y)


def test_declared_num_classes_wins_over_the_logits_width():
    with pytest.raises(DynattackError, match=r"\[0, 2\), got 2"):
        FGSM(Spatial(num_classes=2), eps=0.1, progress=False)(images(), torch.tensor([0, 2]))
    res = FGSM(Spatial(num_classes=None), eps=0.1, progress=False)(images(), torch.tensor([0, 2]))
    assert res.labels.tolist() == [0, 2]


def test_boolean_labels_are_refused():
    with pytest.raises(DynattackError, match=r"labels must be an integer tensor of shape \(2,\)"):
        FGSM(Spatial(), eps=0.1, progress=False)(images(), torch.zeros(2, dtype=torch.bool))


def spatial_flops_at(model, x):
    """FlopCounterMode over a really conditional execution: conv on the active positions only
    (2 * Cout * Cin * 9 per position), the head always."""
    active = int((x[:, 0] >= 0.5).sum())
    with FlopCounterMode(display=False) as counter:
        model.head(torch.zeros(1, 2))
    return 2 * 2 * 1 * 9 * active + counter.get_total_flops()


def test_executed_flops_refuses_a_trace_at_another_resolution_naming_the_gate():
    model = Spatial()
    cost.calibrate(model, model.input_shape)
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), Trace() as trace:
        model(x)
    assert cost.executed_flops(model, trace).item() == spatial_flops_at(model, x)
    big = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), Trace() as trace:
        model(big)
    # the unit costs are those of 4x4; before, 8x8 was counted with them (a wrong figure, not an error)
    with pytest.raises(DynattackError, match=r"gate gate ran 64 units per sample.*calibrated with 16 at input shape \(1, 4, 4\)"):
        cost.executed_flops(model, trace)


class BlockGated(nn.Module):
    """One block gate (a single unit per sample, at any resolution) over a fully convolutional
    conv: its unit count cannot tell the resolution, its FLOPs grow with it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.gate = Gate(controls=[self.conv])

    def forward(self, x):
        q = x.mean((1, 2, 3)) - 0.2
        return (self.gate(q)[:, None, None, None] * self.conv(x)).mean((2, 3))


def test_executed_flops_refuses_a_block_gate_trace_at_another_resolution():
    model = BlockGated()
    cost.calibrate(model, (1, 4, 4))
    with torch.no_grad(), Trace() as trace:
        model(torch.full((2, 1, 4, 4), 0.5))
    assert cost.executed_flops(model, trace).tolist() == [2 * 2 * 9 * 16] * 2  # conv on every position
    with torch.no_grad(), Trace() as trace:
        model(torch.full((2, 1, 8, 8), 0.5))
    # one unit per sample at 8x8 as at 4x4: only the recorded input shape shows the difference
    with pytest.raises(DynattackError, match=r"executed_flops: BlockGated takes inputs of shape \(B, 1, 4, 4\)"):
        cost.executed_flops(model, trace)


@pytest.mark.parametrize("call, takes_tensor", [
    (lambda m, x: cost.profile(m, tuple(x.shape[1:])), False),  # used to recalibrate the zoo victim silently
    (lambda m, x: cost.calibrate(m, tuple(x.shape[1:])), False),
    (lambda m, x: cost.full_flops_per_sample(m, x), True),
    (lambda m, x: cost.batch1_latency_ms(m, {"clean": (x, None)}, repeats=1, warmup=1), True),
])
def test_cost_entry_points_refuse_another_shape(call, takes_tensor):
    model = Spatial()
    cost.calibrate(model, model.input_shape)
    with pytest.raises(DynattackError, match=r"takes inputs of shape \(B, 1, 4, 4\) \(its input_shape\)"):
        call(model, images(size=8))
    if takes_tensor:
        with pytest.raises(DynattackError, match="takes float32 inputs"):
            call(model, images().double())
    assert cost.profile(model).input_shape == (1, 4, 4)  # nothing recalibrated


def test_a_network_without_input_shape_keeps_its_first_shape_until_recalibrated():
    model = Spatial(input_shape=None)
    small, big = images(size=4), images(size=8)
    first = ILFO(model, steps=3, progress=False)(small)
    assert cost.profile(model).input_shape == (1, 4, 4)
    with force_gates(model, "on"), FlopCounterMode(display=False) as counter:
        model(small[:1])
    assert (first.flops_full == counter.get_total_flops()).all()
    with pytest.raises(DynattackError, match=r"\(B, 1, 4, 4\) \(the shape it was calibrated at; "
                                             r"dynattack.cost.calibrate\(model, shape\) switches on purpose\), "
                                             r"got inputs of shape \(2, 1, 8, 8\)"):
        ILFO(model, steps=3, progress=False)(big)
    cost.calibrate(model, (1, 8, 8))  # on purpose
    res = ILFO(model, steps=3, progress=False)(big)
    with force_gates(model, "on"), FlopCounterMode(display=False) as counter:
        model(big[:1])
    assert (res.flops_full == counter.get_total_flops()).all()
    for i in range(2):
        assert res.flops_clean[i].item() == spatial_flops_at(model, big[i:i + 1])
    with pytest.raises(DynattackError, match=r"\(B, 1, 8, 8\)"):
        ILFO(model, steps=3, progress=False)(small)


# --------------------------------------------------------------------------- point victims


def point_victim():
    torch.manual_seed(0)
    return SparseUNet(num_classes=4, widths=(4, 8), class_names=("a", "b", "c", "d")).eval()


def cloud():
    g = torch.Generator().manual_seed(0)
    xyz = torch.rand(30, 3, generator=g) * 0.1
    y = (xyz[:, 2] / 0.03).long().clamp(max=3)
    y[:2] = -1  # ignored
    return point_batch.pack_clouds([PointCloud(xyz, torch.rand(30, 3, generator=g), y, ())])


POINT_ATTACKS = [
    lambda m: PointIFGSM(m, steps=1, progress=False),
    lambda m: PointGradAuto(m, steps=1, progress=False),
    lambda m: PointILFO(m, steps=1, progress=False),
]


@pytest.mark.parametrize("make", POINT_ATTACKS)
def test_point_attacks_check_columns_dtype_and_label_range(make):
    net, data = point_victim(), cloud()
    x, y = data.points, data.labels
    atk = make(net)
    owner = type(atk).__name__
    assert net.input_shape[-1] == 7  # xyz, 3 features, flag; any number of points
    with pytest.raises(DynattackError, match=owner + ": SparseUNet takes float32"):
        atk(x.double(), y)  # used to be a raw dtype error inside the sparse convolution
    bad = y.clone()
    bad[0, 5] = 4
    with pytest.raises(DynattackError, match=owner + r": labels must lie in \[0, 4\) or -1 \(ignored\), got 4"):
        atk(x, bad)
    with pytest.raises(DynattackError, match=owner + r": SparseUNet takes inputs of shape \(B, N, 7\)"):
        atk(torch.cat([x[..., :3], x[..., -1:]], -1), y)  # no features (checked before any forward)
    more = point_batch.pack_clouds([PointCloud(torch.rand(45, 3) * 0.1, torch.rand(45, 3),
                                               torch.zeros(45, dtype=torch.long), ())])
    assert atk(more.points, more.labels).adv.shape == more.points.shape  # another number of points is fine


# --------------------------------------------------------------------------- PSNR aggregate


def test_psnr_db_leaves_unchanged_samples_out_like_summary():
    model = Spatial()
    x = images(3)
    x[2] = 0.9  # every position already on: nothing to recover, returned unchanged
    res = ILFO(model, steps=30, progress=False)(x)
    assert torch.equal(res.adv[2], x[2]) and res.psnr[2] == math.inf and math.isinf(res.psnr.mean())
    mse = (res.adv[:2] - x[:2]).double().pow(2).flatten(1).mean(1)
    expected = float((-10 * torch.log10(mse)).mean())
    assert res.psnr_db == pytest.approx(expected, rel=1e-6)  # the differences are taken in float32
    assert res.psnr_db == metrics.psnr_mean(res.psnr)[0]
    same = ILFO(model, steps=3, progress=False)(x[2:])
    assert math.isnan(same.psnr_db)  # no sample changed: no mean to give (summary.json: null)
