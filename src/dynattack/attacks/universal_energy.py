"""Universal energy perturbation: ONE perturbation that raises the cost of every input.

DeepSloth's universal attack (Hong et al., ICLR 2021) and SlowFormer's patch (CVPR 2024) ask
whether an adversary who cannot see the input can still waste the victim's compute: a single
``delta`` is optimised on training images and then added, unchanged, to every held-out image.

Fitting (:meth:`UniversalEnergy.fit`): ``steps`` sign steps on minibatches of ``fit_batch``
training images (a seeded permutation of the first ``train_n``, cycled), each descending the mean
over the minibatch of GradAuto's cost-weighted complexity loss
``L_C = sum_u lambda_u relu(tau_u - G_u)`` (:func:`~dynattack.attacks.base.complexity_loss`)
at ``clip(x + delta)``, then ``delta`` clipped to ``[-eps, eps]``. The gradient flows through the
hard network (``grad="fgm"``) or the LGM surrogate (``lgm``, ``lgm_st``). The final ``delta`` is
kept (no best-so-far selection on training batches: that would be selection on noise).

Applying (``atk(images)``): every image gets the same ``delta``, projected exactly into its own
Linf ball and [0, 1] (:meth:`IFGSM.ball`: ``|x' - x| <= eps`` in float32, no tolerance), so pixels
at 0 or 1 clip differently but the perturbation is one tensor. The result reports every figure on
the hard network, as any attack here; ``iterations`` is 0 (nothing is optimised per image).

The run directory keeps the perturbation (``perturbation.safetensors``, the runner writes it
before the first batch and reuses it on ``--resume``).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .. import cost
from ..errors import DynattackError
from ..gates import Trace, gate_mode
from .base import (EnergyAttack, check_int, check_positive, complexity_loss, gate_units,
                   victim_context, vjp)
from .ifgsm import IFGSM, check_eps


class UniversalEnergy(EnergyAttack):
    """One Linf-bounded perturbation for all inputs, fitted on training images.

    Args:
        model: gated victim, images in [0, 1].
        eps: Linf budget in [0, 1] units (default 8/255).
        steps: sign steps of the fit, one minibatch each (default 300).
        alpha: step size (default ``eps / 10``: a stochastic objective wants steps that can cross
            the ball several times over the fit).
        train_n: training images the fit cycles through (default 1000).
        fit_batch: images per fitting step (default 100).
        grad: ``fgm`` | ``lgm`` | ``lgm_st``; ``lam``: LGM slope.
        seed: the fit's minibatch order.
    """

    name = "universal-energy"
    keep_best = False  # every image returns x + delta, whatever it does to that image

    def __init__(self, model, eps: float = 8 / 255, steps: int = 300, alpha: float | None = None,
                 train_n: int = 1000, fit_batch: int = 100, grad: str = "fgm", lam: float = 1.0, seed: int = 0,
                 history: bool = False, progress: bool = True) -> None:
        owner = type(self).__name__
        super().__init__(model, steps=0, seed=seed, history=history, progress=progress)
        self.eps = check_eps(owner, eps)
        self.fit_steps = check_int(owner, "steps", steps, 1)
        self.alpha = self.eps / 10 if alpha is None else check_positive(owner, "alpha", alpha)
        self.train_n = check_int(owner, "train_n", train_n, 1)
        self.fit_batch = check_int(owner, "fit_batch", fit_batch, 1)
        self.set_dynamics(grad, lam)
        self.perturbation: torch.Tensor | None = None

    ball = IFGSM.ball  # uses self.eps only: the exact float32 ball around x

    def params(self) -> dict:
        return {"eps": self.eps, "steps": self.fit_steps, "alpha": self.alpha, "train_n": self.train_n,
                "fit_batch": self.fit_batch, "grad": self.grad, "lam": self.grad_lam, "seed": self.seed}

    # ---- fitting ---------------------------------------------------------------------------
    def fit(self, train_images: torch.Tensor) -> torch.Tensor:
        """Fit the perturbation on the first ``train_n`` of ``train_images``; returns it, ``(1, ...)``."""
        owner = type(self).__name__
        if len(train_images) < self.train_n:
            raise DynattackError(f"{owner}: train_n is {self.train_n} but only {len(train_images)} training "
                                 f"images were given")
        x_all, _ = self._check_inputs(train_images[:self.train_n], None)
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(self.train_n, generator=gen)
        delta = torch.zeros((1, *x_all.shape[1:]), dtype=x_all.dtype, device=x_all.device)
        with torch.inference_mode(False), torch.enable_grad(), victim_context(self.model):
            cost.profile(self.model, tuple(x_all.shape[1:]))
            bar = tqdm(range(self.fit_steps), desc=f"{self.name} fit", disable=not self.progress, leave=False)
            for it in bar:
                start = (it * self.fit_batch) % self.train_n
                rows = order[start:start + self.fit_batch].to(x_all.device)
                x = x_all[rows]
                leaf = delta.clone().requires_grad_()
                with gate_mode(self.model, self.grad_gate_mode, lam=self.grad_lam), Trace() as trace:
                    self.model(torch.clamp(x + leaf, 0, 1))
                units = gate_units(trace, len(x), x.device)
                if units.value.shape[1] == 0:
                    raise DynattackError(f"{owner}: the model declares no gates: nothing to switch on")
                loss = complexity_loss(units).mean()
                g = vjp(loss, leaf)
                delta = (delta - self.alpha * g.sign()).clamp(-self.eps, self.eps)
                if self.progress:
                    bar.set_postfix({"L_C": float(loss)}, refresh=False)
            bar.close()
        self.perturbation = delta.detach()
        return self.perturbation

    def set_perturbation(self, delta: torch.Tensor) -> None:
        """Use a perturbation fitted before (e.g. read back from a run directory)."""
        if not isinstance(delta, torch.Tensor) or delta.dim() < 2 or delta.shape[0] != 1 \
                or not torch.isfinite(delta).all() or delta.abs().max() > self.eps:
            raise DynattackError(f"{type(self).__name__}: a perturbation is one finite (1, ...) tensor within "
                                 f"eps = {self.eps:g}")
        self.perturbation = delta

    # ---- applying --------------------------------------------------------------------------
    def init_state(self, images, labels, clean):
        if self.perturbation is None:
            raise DynattackError(f"{type(self).__name__}: fit(train_images) first, or set_perturbation(delta)")
        if tuple(self.perturbation.shape[1:]) != tuple(images.shape[1:]):
            raise DynattackError(f"{type(self).__name__}: the perturbation has shape "
                                 f"{tuple(self.perturbation.shape[1:])}, the images {tuple(images.shape[1:])}")
        lo, hi = self.ball(images)
        return {"x": images, "lo": lo, "hi": hi, "delta": self.perturbation.to(images.device, images.dtype)}

    def forward_input(self, state, idx):
        x = torch.maximum(torch.minimum(state["x"][idx] + state["delta"], state["hi"][idx]), state["lo"][idx])
        return x, x
