"""Training DynConv victims on Fashion-MNIST (Verelst & Tuytelaars, 2020; the official recipe,
compressed to a few epochs).

- Mask gates in ``train`` mode use the Gumbel straight-through estimator
  (:func:`dynattack.models.dynconv.gumbel_straight_through`): ``sigmoid((q + g1 - g2) / T)``,
  hard ``>= 0.5`` forward, sigmoid gradient. Gumbel noise is switched off for the last
  ``noise_off_frac`` (20 %) of the steps, so training ends on the deterministic ``q >= 0`` network.
  The dilated masks follow (straight-through ``box(mask) > 0``).
- Loss = cross-entropy + ``sparsity_weight`` * (network loss + block loss), the official
  ``SparsityCriterion``: the network loss is the squared distance of the executed-FLOPs fraction of
  the sparse convolutions (conv1 on the dilated mask + conv2 on the mask, over the batch) to the
  ``budget``; the block loss keeps each block's own fraction between a lower and an upper bound,
  squared violations averaged over blocks. The bounds start at the budget and are annealed open
  (lower 0, upper 1) with ``cos^2`` over the first ``anneal_frac`` (a third) of training.
- ``init_from`` names a static ResNet of the zoo (same depth) whose weights start the backbone
  (stem, blocks, shortcuts, classifier; the mask units start fresh): a few epochs cannot train a
  sparse network from scratch to the static one's accuracy. Optionally ``warmup_frac`` of the
  steps run with every gate forced on (no sparsity loss) before the sparse phase; the bounds'
  annealing starts after it.
- SGD with Nesterov momentum, one-cycle learning rate, the shared light augmentation, seeded:
  deterministic given the seed (Gumbel noise comes from the seeded global generator).

The card reports ``compute_kept_pct`` / ``compute_saved_pct`` against the full network (static
part included, as every victim's card) and ``sparse_conv_kept_pct``, the budgeted quantity.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import cost
from ..gates import Trace, gate_mode
from .common import (
    augment,
    evaluate,
    fine_tune_setup,
    static_backbone,  # noqa: F401 - re-exported (tests, docs)
    victim_card,
)


def bounds(progress: float, budget: float) -> tuple[float, float]:
    """(lower, upper) per-block bounds at training ``progress`` in [0, 1] of the annealing phase
    (official: ``p = cos^2(progress * pi / 2)``; lower ``p * budget``, upper ``1 - p (1 - budget)``)."""
    p = math.cos(min(max(progress, 0.0), 1.0) * math.pi / 2) ** 2
    return p * budget, 1.0 - p * (1.0 - budget)


def sparsity_loss(trace: Trace, conv1_cost: torch.Tensor, conv2_cost: torch.Tensor, budget: float,
                  progress: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official DynConv sparsity criterion from a DynConv trace (events alternate mask,
    dilated mask, block by block). ``conv1_cost`` / ``conv2_cost``: FLOPs per position per block.

    Returns (loss, executed fraction of the sparse convs over the batch, per-block fractions); the
    fractions are differentiable through the straight-through masks.
    """
    events = trace.events
    if len(events) != 2 * len(conv1_cost):
        raise ValueError(f"expected {2 * len(conv1_cost)} gate events (mask, dilated per block), got {len(events)}")
    used, total = [], []
    for k in range(len(conv1_cost)):
        mask, dilated = events[2 * k].mask, events[2 * k + 1].mask
        positions = mask[0].numel()
        used.append(dilated.flatten(1).sum(1).mean() * conv1_cost[k] + mask.flatten(1).sum(1).mean() * conv2_cost[k])
        total.append(positions * (conv1_cost[k] + conv2_cost[k]))
    used, total = torch.stack(used), torch.stack(total)
    per_block = used / total
    frac = used.sum() / total.sum()
    lower, upper = bounds(progress, budget)
    block_loss = (torch.relu(per_block - upper) ** 2 + torch.relu(lower - per_block) ** 2).mean()
    return (frac - budget) ** 2 + block_loss, frac, per_block


def train_dynconv(spec, seed: int = 0, data_root=None, device: str = "cpu", epochs: int | None = None,
                  limit: int | None = None, log=print, init_weights: str | Path | None = None,
                  sp_weights: str | Path | None = None):
    """Train the DynConv victim ``spec`` (its ``train_args``: epochs, lr, batch_size, budget,
    sparsity_weight, anneal_frac, noise_off_frac, temperature, warmup_frac, init_from).

    ``init_weights``: the static ResNet weights an ``init_from`` run starts from (default: the
    zoo's ``<init_from>.safetensors``); ``sp_weights`` is the same, under the name
    :func:`dynattack.train.train_model` passes a first stage's weights with. Returns (model, card).
    """
    init_weights = init_weights or sp_weights
    args = spec.train_args
    epochs = epochs or args["epochs"]
    budget = float(args.get("budget", 0.5))
    weight = float(args.get("sparsity_weight", 10.0))
    gen, ((x, y), (xv, yv), (xt, yt)), model, _ = fine_tune_setup(spec, seed, data_root, device, limit,
                                                                  init_weights, own=(".masker.",))
    c1, c2 = (c.to(device, torch.float32) for c in model.block_costs())

    bs = args["batch_size"]
    steps = epochs * ((len(x) + bs - 1) // bs)
    warmup = int(args.get("warmup_frac", 0.0) * steps)
    anneal_steps = max(1.0, args.get("anneal_frac", 1 / 3) * steps)
    noise_until = int(round((1.0 - args.get("noise_off_frac", 0.2)) * steps))
    temperature = float(args.get("temperature", 1.0))
    opt = torch.optim.SGD(model.parameters(), lr=args["lr"], momentum=0.9, nesterov=True,
                          weight_decay=args.get("weight_decay", 5e-4))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args["lr"], total_steps=steps, pct_start=0.15)
    step = 0
    t0 = time.time()
    with gate_mode(model, "train"), tqdm(total=steps, desc=f"train {spec.name}", unit="step") as bar:
        for epoch in range(epochs):
            model.train()
            for idx in torch.randperm(len(x), generator=gen).split(bs):
                xb, yb = augment(x[idx], gen).to(device), y[idx].to(device)
                model.set_gumbel(noise=step < noise_until, temperature=temperature)
                warming = step < warmup
                with gate_mode(model, "train", force="on") if warming else contextlib.nullcontext(), Trace() as trace:
                    logits = model(xb)
                ce = F.cross_entropy(logits, yb)
                sp, frac, _ = sparsity_loss(trace, c1, c2, budget, (step - warmup) / anneal_steps)
                loss = ce if warming else ce + weight * sp
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update()
                bar.set_postfix(epoch=epoch + 1, ce=f"{ce.item():.3f}", kept=f"{frac.item():.2f}")
    model.set_gumbel(noise=True, temperature=1.0)
    seconds = time.time() - t0
    model.eval()
    val = evaluate(model, xv, yv)
    test = evaluate(model, xt, yt)
    static = cost.profile(model).static
    sparse_kept = 100.0 * (test["flops_mean"] - static) / (test["flops_full"] - static)
    log(f"{spec.name}: val acc {val['accuracy']:.4f}, test acc {test['accuracy']:.4f}, "
        f"compute kept {test['compute_kept_pct']:.1f} % (sparse convs {sparse_kept:.1f} %), {seconds / 60:.1f} min")
    card = victim_card(spec, model, seed=seed, epochs=epochs, seconds=seconds, val=val, test=test,
                       depth=model.depth, flops_static=static, sparse_conv_kept_pct=sparse_kept, budget=budget,
                       **({"init_from": args["init_from"]} if args.get("init_from") else {}))
    return model, card
