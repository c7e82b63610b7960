"""Budget sweeps: one attack at several ``eps`` in one call (foolbox's multi-epsilon runs).

``dynattack sweep --victim V --attack energy-pgd --eps 1/255,2/255,4/255,8/255,16/255 --n 50 --out DIR``
writes, under ``DIR``:

- ``sweep_config.json`` (first: the directory is a sweep now) the victim, attack, data slice and
  budgets; ``--resume`` refuses a directory of another sweep;
- one ordinary run directory per budget, ``DIR/eps_<budget>`` (``eps_8-255`` for 8/255, ``eps_0.02m``
  for 0.02 m on point clouds), with its config.json (``params.eps`` is the budget), samples.jsonl,
  adv/, summary.json (the DESIGN.md keys), report.html; each is the run ``dynattack attack ... --eps E``
  would write (same config, same records);
- ``sweep.json``: per budget, in increasing order, recovery %, all-on %, mean L2, Linf, PSNR,
  accuracy (mIoU on point clouds) and executed FLOPs, read from that run's summary;
- ``sweep.png``: recovery (and all-on %) against eps.

Any attack with an ``eps`` parameter sweeps (energy-pgd, pc-gradauto in metres, the accuracy
attacks); GradAuto and ILFO search the least distorted input with no budget and are refused.
Images: every budget in (0, 1]; point clouds: metres, > 0. A killed sweep continues with
``--resume``: finished budgets are read back, the unfinished one resumes through the runner's own
resume (finished batches are not redone).
"""
from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

from .errors import DynattackError
from .rundir import RunConfig, _replace_from_tmp, load_config, make_dirs, output_dir, read_records, write_atomic

SWEEP_CONFIG = "sweep_config.json"


def attack_takes_eps(name: str) -> bool:
    """Whether the registered attack ``name`` has an ``eps`` parameter (unknown name: error)."""
    from .attacks import ATTACKS

    if name not in ATTACKS:
        raise DynattackError(f"unknown attack {name!r}; known attacks: {', '.join(sorted(ATTACKS))}")
    return any("eps" in inspect.signature(k.__init__).parameters
               for k in ATTACKS[name].__mro__ if "__init__" in vars(k))


def check_budgets(values: list, points: bool) -> list[float]:
    """The budgets, checked (numbers, finite, > 0, <= 1 for images, distinct) and sorted."""
    if not values:
        raise DynattackError("--eps needs at least one budget, e.g. --eps 1/255,2/255,4/255,8/255,16/255")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DynattackError(f"--eps: {v!r} is not a number (write budgets like 8/255 or 0.031, comma-separated)")
        if v <= 0:
            raise DynattackError(f"--eps: every budget must be > 0, got {v:g}")
        if not points and v > 1:
            raise DynattackError(f"--eps: a budget for images in [0, 1] must be in (0, 1] (write 8/255 for eight "
                                 f"intensity levels), got {v:g}")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise DynattackError(f"--eps: a budget is given twice ({', '.join(f'{v:g}' for v in values)})")
    out.sort()
    names = [budget_name(v, points) for v in out]
    if len(set(names)) != len(names):
        raise DynattackError("--eps: two budgets are too close to tell apart (they would share a run directory)")
    return out


def budget_name(eps: float, points: bool) -> str:
    """Run directory name of a budget: ``eps_8-255`` (a whole number of intensity levels),
    ``eps_0.0123`` otherwise, ``eps_0.02m`` in metres."""
    if points:
        return f"eps_{eps:.6g}m"
    levels = eps * 255
    if abs(levels - round(levels)) < 1e-9 and round(levels) >= 1:
        return f"eps_{round(levels)}-255"
    return f"eps_{eps:.6g}"


def _check_sweep_dir(out: Path, resume: bool, record: dict | None) -> None:
    """A directory holding a sweep continues only with --resume and the same sweep (``record``; None:
    not checked yet); one holding anything else is never written into."""
    path = out / SWEEP_CONFIG
    if path.exists():
        if not resume:
            raise DynattackError(f"{out} already holds a sweep: pass --resume to continue it, or choose another --out")
        if record is not None:
            try:
                old = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                raise DynattackError(f"{path} is unreadable: choose another --out") from None
            if old != record:
                raise DynattackError(f"--resume: {out} holds another sweep (see its {SWEEP_CONFIG})")
    elif out.is_dir() and any(not (p.name.startswith(".") and p.name.endswith(".tmp")) for p in out.iterdir()):
        raise DynattackError(f"--out {out} is not empty and holds no sweep: choose another --out")


def run_sweep(*, victim, attack, budgets: list, params, out, n, offset, batch_size, seed, resume, latency_n,
              weights, data, device, progress, dataset: str | None = None, threads: int | None = None) -> dict:
    """`dynattack sweep`: ``attack`` at every budget, one run directory each, then sweep.json and
    sweep.png. Everything is checked before anything is written."""
    import os

    import torch

    from .data.point_batch import POINT_DATASETS
    from .models import get_spec
    from .runner import _load_victim_and_data, _split, build_attack, finish_run, run_attack

    out = output_dir(out)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise DynattackError("dynattack sweep runs in one process: use `dynattack attack` under torchrun, one --eps each")
    if n <= 0 or offset < 0 or batch_size <= 0:
        raise DynattackError("--n and --batch-size must be > 0 and --offset >= 0")
    if not attack_takes_eps(attack):
        raise DynattackError(f"{attack} takes no eps (it searches the least distorted input, with no budget): "
                             "sweep an attack with a budget, e.g. energy-pgd")
    if "eps" in params:
        raise DynattackError("give the budgets with --eps, not --param eps")
    dataset = dataset or get_spec(victim).dataset
    points = dataset in POINT_DATASETS
    budgets = check_budgets(list(budgets), points)
    _check_sweep_dir(out, resume, None)  # fail fast, before the victim and the data are loaded
    if threads is not None:
        torch.set_num_threads(threads)
    model, images, labels = _load_victim_and_data(victim, weights, data, device, dataset, count=offset + n)
    if offset + n > len(images):
        raise DynattackError(f"--offset {offset} + --n {n} exceeds the {len(images)} test images")
    runs = []
    for eps in budgets:  # every parameter checked for every budget before anything is written
        atk = build_attack(attack, model, {**params, "eps": eps}, progress)
        config = RunConfig(victim=victim, attack=attack, params=atk.params(), dataset=dataset, offset=offset, n=n,
                           batch_size=batch_size, seed=seed, weights=str(weights) if weights else None,
                           split=_split(dataset))
        runs.append((eps, budget_name(eps, points), atk, config))
    record = {"victim": victim, "attack": attack, "eps": budgets, "eps_unit": "metres" if points else "[0, 1]",
              "params": params, "dataset": dataset, "offset": offset, "n": n, "batch_size": batch_size, "seed": seed,
              "weights": str(weights) if weights else None}
    _check_sweep_dir(out, resume, record)
    for _, name, _, config in runs:  # a budget's directory must hold this very run, if anything
        run_dir = out / name
        if (run_dir / "config.json").exists() and load_config(run_dir) != config.to_json():
            raise DynattackError(f"--resume: {run_dir} was written by another configuration (see its config.json)")
    make_dirs(out)
    if not (out / SWEEP_CONFIG).exists():
        write_atomic(out / SWEEP_CONFIG, json.dumps(record, indent=2) + "\n")

    entries = []
    for eps, name, atk, config in runs:
        run_dir = out / name
        summary = _finished_summary(run_dir, n)
        if summary is None:
            run_attack(model, atk, config, images, labels, run_dir, resume=True, progress=progress)
            summary = finish_run(model, run_dir, images, latency_n)
        entries.append(_entry(eps, name, summary, read_records(run_dir)))
    result = {"victim": victim, "attack": attack, "eps_unit": record["eps_unit"], "n": n, "params": params,
              "sweep": entries}
    write_atomic(out / "sweep.json", json.dumps(result, indent=2) + "\n")
    plot_sweep(result, out / "sweep.png")
    return result


def _finished_summary(run_dir: Path, n: int) -> dict | None:
    """The summary of a budget's run that finished (all ``n`` samples, summary written), else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary if len(read_records(run_dir)) == n and summary.get("n") == n else None


def _entry(eps: float, name: str, summary: dict, records: list[dict]) -> dict:
    success = [bool(r["success"]) for r in records]
    keys = ("recovery_pct", "recovery_pct_mean", "l2", "linf", "psnr_db", "clean_acc", "adv_acc", "miou_clean",
            "miou_adv", "flops_clean", "flops_adv", "flops_full", "flops_increase_pct")
    # success is every costed unit on for an energy attack, the attack's goal otherwise
    return {"eps": eps, "run": name, "n": summary["n"],
            "success_pct": 100.0 * sum(success) / len(success) if success else None,
            **{k: summary.get(k) for k in keys}}


def plot_sweep(result: dict, path: Path) -> None:
    """Recovery (and the share of samples the attack fully succeeded on) against eps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = result["eps_unit"] == "metres"
    xs = [e["eps"] if points else e["eps"] * 255 for e in result["sweep"]]
    fig = Figure(figsize=(5, 3.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rec = [math.nan if e["recovery_pct"] is None else e["recovery_pct"] for e in result["sweep"]]
    ax.plot(xs, rec, "o-", label="recovery of the saved FLOPs")
    ax.plot(xs, [math.nan if e["success_pct"] is None else e["success_pct"] for e in result["sweep"]], "s--",
            label="samples fully attacked (energy: all on)")
    if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 4:
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.set_xlabel("eps (metres)" if points else "eps (/255)")
    ax.set_ylabel("%")
    ax.set_title(f"{result['attack']} on {result['victim']}, n = {result['n']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _replace_from_tmp(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
