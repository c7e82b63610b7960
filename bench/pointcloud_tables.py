"""The LGM paper's point-cloud tables, and the 3D energy attack, on the shipped sparse U-Net.

    .venv/bin/python bench/pointcloud_tables.py [--scenes 2] [--steps 10] [--tables iii,vii,energy,step]
                                                [--label L]

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
not scans; dynattack.data.points), all points, attacked one room at a time. mIoU pools the points
of all rooms.
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


def rooms(data):
    """Each room alone, padding dropped: one room per attack call keeps memory at one room's."""
    for b in range(len(data.points)):
        real = data.points[b, :, -1] > 0.5
        yield data.points[b:b + 1, real], data.labels[b:b + 1, real]


def miou(model, data) -> float:
    preds, labels = [], []
    with torch.no_grad():
        for points, label in rooms(data):
            preds.append(model(points).argmax(1)[0])
            labels.append(label[0])
    return 100 * metrics.miou(preds, labels, model.num_classes, ignore_index=-1)[0]


def attack_miou(make_attack, data, num_classes) -> tuple[float, float, list]:
    """Pooled mIoU (%) of the adversarial rooms, seconds, and each room's result."""
    preds, labels, results = [], [], []
    t0 = time.perf_counter()
    for points, label in rooms(data):
        res = make_attack()(points, label)
        preds.append(res.adv_pred[0])
        labels.append(label[0])
        results.append(res)
    return 100 * metrics.miou(preds, labels, num_classes, ignore_index=-1)[0], time.perf_counter() - t0, results


def table_iii(model, data, eps_list, steps, lam):
    rows = []
    for eps in eps_list:
        row = {"eps": eps}
        for name, make in (("random", lambda: PointRandom(model, eps=eps, progress=False)),
                           ("fgm", lambda: PointIFGSM(model, eps=eps, steps=steps, grad="fgm", lam=lam, progress=False)),
                           ("lgm", lambda: PointIFGSM(model, eps=eps, steps=steps, grad="lgm", lam=lam, progress=False))):
            row[name], row[f"{name}_s"], _ = attack_miou(make, data, model.num_classes)
            print(f"eps {eps}: {name} mIoU {row[name]:.2f} ({row[f'{name}_s']:.0f} s)", flush=True)
        rows.append(row)
    return rows


def table_vii(model, data, eps, steps, lam, known: dict):
    """``known``: relation -> mIoU already measured with these settings (Table III's LGM column
    is the sigmoid relation), not recomputed."""
    rows = []
    before = model.relation
    try:
        for relation in ("sigmoid", "rbf", "bilinear"):
            if relation in known:
                rows.append({"relation": relation, "miou": known[relation]})
                continue
            model.relation = relation
            value, _, _ = attack_miou(lambda: PointIFGSM(model, eps=eps, steps=steps, grad="lgm", lam=lam, progress=False),
                                      data, model.num_classes)
            rows.append({"relation": relation, "miou": value})
            print(f"relation {relation}: mIoU {value:.2f}", flush=True)
    finally:
        model.relation = before
    return rows


def table_energy(model, data, eps, steps, latency_scenes):
    rows = []
    for make in (lambda: PointILFO(model, eps=eps, steps=steps, progress=False),
                 lambda: PointGradAuto(model, eps=eps, steps=steps, progress=False)):
        value, seconds, results = attack_miou(make, data, model.num_classes)
        clean = torch.cat([r.flops_clean for r in results])
        adv = torch.cat([r.flops_adv for r in results])
        full = torch.cat([r.flops_full for r in results])
        lat = {"clean": [], "adv": [], "full": []}
        for (points, _), r in list(zip(rooms(data), results))[:latency_scenes]:
            one = cost.batch1_latency_ms(model, {"clean": (points, None), "adv": (r.adv, None), "full": (points, "on")},
                                         repeats=3, warmup=1)
            for key in lat:
                lat[key].append(one[key])
        rows.append({
            "attack": results[0].attack, "flops_clean_g": float(clean.mean()) / 1e9,
            "flops_adv_g": float(adv.mean()) / 1e9, "flops_full_g": float(full.mean()) / 1e9,
            "increase_pct": float((adv.sum() / clean.sum() - 1) * 100),
            "recovery_pct": cost.recovery_aggregate(clean, adv, full),
            "linf_m": max(float(r.linf.max()) for r in results),
            "miou_clean": miou(model, data), "miou_adv": value,
            **{f"latency_{k}_ms": sum(v) / len(v) for k, v in lat.items()},
            "seconds": seconds,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


STEP_CHILD = r"""
import json, resource, sys, time, torch, torch.nn.functional as F
from safetensors.torch import load_file
from dynattack.gates import gate_mode
from dynattack.models import create_model
grad, path = sys.argv[1], sys.argv[2]
batch = load_file(path)
model = create_model("unet3d-rooms")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
leaf = batch["points"].clone().requires_grad_()
times = []
for _ in range(3):
    with gate_mode(model, "lgm" if grad == "lgm" else "hard", lam=10.0):
        c0 = time.process_time()
        loss = F.cross_entropy(model(leaf), batch["labels"], ignore_index=-1)
        torch.autograd.grad(loss, leaf)
        times.append(time.process_time() - c0)
print(json.dumps({"grad": grad, "points": int(batch["points"][0, :, -1].sum()), "cpu_s": min(times),
                  "base_rss_gb": base, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def table_step(density):
    """Each gradient in a fresh process that loads the room from a file (generating it here keeps
    the generator's memory out of the child's peak)."""
    import tempfile

    from safetensors.torch import save_file

    from dynattack.data.point_batch import pack_clouds
    from dynattack.data.points import synthetic_scenes

    batch = pack_clouds(synthetic_scenes("val", 1, 0, density=density))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "room.safetensors")
        save_file({"points": batch.points.contiguous(), "labels": batch.labels.contiguous()}, path)
        for grad in ("fgm", "lgm"):
            out = subprocess.run([sys.executable, "-c", STEP_CHILD, grad, path], capture_output=True, text=True,
                                 check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    return rows


def markdown(results) -> str:
    """Every table in ``results`` (each with the settings and command of the run that made it)."""
    lines = [f"# Point-cloud tables ({VICTIM})", "",
             "SYNTHETIC validation rooms (procedural, not scans), all points, voxel 0.02 m, attacked one room at "
             f"a time; mIoU pools the points of all rooms. Machine: {results['machine']}.", ""]

    def head(key, title):
        t = results[key]
        lines.extend([f"## {title}", "", f"First {t['settings']['scenes']} rooms (clean mIoU {t['clean_miou']:.2f} %); "
                      f"command: `{t['command']}`", ""])
        return t["settings"], t["rows"]

    for key in sorted(k for k in results if k.split("-")[0] == "iii"):  # "iii" and labelled reruns
        cfg, rows = head(key, "Table III analogue: mIoU (%) under attack")
        lines += [f"{cfg['steps']} iterations, step eps / 4, LGM slope {cfg['lam']}.", "",
                  "| eps (m) | Random | FGM | LGM |", "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['eps']} | {r['random']:.2f} | {r['fgm']:.2f} | {r['lgm']:.2f} |" for r in rows]
        lines.append("")
    if "vii" in results:
        cfg, rows = head("vii", "Table VII analogue: relation functions of LGM")
        lines += [f"eps {cfg['relation_eps']} m, {cfg['steps']} iterations.", "", "| relation | mIoU (%) |", "| --- | ---: |"]
        lines += [f"| {r['relation']} | {r['miou']:.2f} |" for r in rows]
        lines.append("")
    if "energy" in results:
        cfg, rows = head("energy", "Energy attack on the sparse U-Net")
        lines += [f"eps {cfg['energy_eps']} m, {cfg['energy_steps']} iterations. FLOPs per room (G); recovery against "
                  "the clean room's candidate voxels all on; latency: the real sparse forward of one room (best of "
                  f"3), averaged over the first {cfg['latency_scenes']} rooms.", "",
                  "| attack | FLOPs clean | FLOPs adv | increase (%) | recovery (%) | mIoU clean / adv | "
                  "latency clean / adv / all candidates (ms) | max shift (m) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['attack']} | {r['flops_clean_g']:.2f} | {r['flops_adv_g']:.2f} | {r['increase_pct']:.1f} | "
                         f"{r['recovery_pct']:.1f} | {r['miou_clean']:.1f} / {r['miou_adv']:.1f} | "
                         f"{r['latency_clean_ms']:.0f} / {r['latency_adv_ms']:.0f} / {r['latency_full_ms']:.0f} | "
                         f"{r['linf_m']:.4f} |")
        lines.append("")
    if "step" in results:
        t = results["step"]
        fgm, lgm = t["rows"]
        lines += ["## One attack step (forward + backward to the coordinates), fresh process each", "",
                  f"Validation room 0 at surface density {t['settings']['step_density']:g} points/m^2; command: "
                  f"`{t['command']}`", "",
                  "| gradient | points | CPU time (s) | RSS before the steps (GB) | peak RSS (GB) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['grad']} | {r['points']} | {r['cpu_s']:.2f} | {r['base_rss_gb']:.2f} | {r['peak_rss_gb']:.2f} |"
                  for r in t["rows"]]
        lines += ["", f"LGM / FGM time: {lgm['cpu_s'] / fgm['cpu_s']:.2f}x (target <= 3x); "
                      f"LGM peak memory {lgm['peak_rss_gb']:.2f} GB (target <= 3 GB).", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lam", type=float, default=10.0)
    p.add_argument("--eps", default="0.005,0.01,0.02,0.05")
    p.add_argument("--relation-eps", type=float, default=0.02)
    p.add_argument("--energy-eps", type=float, default=0.02)
    p.add_argument("--energy-steps", type=int, default=20)
    p.add_argument("--latency-scenes", type=int, default=2)
    p.add_argument("--step-density", type=float, default=2000.0, help="surface density of the one-step room")
    p.add_argument("--tables", default="iii,vii,energy,step")
    p.add_argument("--label", default="", help="store Table III as iii-LABEL (a rerun with other settings "
                   "is added to the file instead of replacing the table)")
    args = p.parse_args()
    tables = set(args.tables.split(","))
    torch.manual_seed(0)
    model = create_model(VICTIM)
    data = load_point_dataset("synthetic-rooms", args.scenes)
    clean = miou(model, data)
    print(f"clean mIoU {clean:.2f} on {args.scenes} rooms, {int(data.points[..., -1].sum())} points")
    out_json = RESULTS / "pointcloud_tables.json"
    results = json.loads(out_json.read_text()) if out_json.exists() else {}  # tables not rerun are kept
    results["machine"] = f"torch {torch.__version__}, {platform.machine()}, CPU, {torch.get_num_threads()} threads"
    command = f".venv/bin/python bench/pointcloud_tables.py {' '.join(sys.argv[1:])}"

    def store(key, rows):
        results[key] = {"rows": rows, "settings": vars(args), "command": command, "clean_miou": clean}

    if "iii" in tables:
        store("iii" + (f"-{args.label}" if args.label else ""), table_iii(model, data, [float(e) for e in args.eps.split(",")], args.steps, args.lam))
    if "vii" in tables:
        known = {model.relation: r["lgm"] for r in results.get("iii", {}).get("rows", [])
                 if r["eps"] == args.relation_eps and results["iii"]["settings"]["steps"] == args.steps
                 and results["iii"]["settings"]["scenes"] == args.scenes}
        store("vii", table_vii(model, data, args.relation_eps, args.steps, args.lam, known))
    if "energy" in tables:
        store("energy", table_energy(model, data, args.energy_eps, args.energy_steps, args.latency_scenes))
    if "step" in tables:
        store("step", table_step(args.step_density))
    RESULTS.mkdir(exist_ok=True)
    out_json.write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "pointcloud_tables.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
