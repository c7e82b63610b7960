"""The LGM paper's point-cloud tables, and the 3D energy attack, on the shipped sparse U-Net.

    .venv/bin/python bench/pointcloud_tables.py [--scenes 4] [--steps 10] [--tables iii,vii,energy,step]

- Table III analogue: mIoU under Random / FGM / LGM coordinate attacks (pc-random, pc-ifgsm with
  ``grad`` fgm | lgm, LGM slope 10) at eps = 0.005, 0.01, 0.02, 0.05 m, voxel 0.02 m; the paper's
  ordering is LGM < FGM < Random.
- Table VII analogue: LGM with the three relation functions (sigmoid, RBF, bilinear) at
  ``--relation-eps``; the paper's ordering is sigmoid <= RBF <= BI.
- Energy: pc-gradauto vs pc-ilfo at ``--energy-eps``: executed FLOPs increase, recovery against
  the clean scenes' candidate voxels all on, batch-1 latency of the real (sparse) forward clean
  vs adversarial.
- One attack step (gradient forward + backward) on a scene of ~``--step-points`` points, FGM vs
  LGM, each in a fresh process: process CPU time and peak resident memory (targets: LGM <= 3 GB
  and <= 3x FGM's time).

Data: the first ``--scenes`` rooms of the fixed SYNTHETIC validation split (procedural rooms,
not scans; dynattack.data.points), all points, one batch. mIoU pools the points of all scenes.
Writes bench/results/pointcloud_tables.md and .json.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from dynattack import cost, metrics
from dynattack.attacks import PointGradAuto, PointIFGSM, PointILFO, PointRandom
from dynattack.data.point_batch import load_point_dataset
from dynattack.models import create_model

VICTIM = "unet3d-rooms"
RESULTS = Path(__file__).resolve().parent / "results"


def miou(model, points, labels) -> float:
    with torch.no_grad():
        pred = model(points).argmax(1)
    return 100 * metrics.miou(pred, labels, model.num_classes, ignore_index=-1)[0]


def table_iii(model, data, eps_list, steps, lam):
    rows = []
    for eps in eps_list:
        row = {"eps": eps}
        for name, atk in (("random", PointRandom(model, eps=eps, progress=False)),
                          ("fgm", PointIFGSM(model, eps=eps, steps=steps, grad="fgm", lam=lam, progress=False)),
                          ("lgm", PointIFGSM(model, eps=eps, steps=steps, grad="lgm", lam=lam, progress=False))):
            t0 = time.perf_counter()
            res = atk(data.points, data.labels)
            row[name] = 100 * metrics.miou(res.adv_pred, data.labels, model.num_classes, ignore_index=-1)[0]
            row[f"{name}_s"] = time.perf_counter() - t0
            print(f"eps {eps}: {name} mIoU {row[name]:.2f} ({row[f'{name}_s']:.0f} s)", flush=True)
        rows.append(row)
    return rows


def table_vii(model, data, eps, steps, lam):
    rows = []
    before = model.relation
    try:
        for relation in ("sigmoid", "rbf", "bilinear"):
            model.relation = relation
            res = PointIFGSM(model, eps=eps, steps=steps, grad="lgm", lam=lam, progress=False)(data.points, data.labels)
            rows.append({"relation": relation,
                         "miou": 100 * metrics.miou(res.adv_pred, data.labels, model.num_classes, ignore_index=-1)[0]})
            print(f"relation {relation}: mIoU {rows[-1]['miou']:.2f}", flush=True)
    finally:
        model.relation = before
    return rows


def table_energy(model, data, eps, steps, latency_scenes):
    rows = []
    for atk in (PointILFO(model, eps=eps, steps=steps, progress=False),
                PointGradAuto(model, eps=eps, steps=steps, progress=False)):
        t0 = time.perf_counter()
        res = atk(data.points)
        seconds = time.perf_counter() - t0
        k = latency_scenes
        lat = cost.batch1_latency_ms(model, {"clean": (data.points[:k], None), "adv": (res.adv[:k], None),
                                             "full": (data.points[:k], "on")}, repeats=3, warmup=1)
        rows.append({
            "attack": atk.name, "flops_clean_g": float(res.flops_clean.mean()) / 1e9,
            "flops_adv_g": float(res.flops_adv.mean()) / 1e9, "flops_full_g": float(res.flops_full.mean()) / 1e9,
            "increase_pct": float((res.flops_adv.sum() / res.flops_clean.sum() - 1) * 100),
            "recovery_pct": res.recovery_pct, "linf_m": float(res.linf.max()),
            "miou_clean": miou(model, data.points, data.labels), "miou_adv": miou(model, res.adv, data.labels),
            "latency_clean_ms": lat["clean"], "latency_adv_ms": lat["adv"], "latency_full_ms": lat["full"],
            "seconds": seconds,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


STEP_CHILD = r"""
import json, resource, sys, time, torch, torch.nn.functional as F
from dynattack.data.points import synthetic_scenes
from dynattack.data.point_batch import pack_clouds
from dynattack.gates import gate_mode
from dynattack.models import create_model
grad, density = sys.argv[1], float(sys.argv[2])
model = create_model("unet3d-rooms")
batch = pack_clouds(synthetic_scenes("val", 1, 0, density=density))
leaf = batch.points.clone().requires_grad_()
times = []
for _ in range(3):
    with gate_mode(model, "lgm" if grad == "lgm" else "hard", lam=10.0):
        c0 = time.process_time()
        loss = F.cross_entropy(model(leaf), batch.labels, ignore_index=-1)
        torch.autograd.grad(loss, leaf)
        times.append(time.process_time() - c0)
print(json.dumps({"grad": grad, "points": int(batch.points[0, :, -1].sum()), "cpu_s": min(times),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def table_step(density):
    rows = []
    for grad in ("fgm", "lgm"):
        out = subprocess.run([sys.executable, "-c", STEP_CHILD, grad, str(density)], capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


def markdown(args, results) -> str:
    lines = [f"# Point-cloud tables ({VICTIM})", "",
             f"First {args.scenes} rooms of the SYNTHETIC validation split (procedural, not scans), all points, "
             f"voxel 0.02 m; torch {torch.__version__}, {platform.machine()}, CPU, {torch.get_num_threads()} threads. "
             f"Command: `.venv/bin/python bench/pointcloud_tables.py {' '.join(sys.argv[1:])}`", ""]
    if "iii" in results:
        lines += [f"## Table III analogue: mIoU (%) under attack ({args.steps} iterations, LGM slope {args.lam})", "",
                  f"Clean mIoU {results['clean_miou']:.2f} %.", "",
                  "| eps (m) | Random | FGM | LGM |", "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['eps']} | {r['random']:.2f} | {r['fgm']:.2f} | {r['lgm']:.2f} |" for r in results["iii"]]
        lines.append("")
    if "vii" in results:
        lines += [f"## Table VII analogue: relation functions, LGM at eps {args.relation_eps} m", "",
                  "| relation | mIoU (%) |", "| --- | ---: |"]
        lines += [f"| {r['relation']} | {r['miou']:.2f} |" for r in results["vii"]]
        lines.append("")
    if "energy" in results:
        lines += [f"## Energy attack on the sparse U-Net (eps {args.energy_eps} m, {args.energy_steps} iterations)", "",
                  "FLOPs per scene (G); recovery against the clean scene's candidate voxels all on; latency: batch-1 "
                  f"median over the first {args.latency_scenes} scenes of the real sparse forward.", "",
                  "| attack | FLOPs clean | FLOPs adv | increase (%) | recovery (%) | mIoU clean / adv | "
                  "latency clean / adv / all candidates (ms) | max shift (m) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in results["energy"]:
            lines.append(f"| {r['attack']} | {r['flops_clean_g']:.2f} | {r['flops_adv_g']:.2f} | {r['increase_pct']:.1f} | "
                         f"{r['recovery_pct']:.1f} | {r['miou_clean']:.1f} / {r['miou_adv']:.1f} | "
                         f"{r['latency_clean_ms']:.0f} / {r['latency_adv_ms']:.0f} / {r['latency_full_ms']:.0f} | "
                         f"{r['linf_m']:.4f} |")
        lines.append("")
    if "step" in results:
        fgm, lgm = results["step"]
        lines += ["## One attack step (forward + backward to the coordinates), fresh process each", "",
                  "| gradient | points | CPU time (s) | peak RSS (GB) |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {r['grad']} | {r['points']} | {r['cpu_s']:.2f} | {r['peak_rss_gb']:.2f} |" for r in results["step"]]
        lines += ["", f"LGM / FGM time: {lgm['cpu_s'] / fgm['cpu_s']:.2f}x (target <= 3x); "
                      f"LGM peak memory {lgm['peak_rss_gb']:.2f} GB (target <= 3 GB).", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lam", type=float, default=10.0)
    p.add_argument("--eps", default="0.005,0.01,0.02,0.05")
    p.add_argument("--relation-eps", type=float, default=0.02)
    p.add_argument("--energy-eps", type=float, default=0.02)
    p.add_argument("--energy-steps", type=int, default=20)
    p.add_argument("--latency-scenes", type=int, default=2)
    p.add_argument("--step-density", type=float, default=2000.0, help="surface density of the one-step scene")
    p.add_argument("--tables", default="iii,vii,energy,step")
    args = p.parse_args()
    tables = set(args.tables.split(","))
    torch.manual_seed(0)
    model = create_model(VICTIM)
    data = load_point_dataset("synthetic-rooms", args.scenes)
    results: dict = {"clean_miou": miou(model, data.points, data.labels)}
    print(f"clean mIoU {results['clean_miou']:.2f} on {args.scenes} scenes, {int(data.points[..., -1].sum())} points")
    if "iii" in tables:
        results["iii"] = table_iii(model, data, [float(e) for e in args.eps.split(",")], args.steps, args.lam)
    if "vii" in tables:
        results["vii"] = table_vii(model, data, args.relation_eps, args.steps, args.lam)
    if "energy" in tables:
        results["energy"] = table_energy(model, data, args.energy_eps, args.energy_steps, args.latency_scenes)
    if "step" in tables:
        results["step"] = table_step(args.step_density)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pointcloud_tables.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "pointcloud_tables.md").write_text(markdown(args, results))
    print(markdown(args, results))


if __name__ == "__main__":
    main()
