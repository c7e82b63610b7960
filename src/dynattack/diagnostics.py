"""Why an energy attack left a victim short of all-on: per-gate evidence, not inference.

:func:`diagnose` takes a gated model, clean inputs and (optionally) the inputs an energy attack
reached, and answers for every gate (a scalar gate, or a group of units: a channel or spatial
gate's units are one row, counted unit by unit):

* **on-rate** clean and at the attack's end (fraction of (image, unit) pairs that run);
* **ever on**: does any *tried input* turn the unit on in the natural (hard) run? The tried
  inputs are the clean images, the attack's images and probes with no distortion limit, each
  started from the attack's images (Adam on the input, clipped to [0, 1], every iteration
  counted): ``push`` raises every gate logit of the natural network (the "ceiling" of
  ``bench/energy_tables.py``), ``fixed_point`` raises every logit of the network with every
  gate forced on (the hinge GradAuto's ``objective=fixed_point`` descends), ``unreached`` then
  raises, in the natural network, only the logits of the units no natural run has switched on
  yet (so that they need not compete with the others), and the each-gate probe pushes each
  scalar gate still off alone (natural network);
* **on alone**: with every *other* gate forced on (the forced-on network, :func:`force_gates`),
  is the unit's logit ``>= 0`` (``q > 0`` for strict gates): could it be on if the others
  were? A unit off at the attack's end but on alone there is *blocked by the others' decisions*;
  one off even alone is *off whatever the others do* at that input;
* **on together**: per image, every unit of every gate on alone at once: the fixed point, which
  is exactly the natural run being all-on (a network with every gate on is the forced-on one);
* **exhaustive forcing** (:func:`exhaustive_forcing`, scalar gates, at most ``max_k`` gates off
  per image): for each image, every subset S of its off gates forced on (the others natural,
  :func:`~dynattack.gates.force_named`): the smallest S that makes every gate run, the smallest
  S under which each off gate's own logit turns ``>= 0`` (none: "off whatever the other off
  gates do at this input"; empty is impossible, the gate is off), and the gates naturally on
  that some S switches off (conflicts). This separates "blocked by an earlier decision" from
  "off at this input whatever the others do".

**Reachable maximum.** A unit is *unreachable* when no tried input turns it on in the natural
run (the only evidence that it can run at all: "on alone" is not, a derived gate such as a
dilated mask passes it trivially once the mask it reads is forced on); the reachable all-on cost
is the FLOPs with every other unit on (:func:`dynattack.cost.executed_flops` of the forced-on trace with the
unreachable units' decisions off, nesting applied), and recovery is also reported against it:
``(sum F_adv - sum F_clean) / (sum F_reach - sum F_clean)``. This is evidence from the tried
inputs, not a proof: a unit the probes never switch on may still have an input that does. A
*proof* that a unit can never run needs the family's structure: ``unreachable`` (a dict of
gate name -> bool mask of the unit shape, True = provably never on) adds such units, e.g. a
ManiDP channel whose saliency has a bias below the threshold and no positive weight from any
hidden unit that can be positive (its inputs are ReLU outputs) (``bench/energy_diagnostics.py``
checks this from the weights; this module never imports a model family).

What "all on" should mean for a family with unreachable units: the reachable maximum, since no
input runs the rest. The diagnostics report both recoveries; the attacks still aim at, and
``summary.json`` still reports against, the full network.

Imports: gates, cost, metrics only (no model family, no attack).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from . import cost
from .errors import DynattackError
from .gates import Gate, Trace, force_gates, force_named, iter_gates

PROBES = ("push", "fixed_point")


# ----------------------------------------------------------------------------------- traces


def _gates(model: nn.Module) -> dict[str, Gate]:
    return {g.name: g for _, g in iter_gates(model)}


def _events(trace: Trace, n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (logit, decision), each ``(n, *unit_shape)``; a gate called twice in a forward is
    refused (cost refuses it too); rows a sub-batch call skipped: logit -inf, off."""
    out = {}
    for e in trace:
        if e.name in out:
            raise DynattackError(f"gate {e.name} was called twice in one forward: diagnose one forward at a time")
        out[e.name] = (e.full("logit", n, float("-inf")).detach(), e.full("decision", n, False))
    return out


def run_hard(model: nn.Module, x: torch.Tensor, on=(), all_on: bool = False):
    """The hard network on ``x`` (no gradient), gates named in ``on`` forced on (or all of them):
    ``(trace, name -> (logit, decision))``."""
    ctx = force_gates(model, "on") if all_on else force_named(model, on=on)
    with ctx, torch.no_grad(), Trace() as trace:
        model(x)
    return trace, _events(trace, x.shape[0])


def on_alone(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """name -> bool ``(n, *unit_shape)``: the unit's logit passes its gate's test in the network
    with every gate forced on (could it be on if every other gate were)."""
    gates = _gates(model)
    _, ev = run_hard(model, x, all_on=True)
    return {k: gates[k].decide(q) for k, (q, _) in ev.items()}


def _probe(model: nn.Module, x: torch.Tensor, kind: str, steps: int, lr: float,
           only: dict[str, torch.Tensor] | None = None):
    """Adam on the input (clipped to [0, 1]), no distortion term. ``push``: natural network,
    loss ``-sum min(q, 1)``; ``fixed_point``: forced-on network, loss ``sum relu(1 - q)``.
    ``only`` (name -> bool unit mask): push only those units (the others' logits are left out
    of the loss). Returns (final input, name -> ever-on-naturally, name -> ever-on-alone),
    unions over the iterations (bool ``(n, *unit_shape)``)."""
    gates = _gates(model)
    z = x.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    ever_nat: dict[str, torch.Tensor] = {}
    ever_alone: dict[str, torch.Tensor] = {}

    def union(d, name, m):
        d[name] = m if name not in d else d[name] | m

    with torch.enable_grad():
        for _ in range(steps):
            ctx = force_gates(model, "on") if kind == "fixed_point" else force_named(model)
            with ctx, Trace() as trace:
                model(z.clamp(0, 1))
            qs = []
            for e in trace:
                q = e.full("logit", x.shape[0], 0.0)
                if only is None:
                    qs.append(q.reshape(x.shape[0], -1))
                elif e.name in only and bool(only[e.name].any()):
                    qs.append(q[:, only[e.name]].reshape(x.shape[0], -1))
                if kind == "fixed_point":
                    union(ever_alone, e.name, gates[e.name].decide(q.detach()))
                else:
                    union(ever_nat, e.name, e.full("decision", x.shape[0], False))
            if not qs:
                break
            q = torch.cat(qs, 1)
            loss = torch.relu(1.0 - q).sum() if kind == "fixed_point" else -q.clamp(max=1.0).sum()
            opt.zero_grad()
            if loss.requires_grad:
                loss.backward()
                opt.step()
    return z.detach().clamp(0, 1), ever_nat, ever_alone


def _probe_each(model: nn.Module, x: torch.Tensor, names: list[str], steps: int, lr: float):
    """Each scalar gate of ``names`` pushed alone (its logit up to +2, natural network, no
    distortion limit), one copy of ``x`` per gate in one batch. Returns name -> bool ``(n,)``:
    the gate ran at some iteration of its own push, and bool ``(n,)``: some iteration of some
    push ran every gate (every unit of every gate on)."""
    n, k = x.shape[0], len(names)
    z = x.detach().repeat(k, *[1] * (x.dim() - 1)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    ever = {g: torch.zeros(n, dtype=torch.bool) for g in names}
    all_on = torch.zeros(n, dtype=torch.bool)
    with torch.enable_grad():
        for _ in range(steps):
            with force_named(model), Trace() as trace:
                model(z.clamp(0, 1))
            ev = {e.name: e for e in trace}
            every = torch.ones(n * k, dtype=torch.bool)
            for e in trace:
                every &= e.full("decision", n * k, False).reshape(n * k, -1).all(1).cpu()
            all_on |= every.view(k, n).any(0)
            loss = 0.0
            for j, g in enumerate(names):
                q = ev[g].full("logit", n * k, 0.0).reshape(n * k)[j * n:(j + 1) * n]
                ever[g] |= ev[g].full("decision", n * k, False).reshape(n * k)[j * n:(j + 1) * n].cpu()
                loss = loss - q.clamp(max=2.0).sum()
            opt.zero_grad()
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                loss.backward()
                opt.step()
    return ever, all_on


# ------------------------------------------------------------------------- exhaustive forcing


def exhaustive_forcing(model: nn.Module, x: torch.Tensor, max_k: int = 10) -> dict:
    """Every subset of each image's off scalar gates forced on (see the module docstring).

    Images are grouped by their set of off gates; a group with more than ``max_k`` off gates is
    skipped with a note. Gates with more than one unit per sample are left natural and named in
    a note (exhaustive forcing is for scalar gates). Returns a JSON-able dict: ``gates``,
    ``per_image`` (one dict per image: ``off`` gates, ``all_on_by_forcing`` (smallest subset to
    force for every gate to run, or None), ``natural_all_on_possible`` (a subset whose forced
    gates' own logits pass too: the fixed point), ``switch_on`` (off gate -> smallest subset
    under which its own logit passes, None if none), ``switched_off`` (gate on naturally ->
    smallest subset that turns it off)), ``subsets_run``, ``notes``.
    """
    n = x.shape[0]
    gates = _gates(model)
    _, ev = run_hard(model, x)
    names = list(ev)
    scalar = [k for k in names if ev[k][1][0].numel() == 1]
    notes = []
    wide = [k for k in names if k not in scalar]
    if wide:
        notes.append(f"{len(wide)} gates with more than one unit per sample left natural "
                     f"(exhaustive forcing covers scalar gates): {', '.join(wide[:4])}{' ...' if len(wide) > 4 else ''}")
    if not scalar:
        return {"gates": [], "per_image": [], "subsets_run": 0, "max_k": max_k, "notes": notes}
    dec = {k: ev[k][1].reshape(n) for k in scalar}
    off_sets = [tuple(k for k in scalar if not bool(dec[k][i])) for i in range(n)]
    per_image: list[dict | None] = [None] * n
    runs = 0
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(off_sets):
        groups.setdefault(s, []).append(i)
    for off, rows in groups.items():
        if len(off) > max_k:
            notes.append(f"{len(rows)} images with {len(off)} gates off (> {max_k}): not enumerated")
            for i in rows:
                per_image[i] = {"off": list(off), "skipped": True}
            continue
        xs = x[rows]
        best_all = [None] * len(rows)
        best_nat = [None] * len(rows)
        switch_on = [{g: None for g in off} for _ in rows]
        switched_off = [{} for _ in rows]
        # subsets in order of size: the first one found is a smallest one
        for size in range(len(off) + 1):
            for S in itertools.combinations(off, size):
                _, evs = run_hard(model, xs, on=S)
                runs += 1
                d = {k: evs[k][1].reshape(len(rows)) for k in scalar}
                passes = {k: gates[k].decide(evs[k][0].reshape(len(rows))) for k in scalar}
                every = torch.stack([d[k] for k in scalar], 1).all(1)
                own = torch.stack([passes[k] for k in S], 1).all(1) if S else torch.ones_like(every)
                for j in range(len(rows)):
                    if bool(every[j]) and best_all[j] is None:
                        best_all[j] = list(S)
                    if bool(every[j] & own[j]) and best_nat[j] is None:
                        best_nat[j] = list(S)
                    for g in off:
                        if g not in S and switch_on[j][g] is None and bool(passes[g][j]):
                            switch_on[j][g] = list(S)
                    for g in scalar:
                        if g not in off and g not in switched_off[j] and not bool(d[g][j]):
                            switched_off[j][g] = list(S)
        for j, i in enumerate(rows):
            per_image[i] = {"off": list(off), "skipped": False, "all_on_by_forcing": best_all[j],
                            "natural_all_on_possible": best_nat[j] is not None,
                            "switch_on": switch_on[j], "switched_off": switched_off[j]}
    return {"gates": scalar, "per_image": per_image, "subsets_run": runs, "max_k": max_k, "notes": notes}


def summarize_forcing(ex: dict) -> dict:
    """Per-gate counts over the images of an :func:`exhaustive_forcing` result: images where
    the gate is off (``images_off``), of which its logit turns >= 0 once some other off gates are
    forced on (``by_forcing``: blocked by those decisions) or under no subset (``never``: off
    whatever the other off gates do), the median size of the smallest such subset, and images
    where some forced subset switches the gate, naturally on, off; plus images switched all-on
    by some subset and images where some subset is a fixed point (natural all-on possible)."""
    imgs = [p for p in ex["per_image"] if p is not None and not p.get("skipped")]
    rows = {}
    for g in ex["gates"]:
        off = [p for p in imgs if g in p["off"]]
        by = [p for p in off if p["switch_on"][g] is not None]
        sizes = [len(p["switch_on"][g]) for p in by]
        rows[g] = {"images_off": len(off), "by_forcing": len(by), "never": len(off) - len(by),
                   "min_subset_median": (sorted(sizes)[len(sizes) // 2] if sizes else None),
                   "switched_off_images": sum(1 for p in imgs if g in p["switched_off"])}
    return {"images": len(imgs), "skipped": len(ex["per_image"]) - len(imgs),
            "all_on_by_forcing": sum(1 for p in imgs if p["all_on_by_forcing"] is not None),
            "natural_all_on_possible": sum(1 for p in imgs if p["natural_all_on_possible"]),
            "off_gates_per_image": [len(p["off"]) for p in imgs], "gates": rows}


# ------------------------------------------------------------------------------- the report


@dataclass
class Diagnosis:
    """What :func:`diagnose` found; ``to_json()`` for diagnostics.json, ``markdown()`` for people."""

    gates: list[dict]
    images: int
    inputs: list[str]
    flops: dict
    together: dict
    exhaustive: dict | None = None  # tried input name -> exhaustive_forcing result (with its "summary")
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"images": self.images, "inputs": self.inputs, "flops": self.flops, "together": self.together,
                "gates": self.gates, "exhaustive": self.exhaustive, "notes": self.notes}

    def markdown(self, title: str = "") -> str:
        f = self.flops
        lines = [f"### {title or 'Why not all-on'}", ""]
        lines += [
            f"{self.images} images; tried inputs: {', '.join(self.inputs)}. FLOPs per sample: full "
            f"{f['full'] / 1e6:.2f} M, reachable maximum {f['reachable_mean'] / 1e6:.2f} M, clean "
            f"{f['clean_mean'] / 1e6:.2f} M" + (f", attack {f['adv_mean'] / 1e6:.2f} M" if f.get("adv_mean") is not None
                                                 else "") + ".",
            "",
        ]
        if f.get("recovery_full") is not None:
            lines += [f"Recovery vs full {f['recovery_full']:.1f} %, vs reachable maximum "
                      f"{f['recovery_reachable']:.1f} %; units unreachable (never on in the natural run of any "
                      f"tried input): {f['unreachable_units']} of {f['units']} "
                      f"({f['unreachable_cost_pct']:.1f} % of the gated FLOPs).", ""]
        t = self.together
        lines += [f"Images all-on at the attack's end: {t['natural_all_on_end']}; on together (fixed point: every "
                  f"unit on alone at once) at the attack's input: {t['together_end']}, at any tried input: "
                  f"{t['together_any']}; lowest forced-on logit at the attack's input, median over images: "
                  f"{t['min_alone_logit_median']:.3g}." + (
                      "" if t.get("each_push_all_on") is None else
                      f" Each off gate pushed alone: images where some push ran every gate: "
                      f"{t['each_push_all_on']} of {t['each_push_images']}."), ""]
        lines += ["| gate | units | cost % | on clean | on at end | off at end: on alone (blocked by others) "
                  "| off at end: on at another tried input | off at end: never on at this image | units never on "
                  "| switched on by pushing it alone | highest logit: natural / others forced on |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.gates:
            lines.append(f"| {r['gate']} | {r['units']} | {r['cost_pct']:.1f} | {r['on_clean_pct']:.1f} % | "
                         f"{r['on_end_pct']:.1f} % | {r['off_end_alone_pct']:.1f} % | {r['off_end_elsewhere_pct']:.1f} % "
                         f"| {r['off_end_never_pct']:.1f} % | {r['units_never_on']} | "
                         f"{'-' if r['pushed_alone_pct'] is None else format(r['pushed_alone_pct'], '.0f') + ' %'} | "
                         f"{r['logit_max']:.3g} / {r['alone_logit_max']:.3g} |")
        lines += ["", "Off-at-end columns: % of all (image, unit) pairs of the gate; they add up to 100 - on at end. "
                  "Units never on: never on in the natural run of any tried input (excluded from the reachable "
                  "maximum). Highest logit: over every unit, image and tried input (on needs >= 0)."]
        for at, ex in (self.exhaustive or {}).items():
            s = ex["summary"]
            where = {"attack": "the attack's input", "clean": "the clean input"}.get(at, f"the {at} input")
            lines += ["", f"Exhaustive forcing at {where} ({ex['subsets_run']} forced forwards, "
                      f"{s['images']} images, {s['skipped']} skipped): images switched all-on by forcing some of "
                      f"their off gates: {s['all_on_by_forcing']}; images where some forced subset is a fixed point "
                      f"(natural all-on possible at this input): {s['natural_all_on_possible']}.", "",
                      "| gate | images off | switched on by forcing other off gates | off whatever the others do "
                      "| median smallest subset | images where forcing turns it off |", "|---|---|---|---|---|---|"]
            for g, r in s["gates"].items():
                if r["images_off"] or r["switched_off_images"]:
                    lines.append(f"| {g} | {r['images_off']} | {r['by_forcing']} | {r['never']} | "
                                 f"{'-' if r['min_subset_median'] is None else r['min_subset_median']} | "
                                 f"{r['switched_off_images']} |")
        for note in self.notes + [f"{at}: {x}" for at, ex in (self.exhaustive or {}).items() for x in ex["notes"]]:
            lines += ["", f"Note: {note}"]
        return "\n".join(lines) + "\n"


def _mask_trace(trace: Trace, keep: dict[str, torch.Tensor]) -> Trace:
    """A copy of ``trace`` whose decisions are ``keep[name]`` (broadcast over the batch)."""
    out = Trace()
    out.input_shapes, out.batch_sizes, out.forward_starts = (list(trace.input_shapes), list(trace.batch_sizes),
                                                             list(trace.forward_starts))
    for e in trace:
        d = keep[e.name].to(e.decision.device)
        if e.rows is not None:
            d = d[e.rows]
        out.events.append(replace(e, decision=d.expand_as(e.decision).clone()))
    return out


def diagnose(model: nn.Module, clean: torch.Tensor, adv: torch.Tensor | None = None, *,
             probe_steps: int = 100, probe_lr: float = 0.05, extra: dict[str, torch.Tensor] | None = None,
             unreachable: dict[str, torch.Tensor] | None = None, exhaustive: tuple = ("attack", "clean"),
             max_k: int = 10, each_steps: int | None = None, each_images: int | None = None) -> Diagnosis:
    """Per-gate why-not table of ``model`` on ``clean`` and the attack's ``adv`` (same shape;
    None: the clean images stand for the attack's end). ``probe_steps``: iterations of each
    probe (0: no probe); ``extra``: more tried inputs by name; ``unreachable``: units proven
    never on (see the module docstring); ``exhaustive``: the tried inputs (names: ``attack``,
    ``clean``, a probe's) at which to run :func:`exhaustive_forcing` when the model has scalar
    gates (``()``: none); ``Diagnosis.exhaustive`` maps each to its result. ``each_steps`` (default ``probe_steps``;
    0: none): a third probe, each scalar gate off at the end on some image pushed alone (at
    most ``max_k`` of them, on the first ``each_images`` images, default all): the "on under
    some input" test gate by gate, whose union over gates says nothing of "together"."""
    model.eval()
    if clean.dim() < 2 or (adv is not None and adv.shape != clean.shape):
        raise DynattackError("diagnose: clean and adversarial inputs must be batches of the same shape")
    cost.check_input(model, clean, "diagnose")
    n = clean.shape[0]
    end = clean if adv is None else adv
    gates = _gates(model)
    inputs = {"clean": clean, "attack": end}
    ever_nat: dict[str, torch.Tensor] = {}
    ever_alone: dict[str, torch.Tensor] = {}

    def union(d, src):
        for k, m in src.items():
            d[k] = m if k not in d else d[k] | m

    for kind in PROBES if probe_steps > 0 else ():
        z, nat, alone = _probe(model, end, kind, probe_steps, probe_lr)
        union(ever_nat, nat)
        union(ever_alone, alone)
        inputs[kind] = z
    for k, v in (extra or {}).items():
        inputs[k] = v
    notes = []
    each_steps = probe_steps if each_steps is None else each_steps
    pushed, each_all_on, m = {}, None, min(n, each_images or n)
    if each_steps > 0:
        _, ev_end = run_hard(model, end)
        off = [k for k, (_, d) in ev_end.items() if d[0].numel() == 1 and not bool(d.all())]
        if 0 < len(off) <= max_k:
            pushed, each_all_on = _probe_each(model, end[:m], off, each_steps, probe_lr)
            for k, e in pushed.items():
                e_full = torch.zeros(n, dtype=torch.bool)
                e_full[:m] = e
                union(ever_nat, {k: e_full.to(end.device).reshape(ev_end[k][1].shape)})
            notes.append(f"each-gate probe: {len(off)} scalar gates off at the end, each pushed alone "
                         f"({each_steps} Adam steps, images 0-{m - 1})")
        elif len(off) > max_k:
            notes.append(f"each-gate probe skipped: {len(off)} scalar gates off at the end (> {max_k})")
    nat_at, alone_at, logit_alone_end = {}, {}, None
    logit_max: dict[str, float] = {}  # highest logit of the gate, any unit, image and tried input
    alone_max: dict[str, float] = {}  # the same in the forced-on network

    def evaluate(name, x):
        nonlocal logit_alone_end
        _, ev = run_hard(model, x)
        nat_at[name] = {k: d for k, (_, d) in ev.items()}
        _, evf = run_hard(model, x, all_on=True)
        alone_at[name] = {k: gates[k].decide(q) for k, (q, _) in evf.items()}
        for src, best in ((ev, logit_max), (evf, alone_max)):
            for k, (q, _) in src.items():
                best[k] = max(best.get(k, float("-inf")), float(q.max()))
        if name == "attack":
            logit_alone_end = {k: q for k, (q, _) in evf.items()}
        union(ever_nat, nat_at[name])
        union(ever_alone, alone_at[name])

    for name, x in inputs.items():
        evaluate(name, x)
    names = list(alone_at["clean"])  # call order of the forced-on network: every gate runs there
    if probe_steps > 0:  # the units no natural run has switched on yet, pushed on their own
        todo = {k: ~ever_nat.get(k, torch.zeros_like(ever_alone[k])).any(0) for k in names}
        if any(bool(t.any()) for t in todo.values()):
            z, nat, _ = _probe(model, end, "push", probe_steps, probe_lr, only=todo)
            union(ever_nat, nat)
            inputs["unreached"] = z
            evaluate("unreached", z)
    for k in names:  # a gate the natural run never called (nested early exit) never ran naturally
        ever_nat.setdefault(k, torch.zeros_like(ever_alone[k]))
        for name in inputs:
            nat_at[name].setdefault(k, torch.zeros_like(ever_alone[k]))
    ever = {k: ever_nat[k] | ever_alone[k] for k in names}  # (n, *u): this image, some tried input
    reach = {k: ever_nat[k].any(0) for k in names}  # (*u): on in the natural run of some tried input
    if unreachable:
        for k, m in unreachable.items():
            if k not in reach:
                raise DynattackError(f"diagnose: unreachable names no gate of the model: {k}")
            reach[k] = reach[k] & ~m.to(reach[k].device).reshape(reach[k].shape)

    # FLOPs: full, reachable maximum (forced-on trace with the unreachable units off), clean, end
    ftrace, _ = run_hard(model, clean, all_on=True)
    prof = cost.profile(model, tuple(clean.shape[1:]))
    f_full = cost.full_flops_per_sample(model, clean)
    f_reach = cost.executed_flops(model, _mask_trace(ftrace, reach)).to(f_full)
    traces = {}
    for name in ("clean", "attack"):
        tr, _ = run_hard(model, inputs[name])
        traces[name] = cost.executed_flops(model, tr).to(f_full)
    f_clean, f_adv = traces["clean"], traces["attack"]
    unit_cost = {e.name: torch.as_tensor(e.unit_cost, dtype=torch.float64).expand(e.logit.shape[1:]).cpu()
                 for e in ftrace}
    gated_total = float(sum(unit_cost[k].sum() for k in names))
    unreach_cost = float(sum((unit_cost[k] * (~reach[k]).cpu().double()).sum() for k in names))
    flops = {
        "full": float(f_full.mean()), "reachable_mean": float(f_reach.mean()), "clean_mean": float(f_clean.mean()),
        "adv_mean": float(f_adv.mean()) if adv is not None else None,
        "recovery_full": cost.recovery_aggregate(f_clean, f_adv, f_full) if adv is not None else None,
        "recovery_reachable": cost.recovery_aggregate(f_clean, f_adv, f_reach) if adv is not None else None,
        "kept_clean_pct": float(f_clean.sum() / f_full.sum() * 100),
        "reachable_pct_of_full": float(f_reach.sum() / f_full.sum() * 100),
        "units": int(sum(reach[k].numel() for k in names)),
        "unreachable_units": int(sum(int((~reach[k]).sum()) for k in names)),
        "unreachable_cost_pct": 100.0 * unreach_cost / gated_total if gated_total > 0 else 0.0,
        "static": float(prof.static),
    }

    rows = []
    for k in names:
        u = int(reach[k].numel())
        total = n * u
        on_end = nat_at["attack"][k]
        off_end = ~on_end
        alone_end = alone_at["attack"][k]
        blocked = off_end & alone_end
        elsewhere = off_end & ~alone_end & ever[k]
        never_here = off_end & ~alone_end & ~ever[k]
        rows.append({
            "gate": k, "units": u, "unit_shape": list(reach[k].shape),
            "cost_pct": 100.0 * float(unit_cost[k].sum()) / gated_total if gated_total > 0 else 0.0,
            "on_clean_pct": 100.0 * int(nat_at["clean"][k].sum()) / total,
            "on_end_pct": 100.0 * int(on_end.sum()) / total,
            "off_end_alone_pct": 100.0 * int(blocked.sum()) / total,
            "off_end_elsewhere_pct": 100.0 * int(elsewhere.sum()) / total,
            "off_end_never_pct": 100.0 * int(never_here.sum()) / total,
            "units_ever_on_natural": int(ever_nat[k].any(0).sum()),
            "units_ever_on_alone": int(ever_alone[k].any(0).sum()),
            "units_never_on": int((~reach[k]).sum()),
            "logit_max": logit_max.get(k), "alone_logit_max": alone_max.get(k),
            "never_on_units": (~reach[k]).nonzero().tolist() if 0 < int((~reach[k]).sum()) <= 64 else None,
            "pushed_alone_pct": (100.0 * float(pushed[k].double().mean()) if k in pushed else None),
            "on_rates": {name: 100.0 * int(nat_at[name][k].sum()) / total for name in inputs},
            "on_alone_rates": {name: 100.0 * int(alone_at[name][k].sum()) / total for name in inputs},
        })

    def together_at(name):
        return torch.stack([alone_at[name][k].reshape(n, -1).all(1) for k in names], 1).all(1)

    together_any = torch.zeros(n, dtype=torch.bool)
    for name in inputs:
        together_any |= together_at(name).cpu()
    min_alone = torch.stack([logit_alone_end[k].reshape(n, -1).min(1).values for k in names], 1).min(1).values
    together = {
        "natural_all_on_end": int(torch.stack([nat_at["attack"][k].reshape(n, -1).all(1) for k in names], 1)
                                  .all(1).sum()),
        "together_end": int(together_at("attack").sum()),
        "together_any": int(together_any.sum()),
        "min_alone_logit_median": float(min_alone.median()),
        "each_push_all_on": None if each_all_on is None else int(each_all_on.sum()),
        "each_push_images": None if each_all_on is None else m,
    }
    ex = {}
    for name in exhaustive or ():
        if name not in inputs:
            raise DynattackError(f"diagnose: exhaustive forcing at {name!r}: no such tried input ({', '.join(inputs)})")
        if adv is None and name == "attack" and "clean" in exhaustive:
            continue  # the same images
        r = exhaustive_forcing(model, inputs[name], max_k=max_k)
        if r["gates"]:
            r["summary"] = summarize_forcing(r)
            ex[name] = r
    ex = ex or None
    if probe_steps > 0:
        notes.append(f"probes: {probe_steps} Adam steps (lr {probe_lr}) from the attack's inputs, no distortion limit; "
                     f"every iteration's decisions count as tried")
    return Diagnosis(gates=rows, images=n, inputs=list(inputs), flops=flops, together=together, exhaustive=ex,
                     notes=notes)


def json_safe(obj):
    """NaN/inf -> None, recursively (diagnostics.json is strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
