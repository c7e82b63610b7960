"""What counting FLOPs costs: ``cost.executed_flops`` on the trace of a batch of 256 against the
traced forward of that batch (no gradient, hard gates), on zoo victims and on the small networks
of ``examples/`` (nested exits, channel-to-channel products, sub-batch exit).

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
    import channel_gates
    import early_exit
    import subbatch_early_exit

    nets = {}
    for name, module, cls in (("example: early exit (nested)", early_exit, early_exit.EarlyExitNet),
                              ("example: channel gates (products)", channel_gates, channel_gates.ChannelGatedNet),
                              ("example: sub-batch early exit", subbatch_early_exit,
                               subbatch_early_exit.BatchedEarlyExitNet)):
        model = cls().eval()
        model.fit_thresholds(torch.rand((64, *model.input_shape), generator=torch.Generator().manual_seed(0)))
        cost.calibrate(model, model.input_shape)
        nets[name] = model
    return nets


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
             f"`.venv/bin/python bench/cost_speed.py --batch {args.batch}` on {platform.machine()}, "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; medians.", "",
             "| network | forward (ms) | executed_flops (ms) | ratio (%) |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {n} | {f:.2f} | {c:.3f} | {r:.2f} |" for n, f, c, r in rows]
    out = ROOT / "bench" / "results" / "cost_speed.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
