"""Sparse convolutions as gather -> matmul -> scatter per kernel offset, and per-voxel helpers.

Weights have shape (K, C_in, C_out) with K = kernel_size**3 in :func:`kernel_offsets` order.
The same weight as a dense ``conv3d`` weight is ``w.reshape(k, k, k, Ci, Co).permute(4, 3, 0, 1, 2)``
(and ``.permute(3, 4, 0, 1, 2)`` for ``conv_transpose3d``).
"""
from __future__ import annotations

import torch

from ..errors import DynattackError
from .coords import CoordinateSet, KernelMap
from .tensor import SparseTensor

BACKENDS = ("torch", "spconv")


def _gather_mm_scatter(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """out[o] = sum over pairs (i, o) of offset j: feats[i] @ weight[j]."""
    out = feats.new_zeros(kmap.n_out, weight.shape[2])
    in_rows, out_rows = kmap.in_idx.split(kmap.counts), kmap.out_idx.split(kmap.counts)
    for j, (i, o) in enumerate(zip(in_rows, out_rows)):
        if j == kmap.identity:
            out += feats @ weight[j]  # centre of a submanifold kernel: no gather or scatter needed
        elif i.numel():
            out.index_add_(0, o, feats.index_select(0, i) @ weight[j])
    return out


def _weight_grad(feats: torch.Tensor, grad_out: torch.Tensor, kmap: KernelMap, like: torch.Tensor) -> torch.Tensor:
    """d loss / d weight[j] = feats[i]^T @ grad_out[o] over the pairs of offset j."""
    grad = torch.zeros_like(like)
    in_rows, out_rows = kmap.in_idx.split(kmap.counts), kmap.out_idx.split(kmap.counts)
    for j, (i, o) in enumerate(zip(in_rows, out_rows)):
        if j == kmap.identity:
            grad[j] = feats.T @ grad_out
        elif i.numel():
            grad[j] = feats.index_select(0, i).T @ grad_out.index_select(0, o)
    return grad


class SparseConvFunction(torch.autograd.Function):
    """Sparse convolution over a kernel map; saves the inputs and the map's indices only."""

    @staticmethod
    def forward(ctx, feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
        ctx.kmap = kmap
        ctx.save_for_backward(feats, weight)
        return _gather_mm_scatter(feats, weight, kmap)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        feats, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_feats = grad_weight = None
        if ctx.needs_input_grad[0]:
            # The adjoint: same pairs read backwards, each weight matrix transposed.
            grad_feats = _gather_mm_scatter(grad_out, weight.transpose(1, 2), ctx.kmap.transposed())
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_grad(feats, grad_out, ctx.kmap, weight)
        return grad_feats, grad_weight, None


def _kernel_size(weight: torch.Tensor, in_channels: int) -> int:
    if weight.dim() != 3 or weight.shape[1] != in_channels:
        raise DynattackError(f"sparse conv weight must be (k**3, {in_channels}, C_out), got {tuple(weight.shape)}")
    k = round(weight.shape[0] ** (1 / 3))
    if k**3 != weight.shape[0]:
        raise DynattackError(f"sparse conv weight has {weight.shape[0]} offsets, not a cube k**3")
    return k


def _apply(x: SparseTensor, weight: torch.Tensor, bias, kmap: KernelMap, out: CoordinateSet) -> SparseTensor:
    feats = SparseConvFunction.apply(x.F, weight, kmap)
    if bias is not None:
        feats = feats + bias
    return SparseTensor(feats, out)


def conv3d(x: SparseTensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
           dilation: int = 1, backend: str = "torch") -> SparseTensor:
    """Submanifold convolution (stride 1: output voxels = input voxels) or strided convolution
    (stride > 1: output voxels = ``x.coordinate_set.downsample(stride)``, e.g. kernel 2 stride 2).
    """
    k = _kernel_size(weight, x.F.shape[1])
    if backend == "spconv":
        from . import spconv_backend

        return spconv_backend.conv3d(x, weight, bias, stride, dilation)
    if backend != "torch":
        raise DynattackError(f"unknown sparse backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    src = x.coordinate_set
    out = src if stride == 1 else src.downsample(stride)
    return _apply(x, weight, bias, out.kernel_map(src, k, dilation), out)


def conv_transpose3d(x: SparseTensor, weight: torch.Tensor, out_coords: CoordinateSet,
                     bias: torch.Tensor | None = None, dilation: int = 1) -> SparseTensor:
    """Transposed (upsampling) convolution onto a given finer coordinate set, usually the one the
    matching strided convolution started from; the adjoint of :func:`conv3d` with that stride."""
    k = _kernel_size(weight, x.F.shape[1])
    if out_coords.stride > x.stride or x.stride % out_coords.stride:
        raise DynattackError(
            f"transposed conv goes from stride {x.stride} to a finer stride dividing it, got {out_coords.stride}"
        )
    return _apply(x, weight, bias, out_coords.kernel_map(x.coordinate_set, k, dilation, transposed=True), out_coords)


def global_pool(x: SparseTensor, mode: str = "mean", batch_size: int | None = None) -> torch.Tensor:
    """(B, C) mean or max of the features of each batch item (items without voxels give 0)."""
    b = x.C[:, 0]
    n = x.batch_size if batch_size is None else batch_size
    out = x.F.new_zeros(n, x.F.shape[1])
    if mode == "mean":
        count = torch.bincount(b, minlength=n).clamp_(min=1).to(x.F.dtype)
        return out.index_add(0, b, x.F) / count[:, None]
    if mode == "max":
        index = b[:, None].expand_as(x.F)
        return out.scatter_reduce(0, index, x.F, "amax", include_self=False)
    raise DynattackError(f"unknown pooling mode {mode!r}; expected mean or max")


def downsample_occupancy(occ: torch.Tensor, coords: CoordinateSet, factor: int = 2) -> torch.Tensor:
    """Occupancy of ``coords.downsample(factor)`` from per-voxel occupancy ``occ`` (N,):
    a coarse voxel is occupied unless all its children are empty, 1 - prod(1 - occ_child);
    differentiable (hard 0/1 occupancy gives the usual downsampled set)."""
    parent = coords.parent_index(factor)
    empty = occ.new_ones(len(coords.downsample(factor))).scatter_reduce(0, parent, 1 - occ, "prod")
    return 1 - empty
