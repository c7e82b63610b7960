"""Universal energy perturbation vs the per-image budgeted attack at the same eps.

    .venv/bin/python bench/universal_table.py [--victims a,b] [--n 50] [--eps 8/255]
        [--fit-steps 300] [--train-n 1000] [--fit-batch 100] [--pgd-steps 100]

For each gated 2D victim of the zoo: ``UniversalEnergy`` fitted on the first --train-n
Fashion-MNIST *training* images, evaluated on the first --n *test* images (held out), against
``EnergyPGD`` (one perturbation per image, same eps) on the same test images. Recovery of the
saved FLOPs (aggregate), share of samples all-on, mean L2 and PSNR; wall time of the fit.
Writes bench/results/universal.md (``--out NAME``: another file there).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from dynattack import metrics
from dynattack.attacks import EnergyPGD, UniversalEnergy
from dynattack.data import load_fashion_mnist
from dynattack.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cost_speed import cpu_name  # noqa: E402

VICTIMS = ["skipnet38-rnn-hrl", "skipnet38-ff-sp", "skipnet38-rnn-sp", "dynconv20-fmnist", "sact20-fmnist",
           "manidp20-fmnist"]


def fraction(text: str) -> float:
    num, _, den = text.partition("/")
    return float(num) / float(den) if den else float(text)


def row(res) -> str:
    psnr, _ = metrics.psnr_mean(res.psnr)
    return (f"{res.recovery_pct:.1f} | {100 * res.success.double().mean():.0f} | {res.l2.mean():.2f} | {psnr:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--victims", default=",".join(VICTIMS))
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--eps", type=fraction, default=8 / 255)
    ap.add_argument("--fit-steps", type=int, default=300)
    ap.add_argument("--train-n", type=int, default=1000)
    ap.add_argument("--fit-batch", type=int, default=100)
    ap.add_argument("--pgd-steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="universal.md", help="file name in bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, _ = load_fashion_mnist("train")
    test, _ = load_fashion_mnist("test")
    test = test[:args.n]
    rows = []
    for name in args.victims.split(","):
        model = create_model(name)
        uni = UniversalEnergy(model, eps=args.eps, steps=args.fit_steps, train_n=args.train_n,
                              fit_batch=args.fit_batch)
        t0 = time.perf_counter()
        uni.fit(train[:args.train_n])
        fit_s = time.perf_counter() - t0
        res_u = uni(test)
        res_p = EnergyPGD(model, eps=args.eps, steps=args.pgd_steps)(test)
        rows.append(f"| {name} | {row(res_u)} | {row(res_p)} | {fit_s:.0f} |")
        print(rows[-1], flush=True)
    lines = ["# Universal energy perturbation vs per-image energy PGD", "",
             f"`.venv/bin/python bench/universal_table.py --n {args.n} --eps {args.eps * 255:g}/255 --fit-steps "
             f"{args.fit_steps} --train-n {args.train_n} --fit-batch {args.fit_batch} --pgd-steps {args.pgd_steps} "
             f"--threads {args.threads} --victims {args.victims} --out {args.out}` on {cpu_name()} ({platform.machine()}), torch {torch.__version__}. "
             f"Universal: one perturbation fitted on the first {args.train_n} training images, evaluated on the first "
             f"{args.n} test images; energy PGD: one perturbation per test image, {args.pgd_steps} steps, random start.",
             "", "| victim | universal recovery % | all-on % | L2 | PSNR dB | energy PGD recovery % | all-on % | L2 | "
             "PSNR dB | fit s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows]
    out = Path(__file__).resolve().parent / "results" / args.out
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
