"""Reports from hand-built run directories: every figure referenced exists and is a readable PNG,
the summary numbers are in the HTML, nothing is fetched from the network, missing parts are
skipped and said, broken directories are one clear error."""
import importlib.util
import json
import math
import re
import shutil
import warnings
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dynattack.report import figures as report_figures
from dynattack.errors import DynattackError
from dynattack.report import write_report

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOM_CLASSES = ("floor", "wall", "door", "table", "chair", "cabinet", "bed", "sofa")  # unet3d-rooms' classes
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


# ----------------------------------------------------------------------------- synthetic runs


def make_run(root: Path, kind: str, n: int = 12, batch_size: int = 6, channels: int = 1) -> Path:
    """A run directory as the runner writes it. kind: 'energy' (GradAuto-like, 12 gates, history),
    'accuracy' (PGD-like, 4 gates, no history, no latency), 'static' (no gates)."""
    g = torch.Generator().manual_seed({"energy": 0, "accuracy": 1, "static": 2}[kind])
    run = root / kind
    (run / "adv").mkdir(parents=True)
    n_gates = {"energy": 12, "accuracy": 4, "static": 0}[kind]
    attack = "gradauto" if kind == "energy" else "pgd"
    victim = "resnet20-fmnist" if kind == "static" else "skipnet38-rnn-hrl"
    config = {"victim": victim, "attack": attack, "params": {"steps": 30, "seed": 0, "K": 1.0} if kind == "energy"
              else {"steps": 10, "eps": 0.03, "grad": "lgm"}, "dataset": "fashion-mnist", "split": "test",
              "offset": 0, "n": n, "batch_size": batch_size, "seed": 0, "weights": None, "shard": [0, 1]}
    (run / "config.json").write_text(json.dumps(config, indent=2))
    (run / "gates.json").write_text(json.dumps([f"gates.group{1 + i // 6}_layer{i % 6 + 1}" for i in range(n_gates)]))

    full = 40e6
    lines = []
    for b, start in enumerate(range(0, n, batch_size)):
        stop = min(start + batch_size, n)
        B = stop - start
        clean = torch.rand(B, channels, 28, 28, generator=g)
        delta = (torch.rand(B, channels, 28, 28, generator=g) - 0.5) * 0.06
        adv = (clean + delta).clamp(0, 1)
        save_file({"adv": adv, "clean": clean, "index": torch.arange(start, stop)},
                  str(run / "adv" / f"batch_{b:05d}.safetensors"))
        for k in range(B):
            i = start + k
            label = i % 3
            gc = (torch.rand(n_gates, generator=g) > 0.5).double().tolist()
            ga = [1.0] * n_gates if kind == "energy" else (torch.rand(n_gates, generator=g) > 0.3).double().tolist()
            f_clean = full * (0.4 + 0.05 * (i % 4)) if n_gates else full
            f_adv = full * (0.97 if i % 5 else 0.7) if kind == "energy" else (f_clean * 1.02 if n_gates else full)
            rec = (f_adv - f_clean) / (full - f_clean) * 100 if f_clean < full else None
            mse = float(((adv[k] - clean[k]) ** 2).mean())
            lines.append({"index": i, "batch": b, "batch_size": B, "label": label, "clean_pred": label,
                          "adv_pred": label if kind == "energy" else (label + 1) % 3,
                          "flops_full": full, "flops_clean": f_clean, "flops_adv": f_adv, "recovery": rec,
                          "psnr": -10 * math.log10(mse), "l2": float((adv[k] - clean[k]).norm()),
                          "linf": float((adv[k] - clean[k]).abs().max()), "iterations": 30 - i % 7,
                          "success": bool(i % 5) if kind == "energy" else True,
                          "units_changed": int(sum(a != c for a, c in zip(ga, gc))), "units": n_gates,
                          "gates_clean": gc, "gates_adv": ga})
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    summary = {"victim": victim, "attack": attack, "n": n, "clean_acc": 1.0,
               "adv_acc": 1.0 if kind == "energy" else 0.0,
               "flops_full": full, "flops_clean": float(np.mean([r["flops_clean"] for r in lines])),
               "flops_adv": float(np.mean([r["flops_adv"] for r in lines])),
               "recovery_pct": 91.234 if kind == "energy" else (1.5 if n_gates else None),
               "recovery_pct_mean": 90.5 if kind == "energy" else None, "psnr_db": 34.5678, "linf": 0.0299,
               "l2": 0.8123, "arch_change_pct": 47.25 if n_gates else None, "miou_clean": None, "miou_adv": None,
               "latency_clean_ms": 3.21 if kind == "energy" else None,
               "latency_adv_ms": 5.43 if kind == "energy" else None,
               "latency_full_ms": 5.87 if kind == "energy" else None, "iterations_mean": 26.75, "seconds": 12.5}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))

    if kind == "energy":  # per-iteration history of the first batch, as runner.run_attack saves it
        T, B = 30, batch_size
        t = torch.arange(T, dtype=torch.float64)[:, None, None]
        onset = torch.rand(1, B, n_gates, generator=g, dtype=torch.float64) * 20
        gate_value = torch.sigmoid((t - onset) / 3)
        active = torch.ones(T, B, dtype=torch.bool)
        active[18:, 1] = False  # sample 1 stopped early
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        gate_value = torch.where(active[..., None], gate_value, nan)
        gate_on = torch.where(active[..., None], (gate_value >= 0.5).double(), nan)
        flops = torch.where(active, full * (0.4 + 0.6 * gate_on.nanmean(2)), nan)
        l2 = torch.where(active, torch.linspace(0, 1, T, dtype=torch.float64)[:, None].expand(T, B), nan)
        gnorm = torch.where(active, torch.logspace(0, -3, T, dtype=torch.float64)[:, None].expand(T, B), nan)
        angle = torch.where(active, 90 + 30 * torch.randn(T, B, generator=g, dtype=torch.float64), nan)
        save_file({"flops": flops, "l2": l2, "gate_value": gate_value, "gate_on": gate_on, "active": active,
                   "loss_c": gnorm * 3, "grad_norm_c": gnorm, "angle_cf": angle, "index": torch.arange(B)},
                  str(run / "history.safetensors"))
    return run


def make_point_run(root: Path) -> Path:
    """A segmentation run as runner.summarize_points writes it: point clouds in the shards, per-scene mIoU
    and point accuracy (no label, prediction or PSNR) in the records, voxel-occupancy gates in gates.json
    but no per-gate execution in the records, per-class IoU as {class: IoU} dicts in summary.json (null for
    a class absent everywhere), long full-precision floats."""
    run = make_run(root, "static", n=2, batch_size=2)
    g = torch.Generator().manual_seed(3)
    pts = torch.rand(2, 300, 3, generator=g)
    save_file({"adv": pts + 0.01, "clean": pts, "index": torch.arange(2)}, str(run / "adv" / "batch_00000.safetensors"))
    (run / "gates.json").write_text(json.dumps([{"name": f"occupancy.s{s}", "tau": 0.5, "units": 100}
                                                for s in (1, 2, 4, 8)]))
    records = [{"index": i, "batch": 0, "batch_size": 2, "points": 300, "miou_clean": 0.4 - 0.1 * i,
                "miou_adv": 0.3 - 0.1 * i, "acc_clean": 0.81234, "acc_adv": 0.5, "flops_full": 2e9,
                "flops_clean": 0.9e9, "flops_adv": 0.95e9, "recovery": 4.5, "l2": 0.2, "linf": 0.01, "iterations": 3,
                "success": False, "classes": list(ROOM_CLASSES)} for i in range(2)]
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    iou_clean = dict(zip(ROOM_CLASSES, torch.rand(len(ROOM_CLASSES), generator=g, dtype=torch.float64).tolist()))
    iou_adv = {c: v * 0.7 for c, v in iou_clean.items()}
    iou_clean["sofa"] = iou_adv["sofa"] = None
    iou_adv["bed"] = 0.0
    summary = json.loads((run / "summary.json").read_text())
    summary.update(victim="unet3d-rooms", attack="pc-gradauto", recovery_pct=4.24, recovery_pct_mean=4.5,
                   miou_clean=0.29308214947498457,
                   miou_adv=0.1221, flops_increase_pct=5.976, iou_per_class_clean=iou_clean, iou_per_class_adv=iou_adv)
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    return run


@pytest.fixture(scope="module", autouse=True)
def smaller_grids():
    """Fewer samples per grid keep the tests fast on a busy 2-core machine; the drawing paths are the same
    (the energy history still has more than 10 gates: the colour-bar path)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_figures, "N_IMAGE_SAMPLES", 4)
        mp.setattr(report_figures, "N_HISTORY_SAMPLES", 3)
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three kinds of run, built once (drawing a report takes seconds on a busy 2-core machine)."""
    root = tmp_path_factory.mktemp("runs")
    return {kind: make_run(root, kind) for kind in ("energy", "accuracy", "static")}


@pytest.fixture(scope="module")
def reports(runs):
    """kind -> (html, figure names) of each run's report, checked by :func:`check_report`."""
    return {kind: check_report(run) for kind, run in runs.items()}


# ----------------------------------------------------------------------------- checks


class _Tables(HTMLParser):
    """class attribute of each <table> -> its rows, each a list of cell texts (th and td)."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._rows = self._cell = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._rows = self.tables.setdefault(dict(attrs).get("class", ""), [])
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("th", "td") and self._rows is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._cell is not None:
            self._rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._rows = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def html_tables(html: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(html)
    return parser.tables


def referenced(html: str) -> list[str]:
    return re.findall(r"""<img[^>]*\ssrc=['"]([^'"]+)['"]""", html)


def check_report(run: Path) -> tuple[str, set[str]]:
    out = write_report(run)
    assert out == run / "report.html" and out.exists()
    html = out.read_text()
    srcs = referenced(html)
    assert srcs and all(s.startswith("figures/") and s.endswith(".png") for s in srcs)
    produced = {p.name for p in (run / "figures").glob("*.png")}
    assert {s.split("/", 1)[1] for s in srcs} == produced  # every figure referenced, every reference exists
    for name in produced:
        data = (run / "figures" / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        img = matplotlib.image.imread(run / "figures" / name)
        assert img.shape[0] >= 250 and img.shape[1] >= 500, (name, img.shape)
        assert img[..., :3].std() > 0.02, name  # not a blank canvas
    # offline: no network resource of any kind
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"""(src|href)=['"](//|[a-z]+:)""", html)
    assert "<link" not in html and "<script" not in html
    assert "drawing failed" not in html
    assert not list(run.glob(".*.tmp")) and not list((run / "figures").glob(".*.tmp"))
    return html, {n[:-4] for n in produced}


def test_energy_report(reports):
    html, figs = reports["energy"]
    assert figs == {"flops", "latency", "recovery_hist", "gate_values", "cost_curves", "attack_stats",
                    "exec_rates", "images"}
    for text in ("91.23 %", "90.50 %", "34.57 dB", "3.210 ms", "5.430 ms", "5.870 ms", "40.000 M", "47.25 %",
                 "100.00 %", "0.0299", "26.8", "12.5 s", "gradauto", "skipnet38-rnn-hrl", "K"):
        assert text in html, text
    assert "τ = 0.5" in html  # the threshold inferred from gate_on vs gate_value
    for key in ("angle_cf", "grad_norm_c", "loss_c"):
        assert key in html


def test_accuracy_report(reports):
    html, figs = reports["accuracy"]
    assert figs == {"flops", "recovery_hist", "exec_rates", "images"}
    assert "history.safetensors" in html and "latency was not measured" in html
    for text in ("0.00 %", "100.00 %", "34.57 dB", "pgd", "lgm"):
        assert text in html, text


def test_static_report(reports):
    html, figs = reports["static"]
    assert figs == {"flops", "images"}
    assert "no gates" in html
    assert "n/a" in html  # null summary figures


def test_rgb_run_then_broken_parts_are_skipped_and_said(tmp_path):
    run = make_run(tmp_path, "accuracy", channels=3)
    (run / "history.safetensors").write_bytes(b"\x00garbage")  # unreadable optional part
    _, figs = check_report(run)
    assert {"flops", "recovery_hist", "exec_rates", "images"} == figs
    # now an unfinished run: no summary yet, the second batch cut short, the first shard truncated
    (run / "summary.json").unlink()
    (run / "adv" / "batch_00001.safetensors").unlink()  # its records are dropped
    shard = run / "adv" / "batch_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    html, figs = check_report(run)
    assert {"flops", "recovery_hist", "exec_rates"} == figs
    assert not (run / "figures" / "images.png").exists()  # the earlier report's grid is not left behind
    for text in ("has not finished", "history.safetensors is unreadable", "batch_00000.safetensors is unreadable",
                 "6 finished samples"):
        assert text in html, text


def test_points_scatter(tmp_path):
    run = make_run(tmp_path, "static", n=2, batch_size=2)
    pts = torch.rand(2, 200, 3)
    save_file({"adv": pts + 0.01, "clean": pts, "index": torch.arange(2)}, str(run / "adv" / "batch_00000.safetensors"))
    _, figs = check_report(run)
    assert "points" in figs and "images" not in figs


def test_point_run_per_class_iou_is_its_own_table(tmp_path):
    run = make_point_run(tmp_path)
    html, figs = check_report(run)
    assert "points" in figs
    summary = json.loads((run / "summary.json").read_text())
    tables = html_tables(html)
    # the summary table holds one short figure per row: no dict, no class name, no 17-digit float
    for row in tables["summary"]:
        value = row[1]
        assert len(value) <= 30 and "{" not in value and not set(value.split()) & set(ROOM_CLASSES), row
    assert ["FLOPs increase", "5.98 %"] in [row[:2] for row in tables["summary"]]
    # per-class IoU: a header and one row per class, in summary.json's order, 3 decimals, null -> n/a
    shown = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    expected = [[c, shown(summary["iou_per_class_clean"][c]), shown(summary["iou_per_class_adv"][c])]
                for c in summary["iou_per_class_clean"]]
    assert tables["iou"] == [["class", "clean", "adversarial"], *expected]
    assert ["bed", shown(summary["iou_per_class_clean"]["bed"]), "0.000"] in tables["iou"]
    # the samples table: the columns the records hold (per-scene mIoU and point accuracy), no column of n/a
    head, *rows = tables["samples"]
    assert "label" not in head and "PSNR (dB)" not in head and "units changed" not in head
    records = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    for row, r in zip(rows, records):
        cell = dict(zip(head, row))
        assert cell["mIoU clean"] == f"{r['miou_clean']:.3f}" and cell["mIoU adv"] == f"{r['miou_adv']:.3f}"
        assert cell["point acc clean (%)"] == f"{100 * r['acc_clean']:.1f}"
    assert not [c for c in zip(*rows) if set(c) == {"n/a"}]
    # the victim has gates (gates.json): the missing execution rates are not blamed on a static network
    assert "static network" not in html and "no per-gate execution" in html


def test_recovery_without_summary_figures_draws_without_a_warning(tmp_path):
    run = make_run(tmp_path, "accuracy", n=4, batch_size=4)
    summary = json.loads((run / "summary.json").read_text())
    summary.update(recovery_pct=None, recovery_pct_mean=None)  # per-sample recovery only
    (run / "summary.json").write_text(json.dumps(summary))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns on a legend without entries
        _, figs = check_report(run)
    assert "recovery_hist" in figs


def test_bad_run_dirs(tmp_path):
    with pytest.raises(DynattackError, match="no such run directory"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DynattackError, match="not a readable run directory"):
        write_report(tmp_path / "empty")
    run = make_run(tmp_path, "accuracy")
    (run / "summary.json").write_text('{"victim": "sk')
    with pytest.raises(DynattackError, match="summary.json is unreadable") as err:
        write_report(run)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_render_with_chromium(runs, reports, tmp_path):
    spec = importlib.util.spec_from_file_location("render_report", ROOT / "bench" / "render_report.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.render(runs["energy"], tmp_path / "shot.png", height=1600)
    assert out.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(out)
    assert img.shape[:2] == (1600, 1280) and img[..., :3].std() > 0.05


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_point_report_fits_1280_px(tmp_path):
    """At 1280 px the page's right padding stays blank: no table pushes its columns past the edge
    (the per-class IoU dicts on one line used to push the summary's Meaning column off the page)."""
    spec = importlib.util.spec_from_file_location("render_report", ROOT / "bench" / "render_report.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = make_point_run(tmp_path)
    out = bench.render(run, tmp_path / "shot.png", width=1280, height=2000, rewrite=True)
    img = matplotlib.image.imread(out)[..., :3]
    assert img.shape[:2] == (2000, 1280)
    right = img[:, -16:]  # inside main's 28 px right padding
    inked = np.nonzero(right.min(axis=(1, 2)) < 0.9)[0]
    assert not len(inked), f"{len(inked)} rows have ink in the right 16 px, from y = {inked[0]}"
