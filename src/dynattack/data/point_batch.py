"""Point-cloud scenes as one batched tensor: the input format of point victims and point attacks.

Scenes hold different numbers of points, and the attack base batches tensors with a leading
batch dimension, so a batch of S scenes is padded to the largest one::

    points  (S, N, 3 + C + 1) float32   columns 0-2: x, y, z in metres (what attacks perturb)
                                        columns 3 .. 2+C: per-point features (RGB in [0, 1])
                                        last column: 1 for a real point, 0 for padding
    labels  (S, N) int64                class index; IGNORE_LABEL (-1) where unlabelled and on padding

Padding rows are all zero. A victim ignores rows whose flag is 0; an attack leaves them alone.
The synthetic rooms are procedural, not scans (see :mod:`dynattack.data.points`).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from ..errors import DynattackError
from .points import IGNORE_LABEL, PointCloud, synthetic_scenes

POINT_DATASETS = ("synthetic-rooms",)
SYNTHETIC_EVAL_SPLIT = "val"  # attacks and tables run on the fixed, seeded validation rooms


class PointBatch(NamedTuple):
    points: torch.Tensor  # (S, N, 3 + C + 1)
    labels: torch.Tensor  # (S, N)
    class_names: tuple[str, ...]


def pack_clouds(clouds: Sequence[PointCloud]) -> PointBatch:
    """Pad ``clouds`` into one batch of as many rows as the largest has points."""
    if not clouds:
        raise DynattackError("no point clouds to pack")
    channels = {c.feats.shape[1] for c in clouds}
    if len(channels) != 1:
        raise DynattackError(f"point clouds with different feature channels {sorted(channels)} cannot share a batch")
    n = max(len(c.coords) for c in clouds)
    c = channels.pop()
    points = torch.zeros(len(clouds), n, 3 + c + 1)
    labels = torch.full((len(clouds), n), IGNORE_LABEL, dtype=torch.long)
    for i, cloud in enumerate(clouds):
        k = len(cloud.coords)
        points[i, :k, :3] = cloud.coords
        points[i, :k, 3:3 + c] = cloud.feats
        points[i, :k, -1] = 1.0
        labels[i, :k] = cloud.labels
    return PointBatch(points, labels, clouds[0].class_names)


def load_point_dataset(name: str, n: int, split: str = SYNTHETIC_EVAL_SPLIT, seed: int = 0) -> PointBatch:
    """The first ``n`` scenes of a point dataset's split, packed. Only the SYNTHETIC rooms are
    built in (scene i depends on (split, seed, i) alone, so any ``n`` is a fixed set)."""
    if name != "synthetic-rooms":
        raise DynattackError(f"unknown point dataset {name!r}; known: {', '.join(POINT_DATASETS)}")
    if n <= 0:
        raise DynattackError(f"need at least one scene, got n = {n}")
    return pack_clouds(synthetic_scenes(split, n, seed))
