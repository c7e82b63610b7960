"""Image datasets from their standard on-disk formats, as float tensors in [0, 1]."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DynattackError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = "install it with: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"


def _data_root(root: str | Path | None, default: Path) -> Path:
    """An explicit directory, else $DYNATTACK_DATA, else the dataset's default location."""
    if root is not None:
        return Path(root)
    env = os.environ.get("DYNATTACK_DATA")
    return Path(env) if env else default


def _read_idx(path: Path) -> np.ndarray:
    """One IDX file (optionally .gz): big-endian magic (dtype code, ndim), dims, raw data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(dims)
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise DynattackError(f"cannot read IDX file {path}: {exc}") from None


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (root / name).is_file():
            return root / name
    return None


def pad_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad (centred) to ``size`` x ``size``, e.g. 28 -> 32 for CIFAR-layout networks."""
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise DynattackError(f"cannot pad {h}x{w} images to {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (left, size - w - left, top, size - h - top))


def load_fashion_mnist(split: str = "test", root: str | Path | None = None, pad: int | None = None):
    """Fashion-MNIST (1x28x28, 10 classes) from the standard IDX files."""
    if split not in ("train", "test"):
        raise DynattackError(f"unknown split {split!r}; expected train or test")
    root = _data_root(root, FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    img_path = _find(root, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lbl_path is None:
        raise DynattackError(
            f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte.gz, {prefix}-labels-idx1-ubyte.gz) "
            f"not found in {root}; {FASHION_MNIST_HINT}, or pass --data DIR / set DYNATTACK_DATA"
        )
    images = torch.from_numpy(_read_idx(img_path).copy()).float().div_(255.0).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(lbl_path).astype(np.int64))
    if len(images) != len(labels):
        raise DynattackError(f"{img_path} and {lbl_path} hold different numbers of samples")
    if pad:
        images = pad_to(images, pad)
    return images, labels
