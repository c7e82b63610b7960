"""PGD (Madry et al., 2018): I-FGSM from a uniform random start in the eps ball.

The start ``x + U(-eps, eps)`` (inside the valid-pixel mask, clipped to [0, 1]) is drawn from the
attack's seeded ``self.generator`` for the whole batch: reproducible for a given seed and batch,
but, as in torchattacks, a sample's start depends on its row in the batch (pass
``random_start=False`` for batch-independent results). Step ``alpha`` defaults to Madry's
``2.5 * eps / steps`` (2/255 at eps = 8/255 and 10 steps, torchattacks' default too). By default
each sample keeps its least distorted misclassified iterate (``keep="best"``), or, never fooled,
its lowest-margin one. Budget, targets and the pixel mask are as in :mod:`dynattack.attacks.ifgsm`.
"""
from __future__ import annotations

from ..errors import DynattackError
from .base import check_positive
from .ifgsm import IFGSM, check_eps


class PGD(IFGSM):
    """Projected gradient descent, Linf, with random start.

    Args:
        model: the victim, images in [0, 1] -> logits.
        eps: Linf budget in [0, 1] units.
        steps: iterations (default 10).
        alpha: step size; None: ``2.5 * eps / steps``.
        random_start: start from a uniform point of the eps ball (default True).
        grad: gradient mode ``fgm`` | ``lgm`` | ``lgm_st``; ``lam``: LGM sigmoid slope.
        targeted: ``labels`` are target classes.
        valid_pixels: fraction of pixel positions allowed to change (seeded, shared by the batch).
        keep: ``"best"`` (default) or ``"final"``. ``early_stop``: stop a sample at its first success.
        seed, history, progress: see :class:`~dynattack.attacks.base.Attack`.
    """

    name = "pgd"

    def __init__(
        self,
        model,
        eps: float = 8 / 255,
        steps: int = 10,
        alpha: float | None = None,
        random_start: bool = True,
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
        if not isinstance(random_start, bool):
            raise DynattackError(f"{owner}: random_start must be True or False, got {random_start!r}")
        eps = check_eps(owner, eps)
        if alpha is None and isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
            alpha = 2.5 * eps / steps
        elif alpha is not None:
            alpha = check_positive(owner, "alpha", alpha)
        super().__init__(model, eps=eps, steps=steps, alpha=alpha, grad=grad, lam=lam, targeted=targeted,
                         valid_pixels=valid_pixels, keep=keep, early_stop=early_stop, seed=seed,
                         history=history, progress=progress)
        self.random_start = random_start
