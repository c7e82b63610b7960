"""nn.Module wrappers: sparse convolutions, BatchNorm and ReLU on features, global pooling."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as SF
from .coords import CoordinateSet
from .tensor import SparseTensor


class _SparseConvBase(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.weight = nn.Parameter(torch.empty(kernel_size**3, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv3d's default (kaiming uniform, a = sqrt(5)) reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1 / math.sqrt(self.in_channels * self.kernel_size**3)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)


class SparseConv3d(_SparseConvBase):
    """Submanifold (stride 1) or strided (stride > 1) sparse convolution; weight (k**3, C_in, C_out)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, bias: bool = False, backend: str = "torch"):
        super().__init__(in_channels, out_channels, kernel_size, bias)
        self.stride, self.dilation, self.backend = stride, dilation, backend

    def forward(self, x: SparseTensor) -> SparseTensor:
        return SF.conv3d(x, self.weight, self.bias, self.stride, self.dilation, self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, bias={self.bias is not None}, backend={self.backend}")


class SparseConvTranspose3d(_SparseConvBase):
    """Upsampling onto a given finer CoordinateSet (``forward(x, out_coords)``); kernel 2 undoes a
    kernel-2 stride-2 SparseConv3d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 2, dilation: int = 1,
                 bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, bias)
        self.dilation = dilation

    def forward(self, x: SparseTensor, out_coords: CoordinateSet) -> SparseTensor:
        return SF.conv_transpose3d(x, self.weight, out_coords, self.bias, self.dilation)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"


class SparseBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the voxel features (statistics over all voxels of the batch)."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.F))


class SparseReLU(nn.Module):
    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.replace(torch.relu(x.F))


class SparseGlobalPool(nn.Module):
    """(B, C) mean or max over each batch item's voxels."""

    def __init__(self, mode: str = "mean"):
        super().__init__()
        self.mode = mode

    def forward(self, x: SparseTensor) -> torch.Tensor:
        return SF.global_pool(x, self.mode)
