"""Forward + backward time of one submanifold conv (C=32 -> 32, kernel 3) on ~50k surface voxels.

    .venv/bin/python bench/sparse_speed.py [--voxels 50000] [--repeats 5] [--threads 1]

Voxels: the first ``--voxels`` voxels (in x, y, z order, a slab of the room) of synthetic
validation scene 0 at 2 cm. Rows: ours (pure PyTorch gather-matmul-scatter), spconv 2.x on the
CPU when installed (always one thread: it is wrong with more), and dense conv3d on small full
grids where a dense tensor fits. Kernel-map building is timed apart (done once per coordinate
set and cached). Writes bench/results/sparse_speed.md.
"""
import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dynattack.data.points import synthetic_scenes, voxelize
from dynattack.sparse import CoordinateSet, SparseTensor, conv3d
from dynattack.sparse import spconv_backend

C = 32


def timed(fn, repeats):
    """Medians (forward CPU ms, backward CPU ms, fwd+bwd wall ms) of ``fn() -> (output, inputs)``
    after one warm-up. CPU time of the process is the headline: this machine's 2 cores are shared
    with other jobs, which inflate wall time but not the work done."""
    fwd, bwd, wall = [], [], []
    for i in range(repeats + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        out, params = fn()
        c1 = time.process_time()
        torch.autograd.grad(out.sum(), params)
        w2, c2 = time.perf_counter(), time.process_time()
        if i:  # the first run warms caches (and builds spconv's index pairs)
            fwd.append(1e3 * (c1 - c0))
            bwd.append(1e3 * (c2 - c1))
            wall.append(1e3 * (w2 - w0))
    return statistics.median(fwd), statistics.median(bwd), statistics.median(wall)


def scene_voxels(n):
    scene = synthetic_scenes("val", 1)[0]
    vox = voxelize(scene.coords, 0.02).coords[:n]
    coords = torch.cat([torch.zeros(len(vox), 1, dtype=torch.long), vox], dim=1)
    extent = (vox.max(0).values - vox.min(0).values + 1).tolist()
    full = voxelize(scene.coords, 0.02).coords
    full_extent = (full.max(0).values - full.min(0).values + 1).tolist()
    return coords, extent, full_extent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--voxels", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense-sides", default="32,48,64")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    coords, extent, full_extent = scene_voxels(args.voxels)
    n = len(coords)
    feats = torch.randn(n, C, requires_grad=True)
    weight = (torch.randn(27, C, C) / (27 * C) ** 0.5).requires_grad_()

    t0 = time.process_time()
    cs = CoordinateSet(coords)
    cs.kernel_map(cs, 3)
    map_ms = 1e3 * (time.process_time() - t0)
    x = SparseTensor(feats, cs)
    pairs = cs.kernel_map(cs, 3).in_idx.numel()

    rows = []
    f, b, w = timed(lambda: (conv3d(x, weight).F, (feats, weight)), args.repeats)
    rows.append(("ours (PyTorch gather-matmul-scatter)", f"{n} voxels", map_ms, f, b, w, n))

    spconv_note = "not installed"
    if spconv_backend.available():
        diff = (conv3d(x, weight, backend="spconv").F - conv3d(x, weight).F).abs().max().item()
        fresh = CoordinateSet(coords)
        t0 = time.process_time()
        conv3d(SparseTensor(feats.detach(), fresh), weight.detach(), backend="spconv")
        t1 = time.process_time()
        conv3d(SparseTensor(feats.detach(), fresh), weight.detach(), backend="spconv")
        sp_build = 1e3 * ((t1 - t0) - (time.process_time() - t1))  # first call minus a cached call
        f, b, w = timed(lambda: (conv3d(x, weight, backend="spconv").F, (feats, weight)), args.repeats)
        rows.append(("spconv 2.3 CPU (1 thread)", f"{n} voxels", sp_build, f, b, w, n))
        spconv_note = f"installed; max |spconv - ours| = {diff:.2e}"

    per_site = None
    for side in (int(s) for s in args.dense_sides.split(",")):
        grid = torch.randn(1, C, side, side, side, requires_grad=True)
        w = (torch.randn(C, C, 3, 3, 3) / (27 * C) ** 0.5).requires_grad_()
        f, b, wall = timed(lambda: (F.conv3d(grid, w, padding=1), (grid, w)), args.repeats)
        rows.append((f"dense conv3d {side}^3 grid", f"{side**3} sites", None, f, b, wall, side**3))
        per_site = (f + b) / side**3

    bbox = full_extent[0] * full_extent[1] * full_extent[2]
    lines = [
        f"Submanifold conv {C}->{C}, kernel 3, float32, forward + backward (features and weights), "
        f"median of {args.repeats}; torch {torch.__version__}, {args.threads} thread(s), "
        f"{platform.processor() or platform.machine()}, CPU only. Times are process CPU time (the machine's cores are "
        f"shared with other jobs, which inflates wall time, shown last); map build is done once per coordinate set.",
        "",
        "| method | size | map build (ms) | forward (ms) | backward (ms) | fwd+bwd (ms) | per 1k sites (ms) | fwd+bwd wall (ms) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, size, build, f, b, wall, sites in rows:
        build_s = "-" if build is None else f"{build:.0f}"
        lines.append(f"| {name} | {size} | {build_s} | {f:.0f} | {b:.0f} | {f + b:.0f} | {1e3 * (f + b) / sites:.2f} | {wall:.0f} |")
    lines += [
        "",
        f"Voxels: first {n} voxels (x, y, z order) of synthetic val scene 0 at 2 cm; box {extent[0]}x{extent[1]}x{extent[2]}, "
        f"{pairs} kernel-map pairs ({pairs / n:.1f} neighbours per voxel). spconv: {spconv_note}.",
        f"A dense conv3d over the whole scene's box ({full_extent[0]}x{full_extent[1]}x{full_extent[2]} = {bbox / 1e6:.1f}M sites) "
        f"would take about {per_site * bbox / 1e3:.0f} s forward+backward at the largest dense grid's rate (linear extrapolation) "
        f"and {4 * C * bbox / 2**30:.1f} GiB per feature tensor.",
        "",
        f"Command: `.venv/bin/python bench/sparse_speed.py --voxels {args.voxels} --repeats {args.repeats} "
        f"--threads {args.threads} --dense-sides {args.dense_sides}`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).resolve().parent / "results" / "sparse_speed.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Sparse convolution speed\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
