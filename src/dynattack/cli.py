"""The `dynattack` command line. Bad input ends in one clear line on stderr and exit code 2."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import DynattackError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Adversarial attacks on dynamic (input-adaptive) neural networks.")

DataOpt = typer.Option(None, "--data", help="dataset directory (default: $DYNATTACK_DATA or the standard location)")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DynattackError(f"--device {device}: no CUDA device is available on this machine")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DynattackError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
        return device
    raise DynattackError(f"--device {device}: expected cpu, cuda, cuda:N or auto")


@app.command("models")
def models_cmd() -> None:
    """List the victim zoo with measured accuracy (mIoU for point victims) and compute kept (from the model cards)."""
    from .models import list_models

    rows = [("name", "family", "dataset", "params", "accuracy (point victims: mIoU)", "compute kept",
             "decisions varying", "shipped")]
    for m in list_models():
        card = m["card"] or {}
        score = card.get("miou", card.get("accuracy"))
        acc = f"{100 * score:.2f} %" if score is not None else "-"
        kept = f"{card['compute_kept_pct']:.1f} %" if "compute_kept_pct" in card else "-"
        params = f"{card['params'] / 1e6:.2f} M" if "params" in card else "-"
        dep = card.get("input_dependence")  # share of (sample, unit) decisions not constant over the test set
        varying = f"{dep['varying_decisions_pct']:.1f} %" if dep else "-"
        shipped = ("yes" if m["shipped"] else "no — bring the official .pth" if m["official"]
                   else "no (dynattack train)")
        rows.append((m["name"], m["family"], m["dataset"], params, acc, kept, varying, shipped))
    _print_table(rows)


@app.command("train")
def train_cmd(
    name: str = typer.Argument(..., help="victim name from `dynattack models`"),
    seed: int = typer.Option(0, help="random seed (training is deterministic given the seed)"),
    out: Optional[Path] = typer.Option(None, help="directory for NAME.safetensors and NAME.json (default: the zoo)"),
    epochs: Optional[int] = typer.Option(None, help="override the recipe's number of epochs"),
    limit: Optional[int] = typer.Option(None, help="train on the first N images only (smoke runs)"),
    data: Optional[Path] = DataOpt,
    device: str = DeviceOpt,
) -> None:
    """Train victim NAME from scratch on its dataset and write its weights and model card."""
    from .models import WEIGHTS_DIR, get_spec
    from .train import train_model

    get_spec(name)
    path = train_model(name, seed=seed, out_dir=out or WEIGHTS_DIR, data_root=data, device=resolve_device(device),
                       epochs=epochs, limit=limit)
    typer.echo(f"wrote {path} and {path.with_suffix('.json')}")


@app.command("eval")
def eval_cmd(
    name: str = typer.Argument(..., help="victim name from `dynattack models`"),
    n: Optional[int] = typer.Option(None, "--n", help="number of test images (default: the whole test split; point "
                                                      "victims: test rooms, of which the split holds 8)"),
    latency_n: int = typer.Option(50, "--latency-n", help="images timed one at a time for batch-1 latency"),
    weights: Optional[Path] = typer.Option(None, help="load these weights (safetensors or official .pth) instead"),
    data: Optional[Path] = DataOpt,
    device: str = DeviceOpt,
) -> None:
    """Accuracy, mean executed FLOPs, compute kept vs all gates on, and real batch-1 latency."""
    from . import cost
    from .data.point_batch import POINT_DATASETS
    from .models import get_spec
    from .runner import _load_victim_and_data
    from .train.common import evaluate

    if (n is not None and n <= 0) or latency_n < 0:
        raise DynattackError("--n must be > 0 and --latency-n >= 0")
    dev = resolve_device(device)
    dataset = get_spec(name).dataset
    if dataset in POINT_DATASETS:
        _eval_points(name, weights, dev, n, latency_n)
        return
    model, x, y = _load_victim_and_data(name, weights, data, dev, dataset)  # the test split, checked
    if n is not None and n > len(y):
        raise DynattackError(f"--n {n}: the {dataset} test split holds {len(y)} images")
    x, y = x[:n], y[:n]
    res = evaluate(model, x, y)
    rows = [("victim", name)] + ([("weights", str(weights))] if weights is not None else [])
    rows += [("dataset", dataset), ("images", f"{len(y)} (test split)"), ("accuracy", f"{100 * res['accuracy']:.2f} %"),
             ("FLOPs (mean)", f"{res['flops_mean'] / 1e6:.2f} M"), ("FLOPs (all gates on)", f"{res['flops_full'] / 1e6:.2f} M"),
             ("compute kept", f"{res['compute_kept_pct']:.1f} %")]
    if latency_n:
        sub = x[:latency_n].to(dev)
        lat = cost.batch1_latency_ms(model, {"clean": (sub, None), "on": (sub, "on")})
        rows.append(("latency, batch 1", f"{lat['clean']:.2f} ms"))
        rows.append(("latency, batch 1, all gates on", f"{lat['on']:.2f} ms"))
    _print_table([("metric", "value")] + rows)


def _eval_points(name: str, weights, dev: str, rooms: int | None, latency_n: int) -> None:
    """`dynattack eval` of a point-cloud victim on the first ``rooms`` synthetic test rooms (all by default)."""
    import torch

    from . import cost
    from .data import check_labels
    from .data.point_batch import pack_clouds
    from .data.points import IGNORE_LABEL, SYNTHETIC_SPLIT_SIZES, synthetic_scenes
    from .gates import Trace, force_gates
    from .models import create_model, victim_classes
    from .train.sparse_unet import DATA_SEED, evaluate_scenes

    rooms = SYNTHETIC_SPLIT_SIZES["test"] if rooms is None else rooms
    clouds = synthetic_scenes("test", rooms, DATA_SEED)  # refuses more rooms than the split holds
    model = create_model(name, weights=weights, device=dev)
    k = victim_classes(model, pack_clouds(clouds[:1]).points)
    for i, cloud in enumerate(clouds):
        check_labels(cloud.labels[None], k, f"synthetic test room {i} for {name}", ignore_index=IGNORE_LABEL)
    res = evaluate_scenes(model, clouds)
    dev = next(model.parameters()).device
    full = []
    for cloud in clouds:
        with force_gates(model, "on"), torch.no_grad(), Trace() as trace:
            model(pack_clouds([cloud]).points.to(dev))
        full.append(float(model.executed_flops(trace)[0]))
    rows = [("victim", name), ("rooms", f"{rooms} (synthetic test split)"), ("mIoU", f"{100 * res['miou']:.2f} %"),
            ("point accuracy", f"{100 * res['point_accuracy']:.2f} %"),
            ("FLOPs (mean)", f"{res['flops_mean'] / 1e9:.2f} G"),
            ("FLOPs (every candidate voxel on)", f"{sum(full) / len(full) / 1e9:.2f} G")]
    rows += [(f"IoU {cls}", "-" if v is None else f"{100 * v:.1f} %") for cls, v in res["per_class_iou"].items()]
    if latency_n:
        pts = pack_clouds(clouds[:1]).points.to(dev)
        lat = cost.batch1_latency_ms(model, {"clean": (pts, None), "on": (pts, "on")}, warmup=1)
        rows.append(("latency, one room", f"{lat['clean']:.0f} ms"))
        rows.append(("latency, one room, every candidate on", f"{lat['on']:.0f} ms"))
    _print_table([("metric", "value")] + rows)


def parse_value(text: str):
    """CLI values: ints, floats, fractions like 8/255, true/false, none, else the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    num, slash, den = text.partition("/")
    if slash:
        try:
            return float(num) / float(den)
        except (ValueError, ZeroDivisionError):
            raise DynattackError(f"cannot read {text!r} as a number or fraction") from None
    return text


def parse_params(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise DynattackError(f"--param expects key=value, got {pair!r}")
        params[key.strip()] = parse_value(value)
    return params


def run_params(pairs: list[str], latency_n: int, threads: int | None, **options) -> dict:
    """The attack parameters of `attack` and `sweep`: ``--param key=value`` pairs, overridden by
    the dedicated options given (``--eps``, ``--grad``, ...); checks ``--latency-n`` and ``--threads``."""
    check_latency_n(latency_n)
    if threads is not None and threads < 1:
        raise DynattackError(f"--threads must be >= 1, got {threads}")
    params = parse_params(pairs)
    params.update({key: value for key, value in options.items() if value is not None})
    return params


def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return (0, 1)
    i, slash, n = text.partition("/")
    if not (slash and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise DynattackError(f"--shard expects i/n with 0 <= i < n, got {text!r}")
    return int(i), int(n)


@app.command("attack")
def attack_cmd(
    victim: str = typer.Option(..., "--victim", help="victim name from `dynattack models`"),
    attack: str = typer.Option(..., "--attack", help="attack name (gradauto, ilfo, ...)"),
    out: str = typer.Option(..., "--out", help="run directory (config.json, samples.jsonl, adv/, summary.json)"),
    n: int = typer.Option(100, "--n", "--images", help="number of test images (under torchrun say --images: it takes --n as its own)"),
    offset: int = typer.Option(0, "--offset", help="first test image"),
    batch_size: int = typer.Option(50, "--batch-size", help="images attacked together"),
    seed: int = typer.Option(0, "--seed", help="run seed (each batch gets its own derived seed)"),
    param: list[str] = typer.Option([], "--param", help="attack parameter key=value (repeatable)"),
    eps: Optional[str] = typer.Option(None, "--eps", help="Linf budget: in [0, 1] for images (8/255 notation "
                                                          "accepted), metres for point clouds"),
    grad: Optional[str] = typer.Option(None, "--grad", help="gradient mode of accuracy attacks: fgm, lgm, lgm_st"),
    lam: Optional[float] = typer.Option(None, "--lam", help="LGM sigmoid slope"),
    steps: Optional[int] = typer.Option(None, "--steps", help="attack iterations"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed run in --out"),
    shard: Optional[str] = typer.Option(None, "--shard", help="run only slice i/n of the batches"),
    latency_n: int = typer.Option(20, "--latency-n", help="samples timed at batch 1 (clean, adversarial, all on)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads per process (default: as "
                                          "OMP_NUM_THREADS says; torchrun sets 1), recorded in batches.jsonl"),
    weights: Optional[Path] = typer.Option(None, help="victim weights (safetensors or official .pth) instead of the zoo's"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="fashion-mnist, cifar10, cifar100 or folder (default: the victim's)"),
    data: Optional[Path] = DataOpt,
    device: str = DeviceOpt,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars"),
) -> None:
    """Attack the first N test images of a victim's dataset; results go into the run directory."""
    from .runner import run_cli_attack

    params = run_params(param, latency_n, threads, eps=parse_value(eps) if eps is not None else None, grad=grad,
                        lam=lam, steps=steps)
    summary = run_cli_attack(victim=victim, attack=attack, params=params, out=out, n=n, offset=offset,
                             batch_size=batch_size, seed=seed, resume=resume, shard=parse_shard(shard),
                             latency_n=latency_n, weights=weights, data=data, device=resolve_device(device),
                             progress=progress, dataset=dataset, threads=threads)
    if summary is not None:
        _print_summary(summary)
        typer.echo(f"run directory: {out}")


def parse_budgets(text: str) -> list:
    """``--eps`` of `dynattack sweep`: a comma list of numbers or fractions (``1/255,2/255``)."""
    tokens = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in tokens):
        raise DynattackError(f"--eps expects a comma-separated list of budgets, e.g. 1/255,2/255,4/255, got {text!r}")
    return [parse_value(t) for t in tokens]


@app.command("sweep")
def sweep_cmd(
    victim: str = typer.Option(..., "--victim", help="victim name from `dynattack models`"),
    eps: str = typer.Option(..., "--eps", help="budgets, comma-separated: in (0, 1] for images (1/255,2/255,4/255 "
                                               "notation accepted), metres for point clouds"),
    out: str = typer.Option(..., "--out", help="sweep directory: one run directory per budget, sweep.json, sweep.png"),
    attack: str = typer.Option("energy-pgd", "--attack", help="an attack with an eps budget (energy-pgd, "
                                                             "pc-gradauto, the accuracy attacks)"),
    n: int = typer.Option(100, "--n", "--images", help="number of test images (scenes for point clouds)"),
    offset: int = typer.Option(0, "--offset", help="first test image"),
    batch_size: int = typer.Option(50, "--batch-size", help="images attacked together"),
    seed: int = typer.Option(0, "--seed", help="run seed (each batch gets its own derived seed)"),
    param: list[str] = typer.Option([], "--param", help="attack parameter key=value (repeatable), same at every eps"),
    grad: Optional[str] = typer.Option(None, "--grad", help="gradient mode: fgm, lgm, lgm_st"),
    lam: Optional[float] = typer.Option(None, "--lam", help="LGM sigmoid slope"),
    steps: Optional[int] = typer.Option(None, "--steps", help="attack iterations"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed sweep in --out"),
    latency_n: int = typer.Option(20, "--latency-n", help="samples timed at batch 1 in each run"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    weights: Optional[Path] = typer.Option(None, help="victim weights (safetensors or official .pth) instead of the zoo's"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="fashion-mnist, cifar10, cifar100 or folder (default: the victim's)"),
    data: Optional[Path] = DataOpt,
    device: str = DeviceOpt,
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars"),
) -> None:
    """Run an attack at every budget of --eps (one run directory each) and write sweep.json and sweep.png."""
    from .sweep import run_sweep

    params = run_params(param, latency_n, threads, grad=grad, lam=lam, steps=steps)
    result = run_sweep(victim=victim, attack=attack, budgets=parse_budgets(eps), params=params, out=out, n=n,
                       offset=offset, batch_size=batch_size, seed=seed, resume=resume, latency_n=latency_n,
                       weights=weights, data=data, device=resolve_device(device), progress=progress,
                       dataset=dataset, threads=threads)
    metres = result["eps_unit"] == "metres"
    rows = [("eps", "recovery", "fully attacked", "L2", "PSNR", "accuracy (mIoU)" if metres else "accuracy", "run")]
    for e in result["sweep"]:
        acc = e["miou_adv"] if metres else e["adv_acc"]
        rows.append((f"{e['eps']:g} m" if metres else f"{e['eps'] * 255:g}/255",
                     "-" if e["recovery_pct"] is None else f"{e['recovery_pct']:.1f} %",
                     "-" if e["success_pct"] is None else f"{e['success_pct']:.0f} %",
                     "-" if e["l2"] is None else f"{e['l2']:.3f}",
                     "-" if e["psnr_db"] is None else f"{e['psnr_db']:.1f} dB",
                     "-" if acc is None else f"{100 * acc:.1f} %", e["run"]))
    _print_table(rows)
    typer.echo(f"sweep directory: {out} (sweep.json, sweep.png)")


@app.command("merge")
def merge_cmd(
    shards: list[Path] = typer.Argument(..., help="shard run directories (all shards i/n of one run)"),
    out: str = typer.Option(..., "--out", help="merged run directory (new, or an unfinished merge of these shards)"),
    latency_n: int = typer.Option(20, "--latency-n", help="samples timed at batch 1"),
    data: Optional[Path] = DataOpt,
    device: str = DeviceOpt,
) -> None:
    """Merge the shard directories of one run into one run directory with its summary."""
    from .runner import merge_cli

    check_latency_n(latency_n)
    _print_summary(merge_cli(shards, out, latency_n=latency_n, data=data, device=resolve_device(device)))
    typer.echo(f"run directory: {out}")


@app.command("report")
def report_cmd(run_dir: Path = typer.Argument(..., help="a run directory written by `dynattack attack`")) -> None:
    """(Re)write report.html and figures/*.png of a run directory."""
    from .report import write_report

    typer.echo(f"wrote {write_report(run_dir)}")


@app.command("demo")
def demo_cmd(
    victim: str = typer.Option("skipnet38-rnn-hrl", "--victim", help="a shipped gated victim"),
    n: int = typer.Option(50, "--n", help="first N Fashion-MNIST test images"),
    steps: int = typer.Option(300, "--steps", help="iterations per attack (GradAuto stops each sample early once all on)"),
    out: str = typer.Option("runs/demo", "--out", help="directory for the two run directories"),
    device: str = DeviceOpt,
) -> None:
    """The main job: GradAuto vs ILFO on a shipped SkipNet, a comparison table and the reports."""
    from .rundir import load_config, output_dir
    from .runner import run_cli_attack

    out = output_dir(out)
    for attack in ("gradauto", "ilfo"):  # a rerun continues the same demo; refuse another one before any work
        if (out / attack / "config.json").exists():
            old = load_config(out / attack)
            if (old["victim"], old["n"], old["params"].get("steps")) != (victim, n, steps):
                raise DynattackError(f"{out} holds a demo of --victim {old['victim']} --n {old['n']} --steps "
                                     f"{old['params'].get('steps')}: choose another --out, or remove {out}")
    dev = resolve_device(device)
    rows = [("attack", "recovery", "PSNR", "clean acc", "adv acc", "latency clean / adv / all on (b=1)", "report")]
    for attack in ("gradauto", "ilfo"):
        typer.echo(f"{attack} on {victim}, {n} test images, {steps} steps ...")
        run_dir = out / attack
        s = run_cli_attack(victim=victim, attack=attack, params={"steps": steps}, out=run_dir, n=n, offset=0,
                           batch_size=n, seed=0, resume=(run_dir / "config.json").exists(), shard=(0, 1),
                           latency_n=20, weights=None, data=None, device=dev, progress=True)
        rows.append((attack, f"{s['recovery_pct']:.1f} %", f"{s['psnr_db']:.1f} dB" if s["psnr_db"] else "-",
                     f"{100 * s['clean_acc']:.1f} %", f"{100 * s['adv_acc']:.1f} %",
                     f"{s['latency_clean_ms']:.2f} / {s['latency_adv_ms']:.2f} / {s['latency_full_ms']:.2f} ms",
                     str(run_dir / "report.html")))
    typer.echo("")
    _print_table(rows)


@app.command("diagnose")
def diagnose_cmd(
    run_dir: Path = typer.Argument(..., help="a finished energy-attack run directory"),
    n: int = typer.Option(50, "--n", help="diagnose the run's first N samples"),
    probe_steps: int = typer.Option(50, "--probe-steps", help="iterations of each no-distortion probe (0: none)"),
    data: Optional[Path] = DataOpt,
    device: str = DeviceOpt,
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: as the environment says)"),
) -> None:
    """Why an energy run stayed short of all-on: per-gate table into RUN_DIR/diagnostics.json and .md."""
    from .diagnose_run import diagnose_run

    if threads is not None:
        if threads < 1:
            raise DynattackError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    _print_summary(diagnose_run(run_dir, n=n, probe_steps=probe_steps, data=data, device=resolve_device(device)))


def _print_summary(summary: dict) -> None:
    rows = [("figure", "value")]
    for key, value in summary.items():
        if value is None:
            continue
        rows.append((key, f"{value:.4g}" if isinstance(value, float) else str(value)))
    _print_table(rows)


def _print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        typer.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            typer.echo("  ".join("-" * w for w in widths))


def check_latency_n(latency_n: int) -> None:
    if latency_n < 0:
        raise DynattackError(f"--latency-n must be >= 0, got {latency_n}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: usage errors (click's) and ours both become one line on stderr, exit 2."""
    import typer.main
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError  # typer vendors click
    from typer.exceptions import Abort

    try:
        code = typer.main.get_command(app).main(args=argv, prog_name="dynattack", standalone_mode=False)
    except NoArgsIsHelpError as exc:  # bare `dynattack` or `dynattack CMD` with no_args_is_help: the help
        exc.show()
        sys.exit(exc.exit_code)
    except (DynattackError, ClickException) as exc:
        message = " ".join((exc.format_message() if isinstance(exc, ClickException) else str(exc)).split())
        if isinstance(exc, UsageError) and exc.ctx is not None:
            message += f" (see '{exc.ctx.command_path} --help')"
        typer.echo(f"dynattack: error: {message}", err=True)
        sys.exit(2)
    except Abort:
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
