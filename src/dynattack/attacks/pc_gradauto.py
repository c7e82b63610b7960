"""GradAuto on point clouds: move points within +-eps so that more voxels become occupied.

No paper attacks a 3D sparse network's energy; this is GradAuto (:mod:`.gradauto`) with the point
coordinates as the perturbation domain instead of the image box. Everything but the domain is
inherited, not copied: the complexity and finished losses over every unit of every gate (here the
candidate voxels of each level, ``G = sigmoid(q)`` with ``q`` the signed distance of the nearest
point to the voxel's box, so an empty candidate pulls its nearest point towards it), the rectified
direction and magnitude, per-sample Adam, best-so-far by executed FLOPs on the hard network.

Domain. ``xyz' = xyz + eps * tanh(delta)``: ``delta = 0`` is the clean cloud exactly, every point
stays within ``eps`` of its own position on each axis (the L-inf budget of the coordinate
I-FGSM), features and padding rows never change. Distortion: the squared offsets in units of
eps, ``sum(((xyz' - xyz) / eps) ** 2)``, so K weighs the complexity direction against a
distortion of the same scale as the image attack's (pixels in [0, 1]); its gradient
``2 tanh(delta) (1 - tanh(delta)^2)`` is closed-form, as there.

Goal. "Every costed unit on" means every candidate voxel occupied, which moving points cannot
reach (a voxel a point leaves may empty): early stop never fires and the attack runs all its
steps, keeping per scene the cloud with the most executed FLOPs. Candidates are the voxels within
the victim's ``reach`` of a point *now*, so the set follows the points as they move; the runner
reports the FLOPs increase over the clean cloud and the recovery against the clean cloud's
candidates all on (which may exceed 100 %).
"""
from __future__ import annotations

import torch

from .base import PerSampleAdam, check_points, check_positive
from .gradauto import GradAuto
from .pc_ifgsm import IGNORE


class PointGradAuto(GradAuto):
    """GradAuto over voxel occupancy, coordinates within +-``eps`` metres.

    Args:
        model: point victim ``(B, N, 3 + F + 1)`` -> per-point logits, with occupancy gates.
        eps: per-coordinate budget in metres (default 0.02, one 2 cm voxel).
        K, steps, lr, rectify_direction, rectify_magnitude, rd_start: as :class:`GradAuto`
            (defaults for scenes: 50 steps, as the coordinate I-FGSM; lr 0.1 in tanh space, so a
            point can cross its budget in ~10 steps).
        seed, history, progress: see :class:`~dynattack.attacks.base.Attack`.
    """

    name = "pc-gradauto"
    input_range = None  # metres
    ignore_label = IGNORE

    def __init__(self, model, eps: float = 0.02, K: float = 1.0, steps: int = 50, lr: float = 0.1,
                 rectify_direction: bool = True, rectify_magnitude: bool = True, rd_start: int = 0,
                 seed: int = 0, history: bool = False, progress: bool = True) -> None:
        super().__init__(model, K=K, steps=steps, lr=lr, rectify_direction=rectify_direction,
                         rectify_magnitude=rectify_magnitude, rd_start=rd_start, early_stop=False,
                         keep_optimising_distortion=False, seed=seed, history=history, progress=progress)
        self.eps = check_positive(type(self).__name__, "eps", eps)

    def params(self) -> dict:
        p = {**super().params(), "eps": self.eps}
        for key in ("tanh_eps", "keep_optimising_distortion", "early_stop"):
            p.pop(key)
        return p

    def _check_inputs(self, points, labels):
        return check_points(type(self).__name__, self.model, points, labels, labels_required=False)

    def init_state(self, images, labels, clean):
        delta = images.new_zeros(*images.shape[:2], 3)
        return {"x": images, "real": images[..., -1:] > 0.5, "delta": delta, "adam": PerSampleAdam(delta, self.lr)}

    def _map(self, state, idx, delta):
        """``(points, d xyz / d delta)``."""
        t = torch.tanh(delta)
        points, real = state["x"][idx], state["real"][idx]
        xyz = points[..., :3] + self.eps * t * real  # padding rows stay
        return torch.cat([xyz, points[..., 3:]], dim=-1), self.eps * (1 - t * t) * real

    def _delta_grad(self, g_x, jac):
        return g_x[..., :3] * jac

    def _mse_grad(self, state, idx, x_adv, jac):
        """Closed-form gradient of ``sum(((xyz' - xyz) / eps) ** 2) = sum(tanh(delta) ** 2)``
        over the real points."""
        t = torch.tanh(state["delta"][idx])
        return 2 * t * (1 - t * t) * state["real"][idx]
