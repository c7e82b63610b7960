"""Training SACT victims on Fashion-MNIST (Figurnov et al., 2017; the paper's objective,
compressed to a few epochs).

- Loss = cross-entropy + ``tau`` * ponder cost, the ponder cost being the sum over stages of the
  mean over positions of ``N + R`` (:meth:`~dynattack.models.sact.SACTResNet.forward_ponder`;
  the official ``add_all_ponder_costs``). The decisions are hard in training (gates in ``train``
  mode run :func:`~dynattack.models.sact.hard_decision`): ``N`` has no gradient, the ponder cost
  reaches the halting scores through the remainder ``R``, the task loss through the halting
  distribution.
- ``init_from`` names a static ResNet of the zoo (same depth) whose weights start the backbone
  (stem, units, shortcuts, classifier; the halting units start fresh at bias -3, so the network
  starts out running every unit almost everywhere), the official ``finetune_path`` set-up: a few
  epochs cannot train the backbone from scratch to the static one's accuracy.
- SGD with Nesterov momentum, one-cycle learning rate, the shared light augmentation, seeded:
  deterministic given the seed (nothing in the forward samples).

The card reports ``compute_kept_pct`` / ``compute_saved_pct`` against the all-on network, and the
test set's mean ponder cost.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import cost
from ..gates import gate_mode
from .common import augment, evaluate, fine_tune_setup, victim_card


@torch.no_grad()
def mean_ponder(model, x: torch.Tensor, batch_size: int = 500) -> float:
    """Mean ponder cost (sum over stages of N + R averaged over positions) of the eval network."""
    model.eval()
    device = next(model.parameters()).device
    return float(torch.cat([model.forward_ponder(xb.to(device))[1].cpu() for xb in x.split(batch_size)]).mean())


def train_sact(spec, seed: int = 0, data_root=None, device: str = "cpu", epochs: int | None = None,
               limit: int | None = None, log=print, init_weights: str | Path | None = None,
               sp_weights: str | Path | None = None):
    """Train the SACT victim ``spec`` (its ``train_args``: epochs, lr, batch_size, tau,
    weight_decay, init_from).

    ``init_weights``: the static ResNet weights an ``init_from`` run starts from (default: the
    zoo's ``<init_from>.safetensors``); ``sp_weights`` is the same, under the name
    :func:`dynattack.train.train_model` passes a first stage's weights with. Returns (model, card).
    """
    init_weights = init_weights or sp_weights
    args = spec.train_args
    epochs = epochs or args["epochs"]
    tau = float(args["tau"])
    gen, ((x, y), (xv, yv), (xt, yt)), model, _ = fine_tune_setup(spec, seed, data_root, device, limit,
                                                                  init_weights, own=(".halting.",))

    bs = args["batch_size"]
    steps = epochs * ((len(x) + bs - 1) // bs)
    opt = torch.optim.SGD(model.parameters(), lr=args["lr"], momentum=0.9, nesterov=True,
                          weight_decay=args.get("weight_decay", 5e-4))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args["lr"], total_steps=steps, pct_start=0.15)
    t0 = time.time()
    with gate_mode(model, "train"), tqdm(total=steps, desc=f"train {spec.name}", unit="step") as bar:
        for epoch in range(epochs):
            model.train()
            for idx in torch.randperm(len(x), generator=gen).split(bs):
                xb, yb = augment(x[idx], gen).to(device), y[idx].to(device)
                logits, ponder = model.forward_ponder(xb)
                ce = F.cross_entropy(logits, yb)
                loss = ce + tau * ponder.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(epoch=epoch + 1, ce=f"{ce.item():.3f}", ponder=f"{ponder.mean().item():.2f}")
    seconds = time.time() - t0
    model.eval()
    val = evaluate(model, xv, yv)
    test = evaluate(model, xt, yt)
    ponder = mean_ponder(model, xt)
    log(f"{spec.name}: val acc {val['accuracy']:.4f}, test acc {test['accuracy']:.4f}, "
        f"compute kept {test['compute_kept_pct']:.1f} %, ponder {ponder:.2f}, {seconds / 60:.1f} min")
    card = victim_card(spec, model, seed=seed, epochs=epochs, seconds=seconds, val=val, test=test,
                       depth=model.depth, tau=tau, eps=model.eps, ponder_mean=ponder,
                       flops_static=cost.profile(model).static,
                       **({"init_from": args["init_from"]} if args.get("init_from") else {}))
    return model, card
