"""The LGM paper's Table I and Fig. 7 on our Fashion-MNIST victims: FGM vs LGM accuracy attacks.

    .venv/bin/python bench/accuracy_table.py [--victims NAME ...] [--n 1000] [--val-n 500]
        [--lams 0.1,0.2,0.5,1,2,5,10] [--grads lgm[,lgm_st]] [--batch-size 200] [--seed 0] [--fig-eps 8/255]

Settings (the paper's rows): FGSM at eps = 1, 2, 4, 8 /255 (every pixel may change) and I-FGSM
at eps = 8/255 with 100 / 20 / 10 / 5 % valid pixels (Kurakin's 10 iterations, step eps/10, the
final iterate is reported, as in the paper). For every setting and gated victim:

* FGM (hard gates, decisions held constant in the gradient) on the first --n test images;
* LGM (gates sigmoid(lam q) in the gradient forward): lam is chosen per setting by a sweep over
  --lams on the first --val-n images of the held-out validation split
  (``dynattack.train.common.fashion_mnist_splits``; never the test images): the lam with the
  lowest validation adversarial accuracy wins (ties: the higher mean cross-entropy, then the
  smaller lam); then LGM with that lam runs on the test images. ``--grads lgm,lgm_st`` sweeps
  LGM-ST (hard forward, sigmoid backward) over the same slopes too and takes the best pair.

Static victims (no gates) get the FGM column only (LGM is the same attack there).
Figures, all from the hard network: accuracy (%) before and after the attack, and the
architecture change ratio (%): differing (sample, gate unit) decisions between the clean and the
adversarial input over the samples classified correctly when clean (the runner's
``arch_change_pct``, :func:`dynattack.metrics.arch_change_skipnet`). One seed for every batch, so
the valid-pixel mask is one fixed seeded subset of pixel positions for all images.

Writes bench/results/accuracy_table.md (and .json with every number and the lam sweeps), and the
Fig. 7 analogue per gated victim, bench/results/exec_rates_<victim>.png: the execution rate of
each gate for each class (metrics.execution_rates_by_class) before the attack (true classes) and
after FGSM at --fig-eps with FGM and with LGM (by true class and by the class the attacked image
is predicted as, the paper's "GT classes" / "Attacked classes").

Victims without trained weights are skipped with a message. Cost: I-FGSM dominates (10 steps x
(2 n + (len(lams) + 1) val_n) images per setting); on a shared 2-core CPU SkipNet-38 takes about
an hour at the defaults (--n 500 --val-n 250 halves it), a static victim a few minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dynattack import metrics
from dynattack.attacks import FGSM, IFGSM
from dynattack.errors import DynattackError
from dynattack.gates import Trace
from dynattack.models import create_model, list_models
from dynattack.train.common import fashion_mnist_splits

CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
DEFAULT_VICTIMS = ["skipnet38-rnn-hrl", "resnet20-fmnist"]
SETTINGS = [  # (attack, eps in 0-255 units, valid-pixel fraction)
    ("FGSM", 1, 1.0), ("FGSM", 2, 1.0), ("FGSM", 4, 1.0), ("FGSM", 8, 1.0),
    ("I-FGSM", 8, 1.0), ("I-FGSM", 8, 0.2), ("I-FGSM", 8, 0.1), ("I-FGSM", 8, 0.05),
]


def default_victims() -> list[str]:
    names = list(DEFAULT_VICTIMS)
    names += [m["name"] for m in list_models() if m["family"] == "dynconv" and m["name"] not in names]
    return names


def parse_eps(text: str) -> float:
    num, _, den = text.partition("/")
    return float(num) / float(den) if den else float(text)


# ----------------------------------------------------------------------------- measuring


def hard_eval(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> dict:
    """The hard network on ``x``: predictions, CE, every unit decision, per-gate on-fraction."""
    preds, ces, decs, rates, names = [], [], [], [], None
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            xb, yb = x[s:s + batch_size].to(device), y[s:s + batch_size].to(device)
            with Trace() as t:
                logits = model(xb)
            preds.append(logits.argmax(1).cpu())
            ces.append(F.cross_entropy(logits, yb, reduction="none").cpu())
            if len(t):
                decs.append(t.flat("decision").cpu())
                rates.append(torch.stack([e.decision.reshape(len(xb), -1).double().mean(1) for e in t], 1).cpu())
                names = [e.name for e in t]
    pred = torch.cat(preds)
    out = {"pred": pred, "correct": pred == y, "ce": torch.cat(ces)}
    if decs:
        out.update(decisions=torch.cat(decs), rates=torch.cat(rates), gate_names=names)
    return out


def attack_images(model, attack_cls, kw: dict, x, y, batch_size: int, device, desc: str) -> torch.Tensor:
    adv = []
    atk = attack_cls(model, progress=False, **kw)
    for s in tqdm(range(0, len(x), batch_size), desc=desc, leave=False, unit="batch"):
        adv.append(atk(x[s:s + batch_size].to(device), y[s:s + batch_size].to(device)).adv.cpu())
    return torch.cat(adv)


def setting_kwargs(attack: str, eps255: int, valid: float, seed: int) -> tuple[type, dict]:
    kw = {"eps": eps255 / 255, "valid_pixels": valid, "seed": seed}
    return (FGSM, kw) if attack == "FGSM" else (IFGSM, kw)  # I-FGSM: Kurakin's steps, keep final


def measure(model, cls, kw, x, y, clean: dict, batch_size, device, desc) -> dict:
    adv = attack_images(model, cls, kw, x, y, batch_size, device, desc)
    ev = hard_eval(model, adv, y, batch_size, device)
    linf = float((adv.double() - x.double()).abs().flatten(1).amax(1).max())
    out = {"adv_acc": 100 * float(ev["correct"].double().mean()), "ce": float(ev["ce"].mean()), "linf_max": linf,
           "ev": ev}
    if "decisions" in clean:
        out["arch_change"] = metrics.arch_change_skipnet(clean["decisions"], ev["decisions"], clean["correct"])
    return out


# ----------------------------------------------------------------------------- one victim


def run_victim(name: str, args, data, device) -> dict | None:
    try:
        model = create_model(name, pretrained=not args.untrained, device=device)
    except DynattackError as exc:
        print(f"skipping {name}: {exc}", file=sys.stderr, flush=True)
        return None
    (xv, yv), (xt, yt) = data
    if tuple(model.input_shape) != tuple(xt.shape[1:]):
        print(f"skipping {name}: it takes inputs {tuple(model.input_shape)}, Fashion-MNIST is {tuple(xt.shape[1:])}",
              file=sys.stderr)
        return None
    bs = args.batch_size
    clean_t = hard_eval(model, xt, yt, bs, device)
    gated = "decisions" in clean_t
    clean_v = hard_eval(model, xv, yv, bs, device) if gated else None
    result = {"victim": name, "gated": gated, "clean_acc": 100 * float(clean_t["correct"].double().mean()),
              "rows": [], "untrained": bool(args.untrained)}
    print(f"{name}: clean accuracy {result['clean_acc']:.2f} % on {len(xt)} test images"
          + (f", {len(clean_t['gate_names'])} gates" if gated else " (static)"), flush=True)
    fig_evs = {}
    for attack, eps255, valid in tqdm(SETTINGS, desc=name, unit="setting"):
        t0 = time.perf_counter()
        cls, kw = setting_kwargs(attack, eps255, valid, args.seed)
        label = f"{attack} eps={eps255}/255 valid={valid:.0%}"
        row = {"attack": attack, "eps255": eps255, "valid_pixels": valid}
        fgm = measure(model, cls, {**kw, "grad": "fgm"}, xt, yt, clean_t, bs, device, f"{label} FGM")
        row["fgm_acc"], row["fgm_arch_change"] = fgm["adv_acc"], fgm.get("arch_change")
        if gated:
            sweep = []
            for grad in args.grads:
                for lam in args.lams:
                    m = measure(model, cls, {**kw, "grad": grad, "lam": lam}, xv, yv, clean_v, bs, device,
                                f"{label} {grad} lam={lam} (val)")
                    sweep.append({"grad": grad, "lam": lam, "val_adv_acc": m["adv_acc"], "val_ce": m["ce"]})
            # ties: the higher CE, then the smaller lam, then the order of --grads
            best = min(sweep, key=lambda s: (s["val_adv_acc"], -s["val_ce"], s["lam"], args.grads.index(s["grad"])))
            fgm_val = measure(model, cls, {**kw, "grad": "fgm"}, xv, yv, clean_v, bs, device, f"{label} FGM (val)")
            lgm = measure(model, cls, {**kw, "grad": best["grad"], "lam": best["lam"]}, xt, yt, clean_t, bs, device,
                          f"{label} LGM")
            row.update(lgm_acc=lgm["adv_acc"], lgm_arch_change=lgm["arch_change"], lam=best["lam"],
                       grad=best["grad"], val_fgm_acc=fgm_val["adv_acc"], sweep=sweep)
            if attack == "FGSM" and math.isclose(eps255 / 255, args.fig_eps):
                fig_evs = {"fgm": fgm["ev"], "lgm": lgm["ev"], "lam": best["lam"]}
        row["seconds"] = time.perf_counter() - t0
        assert fgm["linf_max"] <= eps255 / 255 + 1e-12
        result["rows"].append(row)
        msg = f"  {label}: FGM {row['fgm_acc']:.2f} %"
        if gated:
            msg += (f" (chg {row['fgm_arch_change']:.2f} %), LGM {row['lgm_acc']:.2f} % "
                    f"(chg {row['lgm_arch_change']:.2f} %, lam {row['lam']:g}; val FGM {row['val_fgm_acc']:.1f} % "
                    f"vs LGM {best['val_adv_acc']:.1f} %)")
        tqdm.write(msg + f" [{row['seconds']:.0f} s]")
    if gated and fig_evs:
        path = Path(args.out_dir) / f"exec_rates_{name}.png"
        exec_rate_figure(name, clean_t, fig_evs, yt, args.fig_eps, path)
        result["figure"] = str(path)
        print(f"  wrote {path}", flush=True)
    elif gated:
        print(f"  no figure: --fig-eps {args.fig_eps * 255:g}/255 is not one of the FGSM budgets", file=sys.stderr)
    return result


# ----------------------------------------------------------------------------- outputs


def exec_rate_figure(name: str, clean: dict, evs: dict, labels: torch.Tensor, eps: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(CLASSES)
    panels = [
        ("(a) before attack\ntrue classes", metrics.execution_rates_by_class(clean["rates"], labels, k)),
        ("(b) FGM\ntrue classes", metrics.execution_rates_by_class(evs["fgm"]["rates"], labels, k)),
        ("(c) FGM\nattacked classes", metrics.execution_rates_by_class(evs["fgm"]["rates"], evs["fgm"]["pred"], k)),
        (f"(d) LGM (lam {evs['lam']:g})\ntrue classes", metrics.execution_rates_by_class(evs["lgm"]["rates"], labels, k)),
        ("(e) LGM\nattacked classes", metrics.execution_rates_by_class(evs["lgm"]["rates"], evs["lgm"]["pred"], k)),
    ]
    n_gates = panels[0][1].shape[0]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 0.16 * n_gates * len(panels), 3.6), sharey=True,
                             constrained_layout=True)
    for ax, (title, rate) in zip(axes, panels):
        im = ax.imshow(rate.T.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("gate")
        ax.set_xticks(range(0, n_gates, max(1, n_gates // 6)))
    axes[0].set_yticks(range(k), CLASSES, fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.9, label="execution rate")
    fig.suptitle(f"{name}: gate execution rate per class, FGSM eps = {eps * 255:g}/255 "
                 "(white rows: no image predicted as that class)", fontsize=10)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def markdown(results: list[dict], args) -> str:
    head = ["attack", "valid px"]
    sub = ["---", "---"]
    for r in results:
        if r["gated"]:
            head += [f"{r['victim']} FGM", "arch. chg.", "LGM", "arch. chg.", "lam"]
            sub += ["---:"] * 5
        else:
            head += [f"{r['victim']} (static) FGM"]
            sub += ["---:"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(sub) + " |"]
    before = ["before attack", "-"]
    for r in results:
        before += [f"{r['clean_acc']:.2f}", "", "", "", ""] if r["gated"] else [f"{r['clean_acc']:.2f}"]
    lines.append("| " + " | ".join(before) + " |")
    for i, (attack, eps255, valid) in enumerate(SETTINGS):
        cells = [f"{attack} eps = {eps255}", f"{valid:.0%}"]
        for r in results:
            row = r["rows"][i]
            if r["gated"]:
                lam = f"{row['lam']:g}" + (" (st)" if row.get("grad") == "lgm_st" else "")
                cells += [f"{row['fgm_acc']:.2f}", f"{row['fgm_arch_change']:.2f}", f"{row['lgm_acc']:.2f}",
                          f"{row['lgm_arch_change']:.2f}", lam]
            else:
                cells += [f"{row['fgm_acc']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"Fashion-MNIST, first {args.n} test images; accuracy and architecture change in %, eps in 0-255 units; "
            f"lam chosen per setting on the first {args.val_n} validation images from {{{', '.join(f'{v:g}' for v in args.lams)}}}"
            + (f" for each of {', '.join(args.grads)} ((st): LGM-ST, hard forward and sigmoid backward won)"
               if args.grads != ["lgm"] else "") + "; "
            f"seed {args.seed}; torch {torch.__version__}, {platform.machine()}."
            + (" UNTRAINED victims (smoke run): the numbers mean nothing." if args.untrained else ""))
    return note + "\n\n" + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--victims", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_VICTIMS)} (+ DynConv victims)")
    ap.add_argument("--n", type=int, default=1000, help="test images attacked (the first N)")
    ap.add_argument("--val-n", type=int, default=500, help="validation images for the lam sweep (the first N)")
    ap.add_argument("--lams", default="0.1,0.2,0.5,1,2,5,10", help="LGM slopes swept, comma separated")
    ap.add_argument("--grads", default="lgm", help="LGM variants swept with the slopes: lgm and/or lgm_st")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fig-eps", default="8/255", help="FGSM budget of the execution-rate figure")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--untrained", action="store_true", help=argparse.SUPPRESS)  # smoke test without weights
    args = ap.parse_args(argv)
    args.lams = [float(v) for v in args.lams.split(",") if v.strip()]
    args.grads = [g.strip() for g in args.grads.split(",") if g.strip()]
    if not args.grads or any(g not in ("lgm", "lgm_st") for g in args.grads):
        ap.error(f"--grads takes lgm and/or lgm_st, got {','.join(args.grads)!r}")
    args.fig_eps = parse_eps(args.fig_eps)
    if args.n <= 0 or args.val_n <= 0 or args.batch_size <= 0 or not args.lams or min(args.lams) <= 0:
        ap.error("--n, --val-n, --batch-size and every lam must be > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, (xv, yv), (xt, yt) = fashion_mnist_splits()
    data = ((xv[:args.val_n], yv[:args.val_n]), (xt[:args.n], yt[:args.n]))
    results = []
    for name in args.victims or default_victims():
        r = run_victim(name, args, data, args.device)
        if r is not None:
            results.append(r)
    if not results:
        print("no victim could be loaded: nothing to tabulate", file=sys.stderr)
        return 1
    table = markdown(results, args)
    print("\n" + table)
    (out_dir / "accuracy_table.md").write_text(table)
    (out_dir / "accuracy_table.json").write_text(json.dumps(
        {"n": args.n, "val_n": args.val_n, "lams": args.lams, "seed": args.seed, "results": results}, indent=1) + "\n")
    print(f"wrote {out_dir / 'accuracy_table.md'} and {out_dir / 'accuracy_table.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
