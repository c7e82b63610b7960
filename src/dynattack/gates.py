"""The gate: every input-dependent decision of a victim, and the trace that records them.

A gate turns a logit tensor ``q`` of shape ``(B, *unit_shape)`` into the mask the victim
multiplies its computation by. The decision is ``q >= 0``; the bounded value ``G = value_fn(q)``
crosses the threshold ``tau`` exactly there (SkipNet: ``G = sigmoid(q)``, ``tau = 0.5``).

How decisions behave is a model-wide mode, set with :func:`gate_mode`:

=========  ===========================  ====================================
mode       forward mask                 backward
=========  ===========================  ====================================
hard       ``1[q >= 0]``                none through the decision (FGM)
lgm        ``sigmoid(lam * q)``         through the sigmoid (LGM)
lgm_st     ``1[q >= 0]``                as ``sigmoid(lam * q)``
train      the family's estimator       its own (default straight-through)
=========  ===========================  ====================================

While a :class:`Trace` is recording, every gate call appends a :class:`GateEvent`. Attacks,
metrics and reports read traces and model outputs, nothing else.

What a network declares, once, where it is defined (:mod:`dynattack.cost` measures the rest and
states the whole contract): each decision is a ``Gate`` called once per forward; ``controls``:
the modules whose output its units decide; ``feeds``: modules whose input channels its units
are (a conv between two channel gates); ``within``: the gate enclosing it where the structure
does not show it (an exit after an earlier exit); ``experts``: the modules of a routing gate's
last unit axis (top-k experts); ``tokens``: the dimension of the controlled modules' inputs
that holds the gate's units, tokens the real path drops (a module then costs a measured
function of its active tokens); ``gate(q, rows=idx)``: a call on the rows of
the batch still running (a batched early exit), which the event keeps (:meth:`GateEvent.full`
puts them back in their rows of the whole batch).

This module imports nothing else of the package.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

MODES = ("hard", "lgm", "lgm_st", "train")
FORCES = (None, "on", "off")

_active_traces: contextvars.ContextVar[tuple] = contextvars.ContextVar("dynattack_traces", default=())


@dataclass
class GateEvent:
    """One gate call. Tensors have shape ``(B, *unit_shape)`` unless said otherwise."""

    name: str
    logit: torch.Tensor  # q, still attached to the graph
    value: torch.Tensor  # G = value_fn(q), attached to the graph
    tau: float
    decision: torch.Tensor  # bool: does the unit run in the hard network (forced gates included)
    mask: torch.Tensor  # what the forward multiplied by in the current mode
    unit_cost: torch.Tensor | None  # FLOPs one unit runs when on, broadcastable to unit_shape
    # rows of the full batch this call ran on (a gate called on the rows still running), None:
    # every row; keyword-only so that event subclasses may add fields without defaults
    rows: torch.Tensor | None = field(default=None, kw_only=True)

    @property
    def units(self) -> int:
        """Units per sample."""
        return math.prod(self.logit.shape[1:])

    def full(self, attr: str, batch: int, fill) -> torch.Tensor:
        """``(batch, *unit_shape)``: one field of the event with the rows it ran on in place and
        ``fill`` in the rows it did not run on (differentiable through the rows that ran)."""
        t = getattr(self, attr)
        if self.rows is None:
            return t
        return t.new_full((batch, *t.shape[1:]), fill).index_copy(0, self.rows, t)


class Trace:
    """Records every gate event of the forward passes run inside ``with Trace() as t:``.

    Traces nest: an inner trace does not hide events from an outer one.
    """

    def __init__(self) -> None:
        self.events: list[GateEvent] = []
        # per-sample input shapes of the traced forwards of models that report them
        # (:func:`record_input`; ``cost.calibrate`` installs the hook that does)
        self.input_shapes: list[tuple[int, ...]] = []
        # per traced forward of such a model: its batch size and the index of its first event
        self.batch_sizes: list[int] = []
        self.forward_starts: list[int] = []
        self._token = None

    def __enter__(self) -> "Trace":
        self._token = _active_traces.set(_active_traces.get() + (self,))
        return self

    def __exit__(self, *exc) -> None:
        _active_traces.reset(self._token)

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[GateEvent]:
        return iter(self.events)

    def clear(self) -> None:
        self.events.clear()
        self.input_shapes.clear()
        self.batch_sizes.clear()
        self.forward_starts.clear()

    def batch_size(self) -> int:
        """Rows of the traced batch: as recorded by :func:`record_input`, else the rows of the
        first event called on the whole batch."""
        if self.batch_sizes:
            return self.batch_sizes[0]
        for e in self.events:
            if e.rows is None:
                return e.logit.shape[0]
        raise ValueError("the trace does not tell its batch size: every gate ran on a sub-batch "
                         "of a forward without the input hook cost.calibrate installs")

    def flat(self, attr: str) -> torch.Tensor:
        """``(B, total_units)``: one field (logit, value, decision, mask) of every event,
        flattened per sample and concatenated in call order. Rows a sub-batch gate call did not
        run on hold 0 (False for decisions)."""
        n = self.batch_size() if self.events else 0
        fill = False if attr == "decision" else 0.0
        return torch.cat([e.full(attr, n, fill).reshape(n, -1) for e in self.events], dim=1)


def tracing() -> bool:
    """Whether a :class:`Trace` is recording (a gate may skip building its event otherwise)."""
    return bool(_active_traces.get())


def record(event: GateEvent) -> None:
    """Append ``event`` to every recording trace (gates with their own event type call this)."""
    for trace in _active_traces.get():
        trace.events.append(event)


def record_input(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: note the per-sample shape of the model's input in every recording trace,
    so FLOPs counted from the trace can be checked against the shape they were calibrated at."""
    if tracing() and args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
        for trace in _active_traces.get():
            trace.input_shapes.append(tuple(args[0].shape[1:]))
            trace.batch_sizes.append(args[0].shape[0])
            trace.forward_starts.append(len(trace.events))


def _straight_through(gate: "Gate", logit: torch.Tensor) -> torch.Tensor:
    """Hard forward, gradient of the gate value (SkipNet's SP estimator)."""
    soft = gate.value_fn(logit)
    hard = gate.decide(logit).to(logit.dtype)
    return hard + (soft - soft.detach())  # brackets: the forward value is exactly 0 or 1


class Gate(nn.Module):
    """A parameter-free module that turns a logit into the mask of its units.

    Args:
        value_fn: maps a logit to the bounded gate value G (default sigmoid, with ``tau`` 0.5).
        tau: the threshold on G; ``value_fn(0)`` must equal ``tau``.
        train_estimator: ``f(gate, logit) -> mask`` used in ``train`` mode (default: straight-through).
        controls: the modules whose output this gate's units decide (a block, a conv's output
            channels, its output positions); their FLOPs split evenly over the units.
            :func:`dynattack.cost.calibrate` measures them. Not registered as submodules.
        feeds: modules whose *input* side this gate's units are (the next conv reads only the
            channels this gate kept): such a module costs its FLOPs x active-in / units x
            active-out / units of the gate controlling it (1 when none does).
        within: the gate whose decision encloses this one (an exit after an earlier exit): a
            unit runs only where that gate's unit is on too (its unit shape a prefix of this
            one's). Needed only where calibration cannot see it: a gate called inside a module
            another gate controls, or controlling a module inside one, is nested there.
        experts: routing (mixture of experts): expert ``e`` runs on the units ``[..., e]`` of this
            gate (unit shape ``(T, E)``: token t goes through expert e); it costs its FLOPs x its
            active units / its units. "All on" is every token through every expert.
        strict: decide ``q > 0`` instead of ``q >= 0`` (the two differ only at an exact tie),
            for families whose official rule is strict (SkipNet: ``sigmoid(q) > 0.5``).
        tokens: token halting or dropping: the units (unit shape ``(T,)``) are the tokens on
            dimension ``tokens`` of the inputs of each module in ``controls``, which the real
            path runs on the active tokens only; such a module's cost is then not split evenly
            over the units but measured as a function of the number of active tokens (attention
            is quadratic in it).
    """

    def __init__(
        self,
        value_fn: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid,
        tau: float = 0.5,
        train_estimator: Callable[["Gate", torch.Tensor], torch.Tensor] | None = None,
        controls: list[nn.Module] | None = None,
        strict: bool = False,
        feeds: list[nn.Module] | None = None,
        within: "Gate | None" = None,
        experts: list[nn.Module] | None = None,
        tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.value_fn = value_fn
        self.strict = bool(strict)
        self.tau = float(tau)
        self.train_estimator = train_estimator or _straight_through
        self.controls: list[nn.Module] = list(controls or [])  # plain list: not submodules
        self.feeds: list[nn.Module] = list(feeds or [])
        self.experts: list[nn.Module] = list(experts or [])
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"Gate(tokens=...) is the token dimension of the controlled modules' inputs "
                             f"(an int >= 1, after the batch dimension 0), got {tokens!r}")
        self.tokens = tokens
        self._within = [within] if within is not None else []  # a list: not a submodule
        self.mode = "hard"
        self.lam = 1.0
        self.force: str | None = None
        self.name = ""
        self.unit_cost: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"name={self.name!r}, tau={self.tau}, mode={self.mode}"

    def decide(self, logit: torch.Tensor) -> torch.Tensor:
        """The hard decision of each unit (bool): ``q >= 0``, or ``q > 0`` when ``strict``."""
        return logit > 0 if self.strict else logit >= 0

    @property
    def within(self) -> "Gate | None":
        return self._within[0] if self._within else None

    def forward(self, logit: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The mask of ``logit`` ``(n, *unit_shape)``. ``rows``: the rows of the full batch these
        ``n`` are (a gate called on the rows still running, as a batched early exit calls it);
        rows it is not called on run none of its units."""
        hard = self.decide(logit)
        if self.force is not None:
            decision = torch.full_like(hard, self.force == "on")
            mask = decision.to(logit.dtype)
        elif self.mode == "hard":
            decision, mask = hard, hard.to(logit.dtype)
        elif self.mode == "lgm":
            decision, mask = hard, torch.sigmoid(self.lam * logit)
        elif self.mode == "lgm_st":
            soft = torch.sigmoid(self.lam * logit)
            decision, mask = hard, hard.to(logit.dtype) + (soft - soft.detach())
        else:  # train: the estimator may sample (REINFORCE, Gumbel); what it ran is the decision
            mask = self.train_estimator(self, logit)
            decision = mask.detach() >= 0.5
        if tracing():
            record(GateEvent(
                name=self.name or f"gate@{id(self):x}",
                logit=logit,
                value=self.value_fn(logit),
                tau=self.tau,
                decision=decision.detach(),
                mask=mask,
                unit_cost=self.unit_cost,
                rows=None if rows is None else rows.detach(),
            ))
        return mask


def iter_gates(model: nn.Module) -> Iterator[tuple[str, Gate]]:
    """Yield ``(qualified name, gate)`` for every gate of ``model``, naming unnamed gates."""
    for name, module in model.named_modules():
        if isinstance(module, Gate):
            if not module.name:
                module.name = name
            yield name, module


@contextlib.contextmanager
def gate_mode(model: nn.Module, mode: str = "hard", lam: float | None = None, force: str | None = None):
    """Set the mode (and LGM slope ``lam``, and ``force`` = None/'on'/'off') of every gate of
    ``model`` for the duration of the block, then restore what was there."""
    if mode not in MODES:
        raise ValueError(f"unknown gate mode {mode!r}; expected one of {', '.join(MODES)}")
    if force not in FORCES:
        raise ValueError(f"unknown force {force!r}; expected None, 'on' or 'off'")
    if lam is not None and not lam > 0:
        raise ValueError(f"the LGM slope lam must be > 0, got {lam}")
    gates = [g for _, g in iter_gates(model)]
    saved = [(g.mode, g.lam, g.force) for g in gates]
    for g in gates:
        g.mode, g.force = mode, force
        if lam is not None:
            g.lam = float(lam)
    try:
        yield model
    finally:
        for g, (m, l, f) in zip(gates, saved):
            g.mode, g.lam, g.force = m, l, f


def force_gates(model: nn.Module, force: str = "on"):
    """Every gate of ``model`` on (or off) in hard mode: the static network, for full FLOPs and latency."""
    return gate_mode(model, "hard", force=force)


@contextlib.contextmanager
def force_named(model: nn.Module, on=(), off=()):
    """Hard mode for every gate of ``model``; the gates named in ``on`` forced on, those in ``off``
    forced off, every other gate deciding naturally (``q >= 0``), for the duration of the block.
    Names are the gates' names (:func:`iter_gates`); an unknown name is an error."""
    on, off = set(on), set(off)
    gates = dict((g.name, g) for _, g in iter_gates(model))
    unknown = sorted((on | off) - set(gates))
    if unknown:
        raise ValueError(f"no gate named {', '.join(unknown)}; the model's gates: {', '.join(gates)}")
    if on & off:
        raise ValueError(f"gates forced both on and off: {', '.join(sorted(on & off))}")
    saved = [(g, g.mode, g.force) for g in gates.values()]
    for name, g in gates.items():
        g.mode = "hard"
        g.force = "on" if name in on else "off" if name in off else None
    try:
        yield model
    finally:
        for g, m, f in saved:
            g.mode, g.force = m, f
