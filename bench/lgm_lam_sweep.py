"""FGSM with LGM over a wide grid of slopes, against FGM, on the test images themselves.

    .venv/bin/python bench/lgm_lam_sweep.py [--victims skipnet38-rnn-hrl dynconv20-fmnist] [--n 500]
        [--eps 2,4,8] [--lams 0.02,0.05,0.1,0.2,0.5,1,2,5,20,100] [--threads 1]

bench/accuracy_table.py chooses LGM's slope on validation images (the paper's protocol). This
script asks the question behind a loss there: is there *any* slope, or the straight-through
variant ``lgm_st``, at which LGM beats FGM on these test images? Every slope is scored on the
test images (an oracle choice, an upper bound on what a validation choice can reach), so a row
where even the best slope does not beat FGM shows the victim's gates, not the choice of slope,
decide the outcome. FGSM at each eps /255, the first --n Fashion-MNIST test images; adversarial
accuracy (%) of the hard network. Writes bench/results/lgm_lam_sweep.md (and .json).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dynattack import create_model
from dynattack.attacks import FGSM
from dynattack.data import load_fashion_mnist
from dynattack.data.images import pad_to

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--victims", nargs="+", default=["skipnet38-rnn-hrl", "dynconv20-fmnist"])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--eps", default="2,4,8", help="budgets in /255, comma separated")
    ap.add_argument("--lams", default="0.02,0.05,0.1,0.2,0.5,1,2,5,20,100")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    eps_list = [float(e) for e in args.eps.split(",")]
    lams = [float(v) for v in args.lams.split(",")]
    images, labels = load_fashion_mnist("test")
    images, labels = images[:args.n], labels[:args.n]
    rows, start = [], time.perf_counter()
    bar = tqdm(total=len(args.victims) * len(eps_list) * (1 + 2 * len(lams)), desc="lgm-sweep")
    for name in args.victims:
        model = create_model(name)
        side = model.input_shape[-1]
        x = images if images.shape[-1] == side else pad_to(images, side)

        def acc(**kw) -> float:
            res = FGSM(model, progress=False, **kw)(x, labels)
            bar.update()
            return 100.0 * float((res.adv_pred == labels).double().mean())

        for e in eps_list:
            row = {"victim": name, "eps": e, "fgm": acc(eps=e / 255)}
            for grad in ("lgm", "lgm_st"):
                row[grad] = {str(lam): acc(eps=e / 255, grad=grad, lam=lam) for lam in lams}
            rows.append(row)
    bar.close()

    lines = [
        "# LGM over a wide slope grid vs FGM (FGSM, oracle slope on the test images)",
        "",
        f"First {args.n} Fashion-MNIST test images; adversarial accuracy % of the hard network (lower: stronger). "
        f"Machine: {platform.machine()} ({platform.processor() or 'cpu'}), {args.threads} torch thread(s), torch "
        f"{torch.__version__}; {time.perf_counter() - start:.0f} s.",
        "",
        f"Command: `.venv/bin/python bench/lgm_lam_sweep.py --victims {' '.join(args.victims)} --n {args.n} "
        f"--eps {args.eps} --lams {args.lams} --threads {args.threads}`",
        "",
        "| victim | eps /255 | FGM | best LGM (lam) | best LGM-ST (lam) | best minus FGM | " +
        " | ".join(f"LGM {v:g}" for v in lams) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(lams),
    ]
    for r in rows:
        best = {g: min(r[g].items(), key=lambda kv: (kv[1], float(kv[0]))) for g in ("lgm", "lgm_st")}
        top = min(best["lgm"][1], best["lgm_st"][1])
        lines.append(
            f"| {r['victim']} | {r['eps']:g} | {r['fgm']:.1f} | {best['lgm'][1]:.1f} ({float(best['lgm'][0]):g}) | "
            f"{best['lgm_st'][1]:.1f} ({float(best['lgm_st'][0]):g}) | {top - r['fgm']:+.1f} | " +
            " | ".join(f"{v:.1f}" for v in r["lgm"].values()) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lgm_lam_sweep.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "lgm_lam_sweep.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
