"""The report's figures, ``figures/*.png``, each drawn from a loaded :class:`~.run.Run` alone.

Matplotlib is driven through ``Figure`` + the Agg canvas directly (no ``pyplot``), so drawing needs
no display and never changes the backend of the process that calls us (a notebook, the CLI).
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import DynattackError
from ..rundir import write_atomic
from .run import Run, Skip, load_inputs

DPI = 110
N_HISTORY_SAMPLES = 4  # samples drawn in the per-iteration figures
N_IMAGE_SAMPLES = 8  # samples in the image grid
HISTORY_FIXED = ("flops", "l2", "gate_value", "gate_on", "active", "index")
SAMPLE_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
BAR_COLORS = {"clean": "#4c72b0", "adversarial": "#c44e52", "all gates on": "#8c8c8c"}

# Axis labels of the per-iteration statistics attacks are known to record; others use their key.
STAT_LABELS = {
    "loss": "loss", "loss_c": "complexity loss L_C", "loss_f": "fidelity loss L_F", "mse": "MSE(x_adv, x)",
    "hinge": "hinge (gate) loss", "grad_norm": "‖g‖₂", "grad_norm_c": "‖g_C‖₂ (before rectification)",
    "grad_norm_f": "‖g_F‖₂", "grad_norm_rect": "‖g_R‖₂ (rectified)", "angle_cf": "angle(g_C, g_F) (degrees)",
    "cos_rect": "cos(g_R, g_F)", "g_c_norm": "‖g_C‖₂", "angle": "angle (degrees)", "cos": "cosine",
}



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


def fig_flops(run: Run) -> tuple[Figure, str]:
    means = {"clean": _mflops(run.value("flops_clean")), "adversarial": _mflops(run.value("flops_adv")),
             "all gates on": _mflops(run.value("flops_full"))}
    if run.records:  # a run without a summary yet: the finished samples
        for key, lbl in (("flops_clean", "clean"), ("flops_adv", "adversarial"), ("flops_full", "all gates on")):
            col = run.column(key)
            if means[lbl] is None and np.isfinite(col).any():
                means[lbl] = float(np.nanmean(col)) / 1e6
    means = {k: v for k, v in means.items() if v is not None}
    if not means:
        raise Skip("no FLOPs figure in summary.json or samples.jsonl")
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


def fig_latency(run: Run) -> tuple[Figure, str]:
    vals = {"clean": run.value("latency_clean_ms"), "adversarial": run.value("latency_adv_ms"),
            "all gates on": run.value("latency_full_ms")}
    vals = {k: v for k, v in vals.items() if v is not None}
    if not vals:
        raise Skip("latency was not measured (latency_*_ms are null in summary.json)")
    fig = _new_figure(5.5, 3.6)
    ax = fig.subplots()
    _bar(ax, list(vals), list(vals.values()), "ms", "{:.3g}")
    ax.set_ylabel("latency per sample (ms)")
    ax.set_title("Batch-1 latency, real conditional execution")
    caption = "Median wall time of one sample through the victim's conditional execution path"
    if "clean" in vals and "adversarial" in vals and vals["clean"] > 0:
        caption += f"; adversarial / clean = {vals['adversarial'] / vals['clean']:.2f}×"
    return fig, caption + "."


def fig_recovery(run: Run) -> tuple[Figure, str]:
    rec = run.column("recovery") if run.records else np.array([])
    rec = rec[np.isfinite(rec)]
    if not len(rec):
        raise Skip("no per-sample recovery (every clean sample already ran every unit, or no gates)")
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
    if ax.get_legend_handles_labels()[0]:  # summary.json may give no recovery figure (null)
        ax.legend(loc="upper left", fontsize=9)
    ax.grid(alpha=0.3)
    return fig, ("Recovery of each sample whose clean run skipped computation: 100 % means every skipped unit "
                 "runs on the adversarial input, 0 % none, negative values mean fewer FLOPs than clean.")


def _history_samples(run: Run) -> tuple[dict, list[int], np.ndarray]:
    h = run.history
    if h is None:
        raise Skip("no history.safetensors (per-iteration history is recorded for the first batch only "
                    "when the attack ran with history)")
    active = h.get("active")
    if active is None or active.dim() != 2 or active.shape[0] == 0:
        raise Skip("history.safetensors holds no iteration")
    active = active.bool().numpy()
    index = h["index"].long().numpy() if "index" in h else np.arange(active.shape[1])
    ran = active.sum(0)
    cols = [j for j in range(active.shape[1]) if ran[j] >= 2] or [j for j in range(active.shape[1]) if ran[j] >= 1]
    if not cols:
        raise Skip("no sample of the recorded batch ran an iteration")
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


def fig_gate_values(run: Run) -> tuple[Figure, str]:
    h, cols, index = _history_samples(run)
    gv = h.get("gate_value")
    if gv is None or gv.dim() != 3 or gv.shape[2] == 0:
        raise Skip("the victim declares no gates (static network): no gate value to follow")
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


def fig_cost_curves(run: Run) -> tuple[Figure, str]:
    h, cols, index = _history_samples(run)
    keys = [k for k in ("flops", "l2") if k in h]
    if not keys:
        raise Skip("history holds neither flops nor l2")
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


def fig_attack_stats(run: Run) -> tuple[Figure, str]:
    h, cols, index = _history_samples(run)
    keys = [k for k in _extra_stats(h) if np.isfinite(h[k][:, cols].double().numpy()).any()]
    if not keys:
        raise Skip("the attack recorded no per-iteration statistic beyond FLOPs, L2 and gate values")
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


def fig_exec_rates(run: Run) -> tuple[Figure, str]:
    gc, ga = run.gate_matrix("gates_clean"), run.gate_matrix("gates_adv")
    if gc is None or ga is None:
        if not run.gates:
            raise Skip("the victim declares no gates (static network): no execution rate")
        raise Skip("samples.jsonl holds no per-gate execution (gates_clean / gates_adv): no execution rate")
    labels = run.column("label")
    if not np.isfinite(labels).any():
        raise Skip("the samples hold no labels")
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


def fig_images(run: Run) -> tuple[Figure, str]:
    idx, clean, adv = load_inputs(run, N_IMAGE_SAMPLES)
    if clean.ndim != 4:
        raise Skip(f"inputs of shape {tuple(clean.shape[1:])} are not images (C, H, W)")
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


def _outcome(record: dict, tag: str) -> str:
    """What the victim made of one cloud: a segmentation's mIoU, else the predicted class."""
    miou = record.get(f"miou_{tag}")
    return f"mIoU {miou:.3f}" if isinstance(miou, (int, float)) else f"pred {record.get(f'{tag}_pred', '?')}"


def fig_points(run: Run) -> tuple[Figure, str]:
    idx, clean, adv = load_inputs(run, 3)
    if clean.ndim != 3:
        raise Skip("inputs are not point clouds")
    if clean.shape[2] < 3 and clean.shape[1] >= 3:  # (B, 3, N) -> (B, N, 3)
        clean, adv = clean.transpose(0, 2, 1), adv.transpose(0, 2, 1)
    if clean.shape[2] < 3:
        raise Skip(f"point clouds of shape {tuple(clean.shape[1:])} have fewer than 3 coordinates")
    k = len(idx)
    fig = _new_figure(12, 3.9 * k)
    for c in range(k):
        p, q = clean[c, :, :3], adv[c, :, :3]
        disp = np.linalg.norm(q - p, axis=1)
        r = run.record(idx[c]) or {}
        for col, (pts, title, colour) in enumerate((
                (p, f"#{int(idx[c])} clean ({_outcome(r, 'clean')})", p[:, 2]),
                (q, f"adversarial ({_outcome(r, 'adv')})", q[:, 2]),
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
FIGURES = tuple(FIGURE_FUNCS)


def write_figures(run: Run, fig_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Draw every figure whose data exist into ``fig_dir``; return (name -> caption, name -> why skipped).

    A figure that fails to draw is skipped with the reason (and warned about) rather than losing the
    whole report; a figure of an earlier report whose data are gone is removed.
    """
    figures: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, func in FIGURE_FUNCS.items():
        try:
            fig, caption = func(run)
            data = _png_bytes(fig)
        except Skip as why:
            skipped[name] = str(why)
            continue
        except DynattackError:
            raise
        except Exception as exc:  # a drawing bug must not cost the run its report
            msg = f"drawing failed ({type(exc).__name__}: {exc})"
            warnings.warn(f"dynattack report: {name}.png {msg}", RuntimeWarning, stacklevel=3)
            skipped[name] = msg
            continue
        write_atomic(fig_dir / f"{name}.png", data)
        figures[name] = caption
    for name in FIGURES:
        if name not in figures:
            (fig_dir / f"{name}.png").unlink(missing_ok=True)
    return figures, skipped
