"""The attack base shared by every attack: one batched loop with per-sample state.

An attack subclasses :class:`Attack` (energy attacks: :class:`EnergyAttack`; accuracy attacks:
:class:`AccuracyAttack`) and fills in four hooks; the loop, the bookkeeping and the result live
here, once:

``init_state(images, labels, clean) -> dict``
    per-sample tensors with a leading batch dimension (perturbation, optimiser moments...).
``forward_input(state, idx) -> (x_in, leaf)``
    the input the gradient forward runs on, for the rows ``idx`` still active, built
    differentiably from ``leaf`` (a fresh tensor with ``requires_grad``).
``step(state, idx, leaf, fwd, keep, it) -> dict``
    take the gradient(s) from ``fwd`` (logits, trace, gate units, evaluation) and update the
    rows ``idx[keep]``; return per-row statistics for the history.
``candidate(state, idx) -> x``
    the adversarial input the attack would return now (no gradient).

Per iteration the loop runs one forward on the active rows only, evaluates it on the hard network
(the gradient forward itself when the gates are hard and the forward input is the candidate, so
no extra forward), keeps each sample's best input (:meth:`Attack.score`, ties broken by the lower
L2 distortion), stops the samples :meth:`Attack.should_stop` says are done, and lets the attack
update the rest. Nothing loops over samples in Python. An attack whose first forward runs the hard
network on the clean inputs (``starts_at_clean``: I-FGSM without a random start) takes iteration 0
from the clean evaluation's forward: ``steps`` iterations cost ``steps`` forwards with a graph and
one more to evaluate the last update.

The victim is any ``nn.Module`` mapping ``(B, ...)`` inputs to logits whose gates record into a
:class:`~dynattack.gates.Trace`. Attacks read the trace and the logits only: this module (and every
attack) imports no model family.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .. import cost, metrics
from ..errors import DynattackError
from ..gates import Trace, gate_mode
from ..prediction import prediction

# --------------------------------------------------------------------------- parameter checks


def check_int(owner: str, name: str, value, minimum: int | None = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise DynattackError(f"{owner}: {name} must be an integer{bound}, got {value!r}")
    return value


def check_positive(owner: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise DynattackError(f"{owner}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_bool(owner: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise DynattackError(f"{owner}: {name} must be True or False, got {value!r}")
    return value


def check_points(owner: str, model: nn.Module, points, labels, labels_required: bool):
    """Validate a point batch ``(B, N, 3 + F + 1)`` against the victim (dtype, and the column
    count of ``model.input_shape`` where declared: :func:`dynattack.cost.check_input`) and optional
    per-point labels ``(B, N)`` (the classifiers' ``(B,)`` check does not apply; their range is
    checked after the clean forward, ``-1`` = ignored); returns detached copies on the model's device."""
    if not isinstance(points, torch.Tensor) or not points.is_floating_point() or points.dim() != 3 \
            or points.shape[2] < 4:
        raise DynattackError(f"{owner}: points must be a floating tensor (B, N, 3 + features + 1)")
    cost.check_input(model, points, owner)
    if points.shape[0] == 0 or not torch.isfinite(points).all():
        raise DynattackError(f"{owner}: points must be a non-empty batch of finite values")
    if labels is None:
        if labels_required:
            raise DynattackError(f"{owner}: this attack needs per-point labels: atk(points, labels)")
    elif not _integer_tensor(labels) or labels.shape != points.shape[:2]:
        raise DynattackError(f"{owner}: labels must be an integer tensor (B, N) = {tuple(points.shape[:2])}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else points.device
    labels = None if labels is None else labels.detach().to(device).long().clone()
    return points.detach().to(device).clone(), labels


def _integer_tensor(labels) -> bool:
    return isinstance(labels, torch.Tensor) and not labels.is_floating_point() and not labels.is_complex() \
        and labels.dtype != torch.bool


def check_label_range(owner: str, labels: torch.Tensor, classes: int, ignore: int | None = None) -> None:
    """Raise unless every label lies in ``[0, classes)`` (or equals ``ignore``)."""
    valid = (labels >= 0) & (labels < classes)
    if ignore is not None:
        valid |= labels == ignore
    if not bool(valid.all()):
        bad = labels[~valid][0].item()
        also = f" or {ignore} (ignored)" if ignore is not None else ""
        raise DynattackError(f"{owner}: labels must lie in [0, {classes}){also}, got {bad}")


# --------------------------------------------------------------------------- gates as flat units


@dataclass
class GateUnits:
    """Every unit of every gate event of one forward, flattened per sample (call order)."""

    value: torch.Tensor  # (n, U) gate values G, attached to the graph when the forward was
    tau: torch.Tensor  # (U,) thresholds
    weight: torch.Tensor  # (U,) lambda_u = unit cost / total gated cost (sums to 1)
    on: torch.Tensor  # (n, U) bool: the unit runs in the hard network
    names: list[str]  # one per event
    sizes: list[int]  # units per sample of each event

    @property
    def all_on(self) -> torch.Tensor:
        """``(n,)`` bool: every unit that costs FLOPs runs (units without cost cannot add any)."""
        return (self.on | (self.weight == 0)).all(dim=1)


def gate_units(trace: Trace, n: int, device: torch.device | None = None) -> GateUnits:
    """Flatten a trace. Units of one event share its ``unit_cost`` unless that has a unit shape.
    A row a sub-batch gate call did not run on (``GateEvent.rows``) ran none of its units: off,
    with the constant value 0 (no gradient; the enclosing gate's units carry it)."""
    values, taus, costs, ons, names, sizes = [], [], [], [], [], []
    for e in trace:
        if e.unit_cost is None:
            raise DynattackError(f"gate {e.name} has no unit cost: calibrate the model (dynattack.cost.calibrate)")
        unit_shape = e.logit.shape[1:]
        k = e.units
        values.append(e.full("value", n, 0.0).reshape(n, k))
        ons.append(e.full("decision", n, False).reshape(n, k))
        taus.append(torch.full((k,), float(e.tau), device=e.logit.device))
        uc = torch.as_tensor(e.unit_cost, dtype=torch.float64, device=e.logit.device)
        costs.append(uc.expand(unit_shape).reshape(k))
        names.append(e.name)
        sizes.append(k)
    if not values:
        empty = torch.zeros(n, 0, device=device)
        return GateUnits(empty, empty[0], empty[0].double(), empty.bool(), [], [])
    cost_all = torch.cat(costs)
    total = cost_all.sum()
    weight = (cost_all / total if total > 0 else torch.zeros_like(cost_all)).to(values[0].dtype)
    return GateUnits(torch.cat(values, 1), torch.cat(taus).to(values[0].dtype), weight, torch.cat(ons, 1), names, sizes)


def trace_logits(trace: Trace, n: int) -> torch.Tensor:
    """``(n, U)`` every gate logit of a forward, flattened per sample in call order (a row a
    sub-batch gate call did not run on holds 0)."""
    return torch.cat([e.full("logit", n, 0.0).reshape(n, -1) for e in trace], 1)


def complexity_loss(units: GateUnits, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``(n,)`` GradAuto's complexity loss ``sum_u lambda_u relu(tau_u - G_u)`` (Eq. 6/8),
    ``lambda_u`` the unit's share of the gated FLOPs (``units.weight``) unless ``weight`` is given."""
    return (torch.relu(units.tau - units.value) * (units.weight if weight is None else weight)).sum(1)


def finished_loss(units: GateUnits, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``(n,)`` GradAuto's finished loss ``-sum_u lambda_u relu(G_u - tau_u)`` (Eq. 20)."""
    return -(torch.relu(units.value - units.tau) * (units.weight if weight is None else weight)).sum(1)


def vjp(loss: torch.Tensor, leaf: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
    """Gradient of ``loss.sum()`` w.r.t. ``leaf``; zeros where the loss does not depend on it.

    Samples of a batch are independent in an eval-mode victim, so one vector-Jacobian product
    of the summed per-sample losses yields every sample's own gradient.
    """
    if not loss.requires_grad:
        return torch.zeros_like(leaf)
    (g,) = torch.autograd.grad(loss.sum(), leaf, retain_graph=retain_graph, allow_unused=True)
    return torch.zeros_like(leaf) if g is None else g


def per_sample_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(n,)`` tensor to broadcast over ``like``'s ``(n, ...)``."""
    return v.view(-1, *([1] * (like.dim() - 1)))


class PerSampleAdam:
    """Adam (``torch.optim.Adam``'s update) on a ``(B, ...)`` tensor in place, with moments and
    step count per sample: a sample that pauses or stops does not age the others' state."""

    def __init__(self, param: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.param = param
        self.b1, self.b2 = betas
        self.eps = eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = torch.zeros(param.shape[0], dtype=torch.long, device=param.device)
        self.lr = float(lr)

    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Descend along ``grad`` (one row per entry of ``rows``)."""
        if rows.numel() == 0:
            return
        t = self.t[rows] + 1
        m = self.m[rows].mul_(self.b1).add_(grad, alpha=1 - self.b1)
        v = self.v[rows].mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        bc1 = per_sample_view(1 - self.b1 ** t.to(grad.dtype), grad)
        bc2 = per_sample_view(1 - self.b2 ** t.to(grad.dtype), grad)
        self.param[rows] = self.param[rows] - self.lr / bc1 * m / ((v / bc2).sqrt() + self.eps)
        self.m[rows], self.v[rows], self.t[rows] = m, v, t


# --------------------------------------------------------------------------- evaluation & result


@dataclass
class Evaluation:
    """What the hard network did on some rows."""

    logits: torch.Tensor  # (n, classes), detached
    pred: torch.Tensor  # (n,)
    flops: torch.Tensor  # (n,) float64 executed FLOPs
    all_on: torch.Tensor  # (n,) bool: every costed gated unit runs
    gate_value: torch.Tensor  # (n, gates) mean gate value G per gate event
    gate_on: torch.Tensor  # (n, gates) fraction of each gate's units that run
    gate_names: list[str] = field(default_factory=list)


@dataclass
class Forward:
    """One gradient forward handed to :meth:`Attack.step`."""

    x: torch.Tensor  # the input it ran on (attached to ``leaf``)
    logits: torch.Tensor  # attached to the graph
    trace: Trace  # attached to the graph, detached where the attack's ``gate_gradients`` is False
    units: GateUnits  # values attached to the graph (likewise)
    ev: Evaluation  # the hard network's verdict on ``x`` (on the candidate, for ILFO on x as run)


@dataclass
class AttackResult:
    """Per-sample outcome of one attack call. All per-sample tensors have shape ``(B,)``.

    Iteration ``t`` is the input after ``t`` updates (``0``: the clean input); ``history[k][t]``
    describes the input the gradient forward ran at iteration ``t``.

    * ``flops_adv``, ``adv_pred``, ``recovery``, ``psnr``, ``l2``, ``linf`` and ``success``
      describe the returned input ``adv``, evaluated on the hard network.
    * ``iterations``: updates applied to the sample: the updates before it stopped when early
      stop stopped it, else ``steps`` (ILFO always runs all of them, as its authors do).
    * ``success_iteration``: the first iteration whose evaluated input met the goal, ``-1`` if
      none did. Which input is evaluated per iteration is ``success_iteration_of``:
      ``"candidate"``: the kind of input the attack returns (each iterate is a candidate, and
      the one after the last update is evaluated too, as iteration ``steps``); ``"iterate"``:
      the input the gradient forward ran, not the kind returned (ILFO optimises unclipped
      ``x + delta`` and returns ``clamp(x + delta, 0, 1)`` of its last iterate, evaluated once).
      Then ``success`` (the returned input) and ``success_iteration`` (the iterates run)
      describe different inputs and may disagree either way.
    * ``psnr`` is ``+inf`` for a sample returned unchanged (nothing to recover, or nothing
      better found than the clean input); :attr:`psnr_db` is the aggregate summary.json reports.
    """

    adv: torch.Tensor  # (B, ...) best adversarial inputs found
    flops_clean: torch.Tensor  # float64
    flops_adv: torch.Tensor  # float64
    flops_full: torch.Tensor  # float64, every gate on
    recovery: torch.Tensor  # % of the saved FLOPs won back; NaN where the clean input ran everything
    psnr: torch.Tensor  # dB, inputs in [0, 1]; +inf where adv == clean
    l2: torch.Tensor
    linf: torch.Tensor
    iterations: torch.Tensor  # long: updates applied to the sample (early stop counts here)
    success_iteration: torch.Tensor  # long: first iteration whose evaluated input met the goal, -1 never
    success: torch.Tensor  # bool: the returned input meets the attack's goal
    clean_pred: torch.Tensor
    adv_pred: torch.Tensor
    labels: torch.Tensor | None = None
    attack: str = ""
    params: dict = field(default_factory=dict)
    seconds: float = 0.0
    gate_names: list[str] = field(default_factory=list)
    # per-iteration history (history=True): name -> (T, B, ...) tensor, NaN where a sample was
    # not run. Always: flops, l2, gate_value (T, B, gates), gate_on (T, B, gates), active (bool);
    # plus what the attack's step reports (losses, gradient norms, angles).
    history: dict[str, torch.Tensor] | None = None
    success_iteration_of: str = "candidate"  # or "iterate": see the class docstring

    def __len__(self) -> int:
        return self.adv.shape[0]

    @property
    def recovery_pct(self) -> float:
        """Aggregate recovery: (sum F_adv - sum F_clean) / (sum F_full - sum F_clean) * 100."""
        return cost.recovery_aggregate(self.flops_clean, self.flops_adv, self.flops_full)

    @property
    def psnr_db(self) -> float:
        """Mean PSNR (dB) over the samples the attack changed, as summary.json's ``psnr_db``
        (:func:`dynattack.metrics.psnr_mean`): unchanged samples (``+inf``) are left out, not
        capped; nan when no sample changed."""
        return metrics.psnr_mean(self.psnr)[0]


class _Best:
    """Best-so-far input per sample: higher score first, then lower L2 distortion."""

    def __init__(self, images: torch.Tensor, clean: Evaluation, score: torch.Tensor, success: torch.Tensor) -> None:
        self.images = images
        self.adv = images.clone()
        self.score = score.double().clone()
        self.l2 = torch.zeros(images.shape[0], dtype=torch.float64, device=images.device)
        self.flops = clean.flops.clone()
        self.pred = clean.pred.clone()
        self.success = success.clone()
        self.first = torch.where(success, 0, -1)

    def offer(self, idx, x, ev: Evaluation, score, success, it: int, force: bool = False) -> None:
        l2 = metrics.l2(self.images[idx], x)
        score = score.double()
        old_s, old_l2 = self.score[idx], self.l2[idx]
        tol = 1e-12 * old_s.abs().clamp_min(1.0)  # equal FLOPs sums may differ in the last bits
        better = (score > old_s + tol) | ((score >= old_s - tol) & (l2 < old_l2))
        if force:
            better = torch.ones_like(better)
        rows = idx[better]
        self.adv[rows] = x[better]
        self.score[rows], self.l2[rows] = score[better], l2[better]
        self.flops[rows], self.pred[rows], self.success[rows] = ev.flops[better], ev.pred[better], success[better]
        hit = success & (self.first[idx] < 0)
        self.first[idx[hit]] = it


class _EvalBatchNorm(torch.autograd.Function):
    """Eval-mode batch norm: PyTorch's own forward (the same output, bit for bit) and the closed-form
    input gradient ``g * weight / sqrt(running_var + eps)`` as backward. PyTorch's CPU kernel for
    that backward costs about ten times the forward (bench/results/energy_speed_*.md), a sixth of
    each backward of a ResNet-style victim. Gradients w.r.t. the BatchNorm parameters are not
    given: attacks differentiate w.r.t. the input only."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps):
        scale = torch.rsqrt(var + eps)
        ctx.save_for_backward(scale if weight is None else scale * weight)
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, g):
        (scale,) = ctx.saved_tensors
        return g * scale.view(1, -1, *([1] * (g.dim() - 2))), None, None, None, None, None


def _eval_batch_norm(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if module.training or module.running_mean is None or module.running_var is None or not torch.is_grad_enabled():
        return type(module).forward(module, x)
    module._check_input_dim(x)
    return _EvalBatchNorm.apply(x, module.running_mean, module.running_var, module.weight, module.bias, module.eps)


@contextlib.contextmanager
def victim_context(model: nn.Module):
    """Eval mode and hard gates for the duration; every module's training flag and every gate's
    mode, slope and force are restored afterwards, even on error. Standard BatchNorm modules (whose
    class keeps ``_BatchNorm.forward``) run :class:`_EvalBatchNorm` meanwhile: same outputs, a
    cheaper input gradient."""
    flags = [(m, m.training) for m in model.modules()]
    plain = nn.modules.batchnorm._BatchNorm.forward
    norms = [m for m in model.modules() if type(m).forward is plain and "forward" not in vars(m)]
    model.eval()
    try:
        for m in norms:
            m.forward = functools.partial(_eval_batch_norm, m)
        with gate_mode(model, "hard"):
            yield model
    finally:
        for m in norms:
            vars(m).pop("forward", None)
        for m, training in flags:
            m.training = training


# --------------------------------------------------------------------------- the base


class Attack:
    """Base of every attack. ``res = atk(images)`` (energy) or ``atk(images, labels)`` (accuracy).

    Args:
        model: the victim: ``(B, ...)`` inputs in [0, 1] -> logits; its gates record into traces.
        steps: iterations (gradient forwards) at most.
        seed: seeds ``self.generator`` afresh at every call (random starts, pixel masks).
        early_stop: stop each sample once :meth:`goal` holds (see :meth:`should_stop`).
        history: record per-iteration, per-sample figures into ``AttackResult.history``.
        progress: show a tqdm progress bar.
        criterion: ``f(ev, labels) -> (n,)`` score, higher is better, replacing :meth:`score` to
            choose each sample's best input (ties: lower L2).
    """

    name = "attack"
    requires_labels = False
    grad_gate_mode = "hard"  # gate mode of the gradient forward; evaluation is always hard
    grad_lam: float | None = None
    # The gradient forward runs on the input the attack would return. False (ILFO: it runs unclipped
    # inputs) disables per-iteration best-keeping and early stop: the final candidate is returned.
    evaluates_candidate = True
    # What ``AttackResult.success_iteration`` is the first success of: "candidate" (the evaluated
    # candidates) or "iterate" (the inputs the gradient forward ran; see :meth:`success_iterations`).
    success_iteration_of = "candidate"
    # False: each sample keeps its LAST evaluated input (the final iterate, or the one it stopped
    # at) instead of its best; ``success`` then describes that input.
    keep_best = True
    # True: the first gradient forward runs on the clean inputs themselves (I-FGSM without a random
    # start). With FGM's hard gates that forward IS the clean evaluation: it is run once, with its
    # graph, and iteration 0 takes its gradient from it (checked: same rows, same values).
    starts_at_clean = False
    # False: ``step`` differentiates the logits only (accuracy attacks), not the trace's gate logits
    # and values; the trace is then detached after the forward, so what only the gates' logits
    # needed (block activations the gate heads pooled) is freed before the backward, not after it.
    gate_gradients = True
    input_range: tuple[float, float] | None = (0.0, 1.0)  # None: no range check (e.g. points in metres)
    ignore_label: int | None = None  # a label value that marks "no label" (points: -1)

    def __init__(
        self,
        model: nn.Module,
        *,
        steps: int,
        seed: int = 0,
        early_stop: bool = False,
        history: bool = False,
        progress: bool = True,
        criterion: Callable[[Evaluation, torch.Tensor | None], torch.Tensor] | None = None,
    ) -> None:
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise DynattackError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}")
        if criterion is not None and not callable(criterion):
            raise DynattackError(f"{owner}: criterion must be callable")
        self.model = model
        self.steps = check_int(owner, "steps", steps, 0)
        self.seed = check_int(owner, "seed", seed, None)
        self.early_stop = check_bool(owner, "early_stop", early_stop)
        self.history = check_bool(owner, "history", history)
        self.progress = check_bool(owner, "progress", progress)
        self.criterion = criterion
        self.generator: torch.Generator | None = None

    # ---- hooks ---------------------------------------------------------------------------
    def params(self) -> dict:
        """The attack's settings, for result files."""
        return {"steps": self.steps, "seed": self.seed, "early_stop": self.early_stop}

    @property
    def total_steps(self) -> int:
        """Iterations the loop may run: ``steps``, and more for an attack with a phase after them."""
        return self.steps

    def init_state(self, images: torch.Tensor, labels: torch.Tensor | None, clean: Evaluation) -> dict:
        raise NotImplementedError

    def forward_input(self, state: dict, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def step(self, state: dict, idx: torch.Tensor, leaf: torch.Tensor, fwd: Forward, keep: torch.Tensor, it: int) -> dict:
        raise NotImplementedError

    def candidate(self, state: dict, idx: torch.Tensor) -> torch.Tensor:
        x, _ = self.forward_input(state, idx)
        return x.detach()

    def success_iterations(self, state: dict, first_candidate: torch.Tensor) -> torch.Tensor:
        """``(B,)`` long ``AttackResult.success_iteration``: by default the first iteration whose
        evaluated candidate met the goal (``first_candidate``); an attack whose candidates are
        not evaluated per iteration (``success_iteration_of = "iterate"``) returns its own."""
        return first_candidate

    def check_victim(self, clean: Evaluation) -> None:
        """Raise :class:`DynattackError` when the victim cannot be attacked (seen on clean inputs)."""

    def goal(self, ev: Evaluation, labels: torch.Tensor | None) -> torch.Tensor:
        """``(n,)`` bool: the sample is fully attacked."""
        raise NotImplementedError

    def score(self, ev: Evaluation, labels: torch.Tensor | None) -> torch.Tensor:
        """``(n,)`` how good an input is (higher is better; ties go to the lower L2)."""
        raise NotImplementedError

    def should_stop(self, state: dict, idx: torch.Tensor, ev: Evaluation, labels: torch.Tensor | None) -> torch.Tensor:
        """``(n,)`` bool: rows to stop now (their current input is kept, no update applied)."""
        if not self.early_stop:
            return torch.zeros_like(ev.all_on)
        return self.goal(ev, labels)

    # ---- machinery -----------------------------------------------------------------------
    def _score(self, ev: Evaluation, labels):
        return (self.criterion or self.score)(ev, labels)

    def _check_inputs(self, images, labels):
        """Inputs against the victim (:func:`dynattack.cost.check_input`: dtype, shape), non-empty,
        finite, in ``input_range``; labels an integer tensor ``(B,)`` (their range is checked after
        the clean forward, :meth:`_check_labels`). Returns detached copies on the model's device."""
        owner = type(self).__name__
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() < 2:
            raise DynattackError(f"{owner}: images must be a floating tensor (B, C, H, W)")
        cost.check_input(self.model, images, owner)
        if images.shape[0] == 0:
            raise DynattackError(f"{owner}: empty batch")
        if not torch.isfinite(images).all():
            raise DynattackError(f"{owner}: inputs must be finite")
        if self.input_range is not None:
            lo, hi = self.input_range
            if images.min() < lo or images.max() > hi:
                raise DynattackError(f"{owner}: inputs must lie in [{lo}, {hi}] (normalisation lives in the victim)")
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else images.device
        images = images.detach().to(device).clone()
        if labels is None:
            if self.requires_labels:
                raise DynattackError(f"{owner}: this attack needs labels: atk(images, labels)")
        else:
            if not _integer_tensor(labels) or labels.shape != images.shape[:1]:
                raise DynattackError(f"{owner}: labels must be an integer tensor of shape ({images.shape[0]},)")
            labels = labels.detach().to(device).long().clone()
        return images, labels

    def _check_labels(self, labels: torch.Tensor | None, clean: Evaluation) -> None:
        """Labels within ``[0, model.num_classes)`` where the model declares it, else within the
        width of its logits (the class dimension 1: ``(B, classes)`` or ``(B, classes, N)``)."""
        if labels is not None:
            classes = getattr(self.model, "num_classes", None) or clean.logits.shape[1]
            check_label_range(type(self).__name__, labels, int(classes), self.ignore_label)

    def _evaluation(self, logits: torch.Tensor, trace: Trace, units: GateUnits, full: float) -> Evaluation:
        n = logits.shape[0]
        with torch.no_grad():
            if len(trace):
                flops = cost.executed_flops(self.model, trace).to(logits.device, torch.float64)
            else:  # a static victim runs everything
                flops = torch.full((n,), full, dtype=torch.float64, device=logits.device)
            dev = logits.device
            gv = [e.full("value", n, 0.0).detach().reshape(n, -1).float().mean(1) for e in trace]
            go = [e.full("decision", n, False).reshape(n, -1).float().mean(1) for e in trace]
            gv = torch.stack(gv, 1) if gv else torch.zeros(n, 0, device=dev)
            go = torch.stack(go, 1) if go else torch.zeros(n, 0, device=dev)
            return Evaluation(logits.detach(), logits.detach().argmax(1), flops, units.all_on, gv, go, units.names)

    def _evaluate(self, x: torch.Tensor, full: float) -> Evaluation:
        """The hard network on ``x``, no gradient."""
        with torch.no_grad(), Trace() as trace:
            logits = prediction(self.model, self.model(x))
        return self._evaluation(logits, trace, gate_units(trace, x.shape[0], x.device), full)

    def _gradient_forward(self, x_in: torch.Tensor, full: float) -> Forward:
        """The gradient forward on ``x_in`` (in the mode ``grad_gate_mode``) and the hard network's
        verdict on it: the forward itself when the gates are hard, else one more, hard, forward."""
        hard = self.grad_gate_mode == "hard"
        mode = contextlib.nullcontext() if hard else gate_mode(self.model, self.grad_gate_mode, lam=self.grad_lam)
        with mode, Trace() as trace:
            logits = prediction(self.model, self.model(x_in))
        if not self.gate_gradients:
            for event in trace:
                for key, value in vars(event).items():
                    if isinstance(value, torch.Tensor) and value.requires_grad:
                        setattr(event, key, value.detach())
        units = gate_units(trace, x_in.shape[0], x_in.device)
        if hard:
            ev = self._evaluation(logits, trace, units, full)
        else:  # the soft forward is not the network being attacked: ask the hard one
            ev = self._evaluate(x_in.detach(), full)
        return Forward(x_in, logits, trace, units, ev)

    def _evaluate_clean(self, images: torch.Tensor, full: float) -> tuple[Evaluation, Forward | None]:
        """The hard network on the clean inputs, and, when the first gradient forward would be that
        very forward (:attr:`starts_at_clean` and hard gates), that forward for iteration 0."""
        if not (self.starts_at_clean and self.grad_gate_mode == "hard" and self.steps > 0):
            return self._evaluate(images, full), None
        first = self._gradient_forward(images.clone().requires_grad_(), full)
        return first.ev, first

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> AttackResult:
        start = time.perf_counter()
        # Callers may be inside no_grad / inference_mode: the attack needs autograd (and copies
        # made here must not be inference tensors).
        with torch.inference_mode(False), torch.enable_grad():
            return self._run(images, labels, start)

    def _run(self, images, labels, start: float) -> AttackResult:
        images, labels = self._check_inputs(images, labels)
        B = images.shape[0]
        dev = images.device
        with victim_context(self.model):
            full = cost.profile(self.model, tuple(images.shape[1:])).full
            self.generator = torch.Generator(device=dev).manual_seed(self.seed)
            clean, first = self._evaluate_clean(images, full)
            self.check_victim(clean)
            self._check_labels(labels, clean)
            f_full = cost.full_flops_per_sample(self.model, images)
            state = self.init_state(images, labels, clean)
            best = _Best(images, clean, self._score(clean, labels), self.goal(clean, labels))
            active = torch.ones(B, dtype=torch.bool, device=dev)
            if self.early_stop and self.evaluates_candidate:
                active &= ~best.success  # nothing to do
            iterations = torch.zeros(B, dtype=torch.long, device=dev)
            records: list[tuple[torch.Tensor, dict]] = []
            lab = (lambda rows: None) if labels is None else (lambda rows: labels[rows])

            bar = tqdm(range(self.total_steps), desc=self.name, disable=not self.progress, leave=False)
            for it in bar:
                idx = active.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                x_in, leaf = self.forward_input(state, idx)
                if first is not None and leaf is x_in and idx.numel() == B and torch.equal(x_in, first.x):
                    fwd = first  # the clean evaluation ran this very forward
                    leaf = fwd.x
                else:
                    fwd = self._gradient_forward(x_in, full)
                first = None
                ev = fwd.ev
                if self.evaluates_candidate:
                    x_c = fwd.x.detach()
                    best.offer(idx, x_c, ev, self._score(ev, lab(idx)), self.goal(ev, lab(idx)), it,
                               force=not self.keep_best)
                    stop = self.should_stop(state, idx, ev, lab(idx))
                else:
                    stop = torch.zeros(idx.numel(), dtype=torch.bool, device=dev)
                keep = ~stop
                stats = self.step(state, idx, leaf, fwd, keep, it)
                iterations[idx[keep]] += 1
                active[idx[stop]] = False
                if self.history:
                    rec = {"flops": ev.flops, "l2": metrics.l2(images[idx], fwd.x.detach()),
                           "gate_value": ev.gate_value, "gate_on": ev.gate_on}
                    rec.update({k: v.detach() for k, v in stats.items()})
                    records.append((idx, rec))
                if self.progress:
                    post = {"active": int(active.sum())}
                    if self.evaluates_candidate:
                        post["done"] = int(best.success.sum())
                    bar.set_postfix(post, refresh=False)
                # What backward did not consume (the gates' logit paths, kept by the trace) would
                # otherwise live through the next forward.
                del fwd, x_in, leaf, stats
            bar.close()

            # The last update of rows still running has not been evaluated yet.
            idx = active.nonzero().squeeze(1) if self.evaluates_candidate else torch.arange(B, device=dev)
            if idx.numel():
                with torch.no_grad():
                    x_c = self.candidate(state, idx)
                ev = self._evaluate(x_c, full)
                best.offer(idx, x_c, ev, self._score(ev, lab(idx)), self.goal(ev, lab(idx)), self.total_steps,
                           force=not (self.evaluates_candidate and self.keep_best))

        return AttackResult(
            adv=best.adv,
            flops_clean=clean.flops,
            flops_adv=best.flops,
            flops_full=f_full,
            recovery=cost.recovery_per_sample(clean.flops, best.flops, f_full),
            psnr=metrics.psnr(images, best.adv),
            l2=metrics.l2(images, best.adv),
            linf=metrics.linf(images, best.adv),
            iterations=iterations,
            success_iteration=self.success_iterations(state, best.first),
            success=best.success,
            clean_pred=clean.pred,
            adv_pred=best.pred,
            labels=labels,
            attack=self.name,
            params=self.params(),
            seconds=time.perf_counter() - start,
            gate_names=clean.gate_names,
            history=self._stack_history(records, B) if self.history else None,
            success_iteration_of=self.success_iteration_of,
        )

    @staticmethod
    def _stack_history(records: list, B: int) -> dict[str, torch.Tensor]:
        """Per-iteration rows -> ``(T, B, ...)`` tensors, NaN (False) where a sample did not run."""
        out: dict[str, torch.Tensor] = {}
        T = len(records)
        for t, (idx, rec) in enumerate(records):
            for k, v in rec.items():
                v = v.detach().cpu()
                if k not in out:
                    fill = False if v.dtype == torch.bool else float("nan")
                    dtype = torch.bool if v.dtype == torch.bool else torch.float64
                    out[k] = torch.full((T, B, *v.shape[1:]), fill, dtype=dtype)
                out[k][t, idx.cpu()] = v.to(out[k].dtype)
        active = torch.zeros(T, B, dtype=torch.bool)
        for t, (idx, _) in enumerate(records):
            active[t, idx.cpu()] = True
        out["active"] = active
        return out


GRAD_MODES = {"fgm": "hard", "lgm": "lgm", "lgm_st": "lgm_st"}
ENERGY_OBJECTIVES = ("complexity", "fixed_point")


class EnergyAttack(Attack):
    """Energy attacks: the best input runs the most FLOPs (then has the lowest L2); the goal is
    every costed gated unit on.

    Dynamics-aware gradients (:meth:`set_dynamics`, for the attacks that take them):

    * ``grad``: gate mode of the gradient forward, as the accuracy attacks (``fgm``: the hard
      network, a unit that is off is not in the graph; ``lgm``: every mask ``sigmoid(lam q)``
      in the forward and backward, so the gate values recorded after a unit see its soft mask
      and the complexity loss differentiates what switching it on does to later decisions;
      ``lgm_st``: hard forward, sigmoid backward).
    * ``lam`` -> ``lam_end``: the slope of the surrogate, annealed geometrically over the
      iterations (``lam_t = lam (lam_end / lam)^(t / (steps - 1))``: start soft, end hard);
      ``lam_end=None`` keeps ``lam`` throughout.
    * ``objective``: ``complexity`` (the gate-value hinge ``sum_u w_u relu(tau_u - G_u)`` on
      the gradient forward) or ``fixed_point``: the gradient forward runs with every gate forced
      on (a static network, all-on by construction) and the loss is the hinge of its logits,
      ``sum_u w_u relu(margin - q_u)``. The natural hard run is all-on exactly when every such
      logit is >= 0 (for gates whose logits depend only on computations that are on), so the
      loss is zero exactly at the fixed point the attack looks for.

    Every evaluation, stop test, best-keeping and reported figure is on the hard network (one
    more, hard, forward per iteration whenever the gradient forward is not the hard network).
    """

    grad = "fgm"
    lam_start = 1.0
    lam_end: float | None = None
    objective = "complexity"
    fp_margin = 0.0

    def goal(self, ev, labels):
        return ev.all_on

    def score(self, ev, labels):
        return ev.flops

    def check_victim(self, clean: Evaluation) -> None:
        if not clean.gate_names:
            raise DynattackError(f"{type(self).__name__}: the model declares no gates: nothing to switch on")

    # ---- dynamics-aware gradients ----------------------------------------------------------
    def set_dynamics(self, grad: str = "fgm", lam: float = 1.0, lam_end: float | None = None,
                     objective: str = "complexity", fp_margin: float = 0.0) -> None:
        """Check and set the gradient mode, slope schedule and objective (see the class docstring)."""
        owner = type(self).__name__
        if grad not in GRAD_MODES:
            raise DynattackError(f"{owner}: grad must be one of {', '.join(GRAD_MODES)}, got {grad!r}")
        if objective not in ENERGY_OBJECTIVES:
            raise DynattackError(f"{owner}: objective must be one of {', '.join(ENERGY_OBJECTIVES)}, got {objective!r}")
        lam = check_positive(owner, "lam", lam)
        if lam_end is not None:
            lam_end = check_positive(owner, "lam_end", lam_end)
            if grad == "fgm":
                raise DynattackError(f"{owner}: lam_end anneals the LGM slope: it needs grad lgm or lgm_st, not fgm")
        if objective == "fixed_point" and grad != "fgm":
            raise DynattackError(f"{owner}: objective fixed_point runs the forced-on network, whose masks are "
                                 f"constant: grad must be fgm, got {grad!r}")
        if isinstance(fp_margin, bool) or not isinstance(fp_margin, (int, float)) or not math.isfinite(fp_margin) \
                or fp_margin < 0:
            raise DynattackError(f"{owner}: fp_margin must be a finite number >= 0, got {fp_margin!r}")
        self.grad, self.grad_gate_mode = grad, GRAD_MODES[grad]
        self.lam_start, self.lam_end, self.grad_lam = lam, lam_end, lam
        self.objective, self.fp_margin = objective, float(fp_margin)

    def dynamics_params(self) -> dict:
        return {"grad": self.grad, "lam": self.lam_start, "lam_end": self.lam_end, "objective": self.objective,
                "fp_margin": self.fp_margin}

    def lam_at(self, it: int) -> float:
        """The LGM slope of iteration ``it`` (geometric from ``lam`` to ``lam_end``)."""
        if self.lam_end is None or self.steps <= 1:
            return self.lam_start
        frac = min(max(it, 0), self.steps - 1) / (self.steps - 1)
        return self.lam_start * (self.lam_end / self.lam_start) ** frac

    def schedule(self, it: int) -> None:
        """Set the slope the gradient forward of iteration ``it`` runs with (call from
        ``init_state`` with 0 and at the end of ``step`` with ``it + 1``)."""
        self.grad_lam = self.lam_at(it)

    def _gradient_forward(self, x_in: torch.Tensor, full: float) -> Forward:
        if self.objective != "fixed_point":
            return super()._gradient_forward(x_in, full)
        with gate_mode(self.model, "hard", force="on"), Trace() as trace:
            logits = prediction(self.model, self.model(x_in))
        units = gate_units(trace, x_in.shape[0], x_in.device)
        return Forward(x_in, logits, trace, units, self._evaluate(x_in.detach(), full))

    def energy_losses(self, fwd: Forward, weighted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n,)`` losses ``(L_C, L_F)`` of a gradient forward: the objective to descend and the
        finished loss (minus what the units already satisfied hold: GradAuto's Eq. 20), each unit
        weighted by its share of the gated FLOPs (``weighted``) or by 1.

        ``complexity``: ``L_C = sum w relu(tau - G)``, ``L_F = -sum w relu(G - tau)``, G the gate
        values of the gradient forward (in ``lgm`` the values of a network whose masks are soft).
        ``fixed_point``: the same hinges on the forced-on forward's logits against ``fp_margin``."""
        u = fwd.units
        w = u.weight if weighted else torch.ones_like(u.weight)
        if self.objective == "fixed_point":
            n = fwd.x.shape[0]
            if len(fwd.trace):
                q = trace_logits(fwd.trace, n).to(u.value.dtype)
            else:
                q = u.value
            return (torch.relu(self.fp_margin - q) * w).sum(1), -(torch.relu(q - self.fp_margin) * w).sum(1)
        return complexity_loss(u, w), finished_loss(u, w)

    def objective_gradient(self, images: torch.Tensor, it: int = 0) -> torch.Tensor:
        """``d L_C / d x`` at ``images`` with the slope of iteration ``it``: the gradient an
        iteration of the attack starts from, before any rectification (for tests and diagnostics)."""
        with torch.inference_mode(False), torch.enable_grad(), victim_context(self.model):
            images, _ = self._check_inputs(images, None)
            full = cost.profile(self.model, tuple(images.shape[1:])).full
            saved = self.grad_lam
            self.grad_lam = self.lam_at(it)
            try:
                x = images.clone().requires_grad_()
                l_c, _ = self.energy_losses(self._gradient_forward(x, full))
                return vjp(l_c, x)
            finally:
                self.grad_lam = saved


class AccuracyAttack(Attack):
    """Base for accuracy attacks (FGSM, I-FGSM, PGD, MI-FGSM): ``atk(images, labels)``.

    The goal is a misclassified input (targeted: the target class), the default score is that
    goal, so each sample keeps its least distorted successful input (pass ``criterion`` to choose
    otherwise). ``grad`` sets the gate mode of the gradient forward only (``fgm``: hard,
    ``lgm``: sigmoid(lam q) forward and backward, ``lgm_st``: hard forward, sigmoid backward);
    every evaluation, stop test and reported figure uses the hard network.
    """

    requires_labels = True
    gate_gradients = False

    def __init__(self, model, *, steps, grad: str = "fgm", lam: float = 1.0, targeted: bool = False, **kw) -> None:
        super().__init__(model, steps=steps, **kw)
        owner = type(self).__name__
        if grad not in GRAD_MODES:
            raise DynattackError(f"{owner}: grad must be one of {', '.join(GRAD_MODES)}, got {grad!r}")
        self.grad = grad
        self.grad_gate_mode = GRAD_MODES[grad]
        self.grad_lam = check_positive(owner, "lam", lam)
        self.targeted = check_bool(owner, "targeted", targeted)

    def params(self) -> dict:
        return {**super().params(), "grad": self.grad, "lam": self.grad_lam, "targeted": self.targeted}

    # Iterative accuracy attacks keep each sample's current input in ``state["adv"]``: the
    # gradient forward runs on it and it is the candidate.
    def forward_input(self, state, idx):
        leaf = state["adv"][idx].clone().requires_grad_()
        return leaf, leaf

    def candidate(self, state, idx):
        return state["adv"][idx].clone()

    def goal(self, ev, labels):
        return ev.pred == labels if self.targeted else ev.pred != labels

    def score(self, ev, labels):
        return self.goal(ev, labels).double()
