"""The README's table of examples: each network of ``examples/`` declared, its FLOPs checked
against ``FlopCounterMode`` on real skipping execution (per sample), and attacked.

    .venv/bin/python bench/examples_table.py [--n 16] [--steps 30]

Writes bench/results/examples.md (max relative FLOPs error, clean / adversarial FLOPs, GradAuto
and ILFO recovery and all-on share, FGSM fgm / lgm at 8/255 changed predictions).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "bench"))

from cost_speed import cpu_name  # noqa: E402

EXAMPLES = {"early_exit": "early exit, nested exits", "channel_gates": "channel gates on consecutive convs",
            "subbatch_early_exit": "batched early exit (sub-batch gates)", "moe_topk": "top-2 of 4 experts",
            "token_halting": "token-halting ViT (quadratic attention)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for module, title in EXAMPLES.items():
        t0 = time.perf_counter()
        run = importlib.import_module(module).main(n=args.n, steps=args.steps)
        f = run["figures"]
        rows.append(f"| `examples/{module}.py` | {title} | {run['max_rel_error']:.3g} | "
                    f"{f['GradAuto']['flops_clean'] / 1e3:.1f} k | {f['GradAuto']['recovery_pct']:.1f} % / "
                    f"{f['GradAuto']['all_on_pct']:.0f} % | {f['ILFO']['recovery_pct']:.1f} % / "
                    f"{f['ILFO']['all_on_pct']:.0f} % | {f['FGSM-fgm']['changed_pred_pct']:.0f} % / "
                    f"{f['FGSM-lgm']['changed_pred_pct']:.0f} % | {time.perf_counter() - t0:.1f} s |")
    lines = ["# Examples: declared networks, FLOPs checked, attacked", "",
             f"`.venv/bin/python bench/examples_table.py --n {args.n} --steps {args.steps}` on {cpu_name()}, "
             f"1 torch thread, torch {torch.__version__}. Random weights, random images (the examples are "
             "about the declarations, not about accuracy).", "",
             "| example | kind | max rel. FLOPs error | clean FLOPs | GradAuto recovery / all-on | "
             "ILFO recovery / all-on | FGSM 8/255 changed pred. fgm / lgm | wall |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |", *rows]
    out = ROOT / "bench" / "results" / "examples.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
