"""Sparse voxel convolution in plain PyTorch (CPU, or GPU when the tensors are on CUDA).

A :class:`SparseTensor` is features (N, C) on a :class:`CoordinateSet` of unique integer voxel
coordinates (N, 4) = (batch, x, y, z) at a tensor stride. Kernel maps are built once per
(coordinate sets, kernel size, dilation, direction) with packed int64 keys and
``torch.searchsorted`` and cached on the output set; convolutions run gather -> matmul ->
scatter per kernel offset in a custom autograd Function that saves only indices and inputs.

    x = SparseTensor(feats, coords)                  # coords (N, 4) int, batch first
    y = SparseConv3d(16, 32, 3)(x)                   # submanifold: y shares x's voxels
    d = SparseConv3d(32, 64, 2, stride=2)(y)         # downsampling: d.C = unique(floor(c/2)*2)
    u = SparseConvTranspose3d(64, 32, 2)(d, y.coordinate_set)   # back onto y's voxels

Gating by occupancy (soft or hard) is plain feature scaling: ``y.replace(y.F * occ[:, None])``;
the next level's occupancy is :func:`downsample_occupancy` (1 - prod(1 - occ_children)), and a
candidate voxel set is just another CoordinateSet. Key range: see :mod:`dynattack.sparse.keys`.
"""
from .coords import CoordinateSet, KernelMap, kernel_offsets
from .functional import SparseConvFunction, conv3d, conv_transpose3d, downsample_occupancy, global_pool
from .keys import COORD_MAX, COORD_MIN, MAX_BATCH
from .modules import SparseBatchNorm, SparseConv3d, SparseConvTranspose3d, SparseGlobalPool, SparseReLU
from .tensor import SparseTensor, cat

__all__ = [
    "COORD_MAX",
    "COORD_MIN",
    "MAX_BATCH",
    "CoordinateSet",
    "KernelMap",
    "SparseBatchNorm",
    "SparseConv3d",
    "SparseConvFunction",
    "SparseConvTranspose3d",
    "SparseGlobalPool",
    "SparseReLU",
    "SparseTensor",
    "cat",
    "conv3d",
    "conv_transpose3d",
    "downsample_occupancy",
    "global_pool",
    "kernel_offsets",
]
