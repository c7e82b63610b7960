"""The victim zoo: a registry of named victims, shipped weights (safetensors) and model cards.

A victim is an ``nn.Module`` taking images in [0, 1] of shape ``(B, *model.input_shape)`` and
returning logits. Gated families declare their decisions with :class:`dynattack.gates.Gate`,
provide ``forward_conditional(x)`` (really skips work) and, where cost is not
one-decision-one-cost, ``executed_flops(trace)``.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import cost
from ..errors import DynattackError

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass
class ModelSpec:
    name: str
    family: str
    build: Callable[[], nn.Module]
    description: str
    dataset: str = "fashion-mnist"
    train_args: dict = field(default_factory=dict)  # the recipe's settings, read by dynattack.train


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
            "card": read_card(name),
        })
    return rows


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a ``.pth`` read with ``weights_only=True`` (never
    unpickling code). Any failure is one clear :class:`DynattackError`."""
    path = Path(path)
    if not path.is_file():
        raise DynattackError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise DynattackError(f"weights file {path} is corrupt or truncated ({str(exc).splitlines()[0]})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DynattackError(
            f"refusing {path}: it needs unpickling of code, which could run anything; "
            "re-save it as a plain state_dict (torch.save(model.state_dict(), ...)) or as safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise DynattackError(f"weights file {path} is corrupt or truncated ({str(exc).splitlines()[0]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # the official releases wrap the weights
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DynattackError(f"{path} holds no state_dict of tensors")
    return obj


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load our native layout, or a family's official layout when the family knows it
    (``model.convert_official(state_dict)``). Mismatched keys are listed in the error."""
    state = read_state_dict(path)
    own = model.state_dict()
    if set(state) != set(own) and hasattr(model, "convert_official"):
        state = model.convert_official(state)
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


def create_model(name: str, pretrained: bool = True, weights: str | Path | None = None,
                 device: str | torch.device = "cpu") -> nn.Module:
    """A victim from the zoo in eval mode, with its cost profile measured.

    ``weights`` loads a file of the user's (safetensors, or an official ``.pth``) instead of ours.
    """
    spec = get_spec(name)
    model = spec.build()
    if weights is not None:
        load_weights(model, weights)
    elif pretrained:
        path = weights_path(name)
        if not path.exists():
            raise DynattackError(f"no shipped weights for {name}: train them with `dynattack train {name}`")
        load_weights(model, path)
    model.name = name
    model.card = read_card(name)
    model.to(device).eval()
    cost.calibrate(model, model.input_shape)
    return model


# Families register their victims on import.
from . import resnet as _resnet  # noqa: E402

register(ModelSpec(
    name="resnet20-fmnist",
    family="resnet",
    build=lambda: _resnet.ResNet(depth=20, in_channels=1, num_classes=10, input_size=28),
    description="static CIFAR-style ResNet-20 (no gates): pipeline proof and static baseline",
    train_args={"epochs": 6, "lr": 0.1, "batch_size": 128},
))
