"""`dynattack diagnose RUN_DIR`: :func:`dynattack.diagnostics.diagnose` on a finished energy run.

Reads the run's configuration and adversarial shards, reloads its victim and clean images the
way the run did, and writes ``diagnostics.json`` and ``diagnostics.md`` into the run directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import DynattackError
from .rundir import load_adversarial, load_config, write_atomic

OUTPUTS = ("diagnostics.json", "diagnostics.md")


def diagnose_run(run_dir, n: int = 50, probe_steps: int = 50, data=None, device: str = "cpu") -> dict:
    """Diagnose the first ``n`` samples of an energy run; returns the headline figures."""
    from .attacks import ATTACKS, EnergyAttack
    from .data.point_batch import POINT_DATASETS
    from .diagnostics import diagnose, json_safe
    from .runner import _load_victim_and_data

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DynattackError(f"{run_dir} is not a directory")
    if n <= 0 or probe_steps < 0:
        raise DynattackError(f"--n must be > 0 and --probe-steps >= 0, got {n} and {probe_steps}")
    config = load_config(run_dir)
    cls = ATTACKS.get(config["attack"])
    if cls is None or not issubclass(cls, EnergyAttack) or config["dataset"] in POINT_DATASETS:
        raise DynattackError(f"{run_dir} is a run of {config['attack']} on {config['dataset']}: diagnose reads the "
                             f"runs of an energy attack on images")
    idx, adv = load_adversarial(run_dir)
    if not len(idx):
        raise DynattackError(f"{run_dir} holds no adversarial shard (adv/batch_*.safetensors): nothing to diagnose")
    idx, adv = idx[:n], adv[:n]
    model, images, _ = _load_victim_and_data(config["victim"], config.get("weights"), data, device, config["dataset"],
                                             count=config["offset"] + config["n"])
    if int(idx.max()) >= len(images):
        raise DynattackError(f"{run_dir}: sample index {int(idx.max())} is past the {len(images)} images of "
                             f"{config['dataset']}")
    clean = images[idx].to(device)
    adv = adv.to(device=device, dtype=clean.dtype)
    if adv.shape != clean.shape:
        raise DynattackError(f"{run_dir}: adversarial inputs of shape {tuple(adv.shape[1:])}, the victim's images "
                             f"are {tuple(clean.shape[1:])}")
    with torch.inference_mode(False):
        d = diagnose(model, clean, adv, probe_steps=probe_steps)
    title = f"{config['victim']}, {config['attack']}: samples {int(idx[0])}-{int(idx[-1])} ({len(idx)})"
    blob = {"victim": config["victim"], "attack": config["attack"], "indices": idx.tolist(), **d.to_json()}
    write_atomic(run_dir / OUTPUTS[0], json.dumps(json_safe(blob), indent=1) + "\n")
    write_atomic(run_dir / OUTPUTS[1], d.markdown(title))
    f = d.flops
    return {"samples": len(idx), "recovery vs full %": f["recovery_full"],
            "recovery vs reachable %": f["recovery_reachable"], "reachable % of full": f["reachable_pct_of_full"],
            "units never on": f"{f['unreachable_units']} of {f['units']}",
            "all-on at end": d.together["natural_all_on_end"], "written": ", ".join(str(run_dir / o) for o in OUTPUTS)}
