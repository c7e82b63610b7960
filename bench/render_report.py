"""Render a run's report.html to a PNG with headless Chromium (offline: no network, no GPU).

    python bench/render_report.py RUN_DIR OUT.png [--height 2400] [--width 1280] [--rewrite]

Writes the report first when RUN_DIR has none (or with --rewrite). Needs Debian's `chromium`
(apt-get install -y chromium). Chromium's --screenshot captures the window, so a taller
--height shows more of a long report.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dynattack.errors import DynattackError
from dynattack.report import write_report


def render(run_dir: Path, out: Path, width: int = 1280, height: int = 2400, rewrite: bool = False) -> Path:
    report = run_dir / "report.html"
    if rewrite or not report.exists():
        report = write_report(run_dir)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise DynattackError("chromium is not installed (apt-get install -y chromium)")
    out = out.resolve()
    with tempfile.TemporaryDirectory() as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={out}",
               f"--window-size={width},{height}", report.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DynattackError(f"chromium failed to render {report} (exit {proc.returncode}: {tail})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=2400)
    ap.add_argument("--rewrite", action="store_true", help="rewrite report.html first")
    args = ap.parse_args()
    try:
        print(render(args.run_dir, args.out, args.width, args.height, args.rewrite))
    except DynattackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
