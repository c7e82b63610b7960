"""Figures a paper reports: accuracy, PSNR and norms, architecture change, gate execution
rates, mIoU.

Gate figures read :class:`~dynattack.gates.Trace` objects (or decision tensors), nothing else of
a model. Functions that accumulate over a dataset accept a list of per-batch inputs in place of
one input; the lists are concatenated along the sample dimension, so ratios are taken over all
samples together (never a mean of per-batch ratios).

This module imports only torch, numpy and :mod:`dynattack.gates`.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from .gates import Trace

Decisions = Union[Trace, torch.Tensor, Sequence[Union[Trace, torch.Tensor]]]


def _cat(x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """One tensor, or a list of per-batch tensors joined along the sample dimension."""
    return x if isinstance(x, torch.Tensor) else torch.cat([torch.as_tensor(t) for t in x])


def _flat(x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """One tensor or a list of them, flattened into one vector."""
    return x.reshape(-1) if isinstance(x, torch.Tensor) else torch.cat([torch.as_tensor(t).reshape(-1) for t in x])


# --- accuracy ----------------------------------------------------------------------------------


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: is the top-1 class of each sample its label."""
    return logits.argmax(dim=1) == labels.to(logits.device)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction in [0, 1] (nan for an empty batch)."""
    hits = correct(logits, labels)
    return float(hits.float().mean()) if hits.numel() else math.nan


# --- perturbation size -------------------------------------------------------------------------


def _diff(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    if clean.shape != adv.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and adversarial {tuple(adv.shape)} shapes differ")
    # float64: the PSNR of a tiny perturbation must not be dominated by float32 rounding
    return (adv.detach().double() - clean.detach().double()).flatten(1)


def psnr(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float64 PSNR in dB, images in [0, 1] (MAX = 1), MSE over all C*H*W values of
    each sample: ``10 log10(1 / MSE)``. Identical images give ``+inf``."""
    mse = _diff(clean, adv).pow(2).mean(dim=1)
    return -10.0 * torch.log10(mse)  # log10(0) = -inf, so identical images give +inf


def psnr_mean(values: torch.Tensor | Sequence[torch.Tensor]) -> tuple[float, int]:
    """Mean PSNR of per-sample values from :func:`psnr` (one tensor or a list of batches).

    Returns ``(mean_db, n_identical)``: the mean is over the samples that changed (finite
    PSNR); samples left identical (``+inf``) are not averaged in (no cap is made up) but
    counted in ``n_identical``. ``mean_db`` is nan when no sample changed.
    """
    v = _cat(values).double()
    finite = torch.isfinite(v)
    n_identical = int((v == math.inf).sum())
    mean = float(v[finite].mean()) if finite.any() else math.nan
    return mean, n_identical


def l2(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float64 L2 norm of the perturbation of each sample."""
    return _diff(clean, adv).norm(dim=1)


def linf(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float64 L-infinity norm of the perturbation of each sample."""
    return _diff(clean, adv).abs().amax(dim=1)


# --- architecture change -----------------------------------------------------------------------


def decisions(x: Decisions) -> torch.Tensor:
    """``(N, total_units)`` bool: the hard decisions of every unit of every gate event.

    ``x`` is a :class:`Trace` (``trace.flat("decision")``), an ``(N, units...)`` decision tensor,
    or a list of either (batches, concatenated along samples).
    """
    if isinstance(x, Trace):
        if not len(x):
            raise ValueError("the trace holds no gate event: run the forward inside `with Trace()`")
        return x.flat("decision").bool()
    if isinstance(x, torch.Tensor):
        return x.reshape(x.shape[0], -1).bool()
    return torch.cat([decisions(part) for part in x])


def _check_same_gates(clean: Decisions, adv: Decisions) -> None:
    """Traces compared unit by unit must hold the same gates in the same order."""
    pairs = zip(clean, adv) if isinstance(clean, (list, tuple)) and isinstance(adv, (list, tuple)) else [(clean, adv)]
    for c, a in pairs:
        if isinstance(c, Trace) and isinstance(a, Trace):
            cn, an = [e.name for e in c], [e.name for e in a]
            if cn != an:
                raise ValueError(f"clean and adversarial traces hold different gate events: {cn} vs {an}")


def arch_change(clean: Decisions, adv: Decisions, samples: torch.Tensor | None = None) -> float:
    """Percentage of unit decisions that differ between the clean and the adversarial run.

    Works for any unit (block, channel, position, voxel): every unit of every gate event of
    every selected sample counts once. ``samples`` (``(N,)`` bool) keeps only some samples
    (nan when none is kept).
    """
    _check_same_gates(clean, adv)
    dc, da = decisions(clean), decisions(adv)
    if dc.shape != da.shape:
        raise ValueError(f"clean {tuple(dc.shape)} and adversarial {tuple(da.shape)} decisions differ in shape")
    if samples is not None:
        keep = _cat(samples).bool().to(dc.device)
        dc, da = dc[keep], da[keep]
    if dc.numel() == 0:
        return math.nan
    return 100.0 * float((dc != da).double().mean())


def arch_change_skipnet(clean: Decisions, adv: Decisions, correct_mask: torch.Tensor) -> float:
    """LGM's SkipNet definition: percentage of (sample, gate) decisions that differ, over the
    samples the network classified correctly when clean (``correct_mask``, ``(N,)`` bool)."""
    return arch_change(clean, adv, samples=correct_mask)


def arch_change_positions(clean: Decisions, adv: Decisions) -> float:
    """LGM's DynConv definition: percentage of differing positions over all positions of all
    masks, summed over blocks and all samples. Derived masks (DynConv's dilated mask) count
    when the family records them as gate events in the trace, as it should."""
    return arch_change(clean, adv)


# --- execution rates ---------------------------------------------------------------------------


def _per_sample_rates(traces: Trace | Sequence[Trace]) -> tuple[list[str], torch.Tensor]:
    """Gate names (first-call order) and ``(N, num_gates)`` fraction of each gate's units on per
    sample; repeated calls of a gate (several batches) are stacked along samples."""
    traces = [traces] if isinstance(traces, Trace) else list(traces)
    per_gate: dict[str, list[torch.Tensor]] = {}
    for trace in traces:
        n = trace.batch_size() if len(trace) else 0
        for e in trace:  # a sub-batch call's absent rows ran none of its units
            per_gate.setdefault(e.name, []).append(e.full("decision", n, False).reshape(n, -1).double().mean(dim=1))
    if not per_gate:
        raise ValueError("the traces hold no gate event: run the forward inside `with Trace()`")
    columns = [torch.cat(parts) for parts in per_gate.values()]
    if len({len(c) for c in columns}) != 1:
        raise ValueError("gates were called on different numbers of samples; cannot align them per sample")
    return list(per_gate), torch.stack(columns, dim=1)


def execution_rates(traces: Trace | Sequence[Trace]) -> dict[str, float]:
    """Gate name -> fraction of its unit decisions that were on, over all samples and units
    (one trace or a list of per-batch traces); the rows a sub-batch call did not run on count
    as off, as in the per-sample rates."""
    traces = [traces] if isinstance(traces, Trace) else list(traces)
    on: dict[str, float] = {}
    total: dict[str, int] = {}
    for trace in traces:
        n = trace.batch_size() if len(trace) else 0
        for e in trace:
            d = e.full("decision", n, False)
            on[e.name] = on.get(e.name, 0.0) + float(torch.count_nonzero(d))
            total[e.name] = total.get(e.name, 0) + d.numel()
    return {name: on[name] / total[name] if total[name] else math.nan for name in on}


def execution_rates_by_class(
    traces_or_decisions: Trace | torch.Tensor | Sequence[Trace] | Sequence[torch.Tensor],
    labels: torch.Tensor | Sequence[torch.Tensor],
    num_classes: int,
) -> torch.Tensor:
    """``(num_gates, num_classes)`` float64: mean execution rate of each gate over the samples of
    each class (nan for a class without samples); the heatmap of the LGM paper's Fig. 7.

    Input: traces (rows in the order of :func:`execution_rates`' keys), or an ``(N, num_gates)``
    tensor of per-sample, per-gate decisions or rates (e.g. SkipNet's ``trace.flat("decision")``,
    one unit per gate), or a list of per-batch ones; ``labels`` matches it sample by sample.
    """
    items = traces_or_decisions
    if isinstance(items, Trace) or (isinstance(items, (list, tuple)) and items and isinstance(items[0], Trace)):
        _, rates = _per_sample_rates(items)
    else:
        rates = _cat(items).double()
    labels = _cat(labels).long().to(rates.device)
    if rates.ndim != 2 or len(rates) != len(labels):
        raise ValueError(f"expected (N, num_gates) rates for {len(labels)} labels, got {tuple(rates.shape)}")
    one_hot = torch.nn.functional.one_hot(labels, num_classes).double()  # (N, C)
    sums = rates.T @ one_hot  # (G, C)
    counts = one_hot.sum(dim=0)  # (C,)
    return sums / counts  # 0 / 0 = nan for empty classes


# --- segmentation ------------------------------------------------------------------------------


def miou(
    pred: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor | Sequence[torch.Tensor],
    num_classes: int,
    ignore_index: int = -100,
) -> tuple[float, torch.Tensor]:
    """Mean intersection over union of predicted labels vs targets (any matching shapes, or
    lists of per-scene tensors, pooled as one confusion matrix).

    Points whose target is ``ignore_index`` are left out. Returns ``(mean, per_class)`` with
    ``per_class`` ``(num_classes,)`` float64; a class absent from both prediction and target
    has IoU nan and is left out of the mean (nan if every class is absent).
    """
    p, t = _flat(pred), _flat(target)
    if p.shape != t.shape:
        raise ValueError(f"{p.numel()} predictions for {t.numel()} targets")
    keep = t != ignore_index
    p, t = p[keep].long(), t[keep].long()
    if p.numel() and (p.min() < 0 or p.max() >= num_classes or t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} (or be ignore_index in the target)")
    conf = torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes).double()
    inter = conf.diag()
    union = conf.sum(dim=0) + conf.sum(dim=1) - inter
    per_class = inter / union  # 0 / 0 = nan: class absent from both
    present = ~torch.isnan(per_class)
    mean = float(per_class[present].mean()) if present.any() else math.nan
    return mean, per_class
