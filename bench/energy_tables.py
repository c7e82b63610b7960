"""The GradAuto paper's experiments on the shipped victims (Fashion-MNIST test images).

    .venv/bin/python bench/energy_tables.py [--n 100] [--steps 300] [--tables 1,2,3,speed]
                                            [--victims a,b] [--out NAME.md]

- Table 1: ILFO vs GradAuto recovery (and PSNR) on every shipped gated victim;
- Table 2: ablation on SkipNet-HRL: ILFO (the paper's baseline), GradAuto without either
  rectification, rectified direction only (RD), rectified magnitude only (RM), both (GradAuto);
- Table 3: Lipschitz constant K in {1e-3 ... 100}: recovery and PSNR;
- ceiling (run alone, ``--tables ceiling``, writes energy_ceiling.md): the recovery an
  unconstrained push of every gate logit reaches (no distortion limit), a reference point;
- gates (run alone, ``--tables gates --out energy_gates.md``): on ``--victim``, whether each gate
  left off can be switched on alone, and all at once, with no distortion limit;
- search (run alone, ``--tables search --out energy_search.md``): PSNR of GradAuto's first all-on
  input vs its minimum-norm search run to ``--steps`` and to 1000 iterations;
- speed: one attack iteration / one forward+backward of the same victim on the same batch,
  measured in the same run (iterations to full recovery: Table 1's last column).

Writes bench/results/energy_tables.md (the README's tables) and prints it.
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dynattack import cost, create_model, metrics
from dynattack.attacks import ILFO, GradAuto
from dynattack.attacks.base import victim_context
from dynattack.data import load_fashion_mnist
from dynattack.gates import Trace
from dynattack.models import list_models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cost_speed import cpu_name  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def attack_all(atk, x, batch_size):
    """Run an attack over ``x`` in batches; aggregate recovery, mean PSNR, per-sample iterations."""
    clean, adv, full, psnr, iters, first = [], [], [], [], [], []
    for xb in x.split(batch_size):
        res = atk(xb)
        clean.append(res.flops_clean)
        adv.append(res.flops_adv)
        full.append(res.flops_full)
        psnr.append(res.psnr)
        iters.append(res.iterations)
        first.append(res.success_iteration)
    clean, adv, full = torch.cat(clean), torch.cat(adv), torch.cat(full)
    mean_psnr, identical = metrics.psnr_mean(torch.cat(psnr))
    first = torch.cat(first)
    reached = first[first >= 0]
    return {
        "recovery": cost.recovery_aggregate(clean, adv, full),
        "psnr": mean_psnr,
        "identical": identical,
        "kept_clean": float(clean.sum() / full.sum() * 100),
        "iterations_mean": float(torch.cat(iters).double().mean()),
        "median_to_full": statistics.median(reached.tolist()) if len(reached) else None,
        "full_pct": 100.0 * len(reached) / len(first),
    }


def gated_victims(only: str = ""):
    """Shipped gated image victims (all, or those named in the comma list ``only``)."""
    names = [m["name"] for m in list_models()
             if m["shipped"] and m["family"] != "resnet" and m["dataset"] == "fashion-mnist"]
    wanted = [n for n in only.split(",") if n]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise SystemExit(f"not shipped gated image victims: {', '.join(unknown)}")
    return [n for n in names if not wanted or n in wanted]


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def table1(x, args, lines):
    lines += ["### Table 1 analogue: ILFO vs GradAuto, recovery of the saved FLOPs (PSNR)", "",
              "| victim | compute kept (clean) | ILFO recovery | ILFO PSNR | GradAuto recovery | GradAuto PSNR "
              "| GradAuto: samples all-on | median iterations to all-on |",
              "|---|---|---|---|---|---|---|---|"]
    for name in gated_victims(args.victims):
        model = create_model(name)
        ilfo = attack_all(ILFO(model, steps=args.steps, progress=False), x, args.batch_size)
        ga = attack_all(GradAuto(model, steps=args.steps, progress=False), x, args.batch_size)
        lines.append(f"| {name} | {ilfo['kept_clean']:.1f} % | {ilfo['recovery']:.1f} % | {fmt(ilfo['psnr'])} dB | "
                     f"{ga['recovery']:.1f} % | {fmt(ga['psnr'])} dB | {ga['full_pct']:.0f} % | "
                     f"{fmt(ga['median_to_full'], '.0f')} |")
        print(lines[-1], flush=True)
    lines.append("")


def table2(x, args, lines):
    model = create_model(args.victim)
    lines += [f"### Table 2 analogue: ablation on {args.victim}", "",
              "| method | recovery | PSNR |", "|---|---|---|"]
    runs = [("ILFO (the paper's baseline)", lambda: ILFO(model, steps=args.steps, progress=False))]
    for label, rd, rm in (("GradAuto, no rectification", False, False), ("RD only", True, False),
                          ("RM only", False, True), ("GradAuto (RD + RM)", True, True)):
        runs.append((label, lambda rd=rd, rm=rm: GradAuto(model, steps=args.steps, rectify_direction=rd,
                                                          rectify_magnitude=rm, progress=False)))
    for label, make in runs:
        r = attack_all(make(), x, args.batch_size)
        lines.append(f"| {label} | {r['recovery']:.1f} % | {fmt(r['psnr'])} dB |")
        print(lines[-1], flush=True)
    lines.append("")


def table3(x, args, lines):
    model = create_model(args.victim)
    lines += [f"### Table 3 analogue: Lipschitz constant K on {args.victim}", "",
              "| K | recovery | PSNR |", "|---|---|---|"]
    for K in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0):
        r = attack_all(GradAuto(model, K=K, steps=args.steps, progress=False), x, args.batch_size)
        lines.append(f"| {K:g} | {r['recovery']:.1f} % | {fmt(r['psnr'])} dB |")
        print(lines[-1], flush=True)
    lines.append("")


def ceiling(x, args, lines):
    """A blunt reference point: Adam (lr 0.05, ``args.steps`` iterations) on the input itself, no
    distortion term, pushing every gate logit up to +1; the input only clipped to [0, 1]. It
    destroys the image; where even it leaves gates off, they barely depend on the input. Not a
    proven bound: GradAuto, with its distortion term, can do better."""
    lines += ["### Reference: unconstrained push of every gate logit (no distortion limit)", "",
              "| victim | recovery | samples all-on | PSNR |", "|---|---|---|---|"]
    for name in gated_victims(args.victims):
        model = create_model(name).eval()
        clean_f, adv_f, full_f, on, psnr = [], [], [], [], []
        for xb in x.split(args.batch_size):
            full = cost.profile(model, tuple(xb.shape[1:])).full
            z = xb.clone().requires_grad_(True)
            opt = torch.optim.Adam([z], lr=0.05)
            for _ in range(args.steps):
                with Trace() as trace:
                    model(z.clamp(0, 1))
                logits = torch.cat([e.logit.reshape(len(xb), -1) for e in trace], 1)
                opt.zero_grad()
                (-logits.clamp(max=1.0).sum()).backward()
                opt.step()
            for imgs, out in ((xb, clean_f), (z.detach().clamp(0, 1), adv_f)):
                with torch.no_grad(), Trace() as trace:
                    model(imgs)
                out.append(cost.executed_flops(model, trace))
            on.append(torch.cat([e.decision.reshape(len(xb), -1) for e in trace], 1).all(1))
            full_f.append(torch.full((len(xb),), full, dtype=torch.float64))
            psnr.append(metrics.psnr(xb, z.detach().clamp(0, 1)))
        mean_psnr, _ = metrics.psnr_mean(torch.cat(psnr))
        rec = cost.recovery_aggregate(torch.cat(clean_f), torch.cat(adv_f), torch.cat(full_f))
        lines.append(f"| {name} | {rec:.1f} % | {100 * torch.cat(on).double().mean():.0f} % | {fmt(mean_psnr)} dB |")
        print(lines[-1], flush=True)
    lines.append("")


def gates(x, args, lines):
    """Can the gates GradAuto leaves off be switched on at all? With no distortion limit (Adam,
    lr 0.05, ``args.steps`` iterations on the input, clipped to [0, 1]): each gate that is off on
    some clean image pushed alone (its logit up to +2), then every gate at once through a soft
    minimum of the logits (temperature 0.5), which only rises when the lowest gate rises."""
    model = create_model(args.victim).eval()
    n = len(x)
    with torch.no_grad(), Trace() as trace:
        model(x)
    names = [e.name for e in trace]
    clean_on = torch.stack([e.decision.reshape(n) for e in trace], 1).double().mean(0)

    def push(objective):
        z = x.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=0.05)
        ever = torch.zeros(n, len(names), dtype=torch.bool)
        for _ in range(args.steps):
            with Trace() as trace:
                model(z.clamp(0, 1))
            ever |= torch.stack([e.decision.reshape(n) for e in trace], 1)
            logits = torch.stack([e.logit.reshape(n) for e in trace], 1)
            opt.zero_grad()
            objective(logits).backward()
            opt.step()
        return ever, logits.detach()

    lines += [f"### Can the gates be switched on? {args.victim}, no distortion limit", "",
              "| gate | on, clean images | on after pushing it alone |", "|---|---|---|"]
    for k in (k for k in range(len(names)) if clean_on[k] < 1):
        ever, _ = push(lambda q, k=k: -q[:, k].clamp(max=2.0).sum())
        lines.append(f"| {names[k]} | {100 * clean_on[k]:.0f} % | {100 * ever[:, k].double().mean():.0f} % |")
        print(lines[-1], flush=True)
    ever, logits = push(lambda q: (0.5 * torch.logsumexp(-q / 0.5, 1)).sum())
    lines += ["", f"All at once (soft minimum of the logits): images ever all-on "
              f"{100 * ever.all(1).double().mean():.0f} %; lowest gate logit at the end, mean over images "
              f"{logits.min(1).values.mean():.2f} (on needs >= 0).", ""]
    print("\n".join(lines[-3:]), flush=True)


def search(x, args, lines):
    """How far the minimum-norm boundary search lowers the distortion, and whether it has converged:
    GradAuto's first all-on input (search off, early stop) vs the search run to ``args.steps``
    and to 1000 iterations, on the victims of ``--victims`` (default: the SP-trained SkipNets)."""
    names = gated_victims(args.victims or "skipnet38-rnn-sp,skipnet38-ff-sp")
    lines += ["### Minimum-norm search after all-on: mean PSNR (recovery)", "",
              f"| victim | first all-on input | search, {args.steps} iterations | search, 1000 iterations |",
              "|---|---|---|---|"]
    for name in names:
        model = create_model(name)
        runs = [GradAuto(model, steps=args.steps, keep_optimising_distortion=False, progress=False),
                GradAuto(model, steps=args.steps, progress=False), GradAuto(model, steps=1000, progress=False)]
        cells = [attack_all(atk, x, args.batch_size) for atk in runs]
        lines.append(f"| {name} | " + " | ".join(f"{fmt(r['psnr'])} dB ({r['recovery']:.1f} %)" for r in cells) + " |")
        print(lines[-1], flush=True)
    lines.append("")


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def speed(x, args, lines):
    model = create_model(args.victim)
    xb = x[: args.batch_size]
    y = torch.zeros(len(xb), dtype=torch.long)

    def forward_backward():
        leaf = xb.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(leaf), y), leaf)

    def forward_backward_as_attacked():  # eval mode, BatchNorm's input gradient in closed form
        with victim_context(model):
            forward_backward()

    # Early stop off so every iteration runs the whole batch. A call's fixed cost (clean and
    # all-on evaluation, final candidate) is removed by timing 10 and 30 steps: per iteration =
    # difference / 20. Rounds interleave the measures so that a slower spell of a shared
    # machine hits all of them; the table gives the median of the per-round figures.
    # gradauto-lgm: the dynamics-aware gradient (soft forward + backward, then the hard forward
    # every figure is measured on); gradauto-lgm_st: hard forward, sigmoid backward (the hard
    # forward is the evaluation: no extra forward).
    lgm = dict(lam=0.5, lam_end=20.0)
    attacks = {"gradauto": lambda s: GradAuto(model, steps=s, early_stop=False, progress=False),
               "gradauto-lgm": lambda s: GradAuto(model, steps=s, early_stop=False, grad="lgm", progress=False, **lgm),
               "gradauto-lgm_st": lambda s: GradAuto(model, steps=s, early_stop=False, grad="lgm_st", progress=False,
                                                     **lgm),
               "ilfo": lambda s: ILFO(model, steps=s, progress=False)}
    forward_backward()  # warm-up
    rounds = {k: [] for k in ("fb", "fb-attacked", *attacks)}
    for _ in range(args.repeats):
        rounds["fb"].append(statistics.median(timed(forward_backward) for _ in range(3)))
        rounds["fb-attacked"].append(statistics.median(timed(forward_backward_as_attacked) for _ in range(3)))
        for key, make in attacks.items():
            rounds[key].append((timed(lambda: make(30)(xb)) - timed(lambda: make(10)(xb))) / 20)
    ms = {k: statistics.median(v) * 1000 for k, v in rounds.items()}
    ratio = {k: statistics.median(a / f for a, f in zip(rounds[k], rounds["fb"])) for k in rounds}
    rows = [("one forward + backward (cross-entropy, PyTorch as is): the unit", "fb"),
            ("one forward + backward as the attacks run it (BatchNorm input gradient in closed form)", "fb-attacked"),
            ("one GradAuto iteration", "gradauto"),
            ("one GradAuto iteration, grad=lgm (dynamics-aware: soft forward + hard forward)", "gradauto-lgm"),
            ("one GradAuto iteration, grad=lgm_st (dynamics-aware: sigmoid backward only)", "gradauto-lgm_st"),
            ("one ILFO iteration", "ilfo")]
    lines += [f"### Speed on {args.victim}, batch {len(xb)}", "",
              "| measure | value |", "|---|---|",
              *(f"| {label} | {ms[k]:.1f} ms ({ratio[k]:.2f}x) |" for label, k in rows),
              "", "Iterations to full recovery: Table 1's last column (the authors run a fixed 300).", ""]
    print("\n".join(lines[-(len(rows) + 6):]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="first N Fashion-MNIST test images")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--victim", default="skipnet38-rnn-hrl", help="victim of tables 2, 3 and speed")
    ap.add_argument("--tables", default="1,2,3,speed", help="comma list of 1,2,3,speed,ceiling,gates,search")
    ap.add_argument("--repeats", type=int, default=5, help="timing rounds of the speed table")
    ap.add_argument("--victims", default="", help="comma list of victims for table 1 / ceiling / search (default: all; search: the SP SkipNets)")
    ap.add_argument("--out", default="", help="output file name in bench/results (default: energy_tables.md, "
                    "energy_ceiling.md for --tables ceiling)")
    args = ap.parse_args()
    x, _ = load_fashion_mnist("test")
    x = x[: args.n]
    machine = f"{cpu_name()} ({platform.machine()}), {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    lines = [f"Fashion-MNIST test images 0-{args.n - 1}, {args.steps} iterations, batch {args.batch_size}; "
             f"machine: {machine}.", ""]
    todo = args.tables.split(",")
    for key, fn in (("1", table1), ("2", table2), ("3", table3), ("speed", speed), ("ceiling", ceiling),
                    ("gates", gates), ("search", search)):
        if key in todo:
            fn(x, args, lines)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / (args.out or ("energy_tables.md" if todo != ["ceiling"] else "energy_ceiling.md"))
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
