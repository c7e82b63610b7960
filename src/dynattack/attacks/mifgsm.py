"""MI-FGSM (Dong et al., 2018): I-FGSM along a momentum of L1-normalised gradients.

``m_t+1 = mu * m_t + g_t / ||g_t||_1`` (per sample, L1 over all its elements; a zero gradient
adds nothing), ``x_t+1 = proj(x_t + alpha * sign(m_t+1))``. The gradient is masked by the
valid pixels before normalising. Defaults as the paper: ``mu = 1``, 10 steps, ``alpha = eps /
steps``. By default each sample keeps its least distorted misclassified iterate
(``keep="best"``). Budget, targets and the pixel mask are as in :mod:`dynattack.attacks.ifgsm`.
"""
from __future__ import annotations

import math

from ..errors import DynattackError
from .ifgsm import IFGSM


class MIFGSM(IFGSM):
    """Momentum iterative FGSM, Linf.

    Args:
        model: the victim, images in [0, 1] -> logits.
        eps: Linf budget in [0, 1] units.
        steps: iterations (default 10). ``alpha``: step size; None: ``eps / steps``.
        mu: momentum decay (default 1.0; 0 gives I-FGSM on L1-normalised gradients, i.e. I-FGSM).
        grad: gradient mode ``fgm`` | ``lgm`` | ``lgm_st``; ``lam``: LGM sigmoid slope.
        targeted: ``labels`` are target classes.
        valid_pixels: fraction of pixel positions allowed to change (seeded, shared by the batch).
        keep: ``"best"`` (default) or ``"final"``. ``early_stop``: stop a sample at its first success.
        seed, history, progress: see :class:`~dynattack.attacks.base.Attack`.
    """

    name = "mifgsm"

    def __init__(
        self,
        model,
        eps: float = 8 / 255,
        steps: int = 10,
        alpha: float | None = None,
        mu: float = 1.0,
        grad: str = "fgm",
        lam: float = 1.0,
        targeted: bool = False,
        valid_pixels: float = 1.0,
        keep: str = "best",
        early_stop: bool = False,
        seed: int = 0,
        history: bool = False,
        progress: bool = True,
    ) -> None:
        owner = type(self).__name__
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
            raise DynattackError(f"{owner}: mu must be a finite number >= 0, got {mu!r}")
        super().__init__(model, eps=eps, steps=steps, alpha=alpha, grad=grad, lam=lam, targeted=targeted,
                         valid_pixels=valid_pixels, keep=keep, early_stop=early_stop, seed=seed,
                         history=history, progress=progress)
        self.mu = float(mu)
