"""Dynamics-aware GradAuto on the zoo's 2D victims (issue 16, item 1).

GradAuto with the hard gradient (``grad=fgm``, the default), with the gradient through the LGM
surrogate ``sigmoid(lam q)`` annealed from soft to hard (``grad=lgm``, ``lam`` 0.5 -> 20, the
slope of the issue's first probe), the same with a hard forward and the sigmoid's backward
(``grad=lgm_st``), with the forced-on fixed-point objective
(``objective=fixed_point``: every gate logit of the network with every gate forced on pushed to
>= 0), from a contrast-compressed start (``start_contrast=0.5``), and with all-on anchors
(``anchor_starts=8``: the samples not all-on after the 300 iterations jump towards inputs the
forced-on search found all-on, then walk back along the boundary for 150 more). Everything else at
GradAuto's defaults (K 1, lr 0.01, rectified direction and magnitude,
minimum-norm search after all-on). Every figure is measured on the hard network: recovery of the
saved FLOPs (aggregate), samples all-on, mean L2 and mean PSNR of the returned inputs (samples
returned unchanged left out of the PSNR), seconds.

    .venv/bin/python bench/energy_dynamics.py [--n 50] [--steps 300] [--only NAME,...]

Writes bench/results/energy_dynamics.md (and .json).
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dynattack import cost, create_model, metrics
from dynattack.attacks import GradAuto
from dynattack.data import load_fashion_mnist

RESULTS = Path(__file__).parent / "results"
VICTIMS = ["skipnet38-rnn-hrl", "skipnet38-ff-sp", "dynconv20-fmnist", "sact20-fmnist", "manidp20-fmnist"]
VARIANTS = {
    "fgm": dict(grad="fgm"),
    "lgm 0.5->20": dict(grad="lgm", lam=0.5, lam_end=20.0),
    "lgm_st 0.5->20": dict(grad="lgm_st", lam=0.5, lam_end=20.0),
    "fixed_point": dict(objective="fixed_point"),
    "start 0.5": dict(start_contrast=0.5),
    "anchors 8": dict(anchor_starts=8),
}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def run(model, x, kw, steps, batch_size):
    clean, adv, full, psnr, l2, success, anchors = [], [], [], [], [], [], None
    start = time.perf_counter()
    for xb in x.split(batch_size):
        atk = GradAuto(model, steps=steps, progress=False, **kw)
        res = atk(xb)
        if atk._anchors:  # the search ran (some sample was short of all-on after the steps)
            anchors = int(next(iter(atk._anchors.values())).shape[0])
        clean.append(res.flops_clean)
        adv.append(res.flops_adv)
        full.append(res.flops_full)
        psnr.append(res.psnr)
        l2.append(res.l2)
        success.append(res.success)
    clean, adv, full = torch.cat(clean), torch.cat(adv), torch.cat(full)
    mean_psnr, _ = metrics.psnr_mean(torch.cat(psnr))
    return {
        "recovery_pct": cost.recovery_aggregate(clean, adv, full),
        "all_on_pct": 100.0 * float(torch.cat(success).double().mean()),
        "l2": float(torch.cat(l2).double().mean()),
        "psnr_db": mean_psnr,
        "kept_clean_pct": float(clean.sum() / full.sum() * 100),
        "seconds": time.perf_counter() - start,
        "anchors_found": anchors,
    }


def fmt(v, spec=".1f"):
    return "-" if v is None or v != v else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50, help="first N Fashion-MNIST test images")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--only", default="", help="comma-separated victims (default: the five 2D victims)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "energy_dynamics.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    victims = [v for v in args.only.split(",") if v] or VICTIMS
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v!r}; expected one of {', '.join(VARIANTS)}")
    x, _ = load_fashion_mnist("test")
    x = x[: args.n].clone()

    rows = []
    bar = tqdm(total=len(victims) * len(variants), desc="energy-dynamics")
    for name in victims:
        model = create_model(name)
        for v in variants:
            bar.set_postfix_str(f"{name} {v}")
            rows.append({"victim": name, "variant": v, "params": VARIANTS[v],
                         **run(model, x, VARIANTS[v], args.steps, args.batch_size)})
            bar.update()
    bar.close()

    command = "python bench/energy_dynamics.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "# Dynamics-aware GradAuto: fgm vs lgm (annealed) vs fixed_point",
        "",
        f"Fashion-MNIST test images 0-{args.n - 1}, {args.steps} iterations, batch {args.batch_size}; "
        f"machine: {cpu_model()}, {args.threads} torch thread(s), torch {torch.__version__}.",
        "",
        f"Command: `{command}`",
        "",
        "Variants: `fgm` = GradAuto's default (hard gradient); `lgm 0.5->20` = `grad=lgm, lam=0.5, "
        "lam_end=20` (geometric annealing over the iterations); `lgm_st 0.5->20` the same with "
        "`grad=lgm_st` (hard forward, sigmoid backward); `fixed_point` = `objective=fixed_point` "
        "(forced-on network, hinge of its logits, fp_margin 0); `start 0.5` = `start_contrast=0.5` (the first "
        "iterate is the contrast-compressed image 0.5 + 0.5 (x - 0.5), a start away from the clean image as "
        "the authors' tanh map has); `anchors 8` = `anchor_starts=8` (the samples not all-on after the iterations jump "
        "to the closest all-on point towards inputs a forced-on search from 8 noise starts found all-on, then walk "
        "back along the all-on boundary for steps // 2 more iterations; the search's seconds are in the row). Everything else at GradAuto's defaults. "
        "Every figure measured on the hard network.",
        "",
        "| victim | compute kept (clean) | variant | recovery | samples all-on | mean L2 | PSNR | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['victim']} | {fmt(r['kept_clean_pct'])} % | {r['variant']} | {fmt(r['recovery_pct'])} % | "
                     f"{fmt(r['all_on_pct'], '.0f')} % | {fmt(r['l2'], '.3f')} | {fmt(r['psnr_db'])} dB | "
                     f"{fmt(r['seconds'], '.0f')} |")
    found = [f"{r['victim']} {r['anchors_found']} of {r['params']['anchor_starts']}" for r in rows
             if r["params"].get("anchor_starts")]
    if found:
        lines += ["", "All-on anchors found (noise starts whose natural run ended all-on; '-' or None: no "
                  "sample needed the search, the last batch's count otherwise): " + ", ".join(found) + "."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "n": args.n, "steps": args.steps,
                                                    "machine": cpu_model(), "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
