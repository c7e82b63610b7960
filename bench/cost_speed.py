"""What counting FLOPs costs: ``cost.executed_flops`` on the trace of a batch of 256 against the
traced forward of that batch (no gradient, hard gates), on zoo victims and on the small networks
of ``examples/`` (nested exits, channel-to-channel products, sub-batch exit, top-k routing,
token halting).

    .venv/bin/python bench/cost_speed.py [--batch 256] [--repeats 5] [--victims NAME ...]

Prints, per network, the median forward time, the median ``executed_flops`` time and their ratio
(issue 15 asks for < 5 %), and writes bench/results/cost_speed.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from dynattack import cost  # noqa: E402
from dynattack.gates import Trace  # noqa: E402
from dynattack.models import create_model  # noqa: E402

ZOO = ["manidp20-fmnist", "dynconv20-fmnist", "sact20-fmnist", "skipnet38-rnn-hrl"]


def examples() -> dict:
    """The examples' networks as their ``main`` builds them (thresholds fitted on 64 images)."""
    import importlib

    nets = {}
    for name, module in (("example: early exit (nested)", "early_exit"),
                         ("example: channel gates (products)", "channel_gates"),
                         ("example: sub-batch early exit", "subbatch_early_exit"),
                         ("example: top-2 routing", "moe_topk"),
                         ("example: token halting (quadratic)", "token_halting")):
        nets[name] = importlib.import_module(module).main(n=64, attacks=False)["model"]
    return nets


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, batch: int, repeats: int) -> tuple[float, float]:
    x = torch.rand((batch, *model.input_shape), generator=torch.Generator().manual_seed(1))
    state = {}

    def forward():
        with torch.no_grad(), Trace() as trace:
            model(x)
        state["trace"] = trace

    forward()  # warm up, and the trace to count
    cost.executed_flops(model, state["trace"])
    t_fwd = timed(forward, repeats)
    with torch.no_grad():
        t_cost = timed(lambda: cost.executed_flops(model, state["trace"]), repeats * 4)
    return t_fwd, t_cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--victims", nargs="*", default=ZOO)
    args = ap.parse_args()
    nets = {name: create_model(name) for name in args.victims}
    nets.update(examples())
    rows = []
    for name, model in nets.items():
        t_fwd, t_cost = measure(model, args.batch, args.repeats)
        rows.append((name, t_fwd * 1e3, t_cost * 1e3, 100 * t_cost / t_fwd))
        print(f"{name:36s} forward {t_fwd * 1e3:9.2f} ms  executed_flops {t_cost * 1e3:7.3f} ms  "
              f"{100 * t_cost / t_fwd:6.2f} %", flush=True)
    lines = [f"# executed_flops vs one forward, batch {args.batch}", "",
             f"`.venv/bin/python bench/cost_speed.py --batch {args.batch} --repeats {args.repeats}` on {cpu_name()}, "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; medians.", "",
             "| network | forward (ms) | executed_flops (ms) | ratio (%) |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {n} | {f:.2f} | {c:.3f} | {r:.2f} |" for n, f, c, r in rows]
    out = ROOT / "bench" / "results" / "cost_speed.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
