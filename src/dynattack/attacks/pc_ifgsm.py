"""Point-cloud I-FGSM on coordinates (the variant of Liu et al. for real-valued points, which the
LGM paper runs on 3D sparse networks), FGM vs LGM through the model's gate modes as in 2D.

Inputs are the point batch of :mod:`dynattack.data.point_batch`: ``points (B, N, 3 + F)`` with x, y,
z in metres in columns 0-2 (the only columns an attack changes) and a last column that is 1 for
a real point and 0 for padding; ``labels (B, N)`` per-point classes, ``-1`` where ignored. The
victim returns per-point logits ``(B, classes, N)``.

Per iteration and per scene, on the scenes still running::

    g     = grad_xyz CE(f(x_t), y)            mean over the labelled points; the gradient forward
                                              runs in the gate mode ``grad`` selects
    x_t+1 = x + clip_[-eps, eps](x_t + alpha g / max|g| - x)     max over the scene's coordinates

``fgm`` takes the gradient of the hard network (voxel occupancy held constant), ``lgm`` of the
dynamics-aware copy (soft occupancy, ``sigmoid`` slope ``lam``), ``lgm_st`` hard forward with
lgm's backward. Every evaluation uses the hard network. Each scene keeps the iterate with the
lowest mIoU on the hard network (ties: the lower L2 distortion), as the paper keeps the
coordinates of the lowest mIoU; the goal (for ``success`` and ``early_stop``) is every labelled
point misclassified.

Defaults follow the paper's ScanNet setting: 50 iterations, ``lam = 10``; ``alpha = eps / 4``
(the paper sweeps 0.0005-0.025 m): with the max-normalised step only the point of largest
gradient moves by ``alpha``, the others less.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AccuracyAttack, Evaluation, check_points, check_positive, per_sample_view, vjp

IGNORE = -1  # label of unlabelled points and padding rows


def scene_miou(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B,)`` float64 mIoU of each scene (over the classes present in its prediction or labels;
    nan without labelled points), from ``(B, N)`` predicted and true labels."""
    b, k = pred.shape[0], num_classes
    keep = labels != IGNORE
    scene = torch.arange(b, device=pred.device)[:, None].expand_as(labels)[keep]
    code = (scene * k + labels[keep]) * k + pred[keep]
    conf = torch.bincount(code, minlength=b * k * k).view(b, k, k).double()
    inter = conf.diagonal(dim1=1, dim2=2)
    union = conf.sum(1) + conf.sum(2) - inter
    return torch.nanmean(inter / union, dim=1)  # 0 / 0: a class absent from the scene


def project_to_box(xyz: torch.Tensor, points: torch.Tensor, eps: float) -> torch.Tensor:
    """``points`` with coordinates ``xyz`` pulled into the box of half-width ``eps`` around the
    original ones.

    Exact: computed in float64, rounded to the input dtype, and where that rounding left the box
    (by one ulp) moved one representable value back, so ``|adv - x| <= eps`` holds with no
    tolerance."""
    x = points[..., :3]
    x64 = x.double()
    out = (x64 + (xyz.double() - x64).clamp(-eps, eps)).to(x.dtype)
    out = torch.where((out.double() - x64).abs() > eps, torch.nextafter(out, x), out)
    return torch.cat([out, points[..., 3:]], dim=-1)


class PointIFGSM(AccuracyAttack):
    """Coordinate I-FGSM on point clouds, Linf budget ``eps`` in metres per coordinate.

    Args:
        model: the victim, points ``(B, N, 3 + F)`` -> per-point logits ``(B, classes, N)``.
        eps: budget in metres (the paper: 0.005, 0.01, 0.02, 0.05 at 2 cm voxels).
        steps: iterations (default 50). alpha: step in metres (default ``eps / 4``).
        grad: ``fgm`` | ``lgm`` | ``lgm_st``; lam: the LGM slope (default 10).
        early_stop, seed, history, progress: see :class:`~dynattack.attacks.base.Attack`.
    """

    name = "pc-ifgsm"
    input_range = None  # metres
    ignore_label = IGNORE

    def __init__(self, model, eps: float = 0.02, steps: int = 50, alpha: float | None = None, grad: str = "fgm",
                 lam: float = 10.0, early_stop: bool = False, seed: int = 0, history: bool = False,
                 progress: bool = True) -> None:
        super().__init__(model, steps=steps, grad=grad, lam=lam, seed=seed, early_stop=early_stop, history=history,
                         progress=progress)
        owner = type(self).__name__
        self.eps = check_positive(owner, "eps", eps)
        self.alpha = self.eps / 4 if alpha is None else check_positive(owner, "alpha", alpha)

    def params(self) -> dict:
        p = {**super().params(), "eps": self.eps, "alpha": self.alpha}
        p.pop("targeted")
        return p

    # ---- pieces ------------------------------------------------------------------------------
    def project(self, xyz: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return project_to_box(xyz, points, self.eps)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(n,)`` cross-entropy of each scene, averaged over its labelled points."""
        ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
        return ce.sum(1) / (labels != IGNORE).sum(1).clamp_min(1)

    # ---- hooks -------------------------------------------------------------------------------
    def _check_inputs(self, points, labels):
        return check_points(type(self).__name__, self.model, points, labels, labels_required=True)

    def init_state(self, images, labels, clean):
        return {"x": images, "labels": labels, "adv": images.clone()}

    def step(self, state, idx, leaf, fwd, keep, it):
        loss = self.loss(fwd.logits, state["labels"][idx])
        g = vjp(loss, leaf)[..., :3]
        top = g.flatten(1).abs().amax(1)
        rows = idx[keep]
        direction = g[keep] / per_sample_view(torch.where(top > 0, top, torch.ones_like(top))[keep], g[keep])
        state["adv"][rows] = self.project(leaf.detach()[keep, ..., :3] + self.alpha * direction, state["x"][rows])
        return {"loss": loss.detach(), "grad_max": top}

    def goal(self, ev: Evaluation, labels: torch.Tensor) -> torch.Tensor:
        return ((ev.pred == labels) & (labels != IGNORE)).sum(1) == 0

    def score(self, ev: Evaluation, labels: torch.Tensor) -> torch.Tensor:
        """Minus the scene's mIoU on the hard network (lower mIoU is better)."""
        return torch.nan_to_num(-scene_miou(ev.pred, labels, ev.logits.shape[1]), nan=0.0)
