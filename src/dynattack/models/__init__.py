"""The victim zoo: a registry of named victims, shipped weights (safetensors) and model cards.

A victim is an ``nn.Module`` taking images in [0, 1] of shape ``(B, *model.input_shape)`` and
returning logits. Gated families declare their decisions with :class:`dynattack.gates.Gate`
(controls, feeds, within: see :mod:`dynattack.cost`, which measures their cost) and provide
``forward_conditional(x)`` (really skips work). Only the sparse U-Net, whose cost is kernel-map
pairs among occupied voxels rather than a count of active units, keeps its own
``executed_flops(trace)``.
"""
from __future__ import annotations

import json
import pickle
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import cost
from ..errors import DynattackError, first_line
from ..gates import iter_gates

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass
class ModelSpec:
    name: str
    family: str
    build: Callable[[], nn.Module]
    description: str
    dataset: str = "fashion-mnist"
    train_args: dict = field(default_factory=dict)  # the recipe's settings, read by dynattack.train
    # An official release's architecture: no weights ship and no recipe trains it; this names the
    # release's model whose checkpoint (the user's own .pth) it loads.
    official: str = ""
    data_args: dict = field(default_factory=dict)  # options of the dataset's reader (folder: size, crop)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise DynattackError(f"unknown model {name!r}; known models: {known}")
    return _REGISTRY[name]


def card_path(name: str, weights_dir: Path = WEIGHTS_DIR) -> Path:
    return Path(weights_dir) / f"{name}.json"


def weights_path(name: str, weights_dir: Path = WEIGHTS_DIR) -> Path:
    return Path(weights_dir) / f"{name}.safetensors"


def read_card(name: str, weights_dir: Path = WEIGHTS_DIR) -> dict | None:
    path = card_path(name, weights_dir)
    return json.loads(path.read_text()) if path.exists() else None


def list_models() -> list[dict]:
    """Every registered victim with its model card (None where no weights are shipped yet)."""
    rows = []
    for name in sorted(_REGISTRY):
        spec = _REGISTRY[name]
        rows.append({
            "name": name,
            "family": spec.family,
            "dataset": spec.dataset,
            "description": spec.description,
            "shipped": weights_path(name).exists(),
            "official": spec.official,
            "card": read_card(name),
        })
    return rows


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, its format told by its first bytes, not its name: safetensors
    (8-byte little-endian header length, then a JSON header), torch.save's zip archive or a
    legacy torch.save pickle, both read with ``weights_only=True`` (never unpickling code).
    Every tensor must be finite. Any failure is one clear :class:`DynattackError`."""
    path = Path(path)
    if not path.is_file():
        raise DynattackError(f"weights file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    kind = _sniff_weights(head, size)
    if kind == "empty":
        raise DynattackError(f"weights file {path} is empty (0 bytes): not a checkpoint")
    if kind == "safetensors":
        state = _read_safetensors(path, head, size)
    elif kind in ("zip", "pickle"):
        state = _read_torch_save(path, kind)
    else:
        raise DynattackError(
            f"{path} is not a checkpoint, or is corrupt: neither safetensors (8-byte length + JSON header), "
            f"nor torch.save's zip archive, nor a pickle (its first bytes are {head[:8].hex(' ')})"
        )
    for key, tensor in state.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise DynattackError(f"weights file {path} is not finite: tensor {key!r} holds {bad} NaN or infinite "
                                 f"values (of {tensor.numel()})")
    return state


def _sniff_weights(head: bytes, size: int) -> str:
    """'empty', 'zip' (torch.save since 1.6), 'pickle' (legacy torch.save), 'safetensors' or 'unknown'."""
    if size == 0:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, then protocol 2-5
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":  # the JSON header follows its 8-byte length
        return "safetensors"
    return "unknown"


def _read_safetensors(path: Path, head: bytes, size: int) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header_len = struct.unpack("<Q", head[:8])[0]
    if header_len > size - 8:
        raise DynattackError(f"weights file {path} is a truncated safetensors file: its header alone needs "
                             f"{header_len} bytes, the file holds {size - 8} after the length")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DynattackError(
            f"weights file {path} is a corrupt or truncated safetensors file ({first_line(exc)})") from None


def _read_torch_save(path: Path, kind: str) -> dict[str, torch.Tensor]:
    what = "torch.save zip archive" if kind == "zip" else "pickle"
    try:
        # An open file, not its name: torch.load would take any name ending in .safetensors for one.
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error is one line
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickling_reason(exc)
        if "GLOBAL" not in reason:  # an opcode or value the weights-only reader does not know: no code named
            raise DynattackError(f"weights file {path} is a corrupt {what}, or holds more than tensors in plain "
                                 f"containers ({reason})") from None
        raise DynattackError(
            f"refusing {path}: it needs unpickling of code ({reason}), which could run anything; "
            "re-save it as a plain state_dict (torch.save(model.state_dict(), ...)) or as safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise DynattackError(f"weights file {path} is a corrupt or truncated {what} ({first_line(exc)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # the official releases wrap the weights
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DynattackError(f"{path} holds no state_dict of tensors")
    return obj


def _unpickling_reason(exc: pickle.UnpicklingError) -> str:
    """torch's weights-only refusal is a page of advice around one line of reason: keep that line."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(advice)]
    return lines[0] if lines else first_line(exc)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load our native layout, or a family's official layout when the family knows it
    (``model.convert_official(state_dict)``). Mismatched keys are listed in the error."""
    return _load_state(model, read_state_dict(path), path)


def _own_layout(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` under ``model``'s names: as it is when the key sets agree, else converted from
    the family's official layout where the family knows one."""
    if set(state) != set(model.state_dict()) and hasattr(model, "convert_official"):
        return model.convert_official(state)
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> nn.Module:
    own = model.state_dict()
    state = _own_layout(model, state)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise DynattackError(
            f"{path} does not fit {type(model).__name__}: missing keys {_short(missing)}; unexpected keys {_short(unexpected)}"
        )
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        k = bad[0]
        raise DynattackError(
            f"{path} does not fit {type(model).__name__}: {len(bad)} shape mismatches, e.g. {k}: "
            f"file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        )
    model.load_state_dict(state)
    return model


def _short(keys: list[str], n: int = 8) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return "[" + ", ".join(keys[:n]) + "]" + more


# Meta-device builds of the registered architectures (shapes only, no memory), one per build
# function: entries that share a builder (an official SP model and its RL twin) share the build.
_SHAPE_TWINS: dict[Callable[[], nn.Module], nn.Module] = {}


def _shape_twin(spec: ModelSpec) -> nn.Module:
    if spec.build not in _SHAPE_TWINS:
        with torch.device("meta"):
            _SHAPE_TWINS[spec.build] = spec.build()
    return _SHAPE_TWINS[spec.build]


def _gate_count(model: nn.Module) -> int:
    return sum(1 for _ in iter_gates(model))


def fitting_models(state: dict[str, torch.Tensor]) -> list[str]:
    """The registered victims whose state_dict (native, or converted from the family's official
    layout) has exactly the keys and shapes of ``state``."""
    fits = []
    for name in sorted(_REGISTRY):
        twin = _shape_twin(_REGISTRY[name])
        own, mapped = twin.state_dict(), _own_layout(twin, state)
        if set(mapped) == set(own) and all(mapped[k].shape == own[k].shape for k in own):
            fits.append(name)
    return fits


def _load_named(model: nn.Module, name: str, path: str | Path) -> None:
    """Load ``path`` into victim ``name``; a file of another registered architecture is named in
    the error (e.g. a SkipNet-110 checkpoint given to a SkipNet-38 name)."""
    state = read_state_dict(path)
    try:
        _load_state(model, state, path)
    except DynattackError:
        others = [n for n in fitting_models(state) if n != name]
        if not others:
            raise
        gates = _gate_count(_shape_twin(_REGISTRY[others[0]]))
        raise DynattackError(
            f"{path} holds another architecture: it fits {' or '.join(others)} ({gates} gates), not {name} "
            f"({_gate_count(model)} gates); pass that name instead") from None


def create_model(name: str, pretrained: bool = True, weights: str | Path | None = None,
                 device: str | torch.device = "cpu") -> nn.Module:
    """A victim from the zoo in eval mode, with its cost profile measured.

    ``weights`` loads a file of the user's (safetensors, or an official ``.pth``) instead of ours.
    """
    spec = get_spec(name)
    if weights is None and pretrained:
        if spec.official:
            raise DynattackError(f"{name} ships no weights: pass the official checkpoint ({spec.official}) with "
                                 f"--weights FILE")
        weights = weights_path(name)
        if not weights.exists():
            raise DynattackError(f"no shipped weights for {name}: train them with `dynattack train {name}`")
    model = spec.build()
    if weights is not None:
        _load_named(model, name, weights)
    model.name = name
    model.card = read_card(name)
    model.to(device).eval()
    cost.calibrate(model, model.input_shape)
    return model


def victim_classes(model: nn.Module, example: torch.Tensor) -> int:
    """How many classes a victim tells apart: ``model.num_classes``, else the width of its logits
    (dimension 1, also for per-point logits) on ``example``, a batch of one input."""
    k = getattr(model, "num_classes", None)
    if k is None:
        with torch.no_grad():
            k = model(example.to(next(model.parameters()).device)).shape[1]
    return int(k)


# Families register their victims on import.
from . import resnet as _resnet  # noqa: E402

register(ModelSpec(
    name="resnet20-fmnist",
    family="resnet",
    build=lambda: _resnet.ResNet(depth=20, in_channels=1, num_classes=10, input_size=28),
    description="static CIFAR-style ResNet-20 (no gates): pipeline proof and static baseline",
    train_args={"epochs": 6, "lr": 0.1, "batch_size": 128},
))


from . import skipnet as _skipnet  # noqa: E402

_FMNIST = {"in_channels": 1, "num_classes": 10, "input_size": 28, "mean": (0.2860,), "std": (0.3530,)}

# Time budget (idle 2-core CPU, batch 128, 430 steps per epoch; ResNet-38 steps take ~0.69 s):
# an SP step runs every block (the straight-through gradient needs the skipped blocks' outputs
# too): ~0.76 s for SkipNet-38-RNN, ~1.0 s with FFGate-I (17 extra small conv pairs cost more
# wall time than FLOPs); an HRL step really skips (~0.55 s). Hence 6 epochs RNN-SP (~33 min),
# 4 epochs FF-SP (~30 min), 5 epochs HRL (~20 min), each plus 1-2 min of evaluation. Budgets:
# RNN-SP keeps 80 % of the gated compute (~19 % of all FLOPs saved), HRL 64 % (~34 % saved).
# HRL's per-gate rate band (each gate on for 10-90 % of a batch) makes its decisions depend on the
# input: without it 16 of the 17 gates ended constant over the test set. Retrained with it
# (2026-12-03, 47 min while other jobs shared the CPU): 91.71 %, 57.9 % kept, beta fell to 0, the
# band alone holding the budget below 64 %.
_SP = {"training": "sp", "lr": 0.1, "batch_size": 128, "alpha": 1.0, "target_kept": 0.8, "warmup_epochs": 0.25,
       "anneal_epochs": 0.5, "gate_bias": 2.0}
register(ModelSpec(
    name="skipnet38-rnn-sp",
    family="skipnet",
    build=lambda: _skipnet.skipnet_cifar(38, gate="rnn", **_FMNIST),
    description="SkipNet-38 (ResNet-38, 17 gated blocks), shared-LSTM RNN gate, SP (straight-through) training",
    train_args={**_SP, "epochs": 6},
))
register(ModelSpec(
    name="skipnet38-rnn-hrl",
    family="skipnet",
    build=lambda: _skipnet.skipnet_cifar(38, gate="rnn", **_FMNIST),
    description="SkipNet-38, shared-LSTM RNN gate, SP then HRL (REINFORCE on the gates, hybrid with cross-entropy)",
    train_args={"training": "hrl", "init_from": "skipnet38-rnn-sp", "epochs": 5, "lr": 0.02, "batch_size": 128,
                "schedule": "cosine", "rl_weight": 0.1, "sharpness": 10.0, "beta": 1.0, "target_kept": 0.64,
                "beta_lr": 0.05, "rate_band": [0.1, 0.9], "rate_weight": 0.3},
))
register(ModelSpec(
    name="skipnet38-ff-sp",
    family="skipnet",
    build=lambda: _skipnet.skipnet_cifar(38, gate="ffgate1", **_FMNIST),
    description="SkipNet-38 (ResNet-38, 17 gated blocks), feed-forward FFGate-I gates, SP (straight-through) training",
    # its gates are static cost (18 % of all FLOPs): a tighter budget for the same ~19 % saved
    train_args={**_SP, "epochs": 4, "target_kept": 0.75},
))


from . import dynconv as _dynconv  # noqa: E402

# DynConv time budget (2-core CPU, batch 128): training runs the masked dense path (the
# straight-through masks need every position's output), measured at 1.36x a static ResNet-20 step
# for DynConv-20 and 2.2x for DynConv-32: with ResNet-20 at ~0.47 s/step (~220 s per 55k epoch),
# ~0.64 s (~275 s/epoch) and ~1.05 s (~450 s/epoch). DynConv-32 would get 4-5 epochs in 40
# minutes; DynConv-20 gets 6 in ~28 minutes plus ~1 minute of evaluation. From scratch, the sparse
# network learns much more slowly than the static one (small runs: 72 % vs 78 % after the same 126
# steps), so it starts from the zoo's static ResNet-20 backbone (`init_from`, mask units fresh):
# in the same small runs that gives 78.6 % at 49 % compute after 126 sparse steps. Budget 0.5 of
# the sparse convolutions (the paper's mark); the static part (stem, mask units, shortcut
# projections, classifier) is ~3 % of the full FLOPs, so ~48 % of the computation is saved.
register(ModelSpec(
    name="dynconv20-fmnist",
    family="dynconv",
    build=lambda: _dynconv.dynconv_cifar(20, **_FMNIST),
    description="DynConv on ResNet-20 (9 sparse blocks): per-position masks, conv1 on the 3x3-dilated mask, "
                "Gumbel straight-through training at a 0.5 FLOPs budget from the static ResNet-20",
    train_args={"init_from": "resnet20-fmnist", "epochs": 6, "lr": 0.1, "batch_size": 128, "budget": 0.5,
                "sparsity_weight": 10.0, "anneal_frac": 1 / 3, "noise_off_frac": 0.2, "temperature": 1.0,
                "warmup_frac": 0.0},
))


# -- SACT ---------------------------------------------------------------------------------------

from . import sact as _sact  # noqa: E402

# SACT time budget (2-core CPU, batch 128, 430 steps per epoch): training runs the masked dense
# path (hard decisions, every unit computed at every position so the batch stays dense), plus
# the halting units. Measured as 1.2x a static ResNet-20 step (medians of 5 steps each, one
# thread, interleaved with ResNet-20 and DynConv-20 steps on a machine busy with another training
# job; DynConv-20 came out at 1.41x there vs 1.36x idle, so the ratio holds up under contention):
# ~0.57 s/step idle, ~245 s per epoch. 7 epochs: ~29 minutes plus ~1.5 minutes of evaluation.
# It starts from the zoo's static ResNet-20 (`init_from`, halting units fresh at bias -3, so the
# network starts out running almost every unit: the official fine-tuning set-up).
# Ponder weight tau 0.05 (an estimate, not tuned by a full run): the official CIFAR example uses
# 0.01 over a full-length schedule; here ~3000 steps from a trained backbone, whose per-position
# cross-entropy gradient on the halting scores is large next to a 0.01 ponder weight. The gated
# units are 70 % of the FLOPs (halting units: 1.3 %), so >= 30 % saved needs nearly every
# position of every stage to stop before its third unit, or many before their second. Erring
# high is the safer side: the extreme (every position stops after its first unit, ~70 % saved)
# is a ResNet-8-sized network, which should still land near 90 % on Fashion-MNIST.
register(ModelSpec(
    name="sact20-fmnist",
    family="sact",
    build=lambda: _sact.sact_cifar(20, **_FMNIST),
    description="SACT on ResNet-20 (3 units per stage, 6 pondering units): per-position halting, "
                "ponder cost tau 0.05, fine-tuned from the static ResNet-20",
    train_args={"init_from": "resnet20-fmnist", "epochs": 7, "lr": 0.1, "batch_size": 128, "tau": 0.05},
))


# -- SDN early exit ----------------------------------------------------------------------------

from . import early_exit as _early_exit  # noqa: E402

# SDN (2-core CPU, batch 128, 430 steps per epoch): training runs every block and all 6 ICs on
# the whole batch (the joint loss needs every exit's logits); the ICs are pooling + one linear
# layer each (0.3 % of the FLOPs), so a step costs about a static ResNet-20 step. It starts from
# the zoo's static ResNet-20 (`init_from`, ICs fresh). Measured here: 0.37 s/step with 2 threads
# on an idle machine (a 1-epoch run: 2.7 min), but 1.2-4 s/step with 2 threads while another job
# held a core, against 0.73 s/step with one thread (OMP_NUM_THREADS=1): the shipped run used one
# thread, 3 epochs (~16 min plus ~2 min of evaluation). A 1-epoch run (lr 0.05) reached 89.9 %
# test accuracy at 27.8 % compute kept (final exit alone 91.95 %). The confidence threshold is
# chosen on the validation split after training (train/early_exit.py: within 2 points of the
# final exit's validation accuracy, least FLOPs).
register(ModelSpec(
    name="sdn20-fmnist",
    family="early_exit",
    build=lambda: _early_exit.sdn_cifar(20, **_FMNIST),
    description="SDN (Shallow-Deep Network) on ResNet-20: 6 internal classifiers (mixed max-average pooling + "
                "linear) after blocks 1, 3, 4, 5, 7, 8, one confidence threshold, joint weighted loss over all "
                "exits, fine-tuned from the static ResNet-20",
    train_args={"init_from": "resnet20-fmnist", "epochs": 3, "lr": 0.05, "batch_size": 128, "val_drop": 0.02},
))


# -- ManiDP -------------------------------------------------------------------------------------

from . import manidp as _manidp  # noqa: E402

# ManiDP (2-core CPU, batch 128, 430 steps per epoch): training runs the masked dense path (every
# channel computed, then multiplied by saliency x keep decision) plus 18 small mask blocks and two
# B x B similarity matrices per mask, ~1.3x a static ResNet-20 step. It starts from the zoo's
# static ResNet-20 (`init_from`; mask blocks at saliency 1, so step 0 is the static network).
# Keep ratio 0.65 per mask (the official default): conv1 runs ~65 % of its channels and conv2
# ~65 % x 65 %; the static part (stem, mask blocks, shortcut projections, classifier) is ~1 %.
# Shipped run: `dynattack train manidp20-fmnist --seed 0`, 6 epochs, 17.9 min here: test accuracy
# 90.42 %, 46.8 % of the FLOPs kept. Earlier full runs failed and shaped the recipe: lr 0.05
# exploded; a lasso summed over the 18 masks drove the saliencies to 0 (13 % kept); thresholds
# from the channels' average saliencies (official) and a manifold weight of 10 brought the
# cross-entropy to chance within ~200 steps (see train/manidp.py).
register(ModelSpec(
    name="manidp20-fmnist",
    family="manidp",
    build=lambda: _manidp.manidp_cifar(20, **_FMNIST),
    description="ManiDP-style dynamic channel pruning on ResNet-20 (2 saliency masks per block): lasso with "
                "instance complexity, manifold alignment, keep ratio annealed to 0.65, from the static ResNet-20",
    train_args={"init_from": "resnet20-fmnist", "epochs": 6, "lr": 0.02, "batch_size": 128, "target_keep": 0.65,
                "lambda_lasso": 0.1, "lambda_graph": 1.0, "thre_cls": 0.5, "gamma": 1.0, "anneal_frac": 0.6,
                "freeze_frac": 0.85, "thre_updates": 100},
))


# -- sparse voxel U-Net (3D point clouds) ------------------------------------------------------

from ..data.points import SYNTHETIC_SPLIT_SIZES  # noqa: E402
from . import sparse_unet as _sparse_unet  # noqa: E402

# Time budget (2-core CPU): one training step (one room, forward + backward + AdamW) measured
# 1.6-2.7 s of CPU time on one thread, 2.2 s on average over six augmented training rooms of
# 58k-97k points (rooms average ~75k). Wall time on the shared machine was many times longer
# (another job held both cores), so CPU time is the figure to trust; torch's two threads only
# shorten it. Generating a room takes ~35 ms. 180 rooms x 4 epochs = 720 steps ~ 26 min, plus
# generation and evaluation of 8 + 8 rooms (~1 min): ~27 minutes estimated. Shipped run
# (`dynattack train unet3d-rooms --seed 0`): 19.9 min here, test mIoU 89.6 %, val 86.9 %.
register(ModelSpec(
    name="unet3d-rooms",
    family="sparse_unet",
    build=lambda: _sparse_unet.SparseUNet(),
    description="MinkowskiNet-style residual sparse U-Net (widths 16-32-64-128, strides 1-8, 2 cm voxels), "
                "voxel occupancy as gates, per-point segmentation of 8 classes of SYNTHETIC rooms",
    dataset="synthetic-rooms",
    # the whole train split; val and test rooms: eval_scenes each (the splits' fixed sizes)
    train_args={"scenes": SYNTHETIC_SPLIT_SIZES["train"], "eval_scenes": SYNTHETIC_SPLIT_SIZES["test"], "epochs": 4,
                "lr": 2e-3, "weight_decay": 1e-4},
))


# -- official architectures (bring the official checkpoint) ------------------------------------
#
# The released SkipNet and DynConv models, by name: their official state_dicts (as the official
# training scripts save them: {'state_dict': ..., 'arch', 'epoch' or 'iter', 'best_prec1'} from
# DataParallel, keys prefixed 'module.') load exactly through `convert_official`. No weights ship
# (the official links are dead): `--weights FILE` is required. Inputs in [0, 1]; each model
# normalises inside with the statistics the official loaders used (CIFAR-10's also for CIFAR-100).
# SkipNet+RL (HRL) checkpoints hold the same tensors as the SP ones (same modules, the policy's
# LSTM and projection under the same names), so each RL entry shares its SP twin's builder.

import functools  # noqa: E402

from .resnet import stage_layout  # noqa: E402

for _dataset, _title, _classes in (("cifar10", "CIFAR-10", 10), ("cifar100", "CIFAR-100", 100)):
    for _depth in (38, 110):
        _ff = "ffgate1" if _depth < 110 else "ffgate2"  # the release: FFGate-I for 38/74, FFGate-II for 110
        _rnn = functools.partial(_skipnet.skipnet_cifar, _depth, gate="rnn", num_classes=_classes)
        _ff_arch = f"{_dataset}_feedforward_{_depth}"
        if (_dataset, _depth) == ("cifar100", 38):
            _ff_arch = "cifar100_feeforward_38"  # the release's own spelling of this one name
        for _gate, _build, _arch, _what in (
            ("ff", functools.partial(_skipnet.skipnet_cifar, _depth, gate=_ff, num_classes=_classes),
             _ff_arch,
             f"{'FFGate-I' if _ff == 'ffgate1' else 'FFGate-II'} feed-forward gates, SP (the release's FF +RL "
             "checkpoints hold the same tensors and load too)"),
            ("rnn", _rnn, f"{_dataset}_rnn_gate_{_depth}", "shared-LSTM RNN gate, SP (straight-through)"),
            ("rnn-rl", _rnn, f"{_dataset}_rnn_gate_rl_{_depth}",
             "shared-LSTM RNN gate policy, SP then HRL (REINFORCE)"),
        ):
            register(ModelSpec(
                name=f"skipnet{_depth}-{_gate}-{_dataset}-official",
                family="skipnet",
                build=_build,
                description=f"official SkipNet-{_depth} on {_title} ({3 * stage_layout(_depth) - 1} gated "
                            f"blocks), {_what}",
                dataset=_dataset,
                official=f"ucbdrive/skipnet cifar/models.py {_arch}",
            ))

_skipnet101 = functools.partial(_skipnet.skipnet_imagenet, 101, gate="rnn")
for _gate, _arch, _what in (("rnn", "imagenet_rnn_gate_101", "SP (straight-through)"),
                            ("rnn-rl", "imagenet_rnn_gate_rl_101", "SP then HRL (REINFORCE)")):
    register(ModelSpec(
        name=f"skipnet101-{_gate}-imagenet-official",
        family="skipnet",
        build=_skipnet101,
        description=f"official SkipNet-101 on ImageNet (bottleneck blocks, 32 gated), shared-LSTM RNN gate, {_what}; "
                    "data: an ImageNet-style val folder holding all 1000 synset folders (sorted = label order)",
        dataset="folder",
        official=f"ucbdrive/skipnet imagenet/models.py {_arch}",
        data_args={"size": 256, "crop": 224},  # the release's evaluation: Scale(256), CenterCrop(224)
    ))

for _depth in (20, 32):
    register(ModelSpec(
        name=f"dynconv-resnet{_depth}-cifar10-official",
        family="dynconv",
        build=functools.partial(_dynconv.dynconv_cifar, _depth),
        description=f"official DynConv ResNet-{_depth} on CIFAR-10 ({3 * stage_layout(_depth)} sparse blocks), "
                    "per-position masks, conv1 on the 3x3-dilated mask",
        dataset="cifar10",
        official=f"thomasverelst/dynconv classification/models/resnet_32x32.py resnet{_depth}(sparse=True)",
    ))


# -- mixture of experts (MLP-Mixer, top-p routing) ---------------------------------------------

from . import moe as _moe  # noqa: E402

# MLP-Mixer (4x4 patches -> 49 tokens, dim 64, 4 blocks, token MLP 64). The MoE victim's channel
# MLPs are 4 experts of hidden 128 with top-p routing (p 0.8); the static counterpart's are dense
# MLPs of hidden 512 (the 4 experts' width: the MoE's all-on FLOPs, router aside). Both train by
# one recipe (train/moe.py; the MoE's masked path runs every expert on every token, so a step
# costs about a static step: ~0.4 s per batch of 128 on one thread, ~2.7 min per epoch idle).
# Shipped runs (`dynattack train NAME --seed 0`, OMP_NUM_THREADS=1, CPU shared with other jobs):
# mixer-fmnist 15.3 min, 86.77 %; moe-mixer-fmnist 11.8 min, 86.30 % at 43.0 % of the FLOPs kept
# (1.42 experts per token; the entropy weight beta fell to 0 once the router sharpened below the
# 1.6 target, the balancing loss and cross-entropy alone holding it there).
_MIXER = {**_FMNIST, "patch": 4, "dim": 64, "depth": 4, "token_hidden": 64}
_MIXER_TRAIN = {"epochs": 4, "lr": 2e-3, "batch_size": 128, "weight_decay": 0.05, "warmup_epochs": 0.25}
register(ModelSpec(
    name="mixer-fmnist",
    family="moe",
    build=lambda: _moe.mixer_fmnist(expert_hidden=128, **_MIXER),
    description="static MLP-Mixer (4x4 patches, 49 tokens, dim 64, 4 blocks), dense channel MLPs of hidden 512: "
                "the MoE victim's static counterpart (its all-on width)",
    train_args=dict(_MIXER_TRAIN),
))
register(ModelSpec(
    name="moe-mixer-fmnist",
    family="moe",
    build=lambda: _moe.moe_mixer_fmnist(expert_hidden=128, top_p=0.8, **_MIXER),
    description="MLP-Mixer (4x4 patches, 49 tokens, dim 64, 4 blocks) whose channel MLPs are 4-expert mixtures "
                "(hidden 128 each) with dynamic top-p routing (p 0.8, Huang et al. 2024): load-balancing and "
                "entropy (compute) losses",
    train_args={**_MIXER_TRAIN, "balance_weight": 0.01, "beta": 0.01, "beta_lr": 0.001, "target_experts": 1.6,
                "static_counterpart": "mixer-fmnist"},
))


# -- token-halting ViT (A-ViT) -----------------------------------------------------------------

from . import vit as _vit  # noqa: E402

# ViT (4x4 patches -> 49 tokens + class token, dim 64, 6 blocks, 4 heads, MLP ratio 2): ~0.4 s
# per training step of 128 on one thread (~3 min per epoch idle). The static ViT trains from
# scratch; A-ViT fine-tunes from it (`init_from`; same parameters) with A-ViT's ponder loss and
# distribution prior (train/vit.py). Halting h = sigmoid(10 t_0 - 6), eps 0.01: the centre -6 chosen on
# the static ViT's channel 0 (1000 training images): mean h 0.13, 89 % of the (token, block) units still
# running at the start of fine-tuning (A-ViT starts near full compute too), gradients not vanishing.
_VIT_TRAIN = {"lr": 1e-3, "batch_size": 128, "weight_decay": 0.05, "warmup_frac": 0.05}
register(ModelSpec(
    name="vit-fmnist",
    family="vit",
    build=lambda: _vit.vit_fmnist(),
    description="static ViT (4x4 patches, 49 patch tokens + class token, dim 64, 6 blocks, 4 heads, MLP ratio 2): "
                "the A-ViT victim's static counterpart",
    train_args={**_VIT_TRAIN, "epochs": 5},
))
register(ModelSpec(
    name="avit-fmnist",
    family="token_vit",
    build=lambda: _vit.avit_fmnist(halt_scale=10.0, halt_center=-6.0),
    description="A-ViT: the ViT with per-token halting (halting score from each token's first channel, "
                "cumulative halting to 1 - 0.01, class token always runs; real path drops halted tokens), "
                "ponder loss and distribution prior, fine-tuned from the static ViT",
    train_args={**_VIT_TRAIN, "epochs": 3, "lr": 5e-4, "init_from": "vit-fmnist", "ponder_weight": 0.1,
                "ponder_target": 3.6, "distr_weight": 0.1, "target_depth": 2.0, "static_counterpart": "vit-fmnist"},
))
