"""ILFO (Haque et al., CVPR 2020): the energy-attack baseline, as its public re-implementation runs.

An additive perturbation ``x' = x + delta`` (no tanh, no clipping while optimising), plain SGD
(lr 0.01, 300 iterations) on

    lam * mean_b sum_u relu(tau_u - G_u)  +  mean_b ||delta_b||_2,     lam = 1e6,

where the hinge runs over every unit of every gate event, unweighted (blocks, channels,
positions alike). One backward per iteration: the norm's gradient ``delta / ||delta||`` is
closed-form.

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
        lam: weight of the gate hinge (1e6).
        batch_ref: the batch size the loss is averaged over (200); see the module docstring.
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
        lam: float = 1e6,
        batch_ref: int = 200,
        seed: int = 0,
        history: bool = False,
        progress: bool = True,
    ) -> None:
        super().__init__(model, steps=steps, seed=seed, early_stop=False, history=history, progress=progress)
        owner = type(self).__name__
        self.lr = check_positive(owner, "lr", lr)
        self.lam = check_positive(owner, "lam", lam)
        self.batch_ref = check_int(owner, "batch_ref", batch_ref, 1)

    def params(self) -> dict:
        return {"steps": self.steps, "seed": self.seed, "lr": self.lr, "lam": self.lam, "batch_ref": self.batch_ref}

    def init_state(self, images, labels, clean):
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
        u = fwd.units
        hinge = torch.relu(u.tau - u.value).sum(1)  # (n,) over all units of all gates
        g_hinge = vjp(hinge, leaf)
        delta = leaf.detach()
        norm = delta.flatten(1).norm(dim=1)
        g_norm = delta / per_sample_view(norm.clamp_min(torch.finfo(norm.dtype).tiny), delta)  # 0 at delta = 0
        g = (self.lam * g_hinge + g_norm) / self.batch_ref
        rows = idx[keep]
        state["delta"][rows] = delta[keep] - self.lr * g[keep]
        if not self.history:
            return {}
        return {"loss": (self.lam * hinge.detach() + norm) / self.batch_ref,
                "hinge": hinge.detach(), "grad_norm": g.flatten(1).norm(dim=1)}
