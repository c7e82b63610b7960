"""ILFO on point clouds: the energy baseline (:mod:`.ilfo`) with point coordinates as the domain.

Inherited, not copied: the unweighted hinge over every unit of every gate (here the candidate
voxels of each level), the norm term, plain SGD, no best-keeping. Only the domain changes: the
perturbation is in units of the budget, ``xyz' = xyz + eps * delta`` on the real points (padding
rows and features never move), unclipped while optimising as ILFO runs on images, and the
returned cloud is projected into the box: every coordinate within ``eps`` metres (exactly),
as ILFO's image is clipped to [0, 1]. Measuring the perturbation in eps units keeps ILFO's
documented learning rate meaningful whatever the scene's scale. The per-sample figures mean what
they mean for ILFO: ``success_iteration`` and the history are those of the unprojected iterates.
"""
from __future__ import annotations

import torch

from .base import check_points, check_positive
from .ilfo import ILFO
from .pc_ifgsm import IGNORE, project_to_box


class PointILFO(ILFO):
    """ILFO over voxel occupancy, coordinates within +-``eps`` metres.

    Args:
        model: point victim ``(B, N, 3 + F + 1)`` -> per-point logits, with occupancy gates.
        eps: per-coordinate budget in metres (default 0.02).
        steps, lr, hinge_weight, batch_ref: as :class:`ILFO` (default 50 steps, as the coordinate I-FGSM).
        seed, history, progress: see :class:`~dynattack.attacks.base.Attack`.
    """

    name = "pc-ilfo"
    input_range = None  # metres
    ignore_label = IGNORE

    def __init__(self, model, eps: float = 0.02, steps: int = 50, lr: float = 0.01, hinge_weight: float = 1e6,
                 batch_ref: int = 200, seed: int = 0, history: bool = False, progress: bool = True) -> None:
        super().__init__(model, steps=steps, lr=lr, hinge_weight=hinge_weight, batch_ref=batch_ref, seed=seed, history=history,
                         progress=progress)
        self.eps = check_positive(type(self).__name__, "eps", eps)

    def params(self) -> dict:
        return {**super().params(), "eps": self.eps}

    def _check_inputs(self, points, labels):
        return check_points(type(self).__name__, self.model, points, labels, labels_required=False)

    def init_state(self, images, labels, clean):
        return {**super().init_state(images, labels, clean), "real": images[..., -1:] > 0.5,
                "delta": images.new_zeros(*images.shape[:2], 3)}

    def _points(self, state, idx, delta):
        points = state["x"][idx]
        return torch.cat([points[..., :3] + self.eps * delta * state["real"][idx], points[..., 3:]], dim=-1)

    def forward_input(self, state, idx):
        leaf = state["delta"][idx].requires_grad_()
        return self._points(state, idx, leaf), leaf

    def candidate(self, state, idx):
        return project_to_box(self._points(state, idx, state["delta"][idx])[..., :3], state["x"][idx], self.eps)
