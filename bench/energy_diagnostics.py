"""Why GradAuto leaves some victims short of all-on: the diagnostics of ``dynattack.diagnostics``.

    .venv/bin/python bench/energy_diagnostics.py [--n 50] [--steps 300] [--probe-steps 50]
                                                 [--each-images 50] [--victims a,b]

For every shipped 2D gated victim, on the first ``--n`` Fashion-MNIST test images: GradAuto
(defaults, ``--steps`` iterations, but no minimum-norm search after all-on: it lowers the
distortion of inputs already all-on and changes no FLOPs, so recovery is the same and the run
shorter), then :func:`dynattack.diagnostics.diagnose` on its inputs: the per-gate why-not table,
the exhaustive forcing of the scalar gates still off (SkipNet), recovery against the full
network and against the reachable maximum (every unit some tried input switches on in the natural
run; "on alone", with every other gate forced on, says why, not whether). Structural checks that
need the family's weights are done here, not in the library: ManiDP channels whose saliency can
never reach the threshold (bias below it and no positive weight from a hidden unit that can be
positive: the mask blocks read ReLU outputs, so their inputs are >= 0).

Writes bench/results/energy_diagnostics.md and .json (one thread; each victim's result is
written as soon as it is done).
"""
import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dynattack import create_model
from dynattack.attacks import GradAuto
from dynattack.data import load_fashion_mnist
from dynattack.diagnostics import diagnose, json_safe
from dynattack.models import list_models

RESULTS = Path(__file__).parent / "results"
VICTIMS = ("skipnet38-ff-sp", "skipnet38-rnn-sp", "skipnet38-rnn-hrl", "dynconv20-fmnist", "sact20-fmnist",
           "manidp20-fmnist")


def manidp_structural(model) -> dict:
    """ManiDP channels provably never kept: threshold > 0, saliency bias below it and no positive
    fc2 weight from a hidden unit with some positive fc1 weight (inputs >= 0: a hidden unit with
    none is always 0). Also: mask blocks whose threshold is 0 keep every channel always."""
    from dynattack.models.manidp import MaskBlock

    never, always = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, MaskBlock):
            t = float(mod.thre)
            if t <= 0:
                always.append(name)
                continue
            alive = (mod.fc1.weight > 0).any(1)
            can_rise = ((mod.fc2.weight > 0) & alive[None]).any(1)
            dead = (~can_rise) & (mod.fc2.bias < t)
            if bool(dead.any()):
                never[f"{name}.gate"] = dead.detach()
    return {"never": never, "always_on_blocks": always}


def run_victim(name, x, args):
    model = create_model(name).eval()
    t0 = time.perf_counter()
    atk = GradAuto(model, steps=args.steps, keep_optimising_distortion=False, progress=False)
    res = atk(x)
    t_attack = time.perf_counter() - t0
    extra, struct_note = {}, ""
    unreachable = None
    if model.family == "manidp":
        s = manidp_structural(model)
        unreachable = s["never"] or None
        struct_note = (f"structural check (weights): {sum(int(m.sum()) for m in s['never'].values())} channels provably "
                       f"never kept; mask blocks with threshold 0 (every channel always kept): "
                       f"{', '.join(s['always_on_blocks']) or 'none'}")
    elif model.family == "sact":
        struct_note = ("structural check (definition): no unit is halted by construction; unit l >= 1 of a stage runs "
                       "where the cumulative halting c_l <= 1 - eps, and halting scores are sigmoids, so every "
                       "position of every unit can run for small enough scores: units never on are learned, "
                       "not structural")
    elif model.family == "skipnet":
        struct_note = "structural check (definition): every block's gate logit is a learned function of its input"
    elif model.family == "dynconv":
        struct_note = ("structural check (definition): every position's mask logit is a learned function of the "
                       "block input; a dilated position is on exactly when a mask position of its 3x3 window is")
    t1 = time.perf_counter()
    d = diagnose(model, x, res.adv, probe_steps=args.probe_steps, each_images=args.each_images,
                 unreachable=unreachable)
    t_diag = time.perf_counter() - t1
    if struct_note:
        d.notes.append(struct_note)
    f = d.flops
    return d, {
        "victim": name, "family": model.family, "n": len(x), "steps": args.steps,
        "recovery_attack_pct": res.recovery_pct,  # the attack's own figure (same FLOPs function)
        "recovery_full_pct": f["recovery_full"], "recovery_reachable_pct": f["recovery_reachable"],
        "kept_clean_pct": f["kept_clean_pct"], "reachable_pct_of_full": f["reachable_pct_of_full"],
        "unreachable_units": f["unreachable_units"], "units": f["units"],
        "unreachable_cost_pct": f["unreachable_cost_pct"],
        "all_on_end": d.together["natural_all_on_end"], "together_any": d.together["together_any"],
        "min_alone_logit_median": d.together["min_alone_logit_median"],
        "exhaustive": None if d.exhaustive is None else {k: v["summary"] for k, v in d.exhaustive.items()},
        "seconds_attack": t_attack, "seconds_diagnostics": t_diag,
    }


def summary_table(rows):
    out = ["| victim | compute kept (clean) | GradAuto recovery vs full | reachable maximum (% of full) | "
           "recovery vs reachable | units never on (any tried input) | their share of gated FLOPs | "
           "images all-on at end | images with all units on alone at once (any tried input) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['victim']} | {r['kept_clean_pct']:.1f} % | {r['recovery_full_pct']:.1f} % | "
                   f"{r['reachable_pct_of_full']:.1f} % | {r['recovery_reachable_pct']:.1f} % | "
                   f"{r['unreachable_units']} of {r['units']} | {r['unreachable_cost_pct']:.1f} % | "
                   f"{r['all_on_end']} of {r['n']} | {r['together_any']} of {r['n']} |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--probe-steps", type=int, default=50)
    ap.add_argument("--each-images", type=int, default=50)
    ap.add_argument("--victims", default=",".join(VICTIMS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="energy_diagnostics")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shipped = {m["name"] for m in list_models() if m["shipped"]}
    victims = [v for v in args.victims.split(",") if v]
    missing = [v for v in victims if v not in shipped]
    if missing:
        raise SystemExit(f"not shipped: {', '.join(missing)}")
    x, _ = load_fashion_mnist("test")
    x = x[: args.n]
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"
    head = [f"Fashion-MNIST test images 0-{args.n - 1}; GradAuto defaults, {args.steps} iterations, no minimum-norm "
            f"search after all-on (same FLOPs); probes {args.probe_steps} Adam steps each (lr 0.05, no distortion "
            f"limit), each-gate probe on images 0-{args.each_images - 1}; machine: {machine}.", ""]
    RESULTS.mkdir(exist_ok=True)
    rows, details, blob = [], [], {"machine": machine, "args": vars(args), "victims": {}}
    t_start = time.perf_counter()
    for name in victims:
        d, row = run_victim(name, x, args)
        rows.append(row)
        details.append(d.markdown(f"{name}: per-gate why-not table"))
        blob["victims"][name] = {"summary": row, "diagnostics": d.to_json()}
        print(summary_table([row])[-1], f"({row['seconds_attack']:.0f} s attack, {row['seconds_diagnostics']:.0f} s "
              f"diagnostics)", flush=True)
        blob["seconds_total"] = time.perf_counter() - t_start
        lines = head + ["### Recovery against the full network and against the reachable maximum", ""] + \
            summary_table(rows) + ["", f"Total {blob['seconds_total'] / 60:.1f} min.", ""] + details
        (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
        (RESULTS / f"{args.out}.json").write_text(json.dumps(json_safe(blob), indent=1) + "\n")
    print(f"wrote {RESULTS / (args.out + '.md')}")


if __name__ == "__main__":
    main()
