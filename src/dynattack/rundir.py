"""The run directory: its files and how they are written, shared by the runner and the report.

A run directory holds (DESIGN.md):

- ``config.json``   everything that decides the result (victim, attack, parameters, data slice,
                    batch size, seed, shard); ``--resume`` refuses a directory of another config;
- ``samples.jsonl`` one line per sample, appended batch by batch;
- ``adv/batch_NNNNN.safetensors`` the adversarial inputs of each batch;
- ``history.safetensors`` per-iteration figures of the first batch (energy attacks);
- ``summary.json``, ``gates.json``, ``report.html``, ``figures/``.

Every file except samples.jsonl is written to a temporary name and renamed. A batch counts as
done when its shard exists and all its sample lines are in samples.jsonl.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import DynattackError

SUMMARY_KEYS = (
    "victim", "attack", "n", "clean_acc", "adv_acc", "flops_full", "flops_clean", "flops_adv", "recovery_pct",
    "recovery_pct_mean", "psnr_db", "linf", "l2", "arch_change_pct", "miou_clean", "miou_adv",
    "latency_clean_ms", "latency_adv_ms", "latency_full_ms", "iterations_mean", "seconds",
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


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DynattackError(f"cannot write {path}: {exc.strerror or exc}; finished batches are kept, "
                             "free space and rerun with --resume") from None


def save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DynattackError(f"cannot write {path}: {exc.strerror or exc}; finished batches are kept, "
                             "free space and rerun with --resume") from None


def _json_value(v):
    """Numbers for JSON; NaN and inf become null (DESIGN.md: null where it does not apply)."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def append_lines(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps({k: _json_value(v) for k, v in r.items()}) + "\n" for r in records)
    try:
        with open(path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise DynattackError(f"cannot write {path}: {exc.strerror or exc}; finished batches are kept, "
                             "free space and rerun with --resume") from None


def read_records(run_dir: Path) -> list[dict]:
    """The complete batches' sample records (partial tails dropped), sorted by sample index."""
    path = run_dir / "samples.jsonl"
    if not path.exists():
        return []
    by_batch: dict[int, list[dict]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        by_batch.setdefault(rec["batch"], []).append(rec)
    done = []
    for b, recs in by_batch.items():
        if len(recs) == recs[0]["batch_size"] and (run_dir / "adv" / f"batch_{b:05d}.safetensors").exists():
            done.extend(recs)
    return sorted(done, key=lambda r: r["index"])


def load_config(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DynattackError(f"{run_dir} is not a readable run directory ({exc})") from None


def load_adversarial(run_dir: Path, indices: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, adversarial inputs) of a run directory, sorted by sample index."""
    idx, adv = [], []
    for path in sorted((Path(run_dir) / "adv").glob("batch_*.safetensors")):
        try:
            t = load_file(str(path))
        except Exception as exc:  # a truncated shard: report, do not crash deep inside
            raise DynattackError(f"shard {path} is corrupt ({str(exc).splitlines()[0]}); delete it and --resume") from None
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
