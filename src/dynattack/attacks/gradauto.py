"""GradAuto (Pan et al., ECCV 2022): energy attack with rectified gradients.

Per iteration and per sample, on the hard network (the gradient flows through every gate value
``G = value_fn(q)`` recorded in the trace while the network runs its hard decisions):

* complexity loss ``L_C = sum_u lambda_u relu(tau_u - G_u)`` (Eq. 6/8) with ``lambda_u`` the
  unit's share of the total gated FLOPs, over every unit of every gate (blocks, channels,
  positions, voxels alike) and finished loss ``L_F = -sum_u lambda_u relu(G_u - tau_u)`` (Eq. 20);
* ``g_C``, ``g_F``: their gradients w.r.t. the perturbation, two vector-Jacobian products of ONE
  forward (the distortion gradient is closed-form: no third backward);
* rectified direction (Eq. 23-25): where ``<g_C, g_F> < 0`` the component of ``g_C`` along
  ``g_F`` is removed, from iteration ``rd_start`` on;
* rectified magnitude (Eq. 16-17): ``g_C`` rescaled to L2 norm ``K``;
* Adam on the perturbation along ``N * g_C' + grad sum((x' - x)^2)``, ``N`` = elements per sample.

Scaling of K: the paper's objective (Eq. 7) is an L2 distortion term plus ``N * L_C`` (Eq. 5,
MSE + L_C, multiplied by N = 3HW); taking the distortion as the squared L2 ``sum((x' - x)^2)``
(Carlini-Wagner style, the "MSE term") and L_C rectified to gradient norm K gives the authors'
update ``K * N * g_C_hat + g_L2``. Adam is invariant to a
global scale, so it is the same as ``K * g_C_hat + grad MSE`` with the per-sample mean squared
error: K weighs a unit-norm complexity direction against the MSE, independent of image size, and
is comparable with the paper's Table 3 (K in 1e-3 .. 1e2). With rectified magnitude off (ablation)
the raw ``N * g_C + g_L2`` of Eq. 7 is used and K plays no part.

Dynamics-aware variants (ours, issue 16; default off): ``grad=lgm|lgm_st`` takes the gradient
through the LGM surrogate ``sigmoid(lam q)`` of every mask, ``lam`` optionally annealed to
``lam_end`` (start soft, end hard), so a unit's soft mask reaches the gate values after it and
the gradient says what switching it on does to later decisions; ``objective=fixed_point``
pushes every gate logit of the forced-on network to >= 0 instead (see
:class:`~dynattack.attacks.base.EnergyAttack`). Measured against the default in
bench/results/energy_dynamics.md.

All-on anchors (ours, issue 16; ``anchor_starts > 0``): on some victims (the retrained
SkipNet-38-RNN-HRL) no descent from the clean image reaches all-on, yet all-on inputs exist far
from it: descending the hinge ``sum_u relu(m - q_u)`` of the forced-on network's logits with no
distortion term, from uniform-noise starts, ends at inputs whose natural run is all-on (the
forced-on network is all-on by construction; its logits all >= 0 is the natural run being
all-on). :meth:`GradAuto.anchors` finds them once per input shape (seeded, cached on the attack).
After the ``steps`` iterations, every sample still short of all-on jumps to the closest all-on
point on the segments from its clean input and from its last iterate to the anchors (grid, then
bisection, on the hard network) and spends ``anchor_walk`` more iterations in the minimum-norm
search from there, as a decision-based attack (Boundary Attack, HopSkipJump) starts from an
input already adversarial and walks back to the clean one. The samples all-on within ``steps``
are not touched (same result as without anchors). Measured in bench/results/energy_anchors.md.

After all-on (ours, ``keep_optimising_distortion``; the paper has no such phase): the first all-on
iterate is far from the least distorted all-on input. A sample that reaches all-on spends its
remaining iterations on a minimum-norm search along the all-on boundary
(:meth:`GradAuto._boundary_step`), in input space, in the same batched forward as the samples
still in their Adam phase (no extra cost per iteration). On ToyGated's convex all-on
set it ends within 0.5 % of the exact projection (tests); on 20 test images it raises the mean
PSNR of the first all-on input from 29.9 to 35.4 dB on SkipNet-38-RNN-SP and from 23.8 to 27.2 dB
on FF-SP, and 1000 iterations instead of 300 add 0.0 / 0.2 dB (bench/results/energy_search.md).
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .. import cost
from ..errors import DynattackError
from ..gates import Trace, gate_mode
from .base import (
    EnergyAttack,
    Forward,
    PerSampleAdam,
    check_bool,
    check_int,
    check_positive,
    per_sample_view,
    trace_logits,
    victim_context,
    vjp,
)


def tanh_space(x: torch.Tensor, w: torch.Tensor, t0: torch.Tensor, delta: torch.Tensor):
    """Map a perturbation ``delta`` (tanh space) to an input in [0, 1] with ``delta = 0 -> x`` exactly.

    ``x' = clamp(x + (tanh(w + delta) - tanh(w)) / 2, 0, 1)`` with ``w = atanh(2x - 1)`` (clamped
    away from +-1) and ``t0 = tanh(w)``. The difference is computed as
    ``tanh(delta) * (1 - tanh(w) tanh(w + delta))`` (the tanh addition formula), which is exactly
    0 when ``delta = 0`` whatever the kernels' rounding, so ``x' == x`` bitwise.

    Returns ``(x', d x' / d delta)``, the elementwise derivative (``(1 - tanh(w + delta)^2) / 2``,
    zero where the clamp cuts, as autograd's clamp: the bounds themselves pass the gradient).
    """
    t = torch.tanh(w + delta)
    raw = x + 0.5 * torch.tanh(delta) * (1 - t0 * t)
    jac = 0.5 * (1 - t * t) * ((raw >= 0) & (raw <= 1))
    return raw.clamp(0, 1), jac


def rectify(g_c: torch.Tensor, g_f: torch.Tensor | None, K: float = 1.0, magnitude: bool = True) -> torch.Tensor:
    """Rectified direction (Eq. 23-25, when ``g_f`` is given) then magnitude (Eq. 16-17), per sample.

    Where ``<g_c, g_f> < 0`` the projection of ``g_c`` on ``g_f`` is removed, so that descending
    along the result does not lower (to first order) the gates already on; then each sample's
    gradient is rescaled to L2 norm ``K`` (zero gradients stay zero).
    """
    n = g_c.shape[0]
    g = g_c.reshape(n, -1)
    if g_f is not None:
        f = g_f.reshape(n, -1)
        dot = (g * f).sum(1, keepdim=True)
        ff = (f * f).sum(1, keepdim=True)
        coef = torch.where(dot < 0, dot / ff.clamp_min(torch.finfo(ff.dtype).tiny), torch.zeros_like(dot))
        g = g - coef * f
    if magnitude:
        norm = g.norm(dim=1, keepdim=True)
        g = torch.where(norm > 0, g * (K / norm.clamp_min(torch.finfo(norm.dtype).tiny)), torch.zeros_like(g))
    return g.view_as(g_c)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine; NaN where either vector is zero."""
    a, b = a.flatten(1), b.flatten(1)
    den = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(den > 0, (a * b).sum(1) / den, torch.full_like(den, float("nan")))


class GradAuto(EnergyAttack):
    """GradAuto energy attack; each part can be switched off for the ablation (Table 2).

    Args:
        model: gated victim, inputs in [0, 1].
        K: Lipschitz constant of the rectified complexity loss (norm of the rectified g_C).
        steps: Adam iterations at most (paper and authors' code: 300).
        lr: Adam learning rate on the tanh-space perturbation.
        rectify_direction: Eq. 23-25 (RD). ``rectify_magnitude``: Eq. 16-17 (RM).
        rd_start: first iteration at which RD applies (authors' code: every iteration).
        early_stop: stop a sample once every costed gated unit is on (the authors run all steps).
        keep_optimising_distortion: a sample that reached all-on spends its remaining iterations
            on a minimum-norm search along the all-on boundary (:meth:`_boundary_step`) instead of
            stopping; the attack keeps its least distorted all-on input.
        tanh_eps: ``2x - 1`` is clamped to ``+-(1 - tanh_eps)`` before ``atanh``. Exactness at
            ``delta = 0`` does not depend on it. It sets how fast saturated pixels (exactly 0 or 1)
            can move: ``dx'/d delta = (1 - t^2) / 2`` is ``tanh_eps (2 - tanh_eps) / 2`` there. With
            1e-3 the black background of Fashion-MNIST (about half its pixels) stays frozen for
            the first ~100 Adam steps; with 0.3 (our default) it moves at half the speed of
            mid-grey pixels (on 20 test images: SkipNet-38-RNN-HRL recovery 53.5 -> 60.6 %, PSNR
            17.6 -> 21.5 dB; RNN-SP 100 % either way, PSNR 20.5 -> 29.9 dB).
        grad: gradient mode of the gradient forward, ``fgm`` (hard network, default) | ``lgm``
            (masks ``sigmoid(lam q)`` forward and backward) | ``lgm_st`` (hard forward, sigmoid
            backward); ``lam``: the surrogate's slope; ``lam_end``: anneal it geometrically from
            ``lam`` to ``lam_end`` over the iterations (None: constant ``lam``).
        objective: ``complexity`` (Eq. 6/8 on the gradient forward, default) | ``fixed_point``
            (every gate forced on in the gradient forward, hinge ``relu(fp_margin - q)`` of its
            logits, cost-weighted; needs ``grad=fgm``); see
            :class:`~dynattack.attacks.base.EnergyAttack`. Rectified direction and magnitude and
            the minimum-norm search apply to whichever objective: ``L_F`` is its finished loss.
        start_contrast: ``c`` in (0, 1]: the first iterate is ``0.5 + c (x - 0.5)`` (1, the
            default: the clean image). A start away from the clean image, contrast-compressed as
            the authors' tanh map starts (their zero perturbation is such an image); the
            distortion term then pulls back towards ``x``. Not the default: measured against it in
            bench/results/energy_start.md.
        anchor_starts: uniform-noise starts of the all-on anchor search (:meth:`anchors`; 0, the
            default: no anchors). ``anchor_steps``: its Adam steps at most (it stops once every start
            is all-on, or when the best start's lowest forced-on logit has not risen for
            ``ANCHOR_PATIENCE`` steps). ``anchor_walk``: iterations after ``steps`` of the samples
            that were not all-on by then, from the closest all-on point towards an anchor back
            along the boundary (default ``steps // 2``); needs ``keep_optimising_distortion``.
        seed, history, progress: see :class:`~dynattack.attacks.base.Attack`.

    Every reported figure (FLOPs, all-on, best-keeping, the search's all-on test) is measured on
    the hard network, whatever ``grad`` and ``objective``.

    The perturbation lives in tanh space as in Carlini-Wagner, but mapped so that ``delta = 0``
    gives back the clean input exactly (:func:`tanh_space`). The paper's Eq. 3,
    ``x' = (tanh(x + delta) + 1) / 2``, and the authors' code do not: their zero perturbation is
    already a different image.
    """

    name = "gradauto"
    # Boundary search (keep_optimising_distortion): radius change and step (a fraction of the
    # radius) at the start of a sample's search, both cosine-annealed to MIN_FRACTION of it by
    # the last iteration. On 20 test images of SkipNet-38-RNN-SP the final PSNR moved by less
    # than 0.2 dB over radius changes 0.02-0.1 and steps 0.03-0.3.
    RADIUS_CHANGE = 0.05
    BOUNDARY_STEP = 0.1
    MIN_FRACTION = 0.01
    # Anchor search: Adam on the logit of the pixels (saturated pixels move as freely as grey
    # ones), hinge margin on the forced-on logits, how often the natural run is checked, and the
    # plateau that ends a search that finds nothing (DynConv's lowest forced-on logit stops
    # rising within 200 steps; the HRL starts that succeed keep rising until 600-2000).
    ANCHOR_LR = 0.05
    ANCHOR_MARGIN = 0.2
    ANCHOR_CHECK = 10
    ANCHOR_PATIENCE = 300
    LINE_GRID = 16
    LINE_BISECT = 8

    def __init__(
        self,
        model,
        K: float = 1.0,
        steps: int = 300,
        lr: float = 0.01,
        rectify_direction: bool = True,
        rectify_magnitude: bool = True,
        rd_start: int = 0,
        early_stop: bool = True,
        keep_optimising_distortion: bool = True,
        tanh_eps: float = 0.3,
        grad: str = "fgm",
        lam: float = 1.0,
        lam_end: float | None = None,
        objective: str = "complexity",
        fp_margin: float = 0.0,
        start_contrast: float = 1.0,
        anchor_starts: int = 0,
        anchor_steps: int = 2000,
        anchor_walk: int | None = None,
        seed: int = 0,
        history: bool = False,
        progress: bool = True,
    ) -> None:
        super().__init__(model, steps=steps, seed=seed, early_stop=early_stop, history=history, progress=progress)
        owner = type(self).__name__
        self.K = check_positive(owner, "K", K)
        self.lr = check_positive(owner, "lr", lr)
        self.rectify_direction = check_bool(owner, "rectify_direction", rectify_direction)
        self.rectify_magnitude = check_bool(owner, "rectify_magnitude", rectify_magnitude)
        self.rd_start = check_int(owner, "rd_start", rd_start, 0)
        self.keep_optimising_distortion = check_bool(owner, "keep_optimising_distortion", keep_optimising_distortion)
        self.tanh_eps = check_positive(owner, "tanh_eps", tanh_eps)
        if self.tanh_eps >= 1:
            raise DynattackError(f"{owner}: tanh_eps must be in (0, 1), got {tanh_eps!r}")
        self.start_contrast = check_positive(owner, "start_contrast", start_contrast)
        if self.start_contrast > 1:
            raise DynattackError(f"{owner}: start_contrast must be in (0, 1], got {start_contrast!r}")
        self.anchor_starts = check_int(owner, "anchor_starts", anchor_starts, 0)
        self.anchor_steps = check_int(owner, "anchor_steps", anchor_steps, 1)
        self.anchor_walk = max(self.steps // 2, 1) if anchor_walk is None else check_int(owner, "anchor_walk", anchor_walk, 1)
        if self.anchor_starts and not self.keep_optimising_distortion:
            raise DynattackError(f"{owner}: anchor_starts needs keep_optimising_distortion (the jump to an anchor "
                                 f"is the start of the minimum-norm search)")
        self._anchors: dict = {}  # (shape, dtype, device) -> (A, *shape) all-on inputs
        self.set_dynamics(grad, lam, lam_end, objective, fp_margin)

    @property
    def total_steps(self) -> int:
        return self.steps + (self.anchor_walk if self.anchor_starts else 0)

    def params(self) -> dict:
        return {**super().params(), "K": self.K, "lr": self.lr, "rectify_direction": self.rectify_direction,
                "rectify_magnitude": self.rectify_magnitude, "rd_start": self.rd_start,
                "keep_optimising_distortion": self.keep_optimising_distortion, "tanh_eps": self.tanh_eps,
                "start_contrast": self.start_contrast, "anchor_starts": self.anchor_starts,
                "anchor_steps": self.anchor_steps, "anchor_walk": self.anchor_walk, **self.dynamics_params()}

    # ---- hooks -----------------------------------------------------------------------------
    # The gradient forward runs on the input itself (the leaf): rows in their Adam phase convert
    # the input gradient to tanh space with the map's closed-form Jacobian (:meth:`_delta_grad`),
    # rows on the boundary search use it as it is, so both kinds share one batched forward.
    def init_state(self, images, labels, clean):
        self.schedule(0)
        lim = 1.0 - self.tanh_eps
        w = torch.atanh((2 * images - 1).clamp(-lim, lim))
        t0 = torch.tanh(w)
        delta = torch.zeros_like(images)
        if self.start_contrast < 1:  # start at 0.5 + c (x - 0.5): tanh(w + delta) = t0 + 2 (x_s - x)
            t = (t0 + (self.start_contrast - 1) * (2 * images - 1)).clamp(-1 + 1e-6, 1 - 1e-6)
            delta = torch.atanh(t) - w
        B, dev = images.shape[0], images.device
        return {
            "x": images, "w": w, "t0": t0, "delta": delta,
            "adam": PerSampleAdam(delta, self.lr),  # updates delta in place
            # boundary search (keep_optimising_distortion)
            "on_boundary": torch.zeros(B, dtype=torch.bool, device=dev),
            "x_b": images.clone(),  # its iterate, in input space
            "radius": torch.zeros(B, dtype=images.dtype, device=dev),
            "start": torch.zeros(B, dtype=torch.long, device=dev),  # iteration it began
            "end": torch.full((B,), self.steps, dtype=torch.long, device=dev),  # its last iteration + 1
            "jumped": torch.zeros(B, dtype=torch.bool, device=dev),  # it began at an anchor's segment
            "it": 0,  # the iteration should_stop is asked about (step sets the next one)
        }

    def _map(self, state, idx, delta):
        """``(input, d input / d delta)`` for the rows ``idx`` at perturbation ``delta``."""
        return tanh_space(state["x"][idx], state["w"][idx], state["t0"][idx], delta)

    def _delta_grad(self, g_x, jac):
        """Gradient w.r.t. ``delta`` from the gradient w.r.t. the input (chain rule)."""
        return g_x * jac

    def candidate(self, state, idx):
        x = self._map(state, idx, state["delta"][idx])[0]
        if not self.keep_optimising_distortion:
            return x
        b = state["on_boundary"][idx]
        return torch.where(per_sample_view(b, x), state["x_b"][idx], x)

    def forward_input(self, state, idx):
        leaf = self.candidate(state, idx).requires_grad_()
        return leaf, leaf

    def should_stop(self, state, idx, ev, labels):
        it = state.get("it", 0)  # subclasses with their own state (points) have no anchor walk
        if it > self.steps:  # the anchor walk: only the rows that jumped run on
            return ~state["jumped"][idx]
        if it == self.steps:  # the rows still short of all-on run one more step: the jump
            return state["on_boundary"][idx] | ev.all_on
        if not self.early_stop or self.keep_optimising_distortion:  # the search runs to the end
            return torch.zeros_like(ev.all_on)
        return ev.all_on

    def _mse_grad(self, state, idx, x_adv, jac):
        """Closed-form gradient of ``sum((x' - x)^2)`` w.r.t. ``delta`` (no backward pass)."""
        return 2 * (x_adv - state["x"][idx]) * jac

    def step(self, state, idx, leaf, fwd: Forward, keep, it):
        state["it"] = it + 1
        l_c, l_f = self.energy_losses(fwd)  # (n,) Eq. 6/8 and Eq. 20 (or the fixed-point hinges)
        lam = self.grad_lam
        self.schedule(it + 1)  # the slope of the next gradient forward
        use_rd = self.rectify_direction and it >= self.rd_start
        # g_F is needed for RD (and for the history's angles); with no unit above its threshold
        # it is zero, so its backward is skipped.
        need_f = (use_rd or self.history) and bool((l_f < 0).any())
        g_c_x = vjp(l_c, leaf, retain_graph=need_f)
        x_adv, jac = self._map(state, idx, state["delta"][idx])  # the Adam-phase input and its Jacobian
        g_c = self._delta_grad(g_c_x, jac)
        g_f = self._delta_grad(vjp(l_f, leaf), jac) if need_f else torch.zeros_like(g_c)
        g_r = rectify(g_c, g_f if use_rd else None, self.K, self.rectify_magnitude)
        n_el = g_r[0].numel()
        g = n_el * g_r + self._mse_grad(state, idx, x_adv, jac)

        search = torch.zeros_like(keep)
        if self.keep_optimising_distortion:
            search = self._boundary_step(state, idx, leaf.detach(), fwd.ev.all_on, g_c_x, keep, it)
        rows = idx[keep & ~search]
        if it < self.steps:
            state["adam"].step(rows, g[keep & ~search])
        elif rows.numel():  # iteration `steps`: the rows still short of all-on start the anchor walk
            self._jump_to_anchors(state, rows, it)

        if not self.history:
            return {}
        return {
            "loss_c": l_c,
            "lam": torch.full_like(l_c, lam if self.grad != "fgm" else float("nan")),  # slope of this iteration
            "loss_f": l_f,
            "mse": (fwd.x.detach() - state["x"][idx]).flatten(1).pow(2).mean(1),
            "grad_norm_c": g_c.flatten(1).norm(dim=1),  # before rectification
            "grad_norm_f": g_f.flatten(1).norm(dim=1),
            "grad_norm_rect": g_r.flatten(1).norm(dim=1),  # K where g_C != 0 (with RM)
            "angle_cf": torch.rad2deg(torch.acos(_cos(g_c, g_f).clamp(-1, 1))),  # degrees, NaN if a gradient is 0
            "cos_rect": _cos(g_r, g_f),  # >= 0 after RD
            "on_boundary": search,  # in the boundary search (keep_optimising_distortion)
        }

    def _boundary_step(self, state, idx, x_in, all_on, g_c_x, keep, it):
        """Minimum-norm search along the all-on boundary for the rows that have reached all-on
        (in the manner of the fast minimal-norm attack, Pintor et al., NeurIPS 2021, with the
        complexity loss as the margin): a radius around the clean input shrinks while the iterate
        keeps every unit on and grows while it does not; each step descends ``L_C`` (zero while
        all on: then it only shrinks) by a fraction of the radius and projects onto the radius
        and into [0, 1]. The base keeps each sample's least distorted all-on iterate. Returns the
        ``(n,)`` rows searching (their Adam phase is over)."""
        new = ~state["on_boundary"][idx] & all_on
        rows = idx[new]
        state["on_boundary"][rows] = True
        state["x_b"][rows] = x_in[new]
        state["radius"][rows] = (x_in[new] - state["x"][rows]).flatten(1).norm(dim=1)
        state["start"][rows] = it
        search = state["on_boundary"][idx]
        sel = search & keep
        if not sel.any():
            return search
        rows, on, g = idx[sel], all_on[sel], g_c_x[sel]
        x = state["x"][rows]
        d = state["x_b"][rows] - x
        norm = d.flatten(1).norm(dim=1)
        left = (state["end"][rows] - state["start"][rows]).clamp_min(1)
        progress = (it - state["start"][rows]).to(x.dtype) / left
        anneal = self.MIN_FRACTION + (1 - self.MIN_FRACTION) * (1 + torch.cos(math.pi * progress)) / 2
        change = self.RADIUS_CHANGE * anneal
        radius = torch.where(on, torch.minimum(state["radius"][rows], norm) * (1 - change),
                             state["radius"][rows] * (1 + change))
        g_norm = g.flatten(1).norm(dim=1)
        scale = torch.where(g_norm > 0, self.BOUNDARY_STEP * anneal * radius / g_norm.clamp_min(1e-30), 0)
        d = d - per_sample_view(scale, d) * g
        d_norm = d.flatten(1).norm(dim=1)
        d = d * per_sample_view(torch.where(d_norm > radius, radius / d_norm.clamp_min(1e-30), 1), d)
        state["x_b"][rows] = (x + d).clamp(0, 1)
        state["radius"][rows] = radius
        return search

    # ---- all-on anchors --------------------------------------------------------------------
    def anchors(self, like: torch.Tensor) -> torch.Tensor:
        """``(A, *shape)`` inputs whose natural hard run is all-on (A may be 0), for inputs shaped
        as ``like``'s samples: Adam on the logit of ``anchor_starts`` uniform-noise inputs along
        ``sum_u relu(ANCHOR_MARGIN - q_u)`` of the forced-on network's logits (no distortion
        term); a start is kept the first time a check finds its natural run all-on. Seeded,
        computed once per shape, dtype and device."""
        key = (tuple(like.shape[1:]), like.dtype, like.device)
        if key not in self._anchors:
            with torch.inference_mode(False), torch.enable_grad(), victim_context(self.model):
                self._anchors[key] = self._search_anchors(*key)
        return self._anchors[key]

    def _search_anchors(self, shape, dtype, device) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(self.seed)
        u = torch.rand((self.anchor_starts, *shape), generator=gen, device=device, dtype=dtype)
        z = torch.logit(u.clamp(0.02, 0.98)).requires_grad_()
        opt = torch.optim.Adam([z], lr=self.ANCHOR_LR)
        full = cost.profile(self.model, shape).full
        found = torch.zeros(self.anchor_starts, dtype=torch.bool, device=device)
        kept = torch.empty_like(u)

        def check():
            x = torch.sigmoid(z.detach())
            on = self._evaluate(x, full).all_on & ~found
            kept[on] = x[on]
            return found | on

        best, since = -math.inf, 0
        bar = tqdm(range(self.anchor_steps), desc="all-on anchors", disable=not self.progress, leave=False)
        for step in bar:
            if step % self.ANCHOR_CHECK == 0:
                found = check()
                if bool(found.all()):
                    break
            with gate_mode(self.model, "hard", force="on"), Trace() as trace:
                self.model(torch.sigmoid(z))
            if not len(trace):
                break
            q = trace_logits(trace, z.shape[0])
            low = float(q.detach().min(1).values.max())
            best, since = (low, 0) if low > best + 1e-3 else (best, since + 1)
            if since >= self.ANCHOR_PATIENCE:
                break
            loss = torch.relu(self.ANCHOR_MARGIN - q)[~found].sum()
            if loss.requires_grad:  # the gradient of z only: the victim's parameters keep no .grad
                (z.grad,) = torch.autograd.grad(loss, z)
                opt.step()
            bar.set_postfix({"all-on": int(found.sum()), "lowest logit": round(low, 3)}, refresh=False)
        else:
            found = check()
        bar.close()
        return kept[found].detach()

    def _jump_to_anchors(self, state, rows, it):
        """Rows ``rows`` (not all-on yet) start the minimum-norm search at the all-on point closest
        to their clean input among the segments from the clean input and from the current iterate
        to each anchor: on each segment the first all-on point of a grid of ``LINE_GRID`` steps
        from the near end, refined by ``LINE_BISECT`` bisections (the all-on end kept, so the
        point found is all-on in the hard network)."""
        anchors = self.anchors(state["x"])
        if not anchors.shape[0]:
            return
        x = state["x"][rows]
        best_l2 = torch.full((rows.numel(),), math.inf, dtype=x.dtype, device=x.device)
        best_x = x.clone()
        view = lambda v: per_sample_view(v, x)
        full = cost.profile(self.model, tuple(x.shape[1:])).full
        on_at = lambda pts: self._evaluate(pts, full).all_on
        with torch.no_grad():
            origins = (x, self._map(state, rows, state["delta"][rows])[0])
            for o, a in ((o, a) for o in origins for a in anchors):
                d = a.unsqueeze(0) - o
                hi = torch.full_like(best_l2, math.inf)
                for k in range(1, self.LINE_GRID + 1):  # the first all-on grid point from the near end
                    t = torch.full_like(best_l2, k / self.LINE_GRID)
                    hi = torch.where(torch.isinf(hi) & on_at(o + view(t) * d), t, hi)
                ok = torch.isfinite(hi)
                lo = (hi - 1 / self.LINE_GRID).clamp_min(0)
                for _ in range(self.LINE_BISECT):
                    mid = (lo + hi) / 2
                    on = on_at(o + view(torch.where(ok, mid, 0)) * d) & ok
                    hi, lo = torch.where(on, mid, hi), torch.where(on, lo, mid)
                p = o + view(torch.where(ok, hi, 0)) * d
                l2 = torch.where(ok, (p - x).flatten(1).norm(dim=1), math.inf)
                better = l2 < best_l2
                best_l2 = torch.where(better, l2, best_l2)
                best_x[better] = p[better]
        jump = torch.isfinite(best_l2)
        rows = rows[jump]
        state["on_boundary"][rows] = True
        state["x_b"][rows] = best_x[jump].clamp(0, 1)
        state["radius"][rows] = best_l2[jump]
        state["start"][rows] = it
        state["end"][rows] = self.total_steps
        state["jumped"][rows] = True
