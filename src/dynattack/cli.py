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
    """List the victim zoo with measured accuracy and compute kept (from the model cards)."""
    from .models import list_models

    rows = [("name", "family", "params", "accuracy", "compute kept", "shipped")]
    for m in list_models():
        card = m["card"] or {}
        acc = f"{100 * card['accuracy']:.2f} %" if "accuracy" in card else "-"
        kept = f"{card['compute_kept_pct']:.1f} %" if "compute_kept_pct" in card else "-"
        params = f"{card['params'] / 1e6:.2f} M" if "params" in card else "-"
        rows.append((m["name"], m["family"], params, acc, kept, "yes" if m["shipped"] else "no (dynattack train)"))
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
    n: int = typer.Option(10000, "--n", help="number of test images"),
    latency_n: int = typer.Option(50, "--latency-n", help="images timed one at a time for batch-1 latency"),
    weights: Optional[Path] = typer.Option(None, help="load these weights (safetensors or official .pth) instead"),
    data: Optional[Path] = DataOpt,
    device: str = DeviceOpt,
) -> None:
    """Accuracy, mean executed FLOPs, compute kept vs all gates on, and real batch-1 latency."""
    from . import cost
    from .data import load_dataset
    from .models import create_model, get_spec
    from .train.common import evaluate

    if n <= 0 or latency_n < 0:
        raise DynattackError("--n must be > 0 and --latency-n >= 0")
    dev = resolve_device(device)
    model = create_model(name, weights=weights, device=dev)
    x, y = load_dataset(get_spec(name).dataset, "test", data)[:2]
    x, y = x[:n], y[:n]
    res = evaluate(model, x, y)
    rows = [("victim", name), ("images", f"{len(y)} (test split)"), ("accuracy", f"{100 * res['accuracy']:.2f} %"),
            ("FLOPs (mean)", f"{res['flops_mean'] / 1e6:.2f} M"), ("FLOPs (all gates on)", f"{res['flops_full'] / 1e6:.2f} M"),
            ("compute kept", f"{res['compute_kept_pct']:.1f} %")]
    if latency_n:
        sub = x[:latency_n].to(dev)
        rows.append(("latency, batch 1", f"{cost.batch1_latency_ms(model, sub):.2f} ms"))
        rows.append(("latency, batch 1, all gates on", f"{cost.batch1_latency_ms(model, sub, force='on'):.2f} ms"))
    _print_table([("metric", "value")] + rows)


def _print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for k, row in enumerate(rows):
        typer.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            typer.echo("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> None:
    """Entry point: click reports its own usage errors (exit 2); ours become one line, exit 2."""
    try:
        app(args=argv)
    except DynattackError as exc:
        typer.echo(f"dynattack: error: {exc}", err=True)
        sys.exit(2)
