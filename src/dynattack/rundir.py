"""The run directory: its files and how they are written, shared by the runner and the report.

A run directory holds (DESIGN.md):

- ``config.json``   everything that decides the result (victim, attack, parameters, data slice,
                    batch size, seed, shard); ``--resume`` refuses a directory of another config;
- ``samples.jsonl`` one line per sample, appended batch by batch;
- ``adv/batch_NNNNN.safetensors`` the adversarial inputs of each batch;
- ``history.safetensors`` per-iteration figures of the first batch (energy attacks);
- ``batches.jsonl`` one line per finished batch: its attack time and the torch thread count and
                    device that ran it (kept apart from the records, which are bit-identical
                    whatever process ran them), and a ``"batch": "fit"`` line per process that
                    fitted a universal perturbation; the summary's ``seconds`` is their sum;
- ``perturbation.safetensors`` (universal attacks only) the one perturbation every input got,
                    fitted on training images before the first batch and reused on ``--resume``;
- ``merge.json``    (merged runs only) the sources of the merge, written first, so that an
                    interrupted merge is recognised and finished, and nothing else is merged over;
- ``summary.json``, ``gates.json``, ``report.html``, ``figures/``.

Every file except the ``.jsonl`` ones is written to a temporary name and renamed; a failed append
is cut back. A batch counts as done when its shard exists and all its sample lines are in
samples.jsonl. A write that fails (full disk, read-only place) is one DynattackError.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import DynattackError, first_line

SUMMARY_KEYS = (
    "victim", "attack", "n", "clean_acc", "adv_acc", "flops_full", "flops_clean", "flops_adv", "recovery_pct",
    "recovery_pct_mean", "psnr_db", "linf", "l2", "arch_change_pct", "miou_clean", "miou_adv",
    "latency_clean_ms", "latency_adv_ms", "latency_full_ms", "iterations_mean", "seconds",
    # multi-exit victims (null for the others): exit rates per exit, final classifier last, and
    # DeepSloth's early-exit efficacy (metrics.early_exit_efficacy)
    "exit_rates_clean", "exit_rates_adv", "early_exit_efficacy_clean", "early_exit_efficacy_adv",
)
TIMING_KEYS = ("latency_clean_ms", "latency_adv_ms", "latency_full_ms", "seconds")


@dataclass
class RunConfig:
    """What decides a run's result; two runs with equal configs give equal results."""

    victim: str
    attack: str
    params: dict = field(default_factory=dict)
    dataset: str = "fashion-mnist"
    split: str = "test"
    offset: int = 0
    n: int = 100
    batch_size: int = 50
    seed: int = 0
    weights: str | None = None
    shard: tuple[int, int] = (0, 1)

    def batches(self) -> list[tuple[int, int, int]]:
        """(batch index, start, stop) of this shard's batches; batch b belongs to shard b mod n."""
        i, n = self.shard
        out = []
        for b, start in enumerate(range(self.offset, self.offset + self.n, self.batch_size)):
            if b % n == i:
                out.append((b, start, min(start + self.batch_size, self.offset + self.n)))
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d["shard"] = list(self.shard)
        return d


def batch_seed(seed: int, batch: int) -> int:
    return (seed * 1_000_003 + batch) % (2**63)


# ----------------------------------------------------------------------------- files


def output_dir(out: str | Path) -> Path:
    """``out`` as a run directory that can be written, checked before anything is loaded or run:
    not empty text (that would be the current directory), not a file, not under a file, and a
    file can be created there (read-only mounts, /proc). Creates nothing."""
    if not str(out).strip():
        raise DynattackError("--out is empty: name a run directory")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DynattackError(f"--out {out} is a file, not a directory")
    place = out
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise DynattackError(f"--out {out} is under {place}, which is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dynattack-probe-", dir=place)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DynattackError(f"--out {out}: cannot write in {place} ({exc.strerror or exc})") from None
    return out


@contextlib.contextmanager
def writing(path: Path):
    """A failed write (OSError, or safetensors' own error type) becomes one DynattackError."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise DynattackError(f"cannot write {path}: {reason}; what was finished is kept: free space, then rerun "
                             "the same command (attack: with --resume)") from None


def make_dirs(*paths: Path) -> None:
    for path in paths:
        with writing(path):
            path.mkdir(parents=True, exist_ok=True)


def _replace_from_tmp(path: Path, write_tmp) -> None:
    """``write_tmp(tmp)`` then rename: a reader never sees half a file; the tmp goes on failure."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path):
        try:
            write_tmp(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def write_atomic(path: Path, data: bytes | str) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())

    _replace_from_tmp(path, write)


def save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _replace_from_tmp(path, lambda tmp: save_file(tensors, str(tmp)))


def copy_atomic(src: Path, dst: Path) -> None:
    _replace_from_tmp(dst, lambda tmp: shutil.copyfile(src, tmp))


def _json_value(v):
    """Numbers for JSON; NaN and inf become null (DESIGN.md: null where it does not apply)."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def append_lines(path: Path, records: list[dict]) -> None:
    """Append one JSON line per record; a failed append is cut back to the lines before it."""
    text = "".join(json.dumps({k: _json_value(v) for k, v in r.items()}) + "\n" for r in records)
    size = path.stat().st_size if path.exists() else 0
    with writing(path):
        try:
            with open(path, "a") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                os.truncate(path, size)
            raise


def shard_path(run_dir: Path, batch: int) -> Path:
    return Path(run_dir) / "adv" / f"batch_{batch:05d}.safetensors"


def shard_holds(path: Path, indices: list[int]) -> bool:
    """Whether the shard loads (its header covers the file) and holds exactly these samples'
    inputs; reads the header and the index tensor only."""
    try:
        with safe_open(str(path), "pt") as f:
            if not {"adv", "clean", "index"} <= set(f.keys()):
                return False
            rows = [f.get_slice(k).get_shape()[:1] for k in ("adv", "clean")]
            return rows == [[len(indices)]] * 2 and f.get_tensor("index").tolist() == list(indices)
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False


def read_records(run_dir: Path) -> list[dict]:
    """The complete batches' sample records (partial tails dropped), sorted by sample index."""
    by_batch: dict[int, list[dict]] = {}
    for rec in read_lines(run_dir / "samples.jsonl"):
        by_batch.setdefault(rec["batch"], []).append(rec)
    done = []
    for b, recs in by_batch.items():
        if len(recs) == recs[0]["batch_size"] and shard_path(run_dir, b).exists():
            done.extend(recs)
    return sorted(done, key=lambda r: r["index"])


def load_config(run_dir: Path) -> dict:
    """config.json of a run directory, checked to hold every field of a :class:`RunConfig`."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DynattackError(f"{run_dir} is not a readable run directory ({exc})") from None
    missing = [f for f in RunConfig.__dataclass_fields__ if not isinstance(config, dict) or f not in config]
    if missing:
        raise DynattackError(f"{run_dir}/config.json is not a dynattack run configuration "
                             f"(missing {', '.join(missing)})")
    return config


def load_adversarial(run_dir: Path, indices: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, adversarial inputs) of a run directory, sorted by sample index."""
    idx, adv = [], []
    for path in sorted((Path(run_dir) / "adv").glob("batch_*.safetensors")):
        try:
            t = load_file(str(path))
        except Exception as exc:  # a truncated shard: report, do not crash deep inside
            raise DynattackError(f"shard {path} is corrupt ({first_line(exc)}); delete it and --resume") from None
        idx.append(t["index"])
        adv.append(t["adv"])
    if not idx:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    idx, adv = torch.cat(idx), torch.cat(adv)
    order = idx.argsort()
    idx, adv = idx[order], adv[order]
    if indices is not None:
        keep = torch.isin(idx, torch.tensor(indices))
        idx, adv = idx[keep], adv[keep]
    return idx, adv


def read_lines(path: Path) -> list[dict]:
    """The whole JSON lines of a .jsonl file (a line cut by a kill is dropped)."""
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def attack_seconds(run_dir: Path, records: list[dict]) -> float | None:
    """Attack time of the finished batches summed over every process that ran them (resumed,
    sharded, torchrun); the last time of a batch that was redone; plus every process's fit of a
    universal perturbation (lines ``"batch": "fit"``). None where none is recorded."""
    done = {r["batch"] for r in records}
    lines = read_lines(Path(run_dir) / "batches.jsonl")
    seconds = {b["batch"]: b["seconds"] for b in lines if b["batch"] in done}
    fits = [b["seconds"] for b in lines if b["batch"] == "fit"]
    return sum(seconds.values()) + sum(fits) if seconds else None
