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

Spread start (ours; ``start="spread"``, the default). The gradient of the occupancy logits says
where the nearest point should go, one voxel at a time; it cannot say that the FLOPs of a
MinkowskiNet-style U-Net sit mostly in its coarse levels, where one point moved into an empty
4 cm voxel adds a voxel and its kernel-map pairs at every coarser level, for the price of at
most one cheap 2 cm voxel it leaves. :func:`spread_placement` is a greedy over the points: each
point in turn moves (within the budget, at most once) into the reachable empty voxel whose
occupation gains the most executed FLOPs net of what its leaving costs, counted exactly from
the per-level voxel and pair costs the gate events carry. The iterations then start from
there (best-so-far keeps the start if they do worse). On the first 2 synthetic rooms at eps
0.02 the placement alone recovered 96.6 / 98.8 % (a scratch run, 2026-12-03; the bench tables
are not rerun yet) against 26.7 % for the gradient alone (bench/results/pointcloud_tables).
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .. import cost
from ..errors import DynattackError
from ..gates import Trace
from .base import PerSampleAdam, check_points, check_positive
from .gradauto import GradAuto
from .pc_ifgsm import IGNORE


_NEIGHBOURS = [(dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1) if dx or dy or dz]
START_MODES = ("clean", "spread")


def spread_placement(xyz: torch.Tensor, voxel_size: float, eps: float, levels: list[tuple[float, float]],
                     clean_flops: float, progress: bool = False, margin: float = 0.02, slack: float = 0.98,
                     sweeps: int = 3) -> tuple[torch.Tensor, float]:
    """Greedy point moves that raise a voxel U-Net's executed FLOPs: ``(shift (n, 3), FLOPs gained)``
    for the ``(n, 3)`` coordinates of one scene, every ``|shift| <= slack * eps`` per axis.

    ``levels``: ``(voxel_flops, pair_flops)`` per level, finest first, each level's voxels the
    stride-2 parents of the finer one's; a level's FLOPs are ``voxel_flops`` x its occupied voxels
    + ``pair_flops`` x the pairs of its 3x3x3 kernel map among them. Each point in turn (at most
    once, ``sweeps`` passes) moves into the empty voxel its budget box reaches whose occupation
    gains the most FLOPs net of what its leaving loses (a voxel it empties, and the parents that
    empty with it), landing ``margin`` voxels inside it. The bookkeeping must give ``clean_flops``
    for the clean scene (else the victim is not such a U-Net: refused)."""
    size = voxel_size
    reach, inset = eps * slack, margin * size
    pos = xyz.double().tolist()
    cells = [tuple(c) for c in torch.floor(xyz.double() / size).long().tolist()]
    n_levels = len(levels)
    # count[0]: points per finest voxel; count[k]: occupied level-(k-1) children per level-k voxel
    count: list[dict] = [dict() for _ in range(n_levels)]
    for c in cells:
        count[0][c] = count[0].get(c, 0) + 1
    for k in range(1, n_levels):
        for c in count[k - 1]:
            up = (c[0] >> 1, c[1] >> 1, c[2] >> 1)
            count[k][up] = count[k].get(up, 0) + 1

    def neighbours(c, k):
        occupied = count[k]
        return sum((c[0] + dx, c[1] + dy, c[2] + dz) in occupied for dx, dy, dz in _NEIGHBOURS)

    def voxel_cost(c, k):  # the FLOPs voxel c of level k adds with its pairs (1 + 2 x its neighbours)
        vf, pf = levels[k]
        return vf + pf * (1 + 2 * neighbours(c, k))

    counted = sum(levels[k][0] * len(count[k]) + levels[k][1] * sum(1 + neighbours(c, k) for c in count[k])
                  for k in range(n_levels))
    if not math.isclose(counted, clean_flops, rel_tol=1e-9):
        raise DynattackError(f"start='spread' counts {counted:.6g} FLOPs on the clean scene where the victim "
                             f"counts {clean_flops:.6g}: its voxel levels are not the stride-2 U-Net levels the "
                             f"placement assumes; use start='clean'")

    def gain(c):  # occupying the empty finest voxel c: it and every parent it is the first child of
        g = 0.0
        for k in range(n_levels):
            ck = (c[0] >> k, c[1] >> k, c[2] >> k)
            if ck in count[k]:
                break
            g += voxel_cost(ck, k)
        return g

    def add(c, step):  # one point into (step 1) or out of (step -1) finest voxel c; FLOPs lost (out)
        lost, log = 0.0, []
        for k in range(n_levels):
            ck = (c[0] >> k, c[1] >> k, c[2] >> k)
            count[k][ck] = count[k].get(ck, 0) + step
            log.append(ck)
            if step > 0 and count[k][ck] > 1:
                break
            if step < 0:
                if count[k][ck] > 0:
                    break
                del count[k][ck]
                lost += voxel_cost(ck, k)
        return lost, log

    def reachable(p):
        axes = []
        for a in range(3):
            lo, hi = math.floor((p[a] - reach) / size), math.floor((p[a] + reach) / size)
            axes.append([c for c in range(lo, hi + 1) if c * size + inset <= p[a] + reach
                         and (c + 1) * size - inset >= p[a] - reach])
        return [(x, y, z) for x in axes[0] for y in axes[1] for z in axes[2]]

    shift = torch.zeros(len(pos), 3, dtype=torch.float64)
    moved = [False] * len(pos)
    total = 0.0
    for _ in range(sweeps):
        changed = 0
        for i in tqdm(range(len(pos)), desc="spread start", disable=not progress, leave=False, mininterval=1.0):
            if moved[i]:
                continue
            lost, log = add(cells[i], -1)
            best, target = 0.0, None
            for c in reachable(pos[i]):
                if c not in count[0]:
                    g = gain(c) - lost
                    if g > best:
                        best, target = g, c
            if target is None:  # put it back
                for k, ck in enumerate(log):
                    count[k][ck] = count[k].get(ck, 0) + 1
                continue
            add(target, 1)
            total += best
            moved[i], cells[i], changed = True, target, changed + 1
            shift[i] = torch.tensor([min(max(pos[i][a], target[a] * size + inset), (target[a] + 1) * size - inset)
                                     - pos[i][a] for a in range(3)], dtype=torch.float64)
        if not changed:
            break
    return shift.to(xyz.dtype), total


class PointGradAuto(GradAuto):
    """GradAuto over voxel occupancy, coordinates within +-``eps`` metres.

    Args:
        model: point victim ``(B, N, 3 + F + 1)`` -> per-point logits, with occupancy gates.
        eps: per-coordinate budget in metres (default 0.02, one 2 cm voxel).
        K, steps, lr, rectify_direction, rectify_magnitude, rd_start: as :class:`GradAuto`
            (defaults for scenes: 50 steps, as the coordinate I-FGSM; lr 0.1 in tanh space, so a
            point can cross its budget in ~10 steps).
        start: ``spread`` (default): the iterations start from :func:`spread_placement` (needs a
            victim with ``voxel_size`` whose gate events carry ``voxel_flops`` and ``pair_flops``,
            checked against its own FLOPs count); ``clean``: from the clean cloud.
        seed, history, progress: see :class:`~dynattack.attacks.base.Attack`.
    """

    name = "pc-gradauto"
    input_range = None  # metres
    ignore_label = IGNORE

    def __init__(self, model, eps: float = 0.02, K: float = 1.0, steps: int = 50, lr: float = 0.1,
                 rectify_direction: bool = True, rectify_magnitude: bool = True, rd_start: int = 0,
                 start: str = "spread", seed: int = 0, history: bool = False, progress: bool = True) -> None:
        super().__init__(model, K=K, steps=steps, lr=lr, rectify_direction=rectify_direction,
                         rectify_magnitude=rectify_magnitude, rd_start=rd_start, early_stop=False,
                         keep_optimising_distortion=False, seed=seed, history=history, progress=progress)
        self.eps = check_positive(type(self).__name__, "eps", eps)
        if start not in START_MODES:
            raise DynattackError(f"{type(self).__name__}: start must be one of {', '.join(START_MODES)}, got {start!r}")
        self.point_start = start

    def params(self) -> dict:
        p = {**super().params(), "eps": self.eps, "start": self.point_start}
        for key in ("tanh_eps", "keep_optimising_distortion", "early_stop"):
            p.pop(key)
        return p

    def _check_inputs(self, points, labels):
        return check_points(type(self).__name__, self.model, points, labels, labels_required=False)

    def init_state(self, images, labels, clean):
        real = images[..., -1:] > 0.5
        delta = images.new_zeros(*images.shape[:2], 3)
        if self.point_start == "spread":
            delta = torch.atanh(self.spread_shift(images, real[..., 0]) / self.eps)
        return {"x": images, "real": real, "delta": delta, "adam": PerSampleAdam(delta, self.lr)}

    def spread_shift(self, points: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``(B, N, 3)`` coordinate shifts of :func:`spread_placement`, scene by scene (0 on padding)."""
        size = getattr(self.model, "voxel_size", None)
        with torch.no_grad(), Trace() as trace:
            self.model(points)
        levels = [(getattr(e, "voxel_flops", None), getattr(e, "pair_flops", None)) for e in trace]
        if not isinstance(size, (int, float)) or not levels or any(None in lv for lv in levels):
            raise DynattackError(f"{type(self).__name__}: start='spread' needs a voxel victim (voxel_size, gate events "
                                 f"with voxel_flops and pair_flops); use start='clean'")
        flops = cost.executed_flops(self.model, trace)
        shift = points.new_zeros(*points.shape[:2], 3)
        for b in range(points.shape[0]):
            rows = real[b].nonzero().squeeze(1)
            shift[b, rows] = spread_placement(points[b, rows, :3], float(size), self.eps, levels, float(flops[b]),
                                              progress=self.progress)[0]
        return shift

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
