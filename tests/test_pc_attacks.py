"""Point-cloud attacks: the coordinate I-FGSM (fgm / lgm / lgm_st) and the random baseline keep
every iterate in the eps box and touch only the coordinates of real points; I-FGSM returns each
scene's lowest-mIoU iterate on the hard network; per-scene mIoU vs metrics.miou; the random
baseline is seeded; the energy attacks over voxel occupancy (pc-gradauto, pc-ilfo) stay in the
box, map delta = 0 to the clean cloud, raise the executed FLOPs (counted independently from the
returned clouds); the attack files import no model family; `dynattack attack` on the 3D victim
writes miou_clean / miou_adv equal to metrics.miou recomputed from the saved clouds, and FLOPs
figures recomputed from them."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dynattack import cost, metrics
from dynattack.attacks import ATTACKS, PointGradAuto, PointIFGSM, PointILFO, PointRandom
from dynattack.attacks.pc_gradauto import spread_placement
from dynattack.attacks.pc_ifgsm import scene_miou
from dynattack.cli import app
from dynattack.data import point_batch
from dynattack.data.points import PointCloud, synthetic_scenes
from dynattack.errors import DynattackError
from dynattack.gates import Trace, force_gates
from dynattack.models import get_spec
from dynattack.models.sparse_unet import SparseUNet

EPS = 0.01


def clouds():
    """Two small scenes (60 and 45 points, so the second is padded) labelled by height."""
    out = []
    for seed, n in enumerate((60, 45)):
        g = torch.Generator().manual_seed(seed)
        xyz = torch.rand(n, 3, generator=g) * 0.12
        labels = (xyz[:, 2] / 0.03).long().clamp(max=3)
        labels[:3] = -1  # a few unlabelled points
        out.append(PointCloud(xyz, torch.rand(n, 3, generator=g), labels, ()))
    return point_batch.pack_clouds(out)


def victim():
    torch.manual_seed(0)
    return SparseUNet(num_classes=4, widths=(4, 8), class_names=("a", "b", "c", "d")).eval()


class Spy(PointIFGSM):
    """Records every iterate the gradient forward runs on."""

    def forward_input(self, state, idx):
        self.seen.append(state["adv"].clone())
        return super().forward_input(state, idx)


@pytest.mark.parametrize("grad", ["fgm", "lgm", "lgm_st"])
def test_ifgsm_iterates_stay_in_the_box_and_keep_the_lowest_miou(grad):
    net, data = victim(), clouds()
    x, y = data.points, data.labels
    atk = Spy(net, eps=EPS, steps=4, grad=grad, progress=False)
    atk.seen = []
    res = atk(x, y)
    iterates = atk.seen[1:] + [res.adv]
    for adv in iterates:
        d = adv - x
        assert d[..., :3].abs().max() <= EPS  # exact: no tolerance
        assert torch.equal(adv[..., 3:], x[..., 3:]) and torch.equal(adv[1, 45:], x[1, 45:])  # padding stays
    assert all((atk.seen[-1] - x)[b, :, :3].abs().max() > 0 for b in range(2))  # the attack moves points
    with torch.no_grad():
        mious = torch.stack([scene_miou(net(a).argmax(1), y, 4) for a in [x] + atk.seen[1:]])
        final = scene_miou(net(res.adv).argmax(1), y, 4)
    assert torch.equal(res.adv_pred, net(res.adv).argmax(1))
    # lowest mIoU among the clean input and the evaluated iterates (the last update is evaluated too)
    assert (final <= mious.min(0).values + 1e-12).all()
    assert res.params["grad"] == grad and "targeted" not in res.params


def test_random_baseline_is_uniform_in_the_box_and_seeded():
    net, data = victim(), clouds()
    x, y = data.points, data.labels
    a = PointRandom(net, eps=EPS, seed=5, progress=False)(x, y)
    b = PointRandom(net, eps=EPS, seed=5, progress=False)(x, y)
    c = PointRandom(net, eps=EPS, seed=6, progress=False)(x, y)
    assert torch.equal(a.adv, b.adv) and not torch.equal(a.adv, c.adv)
    d = (a.adv - x)[..., :3]
    real = x[..., -1] > 0.5
    assert d.abs().max() <= EPS and (d[real] != 0).all() and (d[~real] == 0).all()
    assert torch.equal(a.adv[..., 3:], x[..., 3:]) and a.iterations.tolist() == [0, 0]
    assert d[real].mean().abs() < EPS / 4 and d[real].abs().mean() == pytest.approx(EPS / 2, rel=0.2)
    assert a.params == {"eps": EPS, "seed": 5}


def hard_flops(net, points):
    with torch.no_grad(), Trace() as trace:
        net(points)
    return net.executed_flops(trace)


@pytest.mark.parametrize("cls", [PointGradAuto, PointILFO])
def test_energy_attacks_stay_in_the_box_and_raise_the_flops(cls):
    net, data = victim(), clouds()
    x = data.points
    at_clean = cls(net, eps=EPS, steps=20, progress=False, **({"start": "clean"} if cls is PointGradAuto else {}))
    state = at_clean.init_state(x, None, None)
    assert torch.equal(at_clean.candidate(state, torch.arange(2)), x)  # delta = 0 is the clean cloud
    atk = cls(net, eps=EPS, steps=20, progress=False)
    res = atk(x, data.labels)
    d = (res.adv - x)[..., :3]
    assert d.abs().max() <= EPS * (1 + 1e-6) and d.abs().max() > EPS / 4
    assert torch.equal(res.adv[..., 3:], x[..., 3:]) and torch.equal(res.adv[1, 45:], x[1, 45:])  # padding stays
    # FLOPs recounted from the clouds alone (hard network; full = every candidate voxel forced on)
    torch.testing.assert_close(res.flops_clean, hard_flops(net, x), rtol=0, atol=0)
    torch.testing.assert_close(res.flops_adv, hard_flops(net, res.adv), rtol=0, atol=0)
    with force_gates(net, "on"):
        torch.testing.assert_close(res.flops_full, hard_flops(net, x), rtol=0, atol=0)
    assert torch.equal(res.adv_pred, net(res.adv).argmax(1))
    if cls is PointGradAuto:  # best-so-far by FLOPs; the baseline returns its last iterate
        assert (res.flops_adv > 1.1 * res.flops_clean).all()
        assert "tanh_eps" not in res.params and res.params["eps"] == EPS
    assert (res.flops_adv > res.flops_clean).any()


def test_spread_start_gains_exactly_the_flops_it_counts_within_the_budget():
    net, data = victim(), clouds()
    x = data.points
    real = x[..., -1] > 0.5
    atk = PointGradAuto(net, eps=EPS, steps=3, progress=False)
    shift = atk.spread_shift(x, real)
    assert shift.abs().max() <= 0.98 * EPS * (1 + 1e-6) and torch.equal(shift[1, 45:], torch.zeros(15, 3))
    moved = x.clone()
    moved[..., :3] += shift
    clean, placed = hard_flops(net, x), hard_flops(net, moved)
    with force_gates(net, "on"):
        full = hard_flops(net, x)
    for b in range(2):  # the placement's own count of what it gains, against the victim's recount
        with torch.no_grad(), Trace() as trace:
            net(x[b:b + 1, real[b]])
        levels = [(e.voxel_flops, e.pair_flops) for e in trace]
        _, gain = spread_placement(x[b, real[b], :3], net.voxel_size, EPS, levels, float(clean[b]))
        assert gain > 0 and gain == pytest.approx(float(placed[b] - clean[b]), rel=1e-12)
    res = atk(x)
    assert (res.flops_adv >= placed).all()  # the start is iteration 0's candidate: never lost
    from_clean = PointGradAuto(net, eps=EPS, steps=3, start="clean", progress=False)(x)
    assert cost.recovery_aggregate(res.flops_clean, res.flops_adv, full) > \
        cost.recovery_aggregate(from_clean.flops_clean, from_clean.flops_adv, full)
    assert res.params["start"] == "spread" and (res.adv - x)[..., :3].abs().max() <= EPS * (1 + 1e-6)


def test_spread_start_refuses_a_victim_it_cannot_count():
    net, data = victim(), clouds()
    real = data.points[0, :, -1] > 0.5
    with torch.no_grad(), Trace() as trace:
        net(data.points[:1, real])
    levels = [(e.voxel_flops, e.pair_flops) for e in trace]
    with pytest.raises(DynattackError, match="not the stride-2 U-Net levels"):
        spread_placement(data.points[0, real, :3], net.voxel_size, EPS, levels, 1.0)
    with pytest.raises(DynattackError, match="start must be one of clean, spread"):
        PointGradAuto(net, start="noise")


def test_scene_miou_matches_metrics_miou():
    g = torch.Generator().manual_seed(0)
    pred, labels = torch.randint(0, 5, (3, 50), generator=g), torch.randint(-1, 5, (3, 50), generator=g)
    got = scene_miou(pred, labels, 5)
    for b in range(3):
        assert got[b].item() == pytest.approx(metrics.miou(pred[b], labels[b], 5, ignore_index=-1)[0])


def test_bad_inputs_and_registry():
    net, data = victim(), clouds()
    assert ATTACKS["pc-ifgsm"] is PointIFGSM and ATTACKS["pc-random"] is PointRandom
    atk = PointIFGSM(net, eps=EPS, steps=1, progress=False)
    with pytest.raises(DynattackError, match=r"labels must be an integer tensor \(B, N\)"):
        atk(data.points, data.labels[:, 0])
    with pytest.raises(DynattackError, match="points must be"):
        atk(data.points[..., 0], data.labels)
    with pytest.raises(DynattackError, match="eps"):
        PointIFGSM(net, eps=0.0)


def test_attack_files_import_no_model_family():
    root = Path(__file__).resolve().parents[1] / "src" / "dynattack" / "attacks"
    for name in ("pc_ifgsm.py", "pc_random.py", "pc_gradauto.py", "pc_ilfo.py"):
        tree = ast.parse((root / name).read_text())
        imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imported += [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
        assert not [m for m in imported if any(part in m.split(".") for part in ("models", "data", "sparse"))], name


def small_rooms_and_random_victim(tmp_path, monkeypatch):
    """Small rooms (a few thousand points: the CLI runs stay short, the runs themselves are the
    real ones) and random unet3d-rooms weights; returns (weights file, run directory)."""
    monkeypatch.setattr(point_batch, "synthetic_scenes",
                        lambda split, n, seed=0: synthetic_scenes(split, n, seed, density=40.0))
    torch.manual_seed(0)
    weights = tmp_path / "random.safetensors"
    save_file({k: v.contiguous() for k, v in get_spec("unet3d-rooms").build().state_dict().items()}, str(weights))
    return weights, tmp_path / "run"


def victim_from(weights):
    model = get_spec("unet3d-rooms").build()
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


@pytest.mark.parametrize("grad", ["fgm", "lgm"])
def test_cli_attack_writes_miou(tmp_path, monkeypatch, grad):
    weights, out = small_rooms_and_random_victim(tmp_path, monkeypatch)
    result = CliRunner().invoke(app, ["attack", "--victim", "unet3d-rooms", "--attack", "pc-ifgsm", "--eps", "0.02",
                                      "--grad", grad, "--out", str(out), "--n", "2", "--batch-size", "2", "--steps", "2",
                                      "--latency-n", "0", "--no-progress", "--weights", str(weights)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "synthetic-rooms" and config["split"] == "val" and config["params"]["grad"] == grad
    shard = load_file(str(out / "adv" / "batch_00000.safetensors"))
    data = point_batch.load_point_dataset("synthetic-rooms", 2)
    assert torch.equal(shard["clean"], data.points)
    model = victim_from(weights)
    with torch.no_grad():
        for key, points in (("miou_clean", shard["clean"]), ("miou_adv", shard["adv"])):
            pred = model(points).argmax(1)
            assert summary[key] == pytest.approx(metrics.miou(pred, data.labels, 8, ignore_index=-1)[0])
    assert summary["miou_adv"] <= summary["miou_clean"]
    assert 0 < summary["linf"] <= 0.02 and summary["n"] == 2 and summary["psnr_db"] is None
    assert set(summary["iou_per_class_adv"]) == set(model.class_names)


def test_cli_energy_attack_on_points_reports_flops(tmp_path, monkeypatch):
    weights, out = small_rooms_and_random_victim(tmp_path, monkeypatch)
    result = CliRunner().invoke(app, ["attack", "--victim", "unet3d-rooms", "--attack", "pc-gradauto", "--eps", "0.02",
                                      "--out", str(out), "--n", "2", "--batch-size", "2", "--steps", "3",
                                      "--latency-n", "1", "--no-progress", "--weights", str(weights)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    shard = load_file(str(out / "adv" / "batch_00000.safetensors"))
    model = victim_from(weights)
    clean, adv = hard_flops(model, shard["clean"]), hard_flops(model, shard["adv"])
    assert summary["flops_clean"] == pytest.approx(float(clean.mean()))
    assert summary["flops_adv"] == pytest.approx(float(adv.mean()))
    assert summary["flops_increase_pct"] == pytest.approx(float((adv.sum() / clean.sum() - 1) * 100))
    with force_gates(model, "on"):
        full = hard_flops(model, shard["clean"])
    assert summary["recovery_pct"] == pytest.approx(cost.recovery_aggregate(clean, adv, full))
    assert summary["flops_increase_pct"] > 0 and summary["latency_adv_ms"] > 0
    assert 0 < summary["linf"] <= 0.02 * (1 + 1e-6) and summary["miou_adv"] is not None


def test_cli_eval_of_a_point_victim(tmp_path, monkeypatch):
    from dynattack.data import points as points_module

    small = lambda split, n, seed=0: synthetic_scenes(split, n, seed, density=40.0)  # noqa: E731
    monkeypatch.setattr(points_module, "synthetic_scenes", small)
    torch.manual_seed(0)
    weights = tmp_path / "random.safetensors"
    model = get_spec("unet3d-rooms").build().eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    result = CliRunner().invoke(app, ["eval", "unet3d-rooms", "--weights", str(weights), "--n", "2", "--latency-n", "1"])
    assert result.exit_code == 0, result.output
    data = point_batch.pack_clouds(small("test", 2))
    preds, labels = [], []
    with torch.no_grad():
        for b in range(2):
            real = data.points[b, :, -1] > 0.5
            preds.append(model(data.points[b:b + 1, real]).argmax(1)[0])
            labels.append(data.labels[b, real])
    expected = 100 * metrics.miou(preds, labels, 8, ignore_index=-1)[0]
    assert f"{expected:.2f} %" in result.output and "every candidate on" in result.output
