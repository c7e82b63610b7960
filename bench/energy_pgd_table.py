"""Budgeted energy attacks: recovery against the Linf budget eps on every shipped gated 2D victim.

    .venv/bin/python bench/energy_pgd_table.py [--n 10] [--steps 50] [--ref-steps 300]
                                               [--eps 1,2,4,8,16] [--restarts 1] [--grad fgm]
                                               [--victims a,b] [--out energy_pgd.md]

For each victim (Fashion-MNIST test images 0..n-1):

- **energy-pgd** (:class:`dynattack.attacks.EnergyPGD`) at each eps (in /255), ``--steps``
  iterations, random start, ``--restarts``;
- **GradAuto** and **ILFO** take no budget (they search the least distorted all-on input, with
  no bound on the distortion). They are run once, unconstrained (``--ref-steps`` iterations), and
  reported two ways: unconstrained (their own recovery, mean L2 and the median Linf of their
  inputs), and **clipped**: their adversarial input projected into the eps ball (and [0, 1]) and
  measured again on the hard network, no re-optimisation, which is the recovery their input keeps
  under the budget. This is a comparison at the same eps, not GradAuto run with a budget.

``--points 0.005,0.01,0.02,0.05`` adds the point-cloud budgeted energy attack (pc-gradauto, its
``eps`` in metres) on the first ``--scenes`` synthetic test rooms of unet3d-rooms, ``--pc-steps``
iterations. ``--variants`` adds a table of energy-pgd settings at 8/255 (step size, rectified direction, more
steps, restarts, gradient modes), the evidence for its defaults.

Every figure is executed FLOPs on the hard network; recovery = (sum F_adv - sum F_clean) /
(sum F_full - sum F_clean) * 100; "all on" = share of samples with every costed unit on.
Writes bench/results/energy_pgd.md (``--out``: another name there, or an absolute path) and prints it.
"""
import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dynattack import cost, create_model
from dynattack.attacks import ILFO, EnergyPGD, GradAuto
from dynattack.attacks.base import gate_units
from dynattack.data import load_fashion_mnist
from dynattack.gates import Trace

sys.path.insert(0, str(Path(__file__).parent))
from energy_tables import gated_victims  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def measure(model, x):
    """(executed FLOPs, all-on) per sample of ``x`` on the hard network."""
    with torch.no_grad(), Trace() as trace:
        model(x)
    return cost.executed_flops(model, trace).double(), gate_units(trace, len(x)).all_on


def clipped(model, res, x, eps):
    """Recovery and all-on % of ``res.adv`` projected into the eps ball around ``x`` and [0, 1]
    (a non-finite adversarial value, which ILFO can return, counts as the clean pixel)."""
    adv = torch.where(torch.isfinite(res.adv), res.adv, x)
    adv = torch.minimum(torch.maximum(adv, x - eps), x + eps).clamp(0, 1)
    flops, on = measure(model, adv)
    return cost.recovery_aggregate(res.flops_clean, flops, res.flops_full), 100.0 * float(on.double().mean())


def run_variants(x, args):
    """energy-pgd at 8/255 under other settings: {victim: {setting: (recovery, all-on %, seconds)}}."""
    eps = 8 / 255
    settings = {"default": {}, "no rect. direction": {"rectify_direction": False},
                "alpha eps/4": {"alpha": eps / 4}, "alpha eps/10": {"alpha": eps / 10},
                f"{4 * args.steps} steps": {"steps": 4 * args.steps}, "3 restarts": {"restarts": 3},
                "lgm lam 1": {"grad": "lgm", "lam": 1.0}, "lgm lam 5": {"grad": "lgm", "lam": 5.0},
                "lgm_st lam 1": {"grad": "lgm_st", "lam": 1.0}}
    out = {}
    for victim in gated_victims(args.victims):
        model = create_model(victim)
        out[victim] = {}
        for name, kw in settings.items():
            t0 = time.perf_counter()
            r = EnergyPGD(model, eps=eps, **{"steps": args.steps, **kw}, progress=False)(x)
            out[victim][name] = (r.recovery_pct, 100.0 * float(r.success.double().mean()), time.perf_counter() - t0)
        print(victim, out[victim], flush=True)
    return out


def run_points(args):
    """pc-gradauto at each budget (metres) on the first ``--scenes`` synthetic test rooms."""
    from dynattack import metrics
    from dynattack.attacks import PointGradAuto
    from dynattack.runner import _load_victim_and_points

    model, pts, labels = _load_victim_and_points("unet3d-rooms", None, "cpu", "synthetic-rooms", args.scenes)
    k = model.num_classes

    def miou(pred):
        return float(metrics.miou(pred.flatten(), labels.flatten(), k, ignore_index=-1)[0])

    out = {}
    for e in (float(v) for v in args.points.split(",")):
        t0 = time.perf_counter()
        r = PointGradAuto(model, eps=e, steps=args.pc_steps, progress=False)(pts)
        out[e] = {"recovery": r.recovery_pct, "increase": float((r.flops_adv.sum() / r.flops_clean.sum() - 1) * 100),
                  "linf_max": float(r.linf.max()), "miou_clean": miou(r.clean_pred), "miou_adv": miou(r.adv_pred),
                  "seconds": time.perf_counter() - t0}
        print("unet3d-rooms pc-gradauto", e, out[e], flush=True)
    return out


def cell(rec, on):
    return f"{rec:.1f} ({on:.0f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50, help="energy-pgd iterations per restart")
    ap.add_argument("--ref-steps", type=int, default=300, help="GradAuto / ILFO iterations")
    ap.add_argument("--eps", default="1,2,4,8,16", help="budgets in /255, comma list")
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--grad", default="fgm", help="energy-pgd gradient mode: fgm, lgm, lgm_st")
    ap.add_argument("--victims", default="")
    ap.add_argument("--out", default="energy_pgd.md")
    ap.add_argument("--variants", action="store_true", help="also the energy-pgd settings table at 8/255")
    ap.add_argument("--points", default="", help="pc-gradauto budgets in metres on unet3d-rooms (comma list)")
    ap.add_argument("--scenes", type=int, default=2)
    ap.add_argument("--pc-steps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    levels = [float(e) for e in args.eps.split(",")]
    x_all, _ = load_fashion_mnist("test")
    x = x_all[: args.n]
    rows, data = [], {}
    t_start = time.perf_counter()
    for victim in gated_victims(args.victims):
        model = create_model(victim)
        entry = {"energy-pgd": {}, "gradauto": {}, "ilfo": {}}
        for lv in levels:
            eps = lv / 255
            t0 = time.perf_counter()
            r = EnergyPGD(model, eps=eps, steps=args.steps, restarts=args.restarts, grad=args.grad, progress=False)(x)
            entry["energy-pgd"][lv] = {"recovery": r.recovery_pct, "all_on": 100.0 * float(r.success.double().mean()),
                                       "l2": float(r.l2.mean()), "linf_max": float(r.linf.max()),
                                       "seconds": time.perf_counter() - t0}
            print(victim, "energy-pgd", lv, entry["energy-pgd"][lv], flush=True)
        for name, cls in (("gradauto", GradAuto), ("ilfo", ILFO)):
            t0 = time.perf_counter()
            r = cls(model, steps=args.ref_steps, progress=False)(x)
            entry[name]["unconstrained"] = {
                "recovery": r.recovery_pct, "all_on": 100.0 * float(r.success.double().mean()),
                "l2": float(r.l2.mean()), "linf_median": statistics.median(r.linf.tolist()),
                "nonfinite": int((~torch.isfinite(r.adv.flatten(1))).any(1).sum()),
                "seconds": time.perf_counter() - t0}
            for lv in levels:
                rec, on = clipped(model, r, x, lv / 255)
                entry[name][lv] = {"recovery": rec, "all_on": on}
            print(victim, name, entry[name], flush=True)
        data[victim] = entry
    variants = run_variants(x, args) if args.variants else {}
    points = run_points(args) if args.points else {}
    elapsed = time.perf_counter() - t_start

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")),
                      platform.processor())
    cmd = "OMP_NUM_THREADS=1 .venv/bin/python bench/energy_pgd_table.py " + " ".join(sys.argv[1:])
    head = " | ".join(f"{lv:g}/255" for lv in levels)
    lines = [
        "# Budgeted energy attacks: recovery vs eps",
        "",
        f"Fashion-MNIST test images 0-{args.n - 1}; energy-pgd {args.steps} iterations, random start, "
        f"{args.restarts} restart(s), grad={args.grad}, alpha = 2.5 eps / steps; GradAuto and ILFO "
        f"{args.ref_steps} iterations, default parameters. Machine: {model_name}, 1 torch thread, "
        f"torch {torch.__version__}; {elapsed / 60:.1f} min in all.",
        "",
        f"Command: `{cmd}`",
        "",
        "Each cell: recovery of the saved FLOPs, % (share of samples all on, %), measured on the hard network. "
        "GradAuto and ILFO take no eps: *clipped* is their unconstrained adversarial input projected into the "
        "eps ball and [0, 1] and measured again (no re-optimisation); *unconstrained* is their own result, "
        "with the median Linf (x255) and mean L2 of their inputs.",
        "",
        f"| victim | attack | {head} | unconstrained (median Linf x255, mean L2) |",
        "|---|---|" + "---|" * len(levels) + "---|",
    ]
    for victim, entry in data.items():
        pgd = entry["energy-pgd"]
        lines.append(f"| {victim} | energy-pgd | " + " | ".join(cell(pgd[lv]["recovery"], pgd[lv]["all_on"])
                                                             for lv in levels) + " | - |")
        for name in ("gradauto", "ilfo"):
            u = entry[name]["unconstrained"]
            lines.append(f"| {victim} | {name} clipped | "
                         + " | ".join(cell(entry[name][lv]["recovery"], entry[name][lv]["all_on"]) for lv in levels)
                         + f" | {cell(u['recovery'], u['all_on'])}, Linf {255 * u['linf_median']:.0f}, "
                           f"L2 {u['l2']:.2f}" + (f"; {u['nonfinite']}/{args.n} inputs not finite" if u["nonfinite"]
                                                  else "") + " |")
    lines += ["", "energy-pgd mean L2 per eps (its inputs stay in the ball: max Linf x255 in brackets):", "",
              f"| victim | {head} |", "|---|" + "---|" * len(levels)]
    for victim, entry in data.items():
        pgd = entry["energy-pgd"]
        lines.append(f"| {victim} | " + " | ".join(f"{pgd[lv]['l2']:.2f} ({255 * pgd[lv]['linf_max']:.2f})"
                                                    for lv in levels) + " |")
    if variants:
        names = list(next(iter(variants.values())))
        lines += ["", f"energy-pgd settings at eps 8/255 ({args.steps} iterations unless said; recovery % (all on %), "
                  f"seconds for the {args.n} images):", "",
                  "| victim | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for victim, row in variants.items():
            lines.append(f"| {victim} | " + " | ".join(f"{r:.1f} ({on:.0f}), {sec:.0f} s" for r, on, sec in row.values())
                         + " |")
    if points:
        budgets = list(points)
        lines += ["", f"Point clouds: pc-gradauto (budget in metres per coordinate) on unet3d-rooms, synthetic test "
                  f"rooms 0-{args.scenes - 1}, {args.pc_steps} iterations. Recovery against each clean room's candidate "
                  "voxels all on (can exceed 100 %), FLOPs increase over the clean rooms, max Linf of the moved "
                  "points:", "",
                  "| eps (m) | " + " | ".join(f"{e:g}" for e in budgets) + " |", "|---|" + "---|" * len(budgets),
                  "| recovery % | " + " | ".join(f"{points[e]['recovery']:.1f}" for e in budgets) + " |",
                  "| FLOPs increase % | " + " | ".join(f"{points[e]['increase']:.1f}" for e in budgets) + " |",
                  "| max Linf (m) | " + " | ".join(f"{points[e]['linf_max']:.6g}" for e in budgets) + " |",
                  "| mIoU adv. % (clean " + f"{100 * next(iter(points.values()))['miou_clean']:.1f}) | "
                  + " | ".join(f"{100 * points[e]['miou_adv']:.1f}" for e in budgets) + " |"]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / args.out
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
