"""A sparse voxel tensor: a :class:`CoordinateSet` plus one feature row per voxel."""
from __future__ import annotations

import torch

from ..errors import DynattackError
from .coords import CoordinateSet


class SparseTensor:
    """Features ``F`` (N, C) on the voxels of a :class:`CoordinateSet` (N rows, same order).

    Layers return new tensors that share the coordinate set (and so its cached kernel maps)
    whenever the coordinates do not change. ``coords`` may be given as an (N, 4) int tensor
    (batch, x, y, z) at tensor stride ``stride``, or as a ready CoordinateSet.
    """

    def __init__(self, feats: torch.Tensor, coords: torch.Tensor | CoordinateSet, stride: int = 1):
        if not isinstance(coords, CoordinateSet):
            coords = CoordinateSet(coords.to(feats.device), stride)
        if feats.dim() != 2 or feats.shape[0] != len(coords):
            raise DynattackError(
                f"features must have shape (N, C) with N = {len(coords)} voxels, got {tuple(feats.shape)}"
            )
        if feats.device != coords.device:
            raise DynattackError(f"features on {feats.device} but coordinates on {coords.device}")
        self.F = feats
        self.coordinate_set = coords

    @property
    def C(self) -> torch.Tensor:
        """(N, 4) int64 coordinates (batch, x, y, z)."""
        return self.coordinate_set.coords

    @property
    def stride(self) -> int:
        return self.coordinate_set.stride

    @property
    def batch_size(self) -> int:
        return self.coordinate_set.batch_size

    @property
    def device(self) -> torch.device:
        return self.F.device

    def __len__(self) -> int:
        return self.F.shape[0]

    def __repr__(self) -> str:
        return f"SparseTensor(n={len(self)}, channels={self.F.shape[1]}, stride={self.stride}, dtype={self.F.dtype})"

    def replace(self, feats: torch.Tensor) -> "SparseTensor":
        """Same coordinates (and kernel maps), new features, e.g. ``x.replace(x.F * occ[:, None])``."""
        return SparseTensor(feats, self.coordinate_set)

    def to(self, device=None, dtype=None) -> "SparseTensor":
        return SparseTensor(self.F.to(device=device, dtype=dtype), self.coordinate_set.to(device or self.device))

    def __add__(self, other: "SparseTensor") -> "SparseTensor":
        """Residual sum; both operands must live on the same CoordinateSet object."""
        _same_coords(self, other)
        return self.replace(self.F + other.F)


def _same_coords(*tensors: SparseTensor) -> None:
    first = tensors[0].coordinate_set
    if any(t.coordinate_set is not first for t in tensors[1:]):
        raise DynattackError("sparse tensors must share one CoordinateSet (same voxels, same order)")


def cat(*tensors: SparseTensor) -> SparseTensor:
    """Concatenate features along channels (U-Net skip connections); coordinates must be shared."""
    _same_coords(*tensors)
    return tensors[0].replace(torch.cat([t.F for t in tensors], dim=1))
