"""Pack integer voxel coordinates (batch, x, y, z) into one sortable int64 key.

Layout, most significant first: 10 bits batch | 18 bits x | 18 bits y | 18 bits z (64 bits).
Each spatial field stores ``c - COORD_MIN`` so negative coordinates work; the batch field stores
``b - 2**9`` so the whole key stays inside signed int64 without overflow. The packing is
monotonic in (batch, x, y, z) lexicographic order, so sorted keys are sorted coordinates.

Supported range:
  batch index  0 .. 1023
  x, y, z      -131072 .. 131071   (2**17; at 2 cm voxels that is +-2.6 km)

Coordinates are in finest-voxel units at every tensor stride (MinkowskiEngine convention), so
the range does not shrink with downsampling. Coordinates outside raise DynattackError; neighbour
queries that fall outside (a voxel at the limit plus a kernel offset) are reported as absent,
never aliased onto another voxel.
"""
from __future__ import annotations

import torch

from ..errors import DynattackError

BATCH_BITS = 10
COORD_BITS = 18
MAX_BATCH = 2**BATCH_BITS - 1
COORD_MIN = -(2 ** (COORD_BITS - 1))
COORD_MAX = 2 ** (COORD_BITS - 1) - 1
_BATCH_SHIFT = 3 * COORD_BITS
_FIELD_MASK = 2**COORD_BITS - 1


def in_range(coords: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which rows of an (N, 4) coordinate tensor the packing can represent."""
    b, xyz = coords[:, 0], coords[:, 1:]
    ok = (b >= 0) & (b <= MAX_BATCH)
    return ok & ((xyz >= COORD_MIN) & (xyz <= COORD_MAX)).all(dim=1)


def check_coords(coords: torch.Tensor) -> None:
    """Raise DynattackError unless coords is an (N, 4) integer tensor inside the packing range."""
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise DynattackError(f"voxel coordinates must have shape (N, 4) = (batch, x, y, z), got {tuple(coords.shape)}")
    if coords.dtype.is_floating_point or coords.dtype == torch.bool:
        raise DynattackError(f"voxel coordinates must be integers, got {coords.dtype}")
    if coords.numel() and not bool(in_range(coords.long()).all()):
        lo, hi = coords[:, 1:].min().item(), coords[:, 1:].max().item()
        bmin, bmax = coords[:, 0].min().item(), coords[:, 0].max().item()
        raise DynattackError(
            f"voxel coordinates out of the supported range: batch {bmin}..{bmax} (allowed 0..{MAX_BATCH}), "
            f"x/y/z {lo}..{hi} (allowed {COORD_MIN}..{COORD_MAX}); shift the scene or use larger voxels"
        )


def pack(coords: torch.Tensor) -> torch.Tensor:
    """(N, 4) int64 coordinates inside the range -> (N,) int64 keys, order-preserving."""
    c = coords.long()
    key = (c[:, 0] - 2 ** (BATCH_BITS - 1)) << _BATCH_SHIFT
    for i, shift in zip((1, 2, 3), (2 * COORD_BITS, COORD_BITS, 0)):
        key = key | ((c[:, i] - COORD_MIN) << shift)
    return key


def unpack(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack`: (N,) keys -> (N, 4) int64 coordinates."""
    # Arithmetic right shift keeps the sign of the batch field, undone by the offset.
    b = (keys >> _BATCH_SHIFT) + 2 ** (BATCH_BITS - 1)
    fields = [((keys >> shift) & _FIELD_MASK) + COORD_MIN for shift in (2 * COORD_BITS, COORD_BITS, 0)]
    return torch.stack([b, *fields], dim=1)


def offset_deltas(offsets: torch.Tensor) -> torch.Tensor:
    """(K, 3) spatial offsets -> (K,) key deltas: ``pack(c + d) == pack(c) + delta(d)`` whenever
    both c and c + d are inside the range (no field over- or underflows, so no carries)."""
    d = offsets.long()
    return d[:, 0] * 2 ** (2 * COORD_BITS) + d[:, 1] * 2**COORD_BITS + d[:, 2]
