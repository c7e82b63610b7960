"""Training recipes per family; `dynattack train NAME` runs the one its registry entry names."""
from __future__ import annotations

from pathlib import Path

from ..errors import DynattackError
from ..models import WEIGHTS_DIR, get_spec
from .common import save_victim


def _recipe(family: str):
    if family == "resnet":
        from .classifier import train_classifier
        return train_classifier
    if family == "skipnet":
        from .skipnet import train_skipnet
        return train_skipnet
    if family == "dynconv":
        from .dynconv import train_dynconv
        return train_dynconv
    if family == "sparse_unet":
        from .sparse_unet import train_sparse_unet
        return train_sparse_unet
    if family == "manidp":
        from .manidp import train_manidp
        return train_manidp
    if family == "sact":
        from .sact import train_sact
        return train_sact
    if family == "early_exit":
        from .early_exit import train_early_exit
        return train_early_exit
    if family == "moe":
        from .moe import train_moe
        return train_moe
    if family in ("vit", "token_vit"):
        from .vit import train_vit
        return train_vit
    raise DynattackError(f"no training recipe for family {family!r}")


def train_model(name: str, seed: int = 0, out_dir: str | Path = WEIGHTS_DIR, data_root=None, device: str = "cpu",
                epochs: int | None = None, limit: int | None = None, log=print) -> Path:
    """Train victim NAME from scratch and write NAME.safetensors + NAME.json into ``out_dir``."""
    spec = get_spec(name)
    if spec.official:
        raise DynattackError(f"{name} is an official release's architecture, with no training recipe here: bring its "
                             f"checkpoint ({spec.official}) and pass --weights FILE")
    extra = {}
    if "init_from" in spec.train_args:  # a second stage (SkipNet HRL) starts from the first one's weights
        first = Path(out_dir) / f"{spec.train_args['init_from']}.safetensors"
        extra["sp_weights"] = first if first.exists() else None
    model, card = _recipe(spec.family)(spec, seed=seed, data_root=data_root, device=device, epochs=epochs,
                                       limit=limit, log=log, **extra)
    return save_victim(model, name, card, out_dir)
