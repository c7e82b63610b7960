"""ILFO (Haque et al., CVPR 2020): the energy-attack baseline, as its public re-implementation runs.

An additive perturbation ``x' = x + delta`` (no tanh, no clipping while optimising), plain SGD
(lr 0.01, 300 iterations) on

    w * mean_b sum_u relu(tau_u - G_u)  +  mean_b ||delta_b||_2,     w = 1e6 (``hinge_weight``),

where the hinge runs over every unit of every gate event, unweighted (blocks, channels,
positions alike). One backward per iteration: the norm's gradient ``delta / ||delta||`` is
closed-form.

Dynamics-aware variants (ours, default off, as :class:`~dynattack.attacks.base.EnergyAttack`):
``grad=lgm|lgm_st`` with slope ``lam`` (annealed to ``lam_end``), and ``objective=fixed_point``
(the same unweighted hinge on the logits of the forced-on network, ``relu(fp_margin - q)``).
``lam`` is the LGM slope, as for every attack and the CLI's ``--lam``; the paper's hinge weight
(1e6) is ``hinge_weight``.

Two choices of ours, documented:

* ``mean_b`` divides by a fixed ``batch_ref`` (default 200, the re-implementation's batch size)
  rather than by the actual batch size, so a sample's trajectory is the one it would have had in
  that batch of 200 and does not depend on what else is in the batch.
* ILFO itself does not clip: the network sees ``x + delta`` unclipped while optimising. The
  returned adversarial input is ``clamp(x + delta, 0, 1)`` of the final iterate, evaluated once on
  the hard network; since the optimised inputs are not the returned ones, there is no per-iteration
  best-keeping or early stop.

What each per-sample figure describes (``AttackResult``):

* ``flops_adv``, ``recovery``, ``success``, ``psnr``...: the returned clamped input.
* ``iterations``: SGD updates applied, always ``steps`` (no early stop, as the authors run it).
* ``success_iteration`` (``success_iteration_of = "iterate"``) and the history: the unclipped
  iterates ``x + delta`` the network ran, evaluated on the hard network by the gradient forward
  itself: the first iteration whose iterate switched every costed unit on, ``-1`` if none did.
  Clamping changes the input, so the returned input may be all-on when no iterate was
  (``success`` without ``success_iteration``) and the reverse. Evaluating the clamped candidate
  of every iteration would cost one more forward per iteration: 0.4x a forward + backward on
  skipnet38-rnn-hrl (batch 50, CPU), taking ILFO's iteration from 1.0x to about 1.4x of it.
"""
from __future__ import annotations

import torch

from .base import EnergyAttack, Forward, check_int, check_positive, per_sample_view, vjp


class ILFO(EnergyAttack):
    """ILFO baseline.

    Args:
        model: gated victim, inputs in [0, 1].
        steps: SGD iterations (300).
        lr: SGD learning rate (0.01).
        hinge_weight: weight of the gate hinge (1e6).
        batch_ref: the batch size the loss is averaged over (200); see the module docstring.
        grad, lam, lam_end, objective, fp_margin: the gradient mode (``fgm`` default), LGM slope
            and its annealing, and the objective (``complexity`` default | ``fixed_point``); see
            :class:`~dynattack.attacks.base.EnergyAttack`.
        seed, history, progress: see :class:`~dynattack.attacks.base.Attack`.
    """

    name = "ilfo"
    evaluates_candidate = False
    success_iteration_of = "iterate"

    def __init__(
        self,
        model,
        steps: int = 300,
        lr: float = 0.01,
        hinge_weight: float = 1e6,
        batch_ref: int = 200,
        grad: str = "fgm",
        lam: float = 1.0,
        lam_end: float | None = None,
        objective: str = "complexity",
        fp_margin: float = 0.0,
        seed: int = 0,
        history: bool = False,
        progress: bool = True,
    ) -> None:
        super().__init__(model, steps=steps, seed=seed, early_stop=False, history=history, progress=progress)
        owner = type(self).__name__
        self.lr = check_positive(owner, "lr", lr)
        self.hinge_weight = check_positive(owner, "hinge_weight", hinge_weight)
        self.batch_ref = check_int(owner, "batch_ref", batch_ref, 1)
        self.set_dynamics(grad, lam, lam_end, objective, fp_margin)

    def params(self) -> dict:
        return {"steps": self.steps, "seed": self.seed, "lr": self.lr, "hinge_weight": self.hinge_weight,
                "batch_ref": self.batch_ref, **self.dynamics_params()}

    def init_state(self, images, labels, clean):
        self.schedule(0)
        never = torch.full((images.shape[0],), -1, dtype=torch.long, device=images.device)
        return {"x": images, "delta": torch.zeros_like(images), "first_all_on": never}

    def success_iterations(self, state, first_candidate):
        return state["first_all_on"]

    def forward_input(self, state, idx):
        leaf = state["delta"][idx].requires_grad_()
        return state["x"][idx] + leaf, leaf

    def candidate(self, state, idx):
        return (state["x"][idx] + state["delta"][idx]).clamp(0, 1)

    def step(self, state, idx, leaf, fwd: Forward, keep, it):
        first = state["first_all_on"]
        hit = fwd.ev.all_on & (first[idx] < 0)  # fwd.ev: the hard network on the iterate as run
        first[idx[hit]] = it
        hinge, _ = self.energy_losses(fwd, weighted=False)  # (n,) over all units of all gates
        self.schedule(it + 1)
        g_hinge = vjp(hinge, leaf)
        delta = leaf.detach()
        norm = delta.flatten(1).norm(dim=1)
        g_norm = delta / per_sample_view(norm.clamp_min(torch.finfo(norm.dtype).tiny), delta)  # 0 at delta = 0
        g = (self.hinge_weight * g_hinge + g_norm) / self.batch_ref
        # A step that leaves the floats is not taken: at the 1e6 hinge weight ManiDP's gradients
        # overflow, and the inf/NaN input ILFO returned (clamp keeps NaN) was 8 of 10 samples.
        new = delta - self.lr * g
        ok = keep & torch.isfinite(new.flatten(1)).all(1)
        state["delta"][idx[ok]] = new[ok]
        if not self.history:
            return {}
        return {"loss": (self.hinge_weight * hinge.detach() + norm) / self.batch_ref,
                "hinge": hinge.detach(), "grad_norm": g.flatten(1).norm(dim=1)}
