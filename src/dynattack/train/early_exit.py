"""Training SDN early-exit victims on Fashion-MNIST (Kaya et al., 2019; SDN's joint training,
compressed to a few epochs from the zoo's static ResNet).

- **Start**: ``init_from`` names a static ResNet of the zoo (same depth) whose weights start the
  backbone (stem, blocks, shortcuts, final classifier); the ICs start fresh
  (:func:`~dynattack.train.common.fine_tune_setup`).
- **Loss**: SDN's weighted sum over the exits, ``CE(final) + sum_k w_k CE(IC_k)``. SDN weighs
  IC ``k`` by its depth, the fraction ``tau_k`` of the backbone before it (its ``max_coeffs``
  0.15 ... 0.9 are its placement fractions), ramped up per epoch: ``w_k = min(tau_k, 0.01 +
  epoch tau_k / epochs)`` (``epoch`` from 1, as SDN's ``sdn_train``). Every exit's logits come
  from :meth:`~dynattack.models.early_exit.SDNResNet.exit_logits` (all blocks run; no gate is
  involved in training).
- **Optimiser**: SGD with Nesterov momentum, one-cycle learning rate, the shared light
  augmentation, seeded: deterministic given the seed (nothing samples in the forward).
- **Thresholds** (SDN / DeepSloth use one confidence threshold for every IC): chosen on the
  validation split (the last 5000 training images) after training. Rule: of the thresholds
  ``0.500, 0.501, ..., 0.999`` and ``1 - 10^-k`` (k = 4..6), the one that minimises the mean
  executed FLOPs on the validation split among those whose validation accuracy is within
  ``val_drop`` (2 points) of the final exit's (ties: the higher threshold). Executed FLOPs per
  exit come from the cost profile (calibrated, not typed in); the card's figures are then
  measured by :func:`~dynattack.train.common.evaluate` on the model with that threshold.

The card reports the chosen threshold and its rule, each exit's accuracy alone, the exit rates
and DeepSloth's early-exit efficacy (:func:`dynattack.metrics.early_exit_figures`) on the test
split.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import cost, metrics
from ..gates import Trace
from .common import augment, evaluate, fine_tune_setup, victim_card

THRESHOLD_GRID = [round(0.5 + i / 1000, 3) for i in range(500)] + [1 - 1e-4, 1 - 1e-5, 1 - 1e-6]


def ic_weights(model, epoch: int, epochs: int) -> list[float]:
    """SDN's per-IC loss weights at ``epoch`` (1-based): ``min(tau_k, 0.01 + epoch tau_k / epochs)``,
    ``tau_k`` the fraction of the backbone's blocks before IC ``k``."""
    n = len(model.blocks)
    taus = [(j + 1) / n for j in model.ic_after]
    return [min(t, 0.01 + epoch * t / epochs) for t in taus]


@torch.no_grad()
def exit_outputs(model, x: torch.Tensor, batch_size: int = 500) -> list[torch.Tensor]:
    """Logits of every exit (ICs then final) on ``x``, eval mode."""
    model.eval()
    device = next(model.parameters()).device
    parts = [model.exit_logits(xb.to(device)) for xb in x.split(batch_size)]
    return [torch.cat([p[k] for p in parts]).cpu() for k in range(len(parts[0]))]


def exit_flops(model) -> torch.Tensor:
    """``(K + 1,)`` float64: the FLOPs of a sample stopping at each exit (ICs, then the final
    classifier), from the cost profile: static + the gated FLOPs of the exits it went past."""
    prof = cost.profile(model)
    gated = torch.tensor([prof.gated[g.name] for g in model.exits], dtype=torch.float64)
    return prof.static + torch.cat([torch.zeros(1, dtype=torch.float64), gated.cumsum(0)])


def exits_at(outs: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """The exit each sample stops at for one confidence threshold: the first IC whose max softmax
    is >= it, else the final classifier (index K)."""
    conf = torch.stack([o.softmax(1).amax(1) for o in outs[:-1]])  # (K, N)
    confident = conf >= torch.tensor(threshold, dtype=conf.dtype)
    k = len(outs) - 1
    first = torch.where(confident.any(0), confident.float().argmax(0), torch.full_like(confident[0], k, dtype=torch.long))
    return first.long()


def choose_threshold(model, outs: list[torch.Tensor], y: torch.Tensor, val_drop: float) -> dict:
    """The grid threshold minimising validation FLOPs among those within ``val_drop`` of the
    final exit's validation accuracy (the module docstring's rule)."""
    preds = torch.stack([o.argmax(1) for o in outs])  # (K + 1, N)
    final_acc = float((preds[-1] == y).double().mean())
    per_exit = exit_flops(model)
    best = None
    for t in THRESHOLD_GRID:
        e = exits_at(outs, t)
        acc = float((preds.gather(0, e[None])[0] == y).double().mean())
        flops = float(per_exit[e].mean())
        if acc >= final_acc - val_drop and (best is None or flops <= best["val_flops"]):
            best = {"threshold": t, "val_accuracy": acc, "val_flops": flops}
    best["val_final_exit_accuracy"] = final_acc
    return best


@torch.no_grad()
def exit_figures(model, x: torch.Tensor, batch_size: int = 500) -> dict:
    """Exit rates and early-exit efficacy of the hard network on ``x`` (read from traces)."""
    model.eval()
    device = next(model.parameters()).device
    traces = []
    for xb in x.split(batch_size):
        with Trace() as trace:
            model(xb.to(device))
        traces.append(trace)
    prof = cost.profile(model)
    return metrics.early_exit_figures(traces, prof.full, prof.parents)


def train_early_exit(spec, seed: int = 0, data_root=None, device: str = "cpu", epochs: int | None = None,
                     limit: int | None = None, log=print, init_weights: str | Path | None = None,
                     sp_weights: str | Path | None = None):
    """Train the SDN victim ``spec`` (its ``train_args``: epochs, lr, batch_size, weight_decay,
    val_drop, init_from). ``init_weights`` / ``sp_weights``: the static ResNet weights to start
    from (default: the zoo's ``<init_from>.safetensors``). Returns (model, card)."""
    init_weights = init_weights or sp_weights
    args = spec.train_args
    epochs = epochs or args["epochs"]
    gen, ((x, y), (xv, yv), (xt, yt)), model, _ = fine_tune_setup(spec, seed, data_root, device, limit,
                                                                  init_weights, own=("ics.", "thresholds"))
    bs = args["batch_size"]
    steps = epochs * ((len(x) + bs - 1) // bs)
    opt = torch.optim.SGD(model.parameters(), lr=args["lr"], momentum=0.9, nesterov=True,
                          weight_decay=args.get("weight_decay", 5e-4))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args["lr"], total_steps=steps, pct_start=0.15)
    t0 = time.time()
    with tqdm(total=steps, desc=f"train {spec.name}", unit="step") as bar:
        for epoch in range(1, epochs + 1):
            weights = ic_weights(model, epoch, epochs)
            model.train()
            for idx in torch.randperm(len(x), generator=gen).split(bs):
                xb, yb = augment(x[idx], gen).to(device), y[idx].to(device)
                outs = model.exit_logits(xb)
                ce = [F.cross_entropy(o, yb) for o in outs]
                loss = ce[-1] + sum(w * c for w, c in zip(weights, ce[:-1]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(epoch=epoch, final=f"{ce[-1].item():.3f}", ic1=f"{ce[0].item():.3f}")
    seconds = time.time() - t0
    model.eval()
    val_drop = float(args.get("val_drop", 0.02))
    choice = choose_threshold(model, exit_outputs(model, xv), yv, val_drop)
    model.set_threshold(choice["threshold"])
    val = evaluate(model, xv, yv)
    test = evaluate(model, xt, yt)
    outs = exit_outputs(model, xt)
    exit_acc = [float((o.argmax(1) == yt).double().mean()) for o in outs]
    figures = exit_figures(model, xt)
    log(f"{spec.name}: threshold {choice['threshold']}, val acc {val['accuracy']:.4f}, test acc "
        f"{test['accuracy']:.4f}, compute kept {test['compute_kept_pct']:.1f} %, exit rates "
        f"{[round(r, 3) for r in figures['exit_rates']]}, efficacy {figures['efficacy']:.3f}, {seconds / 60:.1f} min")
    card = victim_card(
        spec, model, seed=seed, epochs=epochs, seconds=seconds, val=val, test=test,
        depth=model.depth, ic_after_blocks=[j + 1 for j in model.ic_after],
        confidence_threshold=choice["threshold"],
        threshold_rule=(f"one confidence threshold for every IC, of {THRESHOLD_GRID[0]}..{THRESHOLD_GRID[499]} "
                        f"step 0.001 and 1-1e-4, 1-1e-5, 1-1e-6: the one minimising mean executed FLOPs on the "
                        f"validation split among those whose validation accuracy is within {100 * val_drop:g} "
                        f"points of the final exit's ({100 * choice['val_final_exit_accuracy']:.2f} %)"),
        exit_accuracy=exit_acc, final_exit_accuracy=exit_acc[-1],
        exit_flops=exit_flops(model).tolist(),
        exit_rates=figures["exit_rates"], early_exit_efficacy=figures["efficacy"],
        val_exit_rates=exit_figures(model, xv)["exit_rates"],
        flops_static=cost.profile(model).static,
        **({"init_from": args["init_from"]} if args.get("init_from") else {}))
    return model, card
