"""Dataset-level attack runs that survive a crash and spread over processes.

A run directory holds (DESIGN.md):

- ``config.json``   everything that decides the result (victim, attack, parameters, data slice,
                    batch size, seed, shard); ``--resume`` refuses a directory of another config;
- ``samples.jsonl`` one line per sample, appended batch by batch;
- ``adv/batch_NNNNN.safetensors`` the adversarial inputs of each batch;
- ``batches.jsonl`` each finished batch's attack time, thread count and device;
- ``perturbation.safetensors`` a universal attack's one perturbation (fitted first);
- ``summary.json``  the aggregate figures, written at the end.

Its files and their atomic writes live in :mod:`dynattack.rundir`. Resume drops any partial
tail and redoes only unfinished batches (and those whose shard does not load or does not hold
the batch's rows). Each batch is attacked with a seed derived from
(run seed, batch index) alone, so a resumed, sharded or multi-process run gives bit-identical
per-sample results and summary to one uninterrupted process (timings aside).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import cost, metrics
from .errors import DynattackError, first_line
from .gates import Trace
from .prediction import prediction
from .rundir import (SUMMARY_KEYS, TIMING_KEYS, RunConfig, _json_value, append_lines, attack_seconds,  # noqa: F401
                     batch_seed, copy_atomic, load_adversarial, load_config, make_dirs, output_dir, read_lines,
                     read_records, save_shard, shard_holds, shard_path, write_atomic)

# ----------------------------------------------------------------------------- measuring


def per_sample_records(model, config: RunConfig, batch: int, start: int, images, labels, res) -> list[dict]:
    """One record per sample, measured on the hard network from (clean, adversarial) alone."""
    with torch.no_grad(), Trace() as t_clean:
        clean_logits = prediction(model, model(images))
    with torch.no_grad(), Trace() as t_adv:
        adv_logits = prediction(model, model(res.adv))
    if len(t_clean):
        d_clean, d_adv = t_clean.flat("decision"), t_adv.flat("decision")
        changed, units = (d_clean != d_adv).sum(1), torch.full((len(images),), d_clean.shape[1])
    else:
        changed = units = torch.zeros(len(images), dtype=torch.long)
    gates_clean, gates_adv = _gate_on_fractions(t_clean, len(images)), _gate_on_fractions(t_adv, len(images))
    exits = _exit_records(model, t_clean, t_adv, len(images))
    psnr = metrics.psnr(images, res.adv)
    records = []
    for k in range(len(images)):
        records.append({
            "index": start + k, "batch": batch, "batch_size": len(images), "label": int(labels[k]),
            "clean_pred": int(clean_logits[k].argmax()), "adv_pred": int(adv_logits[k].argmax()),
            "flops_full": float(res.flops_full[k]), "flops_clean": float(res.flops_clean[k]),
            "flops_adv": float(res.flops_adv[k]), "recovery": float(res.recovery[k]),
            "psnr": float(psnr[k]), "l2": float(res.l2[k]), "linf": float(res.linf[k]),
            "iterations": int(res.iterations[k]), "success": bool(res.success[k]),
            "units_changed": int(changed[k]), "units": int(units[k]),
            "gates_clean": gates_clean[k].tolist(), "gates_adv": gates_adv[k].tolist(),
            **{key: (None if v is None else v[k]) for key, v in exits.items()},
        })
    return records


EXIT_FIELDS = ("exits", "exit_clean", "exit_adv", "efficacy_clean", "efficacy_adv")


def _exit_records(model, t_clean: Trace, t_adv: Trace, n: int) -> dict[str, list | None]:
    """Per-sample exit figures of a multi-exit victim (:func:`metrics.exit_chain`; all None for
    the others): the number of exits (the final classifier included), the exit each run stopped
    at, and its share of DeepSloth's early-exit efficacy (:func:`metrics.sample_efficacy`)."""
    none = {key: None for key in EXIT_FIELDS}
    if not len(t_clean):
        return none
    prof = cost.profile(model)
    idx_clean, idx_adv = metrics.exit_index(t_clean, prof.parents), metrics.exit_index(t_adv, prof.parents)
    fractions = metrics.exit_cost_fractions(t_clean, prof.full, prof.parents)
    if idx_clean is None or idx_adv is None or fractions is None:
        return none
    return {"exits": [len(fractions)] * n, "exit_clean": idx_clean.tolist(), "exit_adv": idx_adv.tolist(),
            "efficacy_clean": metrics.sample_efficacy(idx_clean, fractions).tolist(),
            "efficacy_adv": metrics.sample_efficacy(idx_adv, fractions).tolist()}


def _exit_summary(records: list[dict]) -> dict:
    """``exit_rates_clean`` / ``exit_rates_adv`` (share of the samples stopping at each exit, the
    final classifier last) and ``early_exit_efficacy_clean`` / ``_adv`` (DeepSloth's area under the
    early-exit capability curve: the mean of the samples' shares, :func:`metrics.sample_efficacy`);
    None for victims without exits."""
    out = {"exit_rates_clean": None, "exit_rates_adv": None, "early_exit_efficacy_clean": None,
           "early_exit_efficacy_adv": None}
    if not records or any(r.get("exits") is None for r in records):
        return out
    k = records[0]["exits"]
    for tag in ("clean", "adv"):
        out[f"exit_rates_{tag}"] = metrics.exit_rates(torch.tensor([r[f"exit_{tag}"] for r in records]), k)
        out[f"early_exit_efficacy_{tag}"] = float(torch.tensor([r[f"efficacy_{tag}"] for r in records],
                                                               dtype=torch.float64).mean())
    return out


def _gate_on_fractions(trace: Trace, n: int) -> torch.Tensor:
    """(n, gates): fraction of each gate's units that ran, per sample (for execution-rate maps)."""
    if not len(trace):
        return torch.zeros(n, 0)
    return torch.stack([e.full("decision", n, False).reshape(n, -1).double().mean(1) for e in trace], 1).cpu()


def summarize(records: list[dict], config: dict) -> dict:
    """summary.json from sample records (same records -> same summary, bit for bit)."""
    if records and "inter_adv" in records[0]:
        return summarize_points(records, config)

    def col(key):
        return torch.tensor([r[key] if r[key] is not None else math.nan for r in records], dtype=torch.float64)

    n = len(records)
    label = col("label")
    clean_ok = col("clean_pred") == label
    f_full, f_clean, f_adv = col("flops_full"), col("flops_clean"), col("flops_adv")
    per = cost.recovery_per_sample(f_clean, f_adv, f_full)
    per = per[~torch.isnan(per)]
    psnr_db, _ = metrics.psnr_mean(col("psnr"))  # identical images (infinite PSNR) are left out
    units = col("units")[clean_ok].sum()
    summary = {
        "victim": config["victim"],
        "attack": config["attack"],
        "n": n,
        "clean_acc": float(clean_ok.double().mean()),
        "adv_acc": float((col("adv_pred") == label).double().mean()),
        "flops_full": float(f_full.mean()),
        "flops_clean": float(f_clean.mean()),
        "flops_adv": float(f_adv.mean()),
        "recovery_pct": cost.recovery_aggregate(f_clean, f_adv, f_full),
        "recovery_pct_mean": float(per.mean()) if len(per) else None,
        "psnr_db": None if math.isnan(psnr_db) else psnr_db,
        "linf": float(col("linf").mean()),
        "l2": float(col("l2").mean()),
        # SkipNet definition: differing (sample, unit) decisions over the originally correct samples
        "arch_change_pct": float(col("units_changed")[clean_ok].sum() / units * 100) if units > 0 else None,
        "miou_clean": None,
        "miou_adv": None,
        "latency_clean_ms": None,
        "latency_adv_ms": None,
        "latency_full_ms": None,
        "iterations_mean": float(col("iterations").mean()),
        "seconds": None,
    }
    summary = {k: _json_value(v) for k, v in summary.items()}
    exits = _exit_summary(records)
    summary.update({k: v if v is None or isinstance(v, list) else _json_value(v) for k, v in exits.items()})
    return summary


# ----------------------------------------------------------------------------- the run


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A directory that holds a run is only continued with --resume; one that holds anything else
    (a temporary file of a killed write aside) is never written into."""
    if (run_dir / "config.json").exists():
        if not resume:
            raise DynattackError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    elif run_dir.is_dir() and any(not (p.name.startswith(".") and p.name.endswith(".tmp")) for p in run_dir.iterdir()):
        raise DynattackError(f"--out {run_dir} is not empty and holds no run: choose another --out")


def prepare_run_dir(run_dir: Path, config: RunConfig, resume: bool) -> None:
    check_run_dir(run_dir, resume)
    make_dirs(run_dir)
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        if load_config(run_dir) != config.to_json():
            raise DynattackError(f"--resume: {run_dir} was written by another configuration (see its config.json)")
    else:
        write_atomic(cfg_path, json.dumps(config.to_json(), indent=2) + "\n")  # first: the directory is a run now
    make_dirs(run_dir / "adv")
    # Keep the lines of batches that are done and whose shard holds their rows (a shard truncated
    # by a full disk or a copy is redone), so appends continue a clean file.
    path = run_dir / "samples.jsonl"
    if path.exists():
        records = read_records(run_dir)
        by_batch: dict[int, list[int]] = {}
        for r in records:
            by_batch.setdefault(r["batch"], []).append(r["index"])
        bad = {b for b, indices in by_batch.items() if not shard_holds(shard_path(run_dir, b), indices)}
        records = [r for r in records if r["batch"] not in bad]
        text = "".join(json.dumps(r) + "\n" for r in records)
        if text != path.read_text():
            write_atomic(path, text)


PERTURBATION_FILE = "perturbation.safetensors"


def fit_universal(attack, run_dir: Path, train_images: torch.Tensor | None) -> None:
    """An attack fitted once on training images (a universal perturbation): read its perturbation
    back from the run directory (``--resume``), else fit it and write it before the first batch."""
    from safetensors.torch import load_file

    path = Path(run_dir) / PERTURBATION_FILE
    if path.exists():
        try:
            delta = load_file(str(path))["perturbation"]
        except Exception as exc:  # SafetensorError, KeyError: a torn or foreign file
            raise DynattackError(f"{path} is not a perturbation this run wrote ({first_line(exc)}): remove it to "
                                 f"fit again") from None
        attack.set_perturbation(delta)
        return
    if train_images is None:
        raise DynattackError(f"{attack.name} fits one perturbation on training images: none were given")
    device = next(attack.model.parameters()).device
    t0 = time.perf_counter()
    save_shard(path, {"perturbation": attack.fit(train_images[:attack.train_n].to(device))})
    append_lines(Path(run_dir) / "batches.jsonl", [{"batch": "fit", "seconds": time.perf_counter() - t0,
                                                    "threads": torch.get_num_threads(), "device": str(device)}])


def run_attack(model, attack, config: RunConfig, images: torch.Tensor, labels: torch.Tensor, run_dir: Path,
               resume: bool = False, progress: bool = True, train_images: torch.Tensor | None = None) -> list[dict]:
    """Attack this shard's pending batches of ``images[offset:offset+n]``; returns all records.
    An attack with ``fit`` (universal) is first fitted on ``train_images`` (see :func:`fit_universal`)."""
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, config, resume)
    if hasattr(attack, "fit"):
        fit_universal(attack, run_dir, train_images)
    done = {r["batch"] for r in read_records(run_dir)}
    pending = [b for b in config.batches() if b[0] not in done]
    device = next(model.parameters()).device
    bar = tqdm(pending, desc=f"{config.attack} on {config.victim}", unit="batch", disable=not progress)
    for b, start, stop in bar:
        t0 = time.perf_counter()
        x = images[start:stop].to(device)
        y = labels[start:stop].to(device)
        attack.seed = batch_seed(config.seed, b)
        attack.history = b == 0  # per-iteration figures of the first batch, for the report
        res = attack(x, y)
        if res.history is not None:
            history = {k: v.double() if v.dtype != torch.bool else v for k, v in res.history.items()}
            save_shard(run_dir / "history.safetensors", {**history, "index": torch.arange(start, stop)})
        save_shard(shard_path(run_dir, b), {"adv": res.adv, "clean": x, "index": torch.arange(start, stop)})
        records = point_sample_records if y.dim() > 1 else per_sample_records  # per-point labels: segmentation
        append_lines(run_dir / "samples.jsonl", records(model, config, b, start, x, y, res))
        append_lines(run_dir / "batches.jsonl", [{"batch": b, "seconds": time.perf_counter() - t0,
                                                  "threads": torch.get_num_threads(), "device": str(device)}])
    return read_records(run_dir)


def finish_run(model, run_dir: Path, images: torch.Tensor, latency_n: int = 20, report: bool = True) -> dict:
    """Write summary.json (with batch-1 latency on the first ``latency_n`` samples and the attack
    time of all the run's processes), gates.json and the report (report.html, figures/)."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    records = read_records(run_dir)
    if not records:
        raise DynattackError(f"{run_dir} holds no finished sample")
    summary = summarize(records, config)
    if latency_n > 0:
        device = next(model.parameters()).device
        idx, adv = load_adversarial(run_dir, [r["index"] for r in records[:latency_n]])
        clean = images[idx].to(device)
        lat = cost.batch1_latency_ms(model, {"clean": (clean, None), "adv": (adv.to(device), None), "full": (clean, "on")})
        for key, ms in lat.items():
            summary[f"latency_{key}_ms"] = ms
    summary["seconds"] = attack_seconds(run_dir, records)
    device = next(model.parameters()).device
    with torch.no_grad(), Trace() as trace:
        model(images[:1].to(device))
    gates = [{"name": e.name, "tau": e.tau, "units": e.units} for e in trace]
    write_atomic(run_dir / "gates.json", json.dumps(gates) + "\n")
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if report:
        from .report import write_report

        write_report(run_dir)
    return summary


def merge_runs(shard_dirs: list[Path], out_dir: Path) -> Path:
    """Merge shard run directories of one configuration into ``out_dir`` (summary left to finish_run).

    ``out_dir`` must be empty (the source directories may lie inside it, as torchrun's ranks do)
    or hold an unfinished merge of the same sources, recognised by its merge.json, written first:
    nothing of another run is ever kept beside the merged files."""
    shard_dirs = [Path(d) for d in shard_dirs]
    configs = [load_config(d) for d in shard_dirs]
    base = {k: v for k, v in configs[0].items() if k != "shard"}
    for d, c in zip(shard_dirs, configs):
        if {k: v for k, v in c.items() if k != "shard"} != base:
            raise DynattackError(f"cannot merge {d}: its config differs from {shard_dirs[0]}'s beyond the shard")
    counts = {c["shard"][1] for c in configs}
    got = sorted(c["shard"][0] for c in configs)
    if len(counts) != 1 or got != list(range(counts.pop())):
        raise DynattackError(f"cannot merge: expected shards 0..n-1 of one split, got {[c['shard'] for c in configs]}")
    out_dir = Path(out_dir)
    config = RunConfig(**{**base, "shard": (0, 1)})
    per_dir = {d: read_records(d) for d in shard_dirs}
    records = sorted((r for recs in per_dir.values() for r in recs), key=lambda r: r["index"])
    missing = {b for b, _, _ in config.batches()} - {r["batch"] for r in records}
    if missing:
        raise DynattackError(f"cannot merge: batches {sorted(missing)[:10]} are missing (resume those shards first)")
    indices: dict[int, list[int]] = {}
    for r in records:
        indices.setdefault(r["batch"], []).append(r["index"])
    sources = {d: sorted({r["batch"] for r in recs}) for d, recs in per_dir.items()}
    for d, batches in sources.items():
        for b in batches:
            if not shard_holds(shard_path(d, b), indices[b]):
                raise DynattackError(f"cannot merge: shard {shard_path(d, b)} is corrupt or does not hold batch {b}'s "
                                     f"samples; rerun that shard with --resume")
    record = {"config": config.to_json(),
              "sources": [{"dir": str(d.resolve()), "shard": c["shard"],
                           "shards": {shard_path(d, b).name: shard_path(d, b).stat().st_size for b in sources[d]}}
                          for d, c in zip(shard_dirs, configs)]}
    _check_merge_target(out_dir, shard_dirs, record)
    make_dirs(out_dir / "adv")
    write_atomic(out_dir / "merge.json", json.dumps(record, indent=2) + "\n")
    write_atomic(out_dir / "config.json", json.dumps(config.to_json(), indent=2) + "\n")
    for d, batches in sources.items():
        for b in batches:
            copy_atomic(shard_path(d, b), shard_path(out_dir, b))
    fitted = [(d / PERTURBATION_FILE).read_bytes() for d in shard_dirs if (d / PERTURBATION_FILE).exists()]
    if fitted and (len(fitted) != len(shard_dirs) or len(set(fitted)) != 1):
        raise DynattackError(f"cannot merge: the shards do not hold one and the same {PERTURBATION_FILE} (each "
                             f"fitted its own): run shard 0 first and copy its file into the other shards' run "
                             f"directories before they start")
    if fitted:
        copy_atomic(shard_dirs[0] / PERTURBATION_FILE, out_dir / PERTURBATION_FILE)
    first = next(d for d, c in zip(shard_dirs, configs) if c["shard"][0] == 0)  # holds batch 0 and its history
    if (first / "history.safetensors").exists():
        copy_atomic(first / "history.safetensors", out_dir / "history.safetensors")
    timing = [t for d in shard_dirs for t in read_lines(d / "batches.jsonl")]
    write_atomic(out_dir / "batches.jsonl", "".join(json.dumps(t) + "\n" for t in timing))
    write_atomic(out_dir / "samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return out_dir


def _check_merge_target(out_dir: Path, shard_dirs: list[Path], record: dict | None) -> None:
    """Refuse an ``out_dir`` that holds anything but the sources themselves, unless it is the
    unfinished merge ``record`` (None: any merge of these sources, checked again when merging)."""
    if not out_dir.is_dir():
        return
    sources = [d.resolve() for d in shard_dirs]
    others = [p for p in out_dir.iterdir() if not any(s == p.resolve() or p.resolve() in s.parents for s in sources)]
    if not others:
        return
    try:
        previous = json.loads((out_dir / "merge.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise DynattackError(f"--out {out_dir} is not empty and holds no merge of these shards: choose another "
                             "--out or remove the directory") from None
    if record is None:
        same = sorted(s["dir"] for s in previous.get("sources", [])) == sorted(map(str, sources))
    else:
        same = previous == record
    if not same:
        raise DynattackError(f"--out {out_dir} holds the merge of other shards or of another state of them (see its "
                             "merge.json): choose another --out or remove the directory")


# ----------------------------------------------------------------------------- command-line glue


def build_attack(name: str, model, params: dict, progress: bool = True):
    """An attack by registry name; unknown names and parameters are one clear error."""
    import inspect

    from .attacks import ATTACKS

    if name not in ATTACKS:
        raise DynattackError(f"unknown attack {name!r}; known attacks: {', '.join(sorted(ATTACKS))}")
    cls = ATTACKS[name]
    known = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            known |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "model", "kw", "kwargs")}
    unknown = sorted(set(params) - known)
    if unknown:
        raise DynattackError(f"unknown parameter(s) {', '.join(unknown)} for {name}; known: {', '.join(sorted(known))}")
    try:
        return cls(model, **{"progress": progress, **params})
    except TypeError as exc:
        raise DynattackError(f"{name}: {exc}") from None


def _load_victim_and_data(victim: str, weights, data, device: str, dataset: str, count: int | None = None):
    """Victim, inputs and labels, checked against each other (shape, range, the victim's classes)
    before anything is written."""
    from .data import check_labels, load_dataset
    from .data.point_batch import POINT_DATASETS
    from .models import create_model, get_spec, victim_classes

    if dataset in POINT_DATASETS:  # the first `count` scenes (see the point-cloud section)
        return _load_victim_and_points(victim, weights, device, dataset, count)
    model = create_model(victim, weights=weights, device=device)
    spec = get_spec(victim)
    # the victim's own reader options (an ImageNet victim's resize and centre crop) on its own dataset
    images, labels = load_dataset(dataset, None, data, **(spec.data_args if dataset == spec.dataset else {}))[:2]
    if tuple(images.shape[1:]) != tuple(model.input_shape):
        raise DynattackError(f"{victim} takes inputs of shape {tuple(model.input_shape)}, the data has "
                             f"{tuple(images.shape[1:])} (wrong channel count or size)")
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise DynattackError("the images must be finite and in [0, 1]")
    check_labels(labels, victim_classes(model, images[:1]), f"the {dataset} data for {victim}")
    return model, images, labels


def _train_images(victim: str, dataset: str, data, attack) -> torch.Tensor:
    """The first ``attack.train_n`` training images of the victim's dataset, read like its test
    images (a universal perturbation is fitted on them and evaluated on the test images)."""
    from .data import load_dataset
    from .data.point_batch import POINT_DATASETS
    from .models import get_spec

    if dataset in POINT_DATASETS:
        raise DynattackError(f"{attack.name} fits one perturbation on training images; point-cloud victims have none")
    spec = get_spec(victim)
    images = load_dataset(dataset, "train", data, **(spec.data_args if dataset == spec.dataset else {})).images
    if len(images) < attack.train_n:
        raise DynattackError(f"{attack.name}: train_n={attack.train_n} exceeds the {len(images)} training images")
    return images[:attack.train_n]


def run_cli_attack(*, victim, attack, params, out, n, offset, batch_size, seed, resume, shard, latency_n,
                   weights, data, device, progress, dataset: str | None = None, threads: int | None = None) -> dict | None:
    """`dynattack attack`: one process, one shard, or every rank of a torchrun job. ``threads``:
    torch CPU threads of each process (None: as the environment says; torchrun says 1)."""
    out = output_dir(out)
    if n <= 0 or offset < 0 or batch_size <= 0:
        raise DynattackError("--n and --batch-size must be > 0 and --offset >= 0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    run_dir = out / "ranks" / f"rank{rank}" if world > 1 else out
    # Fail fast, before the victim and the data are loaded: the resume config check needs them.
    check_run_dir(run_dir, resume)
    if world > 1:
        _check_merge_target(out, [out / "ranks" / f"rank{r}" for r in range(world)], None)
    if threads is not None:
        torch.set_num_threads(threads)
    if world > 1:
        import torch.distributed as dist

        if shard != (0, 1):
            raise DynattackError("--shard and torchrun split the data each their own way: use one of them")
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        shard = (rank, world)
    try:
        from .models import get_spec

        dataset = dataset or get_spec(victim).dataset
        model, images, labels = _load_victim_and_data(victim, weights, data, device, dataset, count=offset + n)
        if offset + n > len(images):
            raise DynattackError(f"--offset {offset} + --n {n} exceeds the {len(images)} test images")
        atk = build_attack(attack, model, params, progress and rank == 0)
        train_images = _train_images(victim, dataset, data, atk) if hasattr(atk, "fit") else None
        config = RunConfig(victim=victim, attack=attack, params=atk.params(), dataset=dataset, offset=offset, n=n,
                           batch_size=batch_size, seed=seed, weights=str(weights) if weights else None, shard=shard,
                           split=_split(dataset))
        run_attack(model, atk, config, images, labels, run_dir, resume=resume, progress=progress and rank == 0,
                   train_images=train_images)
        if world > 1:
            dist.barrier()
            summary = None
            if rank == 0:
                merge_runs([out / "ranks" / f"rank{r}" for r in range(world)], out)
                summary = finish_run(model, out, images, latency_n)
            dist.barrier()
            return summary
        return finish_run(model, out, images, latency_n)
    finally:
        if world > 1:
            dist.destroy_process_group()


def merge_cli(shards, out, latency_n, data, device) -> dict:
    out = output_dir(out)
    merge_runs(shards, out)
    config = load_config(out)
    model, images, _ = _load_victim_and_data(config["victim"], config.get("weights"), data, device, config["dataset"],
                                             count=config["offset"] + config["n"])
    return finish_run(model, out, images, latency_n)


# ----------------------------------------------------------------------------- point clouds
# Segmentation runs on point batches (dynattack.data.point_batch): labels are per point, so a
# record holds its scene's per-class point counts, from which summarize_points pools the mIoU of
# the whole dataset (the paper's figure), and the scene's own mIoU.


def _split(dataset: str) -> str:
    from .data.point_batch import POINT_DATASETS, SYNTHETIC_EVAL_SPLIT

    return SYNTHETIC_EVAL_SPLIT if dataset in POINT_DATASETS else "test"


def _load_victim_and_points(victim: str, weights, device: str, dataset: str, count: int):
    from .data import check_labels
    from .data.point_batch import load_point_dataset
    from .data.points import IGNORE_LABEL
    from .models import create_model, victim_classes

    batch = load_point_dataset(dataset, count)  # refuses more scenes than the split holds before building any
    model = create_model(victim, weights=weights, device=device)
    check_labels(batch.labels, victim_classes(model, batch.points[:1]), f"the {dataset} scenes for {victim}",
                 ignore_index=IGNORE_LABEL)
    return model, batch.points, batch.labels


def _class_counts(pred: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """(S, k) per scene: correctly predicted, predicted and true points of each class."""
    s = labels.shape[0]
    keep = labels >= 0  # the ignored label is negative
    scene = torch.arange(s, device=labels.device)[:, None].expand_as(labels)[keep]
    conf = torch.bincount((scene * k + labels[keep]) * k + pred[keep], minlength=s * k * k).view(s, k, k)
    return conf.diagonal(dim1=1, dim2=2), conf.sum(1), conf.sum(2)


def point_sample_records(model, config: RunConfig, batch: int, start: int, points, labels, res) -> list[dict]:
    """One record per scene: its mIoU, point accuracy and per-class counts, clean and adversarial."""
    k = model.num_classes
    inter_clean, pred_clean, true = _class_counts(res.clean_pred, labels, k)
    inter_adv, pred_adv, _ = _class_counts(res.adv_pred, labels, k)
    records = []
    for j in range(len(points)):
        n_true = int(true[j].sum())
        records.append({
            "index": start + j, "batch": batch, "batch_size": len(points), "points": n_true,
            "miou_clean": metrics.miou(res.clean_pred[j], labels[j], k, ignore_index=-1)[0],
            "miou_adv": metrics.miou(res.adv_pred[j], labels[j], k, ignore_index=-1)[0],
            "acc_clean": int(inter_clean[j].sum()) / max(n_true, 1),
            "acc_adv": int(inter_adv[j].sum()) / max(n_true, 1),
            "flops_full": float(res.flops_full[j]), "flops_clean": float(res.flops_clean[j]),
            "flops_adv": float(res.flops_adv[j]), "recovery": float(res.recovery[j]), "l2": float(res.l2[j]), "linf": float(res.linf[j]),
            "iterations": int(res.iterations[j]), "success": bool(res.success[j]),
            "inter_clean": inter_clean[j].tolist(), "pred_clean": pred_clean[j].tolist(),
            "inter_adv": inter_adv[j].tolist(), "pred_adv": pred_adv[j].tolist(), "true": true[j].tolist(),
            "classes": list(getattr(model, "class_names", range(k))),
        })
    return records


def summarize_points(records: list[dict], config: dict) -> dict:
    """summary.json of a segmentation run: mIoU and point accuracy over all points of all scenes
    (per-class IoU under ``iou_per_class_*``), executed FLOPs with ``flops_increase_pct`` (mean
    adversarial over mean clean) and the recovery against each clean scene's candidate voxels
    all on (can exceed 100 %: points may leave the candidates); no PSNR or architecture change."""
    def pooled(key):
        return torch.tensor([r[key] for r in records], dtype=torch.float64).sum(0)

    def col(key):
        return torch.tensor([r[key] for r in records], dtype=torch.float64)

    true, points = pooled("true"), sum(r["points"] for r in records)
    summary = {k: None for k in SUMMARY_KEYS}
    f_full, f_clean, f_adv = col("flops_full"), col("flops_clean"), col("flops_adv")
    per = cost.recovery_per_sample(f_clean, f_adv, f_full)
    per = per[~torch.isnan(per)]
    summary.update(victim=config["victim"], attack=config["attack"], n=len(records),
                   flops_full=float(f_full.mean()), flops_clean=float(f_clean.mean()), flops_adv=float(f_adv.mean()),
                   flops_increase_pct=float((f_adv.sum() / f_clean.sum() - 1) * 100),
                   recovery_pct=cost.recovery_aggregate(f_clean, f_adv, f_full),
                   recovery_pct_mean=float(per.mean()) if len(per) else None,
                   linf=float(col("linf").mean()), l2=float(col("l2").mean()),
                   iterations_mean=float(col("iterations").mean()))
    for tag in ("clean", "adv"):
        inter = pooled(f"inter_{tag}")
        iou = inter / (pooled(f"pred_{tag}") + true - inter)  # 0 / 0 = nan: class absent everywhere
        summary[f"miou_{tag}"] = float(iou[~torch.isnan(iou)].mean()) if (~torch.isnan(iou)).any() else None
        summary[f"{tag}_acc"] = float(inter.sum()) / points if points else None
        summary[f"iou_per_class_{tag}"] = {str(c): _json_value(float(v)) for c, v in zip(records[0]["classes"], iou)}
    return {k: v if isinstance(v, dict) else _json_value(v) for k, v in summary.items()}
