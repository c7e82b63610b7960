"""DynConv (Verelst & Tuytelaars, CVPR 2020): a ResNet whose residual blocks convolve only the
spatial positions a learned mask keeps.

Block ``layer{k}.{i}`` of a CIFAR-style ResNet 6n+2 (widths 16/32/64, BasicBlocks, every block
sparse as in the official release):

- **mask unit** (``masker.maskconv``): ``q = conv3x3(C -> 1, block stride)(x) + fc(GAP(x))``, one
  logit per *output* position, shape ``(B, H_out, W_out)``. Its decision goes through
  ``mask_gate`` (``G = sigmoid(q)``, ``tau = 0.5``; inference ``q >= 0``; training: Gumbel noise,
  ``sigmoid((q + noise) / T)``, straight-through hard ``>= 0.5``, :func:`gumbel_straight_through`).
- **dilated mask**: the block's second conv (stride 1, at output resolution) needs the first
  conv's output on the 3x3 neighbourhood of every kept position, so the first conv runs on the
  mask dilated by a 3x3 box. The first conv of a BasicBlock is the strided one, so its output is
  already at output resolution: the dilation is taken there, with no upsampling (the official
  code: ``MaskUnit(..., dilate_stride=1)`` for BasicBlocks; the "upsample then box" rule of
  REFERENCE.md applies to bottleneck blocks, whose strided conv is not the first). The dilated
  mask is its own gate event, ``dilate_gate``, with logit ``box(mask) - 0.5`` (``box`` = 3x3
  sum, zero padded), so the trace holds both masks (LGM's architecture change counts both). Per
  mode (the mask gate's ``G = sigmoid(q)``):

  * ``hard``: logit ``box(hard mask) - 0.5``, decision "some position of the 3x3 window is
    kept" (the official ``ExpandMask``: ``box > 0.5``). The logit is built straight-through, its
    forward value exact and its gradient that of ``box(sigmoid(q))``: the forward has no gradient
    through either mask (FGM), but the dilated gate's trace value ``sigmoid(logit)`` carries one,
    which is what energy attacks descend.
  * ``lgm``: logit ``box(sigmoid(lam q)) - 0.5``, mask ``sigmoid(lam (box(sigmoid(lam q)) -
    0.5))``, REFERENCE.md's soft dilated mask. Its decision is ``logit >= 0`` as for every gate,
    i.e. the soft network's own rule, not the hard dilation (the attack base evaluates ``lgm``
    inputs on the hard network anyway).
  * ``lgm_st`` and ``train``: the mask is hard in forward (straight-through), so the logit is the
    exact ``box(hard mask) - 0.5``; the dilated gate is straight-through too.
  * forced on / off: all positions on / off in both masks.

- **residual** (official ``BasicBlock`` with ``sparse=True``): with ``s`` the shortcut (identity,
  or the ``downsample`` 1x1 projection + BN where the shape changes),
  ``out = relu(s + m * bn2(conv2(relu(bn1(conv1(x))) * d)))``: a skipped position passes
  ``relu(s)`` on. In hard mode the factor ``d`` changes nothing the mask keeps (every input of a
  kept conv2 position lies in the dilated mask), so hard outputs equal the official ones (whose
  masked path runs conv1 densely and masks only the block output); it is there so that the real
  execution (conv1 only on ``d``) is exact and so that LGM's gradient flows through the dilated
  mask.

Costs: a mask position costs its conv2 per-position FLOPs, a dilated position its conv1
per-position FLOPs (each gate ``controls`` that conv; :func:`dynattack.cost.calibrate` splits the
measured conv FLOPs over the positions). Static: stem, mask units (conv + fc), shortcut
projections, classifier. Executed FLOPs are the default vectorised rule of
:func:`dynattack.cost.executed_flops` (active positions x unit cost + static);
:meth:`DynConvResNet.forward_conditional` really runs conv1 / conv2 on the gathered active
positions only (3x3 neighbourhoods gathered channels-last, one ``(n_active, 9 C_in) x
(9 C_in, C_out)`` matmul per conv), so ``FlopCounterMode`` counts exactly the active work.

State_dict names are the official ones (``conv1``, ``bn1``, ``layer{k}.{i}.conv1/bn1/conv2/bn2``,
``layer{k}.{i}.downsample.0/1``, ``layer{k}.{i}.masker.maskconv.conv/fc``, ``fc``) plus our
``normalize.*`` buffers; :meth:`DynConvResNet.convert_official` loads official checkpoints. The
official CIFAR models normalise outside the network with ``CIFAR10_MEAN`` / ``CIFAR10_STD``:
build the model with those statistics (the default) to load one.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import cost
from ..gates import Gate, iter_gates
from .resnet import he_init, build_gated_resnet, downsample

# The official CIFAR release's input statistics (its data loaders normalise with these).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def box3x3(mask: torch.Tensor) -> torch.Tensor:
    """3x3 sum of a ``(B, H, W)`` mask with zero padding (the official ``ExpandMask`` kernel).

    Separable shifted adds rather than a convolution: it is bookkeeping, not network compute, and
    ``FlopCounterMode`` must not count it; sums of 0/1 masks stay exact integers.
    """
    h, w = mask.shape[-2:]
    p = F.pad(mask, (1, 1, 1, 1))
    rows = p[..., 0:w] + p[..., 1:w + 1] + p[..., 2:w + 2]
    return rows[..., 0:h, :] + rows[..., 1:h + 1, :] + rows[..., 2:h + 2, :]


def gumbel_straight_through(gate: Gate, logit: torch.Tensor) -> torch.Tensor:
    """DynConv's training estimator: ``sigmoid((q + g1 - g2) / T)`` with ``g1, g2`` Gumbel noise
    (when ``gate.gumbel_noise``), straight-through hard ``>= 0.5``. ``gate.temperature`` is T."""
    if getattr(gate, "gumbel_noise", True):
        eps = 1e-8
        u1, u2 = torch.rand_like(logit), torch.rand_like(logit)
        logit = logit - torch.log(-torch.log(u1 + eps) + eps) + torch.log(-torch.log(u2 + eps) + eps)
    soft = torch.sigmoid(logit / getattr(gate, "temperature", 1.0))
    hard = (logit >= 0).to(logit.dtype)
    return hard + (soft - soft.detach())  # exactly hard in forward


class Squeeze(nn.Module):
    """The mask logit ``q = conv3x3(x) + fc(GAP(x))`` of shape ``(B, H_out, W_out)``."""

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, 1, bias=True)
        self.conv = nn.Conv2d(channels, 1, 3, stride, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)[:, 0] + self.fc(x.mean((2, 3)))[:, :, None]


class MaskUnit(nn.Module):
    """Holds the mask logit module under the official name ``masker.maskconv``."""

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.maskconv = Squeeze(channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maskconv(x)


def _rows_bn(bn: nn.BatchNorm2d, rows: torch.Tensor) -> torch.Tensor:
    """Eval-mode BN on ``(n, C)`` gathered rows (a per-channel affine map)."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return rows * scale + (bn.bias - bn.running_mean * scale)


def _channels_last_padded(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B * (H + 2) * (W + 2), C)``: zero-padded, one row per position."""
    b, c = x.shape[:2]
    return F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).reshape(-1, c)


@functools.lru_cache(maxsize=64)
def _window_table(h: int, w: int, stride: int, hp: int, wp: int, device: str) -> torch.Tensor:
    """``(h * w, 9)``: rows of a channels-last padded ``(hp, wp)`` map read by the 3x3 window of
    each output position (row-major), in (ky, kx) order, for one sample."""
    with torch.inference_mode(False):  # a cached table must not be an inference tensor
        k = torch.arange(3)
        rows = stride * torch.arange(h)[:, None, None, None] + k[None, None, :, None]
        cols = stride * torch.arange(w)[None, :, None, None] + k[None, None, None, :]
        return (rows * wp + cols).reshape(h * w, 9).to(device)


def _patch_rows(flat: torch.Tensor, h: int, w: int, stride: int, hp: int, wp: int) -> torch.Tensor:
    """Rows that the 3x3 windows centred on output positions ``flat`` (indices into a row-major
    ``(B, h, w)`` grid) read from a channels-last padded ``(B, hp, wp)`` map, shape ``(n, 9)``."""
    table = _window_table(h, w, stride, hp, wp, str(flat.device))
    return table[flat % (h * w)] + (flat // (h * w) * (hp * wp))[:, None]


def sparse_conv3x3(x_rows: torch.Tensor, conv: nn.Conv2d, flat: torch.Tensor, h: int, w: int, hp: int,
                   wp: int) -> torch.Tensor:
    """The 3x3 convolution ``conv`` (no bias, padding 1) at output positions ``flat`` only.

    ``x_rows`` is the input as :func:`_channels_last_padded` lays it out (``hp``, ``wp``: its padded
    size); ``flat`` indexes the row-major ``(B, h, w)`` output grid. Gathers the ``n`` active 3x3
    neighbourhoods and runs one ``(n, 9 C_in) x (9 C_in, C_out)`` matmul: ``2 n 9 C_in C_out``
    FLOPs, the dense conv's cost per output position times ``n``. Returns ``(n, C_out)``.
    """
    cin = x_rows.shape[1]
    idx = _patch_rows(flat, h, w, conv.stride[0], hp, wp).reshape(-1)
    patches = x_rows.index_select(0, idx).reshape(-1, 9 * cin)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, 9 * cin)  # (C_out, ky, kx, C_in)
    return torch.mm(patches, weight.t())


class DynConvBlock(nn.Module):
    """A BasicBlock whose convolutions run on a per-position mask (see the module docstring)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample(cin, cout, stride)
        self.masker = MaskUnit(cin, stride)
        self.mask_gate = Gate(train_estimator=gumbel_straight_through, controls=[self.conv2])
        self.dilate_gate = Gate(controls=[self.conv1])

    def masks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, dilated mask), each ``(B, H_out, W_out)`` in the current gate mode."""
        q = self.masker(x)
        return masks_from_logit(self.mask_gate, self.dilate_gate, q)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The masked batch path: dense convolutions multiplied by the masks."""
        return masked_residual(self, x, *self.masks(x))

    def forward_conditional(self, x: torch.Tensor) -> torch.Tensor:
        """Real execution: conv1 on the dilated positions, conv2 on the mask positions, gathered."""
        return sparse_residual(self, x, *self.masks(x))


def masks_from_logit(mask_gate: Gate, dilate_gate: Gate, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, dilated mask) of a per-position mask logit ``q`` (see the module docstring)."""
    m = mask_gate(q)
    base = m
    if mask_gate.mode == "hard" and mask_gate.force is None:
        # forward: the hard mask exactly; gradient of the trace's dilated value: box(G(q))
        soft = mask_gate.value_fn(q)
        base = m + (soft - soft.detach())
    return m, dilate_gate(box3x3(base) - 0.5)


def masked_residual(block: nn.Module, x: torch.Tensor, m: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``relu(s + m * bn2(conv2(relu(bn1(conv1(x))) * d)))`` with dense convolutions, for a
    ``block`` with ``conv1``, ``bn1``, ``conv2``, ``bn2`` and ``shortcut``; ``m``, ``d``: mask and
    dilated mask ``(B, H_out, W_out)``."""
    h = F.relu(block.bn1(block.conv1(x))) * d[:, None]
    h = block.bn2(block.conv2(h)) * m[:, None]
    return F.relu(h + block.shortcut(x))


def sparse_residual(block: nn.Module, x: torch.Tensor, m: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """:func:`masked_residual` really sparse: conv1 on the dilated positions, conv2 on the mask
    positions, gathered.

    Uses the BN running statistics (eval). Equals :func:`masked_residual` whenever the forward
    masks are hard (hard, lgm_st, train, forced gates); the mask values (1, or a straight-through
    1) multiply the gathered rows.
    """
    s = block.shortcut(x)
    b, cout, h, w = s.shape
    on_m, on_d = m.detach() >= 0.5, d.detach() >= 0.5
    if not bool(on_m.any()):  # nothing kept: no conv runs (the dilated mask is empty too)
        return F.relu(s)
    if bool(on_m.all()):  # everything kept: the dense block, same FLOPs, no gathering
        return F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))) * d[:, None])) * m[:, None] + s)
    hp, wp = h + 2, w + 2
    if bool(on_d.all()):  # every position: the dense conv is the same FLOPs, and faster
        h1_rows = _channels_last_padded(F.relu(block.bn1(block.conv1(x))) * d[:, None])
    else:
        flat_d = on_d.reshape(-1).nonzero().squeeze(1)
        rows = sparse_conv3x3(_channels_last_padded(x), block.conv1, flat_d, h, w, x.shape[2] + 2, x.shape[3] + 2)
        rows = F.relu(_rows_bn(block.bn1, rows)) * d.reshape(-1)[flat_d, None]
        centre = (flat_d // (h * w) * hp + flat_d % (h * w) // w + 1) * wp + flat_d % w + 1
        h1_rows = rows.new_zeros(b * hp * wp, cout).index_copy(0, centre, rows)
    flat_m = on_m.reshape(-1).nonzero().squeeze(1)
    res = _rows_bn(block.bn2, sparse_conv3x3(h1_rows, block.conv2, flat_m, h, w, hp, wp))
    out = s.permute(0, 2, 3, 1).reshape(-1, cout).index_add(0, flat_m, res * m.reshape(-1)[flat_m, None])
    return F.relu(out).view(b, h, w, cout).permute(0, 3, 1, 2)


class DynConvResNet(nn.Module):
    """DynConv over a CIFAR-style ResNet 6n+2 (every block sparse), any input channels and size.

    ``forward`` is the masked batch path; ``forward_conditional`` convolves only the active
    positions (same logits in hard mode).
    """

    family = "dynconv"

    def __init__(
        self,
        depth: int = 32,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        build_gated_resnet(self, lambda cin, width, stride, i: DynConvBlock(cin, width, stride), depth=depth,
                           in_channels=in_channels, num_classes=num_classes, input_size=input_size, mean=mean,
                           std=std, widths=widths)
        he_init(self)
        list(iter_gates(self))  # names the gates: "layer1.0.mask_gate", "layer1.0.dilate_gate", ...


    @property
    def blocks(self) -> list[DynConvBlock]:
        return [b for k in (1, 2, 3) for b in getattr(self, f"layer{k}")]

    def set_gumbel(self, noise: bool = True, temperature: float = 1.0) -> None:
        """Gumbel noise on/off and temperature of every mask gate's training estimator."""
        for block in self.blocks:
            block.mask_gate.gumbel_noise = bool(noise)
            block.mask_gate.temperature = float(temperature)

    # -- forward paths ---------------------------------------------------------------------

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(self.normalize(x))))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(x)
        for block in self.blocks:
            x = block(x)
        return self._head(x)

    def forward_conditional(self, x: torch.Tensor) -> torch.Tensor:
        """Really sparse: each block's convolutions run on its active positions only."""
        x = self._stem(x)
        for block in self.blocks:
            x = block.forward_conditional(x)
        return self._head(x)

    # -- cost ------------------------------------------------------------------------------

    def block_costs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block, FLOPs per position of conv1 (dilated mask) and of conv2 (mask), float64,
        as :func:`dynattack.cost.calibrate` measured them (in block order)."""
        cost.profile(self)
        c1 = torch.stack([b.dilate_gate.unit_cost for b in self.blocks])
        c2 = torch.stack([b.mask_gate.unit_cost for b in self.blocks])
        return c1, c2

    # -- official checkpoints ---------------------------------------------------------------

    def convert_official(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map an official DynConv (``ResNet_32x32`` with ``sparse=True``) state_dict onto ours:
        strips DataParallel's ``module.`` prefix and fills what official checkpoints lack (our
        ``normalize.*`` buffers, ``num_batches_tracked`` of old PyTorch). Names are otherwise the
        same; anything else that does not match is left for ``load_weights`` to list."""
        own = self.state_dict()
        out = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
        for key, value in own.items():
            if key not in out and (key.startswith("normalize.") or key.endswith("num_batches_tracked")):
                out[key] = value.clone()
        return out


def dynconv_cifar(depth: int = 32, in_channels: int = 3, num_classes: int = 10, input_size: int = 32,
                  mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD,
                  widths: tuple[int, int, int] = (16, 32, 64)) -> DynConvResNet:
    """DynConv-ResNet (6n+2): 32 in the paper (n = 5)."""
    return DynConvResNet(depth, in_channels, num_classes, input_size, mean, std, widths)
