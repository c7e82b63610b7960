"""Image datasets from their standard on-disk formats, as float tensors in [0, 1].

Readers: Fashion-MNIST IDX files, CIFAR-10 and CIFAR-100 python batches (read with an unpickler
that only rebuilds numpy arrays), and ImageNet-style class folders. None downloads anything: users bring
their data; a missing file raises :class:`DynattackError` saying where we looked.
"""
from __future__ import annotations

import codecs
import gzip
import math
import os
import pickle
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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
        if zero != 0 or dtype_code != 0x08 or ndim == 0:
            raise ValueError("not an unsigned-byte IDX file")
        dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise DynattackError(f"cannot read IDX file {path}: {exc}") from None
    body, expected = len(data) - 4 - 4 * ndim, math.prod(dims)
    if body != expected:  # cut short, or not the shape its header says
        raise DynattackError(f"IDX file {path} is corrupt or truncated: its header says shape {dims} "
                             f"({expected} bytes), it holds {body} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def check_labels(labels: torch.Tensor, num_classes: int, source: str, ignore_index: int | None = None) -> None:
    """Refuse labels outside ``0 .. num_classes - 1`` (``ignore_index`` allowed), naming the first
    bad one and its sample (labels ``(N,)``, or ``(N, ...)`` per sample, e.g. per point)."""
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if bad.any():
        i = int(bad.reshape(len(labels), -1).any(1).nonzero()[0])
        value = int(labels[i][bad[i]].reshape(-1)[0])
        raise DynattackError(f"{source}: labels must lie in 0..{num_classes - 1} ({num_classes} classes); "
                             f"sample {i} has label {value}")


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
    pixels, raw_labels = _read_idx(img_path), _read_idx(lbl_path)
    if pixels.ndim != 3:
        raise DynattackError(f"{img_path} holds an array of shape {pixels.shape}; images are (N, height, width)")
    if raw_labels.ndim != 1:
        raise DynattackError(f"{lbl_path} holds an array of shape {raw_labels.shape}; labels are (N,)")
    if len(pixels) != len(raw_labels):
        raise DynattackError(f"{img_path} holds {len(pixels)} images but {lbl_path} {len(raw_labels)} labels")
    if len(pixels) == 0:
        raise DynattackError(f"{img_path} holds no images")
    images = torch.from_numpy(pixels.copy()).float().div_(255.0).unsqueeze(1)
    labels = torch.from_numpy(raw_labels.astype(np.int64))
    check_labels(labels, len(FASHION_MNIST_CLASSES), str(lbl_path))
    if pad:
        images = pad_to(images, pad)
    return images, labels


# --- shared result type ------------------------------------------------------------------------


class ImageSet(NamedTuple):
    """Images ``(N, C, H, W)`` float in [0, 1], int64 labels ``(N,)``, and the class names
    (``classes[label]``). A tuple: ``images, labels, classes = load_dataset(...)`` works."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# --- CIFAR-10 python batches -------------------------------------------------------------------

CIFAR10_DIR = Path("~/.cache/dynattack/cifar10").expanduser()
CIFAR10_HINT = (
    "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it there, "
    "or pass --data DIR / set DYNATTACK_DATA"
)


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR batch may name: what numpy needs to rebuild a plain array.
    Both numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) module names occur in files."""
    core = getattr(np, "_core", None) or np.core
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # protocol <= 2 pickles bytes as encode(str, 'latin1')
    }
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(pkg + ".multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(pkg + ".numeric", "_frombuffer")] = core.numeric._frombuffer  # protocol 5
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays; refuses every other global, so a
    crafted file cannot run code (a plain ``pickle.load`` would call whatever the file names)."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DynattackError(
                f"refusing to load {module}.{name} from a CIFAR batch: the file is not a plain numpy pickle"
            ) from None


def _read_cifar_batch(path: Path, label_key: str = "labels",
                      classes: tuple[str, ...] = CIFAR10_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """One python batch: a dict with b'data' uint8 (N, 3072) (R, G, B planes of 32x32) and the
    labels under ``label_key`` (CIFAR-10: b'labels'; CIFAR-100: b'fine_labels')."""
    what = f"CIFAR-{len(classes)}"
    try:
        with open(path, "rb") as f:
            # encoding='bytes': the official files are Python 2 pickles with byte-string keys
            batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except DynattackError as exc:
        raise DynattackError(f"{path}: {exc}") from None
    except Exception as exc:  # any malformed pickle: one clear line, never a traceback
        raise DynattackError(f"cannot read {what} batch {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(batch, dict):
        raise DynattackError(f"{path} is not a {what} python batch (expected a dict, got {type(batch).__name__})")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(label_key.encode(), batch.get(label_key))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DynattackError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),):
        raise DynattackError(f"{path}: expected {len(data)} {label_key!r}, found shape {labels.shape}")
    check_labels(torch.from_numpy(labels), len(classes), str(path))
    return data, labels


def _cifar_images(parts: list[tuple[np.ndarray, np.ndarray]], pad: int | None, classes: tuple[str, ...]) -> ImageSet:
    images = torch.from_numpy(np.concatenate([p[0] for p in parts])).reshape(-1, 3, 32, 32).float().div_(255.0)
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ImageSet(pad_to(images, pad) if pad else images, labels, classes)


def load_cifar10(split: str = "test", root: str | Path | None = None, pad: int | None = None) -> ImageSet:
    """CIFAR-10 (3x32x32, 10 classes) from the standard python batches.

    Looks in ``root`` (else $DYNATTACK_DATA, else ``~/.cache/dynattack/cifar10``) and in its
    ``cifar-10-batches-py/`` subdirectory. ``train`` reads ``data_batch_1..5`` (50 000 images),
    ``test`` reads ``test_batch`` (10 000). ``pad`` zero-pads to ``pad`` x ``pad``.
    """
    if split not in ("train", "test"):
        raise DynattackError(f"unknown split {split!r}; expected train or test")
    root = _data_root(root, CIFAR10_DIR)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    candidates = [root, root / "cifar-10-batches-py"]
    folder = next((d for d in candidates if all((d / n).is_file() for n in names)), None)
    if folder is None:
        raise DynattackError(
            f"CIFAR-10 {split} batches ({', '.join(names)}) not found in {root} "
            f"or {candidates[1]}; {CIFAR10_HINT}"
        )
    return _cifar_images([_read_cifar_batch(folder / n) for n in names], pad, CIFAR10_CLASSES)


# --- CIFAR-100 python files --------------------------------------------------------------------

CIFAR100_DIR = Path("~/.cache/dynattack/cifar100").expanduser()
# the 100 fine classes in label order (the release's meta file lists them alphabetically)
CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish
forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle
mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar
sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale
willow_tree wolf woman worm""".split())


def load_cifar100(split: str = "test", root: str | Path | None = None, pad: int | None = None) -> ImageSet:
    """CIFAR-100 (3x32x32, 100 fine classes) from the standard python files ``train`` (50 000
    images) and ``test`` (10 000), labels from ``fine_labels``.

    Looks in ``root`` (else $DYNATTACK_DATA, else ``~/.cache/dynattack/cifar100``) and in its
    ``cifar-100-python/`` subdirectory. ``pad`` zero-pads to ``pad`` x ``pad``.
    """
    if split not in ("train", "test"):
        raise DynattackError(f"unknown split {split!r}; expected train or test")
    root = _data_root(root, CIFAR100_DIR)
    folder = next((d for d in (root, root / "cifar-100-python") if (d / split).is_file()), None)
    if folder is None:
        raise DynattackError(
            f"CIFAR-100 {split} file ({split}) not found in {root} or {root / 'cifar-100-python'}; download "
            "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it there, "
            "or pass --data DIR / set DYNATTACK_DATA"
        )
    return _cifar_images([_read_cifar_batch(folder / split, "fine_labels", CIFAR100_CLASSES)], pad, CIFAR100_CLASSES)


# --- ImageNet-style class folders --------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".tif", ".tiff", ".webp")


def _load_rgb(path: Path, size: int, crop: int | None) -> torch.Tensor:
    """One image as (3, H, W) float in [0, 1], resized as :func:`load_image_folder` says."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if crop is None:
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            else:
                w, h = img.size
                new = (size, max(size, round(h * size / w))) if w <= h else (max(size, round(w * size / h)), size)
                img = img.resize(new, Image.Resampling.BILINEAR)
                left, top = (new[0] - crop) // 2, (new[1] - crop) // 2
                img = img.crop((left, top, left + crop, top + crop))
            array = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # Pillow raises OSError, ValueError, even SyntaxError for broken files
        raise DynattackError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def load_image_folder(
    root: str | Path, size: int = 224, crop: int | None = None, split: str | None = None
) -> ImageSet:
    """ImageNet-style class folders: ``root[/split]/<class>/<image>``.

    Classes are the sub-directories in sorted order (label = index; a class folder with no image
    keeps its index). Images (jpg, jpeg, png, bmp, ppm, gif, tif, tiff, webp; case-insensitive)
    are converted to RGB and, with ``crop=None``, resized to ``size`` x ``size`` (aspect not
    kept); with ``crop=k``, the shorter side is resized to ``size`` and the centre ``k`` x ``k``
    is cut out (ImageNet evaluation: ``size=256, crop=224``). Bilinear resampling. Everything is
    loaded into memory at once.
    """
    if crop is not None and crop > size:
        raise DynattackError(f"crop {crop} is larger than the resized shorter side {size}")
    folder = Path(root) / split if split else Path(root)
    if not folder.is_dir():
        raise DynattackError(f"image folder {folder} does not exist; expected {folder}/<class>/<image files>")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((folder / name).iterdir())
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not files:
        raise DynattackError(f"no images found in {folder}; expected {folder}/<class>/<image files>")
    side = size if crop is None else crop
    images = torch.empty(len(files), 3, side, side)  # filled in place: one copy of the data in memory
    for i, (path, _) in enumerate(files):
        images[i] = _load_rgb(path, size, crop)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageSet(images, labels, tuple(classes))


# --- one entry point ---------------------------------------------------------------------------

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "folder")


def load_dataset(
    name: str, split: str | None = None, root: str | Path | None = None, pad: int | None = None, **kw
) -> ImageSet:
    """Load a dataset by name (one of :data:`DATASETS`) as an :class:`ImageSet`.

    ``split=None`` means ``test`` for fashion-mnist, cifar10 and cifar100, and ``root`` itself for
    ``folder`` (where a split is a sub-directory such as ``val``). ``folder`` needs ``root`` and
    takes ``size`` and ``crop`` in ``kw``. ``pad`` zero-pads to ``pad`` x ``pad``.
    """
    key = name.lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}.get(key, key)
    if key in ("fashion-mnist", "cifar10", "cifar100") and kw:
        raise DynattackError(f"dataset {key} takes no options {', '.join(sorted(kw))}")
    if key == "fashion-mnist":
        images, labels = load_fashion_mnist(split or "test", root, pad)
        return ImageSet(images, labels, FASHION_MNIST_CLASSES)
    if key == "cifar10":
        return load_cifar10(split or "test", root, pad)
    if key == "cifar100":
        return load_cifar100(split or "test", root, pad)
    if key == "folder":
        if root is None:
            raise DynattackError("the folder dataset needs a directory: pass --data DIR")
        data = load_image_folder(root, split=split, **kw)
        return data._replace(images=pad_to(data.images, pad)) if pad else data
    raise DynattackError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
