"""Random perturbation of point coordinates: the baseline of the LGM paper's point-cloud tables.

Every real point (flag column 1, see :mod:`dynattack.attacks.pc_ifgsm` for the input format) moves
by an offset drawn uniformly from the box ``[-eps, eps]^3``, from the attack's seeded generator
(one draw per call, so a sample's offsets depend on the seed and its row in the batch); padding
rows stay. The perturbed cloud is returned whatever its mIoU (no best-of selection: that would
make it a search), and evaluated on the hard network like every attack.
"""
from __future__ import annotations

import torch

from .pc_ifgsm import PointIFGSM


class PointRandom(PointIFGSM):
    """Uniform noise in the eps box on the coordinates of the real points (no gradient, no steps).

    Args:
        model: the victim, points ``(B, N, 3 + F)`` -> per-point logits ``(B, classes, N)``.
        eps: budget in metres. seed, history, progress: see :class:`~dynattack.attacks.base.Attack`.
    """

    name = "pc-random"
    keep_best = False  # the random cloud itself, not the better of it and the clean one

    def __init__(self, model, eps: float = 0.02, seed: int = 0, history: bool = False, progress: bool = True) -> None:
        super().__init__(model, eps=eps, steps=0, seed=seed, history=history, progress=progress)

    def params(self) -> dict:
        return {"eps": self.eps, "seed": self.seed}

    def init_state(self, images, labels, clean):
        state = super().init_state(images, labels, clean)
        u = torch.rand(*images.shape[:2], 3, generator=self.generator, device=images.device, dtype=images.dtype)
        real = images[..., -1:] > 0.5
        state["adv"] = self.project(images[..., :3] + (2 * u - 1) * self.eps * real, images)
        return state
