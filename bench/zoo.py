"""Measure every shipped victim on the full Fashion-MNIST test set: accuracy, executed FLOPs,
compute kept vs all gates on, and real batch-1 latency (clean vs all gates on).

    .venv/bin/python bench/zoo.py [--latency-n 200] [--check-cards] [--write-cards] [--only NAME,...]

Writes bench/results/zoo.md (the README's zoo table; with --only, the named victims' rows are
re-measured and the others kept). With --check-cards it fails when a model card's accuracy or
compute kept differs from the measurement; with --write-cards it writes the measured input
dependence (``dynattack.metrics.input_dependence``: share of (sample, unit) decisions whose unit
varies over the test set, share differing from the unit's majority, spread of per-class execution
rates) into each gated victim's model card, the only card field not written by training for the
victims trained before it existed. Point-cloud victims are not Fashion-MNIST classifiers:
their figures are in bench/pointcloud_tables.py's table and their model card.
"""
import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

from dynattack import cost
from dynattack.data import load_dataset
from dynattack.models import card_path, create_model, list_models
from dynattack.train.common import evaluate


def write_card(name: str, card: dict) -> None:
    """Rewrite a model card atomically (temp file, then rename)."""
    path = card_path(name)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency-n", type=int, default=200)
    ap.add_argument("--check-cards", action="store_true")
    ap.add_argument("--write-cards", action="store_true", help="store the measured input dependence in the cards")
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
        dep = res.get("input_dependence")
        if dep and args.write_cards:
            write_card(entry["name"], dict(card, input_dependence=dep))
        varying = (f"{dep['varying_decisions_pct']:.1f} % / {dep['minority_decisions_pct']:.1f} % / "
                   f"{dep['class_spread_pct_mean']:.1f} %") if dep else "-"
        rows.append(f"| {entry['name']} | {entry['family']} | {card.get('params', 0) / 1e6:.2f} M | "
                    f"{100 * res['accuracy']:.2f} % | {res['flops_mean'] / 1e6:.2f} M / {res['flops_full'] / 1e6:.2f} M | "
                    f"{res['compute_kept_pct']:.1f} % | {varying} | {lat:.2f} ms | {lat_full:.2f} ms |")
        print(rows[-1], flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    table = "\n".join([
        f"Fashion-MNIST test set (10 000 images); batch-1 latency = median over {args.latency_n} images "
        f"of the real conditional-execution path; machine: {machine}.",
        "",
        "Decisions varying / minority / class spread: share of (sample, unit) decisions whose unit is not "
        "constant over the test set / share that differ from their unit's majority decision / mean over gates "
        "of the largest minus the smallest per-class execution rate (`dynattack.metrics.input_dependence`).",
        "",
        "| victim | family | params | accuracy | FLOPs mean / all on | compute kept | decisions varying / minority / "
        "class spread | latency b=1 | latency b=1, all on |",
        "|---|---|---|---|---|---|---|---|---|",
        *sorted(rows + [line for name, line in kept.items() if name not in {r.split("|")[1].strip() for r in rows}]),
    ])
    out.write_text(table + "\n")
    print(f"\nwrote {out}")
    for m in mismatches:
        print("MISMATCH", m, file=sys.stderr)
    return 1 if (mismatches and args.check_cards) else 0


if __name__ == "__main__":
    sys.exit(main())
