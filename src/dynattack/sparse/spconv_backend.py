"""Optional backend: submanifold convolutions through ``spconv`` 2.x (``pip install spconv``).

Two fixes make spconv 2.3.8 usable on a CPU-only torch: its code asks torch for the current CUDA
stream even for CPU tensors (raises without CUDA), so we patch that call to return stream 0 when
CUDA is absent; and its CPU kernels give wrong results with more than one torch thread, so every
spconv call (forward and backward) runs with one thread and restores the caller's setting.
Only submanifold convolutions go to spconv; strided and transposed convolutions stay on ours.
"""
from __future__ import annotations

import contextlib
import sys

import torch

from ..errors import DynattackError
from .tensor import SparseTensor

_spconv = None


def available() -> bool:
    """True when spconv imports (and is patched)."""
    try:
        _load()
    except DynattackError:
        return False
    return True


def _current_stream() -> int:
    return torch.cuda.current_stream().cuda_stream if torch.cuda.is_available() else 0


def _load():
    global _spconv
    if _spconv is None:
        try:
            import spconv.pytorch as sp
        except Exception as exc:  # ImportError, or a broken native extension
            raise DynattackError(f"the spconv backend needs spconv 2.x (pip install spconv): {exc}") from None
        # Modules imported get_current_stream by name: patch every copy, not just cppcore's.
        original = sys.modules["spconv.pytorch.cppcore"].get_current_stream
        for name, module in list(sys.modules.items()):
            if name.startswith("spconv") and getattr(module, "get_current_stream", None) is original:
                module.get_current_stream = _current_stream
        _spconv = sp
    return _spconv


@contextlib.contextmanager
def one_thread():
    """Run the block with one torch thread (spconv's CPU kernels are wrong with more)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _OneThreadCall(torch.autograd.Function):
    """Runs ``fn(feats, weight)`` (spconv autograd inside) and its backward with one thread."""

    @staticmethod
    def forward(ctx, feats, weight, fn):
        with one_thread(), torch.enable_grad():
            f = feats.detach().requires_grad_(feats.requires_grad)
            w = weight.detach().requires_grad_(weight.requires_grad)
            out = fn(f, w)
        ctx.graph = (f, w, out)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        f, w, out = ctx.graph
        inputs = [t for t in (f, w) if t.requires_grad]
        with one_thread():
            grads = iter(torch.autograd.grad(out, inputs, grad_out))
        return (next(grads) if f.requires_grad else None), (next(grads) if w.requires_grad else None), None


def _template(x: SparseTensor):
    """spconv's view of x's coordinates, cached on the CoordinateSet so its index pairs are reused."""
    cs = x.coordinate_set
    if "spconv" not in cs.backend_cache:
        sp = _load()
        origin = cs.coords[:, 1:].min(dim=0).values if len(cs) else torch.zeros(3, dtype=torch.long)
        grid = (cs.coords[:, 1:] - origin) // cs.stride
        indices = torch.cat([cs.coords[:, :1], grid], dim=1).int().contiguous()
        shape = (grid.max(dim=0).values + 1).tolist() if len(cs) else [1, 1, 1]
        cs.backend_cache["spconv"] = sp.SparseConvTensor(x.F[:0], indices, shape, max(cs.batch_size, 1))
    return cs.backend_cache["spconv"]


def conv3d(x: SparseTensor, weight: torch.Tensor, bias, stride: int, dilation: int) -> SparseTensor:
    """Submanifold conv via spconv; weight (k**3, C_in, C_out) as in the torch backend."""
    if stride != 1:
        raise DynattackError("the spconv backend runs submanifold convs only (stride 1); use backend='torch'")
    sp = _load()
    k = round(weight.shape[0] ** (1 / 3))
    c_in, c_out = weight.shape[1], weight.shape[2]
    template = _template(x)
    conv = sp.SubMConv3d(c_in, c_out, k, dilation=dilation, bias=False, indice_key=f"subm_k{k}_d{dilation}")
    conv = conv.to(device=x.device, dtype=x.F.dtype)

    def run(feats, w):
        # spconv keeps (C_out, kx, ky, kz, C_in); ours is (kx*ky*kz, C_in, C_out).
        w_sp = w.reshape(k, k, k, c_in, c_out).permute(4, 0, 1, 2, 3).contiguous()
        out = torch.func.functional_call(conv, {"weight": w_sp}, (template.replace_feature(feats),))
        return out.features

    feats = _OneThreadCall.apply(x.F.contiguous(), weight, run)
    if bias is not None:
        feats = feats + bias
    return x.replace(feats)
