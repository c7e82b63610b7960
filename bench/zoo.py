"""Measure every shipped victim on the full Fashion-MNIST test set: accuracy, executed FLOPs,
compute kept vs all gates on, and real batch-1 latency (clean vs all gates on).

    .venv/bin/python bench/zoo.py [--latency-n 200] [--check-cards] [--only NAME,...]

Writes bench/results/zoo.md (the README's zoo table; with --only, the named victims' rows are
re-measured and the others kept). With --check-cards it fails when a model card's accuracy or
compute kept differs from the measurement. Point-cloud victims are not Fashion-MNIST classifiers:
their figures are in bench/pointcloud_tables.py's table and their model card.
"""
import argparse
import platform
import sys
from pathlib import Path

import torch

from dynattack import cost
from dynattack.data import load_dataset
from dynattack.models import create_model, list_models
from dynattack.train.common import evaluate


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency-n", type=int, default=200)
    ap.add_argument("--check-cards", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated victims to re-measure (default: all)")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    out = Path(__file__).parent / "results" / "zoo.md"
    kept = {}  # rows of victims not re-measured, by name
    if only and out.exists():
        kept = {line.split("|")[1].strip(): line for line in out.read_text().splitlines() if line.startswith("| ")
                and line.split("|")[1].strip() not in ("victim",)}
    torch.manual_seed(0)
    rows, mismatches = [], []
    for entry in list_models():
        if not entry["shipped"] or entry["dataset"] != "fashion-mnist" or (only and entry["name"] not in only):
            continue
        model = create_model(entry["name"])
        x, y = load_dataset(entry["dataset"], "test")[:2]
        res = evaluate(model, x, y)
        sub = x[: args.latency_n]
        lat = cost.batch1_latency_ms(model, {"clean": (sub, None), "on": (sub, "on")})
        lat, lat_full = lat["clean"], lat["on"]
        card = entry["card"] or {}
        for key in ("accuracy", "compute_kept_pct"):
            if abs(card.get(key, float("nan")) - res[key]) > 1e-6:
                mismatches.append(f"{entry['name']}: card {key}={card.get(key)} measured {res[key]}")
        rows.append(f"| {entry['name']} | {entry['family']} | {card.get('params', 0) / 1e6:.2f} M | "
                    f"{100 * res['accuracy']:.2f} % | {res['flops_mean'] / 1e6:.2f} M / {res['flops_full'] / 1e6:.2f} M | "
                    f"{res['compute_kept_pct']:.1f} % | {lat:.2f} ms | {lat_full:.2f} ms |")
        print(rows[-1], flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    table = "\n".join([
        f"Fashion-MNIST test set (10 000 images); batch-1 latency = median over {args.latency_n} images "
        f"of the real conditional-execution path; machine: {machine}.",
        "",
        "| victim | family | params | accuracy | FLOPs mean / all on | compute kept | latency b=1 | latency b=1, all on |",
        "|---|---|---|---|---|---|---|---|",
        *sorted(rows + [line for name, line in kept.items() if name not in {r.split("|")[1].strip() for r in rows}]),
    ])
    out.write_text(table + "\n")
    print(f"\nwrote {out}")
    for m in mismatches:
        print("MISMATCH", m, file=sys.stderr)
    return 1 if (mismatches and args.check_cards) else 0


if __name__ == "__main__":
    sys.exit(main())
