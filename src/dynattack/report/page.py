"""The report's HTML page: headline cards, summary, configuration, figure sections and the
per-sample table. The style sheet is inline and figures are relative ``figures/*.png`` links, so the
page opens offline and embeds nothing from the network."""
from __future__ import annotations

import datetime
import html
import json
import math

from .run import Run

N_TABLE_ROWS = 20  # rows of the per-sample table

# Summary rows: key -> (label, unit kind, meaning). Kinds: text, int, pct (fraction 0-1 shown in %),
# pct100 (already in %), mflops, db, ms, iou, float, seconds.
SUMMARY_ROWS = {
    "victim": ("Victim", "text", "model attacked"),
    "attack": ("Attack", "text", "attack name"),
    "n": ("Samples", "int", "samples attacked"),
    "clean_acc": ("Clean accuracy", "pct", "top-1 on the clean inputs"),
    "adv_acc": ("Adversarial accuracy", "pct", "top-1 on the adversarial inputs"),
    "flops_full": ("FLOPs, all gates on", "mflops", "mean per sample, every unit executed"),
    "flops_clean": ("FLOPs, clean", "mflops", "mean per sample, hard gates"),
    "flops_adv": ("FLOPs, adversarial", "mflops", "mean per sample, hard gates"),
    "recovery_pct": ("Recovery (aggregate)", "pct100",
                     "(ΣF_adv − ΣF_clean) / (ΣF_full − ΣF_clean): share of the saved FLOPs won back"),
    "recovery_pct_mean": ("Recovery (mean per sample)", "pct100", "over samples whose clean run skipped work"),
    "psnr_db": ("PSNR", "db", "mean, images in [0, 1], MAX = 1"),
    "linf": ("L∞ distortion", "linf", "mean per sample"),
    "l2": ("L2 distortion", "float", "mean per sample"),
    "arch_change_pct": ("Architecture change", "pct100", "differing gate decisions over correctly classified samples"),
    "miou_clean": ("mIoU, clean", "iou", "segmentation: mean over classes of the IoU pooled over all points"),
    "miou_adv": ("mIoU, adversarial", "iou", "segmentation: mean over classes of the IoU pooled over all points"),
    "flops_increase_pct": ("FLOPs increase", "pct100", "ΣF_adv / ΣF_clean − 1 (point clouds)"),
    "latency_clean_ms": ("Latency, clean", "ms", "batch 1, real conditional execution"),
    "latency_adv_ms": ("Latency, adversarial", "ms", "batch 1, real conditional execution"),
    "latency_full_ms": ("Latency, all gates on", "ms", "batch 1, every gate forced on"),
    "exit_rates_clean": ("Exit rates, clean", "rates", "multi-exit victims: share of samples stopping at each exit, "
                         "final classifier last"),
    "exit_rates_adv": ("Exit rates, adversarial", "rates", "multi-exit victims: share of samples stopping at each "
                       "exit, final classifier last"),
    "early_exit_efficacy_clean": ("Early-exit efficacy, clean", "float3", "DeepSloth: area under the cumulative "
                                  "share of exited samples vs the fraction of the full network's cost"),
    "early_exit_efficacy_adv": ("Early-exit efficacy, adversarial", "float3", "DeepSloth: area under the cumulative "
                                "share of exited samples vs the fraction of the full network's cost"),
    "iterations_mean": ("Iterations", "float1", "mean attack iterations per sample"),
    "seconds": ("Attack time", "seconds", "summed over every batch and process of the run"),
}
# Per-sample table columns: record key, header, format ("mflops": FLOPs in M, "pct": fraction in %).
SAMPLE_COLUMNS = (
    ("index", "#", "{}"), ("label", "label", "{}"), ("clean_pred", "clean pred", "{}"), ("adv_pred", "adv pred", "{}"),
    ("miou_clean", "mIoU clean", "{:.3f}"), ("miou_adv", "mIoU adv", "{:.3f}"),
    ("acc_clean", "point acc clean (%)", "pct"), ("acc_adv", "point acc adv (%)", "pct"),
    ("flops_clean", "FLOPs clean (M)", "mflops"), ("flops_adv", "FLOPs adv (M)", "mflops"),
    ("recovery", "recovery (%)", "{:.1f}"), ("psnr", "PSNR (dB)", "{:.2f}"), ("linf", "L∞", "{:.4f}"),
    ("l2", "L2", "{:.3f}"), ("iterations", "iterations", "{}"), ("units_changed", "units changed", "{}"),
    ("success", "goal", "{}"),
)
# summary.json's {class: IoU} dicts of a segmentation run -> their column in the per-class IoU table
PER_CLASS_IOU = {"iou_per_class_clean": "clean", "iou_per_class_adv": "adversarial"}


SECTIONS = (
    ("Cost", ("flops", "latency", "recovery_hist")),
    ("The attack over its iterations (first batch)", ("gate_values", "cost_curves", "attack_stats")),
    ("Execution rates", ("exec_rates",)),
    ("Inputs", ("images", "points")),
)



def _fmt(kind: str, v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if kind == "rates" and isinstance(v, list):  # shares per exit
        return " / ".join("n/a" if x is None else f"{100 * x:.1f}" for x in v) + " %"
    if isinstance(v, (dict, list)):  # a figure the page does not know: compact, in a wrapped cell
        return json.dumps(v, separators=(", ", ": "))
    if kind == "text" or not isinstance(v, (int, float)) or isinstance(v, bool):
        return str(v)
    if kind == "int":
        return f"{int(v):,}"
    if kind == "pct":
        return f"{v * 100:.2f} %"
    if kind == "pct100":
        return f"{v:.2f} %"
    if kind == "mflops":
        return f"{v / 1e6:.3f} M"
    if kind == "db":
        return f"{v:.2f} dB"
    if kind == "ms":
        return f"{v:.3f} ms"
    if kind == "linf":
        return f"{v:.4f} ({v * 255:.2f}/255)"
    if kind == "seconds":
        return f"{v:.1f} s" if v < 120 else f"{v:.1f} s ({datetime.timedelta(seconds=round(v))})"
    if kind == "float1":
        return f"{v:.1f}"
    if kind == "float3":
        return f"{v:.3f}"
    if kind == "iou":
        return f"{v:.3f}"
    return f"{v:.4g}"


def _summary_table(run: Run) -> str:
    if run.summary is None:
        return "<p class='note'>No summary.json yet: the run has not finished.</p>"
    rows = []
    per_class = _per_class_iou(run)
    keys = list(SUMMARY_ROWS) + [k for k in run.summary if k not in SUMMARY_ROWS and k not in per_class]
    for key in keys:
        if key not in run.summary:
            continue
        label, kind, meaning = SUMMARY_ROWS.get(key, (key, "float", ""))
        v = run.summary[key]
        cls = " class='na'" if v is None else ""
        cell = "long" if isinstance(v, (dict, list)) else "num"
        rows.append(f"<tr{cls}><th>{html.escape(label)}</th><td class='{cell}' title='{html.escape(repr(v))}'>"
                    f"{html.escape(_fmt(kind, v))}</td><td class='meaning'>{html.escape(meaning)}"
                    f" <code>{html.escape(key)}</code></td></tr>")
    full, clean = run.value("flops_full"), run.value("flops_clean")
    if full and clean is not None:
        rows.append(f"<tr class='derived'><th>Clean FLOPs / all-on</th><td class='num'>{clean / full * 100:.1f} %</td>"
                    "<td class='meaning'>compute the victim keeps on clean inputs (derived)</td></tr>")
    if run.records:
        succ = [bool(r["success"]) for r in run.records if r.get("success") is not None]
        if succ:
            rows.append(f"<tr class='derived'><th>Attack goal reached</th><td class='num'>"
                        f"{sum(succ) / len(succ) * 100:.1f} %</td><td class='meaning'>samples whose goal "
                        f"(all gates on / misclassified) holds (from samples.jsonl, {len(succ)} samples)</td></tr>")
    return "<table class='summary'><thead><tr><th>Figure</th><th>Value</th><th>Meaning</th></tr></thead><tbody>" + \
        "".join(rows) + "</tbody></table>"


def _per_class_iou(run: Run) -> dict[str, dict]:
    """key -> {class: IoU} of the per-class IoU dicts in summary.json (segmentation runs)."""
    summary = run.summary or {}
    return {key: summary[key] for key in PER_CLASS_IOU if isinstance(summary.get(key), dict)}


def _iou_table(run: Run) -> str:
    """One row per class (classes in summary.json's order), clean and adversarial IoU side by side."""
    per_class = _per_class_iou(run)
    if not per_class:
        return ""
    classes = list(dict.fromkeys(c for ious in per_class.values() for c in ious))
    head = "<th>class</th>" + "".join(f"<th>{html.escape(col)}</th>" for col in PER_CLASS_IOU.values())
    body = "".join(
        f"<tr><th>{html.escape(str(c))}</th>"
        + "".join(f"<td class='num'>{html.escape(_fmt('iou', per_class.get(key, {}).get(c)))}</td>"
                  for key in PER_CLASS_IOU)
        + "</tr>" for c in classes)
    keys = ", ".join(f"<code>{k}</code>" for k in PER_CLASS_IOU)
    return (f"<h3>Per-class IoU</h3><table class='iou'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<p class='caption'>IoU of each class pooled over all points of all scenes ({keys}); n/a: a class "
            "neither present nor predicted.</p>")


def _exit_table(run: Run) -> str:
    """Multi-exit victims: one row per exit (the final classifier last), clean and adversarial
    exit rates side by side, and the early-exit efficacy with its relative change."""
    summary = run.summary or {}
    clean, adv = summary.get("exit_rates_clean"), summary.get("exit_rates_adv")
    if not isinstance(clean, list) or not isinstance(adv, list):
        return ""
    names = [f"exit {k + 1}" for k in range(len(clean) - 1)] + ["final"]
    body = "".join(f"<tr><th>{html.escape(name)}</th><td class='num'>{html.escape(_fmt('pct', c))}</td>"
                   f"<td class='num'>{html.escape(_fmt('pct', a))}</td></tr>" for name, c, a in zip(names, clean, adv))
    e_clean, e_adv = summary.get("early_exit_efficacy_clean"), summary.get("early_exit_efficacy_adv")
    change = ""
    if e_clean and e_adv is not None:
        change = f" ({(e_adv - e_clean) / e_clean * 100:+.1f} %)"
    body += (f"<tr class='derived'><th>efficacy</th><td class='num'>{html.escape(_fmt('float3', e_clean))}</td>"
             f"<td class='num'>{html.escape(_fmt('float3', e_adv) + change)}</td></tr>")
    return ("<h3>Early exits</h3><table class='iou'><thead><tr><th>exit</th><th>clean</th><th>adversarial</th></tr>"
            f"</thead><tbody>{body}</tbody></table><p class='caption'>Share of the samples stopping at each exit "
            "(<code>exit_rates_clean</code>, <code>exit_rates_adv</code>) and DeepSloth's early-exit efficacy, the "
            "area under the early-exit capability curve (<code>early_exit_efficacy_*</code>; a slowdown attack "
            "lowers it).</p>")


def _headline(run: Run) -> str:
    cards = []
    for key in ("recovery_pct", "psnr_db", "clean_acc", "adv_acc", "latency_adv_ms"):
        v = run.value(key)
        if v is None:
            continue
        label, kind, _ = SUMMARY_ROWS[key]
        cards.append(f"<div class='card'><div class='big'>{html.escape(_fmt(kind, v))}</div>"
                     f"<div class='small'>{html.escape(label)}</div></div>")
    return f"<div class='cards'>{''.join(cards)}</div>" if cards else ""


def _config_table(config: dict) -> str:
    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    cells = [f"<th>{html.escape(k)}</th><td><code>{html.escape(json.dumps(v))}</code></td>" for k, v in flat(config)]
    per_row = 3
    rows = "".join("<tr>" + "".join(cells[i:i + per_row]) + "</tr>" for i in range(0, len(cells), per_row))
    return f"<table class='config'><tbody>{rows}</tbody></table>"


def _sample_table(run: Run) -> str:
    if not run.records:
        return "<p class='note'>No finished sample.</p>"
    shown = run.records[:N_TABLE_ROWS]
    # a column only when the records hold its key: classification and segmentation runs record different ones
    cols = [c for c in SAMPLE_COLUMNS if any(c[0] in r for r in shown)]
    head = "".join(f"<th>{html.escape(c[1])}</th>" for c in cols)
    body = []
    for r in shown:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            if v is None:
                s = "∞" if key == "psnr" and r.get("l2") == 0 else "n/a"
            elif fmt == "mflops":
                s = f"{v / 1e6:.3f}"
            elif fmt == "pct":
                s = f"{v * 100:.1f}"
            elif isinstance(v, bool):
                s = "yes" if v else "no"
            else:
                s = fmt.format(v)
            cells.append(f"<td class='num'>{html.escape(s)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p class='note'>First {N_TABLE_ROWS} of {len(run.records)} samples; all are in samples.jsonl.</p>" \
        if len(run.records) > N_TABLE_ROWS else ""
    return f"<table class='samples'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


CSS = """
html{background:#f5f6f8}
body{font-family:-apple-system,'Segoe UI','DejaVu Sans',Helvetica,Arial,sans-serif;margin:0;background:#f5f6f8;color:#222}
main{max-width:1240px;margin:0 auto;padding:24px 28px 48px;background:#fff}
h1{font-size:26px;margin:0 0 4px} h2{font-size:20px;border-bottom:2px solid #e3e6ea;padding-bottom:4px;margin-top:34px}
.sub{color:#666;margin:0 0 16px}
.cards{display:flex;gap:14px;flex-wrap:wrap;margin:16px 0}
.card{flex:1 1 150px;background:#f0f3f8;border-radius:8px;padding:12px 16px}
.card .big{font-size:24px;font-weight:600} .card .small{color:#555;font-size:13px}
table{border-collapse:collapse;font-size:14px;margin:8px 0}
th,td{padding:5px 10px;border-bottom:1px solid #e6e8eb;text-align:left;vertical-align:top}
h3{font-size:16px;margin:22px 0 4px}
table.summary th{white-space:nowrap} table.config td{padding-right:28px;overflow-wrap:anywhere}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.long{font-size:13px;max-width:520px;overflow-wrap:anywhere}
table.iou td.num{min-width:90px}
.caption{color:#444;font-size:13px;margin:2px 0 8px}
td.meaning{color:#555;font-size:13px} tr.na td.num{color:#aaa} tr.derived th{font-style:italic}
table.samples th{font-size:12px;background:#f4f5f7} table.samples td{font-size:13px}
code{font-size:12px;color:#444}
figure{margin:18px 0 26px} figure img{max-width:100%;height:auto;border:1px solid #e3e6ea}
figcaption{color:#444;font-size:14px;margin-top:6px}
.note{color:#8a6d3b;background:#fcf8e3;border-left:4px solid #f0d87a;padding:6px 10px;font-size:14px}
details{margin:10px 0} pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:24px} @media(max-width:900px){.grid2{grid-template-columns:1fr}}
"""


def render_page(run: Run, figures: dict[str, str], skipped: dict[str, str]) -> str:
    cfg = run.config
    title = f"{cfg.get('attack', '?')} on {cfg.get('victim', '?')}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>dynattack report: {html.escape(title)}</title><style>{CSS}</style></head><body><main>",
             f"<h1>dynattack report: {html.escape(title)}</h1>",
             f"<p class='sub'>{html.escape(str(run.run_dir))} · {len(run.records)} finished samples · written "
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}</p>"]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in run.notes]
    parts += [_headline(run), "<h2>Summary</h2>", _summary_table(run), _iou_table(run), _exit_table(run)]
    parts += ["<h2>Configuration</h2>", _config_table(cfg)]
    if run.summary is not None:
        parts.append("<details><summary>summary.json</summary><pre>"
                     f"{html.escape(json.dumps(run.summary, indent=2))}</pre></details>")
    for section, names in SECTIONS:
        body = []
        for name in names:
            if name in figures:
                body.append(f"<figure id='{name}'><img src='figures/{name}.png' alt='{html.escape(name)}'>"
                            f"<figcaption>{html.escape(figures[name])}</figcaption></figure>")
        missing: dict[str, list[str]] = {}  # reason -> figures skipped for it
        for name in names:
            if name in skipped and not (name in ("images", "points") and {"images", "points"} & set(figures)):
                missing.setdefault(skipped[name], []).append(name)
        for reason, group in missing.items():
            listed = ", ".join(f"<code>{n}.png</code>" for n in group)
            body.append(f"<p class='note'>No {listed}: {html.escape(reason)}.</p>")
        if body:
            parts += [f"<h2>{html.escape(section)}</h2>", *body]
    parts += ["<h2>Samples</h2>", _sample_table(run)]
    parts.append("</main></body></html>\n")
    return "\n".join(parts)
