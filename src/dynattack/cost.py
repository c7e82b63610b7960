"""Cost accounting: FLOPs measured with ``torch.utils.flop_counter.FlopCounterMode``.

Each gate names the modules one of its units controls (``Gate.controls``). :func:`calibrate`
runs one sample with every gate forced on under ``FlopCounterMode`` and splits each gate's
measured FLOPs evenly over its units; whatever no gate controls is the static (always-on) cost.
Executed FLOPs of a batch then come from a trace, vectorised: static + sum(decision * unit cost).
Families whose cost is not one-decision-one-cost override ``executed_flops(trace)`` on the model.

Unit costs hold for one input shape only (a convolution's FLOPs grow with the resolution), so every
entry point that sees an input checks it with :func:`check_input`: a zoo victim takes exactly
``model.input_shape`` in its parameters' dtype; a network without ``input_shape`` (a user's own)
is calibrated on the first shape it is given and refuses any other until ``calibrate`` is called
again for the new shape. Refusing rather than recalibrating silently keeps every figure of one
model consistent: a recalibration would change the unit costs under traces already recorded
(clean FLOPs counted at one shape, adversarial ones at another). :func:`executed_flops` sees only
a trace: it refuses a trace whose forward ran on another input shape (``calibrate`` installs a
forward pre-hook that records the shape into every recording trace) and events whose unit count
differs from the calibration's (a spatial gate run at another resolution).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import DynattackError
from .gates import Trace, force_gates, iter_gates, record_input


@dataclass
class CostProfile:
    """FLOPs per sample of a model at one input shape."""

    input_shape: tuple[int, ...]
    full: float  # every gate on
    static: float  # the part no gate controls
    gated: dict[str, float]  # gate name -> FLOPs of all its units together
    units: dict[str, int]  # gate name -> units per sample it ran at ``input_shape``


def _free_dims(model: nn.Module) -> int:
    """Leading per-sample dimensions of any size: the number of points of a point-cloud victim
    (``input_dependent_full``: its full network is the cloud's own candidate voxels)."""
    return 1 if getattr(model, "input_dependent_full", False) else 0


def expected_input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The per-sample input shape the model's figures hold for: ``model.input_shape`` when the
    model declares it, else the shape its cost profile was calibrated at; None before that."""
    declared = getattr(model, "input_shape", None)
    if declared is not None:
        return tuple(declared)
    prof = getattr(model, "_cost_profile", None)
    return None if prof is None else prof.input_shape


def _shape_matches(model: nn.Module, shape: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    free = _free_dims(model)
    return len(shape) == len(expected) and tuple(shape[free:]) == tuple(expected[free:])


def _check_shape(model: nn.Module, shape: tuple[int, ...], owner: str, expected: tuple[int, ...] | None,
                 batch: int | None = None) -> None:
    """Raise unless the per-sample ``shape`` is ``expected`` (None: anything goes); ``batch``:
    the batch size, to show the whole shape the caller passed."""
    if expected is None or _shape_matches(model, tuple(shape), expected):
        return
    free = _free_dims(model)
    dims = ", ".join(["N"] * free + [str(d) for d in expected[free:]])
    how = "its input_shape" if getattr(model, "input_shape", None) is not None else \
        "the shape it was calibrated at; dynattack.cost.calibrate(model, shape) switches on purpose"
    got = f"inputs of shape {(batch, *shape)}" if batch is not None else f"per-sample shape {tuple(shape)}"
    raise DynattackError(f"{owner}: {type(model).__name__} takes inputs of shape (B, {dims}) ({how}), got {got}")


def check_input(model: nn.Module, x, owner: str = "dynattack") -> None:
    """Raise one :class:`DynattackError` unless ``x`` is a batch the model's figures hold for:
    a floating tensor in the dtype of the model's parameters (float32 for the zoo) of shape
    ``(B, *expected_input_shape(model))`` (any number of points for point-cloud victims, see
    :func:`_free_dims`). A model without ``input_shape`` and not yet calibrated accepts any
    shape (the caller calibrates on it)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DynattackError(f"{owner}: inputs must be a floating tensor (B, ...), got {got}")
    param = next(model.parameters(), None)
    if param is not None and x.dtype != param.dtype:
        raise DynattackError(f"{owner}: {type(model).__name__} takes {str(param.dtype).replace('torch.', '')} "
                             f"inputs (its parameters' dtype), got {str(x.dtype).replace('torch.', '')}")
    _check_shape(model, tuple(x.shape[1:]), owner, expected_input_shape(model), x.shape[0])


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
    """Measure unit costs for inputs of ``input_shape`` (no batch dim) and store them on the gates.

    A model that declares ``input_shape`` is calibrated at that shape only (its figures hold for
    nothing else); a model without it may be calibrated again at another shape on purpose: from
    then on its inputs must have the new shape."""
    declared = getattr(model, "input_shape", None)
    _check_shape(model, tuple(input_shape), "calibrate", None if declared is None else tuple(declared))
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
            raise DynattackError(f"gate {event.name} was called twice in one forward; give each call its own Gate")
        units[event.name] = event.units
    gated = {}
    for name, gate in iter_gates(model):
        if name not in units:
            continue  # a gate that did not run on this input shape
        flops = sum(per_module.get(names[m], 0.0) for m in gate.controls)
        gated[name] = flops
        gate.unit_cost = torch.tensor(flops / units[name], dtype=torch.float64, device=x.device)
    profile = CostProfile(tuple(input_shape), full, full - sum(gated.values()), gated,
                          {name: units[name] for name in gated})
    model._cost_profile = profile
    if not getattr(model, "_records_input_shape", False):  # traces then know what shape they ran
        model.register_forward_pre_hook(record_input)
        model._records_input_shape = True
    return profile


def profile(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> CostProfile:
    """The model's cost profile, calibrating it when missing (at ``input_shape``, else at
    ``model.input_shape``). An ``input_shape`` the model's figures do not hold for is refused
    (see :func:`check_input`), never silently recalibrated."""
    expected = expected_input_shape(model)
    if input_shape is not None:
        _check_shape(model, tuple(input_shape), "profile", expected)
    prof = getattr(model, "_cost_profile", None)
    if prof is not None:
        return prof
    shape = input_shape or expected
    if shape is None:
        raise DynattackError("the model has no cost profile: call dynattack.cost.calibrate(model, input_shape)")
    return calibrate(model, shape)


def _check_unit_counts(model: nn.Module, trace: Trace, prof: CostProfile) -> None:
    """Refuse a trace of inputs of another shape than the calibration's (recorded by the hook
    ``calibrate`` installs), and gate events whose units per sample differ from the calibration's."""
    for event in trace:
        calibrated = prof.units.get(event.name)
        if calibrated is not None and event.units != calibrated:
            raise DynattackError(
                f"gate {event.name} ran {event.units} units per sample, {type(model).__name__} was calibrated "
                f"with {calibrated} at input shape {prof.input_shape}: the traced forward ran on inputs of "
                f"another shape, whose FLOPs this profile does not give")
    for shape in trace.input_shapes:  # gates whose unit count does not grow with the input (a block)
        _check_shape(model, shape, "executed_flops", prof.input_shape)


def executed_flops(model: nn.Module, trace: Trace) -> torch.Tensor:
    """FLOPs each sample of the traced forward ran, shape ``(B,)`` float64. A trace whose gates
    ran another number of units than at calibration (another resolution) is refused, naming the
    gate; point-cloud victims (any number of voxels) count their own units."""
    if not _free_dims(model) and getattr(model, "_cost_profile", None) is not None:
        _check_unit_counts(model, trace, model._cost_profile)
    family_rule = getattr(model, "executed_flops", None)
    if family_rule is not None:
        return family_rule(trace)
    prof = profile(model)
    total = None
    for event in trace:
        if event.unit_cost is None:
            raise DynattackError(f"gate {event.name} has no unit cost: calibrate the model first")
        on = event.decision.to(torch.float64) * event.unit_cost
        per_sample = on.reshape(on.shape[0], -1).sum(1)
        total = per_sample if total is None else total + per_sample
    if total is None:
        raise DynattackError("the trace holds no gate event: run the forward inside `with Trace()`")
    return total + prof.static


def full_flops(model: nn.Module) -> float:
    """FLOPs per sample with every gate on: the static counterpart of the dynamic network."""
    return profile(model).full


def full_flops_per_sample(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float64 FLOPs of each input with every gate on. For victims whose full network
    depends on the input (``model.input_dependent_full``: a point cloud's candidate voxels) the
    batch runs forced on and its trace is counted; the others read their cost profile."""
    check_input(model, x, "full_flops_per_sample")
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
    for name, (images, _) in series.items():
        check_input(model, images, f"batch1_latency_ms ({name})")
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
