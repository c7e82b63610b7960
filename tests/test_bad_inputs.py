"""Bad weights, bad data and unbounded counts (issue 14, items 4-6): each is refused with one
clear line before anything is built or written, through the real CLI entry point."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dynattack import cli
from dynattack.data import ImageSet
from dynattack.data import points as points_module
from dynattack.models import get_spec, read_card, read_state_dict

ROOT = Path(__file__).resolve().parents[1]
ATTACK = ["attack", "--victim", "resnet20-fmnist", "--attack", "fgsm", "--eps", "8/255", "--n", "4",
          "--batch-size", "4", "--latency-n", "0", "--no-progress"]


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must end in SystemExit(2) with exactly one line on stderr."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped unsigned-byte IDX file, written from the format's definition."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fashion_dir(root: Path, labels: list[int]) -> Path:
    """A Fashion-MNIST-shaped test split of len(labels) random images with these labels."""
    root.mkdir()
    rng = np.random.default_rng(0)
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (len(labels), 28, 28)))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.array(labels))
    return root


@pytest.fixture(scope="module")
def state():
    return {k: v.contiguous().clone() for k, v in get_spec("resnet20-fmnist").build().state_dict().items()}


@pytest.fixture
def no_room_built(monkeypatch):
    """Fail at once if a synthetic room is generated: a refused count must not build anything."""
    def refuse(*args, **kwargs):
        raise AssertionError("a synthetic room was generated")

    monkeypatch.setattr(points_module, "generate_scene", refuse)


# ------------------------------------------------------------------------------ weights


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, capsys, state):
    bad = dict(state)
    bad["fc.weight"] = bad["fc.weight"].clone()
    bad["fc.weight"][3, 5] = float("nan")
    bad["fc.weight"][0, 0] = float("inf")
    path = tmp_path / "nan.safetensors"
    save_file(bad, str(path))
    line = cli_error(capsys, ["eval", "resnet20-fmnist", "--weights", str(path), "--n", "8", "--latency-n", "0"])
    assert "'fc.weight'" in line and "finite" in line and "2 NaN or infinite" in line
    run = tmp_path / "run"
    line = cli_error(capsys, ATTACK + ["--weights", str(path), "--out", str(run)])
    assert "'fc.weight'" in line
    assert not run.exists()


def test_empty_weights_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    line = cli_error(capsys, ["eval", "resnet20-fmnist", "--weights", str(path)])
    assert "empty" in line and str(path) in line


@pytest.mark.parametrize("name", ["random.pth", "random.bin", "random.safetensors"])
def test_random_bytes_are_not_a_checkpoint(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 16)
    line = cli_error(capsys, ["eval", "resnet20-fmnist", "--weights", str(path)])
    assert "not a checkpoint" in line and str(path) in line
    assert "unpickling" not in line  # nothing in the file names code


def test_formats_are_told_by_content_not_by_suffix(tmp_path, state):
    safetensors_as_bin = tmp_path / "weights.bin"
    save_file(state, str(safetensors_as_bin))
    legacy_as_safetensors = tmp_path / "weights.safetensors"  # torch.save's pre-1.6 pickle format
    torch.save(state, str(legacy_as_safetensors), _use_new_zipfile_serialization=False)
    zip_without_suffix = tmp_path / "weights"
    torch.save({"state_dict": state}, str(zip_without_suffix))
    for path in (safetensors_as_bin, legacy_as_safetensors, zip_without_suffix):
        loaded = read_state_dict(path)
        assert loaded.keys() == state.keys(), path
        assert all(torch.equal(loaded[k], state[k]) for k in state), path


def test_truncated_safetensors_without_suffix_is_named_safetensors(tmp_path, capsys, state):
    whole = tmp_path / "whole.safetensors"
    save_file(state, str(whole))
    data = whole.read_bytes()
    for name, cut in (("half", len(data) // 2), ("header", 100)):
        path = tmp_path / name
        path.write_bytes(data[:cut])
        line = cli_error(capsys, ["eval", "resnet20-fmnist", "--weights", str(path)])
        assert "truncated safetensors" in line, line


def test_pickle_that_is_no_state_dict_is_one_line_and_not_called_code(tmp_path):
    # A subprocess: torch warns about protocol 4 on stderr, which would be a second line.
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    proc = subprocess.run([sys.executable, "-m", "dynattack", "eval", "resnet20-fmnist", "--weights", str(path)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "corrupt pickle" in lines[0] and "unpickling of code" not in lines[0]


# ------------------------------------------------------------------------------ counts


def test_attack_on_more_rooms_than_the_split_holds_builds_none(tmp_path, capsys, no_room_built):
    rooms = read_card("unet3d-rooms")["train_args"]["eval_scenes"]  # the val/test size the shipped card names
    run = tmp_path / "rooms"
    line = cli_error(capsys, ["attack", "--victim", "unet3d-rooms", "--attack", "pc-random", "--n", "100000",
                              "--out", str(run), "--no-progress"])
    assert "100000" in line and f"holds {rooms}" in line and "val" in line
    line = cli_error(capsys, ["attack", "--victim", "unet3d-rooms", "--attack", "pc-random", "--offset", "5",
                              "--n", str(rooms - 4), "--out", str(run), "--no-progress"])
    assert f"asked for {rooms + 1} rooms" in line
    assert not run.exists()


def test_eval_of_more_rooms_than_the_test_split_builds_none(capsys, no_room_built):
    rooms = read_card("unet3d-rooms")["train_args"]["eval_scenes"]
    line = cli_error(capsys, ["eval", "unet3d-rooms", "--n", str(rooms + 1), "--latency-n", "0"])
    assert f"asked for {rooms + 1} rooms" in line and f"holds {rooms}" in line and "test" in line


def test_eval_of_more_images_than_the_test_split_is_refused(tmp_path, capsys):
    data = fashion_dir(tmp_path / "fmnist", list(range(10)) * 2)
    line = cli_error(capsys, ["eval", "resnet20-fmnist", "--data", str(data), "--n", "21", "--latency-n", "0"])
    assert "--n 21" in line and "holds 20 images" in line


# ------------------------------------------------------------------------------ labels


def test_label_200_is_refused_before_the_run_directory_exists(tmp_path, capsys):
    labels = [i % 10 for i in range(16)]
    labels[3] = 200
    data = fashion_dir(tmp_path / "fmnist", labels)
    run = tmp_path / "run"
    line = cli_error(capsys, ATTACK + ["--data", str(data), "--out", str(run)])
    assert "sample 3 has label 200" in line
    assert not run.exists()
    line = cli_error(capsys, ["eval", "resnet20-fmnist", "--data", str(data), "--latency-n", "0"])
    assert "sample 3 has label 200" in line


def test_labels_are_checked_against_the_victims_classes(tmp_path, capsys, monkeypatch):
    # A loader that knows no class count (as a user's own dataset may not): the victim's 10 decide.
    labels = torch.tensor([0, 9, 10, 1])
    images = torch.rand(4, 1, 28, 28)
    monkeypatch.setattr("dynattack.data.load_dataset",
                        lambda *a, **k: ImageSet(images, labels, tuple("abcdefghijk")))
    run = tmp_path / "run"
    line = cli_error(capsys, ATTACK + ["--out", str(run)])
    assert "0..9" in line and "sample 2 has label 10" in line
    assert not run.exists()
    line = cli_error(capsys, ["eval", "resnet20-fmnist", "--latency-n", "0"])
    assert "sample 2 has label 10" in line


def test_victim_classes_from_the_logits_width_without_num_classes():
    from dynattack.models import victim_classes

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    assert victim_classes(model, torch.zeros(1, 2, 2)) == 3
    model.num_classes = 7
    assert victim_classes(model, torch.zeros(1, 2, 2)) == 7
