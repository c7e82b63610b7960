"""A set of voxel coordinates with its sorted keys, its downsampled parents and cached kernel maps.

Conventions (MinkowskiEngine's): coordinates are (batch, x, y, z) in finest-voxel units at every
tensor stride ``s``; a set at stride ``s`` holds multiples of ``s``. Downsampling by ``f`` maps a
voxel ``c`` to ``floor(c / (s*f)) * (s*f)``. Kernel offsets of a size-``k`` kernel are
``u = lo .. lo+k-1`` per axis with ``lo = -((k-1)//2)`` ({-1,0,1} for k=3, {0,1} for k=2), scaled
by the input stride and the dilation; offset ``j`` of the flattened kernel is (ux, uy, uz) with x
slowest and z fastest, the order of a ``conv3d`` weight's last three dims.

A :class:`KernelMap` lists, per kernel offset, the (input row, output row) pairs the offset
connects. It is built once per (input set, output set, kernel size, dilation, direction) and
cached on the output set, so every layer that convolves the same coordinates shares it.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from ..errors import DynattackError
from . import keys as K


class KernelMap(NamedTuple):
    """(input row, output row) pairs grouped by kernel offset; only index tensors, no features."""

    in_idx: torch.Tensor  # (P,) int64 rows of the input features
    out_idx: torch.Tensor  # (P,) int64 rows of the output features
    counts: tuple[int, ...]  # pairs per kernel offset (sums to P), one entry per offset
    n_in: int
    n_out: int
    identity: int | None  # offset whose pairs are exactly (i, i) for every row, if any

    def transposed(self) -> "KernelMap":
        """The same pairs read the other way round (the adjoint convolution)."""
        return KernelMap(self.out_idx, self.in_idx, self.counts, self.n_out, self.n_in, self.identity)

    def pairs(self, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input rows, output rows) connected by kernel offset ``offset``."""
        start = sum(self.counts[:offset])
        end = start + self.counts[offset]
        return self.in_idx[start:end], self.out_idx[start:end]


def kernel_offsets(kernel_size: int, device=None) -> torch.Tensor:
    """(k**3, 3) int64 offsets in kernel units, x slowest, z fastest (conv3d weight order)."""
    if kernel_size < 1:
        raise DynattackError(f"kernel size must be >= 1, got {kernel_size}")
    lo = -((kernel_size - 1) // 2)
    axis = range(lo, lo + kernel_size)
    return torch.tensor(list(itertools.product(axis, axis, axis)), dtype=torch.long, device=device)


class CoordinateSet:
    """Unique voxel coordinates (N, 4) int64 = (batch, x, y, z) at tensor stride ``stride``.

    Row order is the caller's (features line up with ``coords``); lookups go through the sorted
    packed keys. Downsampled sets and kernel maps are built on first use and cached here.
    """

    def __init__(self, coords: torch.Tensor, stride: int = 1):
        K.check_coords(coords)
        if stride < 1:
            raise DynattackError(f"tensor stride must be >= 1, got {stride}")
        self.coords = coords.long().contiguous()
        self.stride = int(stride)
        if stride > 1 and bool((self.coords[:, 1:] % stride != 0).any()):
            raise DynattackError(f"coordinates at tensor stride {stride} must be multiples of {stride}")
        self._sorted_keys, self._order = torch.sort(K.pack(self.coords))
        if bool((self._sorted_keys[1:] == self._sorted_keys[:-1]).any()):
            raise DynattackError("voxel coordinates must be unique (voxelise the points first)")
        self._maps: dict[tuple, KernelMap] = {}
        self._down: dict[int, tuple[CoordinateSet, torch.Tensor]] = {}
        self.maps_built = 0  # kernel maps built for this set as output: lets tests see cache hits
        self.backend_cache: dict = {}  # per-backend state (e.g. spconv index pairs) tied to this set

    def __len__(self) -> int:
        return self.coords.shape[0]

    def __repr__(self) -> str:
        return f"CoordinateSet(n={len(self)}, stride={self.stride}, device={self.device})"

    @property
    def device(self) -> torch.device:
        return self.coords.device

    @property
    def batch_size(self) -> int:
        """Largest batch index + 1 (0 for an empty set)."""
        return int(self.coords[:, 0].max()) + 1 if len(self) else 0

    def to(self, device) -> "CoordinateSet":
        """This set on ``device`` (itself when already there; caches do not travel)."""
        device = torch.device(device)
        return self if self.device == device else CoordinateSet(self.coords.to(device), self.stride)

    def lookup(self, query: torch.Tensor) -> torch.Tensor:
        """(M, 4) coordinates -> (M,) row in this set, -1 where absent (or outside the key range)."""
        query = query.long()
        inside = K.in_range(query)
        # Clamp before packing so out-of-range queries cannot alias onto a real key.
        q = K.pack(torch.where(inside[:, None], query, torch.zeros_like(query)))
        if len(self) == 0:
            return torch.full_like(q, -1)
        pos = torch.searchsorted(self._sorted_keys, q).clamp_(max=len(self) - 1)
        hit = inside & (self._sorted_keys[pos] == q)
        return torch.where(hit, self._order[pos], torch.full_like(pos, -1))

    def downsample(self, factor: int = 2) -> "CoordinateSet":
        """The coarser set ``unique(floor(c / (s*factor)) * (s*factor))`` at stride ``s*factor``."""
        return self._downsampled(factor)[0]

    def parent_index(self, factor: int = 2) -> torch.Tensor:
        """(N,) row in ``downsample(factor)`` of the voxel that contains each voxel of this set."""
        return self._downsampled(factor)[1]

    def _downsampled(self, factor: int) -> tuple["CoordinateSet", torch.Tensor]:
        if factor < 1:
            raise DynattackError(f"downsampling factor must be >= 1, got {factor}")
        if factor not in self._down:
            step = self.stride * factor
            coarse = self.coords.clone()
            coarse[:, 1:] = torch.div(coarse[:, 1:], step, rounding_mode="floor") * step
            # torch.unique sorts, so the coarse rows come out in (batch, x, y, z) order.
            unique, parent = torch.unique(K.pack(coarse), return_inverse=True)
            self._down[factor] = (CoordinateSet(K.unpack(unique), step), parent)
        return self._down[factor]

    def kernel_map(self, source: "CoordinateSet", kernel_size: int, dilation: int = 1,
                   transposed: bool = False) -> KernelMap:
        """Pairs for a convolution from ``source`` (input) to this set (output), cached.

        Forward (regular or strided): output voxel ``o`` gathers input ``o + u * s_in * dilation``.
        Transposed (upsampling): output voxel ``o`` gathers input ``o - u * s_out * dilation``,
        the exact adjoint of the strided convolution that went from this set to ``source``.
        """
        key = (source, kernel_size, dilation, transposed)  # the set object itself: identity, kept alive
        if key not in self._maps:
            self._maps[key] = self._build_map(source, kernel_size, dilation, transposed)
            self.maps_built += 1
        return self._maps[key]

    def _build_map(self, source: "CoordinateSet", kernel_size: int, dilation: int, transposed: bool) -> KernelMap:
        if source.device != self.device:
            raise DynattackError(f"coordinate sets on different devices: {source.device} and {self.device}")
        step = (self.stride if transposed else source.stride) * dilation * (-1 if transposed else 1)
        offsets = kernel_offsets(kernel_size, self.device) * step
        n = len(offsets)
        # Within one set, offset -u pairs are offset u's pairs swapped (o + u = i <=> i - u = o); with
        # an odd kernel, -u is offset n-1-j, so only the first half (and the centre) is searched.
        mirror = source is self and kernel_size % 2 == 1
        searched = offsets[: n // 2 + 1] if mirror else offsets
        neighbours = self._neighbours_by_key if self._offsets_stay_in_range(searched) else self._neighbours_by_lookup
        pairs = list(neighbours(source, searched))
        if mirror:
            pairs += [(out_rows, in_rows) for in_rows, out_rows in reversed(pairs[: n // 2])]
        counts = tuple(out_rows.numel() for _, out_rows in pairs)
        identity = n // 2 if mirror else None  # the centre offset maps every voxel to itself
        return KernelMap(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]), counts,
                         len(source), len(self), identity)

    def _offsets_stay_in_range(self, offsets: torch.Tensor) -> bool:
        """True when every voxel plus every offset stays inside the key range (the usual case)."""
        if len(self) == 0:
            return True
        lo, hi = self.coords[:, 1:].min(dim=0).values, self.coords[:, 1:].max(dim=0).values
        return bool((lo + offsets.min(dim=0).values >= K.COORD_MIN).all() and
                    (hi + offsets.max(dim=0).values <= K.COORD_MAX).all())

    def _neighbours_by_key(self, source: "CoordinateSet", offsets: torch.Tensor):
        """Per offset: add the key delta to the sorted keys (no re-packing; sorted queries search
        fast), then map sorted positions back to rows."""
        for delta in K.offset_deltas(offsets).tolist():
            query = self._sorted_keys + delta
            pos = torch.searchsorted(source._sorted_keys, query).clamp_(max=max(len(source) - 1, 0))
            hit = (source._sorted_keys[pos] == query) if len(source) else torch.zeros_like(query, dtype=torch.bool)
            yield source._order[pos[hit]], self._order[hit]

    def _neighbours_by_lookup(self, source: "CoordinateSet", offsets: torch.Tensor):
        """Per offset: full lookup, which treats coordinates pushed out of range as absent."""
        shift = torch.zeros(4, dtype=torch.long, device=self.device)
        for offset in offsets:
            shift[1:] = offset
            rows = source.lookup(self.coords + shift)
            out_rows = (rows >= 0).nonzero().squeeze(1)
            yield rows[out_rows], out_rows
