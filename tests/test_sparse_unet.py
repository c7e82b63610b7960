"""The sparse U-Net with voxelisation as gates, against independent computations: the hard forward
vs the standard voxelisation (data.points.voxelize) feeding the same layers, soft occupancy vs hard
as the slope grows, input gradients vs central finite differences (float64), executed FLOPs vs
FlopCounterMode and vs a brute-force count over Python sets; the registry entry and a training
smoke run."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dynattack.data.point_batch import pack_clouds
from dynattack.data.points import PointCloud, voxelize
from dynattack.gates import Trace, force_gates, gate_mode
from dynattack.models import create_model, get_spec
from dynattack.models.sparse_unet import PAD_LOGIT, SparseUNet, VoxelEvent, relation
from dynattack.sparse import SparseTensor
from dynattack.train import _recipe
from dynattack.train.sparse_unet import train_sparse_unet

L = 0.02
DT = torch.float64
WIDTHS = (4, 8, 8)
CLASSES = 8


def cloud(n: int, seed: int, margin: float = 0.05) -> PointCloud:
    """``n`` points in a 4 x 4 x 4-voxel block around the origin (shared voxels, negative
    coordinates), each at least ``margin`` voxel units inside its voxel."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randint(-2, 2, (n, 3), generator=g)
    inside = margin + (1 - 2 * margin) * torch.rand(n, 3, generator=g, dtype=DT)
    return PointCloud(((cells + inside) * L).float(), torch.rand(n, 3, generator=g),
                      torch.randint(0, CLASSES, (n,), generator=g), ())


def batch(*sizes: int) -> torch.Tensor:
    return pack_clouds([cloud(n, seed) for seed, n in enumerate(sizes)]).points.double()


def model(rel: str = "sigmoid", seed: int = 0, **kw) -> SparseUNet:
    """A float64 eval-mode U-Net with random BN statistics (so outputs depend on everything)."""
    torch.manual_seed(seed)
    m = SparseUNet(widths=WIDTHS, relation=rel, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm1d):
                bn.weight.uniform_(0.5, 1.5, generator=g)
                bn.bias.normal_(0.0, 0.2, generator=g)
                bn.running_mean.normal_(0.0, 0.2, generator=g)
                bn.running_var.uniform_(0.5, 1.5, generator=g)
    return m.double().eval()


def test_hard_forward_is_standard_voxelisation():
    net, x = model(), batch(40, 25)
    with torch.no_grad(), Trace() as trace:
        out = net(x)
    assert out.shape == (2, CLASSES, 40) and torch.equal(out[1, :, 25:], torch.zeros(CLASSES, 15, dtype=DT))
    assert all(isinstance(e, VoxelEvent) for e in trace) and [e.name for e in trace] == [
        "occupancy.s1", "occupancy.s2", "occupancy.s4"]
    for b, n in ((0, 40), (1, 25)):
        xyz, rgb = x[b, :n, :3], x[b, :n, 3:6]
        offset = xyz / L - torch.floor(xyz / L) - 0.5  # where in its voxel each point lies
        vox = voxelize(xyz, L, feats=torch.cat([rgb, offset], 1))
        coords = torch.cat([torch.zeros(len(vox.coords), 1, dtype=torch.long), vox.coords], 1)
        with torch.no_grad():
            voxel_logits = net._network(SparseTensor(vox.feats, coords), [None] * len(WIDTHS))
        torch.testing.assert_close(out[b, :, :n].T, voxel_logits[vox.inverse])
        for s, event in enumerate(trace):  # occupied voxels per level: unique floor(x / (l 2^s))
            assert int(event.decision[b].sum()) == len(voxelize(xyz, L * 2**s).coords)


def test_candidates_are_the_voxels_within_reach():
    x = batch(30)
    cells = torch.floor(x[0, :, :3] / L).long()
    inside = x[0, :, :3] / L - cells
    for reach in (L, L / 4):
        net = model(reach=reach)
        with torch.no_grad(), gate_mode(net, "lgm", lam=5.0), Trace() as trace:
            net(x)
        expect = set()
        for c, f in zip(cells.tolist(), inside.tolist()):
            for o in itertools.product((-1, 0, 1), repeat=3):
                gap = max([0.0] + [1 - fi if oi > 0 else fi for oi, fi in zip(o, f) if oi])
                if gap * L <= reach:
                    expect.add(tuple(ci + oi for ci, oi in zip(c, o)))
        real = trace.events[0].logit[0] > PAD_LOGIT
        assert int(real.sum()) == len(expect)
        assert trace.events[0].logit.shape[1] == len(expect)  # one scene: no padding


def test_relations_at_centre_and_face():
    centre, face = torch.zeros(1, 3, dtype=DT), torch.tensor([[0.5, 0.0, 0.0]], dtype=DT)
    for kind in ("bilinear", "rbf"):
        torch.testing.assert_close(relation(centre, kind, 1.0), torch.ones(1, dtype=DT))
        torch.testing.assert_close(relation(face, kind, 1.0), torch.full((1,), 0.5, dtype=DT))
    torch.testing.assert_close(relation(face, "sigmoid", 1e4), torch.full((1,), 0.5, dtype=DT))
    assert relation(centre, "sigmoid", 10.0).item() == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item() ** 3)


def test_soft_occupancy_tends_to_hard_as_lambda_grows():
    net, x = model(), batch(40, 25)
    with torch.no_grad(), Trace() as hard_trace:
        hard = net(x)
    gaps, outs = [], []
    for lam in (2.0, 20.0, 200.0, 2000.0):
        with torch.no_grad(), gate_mode(net, "lgm", lam=lam), Trace() as trace:
            outs.append((net(x) - hard).abs().max().item())
        for e, h in zip(trace, hard_trace):
            assert torch.equal(e.decision.sum(1), h.decision.sum(1))  # same hard decisions, more units
        gaps.append(max((e.mask - e.decision.to(DT)).abs().max().item() for e in trace))
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 0.1 and gaps[-1] < 1e-12
    assert outs[-1] < 1e-9 < outs[0]


def test_lgm_st_forward_is_the_hard_forward_with_a_gradient_through_occupancy():
    net, x = model(), batch(40, 25)
    xyz = x[..., :3].clone().requires_grad_()
    y = torch.cat([xyz, x[..., 3:]], -1)
    hard = net(y)
    with gate_mode(net, "lgm_st", lam=10.0):
        st = net(y)
    torch.testing.assert_close(st, hard)
    w = torch.randn(hard.shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    (g_st,) = torch.autograd.grad((st * w).sum(), xyz)
    (g_hard,) = torch.autograd.grad((hard * w).sum(), xyz)
    assert torch.isfinite(g_st).all() and not torch.allclose(g_st, g_hard, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("mode,rel", [("lgm", "sigmoid"), ("lgm", "bilinear"), ("lgm", "rbf"), ("hard", "sigmoid")])
def test_input_gradient_matches_finite_differences(mode, rel):
    net, x = model(rel), batch(30)
    w = torch.randn(1, CLASSES, 30, generator=torch.Generator().manual_seed(3), dtype=DT)

    def f(xyz, m=mode):
        y = torch.cat([xyz, x[..., 3:]], -1)
        with gate_mode(net, m, lam=4.0):
            return (net(y) * w).sum()

    xyz = x[..., :3].clone().requires_grad_()
    (grad,) = torch.autograd.grad(f(xyz), xyz)
    h = 1e-6
    picks = torch.randperm(xyz.numel(), generator=torch.Generator().manual_seed(4))[:12]
    for i in picks.tolist():
        e = torch.zeros(xyz.numel(), dtype=DT)
        e[i] = h
        with torch.no_grad():
            fd = (f(xyz + e.view_as(xyz)) - f(xyz - e.view_as(xyz))) / (2 * h)
        assert grad.reshape(-1)[i].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-7)
    assert grad.abs().max() > 0
    if mode == "lgm":  # the occupancy term: not FGM's gradient
        (fgm,) = torch.autograd.grad(f(xyz, "hard"), xyz)
        assert not torch.allclose(grad, fgm, rtol=1e-3, atol=1e-6)


def brute_force_flops(xyz: torch.Tensor, cin: int = 6) -> float:
    """FLOPs of the U-Net on these points from Python sets and the architecture alone: per level,
    occupied voxels x per-voxel work + neighbouring occupied pairs (3x3x3) x per-pair work."""
    w, last = WIDTHS, len(WIDTHS) - 1
    cells = {tuple(c) for c in torch.floor(xyz / L).long().tolist()}
    total = 0
    for s in range(len(w)):
        level = {tuple(v // 2**s for v in c) for c in cells}
        pairs = sum(tuple(a + b for a, b in zip(v, o)) in level
                    for v in level for o in itertools.product((-1, 0, 1), repeat=3))
        per_pair = 2 * w[s] * w[s] + (cin * w[0] if s == 0 else 0)  # encoder block (+ stem)
        per_voxel = w[0] * CLASSES if s == 0 else 0  # classifier
        if s < last:  # decoder block 2w -> w (+ 1x1 projection), down and up convolutions
            per_pair += 2 * w[s] * w[s] + w[s] * w[s]
            per_voxel += 2 * w[s] * w[s] + 2 * w[s] * w[s + 1]
        total += 2 * (len(level) * per_voxel + pairs * per_pair)
    return float(total)


def test_executed_flops_equal_flop_counter_and_brute_force():
    net, x = model(), batch(40, 25)
    sizes = (40, 25)
    with torch.no_grad(), Trace() as trace, FlopCounterMode(display=False) as counter:
        net(x)
    flops = net.executed_flops(trace)
    assert flops.sum().item() == counter.get_total_flops()
    for b, n in enumerate(sizes):
        assert flops[b].item() == brute_force_flops(x[b, :n, :3])
        with torch.no_grad(), FlopCounterMode(display=False) as alone:
            net(x[b:b + 1, :n])
        assert alone.get_total_flops() == flops[b].item()
    for mode in ("lgm", "lgm_st"):  # the cost of the hard network, whatever the gradient mode runs
        with torch.no_grad(), gate_mode(net, mode, lam=10.0), Trace() as soft:
            net(x)
        assert torch.equal(net.executed_flops(soft), flops)
    with torch.no_grad(), force_gates(net, "on"), Trace() as full, FlopCounterMode(display=False) as counter:
        net(x)
    assert net.executed_flops(full).sum().item() == counter.get_total_flops() > flops.sum().item()


def test_registry_entry_and_training_smoke():
    assert _recipe("sparse_unet") is train_sparse_unet
    spec = get_spec("unet3d-rooms")
    assert spec.family == "sparse_unet" and spec.dataset == "synthetic-rooms"
    victim = create_model("unet3d-rooms", pretrained=False)  # calibrates on an empty scene
    assert isinstance(victim, SparseUNet) and not victim.training
    small = dataclasses.replace(spec, build=lambda: SparseUNet(widths=(4, 8)),
                                train_args={"scenes": 2, "eval_scenes": 1, "epochs": 1, "lr": 1e-2,
                                            "scene": {"density": 40.0}})
    runs = [train_sparse_unet(small, seed=1, log=lambda *_: None) for _ in range(2)]
    (m1, card), (m2, _) = runs
    for k, v in m1.state_dict().items():  # deterministic given the seed
        assert torch.equal(v, m2.state_dict()[k]), k
    assert card["steps"] == 2 and 0 <= card["miou"] <= 1 and card["flops_mean"] > 0
    assert "SYNTHETIC" in card["dataset"] and set(card["per_class_iou"]) == set(card["classes"])
