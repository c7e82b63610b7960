"""Cost accounting: FLOPs measured with ``torch.utils.flop_counter.FlopCounterMode``.

**The contract a network meets** for :func:`executed_flops` to be exact (no per-model function):

* every input-dependent decision is a :class:`~dynattack.gates.Gate`, called once per forward,
  on logits ``(n, *unit_shape)``;
* each gate declares, where the network is defined, the modules its units decide:
  ``Gate(controls=[...])`` (a skipped block, a conv's output channels or positions, an exit's
  later stages and head), and ``feeds=[...]`` for modules whose *input* channels are its units
  (the next conv of a chain of channel gates reads only the kept channels), and
  ``experts=[...]`` for a router: expert ``e`` runs on the units ``[..., e]`` (unit shape
  ``(T, E)``, top-k routing is the logit ``score - threshold between the k-th and (k+1)-th``);
* a gate that runs only where another gate's unit is on is nested in it: calibration sees that
  when the gate is called inside a module another gate controls, or controls a module inside
  one; otherwise it is declared, ``Gate(controls=[...], within=exit1_gate)``. The enclosing
  gate's unit shape is a prefix of the nested one's (a scalar exit encloses anything);
* a gate called on the rows of the batch still running passes them, ``gate(q, rows=idx)``; a
  row a gate is not called on runs none of its units (nor, nested, of those inside it);
* the cost of a controlled module is linear in the active units of the gate controlling it, and
  of the gate feeding it where one does (a conv between two channel gates costs
  ``flops x active-in / C_in x active-out / C_out``); what no gate controls or feeds runs always;
* except for tokens: a gate declared ``Gate(controls=[block], tokens=d)`` has units ``(T,)``, the
  tokens on dimension ``d`` of each controlled module's inputs, which the real path runs on its
  active tokens only (token halting or dropping). Such a module's cost is a polynomial of degree
  <= 3 in the number n of active tokens (attention: ``a n + b n^2``), 0 for none: calibration
  runs the module alone on the first 1, 2, 3, 4 tokens of its inputs under ``FlopCounterMode``,
  fits the polynomial exactly and checks it at half and all of the tokens (an error otherwise).

:func:`calibrate` runs one sample with every gate forced on under ``FlopCounterMode``, with
forward hooks that see which declared module runs inside which (per-module counts are
hierarchical: a module's count includes the modules it calls, so a module's own share excludes
the declared modules inside it) and inside which gate's module each gate is called. It turns
the declarations into cost terms ``(flops, output-side gate, input-side gate)``; executed FLOPs
of a batch are then, vectorised, ``static + sum_terms flops x n_out / U_out x n_in / U_in`` with
``n`` a gate's active units per sample after nesting (an expert's: those of its slice). Mis-declarations are a
:class:`~dynattack.errors.DynattackError` naming the gate, never a silent zero: a gate that
controls and feeds nothing (or only modules that ran no FLOPs), a module controlled (or fed) by
two gates, a module outside the model, a gate called twice in one forward, a nesting whose unit
shapes do not nest or that loops, a trace whose events do not match the calibration (unit
counts, input shape, rows, a nested gate without its enclosing one). A family whose cost is not
made of these pieces keeps its own ``executed_flops(trace)`` on the model: only the sparse 3D
U-Net, whose cost is kernel-map pairs among occupied voxels (neighbourhood structure of each
scene, not a count of active units) and whose full network depends on the scene.

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
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import DynattackError
from .gates import Gate, GateEvent, Trace, force_gates, iter_gates, record_input


@dataclass
class CostTerm:
    """FLOPs per sample that run in proportion to the active fraction of the gate on their output
    side and of the gate on their input side (None: that side always runs)."""

    flops: float  # with both gates fully on
    out_gate: str | None
    in_gate: str | None
    modules: list[str]  # the declared modules it sums
    expert: int | None = None  # an expert: the output side is the units [..., expert] of out_gate
    # token modules (``Gate(tokens=d)``): FLOPs = sum_k poly[k] n^k for n >= 1 active tokens, 0 for
    # none (the module does not run); ``flops`` is then that polynomial at all tokens
    poly: tuple[float, ...] | None = None


@dataclass
class CostProfile:
    """FLOPs per sample of a model at one input shape."""

    input_shape: tuple[int, ...]
    full: float  # every gate on
    static: float  # the part no gate controls
    gated: dict[str, float]  # gate name -> FLOPs of all its units together
    units: dict[str, int]  # gate name -> units per sample it ran at ``input_shape``
    terms: list[CostTerm] = field(default_factory=list)
    parents: dict[str, str] = field(default_factory=dict)  # gate name -> the gate enclosing it


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


def _module_flops(model: nn.Module, x: torch.Tensor, declared: list[nn.Module], token_modules: list[nn.Module]):
    """One forced-on forward of ``x`` under ``FlopCounterMode``. Returns total FLOPs, FLOPs per
    module name (hierarchical), the trace, for each declared module the declared module it ran
    inside (innermost, by identity), for each gate name the declared module it was called in, and
    the inputs ``(args, kwargs, calls)`` of each of ``token_modules`` (by identity)."""
    running: list[nn.Module] = []
    ran_inside: dict[int, nn.Module | None] = {}
    called_inside: dict[str, nn.Module | None] = {}
    inputs: dict[int, list] = {}

    def capture(module, args, kwargs):
        seen = inputs.setdefault(id(module), [args, kwargs, 0])
        seen[2] += 1

    def enter(module, args):
        ran_inside.setdefault(id(module), running[-1] if running else None)
        running.append(module)

    def leave(module, args, out):
        running.pop()

    def gate_called(gate, args):
        called_inside.setdefault(gate.name, running[-1] if running else None)

    handles = []
    for module in {id(m): m for m in declared}.values():
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    handles += [g.register_forward_pre_hook(gate_called) for _, g in iter_gates(model)]
    handles += [m.register_forward_pre_hook(capture, with_kwargs=True) for m in token_modules]
    try:
        with force_gates(model, "on"), torch.no_grad(), Trace() as trace, \
                FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
    prefix = type(model).__name__
    per_module = {}
    for key, ops in counter.get_flop_counts().items():
        if key == prefix or key.startswith(prefix + "."):
            per_module[key[len(prefix) + 1:]] = float(sum(ops.values()))
    return float(counter.get_total_flops()), per_module, trace, ran_inside, called_inside, inputs


def _run_on_tokens(model: nn.Module, module: nn.Module, dim: int, args, kwargs, tokens: int, n: int) -> float:
    """FLOPs of ``module`` run alone on the first ``n`` of the ``tokens`` tokens of its calibration
    inputs (every tensor argument with ``tokens`` entries on dimension ``dim`` is cut)."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > dim and v.shape[dim] == tokens:
            return v.narrow(dim, 0, n)
        return v
    try:
        with force_gates(model, "on"), torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(*[cut(a) for a in args], **{k: cut(v) for k, v in kwargs.items()})
    except (RuntimeError, ValueError, IndexError) as exc:
        raise DynattackError(f"{type(module).__name__} failed on {n} of its {tokens} tokens ({str(exc).splitlines()[0]}): "
                             f"a module a token gate controls must run on any number of tokens, as the "
                             f"real path that drops tokens runs it") from None
    return float(counter.get_total_flops())


def _token_polynomial(model: nn.Module, gate_name: str, module: nn.Module, module_name: str, dim: int,
                      captured, tokens: int, full: float) -> tuple[float, ...]:
    """Coefficients ``c_0..c_d`` (d <= 3) of the FLOPs of ``module`` on n >= 1 active tokens, fitted
    exactly (rational arithmetic) to ``FlopCounterMode`` counts at n = 1..4 and checked at half
    and all of the tokens: attention is quadratic in n, the rest linear."""
    from fractions import Fraction

    if captured is None:
        raise DynattackError(f"gate {gate_name} controls {module_name} by tokens, which did not run at calibration")
    args, kwargs, calls = captured
    if calls > 1:
        raise DynattackError(f"gate {gate_name}'s token module {module_name} ran {calls} times in one forward: "
                             f"give each call its own module and gate")
    if not any(isinstance(v, torch.Tensor) and v.dim() > dim and v.shape[dim] == tokens
               for v in [*args, *kwargs.values()]):
        raise DynattackError(f"gate {gate_name} has {tokens} token units, but no input of {module_name} has "
                             f"{tokens} entries on dimension {dim} (Gate(tokens={dim}))")
    fit_n = list(range(1, min(tokens, 4) + 1))
    measured = {n: _run_on_tokens(model, module, dim, args, kwargs, tokens, n) for n in fit_n}
    # Lagrange form through the fit points, expanded to coefficients
    coef = [Fraction(0)] * len(fit_n)
    for i, ni in enumerate(fit_n):
        basis, denom = [Fraction(1)], Fraction(1)
        for nj in fit_n:
            if nj != ni:
                basis = [a - nj * b for a, b in zip([Fraction(0)] + basis, basis + [Fraction(0)])]
                denom *= ni - nj
        for k, b in enumerate(basis):
            coef[k] += Fraction(measured[ni]) * b / denom
    checks = {n: _run_on_tokens(model, module, dim, args, kwargs, tokens, n) for n in {(tokens + 1) // 2, tokens}
              if n not in measured}
    checks.setdefault(tokens, measured.get(tokens))
    for n, value in checks.items():
        fitted = sum(c * n ** k for k, c in enumerate(coef))
        if fitted != value:
            raise DynattackError(f"the FLOPs of {module_name} (gate {gate_name}) are not a polynomial of degree <= 3 in "
                                 f"its active tokens: {value:.0f} at {n} tokens, the fit through 1..4 says "
                                 f"{float(fitted):.0f}")
    if checks[tokens] != full:
        raise DynattackError(f"{module_name} ran {full:.0f} FLOPs in the model but {checks[tokens]:.0f} alone on "
                             f"the same inputs: a token module's cost must depend on its inputs only")
    return tuple(float(c) for c in coef)


def _declared(model: nn.Module, gates: dict[str, Gate], *attrs: str) -> dict[int, tuple[nn.Module, str, int | None]]:
    """id(module) -> (module, gate name, expert index or None) of every module some gate lists in
    ``attrs`` (controls and experts, or feeds); a module listed by two gates, or not part of the
    model, is an error."""
    inside = {id(m) for m in model.modules()}
    owner: dict[int, tuple[nn.Module, str, int | None]] = {}
    for name, gate in gates.items():
        for attr in attrs:
            for i, module in enumerate(getattr(gate, attr)):
                if id(module) not in inside:
                    raise DynattackError(f"gate {name} {attr} a {type(module).__name__} that is not a module of "
                                         f"{type(model).__name__}: list modules the network runs")
                if id(module) in owner and owner[id(module)][1] != name:
                    verb = "fed" if attr == "feeds" else "controlled"
                    raise DynattackError(f"module {type(module).__name__} is {verb} by two gates, "
                                         f"{owner[id(module)][1]} and {name}: its FLOPs would count twice; "
                                         f"list it in one gate's {attr}")
                owner[id(module)] = (module, name, i if attr == "experts" else None)
    return owner


def _cost_terms(model: nn.Module, gates: dict[str, Gate], units: dict[str, int], shapes: dict[str, tuple],
                per_module: dict[str, float], ran_inside: dict, called_inside: dict,
                controlled: dict, fed: dict, inputs: dict) -> tuple[list[CostTerm], dict[str, str]]:
    """The cost terms and the nesting of the gates (see the module docstring)."""
    names = {id(m): n for n, m in model.named_modules()}
    nodes = {**fed, **controlled}

    def outer(mid: int) -> int | None:  # the declared module this one ran inside
        parent = ran_inside.get(mid)
        return None if parent is None else id(parent)

    def out_side(mid: int | None) -> tuple[str | None, int | None]:  # (gate, expert) deciding a module's output
        while mid is not None:
            if mid in controlled:
                return controlled[mid][1], controlled[mid][2]
            mid = outer(mid)
        return None, None

    def out_gate(mid: int | None) -> str | None:
        return out_side(mid)[0]

    # a module's own FLOPs: its count less the declared modules that ran inside it
    own = {mid: per_module.get(names[mid], 0.0) for mid in nodes}
    for mid in nodes:
        parent = outer(mid)
        if parent is not None:
            own[parent] -= per_module.get(names[mid], 0.0)
    grouped: dict[tuple, CostTerm] = {}
    for mid in nodes:
        gate = gates.get(controlled[mid][1]) if mid in controlled else None
        if gate is not None and gate.tokens is not None and controlled[mid][2] is None:
            name, module = controlled[mid][1], controlled[mid][0]
            inner = [names[m] for m in nodes if outer(m) == mid]
            if inner or mid in fed or gate.experts or len(shapes[name]) != 1:
                why = (f"declared modules run inside it ({', '.join(inner)})" if inner else
                       "a gate feeds it" if mid in fed else "it also routes experts" if gate.experts else
                       f"its unit shape is {shapes[name]}, not (tokens,)")
                raise DynattackError(f"gate {name} controls {names[mid]} by tokens, but {why}: a token gate has "
                                     f"units (T,) and controls whole modules that run on the active tokens")
            poly = _token_polynomial(model, name, module, names[mid], gate.tokens, inputs.get(mid), shapes[name][0],
                                     own[mid])
            term = grouped.setdefault((name, None, None, "tokens"), CostTerm(0.0, name, None, [], poly=(0.0,) * 4))
            term.poly = tuple(a + b for a, b in zip(term.poly, poly + (0.0,) * (4 - len(poly))))
        else:
            key = (*out_side(mid), fed[mid][1] if mid in fed else None)
            term = grouped.setdefault(key, CostTerm(0.0, key[0], key[2], [], key[1]))
        term.flops += own[mid]
        term.modules.append(names[mid])

    parents: dict[str, str] = {}
    for name, gate in gates.items():
        found = set()
        if gate.within is not None:
            declared = gate.within.name
            if gate.within not in gates.values() or declared not in units:
                raise DynattackError(f"gate {name} is declared within a gate that is not a gate of "
                                     f"{type(model).__name__} run at calibration")
            found = {declared}
        else:
            call_site = called_inside.get(name)
            if call_site is not None and out_gate(id(call_site)) not in (None, name):
                found.add(out_gate(id(call_site)))
            enclosing = {out_gate(outer(id(m))) for m in gate.controls + gate.experts} - {name}
            if len(enclosing) > 1:
                where = ", ".join(sorted("no gate's" if g is None else f"gate {g}'s" for g in enclosing))
                raise DynattackError(f"gate {name} controls modules inside different gates' modules ({where}): "
                                     f"give each part its own gate")
            found |= enclosing - {None}
        if len(found) > 1:
            raise DynattackError(f"gate {name} runs inside modules of gates {', '.join(sorted(found))}: "
                                 f"declare the one enclosing it, Gate(within=...)")
        if found:
            parent = found.pop()
            if shapes[name][:len(shapes[parent])] != shapes[parent]:
                raise DynattackError(f"gate {name} (units {shapes[name]}) is nested in gate {parent} (units "
                                     f"{shapes[parent]}), whose unit shape is not a prefix of its own: which "
                                     f"enclosing unit holds which of its units is not defined")
            parents[name] = parent
    for name in parents:  # a loop of enclosing gates encloses nothing
        seen, g = {name}, parents[name]
        while g in parents:
            if parents[g] in seen:
                raise DynattackError(f"gates {', '.join(sorted(seen | {g}))} enclose each other (Gate(within=...))")
            seen.add(g)
            g = parents[g]

    for name, gate in gates.items():
        for module in gate.feeds:  # feeds: the units are the module's input channels
            width = getattr(module, "in_channels", getattr(module, "in_features", None))
            if width is not None and width != units[name]:
                raise DynattackError(f"gate {name} feeds {names[id(module)]}, which reads {width} input channels, "
                                     f"but has {units[name]} units: a fed module's inputs are the gate's units")
        flops = sum(t.flops for t in grouped.values() if name in (t.out_gate, t.in_gate))
        if gate.experts and (not shapes[name] or shapes[name][-1] != len(gate.experts)):
            raise DynattackError(f"gate {name} routes to {len(gate.experts)} experts but its unit shape is "
                                 f"{shapes[name]}: the last unit axis must hold one unit per expert")
        if not gate.controls and not gate.feeds and not gate.experts:
            raise DynattackError(f"gate {name} controls nothing: declare the modules its units run, "
                                 f"Gate(controls=[...]) (or feeds=[...]); without them its units cost 0 FLOPs")
        if flops <= 0:
            raise DynattackError(f"gate {name}'s modules ran no FLOPs at calibration: it controls "
                                 f"{', '.join(names[id(m)] for m in gate.controls + gate.experts + gate.feeds)}; declare the "
                                 f"modules that do the work its units decide")
    return list(grouped.values()), parents


def calibrate(model: nn.Module, input_shape: tuple[int, ...]) -> CostProfile:
    """Measure the cost terms for inputs of ``input_shape`` (no batch dim) and store each gate's
    share per unit on it (``unit_cost``: the energy losses' unit weights).

    A model that declares ``input_shape`` is calibrated at that shape only (its figures hold for
    nothing else); a model without it may be calibrated again at another shape on purpose: from
    then on its inputs must have the new shape."""
    declared_shape = getattr(model, "input_shape", None)
    _check_shape(model, tuple(input_shape), "calibrate", None if declared_shape is None else tuple(declared_shape))
    family_rule = getattr(model, "executed_flops", None) is not None
    all_gates = dict(iter_gates(model))
    controlled = fed = {}
    if not family_rule:
        controlled, fed = _declared(model, all_gates, "controls", "experts"), _declared(model, all_gates, "feeds")
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        x = torch.zeros((1, *input_shape), device=param.device if param is not None else "cpu")
        declared_modules = [m for m, *_ in list(controlled.values()) + list(fed.values())]
        token_modules = [m for g in all_gates.values() if g.tokens is not None for m in g.controls]
        full, per_module, trace, ran_inside, called_inside, inputs = _module_flops(model, x, declared_modules,
                                                                                   token_modules)
    finally:
        model.train(was_training)
    names = {m: n for n, m in model.named_modules()}
    units, shapes = {}, {}
    for event in trace:
        if event.name in units:
            raise DynattackError(f"gate {event.name} was called twice in one forward; give each call its own Gate")
        units[event.name], shapes[event.name] = event.units, tuple(event.logit.shape[1:])
    gates = {name: g for name, g in all_gates.items() if name in units}  # the gates that ran at this shape
    if family_rule:  # the family counts its own events; unit costs only weigh the energy losses
        terms, parents = [], {}
        gated = {name: sum(per_module.get(names[m], 0.0) for m in g.controls) for name, g in gates.items()}
    else:
        terms, parents = _cost_terms(model, gates, units, shapes, per_module, ran_inside, called_inside,
                                     controlled, fed, inputs)
        # a gate's share: what runs on its output side, and what it feeds that nothing else decides
        gated = {name: sum(t.flops for t in terms if t.out_gate == name or (t.in_gate == name and t.out_gate is None))
                 for name in gates}
    for name, gate in gates.items():
        gate.unit_cost = torch.tensor(gated[name] / units[name], dtype=torch.float64, device=x.device)
    static = full - (sum(t.flops for t in terms) if not family_rule else sum(gated.values()))
    profile = CostProfile(tuple(input_shape), full, static, gated, {n: units[n] for n in gates}, terms, parents)
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


def _forwards(trace: Trace) -> list[tuple[list[GateEvent], int]]:
    """The trace cut into its forwards, each with its batch size: at the starts the model's input
    hook recorded, else (a forward of another entry point, e.g. ``forward_conditional``) where a
    gate's name comes again."""
    events = trace.events
    if trace.forward_starts and trace.forward_starts[0] == 0:
        bounds = trace.forward_starts + [len(events)]
        return [(events[a:b], n) for a, b, n in zip(bounds, bounds[1:], trace.batch_sizes)]
    pieces: list[list[GateEvent]] = [[]]
    for event in events:
        if any(e.name == event.name for e in pieces[-1]):
            pieces.append([])
        pieces[-1].append(event)
    out = []
    for piece in pieces:
        whole = [e.logit.shape[0] for e in piece if e.rows is None]
        if not whole:
            raise DynattackError(f"the trace does not tell the batch size of a forward whose gates all ran on "
                                 f"sub-batches ({piece[0].name} first): trace the model's own forward, "
                                 f"model(x), after dynattack.cost.calibrate")
        out.append((piece, whole[0]))
    return out


def _forward_flops(model: nn.Module, prof: CostProfile, events: list[GateEvent], batch: int,
                   device: torch.device) -> torch.Tensor:
    """``(batch,)`` float64 FLOPs of one forward's events (see the module docstring)."""
    by_name: dict[str, GateEvent] = {}
    for e in events:
        if e.name in by_name:
            raise DynattackError(f"gate {e.name} was called twice in one forward; give each call its own Gate")
        if e.name not in prof.units:
            raise DynattackError(f"gate {e.name} did not run when {type(model).__name__} was calibrated: its FLOPs "
                                 f"are unknown (calibrate on inputs that run every gate)")
        if e.rows is not None:
            r = e.rows
            if r.dim() != 1 or r.dtype != torch.long or r.numel() != e.logit.shape[0] \
                    or (r.numel() and (int(r.min()) < 0 or int(r.max()) >= batch)) \
                    or torch.unique(r).numel() != r.numel():
                raise DynattackError(f"gate {e.name} was called with rows that are not {e.logit.shape[0]} distinct "
                                     f"row indices (int64) into the batch of {batch}")
        elif e.logit.shape[0] != batch:
            raise DynattackError(f"gate {e.name} ran on {e.logit.shape[0]} rows of a batch of {batch} without "
                                 f"saying which: call it as gate(q, rows=indices)")
        by_name[e.name] = e
    active: dict[str, torch.Tensor] = {}

    def effective(name: str) -> torch.Tensor:  # decisions after nesting, (batch, *unit_shape)
        if name not in active:
            d = by_name[name].full("decision", batch, False)
            parent = prof.parents.get(name)
            if parent is not None:
                if parent not in by_name:
                    raise DynattackError(f"gate {name} is nested in gate {parent}, which this forward did not call")
                p = effective(parent)
                d = d & p.reshape(*p.shape, *[1] * (d.dim() - p.dim()))
            active[name] = d
        return active[name]

    counted: dict[tuple, tuple[torch.Tensor, int]] = {}

    def count(gate: str, expert: int | None) -> tuple[torch.Tensor, int]:
        """(active units per sample, units per sample) of a gate, or of one expert's slice of it;
        a gate the forward did not call ran none of its units. count_nonzero: a bool
        ``sum(dtype=...)`` takes a slow path (~1000x on (256, 784))."""
        if (gate, expert) not in counted:
            if gate not in by_name:
                counted[gate, expert] = torch.zeros(batch, dtype=torch.float64, device=device), 1
            else:
                d = effective(gate) if expert is None else effective(gate)[..., expert]
                units = math.prod(d.shape[1:])  # from the shape: a batch may have 0 rows
                counted[gate, expert] = torch.count_nonzero(d.reshape(batch, units), 1).to(device, torch.float64), \
                    units
        return counted[gate, expert]

    total = torch.full((batch,), prof.static, dtype=torch.float64, device=device)
    for term in prof.terms:
        if term.poly is not None:  # modules run on the active tokens: a measured polynomial in them
            n, _ = count(term.out_gate, None)
            value = sum(c * n ** k for k, c in enumerate(term.poly))
            total = total + torch.where(n > 0, value, torch.zeros_like(value))
            continue
        factor, units = None, 1
        for gate, expert in ((term.out_gate, term.expert), (term.in_gate, None)):
            if gate is not None:
                n, u = count(gate, expert)
                factor = n if factor is None else factor * n
                units *= u
        # one rounding: integer counts x integer FLOPs stay exact in float64
        total = total + factor * term.flops / units
    return total


def executed_flops(model: nn.Module, trace: Trace) -> torch.Tensor:
    """FLOPs each sample of the traced forward ran, shape ``(B,)`` float64 (summed over the
    forwards of the trace). A trace whose gates ran another number of units than at calibration
    (another resolution) is refused, naming the gate; point-cloud victims (any number of voxels)
    count their own units."""
    if not _free_dims(model) and getattr(model, "_cost_profile", None) is not None:
        _check_unit_counts(model, trace, model._cost_profile)
    family_rule = getattr(model, "executed_flops", None)
    if family_rule is not None:
        return family_rule(trace)
    prof = profile(model)
    if not len(trace):
        raise DynattackError("the trace holds no gate event: run the forward inside `with Trace()`")
    device = trace.events[0].decision.device
    total = None
    for events, batch in _forwards(trace):
        part = _forward_flops(model, prof, events, batch, device)
        if total is not None and part.shape != total.shape:
            raise DynattackError("the trace holds forwards of different batch sizes: count each on its own trace")
        total = part if total is None else total + part
    return total


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
