"""Dataset readers against files written here by independent code (struct, pickle, Pillow)."""
from __future__ import annotations

import gzip
import os
import pickle
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dynattack.data import (
    CIFAR10_CLASSES,
    DATASETS,
    FASHION_MNIST_CLASSES,
    ImageSet,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    pad_to,
)
from dynattack.errors import DynattackError

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    monkeypatch.delenv("DYNATTACK_DATA", raising=False)


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# --- IDX (Fashion-MNIST) -----------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 0, 9, 1, 1], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, gz)
    x, y = load_fashion_mnist("test", root=tmp_path)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [3, 0, 9, 1, 1]
    for n in range(5):
        for r, c in [(0, 0), (13, 7), (27, 27)]:
            assert x[n, 0, r, c].item() == pytest.approx(images[n, r, c] / 255.0)

    padded, _ = load_fashion_mnist("test", root=tmp_path, pad=32)
    assert padded.shape == (5, 1, 32, 32)
    assert torch.equal(padded[:, :, 2:30, 2:30], x)
    assert padded[:, :, :2].abs().sum() == 0 and padded[:, :, :, 30:].abs().sum() == 0


def test_idx_dotted_names_and_env(tmp_path, monkeypatch):
    write_idx(tmp_path / "train-images.idx3-ubyte", np.zeros((2, 4, 4), np.uint8), gz=False)
    write_idx(tmp_path / "train-labels.idx1-ubyte", np.array([1, 2], np.uint8), gz=False)
    monkeypatch.setenv("DYNATTACK_DATA", str(tmp_path))
    x, y = load_fashion_mnist("train")
    assert x.shape == (2, 1, 4, 4) and y.tolist() == [1, 2]


def test_fashion_missing_dir_is_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DynattackError) as exc:
        load_fashion_mnist(root=missing)
    assert str(missing) in one_line(exc)


def test_pad_to_rejects_larger_images():
    with pytest.raises(DynattackError):
        pad_to(torch.zeros(1, 1, 40, 40), 32)


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason=f"real Fashion-MNIST not installed at {REAL_FASHION}")
def test_real_fashion_mnist_test_split():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28)
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert sorted(y.unique().tolist()) == list(range(10))
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.99
    data = load_dataset("fashion-mnist")
    assert data.classes == FASHION_MNIST_CLASSES and torch.equal(data.labels, y)


# --- CIFAR-10 python batches -------------------------------------------------------------------


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], protocol: int = 2) -> None:
    """The real layout: a dict with byte-string keys (the files are Python 2 pickles)."""
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, 5])
def test_cifar_test_batch(tmp_path, protocol):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    write_cifar_batch(tmp_path / "test_batch", data, [0, 9, 5, 5], protocol)
    x, y, classes = load_cifar10("test", root=tmp_path)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [0, 9, 5, 5]
    assert classes == CIFAR10_CLASSES
    # the row layout: 1024 red values, then green, then blue, each row-major 32x32
    for n, c, r, col in [(0, 0, 0, 0), (1, 1, 5, 31), (3, 2, 31, 17), (2, 0, 16, 16)]:
        assert x[n, c, r, col].item() == pytest.approx(data[n, c * 1024 + r * 32 + col] / 255.0)


def py2_batch_bytes(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2 + numpy 1 wrote the official files, opcode by opcode: byte-string
    keys, numpy.core module names, the dtype state with a b'|' byte order, BINSTRING data."""

    def short(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b

    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short(b"b") + b"\x87R"
        + b"(K\x01M" + struct.pack("<H", len(data)) + b"M" + struct.pack("<H", 3072) + b"\x86"
        + b"cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + short(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89T" + struct.pack("<I", data.size) + data.tobytes() + b"tb"
    )
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + short(b"data") + array + short(b"labels") + label_list + b"u."


def test_cifar_python2_numpy1_batch(tmp_path):
    data = (np.arange(2 * 3072) % 251).astype(np.uint8).reshape(2, 3072)
    (tmp_path / "test_batch").write_bytes(py2_batch_bytes(data, [3, 7]))
    x, y, _ = load_cifar10(root=tmp_path)
    assert y.tolist() == [3, 7]
    assert torch.equal((x * 255).round().to(torch.uint8).reshape(2, 3072), torch.from_numpy(data))


def test_cifar_train_in_subdir_concatenates_batches(tmp_path, monkeypatch):
    sub = tmp_path / "cifar-10-batches-py"
    sub.mkdir()
    for i in range(1, 6):
        write_cifar_batch(sub / f"data_batch_{i}", np.full((2, 3072), 10 * i, np.uint8), [i, i])
    monkeypatch.setenv("DYNATTACK_DATA", str(tmp_path))
    x, y, _ = load_cifar10("train", pad=36)
    assert x.shape == (10, 3, 36, 36)
    assert y.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert x[9, 1, 2, 2].item() == pytest.approx(50 / 255.0) and x[9, 1, 0, 0] == 0


def test_cifar_missing_is_one_line(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"")
    with pytest.raises(DynattackError) as exc:
        load_cifar10("train", root=tmp_path)
    msg = one_line(exc)
    assert str(tmp_path) in msg and "data_batch_5" in msg and "cifar" in msg.lower()
    with pytest.raises(DynattackError):
        load_cifar10("valid", root=tmp_path)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_cifar_malicious_pickle_is_refused_and_not_run(tmp_path):
    payload = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": _Evil(tmp_path / "pwned")}, protocol=2)
    # positive control: an ordinary unpickler really would run the command
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control)))
    assert control.exists()

    (tmp_path / "test_batch").write_bytes(payload)
    with pytest.raises(DynattackError) as exc:
        load_cifar10("test", root=tmp_path)
    assert "system" in one_line(exc) and str(tmp_path / "test_batch") in str(exc.value)
    assert not (tmp_path / "pwned").exists()


def test_cifar_malformed_batches(tmp_path):
    (tmp_path / "test_batch").write_bytes(b"\x80\x02}q\x00(X")  # truncated pickle
    with pytest.raises(DynattackError) as exc:
        load_cifar10(root=tmp_path)
    assert "test_batch" in one_line(exc)
    write_cifar_batch(tmp_path / "test_batch", np.zeros((2, 100), np.uint8), [0, 1])
    with pytest.raises(DynattackError, match="3072"):
        load_cifar10(root=tmp_path)
    write_cifar_batch(tmp_path / "test_batch", np.zeros((2, 3072), np.uint8), [0])
    with pytest.raises(DynattackError, match="labels"):
        load_cifar10(root=tmp_path)


# --- class folders -----------------------------------------------------------------------------


def solid(path: Path, color, size=(12, 9), mode="RGB") -> None:
    Image.new(mode, size, color).save(path)


def make_folder(root: Path) -> None:
    for name in ("dog", "ant", "cat"):
        (root / name).mkdir(parents=True)
    solid(root / "ant" / "a.png", (255, 0, 0))
    solid(root / "ant" / "b.PNG", (0, 0, 255), size=(30, 50))
    solid(root / "cat" / "c.png", 128, mode="L")  # greyscale: converted to RGB
    solid(root / "dog" / "d.png", (0, 255, 0, 10), mode="RGBA")  # alpha dropped
    (root / "dog" / "notes.txt").write_text("not an image")


def test_image_folder_labels_and_pixels(tmp_path):
    make_folder(tmp_path)
    data = load_image_folder(tmp_path, size=8)
    assert isinstance(data, ImageSet)
    assert data.classes == ("ant", "cat", "dog")
    assert data.labels.tolist() == [0, 0, 1, 2] and data.labels.dtype == torch.int64
    assert data.images.shape == (4, 3, 8, 8)
    expected = [(1, 0, 0), (0, 0, 1), (128 / 255,) * 3, (0, 1, 0)]
    for img, rgb in zip(data.images, expected):
        assert torch.allclose(img, torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, 8, 8), atol=1.5 / 255)


def test_image_folder_resize_and_centre_crop(tmp_path):
    (tmp_path / "x").mkdir()
    img = np.zeros((20, 80, 3), np.uint8)  # h=20, w=80: red | green | blue bands
    img[:, :20, 0] = 255
    img[:, 20:60, 1] = 255
    img[:, 60:, 2] = 255
    Image.fromarray(img).save(tmp_path / "x" / "bands.png")

    # crop: shorter side 20 -> 10 (so 80x20 -> 40x10), centre 10x10 = source columns 30..50, all green
    cropped = load_image_folder(tmp_path, size=10, crop=10).images[0]
    assert cropped.shape == (3, 10, 10)
    assert torch.allclose(cropped, torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 10, 10))

    # no crop: squashed to 10x10, all three bands visible
    squashed = load_image_folder(tmp_path, size=10).images[0]
    assert squashed.shape == (3, 10, 10)
    assert squashed[0, :, 0].min() > 0.9 and squashed[1, :, 5].min() > 0.9 and squashed[2, :, 9].min() > 0.9

    # portrait image: the width is the shorter side
    Image.fromarray(np.ascontiguousarray(img.transpose(1, 0, 2))).save(tmp_path / "x" / "bands.png")
    cropped = load_image_folder(tmp_path, size=10, crop=6).images[0]
    assert cropped.shape == (3, 6, 6) and cropped[1].min() == 1.0


def test_image_folder_split_and_errors(tmp_path):
    make_folder(tmp_path / "val")
    assert load_image_folder(tmp_path, size=4, split="val").images.shape == (4, 3, 4, 4)

    with pytest.raises(DynattackError) as exc:
        load_image_folder(tmp_path, split="train")
    assert str(tmp_path / "train") in one_line(exc)

    missing = tmp_path / "missing"
    with pytest.raises(DynattackError) as exc:
        load_image_folder(missing)
    assert str(missing) in one_line(exc)

    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    with pytest.raises(DynattackError) as exc:
        load_image_folder(empty)
    assert str(empty) in one_line(exc)

    bad = tmp_path / "val" / "cat" / "broken.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    with pytest.raises(DynattackError) as exc:
        load_image_folder(tmp_path / "val")
    assert str(bad) in one_line(exc)


# --- dispatch ----------------------------------------------------------------------------------


def test_load_dataset_dispatch(tmp_path):
    assert DATASETS == ("fashion-mnist", "cifar10", "cifar100", "folder")
    write_cifar_batch(tmp_path / "test_batch", np.zeros((3, 3072), np.uint8), [1, 2, 3])
    data = load_dataset("CIFAR10", root=tmp_path)
    assert data.images.shape == (3, 3, 32, 32) and data.labels.tolist() == [1, 2, 3]

    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28), np.uint8), gz=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([4, 5], np.uint8), gz=True)
    x, y, classes = load_dataset("fashion_mnist", root=tmp_path, pad=32)
    assert x.shape == (2, 1, 32, 32) and y.tolist() == [4, 5] and classes[4] == "Coat"

    make_folder(tmp_path / "imgs")
    data = load_dataset("folder", root=tmp_path / "imgs", size=6, pad=8)
    assert data.images.shape == (4, 3, 8, 8) and data.classes == ("ant", "cat", "dog")

    with pytest.raises(DynattackError) as exc:
        load_dataset("imagenet21k")
    msg = one_line(exc)
    assert all(name in msg for name in DATASETS)
    with pytest.raises(DynattackError):
        load_dataset("folder")
    with pytest.raises(DynattackError):
        load_dataset("cifar10", root=tmp_path, size=3)


# --- refused inputs (issue 14): shapes, counts and labels that disagree --------------------------


def write_raw_idx(path: Path, dims: tuple[int, ...], payload: bytes) -> None:
    """An IDX file whose header says ``dims`` whatever ``payload`` holds (to cut files short)."""
    path.write_bytes(struct.pack(">HBB", 0, 0x08, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + payload)


def test_idx_truncated_or_longer_than_its_header_is_refused(tmp_path):
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8), gz=False)
    for size in (5 * 28 * 28 - 1, 5 * 28 * 28 + 3):
        write_raw_idx(tmp_path / "t10k-images-idx3-ubyte", (5, 28, 28), bytes(size))
        with pytest.raises(DynattackError) as exc:
            load_fashion_mnist(root=tmp_path)
        msg = one_line(exc)
        assert "truncated" in msg and "(5, 28, 28)" in msg and f"{size} bytes" in msg


def test_idx_images_and_labels_must_agree(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8), gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=False)
    with pytest.raises(DynattackError) as exc:
        load_fashion_mnist(root=tmp_path)
    assert "5 images" in one_line(exc) and "4 labels" in one_line(exc)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((5, 2), np.uint8), gz=False)  # not one per image
    with pytest.raises(DynattackError, match=r"\(5, 2\)"):
        load_fashion_mnist(root=tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8), gz=False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 784), np.uint8), gz=False)  # flat images
    with pytest.raises(DynattackError, match=r"\(5, 784\)"):
        load_fashion_mnist(root=tmp_path)


def test_idx_label_outside_the_ten_classes_is_refused(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([9, 0, 10, 200], np.uint8), gz=False)
    with pytest.raises(DynattackError) as exc:
        load_fashion_mnist(root=tmp_path)
    msg = one_line(exc)
    assert "0..9" in msg and "sample 2 has label 10" in msg


def test_synthetic_splits_are_fixed_at_the_shipped_cards_sizes():
    from dynattack.data.points import SYNTHETIC_SPLIT_SIZES, synthetic_scenes
    from dynattack.models import read_card

    args = read_card("unet3d-rooms")["train_args"]  # what the shipped victim was trained and evaluated on
    assert SYNTHETIC_SPLIT_SIZES == {"train": args["scenes"], "val": args["eval_scenes"], "test": args["eval_scenes"]}
    assert len(synthetic_scenes("val", args["eval_scenes"], density=20.0)) == args["eval_scenes"]
    with pytest.raises(DynattackError) as exc:
        synthetic_scenes("val", args["eval_scenes"] + 1, density=20.0)
    assert f"holds {args['eval_scenes']}" in one_line(exc)
