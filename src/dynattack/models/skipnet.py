"""SkipNet (Wang et al., ECCV 2018): a ResNet that skips residual blocks per input.

After every block a gate looks at the block's output and decides whether the *next* block runs;
the first block always runs. Three gate kinds, as in the official release:

- ``ffgate1`` (FFGate-I): maxpool 2, conv3x3-BN-ReLU, conv3x3 stride 2-BN-ReLU, global average
  pool, 1x1 conv to 2 logits (one gate module per block);
- ``ffgate2`` (FFGate-II): conv3x3 stride 2-BN-ReLU, global average pool, 1x1 conv to 2 logits;
- ``rnn``: global average pool and a 1x1 conv to a 10-d embedding per block, one LSTM (hidden 10)
  shared by all gates, a projection to one logit. The LSTM state starts at zero in every forward.

Every decision goes through a :class:`dynattack.gates.Gate` with logit ``q`` (``G = sigmoid(q)``,
``tau = 0.5``); a 2-logit FF gate gives ``q = l_on - l_off``, so ``sigmoid(q)`` is the official
softmax "execute" probability. A block runs when ``q > 0`` (a strict gate), as the official
``prob > 0.5`` says: at an exact tie it is skipped. The gate of a block controls the block's residual branch only.

How a decision combines with the block (the official rule): with ``s`` the shortcut (the
``group{g}_ds{i}`` projection where the shape changes, else the identity),
``x' = m * relu(F(x) + s) + (1 - m) * s``. A skipped block thus passes ``s`` on, without a
ReLU. The shortcut, the stem, every gate module, the LSTM and the classifier always run: they are
the static cost. The gate after the last block is never used, so it is neither built nor run.

Module names are the official ones (``conv1``, ``bn1``, ``group{g}_layer{i}``, ``group{g}_ds{i}``,
``group{g}_gate{i}``, ``control.rnn``, ``control.proj``, ``fc``); :meth:`SkipNet.convert_official`
maps an official checkpoint onto ours. Official models normalise outside the network; ours
normalise inside (inputs in [0, 1]). To load an official checkpoint build the model with the
official statistics: ``CIFAR10_MEAN``/``CIFAR10_STD`` or ``IMAGENET_MEAN``/``IMAGENET_STD``.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..gates import Gate, iter_gates
from .resnet import he_init, BasicBlock, Normalize, downsample, stage_layout

GATE_KINDS = ("rnn", "ffgate1", "ffgate2")

# The official release's input statistics (its data loaders normalise with these).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class Bottleneck(nn.Module):
    """1x1-BN-ReLU-3x3(stride)-BN-ReLU-1x1(x4)-BN; the residual branch only."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


class FFGateI(nn.Module):
    """FFGate-I; returns the gate logit ``q = l_on - l_off`` of shape (B,)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, channels, stride=2)
        self.bn2 = nn.BatchNorm2d(channels)
        self.linear_layer = nn.Conv2d(channels, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        # the official AvgPool2d(pool_size) is a global pool at the official input sizes
        logits = self.linear_layer(F.adaptive_avg_pool2d(x, 1)).flatten(1)
        return logits[:, 1] - logits[:, 0]


class FFGateII(nn.Module):
    """FFGate-II (used for 110 layers in the paper); returns ``q = l_on - l_off``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(channels, channels, stride=2)
        self.bn1 = nn.BatchNorm2d(channels)
        self.linear_layer = nn.Conv2d(channels, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        logits = self.linear_layer(F.adaptive_avg_pool2d(x, 1)).flatten(1)
        return logits[:, 1] - logits[:, 0]


def rnn_embedding(channels: int, embed_dim: int) -> nn.Sequential:
    """Per-block input of the RNN gate: global average pool, 1x1 conv (official key ``.1``)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, embed_dim, 1))


class RecurrentControl(nn.Module):
    """The LSTM shared by all RNN gates and its projection to one logit per sample.

    ``proj`` is a Linear in the CIFAR release and a 1x1 conv in the ImageNet release.
    """

    def __init__(self, embed_dim: int = 10, hidden_dim: int = 10, conv_proj: bool = False) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.rnn = nn.LSTM(embed_dim, hidden_dim)
        self.proj = nn.Conv2d(hidden_dim, 1, 1) if conv_proj else nn.Linear(hidden_dim, 1)

    def initial_state(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (h, c) for a batch like ``like``: the state is reset in every forward."""
        zeros = like.new_zeros(like.shape[0], self.hidden_dim)
        return zeros, zeros

    def forward(self, embedding: torch.Tensor, state):
        # One LSTM step written out with the nn.LSTM's own parameters (gate order i, f, g, o):
        # FlopCounterMode does not see inside the fused CPU LSTM kernel, but sees these matmuls.
        h, c = state
        rnn = self.rnn
        z = F.linear(embedding.flatten(1), rnn.weight_ih_l0, rnn.bias_ih_l0)
        z = z + F.linear(h, rnn.weight_hh_l0, rnn.bias_hh_l0)
        i, f, g, o = z.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        hidden = torch.sigmoid(o) * torch.tanh(c)
        state = (hidden, c)
        if isinstance(self.proj, nn.Conv2d):
            q = self.proj(hidden[:, :, None, None])
        else:
            q = self.proj(hidden)
        return q.reshape(hidden.shape[0]), state


class SkipNet(nn.Module):
    """SkipNet over a ResNet of ``blocks_per_group`` blocks in each group.

    ``forward`` is the masked batch path (every block runs on every sample, gates multiply);
    ``forward_conditional`` really skips blocks per sample (same logits in hard mode).
    """

    family = "skipnet"

    def __init__(
        self,
        blocks_per_group: tuple[int, ...],
        widths: tuple[int, ...],
        block: str = "basic",
        gate: str = "rnn",
        stem: str = "cifar",
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: int = 32,
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
        embed_dim: int = 10,
        hidden_dim: int = 10,
    ) -> None:
        super().__init__()
        if gate not in GATE_KINDS:
            raise ValueError(f"unknown SkipNet gate {gate!r}; expected one of {', '.join(GATE_KINDS)}")
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean/std need {in_channels} values, one per input channel")
        self.input_shape = (in_channels, input_size, input_size)
        self.num_classes = num_classes
        self.gate_type = gate
        self.normalize = Normalize(mean, std)
        if stem == "cifar":
            self.conv1 = _conv3x3(in_channels, widths[0])
            cin = widths[0]
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            cin = 64
        else:
            raise ValueError(f"unknown stem {stem!r}; expected 'cifar' or 'imagenet'")
        self.stem = stem
        self.bn1 = nn.BatchNorm2d(cin)
        expansion = Bottleneck.expansion if block == "bottleneck" else 1

        # (block, shortcut or None, gate module whose logit decides this block or None)
        self.layout: list[tuple[str, str | None, str | None]] = []
        self.gates = nn.ModuleDict()
        previous_gate = None
        total = sum(blocks_per_group)
        for g, (n, width) in enumerate(zip(blocks_per_group, widths), start=1):
            for i in range(n):
                stride = 2 if (g > 1 and i == 0) else 1
                name = f"group{g}_layer{i}"
                branch = Bottleneck(cin, width, stride) if block == "bottleneck" else BasicBlock(cin, width, stride)
                setattr(self, name, branch)
                ds = downsample(cin, width * expansion, stride)
                ds_name = None
                if ds is not None:
                    ds_name = f"group{g}_ds{i}"
                    setattr(self, ds_name, ds)
                cin = width * expansion
                self.layout.append((name, ds_name, previous_gate))
                if previous_gate is not None:
                    self.gates[name] = Gate(controls=[branch], strict=True)  # official: prob > 0.5
                if len(self.layout) < total:  # the last block's gate would decide nothing
                    previous_gate = f"group{g}_gate{i}"
                    if gate == "rnn":
                        setattr(self, previous_gate, rnn_embedding(cin, embed_dim))
                    else:
                        setattr(self, previous_gate, FFGateI(cin) if gate == "ffgate1" else FFGateII(cin))
        self.last_gate = f"group{len(blocks_per_group)}_gate{blocks_per_group[-1] - 1}"
        if gate == "rnn":
            self.control = RecurrentControl(embed_dim, hidden_dim, conv_proj=stem == "imagenet")
        self.fc = nn.Linear(cin, num_classes)
        he_init(self)
        list(iter_gates(self))  # names the gates after their blocks: "gates.group1_layer1", ...


    def open_gates(self, bias: float) -> None:
        """Start every gate at logit ~``bias`` (bias > 0: blocks run), so that training begins
        from the plain ResNet and learns what to skip."""
        with torch.no_grad():
            if self.gate_type == "rnn":
                self.control.proj.bias.fill_(bias)
            else:
                for _, _, source in self.layout:
                    if source is not None:
                        getattr(self, source).linear_layer.bias.copy_(torch.tensor([0.0, bias]))

    # -- forward paths ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, skip=False)

    def forward_conditional(self, x: torch.Tensor) -> torch.Tensor:
        """Really skips: each block runs only on the samples whose gate is on."""
        return self._run(x, skip=True)

    def _run(self, x: torch.Tensor, skip: bool) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(self.normalize(x))))
        if self.stem == "imagenet":
            x = F.max_pool2d(x, 3, 2, 1)
        state = self.control.initial_state(x) if self.gate_type == "rnn" else None
        for name, ds_name, source in self.layout:
            branch = getattr(self, name)
            shortcut = getattr(self, ds_name)(x) if ds_name else x  # static: always runs
            if source is None:  # the first block always runs
                x = F.relu(branch(x) + shortcut)
                continue
            if self.gate_type == "rnn":
                q, state = self.control(getattr(self, source)(x), state)
            else:
                q = getattr(self, source)(x)
            mask = self.gates[name](q)
            x = self._gated_block(branch, x, shortcut, mask) if skip else _combine(branch(x), shortcut, mask)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    @staticmethod
    def _gated_block(branch: nn.Module, x: torch.Tensor, shortcut: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        on = mask >= 0.5  # the gate's decision in every mode
        if bool(on.all()):
            return _combine(branch(x), shortcut, mask)
        if not bool(on.any()):
            return shortcut
        idx = on.nonzero().squeeze(1)
        s_on = shortcut.index_select(0, idx)
        out = _combine(branch(x.index_select(0, idx)), s_on, mask.index_select(0, idx))
        return shortcut.index_copy(0, idx, out)

    # -- official checkpoints ---------------------------------------------------------------

    def convert_official(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map an official SkipNet state_dict onto ours.

        - strips DataParallel's ``module.`` prefix;
        - official blocks also hold their shortcut (``group{g}_layer{i}.downsample.*``), the
          same module as ``group{g}_ds{i}``: kept once, under the ``ds`` name;
        - drops the last block's gate (official code computes it but never uses its output);
        - fills what official checkpoints lack: our ``normalize.*`` (the statistics this model
          was built with) and ``num_batches_tracked`` of PyTorch < 0.4.1 checkpoints.
        Anything else that does not match is left for :func:`dynattack.models.load_weights` to list.
        """
        own = self.state_dict()
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            key = key[len("module."):] if key.startswith("module.") else key
            inner = re.fullmatch(r"(group\d+)_layer(\d+)\.downsample\.(.+)", key)
            if inner:
                out.setdefault(f"{inner[1]}_ds{inner[2]}.{inner[3]}", value)
                continue
            if key.startswith(self.last_gate + ".") and key not in own:
                continue
            out[key] = value
        for key, value in own.items():
            if key not in out and (key.startswith("normalize.") or key.endswith("num_batches_tracked")):
                out[key] = value.clone()
        return out


def _combine(branch_out: torch.Tensor, shortcut: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Official SkipNet: ``m * relu(F(x) + s) + (1 - m) * s``; exact for m in {0, 1}."""
    m = mask.view(-1, *([1] * (shortcut.dim() - 1)))
    return m * F.relu(branch_out + shortcut) + (1 - m) * shortcut


def skipnet_cifar(depth: int = 38, gate: str = "rnn", in_channels: int = 3, num_classes: int = 10,
                  input_size: int = 32, mean: tuple[float, ...] = CIFAR10_MEAN,
                  std: tuple[float, ...] = CIFAR10_STD) -> SkipNet:
    """SkipNet-(6n+2) of BasicBlocks, widths 16/32/64 (38, 74, 110 in the paper)."""
    n = stage_layout(depth)
    return SkipNet((n, n, n), (16, 32, 64), "basic", gate, "cifar", in_channels, num_classes, input_size, mean, std)


IMAGENET_LAYOUTS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def skipnet_imagenet(depth: int = 101, gate: str = "rnn", num_classes: int = 1000, input_size: int = 224,
                     mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> SkipNet:
    """SkipNet-50/101 on bottleneck blocks (widths 64/128/256/512, x4), RNN gate by default."""
    if depth not in IMAGENET_LAYOUTS:
        raise ValueError(f"ImageNet SkipNet depth must be one of {sorted(IMAGENET_LAYOUTS)}, got {depth}")
    return SkipNet(IMAGENET_LAYOUTS[depth], (64, 128, 256, 512), "bottleneck", gate, "imagenet", 3, num_classes,
                   input_size, mean, std)
