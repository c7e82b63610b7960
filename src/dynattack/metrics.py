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


def unit_decisions(trace: Trace) -> dict[str, torch.Tensor]:
    """Gate name -> ``(B, units)`` bool decisions of the traced batch (rows a sub-batch call did
    not run on count as off; repeated calls of a gate in one forward are joined along units):
    what :func:`input_dependence` accumulates batch by batch."""
    if not len(trace):
        raise ValueError("the trace holds no gate event: run the forward inside `with Trace()`")
    n = trace.batch_size()
    out: dict[str, list[torch.Tensor]] = {}
    for e in trace:
        out.setdefault(e.name, []).append(e.full("decision", n, False).reshape(n, -1).bool())
    return {name: torch.cat(parts, dim=1) for name, parts in out.items()}


def input_dependence(batches: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
                     labels: torch.Tensor | Sequence[torch.Tensor], num_classes: int) -> dict[str, float]:
    """How much a victim's decisions depend on its input, over a dataset: ``batches`` are
    :func:`unit_decisions` of each batch (a gate absent from a batch, e.g. an exit no row
    reached, ran none of its units there), ``labels`` the batches' labels.

    - ``varying_decisions_pct``: share of (sample, unit) decisions whose unit is not constant over
      the dataset (on for some samples, off for others), i.e. the share of units that vary;
    - ``minority_decisions_pct``: share of (sample, unit) decisions that differ from their unit's
      majority decision (mean over units of min(p, 1 - p), at most 50 %): what one fixed,
      input-independent architecture would get wrong; robust to a unit flipping on a few samples;
    - ``class_spread_pct_mean`` / ``_max``: per gate, the largest minus the smallest per-class
      execution rate (classes with samples only), averaged over gates / its maximum.

    Every unit counts once per sample (a channel gate of 64 channels weighs 64 block gates)."""
    batches = [batches] if isinstance(batches, dict) else list(batches)
    labels = _cat(labels).long()
    units = {}
    for b in batches:
        for name, d in b.items():
            if units.setdefault(name, d.shape[1]) != d.shape[1]:
                raise ValueError(f"gate {name} has {d.shape[1]} units in one batch and {units[name]} in another")
    if not units:
        raise ValueError("no gate decision to measure: the victim declares no gate")
    rows = [len(next(iter(b.values()))) for b in batches]
    if len(labels) != sum(rows):
        raise ValueError(f"{sum(rows)} samples of decisions for {len(labels)} labels")
    on = {name: torch.zeros(u, dtype=torch.float64) for name, u in units.items()}  # per unit, over samples
    rates = torch.zeros(sum(rows), len(units), dtype=torch.float64)  # (N, G): share of a gate's units on
    start = 0
    for b, r in zip(batches, rows):
        for g, name in enumerate(units):
            if name in b:
                on[name] += b[name].sum(dim=0, dtype=torch.float64)
                rates[start:start + r, g] = b[name].sum(dim=1, dtype=torch.float64) / units[name]
        start += r
    p = torch.cat(list(on.values())) / sum(rows)
    one_hot = torch.nn.functional.one_hot(labels, num_classes).double()  # (N, C)
    counts = one_hot.sum(dim=0)
    by_class = (rates.T @ one_hot)[:, counts > 0] / counts[counts > 0]  # (G, classes with samples)
    spread = by_class.amax(dim=1) - by_class.amin(dim=1)
    return {
        "varying_decisions_pct": 100.0 * float(((p > 0) & (p < 1)).double().mean()),
        "minority_decisions_pct": 100.0 * float(torch.minimum(p, 1 - p).mean()),
        "class_spread_pct_mean": 100.0 * float(spread.mean()),
        "class_spread_pct_max": 100.0 * float(spread.max()),
    }


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


# --- early exits -------------------------------------------------------------------------------
#
# A multi-exit network (SDN, DeepSloth's victims) declares exit k as a gate with one unit per
# sample, "continue past exit k", each exit nested in the one before it (``Gate(within=...)``,
# or called on the rows still running, ``gate(q, rows=idx)``). Such a chain is read from the
# trace and the gates' nesting (``cost.profile(model).parents``) alone; nothing here knows a family.


def exit_chain(trace: Trace, parents: dict[str, str] | None = None) -> list | None:
    """The exit gates of one traced forward, in depth order, or None when its gates are not exits.

    The gates are exits when every gate event of the forward has one unit per sample (shape
    ``(n,)``), there are at least two, and each after the first is nested in the one before it:
    declared so (``parents[name]`` names it, ``cost.CostProfile.parents``) or called on a subset
    of the rows the one before it continued (``rows``). A network with a single exit is not told
    apart from a network with a single skip gate by its trace, so it is not recognised; SkipNet's
    gates (scalar, not nested) are not a chain."""
    events = list(trace)
    parents = parents or {}
    if len(events) < 2 or any(e.logit.dim() != 1 for e in events):
        return None
    if len({e.name for e in events}) != len(events):
        raise ValueError("a gate was called twice in the trace: trace one forward per call")
    n = trace.batch_size()
    if parents.get(events[0].name) is not None:
        return None
    on = events[0].full("decision", n, False).bool()
    for prev, e in zip(events, events[1:]):
        if parents.get(e.name) != prev.name:
            if e.rows is None or e.name in parents or not bool(on[e.rows].all()):
                return None
        on = on & e.full("decision", n, False).bool()
    return events


def exit_index(trace: Trace, parents: dict[str, str] | None = None) -> torch.Tensor | None:
    """``(N,)`` int64: the exit each sample of the traced forward stops at, ``0..K-1`` for the
    K exit gates (the sample did not continue past it) and ``K`` for the final classifier (it
    continued past every one); None when the trace holds no exit chain (:func:`exit_chain`)."""
    chain = exit_chain(trace, parents)
    if chain is None:
        return None
    n = trace.batch_size()
    on = torch.stack([e.full("decision", n, False).bool() for e in chain], 1)  # (N, K)
    return on.long().cumprod(1).sum(1)  # leading continue decisions (nested: an off exit stops it)


def exit_cost_fractions(trace: Trace, flops_full: float, parents: dict[str, str] | None = None) -> torch.Tensor | None:
    """``(K + 1,)`` float64: the FLOPs of a sample stopping at each exit (then the final
    classifier) over ``flops_full`` (every gate on): DeepSloth's ``c_i``. Exit k's gate cost
    (``unit_cost``, from ``cost.calibrate``) is what continuing past it runs besides the later
    exits' own, so a sample stopping at exit k runs ``flops_full - sum_{j >= k} unit_cost_j``.
    None without an exit chain or before calibration."""
    chain = exit_chain(trace, parents)
    if chain is None or any(e.unit_cost is None for e in chain):
        return None
    gated = torch.stack([torch.as_tensor(e.unit_cost, dtype=torch.float64).cpu().reshape(()) for e in chain])
    after = gated.flip(0).cumsum(0).flip(0)  # sum_{j >= k}
    return torch.cat([flops_full - after, torch.tensor([float(flops_full)], dtype=torch.float64)]) / float(flops_full)


def exit_rates(index: torch.Tensor | Sequence[torch.Tensor], num_exits: int) -> list[float]:
    """Share of samples stopping at each of ``num_exits`` exits (the final classifier last)."""
    idx = _cat(index).long().reshape(-1)
    if not idx.numel():
        return [math.nan] * num_exits
    return (torch.bincount(idx.cpu(), minlength=num_exits).double() / idx.numel()).tolist()


def early_exit_efficacy(rates: Sequence[float], cost_fractions: Sequence[float]) -> float:
    """DeepSloth's early-exit efficacy (Hong et al., ICLR 2021, ``delay_attack_cost.py``
    ``get_plot_data_and_auc``): the area under the early-exit capability (EEC) curve, the
    cumulative share of samples that have exited against the fraction of the full network's
    cost spent, through the points ``(0, 0)`` and ``(c_k, sum_{j <= k} rates_j)`` for every
    exit k (the final one at ``(1, 1)``), by the trapezoidal rule (``np.trapz``). 1: every sample
    exits at no cost; 0: none exits before the end. DeepSloth reports an attack's reduction of it
    (a slowdown "reduces the efficacy by 90-100 %").

    Relation to compute kept: with ``c_{-1} = 0``, the area is
    ``1 - sum_k rates_k (c_{k-1} + c_k) / 2``: one minus the mean over samples of the midpoint of
    their exit's cost interval, i.e. ``1 - (compute kept + mean c_{k-1}) / 2`` (compute kept as a
    fraction, ``sum_k rates_k c_k``). So it lies between ``1 - compute kept`` (the staircase area)
    and ``1 - compute kept / 2``, and a network whose samples all reach the final classifier keeps
    ``(1 - c_{K-1}) / 2``, not 0."""
    r = torch.as_tensor(list(rates), dtype=torch.float64)
    c = torch.as_tensor(list(cost_fractions), dtype=torch.float64)
    if r.shape != c.shape:
        raise ValueError(f"{len(r)} exit rates for {len(c)} cost fractions")
    x = torch.cat([torch.zeros(1, dtype=torch.float64), c])
    y = torch.cat([torch.zeros(1, dtype=torch.float64), r.cumsum(0)])
    y[-1] = 1.0  # DeepSloth sets the last point to 1 (every sample has exited at the end)
    return float(((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2).sum())


def sample_efficacy(index: torch.Tensor, cost_fractions: torch.Tensor) -> torch.Tensor:
    """``(N,)`` float64: each sample's share of the early-exit efficacy, ``1 - (c_{k-1} + c_k) / 2``
    for its exit k (``c_{-1} = 0``); their mean over a set of samples is
    :func:`early_exit_efficacy` of its exit rates (the area is linear in the rates)."""
    c = torch.as_tensor(cost_fractions, dtype=torch.float64).cpu()
    prev = torch.cat([torch.zeros(1, dtype=torch.float64), c[:-1]])
    idx = index.long().cpu()
    return 1.0 - (prev[idx] + c[idx]) / 2


def early_exit_figures(traces: Trace | Sequence[Trace], flops_full: float,
                       parents: dict[str, str] | None = None) -> dict | None:
    """``{"exit_rates": [...], "efficacy": float, "cost_fractions": [...]}`` over the traced
    forwards (one trace per batch, pooled), or None when they hold no exit chain."""
    traces = [traces] if isinstance(traces, Trace) else list(traces)
    indices, fractions = [], None
    for trace in traces:
        idx = exit_index(trace, parents)
        if idx is None:
            return None
        indices.append(idx)
        fractions = exit_cost_fractions(trace, flops_full, parents) if fractions is None else fractions
    if not indices:
        return None
    k = len(exit_chain(traces[0], parents)) + 1
    rates = exit_rates(indices, k)
    return {"exit_rates": rates,
            "efficacy": early_exit_efficacy(rates, fractions.tolist()) if fractions is not None else None,
            "cost_fractions": fractions.tolist() if fractions is not None else None}
