"""dynattack's FGM PGD against torchattacks' PGD on the same work, and what one I-FGSM / FGSM
iteration costs against one forward + backward of the same batch.

    .venv/bin/python bench/peer_speed.py [--victims resnet20-fmnist skipnet38-rnn-hrl] [--n 128]
        [--rounds 5] [--threads 1] [--steps 10] [--eps 8/255] [--alpha 2/255] [--random-start off|on|both]

torchattacks is an optional bench extra, installed WITHOUT its dependencies (it lists torchvision
and would pull another torch):

    .venv/bin/pip install --no-deps torchattacks==3.5.1 scipy

Its package imports scipy (for other attacks) but never torchvision, so no shim is needed; without
torchattacks the peer rows are skipped with a message and the iteration table is still measured.

Same victim, same first --n Fashion-MNIST test images, same eps / alpha / steps. Random start off
(the default): both attacks are then deterministic and run the same iterates (dynattack's PGD is
I-FGSM from the clean image); on: each draws its own start (dynattack from its seeded generator,
torchattacks from torch's global RNG), so only the accuracies compare. dynattack runs
``PGD(grad="fgm", keep="final")``: the final iterate, as torchattacks returns it.

What is timed, per round, in an order that alternates between rounds (the machine is shared;
figures are medians over rounds, ratios the median of the per-round ratios):

* dynattack ``PGD(...)(images, labels)``: the attack plus what it reports per sample (clean and
  adversarial predictions, executed FLOPs, distortion);
* torchattacks ``PGD(...)(images, labels)`` alone, and with the two no-grad forwards that give the
  clean and adversarial predictions the accuracies are computed from ("same work": what both report);
* one forward + backward (cross-entropy, gradient w.r.t. the images) and one no-grad forward;
* dynattack FGSM (one step) and, from the PGD time without random start, the marginal I-FGSM
  iteration ``(T_pgd - T_fgsm) / (steps - 1)``;
* apart from the rounds, one PGD call under ``torch.profiler``: the share of its CPU time spent
  outside the victim's forward and backward (:func:`own_share`).

Times are process CPU seconds (one thread: the work done; waiting for the shared cores is not),
wall seconds beside them. Each victim runs in a process of its own. Writes
bench/results/peer_speed.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dynattack.attacks import FGSM, PGD
from dynattack.data.images import load_fashion_mnist, pad_to
from dynattack.models import create_model

try:
    import torchattacks
except ImportError:  # optional bench extra
    torchattacks = None

PEER_MISSING = ("torchattacks not installed: peer rows skipped (install it with "
                "`.venv/bin/pip install --no-deps torchattacks==3.5.1 scipy`)")


def parse_fraction(text: str) -> float:
    num, _, den = text.partition("/")
    return float(num) / float(den) if den else float(text)


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def timed(fn):
    """``(result, cpu seconds, wall seconds)`` of one call."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.process_time() - c, time.perf_counter() - w


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def predict(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def measure(model, x, y, args, random_start: bool) -> dict:
    kw = dict(eps=args.eps, alpha=args.alpha, steps=args.steps)
    ours_atk = PGD(model, **kw, random_start=random_start, grad="fgm", keep="final", progress=False)
    fgsm_atk = FGSM(model, eps=args.eps, grad="fgm", progress=False)
    peer_atk = None if torchattacks is None else torchattacks.PGD(model, **kw, random_start=random_start)

    def fwd_bwd():
        leaf = x.clone().requires_grad_()
        return torch.autograd.grad(F.cross_entropy(model(leaf), y), leaf)

    jobs = {"ours": lambda: ours_atk(x, y)}
    if peer_atk is not None:  # next to ours in every round, whichever way the round runs
        jobs["peer"] = lambda: peer_atk(x, y)
    jobs.update({"fwd_bwd": fwd_bwd, "fwd": lambda: predict(model, x)})
    if not random_start:
        jobs["fgsm"] = lambda: fgsm_atk(x, y)
    for fn in jobs.values():  # warm-up: allocator, kernels, the cost profile
        fn()
    cpu = {k: [] for k in [*jobs, "peer_scored"]}
    wall = {k: [] for k in [*jobs, "peer_scored"]}
    last = {}
    names = list(jobs)
    for r in range(args.rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            last[k], c, w = timed(jobs[k])
            cpu[k].append(c)
            wall[k].append(w)
            if k == "peer":  # the clean and adversarial predictions both report, right after
                _, c2, w2 = timed(lambda: (predict(model, x), predict(model, last[k])))
                cpu["peer_scored"].append(c + c2)
                wall["peer_scored"].append(w + w2)
    if peer_atk is None:
        del cpu["peer_scored"], wall["peer_scored"]
    res = last["ours"]
    out = {"cpu": cpu, "wall": wall, "clean_acc": 100.0 * (res.clean_pred == y).float().mean().item(),
           "ours_acc": 100.0 * (res.adv_pred == y).float().mean().item(),
           "linf": res.linf.max().item()}
    if peer_atk is not None:
        torch.manual_seed(args.seed)
        adv_peer = peer_atk(x, y)
        pred_peer = predict(model, adv_peer)
        out["peer_acc"] = 100.0 * (pred_peer == y).float().mean().item()
        out["same_pred"] = 100.0 * (pred_peer == res.adv_pred).float().mean().item()
        out["max_diff"] = (adv_peer - res.adv).abs().max().item()
    return out


def own_share(model, x, y, args) -> tuple[float, float]:
    """``(victim ms, dynattack ms)``: self CPU time of one PGD call (random start off) under
    ``torch.profiler``, split into the victim's operators (inside its forward, or run by the
    autograd engine for its backward) and every other operator (the loss, the projection,
    predictions, FLOPs, distortion: what dynattack itself adds)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    atk = PGD(model, eps=args.eps, alpha=args.alpha, steps=args.steps, random_start=False, grad="fgm",
              keep="final", progress=False)
    forward = model.forward

    def marked(*a, **k):
        with record_function("victim_forward"):
            return forward(*a, **k)

    model.forward = marked
    try:
        atk(x, y)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            atk(x, y)
    finally:
        del model.forward  # back to the class's forward
    victim = own = 0.0
    for e in prof.events():
        p = e
        while p is not None and p.name != "victim_forward" and not p.name.startswith("autograd::engine"):
            p = p.cpu_parent
        if p is None:
            own += e.self_cpu_time_total
        else:
            victim += e.self_cpu_time_total
    return victim / 1e3, own / 1e3


def _victim_arg(argv: list[str], i: int) -> bool:
    """Whether ``argv[i]`` is ``--victims`` or one of its values."""
    start = max((j for j in range(i + 1) if argv[j] == "--victims"), default=None)
    return start is not None and all(not a.startswith("--") for a in argv[start + 1:i + 1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--victims", nargs="+", default=["resnet20-fmnist", "skipnet38-rnn-hrl"])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eps", type=parse_fraction, default=8 / 255)
    ap.add_argument("--alpha", type=parse_fraction, default=2 / 255)
    ap.add_argument("--random-start", choices=("off", "on", "both"), default="off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows-to", help=argparse.SUPPRESS)  # a child's table rows, as JSON
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the marginal iteration needs two step counts)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if torchattacks is None:
        print(PEER_MISSING)
    images, labels = load_fashion_mnist("test")
    images, labels = images[:args.n], labels[:args.n]
    starts = {"off": [False], "on": [True], "both": [False, True]}[args.random_start]

    peer_rows, iter_rows, own_rows = [], [], []
    if len(args.victims) > 1:
        # One process per victim: after another victim's runs in the same process, dynattack's
        # and a bare forward + backward's CPU time rose by ~9% on SkipNet, torchattacks' did not.
        for name in args.victims:
            with tempfile.TemporaryDirectory() as tmp:
                rows = Path(tmp) / "rows.json"
                argv = [a for i, a in enumerate(sys.argv[1:]) if not _victim_arg(sys.argv[1:], i)]
                subprocess.run([sys.executable, __file__, *argv, "--victims", name, "--rows-to", str(rows)],
                               check=True)
                got = json.loads(rows.read_text())
            peer_rows += got["peer"]
            iter_rows += got["iter"]
            own_rows += got["own"]
    for name in args.victims if len(args.victims) == 1 else []:
        model = create_model(name)
        side = model.input_shape[-1]
        x = images if images.shape[-1] == side else pad_to(images, side)
        for rs in starts:
            print(f"{name}, random start {'on' if rs else 'off'}: {args.rounds} rounds ...", flush=True)
            m = measure(model, x, labels, args, rs)
            cpu, wall = m["cpu"], m["wall"]
            med = {k: statistics.median(v) for k, v in cpu.items()}
            medw = {k: statistics.median(v) for k, v in wall.items()}
            start = "on" if rs else "off"
            if "peer" in cpu:
                peer_rows.append(
                    f"| {name} | {start} | {med['ours']:.2f} ({medw['ours']:.2f}) | {med['peer']:.2f} ({medw['peer']:.2f}) "
                    f"| {med['peer_scored']:.2f} ({medw['peer_scored']:.2f}) "
                    f"| **{median_ratio(cpu['ours'], cpu['peer_scored']):.3f}x** ({median_ratio(wall['ours'], wall['peer_scored']):.3f}x) "
                    f"| {median_ratio(cpu['ours'], cpu['peer']):.3f}x ({median_ratio(wall['ours'], wall['peer']):.3f}x) "
                    f"| {m['clean_acc']:.1f} | {m['ours_acc']:.1f} | {m['peer_acc']:.1f} | {m['same_pred']:.1f} "
                    f"| {m['max_diff'] * 255:.3g} |")
                print(peer_rows[-1])
            if not rs:
                fb, fw = med["fwd_bwd"], med["fwd"]
                it = (med["ours"] - med["fgsm"]) / (args.steps - 1)
                iter_rows.append(
                    f"| {name} | {1e3 * fb:.1f} | {1e3 * fw:.1f} | {1e3 * it:.1f} ({it / fb:.3f}x) "
                    f"| {1e3 * med['fgsm']:.1f} ({med['fgsm'] / fb:.3f}x; {med['fgsm'] / (fb + fw):.3f}x of fwd+bwd + fwd) "
                    f"| {1e3 * med['ours']:.0f} ({med['ours'] / (args.steps * fb + fw):.3f}x of {args.steps} fwd+bwd + fwd) |")
                print(iter_rows[-1])
                vic_ms, own_ms = own_share(model, x, labels, args)
                own_rows.append(f"| {name} | {vic_ms:.0f} | {own_ms:.1f} | {100 * own_ms / (vic_ms + own_ms):.2f} % |")
                print(own_rows[-1])
    if args.rows_to:
        Path(args.rows_to).write_text(json.dumps({"peer": peer_rows, "iter": iter_rows, "own": own_rows}))
        return 0

    eps255, alpha255 = args.eps * 255, args.alpha * 255
    lines = [
        f"PGD, eps {eps255:.3g}/255, alpha {alpha255:.3g}/255, {args.steps} steps, the first {args.n} Fashion-MNIST "
        f"test images as one batch; dynattack `PGD(grad=\"fgm\", keep=\"final\")` vs torchattacks "
        f"{getattr(torchattacks, '__version__', '(not installed)')} `PGD`. Machine: {machine()}. "
        f"Process CPU seconds, median of {args.rounds} interleaved rounds (wall seconds in brackets); ratios are "
        f"medians of the per-round ratios.",
        "",
    ]
    if peer_rows:
        lines += [
            "\"Same work\": torchattacks' attack plus the two no-grad forwards that give the clean and the "
            "adversarial predictions both accuracies of the table are computed from (dynattack returns them, with "
            "the executed FLOPs and distortion of every sample; without random start it takes the clean "
            "predictions from its first iterate's forward, which is the clean forward). Random start off: both run "
            "the same iterates (the images may differ by float32 rounding of the projection: dynattack's is exact, "
            "|x_adv - x| <= eps with no tolerance).",
            "",
            "| victim | random start | dynattack s | torchattacks s | torchattacks + clean & adv predictions s "
            "| ratio (same work) | ratio (attack alone) | clean acc % | adv acc % dynattack | adv acc % torchattacks "
            "| same adv prediction % | max pixel diff (/255) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *peer_rows,
            "",
        ]
    else:
        lines += [PEER_MISSING, ""]
    lines += [
        "One iteration against one forward + backward of the same batch (cross-entropy, gradient w.r.t. the "
        "images), random start off: the I-FGSM iteration is the marginal one, (T_PGD - T_FGSM) / (steps - 1); "
        "FGSM is one call (its one step and the evaluation of its result: one forward + backward and one forward).",
        "",
        "| victim | fwd+bwd ms | fwd ms | I-FGSM iteration ms | FGSM call ms | PGD call ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *iter_rows,
        "",
        "Where the time goes: self CPU time of one PGD call (random start off) under torch.profiler, the victim's "
        "operators (its forward, and its backward run by the autograd engine) against every other operator "
        "(loss, sign step, projection, predictions, FLOPs, distortion: dynattack's own work).",
        "",
        "| victim | victim ms | dynattack's own ms | own share |",
        "| --- | ---: | ---: | ---: |",
        *own_rows,
        "",
        f"Command: `.venv/bin/python bench/peer_speed.py --victims {' '.join(args.victims)} --n {args.n} "
        f"--rounds {args.rounds} --threads {args.threads} --steps {args.steps} --eps {eps255:g}/255 "
        f"--alpha {alpha255:g}/255 --random-start {args.random_start}`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).resolve().parent / "results" / "peer_speed.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("# Speed against torchattacks\n\n" + text)
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
