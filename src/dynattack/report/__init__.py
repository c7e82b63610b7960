"""Reports of a run directory: ``report.html`` plus ``figures/*.png``, from the directory alone.

``write_report(run_dir)`` reads what the runner wrote (``config.json``, ``summary.json``,
``gates.json``, ``samples.jsonl``, ``adv/batch_*.safetensors`` and, when the first batch was
recorded, ``history.safetensors``) and never loads a model, an attack or a dataset.

The parts: :mod:`.run` reads the directory once, :mod:`.figures` draws the PNGs from it and
:mod:`.page` lays out the HTML around them.

Figures are drawn for the data that exist, whatever the attack:

==========================  =====================================================================
``flops.png``               mean FLOPs clean / adversarial / all gates on, and per-sample histograms
``latency.png``             batch-1 latency clean / adversarial / all gates on (summary; if measured)
``recovery_hist.png``       per-sample FLOPs recovery (samples whose clean run skipped something)
``gate_values.png``         per-gate value G over iterations with the threshold (history; GradAuto
                            paper, Fig. 1 analogue)
``cost_curves.png``         FLOPs and L2 distortion over iterations (history)
``attack_stats.png``        every other per-iteration statistic the attack recorded: losses,
                            gradient norms, the angle between g_C and g_F... (GradAuto Fig. 2)
``exec_rates.png``          execution rate per gate x class, clean vs adversarial vs difference
                            (LGM paper, Fig. 7 analogue)
``images.png``              clean / adversarial / amplified |adv - clean| for a few samples
``points.png``              the same for point clouds: 3D scatter before / after
==========================  =====================================================================

A part whose data are missing (a static victim has no gates; a run without history) is skipped
and the HTML says why. The HTML embeds nothing from the network: figures are relative
``figures/*.png`` links and the style sheet is inline, so it opens offline. Every file is written
to a temporary name and renamed.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DynattackError
from ..rundir import write_atomic
from .figures import FIGURES, write_figures
from .page import render_page
from .run import load_run

__all__ = ["write_report", "FIGURES"]


def write_report(run_dir) -> Path:
    """Write ``figures/*.png`` and ``report.html`` into ``run_dir``; return the report's path.

    Reads the run directory only (see the package docstring for the figures). Parts whose data are
    missing are skipped and named in the HTML; a figure that fails to draw is named there too (and
    warned about) rather than losing the whole report.

    Raises:
        DynattackError: the directory is missing, has no readable config.json, or one of its JSON
            files is unreadable; or a file cannot be written.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    fig_dir = run_dir / "figures"
    try:
        fig_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise DynattackError(f"cannot create {fig_dir}: {exc.strerror or exc}") from None
    figures, skipped = write_figures(run, fig_dir)
    out = run_dir / "report.html"
    write_atomic(out, render_page(run, figures, skipped))
    return out
