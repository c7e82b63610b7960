"""The command line driven through the bad inputs of issue 14, as a new user would meet them:
each ends in exactly one line on stderr and exit code 2, with no traceback, and leaves the run
directory as it was (absent, or byte for byte what it held before).

One subprocess per case (the real entry point, ``python -m dynattack``), run in parallel threads
to keep the wall time of this file near that of its slowest case.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dynattack.models import get_spec

ROOT = Path(__file__).resolve().parents[1]


def snapshot(path: Path) -> dict[str, str] | None:
    """Every file under ``path`` with a hash of its bytes; None when ``path`` does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def write_idx(path: Path, array) -> None:
    """An unsigned-byte IDX file (gzipped), the Fashion-MNIST format."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype("uint8").tobytes())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad weights, bad data and awkward output locations, made once."""
    root = tmp_path_factory.mktemp("fuzz")
    state = {k: v.contiguous() for k, v in get_spec("resnet20-fmnist").build().state_dict().items()}
    nan_state = {k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v) for k, v in state.items()}
    save_file(nan_state, str(root / "nan.safetensors"))
    (root / "empty.pth").write_bytes(b"")
    (root / "random.pth").write_bytes(bytes(range(256)) * 64)
    (root / "random.bin").write_bytes(os.urandom(4096))
    save_file(state, str(root / "fine.safetensors"))
    (root / "fine.safetensors").rename(root / "truncated_noext")
    data = (root / "truncated_noext").read_bytes()
    (root / "truncated_noext").write_bytes(data[: len(data) // 2])
    # Fashion-MNIST-shaped data whose labels include 200 (the victim has 10 classes)
    bad = root / "badlabels"
    bad.mkdir()
    import numpy as np

    rng = np.random.default_rng(0)
    for prefix, n in (("train", 16), ("t10k", 16)):
        write_idx(bad / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        labels = rng.integers(0, 10, n)
        labels[3] = 200
        write_idx(bad / f"{prefix}-labels-idx1-ubyte.gz", labels)
    (root / "a_file").write_text("I am a file, not a directory\n")
    # an existing run directory: config.json and a shard of something else; must not change
    existing = root / "existing_run"
    (existing / "adv").mkdir(parents=True)
    (existing / "config.json").write_text('{"victim": "other"}\n')
    (existing / "adv" / "batch_00000.safetensors").write_bytes(b"old shard bytes")
    return root


ATTACK = ["attack", "--victim", "resnet20-fmnist", "--attack", "fgsm", "--eps", "8/255", "--n", "4",
          "--batch-size", "4", "--latency-n", "0", "--no-progress"]


def cases(root: Path) -> list[tuple[str, list[str], Path | None, tuple[str, ...]]]:
    """(name, argv, run directory that must stay as it was, words the error line must hold)."""
    run = root / "runs"
    return [
        ("n not a number", ["attack", "--victim", "resnet20-fmnist", "--attack", "fgsm", "--n", "abc",
                            "--out", str(run / "abc")], run / "abc", ("--n",)),
        ("latency-n negative", ATTACK + ["--out", str(run / "lat"), "--latency-n", "-1"], run / "lat",
         ("--latency-n",)),
        ("out is a file", ATTACK + ["--out", str(root / "a_file")], root / "a_file", ("a_file",)),
        ("out under a file", ATTACK + ["--out", str(root / "a_file" / "run")], root / "a_file", ("a_file",)),
        ("out in /proc", ATTACK + ["--out", "/proc/dynattack-run"], None, ("/proc",)),
        ("out empty", ATTACK + ["--out", ""], ROOT / "config.json", ("--out",)),
        ("out holds another run", ATTACK + ["--out", str(root / "existing_run")], root / "existing_run",
         ("existing_run",)),
        ("merge into a run", ["merge", str(root / "existing_run"), "--out", str(root / "existing_run")],
         root / "existing_run", ()),
        ("points beyond the dataset", ["attack", "--victim", "unet3d-rooms", "--attack", "pc-random", "--n",
                                       "100000", "--out", str(run / "rooms")], run / "rooms", ("100000",)),
        ("eval beyond the test set", ["eval", "resnet20-fmnist", "--n", "99999999", "--latency-n", "0"], None,
         ("99999999",)),
        ("nan weights", ["eval", "resnet20-fmnist", "--weights", str(root / "nan.safetensors"), "--n", "8",
                         "--latency-n", "0"], None, ("finite",)),
        ("nan weights attack", ATTACK + ["--weights", str(root / "nan.safetensors"), "--out", str(run / "nan")],
         run / "nan", ("finite",)),
        ("empty pth", ["eval", "resnet20-fmnist", "--weights", str(root / "empty.pth")], None, ("empty",)),
        ("random bytes", ["eval", "resnet20-fmnist", "--weights", str(root / "random.bin")], None,
         ("not a checkpoint",)),
        ("random bytes as pth", ["eval", "resnet20-fmnist", "--weights", str(root / "random.pth")], None,
         ("random.pth",)),
        ("truncated safetensors, no suffix", ["eval", "resnet20-fmnist", "--weights",
                                              str(root / "truncated_noext")], None, ("safetensors",)),
        ("label 200", ATTACK + ["--data", str(root / "badlabels"), "--out", str(run / "labels")], run / "labels",
         ("200",)),
        ("label 200 eval", ["eval", "resnet20-fmnist", "--data", str(root / "badlabels"), "--n", "16",
                            "--latency-n", "0"],
         None, ("200",)),
        ("eps above 1", ATTACK[:6] + ["8"] + ATTACK[7:] + ["--out", str(run / "eps")], run / "eps", ("eps",)),
        ("unknown attack", ["attack", "--victim", "resnet20-fmnist", "--attack", "nope", "--out",
                            str(run / "nope")], run / "nope", ("nope",)),
    ]


def run_case(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run([sys.executable, "-m", "dynattack", *argv], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=120)
    except subprocess.TimeoutExpired:  # unbounded work is a failure too
        return subprocess.CompletedProcess(argv, -1, "", "timed out after 120 s")


def test_bad_inputs_end_in_one_line_and_leave_the_run_directory_as_it_was(files):
    todo = cases(files)
    before = {name: snapshot(path) if path is not None else None for name, _, path, _ in todo}
    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = list(pool.map(lambda case: run_case(case[1]), todo))
    failures = []
    for (name, argv, path, words), proc in zip(todo, procs):
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        problems = []
        if proc.returncode != 2:
            problems.append(f"exit {proc.returncode}")
        if "Traceback" in proc.stderr + proc.stdout:
            problems.append("traceback")
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines")
        elif not all(w in lines[0] for w in words):
            problems.append(f"message lacks {words}")
        if path is not None and snapshot(path) != before[name]:
            problems.append(f"{path} changed")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}: {proc.stderr.strip()[-300:]!r}")
    assert not failures, "\n".join(failures)
