"""Pieces every training recipe shares: seeding, data split, augmented batches, evaluation,
and writing a victim (safetensors + model card) atomically."""
from __future__ import annotations

import json
import math
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from .. import cost
from ..data import load_fashion_mnist
from ..errors import DynattackError
from ..gates import Trace
from ..metrics import input_dependence, unit_decisions
from ..prediction import prediction
from ..models import read_state_dict, weights_path

VAL_SIZE = 5000  # the last 5000 training images: held out for model and attack selection


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def fashion_mnist_splits(root=None, limit: int | None = None):
    """(train, val, test) pairs; val is held out of training for attack hyper-parameter sweeps.
    ``limit``: the first ``limit`` images of each (smoke runs)."""
    x, y = load_fashion_mnist("train", root)
    xt, yt = load_fashion_mnist("test", root)
    splits = (x[:-VAL_SIZE], y[:-VAL_SIZE]), (x[-VAL_SIZE:], y[-VAL_SIZE:]), (xt, yt)
    return tuple((a[:limit], b[:limit]) for a, b in splits) if limit else splits


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels and horizontal flip, per sample, seeded."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    out = _crop(padded, dy, dx, h, w)
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _crop(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b = padded.shape[0]
    iy = (dy.view(b, 1, 1) + torch.arange(h).view(1, h, 1)).expand(b, h, w)
    ix = (dx.view(b, 1, 1) + torch.arange(w).view(1, 1, w)).expand(b, h, w)
    bi = torch.arange(b).view(b, 1, 1).expand(b, h, w)
    return padded.permute(0, 2, 3, 1)[bi, iy, ix].permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> dict:
    """Accuracy and, for gated victims, mean executed FLOPs and compute kept vs all-gates-on."""
    model.eval()
    correct, flops, decisions = 0, [], []
    prof = cost.profile(model, tuple(x.shape[1:]))
    device = next(model.parameters()).device
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        with Trace() as trace:
            logits = prediction(model, model(xb.to(device)))
        correct += int((logits.argmax(1).cpu() == yb).sum())
        flops.append(cost.executed_flops(model, trace).cpu() if len(trace) else torch.full((len(xb),), prof.full, dtype=torch.float64))
        if len(trace):
            decisions.append({k: v.cpu() for k, v in unit_decisions(trace).items()})
    mean_flops = float(torch.cat(flops).mean())
    out = {
        "accuracy": correct / len(y),
        "flops_mean": mean_flops,
        "flops_full": prof.full,
        "compute_kept_pct": 100.0 * mean_flops / prof.full,
    }
    if decisions:  # gated victims: how much their decisions depend on the input
        out["input_dependence"] = input_dependence(decisions, y, logits.shape[1])
    return out


def victim_card(spec, model: nn.Module, *, seed: int, epochs, seconds: float, val: dict, test: dict, **extra) -> dict:
    """The model card fields every recipe writes (figures from :func:`evaluate`), plus ``extra``."""
    return {
        "name": spec.name,
        "family": spec.family,
        "architecture": spec.description,
        "dataset": "Fashion-MNIST (train: first 55000 training images; val: last 5000; test: 10000)",
        "input_shape": list(model.input_shape),
        "accuracy": test["accuracy"],
        "val_accuracy": val["accuracy"],
        "flops_full": test["flops_full"],
        "flops_mean": test["flops_mean"],
        "compute_kept_pct": test["compute_kept_pct"],
        "compute_saved_pct": 100.0 - test["compute_kept_pct"],
        "val_compute_kept_pct": val["compute_kept_pct"],
        **({"input_dependence": test["input_dependence"]} if "input_dependence" in test else {}),
        "train_command": f"dynattack train {spec.name} --seed {seed}",
        "train_args": dict(spec.train_args),
        "seed": seed,
        "epochs": epochs,
        "train_seconds": round(seconds, 1),
        "machine": machine(),
        **extra,
    }


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def save_victim(model: nn.Module, name: str, card: dict, out_dir: str | Path) -> Path:
    """Write NAME.safetensors and NAME.json; each written to a temp file then renamed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / f".{name}.safetensors.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, out / f"{name}.safetensors")
    card = dict(card, params=sum(p.numel() for p in model.parameters()), written=time.strftime("%Y-%m-%d"))
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, out / f"{name}.json")
    return out / f"{name}.safetensors"


def static_backbone(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A static :class:`~dynattack.models.resnet.ResNet` state_dict of the same depth mapped onto
    the ``layer{k}.{i}`` backbone of the DynConv / SACT / ManiDP families (``blocks.{j}`` ->
    ``layer{k}.{i}``, ``shortcuts.{j}`` -> ``layer{k}.{i}.downsample``)."""
    n = len(model.layer1)
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in ("blocks", "shortcuts"):
            j, _, rest = rest.partition(".")
            block = f"layer{int(j) // n + 1}.{int(j) % n}"
            key = f"{block}.{rest}" if head == "blocks" else f"{block}.downsample.{rest}"
        out[key] = value
    return out


def load_static_backbone(model, source: Path, name: str, init_from: str, own: tuple[str, ...]) -> None:
    """Load the static ResNet checkpoint ``source`` into ``model``'s backbone (an ``init_from``
    run); only keys containing one of ``own`` (the family's fresh gating modules) may be missing."""
    if not source.exists():
        raise DynattackError(f"{name} starts from static weights, none at {source}: train {init_from} first")
    try:
        missing, unexpected = model.load_state_dict(static_backbone(model, read_state_dict(source)), strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise DynattackError(f"{source} does not fit {name}'s backbone ({str(exc).splitlines()[-1].strip()})") from None
    foreign = [k for k in missing if not any(tag in k for tag in own)]
    if unexpected or foreign:
        raise DynattackError(f"{source} is not a static ResNet of depth {model.depth}: "
                             f"unexpected {unexpected[:4]}, missing {foreign[:4]}")


def fine_tune_setup(spec, seed: int, data_root, device: str, limit: int | None, init_weights, own: tuple[str, ...]):
    """The start every recipe that fine-tunes a gated ResNet shares: the seeded generator, the
    Fashion-MNIST splits (the first ``limit`` images of each, for smoke runs), the model with the
    static ResNet of ``train_args["init_from"]`` loaded into its backbone (``init_weights``, default
    the zoo's; ``own``: the family's fresh modules) on ``device``, and its cost profile.
    Returns (generator, ((x, y), (xv, yv), (xt, yt)), model, profile)."""
    gen = seed_everything(seed)
    splits = fashion_mnist_splits(data_root, limit)
    model = spec.build()
    init_from = spec.train_args.get("init_from")
    if init_from:
        source = Path(init_weights) if init_weights else weights_path(init_from)
        load_static_backbone(model, source, spec.name, init_from, own=own)
    model.to(device)
    return gen, splits, model, cost.calibrate(model, model.input_shape)


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
