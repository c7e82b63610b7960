"""FGSM (Goodfellow et al., 2015): one signed-gradient step of size ``eps``.

``x_adv = clip_[0,1](x + eps * sign(grad_x CE(f(x), y)))`` (targeted: ``x - eps * sign(grad_x
CE(f(x), t))``), restricted to the valid pixels when ``valid_pixels < 1``. The gradient is taken
in the gate mode ``grad`` selects (FGM / LGM); the returned input is always the step's result
(never the clean image), and every figure comes from the hard network. Budget, targets and the
pixel mask are as in :mod:`dynattack.attacks.ifgsm`.
"""
from __future__ import annotations

from .ifgsm import IFGSM


class FGSM(IFGSM):
    """Fast gradient sign method: :class:`~dynattack.attacks.ifgsm.IFGSM` with one step of size eps.

    Args:
        model: the victim, images in [0, 1] -> logits.
        eps: Linf budget in [0, 1] units (8/255 = eight intensity levels).
        grad: gradient mode ``fgm`` | ``lgm`` | ``lgm_st``; ``lam``: LGM sigmoid slope.
        targeted: ``labels`` are target classes.
        valid_pixels: fraction of pixel positions allowed to change (seeded, shared by the batch).
        seed, history, progress: see :class:`~dynattack.attacks.base.Attack`.
    """

    name = "fgsm"

    def __init__(
        self,
        model,
        eps: float = 8 / 255,
        grad: str = "fgm",
        lam: float = 1.0,
        targeted: bool = False,
        valid_pixels: float = 1.0,
        seed: int = 0,
        history: bool = False,
        progress: bool = True,
    ) -> None:
        super().__init__(model, eps=eps, steps=1, alpha=eps, grad=grad, lam=lam, targeted=targeted,
                         valid_pixels=valid_pixels, keep="final", early_stop=False, seed=seed,
                         history=history, progress=progress)
