"""Reports of a run directory: ``report.html`` plus ``figures/*.png``, from the directory alone.

``write_report(run_dir)`` reads what the runner wrote (``config.json``, ``summary.json``,
``gates.json``, ``samples.jsonl``, ``adv/batch_*.safetensors`` and, when the first batch was
recorded, ``history.safetensors``) and never loads a model, an attack or a dataset.

Figures are drawn for the data that exist, whatever the attack:

==========================  =====================================================================
``flops.png``               mean FLOPs clean / adversarial / all gates on, and per-sample histograms
``latency.png``             batch-1 latency clean / adversarial / all gates on (summary; if measured)
``recovery_hist.png``       per-sample FLOPs recovery (samples whose clean run skipped something)
``gate_values.png``         per-gate value G over iterations with the threshold (history; GradAuto
                            paper, Fig. 1 analogue)
``cost_curves.png``         FLOPs and L2 distortion over iterations (history)
``attack_stats.png``        every other per-iteration statistic the attack recorded: losses,
                            gradient norms, the angle between g_C and g_F... (GradAuto Fig. 2)
``exec_rates.png``          execution rate per gate x class, clean vs adversarial vs difference
                            (LGM paper, Fig. 7 analogue)
``images.png``              clean / adversarial / amplified |adv - clean| for a few samples
``points.png``              the same for point clouds: 3D scatter before / after
==========================  =====================================================================

A part whose data are missing (a static victim has no gates; a run without history) is skipped
and the HTML says why. The HTML embeds nothing from the network: figures are relative
``figures/*.png`` links and the style sheet is inline, so it opens offline. Every file is written
to a temporary name and renamed.

Matplotlib is driven through ``Figure`` + the Agg canvas directly (no ``pyplot``), so drawing needs
no display and never changes the backend of the process that calls us (a notebook, the CLI).
"""
from __future__ import annotations

import datetime
import html
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import DynattackError
from .rundir import load_config, read_records, write_atomic

__all__ = ["write_report", "FIGURES"]

FIGURES = ("flops", "latency", "recovery_hist", "gate_values", "cost_curves", "attack_stats", "exec_rates",
           "images", "points")
DPI = 110
N_HISTORY_SAMPLES = 4  # samples drawn in the per-iteration figures
N_IMAGE_SAMPLES = 8  # samples in the image grid
N_TABLE_ROWS = 20  # rows of the per-sample table
HISTORY_FIXED = ("flops", "l2", "gate_value", "gate_on", "active", "index")
SAMPLE_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
BAR_COLORS = {"clean": "#4c72b0", "adversarial": "#c44e52", "all gates on": "#8c8c8c"}

# Summary rows: key -> (label, unit kind, meaning). Kinds: text, int, pct (fraction 0-1 shown in %),
# pct100 (already in %), mflops, db, ms, float, seconds.
SUMMARY_ROWS = {
    "victim": ("Victim", "text", "model attacked"),
    "attack": ("Attack", "text", "attack name"),
    "n": ("Samples", "int", "samples attacked"),
    "clean_acc": ("Clean accuracy", "pct", "top-1 on the clean inputs"),
    "adv_acc": ("Adversarial accuracy", "pct", "top-1 on the adversarial inputs"),
    "flops_full": ("FLOPs, all gates on", "mflops", "mean per sample, every unit executed"),
    "flops_clean": ("FLOPs, clean", "mflops", "mean per sample, hard gates"),
    "flops_adv": ("FLOPs, adversarial", "mflops", "mean per sample, hard gates"),
    "recovery_pct": ("Recovery (aggregate)", "pct100",
                     "(ΣF_adv − ΣF_clean) / (ΣF_full − ΣF_clean): share of the saved FLOPs won back"),
    "recovery_pct_mean": ("Recovery (mean per sample)", "pct100", "over samples whose clean run skipped work"),
    "psnr_db": ("PSNR", "db", "mean, images in [0, 1], MAX = 1"),
    "linf": ("L∞ distortion", "linf", "mean per sample"),
    "l2": ("L2 distortion", "float", "mean per sample"),
    "arch_change_pct": ("Architecture change", "pct100", "differing gate decisions over correctly classified samples"),
    "miou_clean": ("mIoU, clean", "float", "segmentation"),
    "miou_adv": ("mIoU, adversarial", "float", "segmentation"),
    "latency_clean_ms": ("Latency, clean", "ms", "batch 1, real conditional execution"),
    "latency_adv_ms": ("Latency, adversarial", "ms", "batch 1, real conditional execution"),
    "latency_full_ms": ("Latency, all gates on", "ms", "batch 1, every gate forced on"),
    "iterations_mean": ("Iterations", "float1", "mean attack iterations per sample"),
    "seconds": ("Wall time", "seconds", "whole run"),
}

# Axis labels of the per-iteration statistics attacks are known to record; others use their key.
STAT_LABELS = {
    "loss": "loss", "loss_c": "complexity loss L_C", "loss_f": "fidelity loss L_F", "mse": "MSE(x_adv, x)",
    "hinge": "hinge (gate) loss", "grad_norm": "‖g‖₂", "grad_norm_c": "‖g_C‖₂ (before rectification)",
    "grad_norm_f": "‖g_F‖₂", "grad_norm_rect": "‖g_R‖₂ (rectified)", "angle_cf": "angle(g_C, g_F) (degrees)",
    "cos_rect": "cos(g_R, g_F)", "g_c_norm": "‖g_C‖₂", "angle": "angle (degrees)", "cos": "cosine",
}


class _Skip(Exception):
    """A figure whose data do not exist in this run (said in the HTML, not an error)."""


@dataclass
class _Run:
    run_dir: Path
    config: dict
    summary: dict | None
    gates: list[str]
    taus: list[float | None] | None  # per gate, when gates.json gives them
    records: list[dict]
    history: dict[str, torch.Tensor] | None
    notes: list[str] = field(default_factory=list)

    def record(self, index: int) -> dict | None:
        return self._by_index.get(int(index))

    def __post_init__(self):
        self._by_index = {int(r["index"]): r for r in self.records}

    def value(self, key: str) -> float | None:
        """A summary figure (null / missing -> None)."""
        v = (self.summary or {}).get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    def column(self, key: str) -> np.ndarray:
        """One number per record (NaN where null or absent)."""
        out = [r.get(key) for r in self.records]
        return np.array([float(v) if isinstance(v, (int, float)) and v is not None else np.nan for v in out])

    def gate_matrix(self, key: str) -> np.ndarray | None:
        """(samples, gates) execution fractions from ``gates_clean`` / ``gates_adv``; None without gates."""
        rows = [r.get(key) for r in self.records]
        if not rows or any(not isinstance(v, list) for v in rows):
            return None
        lengths = {len(v) for v in rows}
        if len(lengths) != 1 or lengths == {0}:
            return None
        return np.array(rows, dtype=float)


# ----------------------------------------------------------------------------- reading


def _read_json(path: Path, required: bool):
    if not path.exists():
        if required:
            raise DynattackError(f"{path} is missing: not a run directory")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DynattackError(f"{path} is unreadable ({str(exc).splitlines()[0]}); rerun the run with --resume "
                             "to rewrite it") from None


def _load_run(run_dir: Path) -> _Run:
    if not run_dir.is_dir():
        raise DynattackError(f"{run_dir}: no such run directory")
    config = load_config(run_dir)
    if not isinstance(config, dict):
        raise DynattackError(f"{run_dir / 'config.json'} does not hold a run configuration")
    notes: list[str] = []
    summary = _read_json(run_dir / "summary.json", required=False)
    if summary is None:
        notes.append("summary.json is missing (the run has not finished): the figures use the finished batches.")
    elif not isinstance(summary, dict):
        raise DynattackError(f"{run_dir / 'summary.json'} does not hold a summary object")
    try:
        records = read_records(run_dir)
    except (OSError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise DynattackError(f"{run_dir / 'samples.jsonl'} is unreadable ({type(exc).__name__}: {exc})") from None
    if not records:
        notes.append("samples.jsonl holds no finished batch: no per-sample figure.")

    gates_json = _read_json(run_dir / "gates.json", required=False)
    gates, taus = [], None
    if isinstance(gates_json, list):
        for g in gates_json:  # names; entries may also be {"name": ..., "tau": ...}
            gates.append(str(g.get("name", "?")) if isinstance(g, dict) else str(g))
        if gates_json and all(isinstance(g, dict) and isinstance(g.get("tau"), (int, float)) for g in gates_json):
            taus = [float(g["tau"]) for g in gates_json]
    n_gates = max((len(r.get("gates_clean") or []) for r in records), default=0)
    if n_gates and len(gates) != n_gates:
        if gates_json is not None:
            notes.append(f"gates.json names {len(gates)} gates but the samples hold {n_gates}: gates are numbered.")
        gates, taus = [f"gate {i}" for i in range(n_gates)], None

    history = None
    path = run_dir / "history.safetensors"
    if path.exists():
        try:
            history = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            notes.append(f"history.safetensors is unreadable ({str(exc).splitlines()[0]}): no per-iteration figure.")
    return _Run(run_dir, config, summary, gates, taus, records, history, notes)


def _load_inputs(run: _Run, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, clean, adversarial) of the first ``k`` samples (lowest indices) of the shards."""
    shards = sorted((run.run_dir / "adv").glob("batch_*.safetensors"))
    if not shards:
        raise _Skip("no adversarial shard in adv/")
    idx, clean, adv = [], [], []
    for path in shards:
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _Skip(f"shard {path.name} is unreadable ({str(exc).splitlines()[0]})") from None
        if "clean" not in t or "adv" not in t:
            raise _Skip(f"shard {path.name} holds no 'clean' and 'adv' tensors")
        index = t.get("index", torch.arange(len(t["adv"])))
        idx.append(index.long())
        clean.append(t["clean"].float())
        adv.append(t["adv"].float())
        if sum(len(i) for i in idx) >= k:
            break  # shard b holds the samples after shard b-1's: no need to read a whole run for 8 pictures
    idx_t, clean_t, adv_t = torch.cat(idx), torch.cat(clean), torch.cat(adv)
    order = idx_t.argsort()[:k]
    return idx_t[order].numpy(), clean_t[order].numpy(), adv_t[order].numpy()


# ----------------------------------------------------------------------------- figures


def _new_figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def _mflops(v):
    return None if v is None else v / 1e6


def _bar(ax, labels, values, unit: str, fmt: str):
    colors = [BAR_COLORS.get(lbl, "#999999") for lbl in labels]
    bars = ax.bar(labels, values, color=colors, width=0.6)
    top = max(values) if values else 1.0
    for b, v in zip(bars, values):
        ax.annotate(fmt.format(v) + f" {unit}", (b.get_x() + b.get_width() / 2, v), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=10)
    ax.set_ylim(0, top * 1.18 if top > 0 else 1)
    ax.grid(axis="y", alpha=0.3)


def fig_flops(run: _Run) -> tuple[Figure, str]:
    means = {"clean": _mflops(run.value("flops_clean")), "adversarial": _mflops(run.value("flops_adv")),
             "all gates on": _mflops(run.value("flops_full"))}
    if run.records:  # a run without a summary yet: the finished samples
        for key, lbl in (("flops_clean", "clean"), ("flops_adv", "adversarial"), ("flops_full", "all gates on")):
            col = run.column(key)
            if means[lbl] is None and np.isfinite(col).any():
                means[lbl] = float(np.nanmean(col)) / 1e6
    means = {k: v for k, v in means.items() if v is not None}
    if not means:
        raise _Skip("no FLOPs figure in summary.json or samples.jsonl")
    fc, fa = run.column("flops_clean") / 1e6, run.column("flops_adv") / 1e6
    both = np.concatenate([fc[np.isfinite(fc)], fa[np.isfinite(fa)]])
    # a histogram only when the samples differ (a static victim runs the same FLOPs on every input)
    per_sample = len(both) > 0 and float(both.max() - both.min()) > 1e-9 * max(float(np.abs(both).max()), 1.0)
    fig = _new_figure(11, 3.8) if per_sample else _new_figure(5.5, 3.6)
    axes = fig.subplots(1, 2, width_ratios=[1, 1.6]) if per_sample else [fig.subplots()]
    ax = axes[0]
    _bar(ax, list(means), list(means.values()), "M", "{:.3g}")
    ax.set_ylabel("FLOPs per sample (M)")
    ax.set_title("Mean executed FLOPs")
    if per_sample:
        ax = axes[1]
        bins = np.linspace(float(both.min()), float(both.max()), 31)
        ax.hist(fc[np.isfinite(fc)], bins=bins, alpha=0.6, color=BAR_COLORS["clean"], label="clean")
        ax.hist(fa[np.isfinite(fa)], bins=bins, alpha=0.6, color=BAR_COLORS["adversarial"], label="adversarial")
        full = means.get("all gates on")
        if full is not None:
            ax.axvline(full, color="black", ls="--", lw=1.2, label=f"all gates on ({full:.3g} M)")
        ax.set_xlabel("executed FLOPs per sample (M)")
        ax.set_ylabel("samples")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"Per-sample FLOPs ({np.isfinite(fc).sum()} samples)")
        ax.legend(loc="best", fontsize=9)
        ax.grid(alpha=0.3)
    caption = "Executed FLOPs (hard gates) of the clean and adversarial inputs, against the all-on network."
    if not per_sample and len(both):
        caption += f" Every sample runs {both[0]:.4g} M FLOPs, clean or adversarial: no per-sample histogram."
    return fig, caption


def fig_latency(run: _Run) -> tuple[Figure, str]:
    vals = {"clean": run.value("latency_clean_ms"), "adversarial": run.value("latency_adv_ms"),
            "all gates on": run.value("latency_full_ms")}
    vals = {k: v for k, v in vals.items() if v is not None}
    if not vals:
        raise _Skip("latency was not measured (latency_*_ms are null in summary.json)")
    fig = _new_figure(5.5, 3.6)
    ax = fig.subplots()
    _bar(ax, list(vals), list(vals.values()), "ms", "{:.3g}")
    ax.set_ylabel("latency per sample (ms)")
    ax.set_title("Batch-1 latency, real conditional execution")
    caption = "Median wall time of one sample through the victim's conditional execution path"
    if "clean" in vals and "adversarial" in vals and vals["clean"] > 0:
        caption += f"; adversarial / clean = {vals['adversarial'] / vals['clean']:.2f}×"
    return fig, caption + "."


def fig_recovery(run: _Run) -> tuple[Figure, str]:
    rec = run.column("recovery") if run.records else np.array([])
    rec = rec[np.isfinite(rec)]
    if not len(rec):
        raise _Skip("no per-sample recovery (every clean sample already ran every unit, or no gates)")
    fig = _new_figure(7.5, 3.6)
    ax = fig.subplots()
    # the 0-100 % scale when the attack recovers much; the data's own range when it barely moves FLOPs
    lo = min(0.0, float(rec.min()))
    hi = max(100.0, float(rec.max())) if rec.max() >= 50 else float(rec.max()) + 0.05 * (float(rec.max()) - lo) + 1e-9
    ax.hist(rec, bins=np.linspace(lo, hi, 26), color=BAR_COLORS["adversarial"], alpha=0.8, edgecolor="white")
    for key, style, name in (("recovery_pct", "-", "aggregate"), ("recovery_pct_mean", ":", "mean per sample")):
        v = run.value(key)
        if v is not None:
            ax.axvline(v, color="black", ls=style, lw=1.5, label=f"{name}: {v:.1f} %")
    if run.summary is None:
        ax.axvline(float(rec.mean()), color="black", ls=":", lw=1.5, label=f"mean per sample: {rec.mean():.1f} %")
    ax.set_xlabel("recovery (% of the FLOPs the clean run saved, won back)")
    ax.set_ylabel("samples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Per-sample FLOPs recovery ({len(rec)} samples)")
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(alpha=0.3)
    return fig, ("Recovery of each sample whose clean run skipped computation: 100 % means every skipped unit "
                 "runs on the adversarial input, 0 % none, negative values mean fewer FLOPs than clean.")


def _history_samples(run: _Run) -> tuple[dict, list[int], np.ndarray]:
    h = run.history
    if h is None:
        raise _Skip("no history.safetensors (per-iteration history is recorded for the first batch only "
                    "when the attack ran with history)")
    active = h.get("active")
    if active is None or active.dim() != 2 or active.shape[0] == 0:
        raise _Skip("history.safetensors holds no iteration")
    active = active.bool().numpy()
    index = h["index"].long().numpy() if "index" in h else np.arange(active.shape[1])
    ran = active.sum(0)
    cols = [j for j in range(active.shape[1]) if ran[j] >= 2] or [j for j in range(active.shape[1]) if ran[j] >= 1]
    if not cols:
        raise _Skip("no sample of the recorded batch ran an iteration")
    return h, cols[:N_HISTORY_SAMPLES], index


def _infer_tau(gv: np.ndarray, go: np.ndarray) -> tuple[float | None, str]:
    """A common threshold τ bracketed by the history: G ≥ τ exactly where a one-unit gate is on."""
    ok = np.isfinite(gv) & np.isfinite(go)
    binary = ok & ((go == 0) | (go == 1))
    if not binary.any() or (ok & ~binary).any():
        return None, ""
    off, on = gv[binary & (go == 0)], gv[binary & (go == 1)]
    if not len(off) or not len(on):
        return None, ""
    lo, hi = float(off.max()), float(on.min())
    if lo >= hi:
        return None, ""
    tau = next((c for c in (0.5, 0.0) if lo < c <= hi), (lo + hi) / 2)
    return tau, (f"τ = {tau:g}, inferred from the history (a gate is off up to G = {lo:.4g} and on from "
                 f"G = {hi:.4g})")


def _short(names: list[str]) -> list[str]:
    """Gate names without their common dotted prefix ('gates.group1_layer1' -> 'group1_layer1')."""
    parts = [n.split(".") for n in names]
    k = 0
    while parts and all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
        k += 1
    return [".".join(p[k:]) for p in parts]


def fig_gate_values(run: _Run) -> tuple[Figure, str]:
    h, cols, index = _history_samples(run)
    gv = h.get("gate_value")
    if gv is None or gv.dim() != 3 or gv.shape[2] == 0:
        raise _Skip("the victim declares no gates (static network): no gate value to follow")
    gv = gv.double().numpy()
    go = h["gate_on"].double().numpy() if "gate_on" in h else None
    n_g = gv.shape[2]
    names = _short(run.gates) if len(run.gates) == n_g else [f"gate {i}" for i in range(n_g)]
    tau_note = ""
    if run.taus is not None and len(run.taus) == n_g:
        taus = run.taus
        tau_note = "thresholds τ from gates.json"
    else:
        tau, tau_note = _infer_tau(gv, go) if go is not None else (None, "")
        taus = [tau] * n_g
    cmap = matplotlib.colormaps["viridis" if n_g > 10 else "tab10"]
    colors = [cmap(i / max(n_g - 1, 1)) if n_g > 10 else cmap(i % 10) for i in range(n_g)]
    ncols = min(len(cols), 2)
    nrows = math.ceil(len(cols) / ncols)
    fig = _new_figure(12, 3.3 * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False, sharey=True)).ravel()
    t = np.arange(gv.shape[0])
    for ax, j in zip(axes, cols):
        for g in range(n_g):  # many gates: a colour bar instead of a legend entry each
            ax.plot(t, gv[:, j, g], color=colors[g], lw=1.4, label=names[g] if n_g <= 10 else "_nolegend_")
        uniq = sorted({x for x in taus if x is not None})
        for u in uniq:
            ax.axhline(u, color="black", ls="--", lw=1.2, label=f"threshold τ = {u:g}" if u == uniq[0] else None)
        if go is not None:
            all_on = np.nonzero(np.all(go[:, j] >= 1, axis=1))[0]
            if len(all_on):
                ax.axvline(all_on[0], color="#c44e52", ls=":", lw=1.5, label=f"all gates on (it. {all_on[0]})")
        r = run.record(index[j])
        extra = f", label {r['label']}" if r and r.get("label") is not None else ""
        ax.set_title(f"sample #{int(index[j])}{extra}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("gate value G (mean over units)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best", ncols=2 if n_g <= 10 else 1)
    for ax in axes[len(cols):]:
        ax.set_visible(False)
    if n_g > 10:
        sm = ScalarMappable(norm=Normalize(0, n_g - 1), cmap=cmap)
        cb = fig.colorbar(sm, ax=list(axes[:len(cols)]), shrink=0.9, pad=0.01)
        ticks = sorted(set(np.linspace(0, n_g - 1, min(n_g, 6)).round().astype(int)))
        cb.set_ticks(ticks)
        cb.set_ticklabels([names[i] for i in ticks])
        cb.set_label("gate (network order)")
    fig.suptitle("Gate values over the attack iterations", fontsize=13)
    caption = (f"Each line is one gate's value G (mean over its units) on the input of each iteration, for "
               f"{len(cols)} samples of the first batch; a unit runs when G ≥ τ. ")
    caption += tau_note + "." if tau_note else "The threshold τ is not recorded in this run: no threshold line."
    return fig, caption


def fig_cost_curves(run: _Run) -> tuple[Figure, str]:
    h, cols, index = _history_samples(run)
    keys = [k for k in ("flops", "l2") if k in h]
    if not keys:
        raise _Skip("history holds neither flops nor l2")
    fig = _new_figure(12, 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(keys), squeeze=False)).ravel()
    t = np.arange(h["active"].shape[0])
    for ax, key in zip(axes, keys):
        v = h[key].double().numpy()
        scale = 1e6 if key == "flops" else 1.0
        for c, j in enumerate(cols):
            ax.plot(t, v[:, j] / scale, color=SAMPLE_COLORS[c % len(SAMPLE_COLORS)], lw=1.5,
                    label=f"sample #{int(index[j])}")
        if key == "flops":
            r = run.record(index[cols[0]])
            full = r.get("flops_full") if r else None
            full = full if full is not None else run.value("flops_full")
            if full is not None:
                ax.axhline(full / 1e6, color="black", ls="--", lw=1.2, label=f"all gates on ({full / 1e6:.3g} M)")
            ax.set_ylabel("executed FLOPs (M)")
            ax.set_title("FLOPs of the iterate")
        else:
            ax.set_ylabel("L2 distance to the clean input")
            ax.set_title("Distortion of the iterate")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    return fig, "Executed FLOPs and L2 distortion of each iteration's input (hard gates), same samples as above."


def _extra_stats(h: dict) -> list[str]:
    T, B = h["active"].shape
    return [k for k in sorted(h) if k not in HISTORY_FIXED and h[k].dim() >= 2 and tuple(h[k].shape[:2]) == (T, B)
            and h[k].dtype != torch.bool]


def fig_attack_stats(run: _Run) -> tuple[Figure, str]:
    h, cols, index = _history_samples(run)
    keys = [k for k in _extra_stats(h) if np.isfinite(h[k][:, cols].double().numpy()).any()]
    if not keys:
        raise _Skip("the attack recorded no per-iteration statistic beyond FLOPs, L2 and gate values")
    ncols = min(len(keys), 3)
    nrows = math.ceil(len(keys) / ncols)
    fig = _new_figure(12, 3.0 * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    t = np.arange(h["active"].shape[0])
    for ax, key in zip(axes, keys):
        v = h[key].double()
        reduced = v.dim() > 2
        v = v.flatten(2).nanmean(2).numpy() if reduced else v.numpy()
        for c, j in enumerate(cols):
            ax.plot(t, v[:, j], color=SAMPLE_COLORS[c % len(SAMPLE_COLORS)], lw=1.4, label=f"#{int(index[j])}")
        sel = v[:, cols][np.isfinite(v[:, cols])]
        lo, hi = float(sel.min()), float(sel.max())
        if ("norm" in key or key.startswith("loss")) and lo > 0 and hi / lo > 100:
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
            if hi - lo <= 1e-6 * max(abs(hi), abs(lo), 1e-30):  # constant (e.g. ‖g_R‖ = K): a flat line
                pad = 0.05 * abs(hi) if hi != 0 else 1.0
                ax.set_ylim(lo - pad, hi + pad)
        title = key
        if "angle" in key:
            ax.axhline(90, color="black", ls="--", lw=1)
            title += " (dashed: 90°)"
        ax.set_title(title)
        ax.set_ylabel(STAT_LABELS.get(key, key) + (" (mean)" if reduced else ""))
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    handles = axes[0].get_legend_handles_labels()
    fig.legend(handles[0], [f"sample {lb}" for lb in handles[1]], loc="outside lower center", ncols=len(cols),
               fontsize=9)
    fig.suptitle("Attack statistics over the iterations", fontsize=13)
    return fig, ("Every per-iteration statistic the attack recorded (" + ", ".join(keys) + "), same samples; "
                 "gaps are iterations a sample did not run (stopped early).")


def fig_exec_rates(run: _Run) -> tuple[Figure, str]:
    gc, ga = run.gate_matrix("gates_clean"), run.gate_matrix("gates_adv")
    if gc is None or ga is None:
        raise _Skip("the victim declares no gates (static network): no execution rate")
    labels = run.column("label")
    if not np.isfinite(labels).any():
        raise _Skip("the samples hold no labels")
    classes = sorted({int(c) for c in labels[np.isfinite(labels)]})
    n_g = gc.shape[1]
    rate = {}
    for name, m in (("clean", gc), ("adv", ga)):
        rate[name] = np.stack([np.nanmean(m[labels == c], axis=0) for c in classes], axis=1)  # (gates, classes)
    diff = rate["adv"] - rate["clean"]
    names = _short(run.gates) if len(run.gates) == n_g else [f"gate {i}" for i in range(n_g)]
    height = min(max(3.2, 0.28 * n_g + 1.6), 16)
    fig = _new_figure(14, height)
    axes = fig.subplots(1, 3, sharey=True)
    annotate = n_g * len(classes) <= 120
    step = max(1, math.ceil(n_g / 40))
    for ax, (title, m, cmap, norm) in zip(axes, (
            ("clean", rate["clean"], "viridis", Normalize(0, 1)),
            ("adversarial", rate["adv"], "viridis", Normalize(0, 1)),
            ("adversarial − clean", diff, "RdBu_r", TwoSlopeNorm(0, -1, 1)))):
        im = ax.imshow(m, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(f"Execution rate, {title}")
        ax.set_xticks(range(len(classes)), [str(c) for c in classes])
        ax.set_xlabel("class (true label)")
        if annotate:
            for (i, k), val in np.ndenumerate(m):
                if np.isfinite(val):
                    dark = abs(val) > 0.6 if "−" in title else val < 0.6
                    ax.text(k, i, f"{val:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
        fig.colorbar(im, ax=ax, shrink=0.85, pad=0.02,
                     label="rate difference" if "−" in title else "fraction of units executed")
    axes[0].set_yticks(range(0, n_g, step), [names[i] for i in range(0, n_g, step)], fontsize=8)
    axes[0].set_ylabel("gate (network order)")
    counts = ", ".join(f"{c}: {int((labels == c).sum())}" for c in classes)
    return fig, ("Fraction of each gate's units executed, averaged over the samples of each true class (samples per "
                 f"class: {counts}); clean inputs, adversarial inputs, and their difference.")


def _to_display(x: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(C, H, W) -> an image for imshow: (H, W) grey or (H, W, 3) RGB."""
    if x.shape[0] == 3:
        return np.clip(x.transpose(1, 2, 0), 0, 1), None
    return np.clip(x[0], 0, 1), "gray"


def fig_images(run: _Run) -> tuple[Figure, str]:
    idx, clean, adv = _load_inputs(run, N_IMAGE_SAMPLES)
    if clean.ndim != 4:
        raise _Skip(f"inputs of shape {tuple(clean.shape[1:])} are not images (C, H, W)")
    k = len(idx)
    fig = _new_figure(max(1.55 * k + 1.2, 6), 5.6)
    axes = fig.subplots(3, k, squeeze=False)
    factors = []
    for c in range(k):
        r = run.record(idx[c]) or {}
        d = np.abs(adv[c] - clean[c])
        if clean.shape[1] == 3:
            amp_src = d
        else:
            amp_src = d[:1]  # grey view of the first channel
        peak = float(amp_src.max())
        factors.append(1 / peak if peak > 0 else 0.0)
        amp = amp_src / peak if peak > 0 else amp_src
        for row, (img, title) in enumerate((
                (clean[c], f"#{int(idx[c])}: y={r.get('label', '?')}\npred {r.get('clean_pred', '?')}"),
                (adv[c], f"pred {r.get('adv_pred', '?')}\n" + (f"PSNR {r['psnr']:.1f} dB" if r.get("psnr") is not None
                                                                else "PSNR ∞" if peak == 0 else "")),
                (amp, f"×{factors[-1]:.0f}" if peak > 0 else "no change"))):
            ax = axes[row, c]
            shown, cmap = _to_display(img)
            ax.imshow(shown, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=9)
    for row, name in enumerate(("clean", "adversarial", "|adv − clean|\namplified")):
        axes[row, 0].set_ylabel(name, fontsize=11)
    fig.suptitle("Clean, adversarial and amplified perturbation", fontsize=13)
    note = "" if clean.shape[1] in (1, 3) else f" Inputs have {clean.shape[1]} channels: the first is shown in grey."
    return fig, ("First samples of the run. Row 3: |adv − clean| scaled so its largest value is white (the factor "
                 "is above each picture)." + note)


def fig_points(run: _Run) -> tuple[Figure, str]:
    idx, clean, adv = _load_inputs(run, 3)
    if clean.ndim != 3:
        raise _Skip("inputs are not point clouds")
    if clean.shape[2] < 3 and clean.shape[1] >= 3:  # (B, 3, N) -> (B, N, 3)
        clean, adv = clean.transpose(0, 2, 1), adv.transpose(0, 2, 1)
    if clean.shape[2] < 3:
        raise _Skip(f"point clouds of shape {tuple(clean.shape[1:])} have fewer than 3 coordinates")
    k = len(idx)
    fig = _new_figure(12, 3.9 * k)
    for c in range(k):
        p, q = clean[c, :, :3], adv[c, :, :3]
        disp = np.linalg.norm(q - p, axis=1)
        r = run.record(idx[c]) or {}
        for col, (pts, title, colour) in enumerate((
                (p, f"#{int(idx[c])} clean (pred {r.get('clean_pred', '?')})", p[:, 2]),
                (q, f"adversarial (pred {r.get('adv_pred', '?')})", q[:, 2]),
                (q, "displacement |Δp| (m)", disp))):
            ax = fig.add_subplot(k, 3, 3 * c + col + 1, projection="3d")
            sc = ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], c=colour, s=2, cmap="viridis" if col < 2 else "magma")
            ax.set_box_aspect(None, zoom=0.82)  # room for the z label
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("x (m)")
            ax.set_ylabel("y (m)")
            ax.set_zlabel("z (m)")
            if col == 2:
                fig.colorbar(sc, ax=ax, shrink=0.6, pad=0.1, label="|Δp| (m)")
    fig.suptitle("Point clouds before and after the attack", fontsize=13)
    return fig, "First samples: clean cloud, adversarial cloud (coloured by height) and per-point displacement."


FIGURE_FUNCS = {
    "flops": fig_flops, "latency": fig_latency, "recovery_hist": fig_recovery, "gate_values": fig_gate_values,
    "cost_curves": fig_cost_curves, "attack_stats": fig_attack_stats, "exec_rates": fig_exec_rates,
    "images": fig_images, "points": fig_points,
}
SECTIONS = (
    ("Cost", ("flops", "latency", "recovery_hist")),
    ("The attack over its iterations (first batch)", ("gate_values", "cost_curves", "attack_stats")),
    ("Execution rates", ("exec_rates",)),
    ("Inputs", ("images", "points")),
)


# ----------------------------------------------------------------------------- HTML


def _fmt(kind: str, v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if kind == "text" or not isinstance(v, (int, float)) or isinstance(v, bool):
        return str(v)
    if kind == "int":
        return f"{int(v):,}"
    if kind == "pct":
        return f"{v * 100:.2f} %"
    if kind == "pct100":
        return f"{v:.2f} %"
    if kind == "mflops":
        return f"{v / 1e6:.3f} M"
    if kind == "db":
        return f"{v:.2f} dB"
    if kind == "ms":
        return f"{v:.3f} ms"
    if kind == "linf":
        return f"{v:.4f} ({v * 255:.2f}/255)"
    if kind == "seconds":
        return f"{v:.1f} s" if v < 120 else f"{v:.1f} s ({datetime.timedelta(seconds=round(v))})"
    if kind == "float1":
        return f"{v:.1f}"
    return f"{v:.4g}"


def _summary_table(run: _Run) -> str:
    if run.summary is None:
        return "<p class='note'>No summary.json yet: the run has not finished.</p>"
    rows = []
    keys = list(SUMMARY_ROWS) + [k for k in run.summary if k not in SUMMARY_ROWS]
    for key in keys:
        if key not in run.summary:
            continue
        label, kind, meaning = SUMMARY_ROWS.get(key, (key, "float", ""))
        v = run.summary[key]
        cls = " class='na'" if v is None else ""
        rows.append(f"<tr{cls}><th>{html.escape(label)}</th><td class='num' title='{html.escape(repr(v))}'>"
                    f"{html.escape(_fmt(kind, v))}</td><td class='meaning'>{html.escape(meaning)}"
                    f" <code>{html.escape(key)}</code></td></tr>")
    full, clean = run.value("flops_full"), run.value("flops_clean")
    if full and clean is not None:
        rows.append(f"<tr class='derived'><th>Clean FLOPs / all-on</th><td class='num'>{clean / full * 100:.1f} %</td>"
                    "<td class='meaning'>compute the victim keeps on clean inputs (derived)</td></tr>")
    if run.records:
        succ = [bool(r["success"]) for r in run.records if r.get("success") is not None]
        if succ:
            rows.append(f"<tr class='derived'><th>Attack goal reached</th><td class='num'>"
                        f"{sum(succ) / len(succ) * 100:.1f} %</td><td class='meaning'>samples whose goal "
                        f"(all gates on / misclassified) holds (from samples.jsonl, {len(succ)} samples)</td></tr>")
    return "<table class='summary'><thead><tr><th>Figure</th><th>Value</th><th>Meaning</th></tr></thead><tbody>" + \
        "".join(rows) + "</tbody></table>"


def _headline(run: _Run) -> str:
    cards = []
    for key in ("recovery_pct", "psnr_db", "clean_acc", "adv_acc", "latency_adv_ms"):
        v = run.value(key)
        if v is None:
            continue
        label, kind, _ = SUMMARY_ROWS[key]
        cards.append(f"<div class='card'><div class='big'>{html.escape(_fmt(kind, v))}</div>"
                     f"<div class='small'>{html.escape(label)}</div></div>")
    return f"<div class='cards'>{''.join(cards)}</div>" if cards else ""


def _config_table(config: dict) -> str:
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    cells = [f"<th>{html.escape(k)}</th><td><code>{html.escape(json.dumps(v))}</code></td>" for k, v in flat(config)]
    per_row = 3
    rows = "".join("<tr>" + "".join(cells[i:i + per_row]) + "</tr>" for i in range(0, len(cells), per_row))
    return f"<table class='config'><tbody>{rows}</tbody></table>"


def _sample_table(run: _Run) -> str:
    if not run.records:
        return "<p class='note'>No finished sample.</p>"
    cols = (("index", "#", "{}"), ("label", "label", "{}"), ("clean_pred", "clean pred", "{}"),
            ("adv_pred", "adv pred", "{}"), ("flops_clean", "FLOPs clean (M)", "mflops"),
            ("flops_adv", "FLOPs adv (M)", "mflops"), ("recovery", "recovery (%)", "{:.1f}"),
            ("psnr", "PSNR (dB)", "{:.2f}"), ("linf", "L∞", "{:.4f}"), ("l2", "L2", "{:.3f}"),
            ("iterations", "iterations", "{}"), ("units_changed", "units changed", "{}"), ("success", "goal", "{}"))
    head = "".join(f"<th>{html.escape(c[1])}</th>" for c in cols)
    body = []
    for r in run.records[:N_TABLE_ROWS]:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            if v is None:
                s = "∞" if key == "psnr" and r.get("l2") == 0 else "n/a"
            elif fmt == "mflops":
                s = f"{v / 1e6:.3f}"
            elif isinstance(v, bool):
                s = "yes" if v else "no"
            else:
                s = fmt.format(v)
            cells.append(f"<td class='num'>{html.escape(s)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p class='note'>First {N_TABLE_ROWS} of {len(run.records)} samples; all are in samples.jsonl.</p>" \
        if len(run.records) > N_TABLE_ROWS else ""
    return f"<table class='samples'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


CSS = """
html{background:#f5f6f8}
body{font-family:-apple-system,'Segoe UI','DejaVu Sans',Helvetica,Arial,sans-serif;margin:0;background:#f5f6f8;color:#222}
main{max-width:1240px;margin:0 auto;padding:24px 28px 48px;background:#fff}
h1{font-size:26px;margin:0 0 4px} h2{font-size:20px;border-bottom:2px solid #e3e6ea;padding-bottom:4px;margin-top:34px}
.sub{color:#666;margin:0 0 16px}
.cards{display:flex;gap:14px;flex-wrap:wrap;margin:16px 0}
.card{flex:1 1 150px;background:#f0f3f8;border-radius:8px;padding:12px 16px}
.card .big{font-size:24px;font-weight:600} .card .small{color:#555;font-size:13px}
table{border-collapse:collapse;font-size:14px;margin:8px 0}
th,td{padding:5px 10px;border-bottom:1px solid #e6e8eb;text-align:left;vertical-align:top}
table.summary th{white-space:nowrap} table.config td{padding-right:28px} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.meaning{color:#555;font-size:13px} tr.na td.num{color:#aaa} tr.derived th{font-style:italic}
table.samples th{font-size:12px;background:#f4f5f7} table.samples td{font-size:13px}
code{font-size:12px;color:#444}
figure{margin:18px 0 26px} figure img{max-width:100%;height:auto;border:1px solid #e3e6ea}
figcaption{color:#444;font-size:14px;margin-top:6px}
.note{color:#8a6d3b;background:#fcf8e3;border-left:4px solid #f0d87a;padding:6px 10px;font-size:14px}
details{margin:10px 0} pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:24px} @media(max-width:900px){.grid2{grid-template-columns:1fr}}
"""


def _html(run: _Run, figures: dict[str, str], skipped: dict[str, str]) -> str:
    cfg = run.config
    title = f"{cfg.get('attack', '?')} on {cfg.get('victim', '?')}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>dynattack report: {html.escape(title)}</title><style>{CSS}</style></head><body><main>",
             f"<h1>dynattack report: {html.escape(title)}</h1>",
             f"<p class='sub'>{html.escape(str(run.run_dir))} · {len(run.records)} finished samples · written "
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}</p>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in run.notes]
    parts += [_headline(run), "<h2>Summary</h2>", _summary_table(run)]
    parts += ["<h2>Configuration</h2>", _config_table(cfg)]
    if run.summary is not None:
        parts.append("<details><summary>summary.json</summary><pre>"
                     f"{html.escape(json.dumps(run.summary, indent=2))}</pre></details>")
    for section, names in SECTIONS:
        body = []
        for name in names:
            if name in figures:
                body.append(f"<figure id='{name}'><img src='figures/{name}.png' alt='{html.escape(name)}'>"
                            f"<figcaption>{html.escape(figures[name])}</figcaption></figure>")
        missing: dict[str, list[str]] = {}  # reason -> figures skipped for it
        for name in names:
            if name in skipped and not (name in ("images", "points") and {"images", "points"} & set(figures)):
                missing.setdefault(skipped[name], []).append(name)
        for reason, group in missing.items():
            listed = ", ".join(f"<code>{n}.png</code>" for n in group)
            body.append(f"<p class='note'>No {listed}: {html.escape(reason)}.</p>")
        if body:
            parts += [f"<h2>{html.escape(section)}</h2>", *body]
    parts += ["<h2>Samples</h2>", _sample_table(run)]
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- entry point


def write_report(run_dir) -> Path:
    """Write ``figures/*.png`` and ``report.html`` into ``run_dir``; return the report's path.

    Reads the run directory only (see the module docstring for the figures). Parts whose data are
    missing are skipped and named in the HTML; a figure that fails to draw is named there too (and
    warned about) rather than losing the whole report.

    Raises:
        DynattackError: the directory is missing, has no readable config.json, or one of its JSON
            files is unreadable; or a file cannot be written.
    """
    run_dir = Path(run_dir)
    run = _load_run(run_dir)
    fig_dir = run_dir / "figures"
    try:
        fig_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise DynattackError(f"cannot create {fig_dir}: {exc.strerror or exc}") from None
    figures: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, func in FIGURE_FUNCS.items():
        try:
            fig, caption = func(run)
            data = _png_bytes(fig)
        except _Skip as why:
            skipped[name] = str(why)
            continue
        except DynattackError:
            raise
        except Exception as exc:  # a drawing bug must not cost the run its report
            msg = f"drawing failed ({type(exc).__name__}: {exc})"
            warnings.warn(f"dynattack report: {name}.png {msg}", RuntimeWarning, stacklevel=2)
            skipped[name] = msg
            continue
        write_atomic(fig_dir / f"{name}.png", data)
        figures[name] = caption
    for name in FIGURES:  # a figure of an earlier report whose data are gone
        if name not in figures:
            (fig_dir / f"{name}.png").unlink(missing_ok=True)
    out = run_dir / "report.html"
    write_atomic(out, _html(run, figures, skipped))
    return out
