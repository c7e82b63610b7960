"""Cost accounting: FLOPs measured with ``torch.utils.flop_counter.FlopCounterMode``.

Each gate names the modules one of its units controls (``Gate.controls``). :func:`calibrate`
runs one sample with every gate forced on under ``FlopCounterMode`` and splits each gate's
measured FLOPs evenly over its units; whatever no gate controls is the static (always-on) cost.
Executed FLOPs of a batch then come from a trace, vectorised: static + sum(decision * unit cost).
Families whose cost is not one-decision-one-cost override ``executed_flops(trace)`` on the model.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .gates import Trace, force_gates, iter_gates


@dataclass
class CostProfile:
    """FLOPs per sample of a model at one input shape."""

    input_shape: tuple[int, ...]
    full: float  # every gate on
    static: float  # the part no gate controls
    gated: dict[str, float]  # gate name -> FLOPs of all its units together


def _module_flops(model: nn.Module, x: torch.Tensor) -> tuple[float, dict[str, float], Trace]:
    with force_gates(model, "on"), torch.no_grad(), Trace() as trace, FlopCounterMode(display=False) as counter:
        model(x)
    prefix = type(model).__name__
    per_module = {}
    for key, ops in counter.get_flop_counts().items():
        if key == prefix or key.startswith(prefix + "."):
            per_module[key[len(prefix) + 1:]] = float(sum(ops.values()))
    return float(counter.get_total_flops()), per_module, trace


def calibrate(model: nn.Module, input_shape: tuple[int, ...]) -> CostProfile:
    """Measure unit costs for inputs of ``input_shape`` (no batch dim) and store them on the gates."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        x = torch.zeros((1, *input_shape), device=param.device if param is not None else "cpu")
        full, per_module, trace = _module_flops(model, x)
    finally:
        model.train(was_training)
    names = {m: n for n, m in model.named_modules()}
    units = {}
    for event in trace:
        if event.name in units:
            raise ValueError(f"gate {event.name} was called twice in one forward; give each call its own Gate")
        units[event.name] = event.units
    gated = {}
    for name, gate in iter_gates(model):
        if name not in units:
            continue  # a gate that did not run on this input shape
        flops = sum(per_module.get(names[m], 0.0) for m in gate.controls)
        gated[name] = flops
        gate.unit_cost = torch.tensor(flops / units[name], dtype=torch.float64, device=x.device)
    profile = CostProfile(tuple(input_shape), full, full - sum(gated.values()), gated)
    model._cost_profile = profile
    return profile


def profile(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> CostProfile:
    """The model's cost profile, calibrating when missing or measured for another input shape."""
    prof = getattr(model, "_cost_profile", None)
    if prof is not None and (input_shape is None or tuple(input_shape) == prof.input_shape):
        return prof
    shape = input_shape or getattr(model, "input_shape", None)
    if shape is None:
        raise ValueError("the model has no cost profile: call dynattack.cost.calibrate(model, input_shape)")
    return calibrate(model, shape)


def executed_flops(model: nn.Module, trace: Trace) -> torch.Tensor:
    """FLOPs each sample of the traced forward ran, shape ``(B,)`` float64."""
    family_rule = getattr(model, "executed_flops", None)
    if family_rule is not None:
        return family_rule(trace)
    prof = profile(model)
    total = None
    for event in trace:
        if event.unit_cost is None:
            raise ValueError(f"gate {event.name} has no unit cost: calibrate the model first")
        on = event.decision.to(torch.float64) * event.unit_cost
        per_sample = on.reshape(on.shape[0], -1).sum(1)
        total = per_sample if total is None else total + per_sample
    if total is None:
        raise ValueError("the trace holds no gate event: run the forward inside `with Trace()`")
    return total + prof.static


def full_flops(model: nn.Module) -> float:
    """FLOPs per sample with every gate on: the static counterpart of the dynamic network."""
    return profile(model).full


def full_flops_per_sample(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float64 FLOPs of each input with every gate on. For victims whose full network
    depends on the input (``model.input_dependent_full``: a point cloud's candidate voxels) the
    batch runs forced on and its trace is counted; the others read their cost profile."""
    if getattr(model, "input_dependent_full", False):
        with force_gates(model, "on"), torch.no_grad(), Trace() as trace:
            model(x)
        return executed_flops(model, trace).to(x.device, torch.float64)
    return torch.full((x.shape[0],), profile(model, tuple(x.shape[1:])).full, dtype=torch.float64, device=x.device)


def recovery_per_sample(f_clean: torch.Tensor, f_adv: torch.Tensor, f_full: float | torch.Tensor) -> torch.Tensor:
    """Percent of the FLOPs the network saved on each clean sample that the attack won back;
    NaN where the clean sample already ran everything (nothing to recover)."""
    f_clean, f_adv = f_clean.double(), f_adv.double()
    saved = torch.as_tensor(f_full, dtype=torch.float64) - f_clean
    rec = (f_adv - f_clean) / saved * 100.0
    return torch.where(saved > 0, rec, torch.full_like(rec, float("nan")))


def recovery_aggregate(f_clean: torch.Tensor, f_adv: torch.Tensor, f_full: float | torch.Tensor) -> float:
    """(sum F_adv - sum F_clean) / (sum F_full - sum F_clean) * 100, NaN when nothing was saved."""
    f_clean, f_adv = f_clean.double(), f_adv.double()
    full = torch.as_tensor(f_full, dtype=torch.float64).expand_as(f_clean)
    saved = (full - f_clean).sum()
    if saved <= 0:
        return float("nan")
    return float((f_adv - f_clean).sum() / saved * 100.0)


def batch1_latency_ms(model: nn.Module, series: dict[str, tuple[torch.Tensor, str | None]], repeats: int = 3,
                      warmup: int = 5) -> dict[str, float]:
    """Median wall time (ms) of running each image alone through the model's real conditional
    execution path (``forward_conditional``; plain forward for static models), per series.

    ``series`` maps a name to ``(images, force)`` (``force``: None, or "on"/"off" for every gate
    forced). Series are timed interleaved, image by image in turn (best of ``repeats`` each),
    after ``warmup`` images of every series, so that caches, allocator and CPU frequency treat
    them alike: timing one series after the other biased whichever ran first.
    """
    run = getattr(model, "forward_conditional", None) or model.forward

    def once(x: torch.Tensor, force: str | None) -> float:
        with force_gates(model, force) if force else contextlib.nullcontext():
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            t0 = time.perf_counter()
            run(x)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in series}
    with torch.inference_mode():
        for images, force in series.values():
            for x in images[:warmup].split(1):
                once(x, force)
        n = min(len(images) for images, _ in series.values())
        for i in range(n):
            for name, (images, force) in series.items():
                times[name].append(min(once(images[i:i + 1], force) for _ in range(repeats)))
    return {name: float(torch.tensor(t).median()) * 1000.0 for name, t in times.items()}
