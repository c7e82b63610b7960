"""The run directory as the report reads it: config, summary, gate names, per-sample records,
the first batch's history and (on demand) the first inputs of the shards. Shared by the figures
and the page; loads no model, attack or dataset."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import DynattackError, first_line
from ..rundir import load_config, read_records


class Skip(Exception):
    """A part of the report whose data do not exist in this run (said in the HTML, not an error)."""


@dataclass
class Run:
    """A run directory read once; ``notes`` are what the page says about missing or unreadable parts."""

    run_dir: Path
    config: dict
    summary: dict | None
    gates: list[str]
    taus: list[float | None] | None  # per gate, when gates.json gives them
    records: list[dict]
    history: dict[str, torch.Tensor] | None
    notes: list[str] = field(default_factory=list)

    def record(self, index: int) -> dict | None:
        return self._by_index.get(int(index))

    def __post_init__(self):
        self._by_index = {int(r["index"]): r for r in self.records}

    def value(self, key: str) -> float | None:
        """A summary figure (null / missing -> None)."""
        v = (self.summary or {}).get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    def column(self, key: str) -> np.ndarray:
        """One number per record (NaN where null or absent)."""
        out = [r.get(key) for r in self.records]
        return np.array([float(v) if isinstance(v, (int, float)) and v is not None else np.nan for v in out])

    def gate_matrix(self, key: str) -> np.ndarray | None:
        """(samples, gates) execution fractions from ``gates_clean`` / ``gates_adv``; None without gates."""
        rows = [r.get(key) for r in self.records]
        if not rows or any(not isinstance(v, list) for v in rows):
            return None
        lengths = {len(v) for v in rows}
        if len(lengths) != 1 or lengths == {0}:
            return None
        return np.array(rows, dtype=float)


def _read_json(path: Path, required: bool):
    if not path.exists():
        if required:
            raise DynattackError(f"{path} is missing: not a run directory")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DynattackError(f"{path} is unreadable ({first_line(exc)}); rerun the run with --resume "
                             "to rewrite it") from None


def load_run(run_dir: Path) -> Run:
    if not run_dir.is_dir():
        raise DynattackError(f"{run_dir}: no such run directory")
    config = load_config(run_dir)
    if not isinstance(config, dict):
        raise DynattackError(f"{run_dir / 'config.json'} does not hold a run configuration")
    notes: list[str] = []
    summary = _read_json(run_dir / "summary.json", required=False)
    if summary is None:
        notes.append("summary.json is missing (the run has not finished): the figures use the finished batches.")
    elif not isinstance(summary, dict):
        raise DynattackError(f"{run_dir / 'summary.json'} does not hold a summary object")
    try:
        records = read_records(run_dir)
    except (OSError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise DynattackError(f"{run_dir / 'samples.jsonl'} is unreadable ({type(exc).__name__}: {exc})") from None
    if not records:
        notes.append("samples.jsonl holds no finished batch: no per-sample figure.")

    gates_json = _read_json(run_dir / "gates.json", required=False)
    gates, taus = [], None
    if isinstance(gates_json, list):
        for g in gates_json:  # names; entries may also be {"name": ..., "tau": ...}
            gates.append(str(g.get("name", "?")) if isinstance(g, dict) else str(g))
        if gates_json and all(isinstance(g, dict) and isinstance(g.get("tau"), (int, float)) for g in gates_json):
            taus = [float(g["tau"]) for g in gates_json]
    n_gates = max((len(r.get("gates_clean") or []) for r in records), default=0)
    if n_gates and len(gates) != n_gates:
        if gates_json is not None:
            notes.append(f"gates.json names {len(gates)} gates but the samples hold {n_gates}: gates are numbered.")
        gates, taus = [f"gate {i}" for i in range(n_gates)], None

    history = None
    path = run_dir / "history.safetensors"
    if path.exists():
        try:
            history = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            notes.append(f"history.safetensors is unreadable ({first_line(exc)}): no per-iteration figure.")
    return Run(run_dir, config, summary, gates, taus, records, history, notes)


def load_inputs(run: Run, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices, clean, adversarial) of the first ``k`` samples (lowest indices) of the shards."""
    shards = sorted((run.run_dir / "adv").glob("batch_*.safetensors"))
    if not shards:
        raise Skip("no adversarial shard in adv/")
    idx, clean, adv = [], [], []
    for path in shards:
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise Skip(f"shard {path.name} is unreadable ({first_line(exc)})") from None
        if "clean" not in t or "adv" not in t:
            raise Skip(f"shard {path.name} holds no 'clean' and 'adv' tensors")
        index = t.get("index", torch.arange(len(t["adv"])))
        idx.append(index.long())
        clean.append(t["clean"].float())
        adv.append(t["adv"].float())
        if sum(len(i) for i in idx) >= k:
            break  # shard b holds the samples after shard b-1's: no need to read a whole run for 8 pictures
    idx_t, clean_t, adv_t = torch.cat(idx), torch.cat(clean), torch.cat(adv)
    order = idx_t.argsort()[:k]
    return idx_t[order].numpy(), clean_t[order].numpy(), adv_t[order].numpy()
