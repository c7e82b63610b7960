"""Training the MLP-Mixer family on Fashion-MNIST: the top-p mixture-of-experts victim and its
static dense counterpart, by one recipe (:mod:`dynattack.models.moe`).

- **Optimiser**: AdamW (``lr``, ``weight_decay``), linear warm-up over ``warmup_epochs`` then
  cosine decay to 0, per step; batch ``batch_size``; the shared light augmentation (translation
  by up to 2 pixels, horizontal flip), seeded: deterministic given the seed.
- **Static counterpart** (no experts): cross-entropy only.
- **MoE**: the gates in ``train`` mode (straight-through: the hard top-p decisions forward, the
  gradient of ``sigmoid(q)`` backward), and two routing losses averaged over the MoE layers:

  * **load balancing** (Switch Transformer): ``E sum_e f_e Pbar_e``, ``f_e`` the share of the
    batch's tokens routed to expert ``e`` (hard decisions), ``Pbar_e`` its mean router
    probability; weight ``balance_weight``;
  * **compute** (Huang et al.'s dynamic loss): the mean entropy of the router's distributions.
    A sharper router needs fewer experts to reach ``p``, so this lowers the expected number of
    experts per token. Its weight ``beta`` is steered every step towards ``target_experts`` (the
    experts per token the budget allows): ``beta <- max(0, beta + beta_lr (experts per token -
    target))``, starting from ``beta``. The entropy loss alone either starves (too weak) or
    collapses routing to one expert everywhere (too strong); the controller keeps it at the
    budget.

The card reports accuracy, compute kept, input dependence (:func:`~dynattack.train.common.evaluate`),
the experts per token and the expert load imbalance on the test split, and the static
counterpart's accuracy where its card exists.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..gates import Trace, gate_mode
from ..models import read_card
from ..models.moe import load_imbalance, experts_per_token, top_p_logit
from .common import augment, evaluate, fashion_mnist_splits, seed_everything, victim_card, warmup_cosine


def routing_losses(model) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(load-balancing loss, router entropy, experts per token) of the last forward, averaged
    over the MoE layers (the module docstring's losses)."""
    balance, entropy, count = [], [], []
    for layer in model.moe_layers:
        prob = layer.last_prob.reshape(-1, layer.last_prob.shape[-1])  # (B T, E)
        with torch.no_grad():
            on = (top_p_logit(prob, layer.p, layer.scale) > 0).to(prob.dtype)
        e = prob.shape[-1]
        balance.append(e * (on.mean(0) / on.sum(-1).mean() * prob.mean(0)).sum())
        entropy.append(-(prob * prob.clamp_min(1e-9).log()).sum(-1).mean())
        count.append(on.sum(-1).mean())
    return torch.stack(balance).mean(), torch.stack(entropy).mean(), float(torch.stack(count).mean())


@torch.no_grad()
def routing_figures(model, x: torch.Tensor, batch_size: int = 500) -> dict:
    """Experts per token and load imbalance (mean over batches of ``batch_size``) on ``x``."""
    model.eval()
    ept, imb = [], []
    for xb in x.split(batch_size):
        with Trace() as trace:
            model(xb)
        ept.append(experts_per_token(trace, model))
        imb.append(load_imbalance(trace, model))
    names = [k for k in imb[0] if k not in ("mean", "max")]
    return {"experts_per_token": sum(ept) / len(ept),
            "load_imbalance_mean": sum(i["mean"] for i in imb) / len(imb),
            "load_imbalance_per_layer": {n: sum(i[n] for i in imb) / len(imb) for n in names}}


def train_moe(spec, seed: int = 0, data_root=None, device: str = "cpu", epochs: int | None = None,
              limit: int | None = None, log=print):
    """Train the Mixer victim ``spec`` (its ``train_args``: epochs, lr, batch_size, weight_decay,
    warmup_epochs; MoE: balance_weight, beta, beta_lr, target_experts). Returns (model, card)."""
    args = spec.train_args
    epochs = epochs or args["epochs"]
    gen = seed_everything(seed)
    (x, y), (xv, yv), (xt, yt) = fashion_mnist_splits(data_root, limit)
    model = spec.build().to(device)
    moe = bool(model.moe_layers)
    bs = args["batch_size"]
    per_epoch = (len(x) + bs - 1) // bs
    total, warmup = epochs * per_epoch, max(1, round(args.get("warmup_epochs", 0.25) * per_epoch))
    opt = torch.optim.AdamW(model.parameters(), lr=args["lr"], weight_decay=args.get("weight_decay", 0.05))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, warmup))
    beta, beta_lr = float(args.get("beta", 0.0)), float(args.get("beta_lr", 0.0))
    target, alpha = float(args.get("target_experts", 1.0)), float(args.get("balance_weight", 0.0))
    t0 = time.time()
    with tqdm(total=total, desc=f"train {spec.name}", unit="step") as bar, gate_mode(model, "train" if moe else "hard"):
        for epoch in range(epochs):
            model.train()
            for idx in torch.randperm(len(x), generator=gen).split(bs):
                xb, yb = augment(x[idx], gen).to(device), y[idx].to(device)
                ce = F.cross_entropy(model(xb), yb)
                loss, post = ce, {"ce": f"{ce.item():.3f}"}
                if moe:
                    balance, entropy, ept = routing_losses(model)
                    loss = ce + alpha * balance + beta * entropy
                    beta = max(0.0, beta + beta_lr * (ept - target))
                    post.update(ept=f"{ept:.2f}", beta=f"{beta:.3f}", H=f"{entropy.item():.2f}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(epoch=epoch + 1, **post)
    seconds = time.time() - t0
    model.eval()
    val = evaluate(model, xv, yv)
    test = evaluate(model, xt, yt)
    extra = {"depth": len(model.blocks), "tokens": model.tokens, "optimizer": "AdamW, warm-up + cosine"}
    if moe:
        layer = model.moe_layers[0]
        figures = routing_figures(model, xt)
        static = args.get("static_counterpart")
        card_static = read_card(static) if static else None
        extra.update(
            experts=len(layer.experts), top_p=layer.p, route_scale=layer.scale, final_beta=beta, **figures,
            routing=("top-p (Huang et al. 2024): per token, experts by descending router probability until their "
                     f"cumulative probability reaches p = {layer.p}; unit (token, e) on iff the mass ranked "
                     f"strictly above e is < p; q = {layer.scale:g} (p - mass above)"),
            all_on=(f"every expert for every token: the last-ranked expert runs iff the smallest router probability "
                    f"exceeds 1 - p = {1 - layer.p:.2f}, reachable since p > (E - 1) / E"),
            static_counterpart=static,
            **({"static_counterpart_accuracy": card_static["accuracy"]} if card_static else {}))
        log(f"{spec.name}: experts/token {figures['experts_per_token']:.2f}, load imbalance "
            f"{figures['load_imbalance_mean']:.2f}")
    log(f"{spec.name}: val acc {val['accuracy']:.4f}, test acc {test['accuracy']:.4f}, compute kept "
        f"{test['compute_kept_pct']:.1f} %, {seconds / 60:.1f} min")
    card = victim_card(spec, model, seed=seed, epochs=epochs, seconds=seconds, val=val, test=test, **extra)
    return model, card
