"""Training SkipNet victims on Fashion-MNIST: SP, then optionally HRL (Wang et al., 2018).

- **SP** (supervised pre-training): gates in ``train`` mode use the Gate's straight-through
  estimator (hard forward, sigmoid gradient); loss = cross-entropy + ``alpha`` *
  max(kept - target, 0), where *kept* is the FLOPs-weighted mean of the gate masks over the
  gated blocks (the fraction of gated compute the batch ran; differentiable through the
  straight-through masks). The gates start open (``gate_bias``), run forced on for
  ``warmup_epochs``, then the target falls linearly from 1 to ``target_kept`` over
  ``anneal_epochs``: training begins from the plain ResNet and blocks adapt to being skipped.
  ``target_kept`` 0 gives the plain linear penalty ``alpha * kept``.
- **HRL** (hybrid reinforcement learning): starts from the SP weights; every gate samples its
  decision ~ Bernoulli(sigmoid(``sharpness`` * q)) and blocks really run only where sampled on
  (``forward_conditional``, which also makes HRL steps cheaper than SP steps). Loss =
  cross-entropy through the sampled path + ``rl_weight`` * REINFORCE on the gate policy. Reward
  of gate k for one sample: -CE(sample) - ``beta`` * (share of gated FLOPs that gate k and the
  later gates ran), i.e. the compute reward-to-go. Variance reduction: a moving-average baseline
  per gate and division by a moving average of the advantages' spread. With ``target_kept`` set,
  ``beta`` is a Lagrange multiplier (dual ascent, step ``beta_lr``) on the compute the *hard*
  network (q >= 0, as evaluated) keeps: raised while above the budget, lowered below it, so the
  run lands on the budget instead of drifting to "run all" or collapsing to "skip all".
  ``rate_band`` ``[lo, hi]`` adds ConvNet-AIG's per-gate target rate as a band (weight
  ``rate_weight``): each gate must run for between ``lo`` and ``hi`` of each batch, so no gate
  settles into "always" or "never" and the decisions depend on the input (without it, HRL left
  16 of 17 gates of skipnet38-rnn-hrl constant over the test set).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import cost
from ..errors import DynattackError
from ..gates import Trace, gate_mode, iter_gates
from ..models import load_weights, weights_path
from .common import augment, evaluate, fashion_mnist_splits, seed_everything, victim_card


def train_skipnet(spec, seed: int = 0, data_root=None, device: str = "cpu", epochs: int | None = None,
                  limit: int | None = None, log=print, sp_weights: str | Path | None = None):
    """Train the SkipNet victim ``spec`` with the recipe its ``train_args["training"]`` names.

    ``sp_weights``: the SP checkpoint an HRL run starts from (default: the zoo's
    ``<init_from>.safetensors``). Returns (model, card).
    """
    args = spec.train_args
    training = args.get("training", "sp")
    if training not in ("sp", "hrl"):
        raise DynattackError(f"unknown SkipNet training {training!r}; expected 'sp' or 'hrl'")
    epochs = epochs or args["epochs"]
    gen = seed_everything(seed)
    (x, y), (xv, yv), (xt, yt) = fashion_mnist_splits(data_root, limit)
    model = spec.build()
    if training == "hrl":
        source = Path(sp_weights) if sp_weights else weights_path(args["init_from"])
        if not source.exists():
            raise DynattackError(f"HRL starts from SP weights, none at {source}: train {args['init_from']} first")
        load_weights(model, source)
    else:
        model.open_gates(args.get("gate_bias", 0.0))
    model.to(device)
    cost.calibrate(model, model.input_shape)
    share = _gated_share(model).to(device)

    t0 = time.time()
    if training == "sp":
        extra = _train_sp(model, spec, args, x, y, gen, epochs, share, device)
    else:
        extra = _train_hrl(model, spec, args, x, y, gen, epochs, share, device, (xv, yv))
    seconds = time.time() - t0
    model.eval()
    val = evaluate(model, xv, yv)
    test = evaluate(model, xt, yt)
    log(f"{spec.name}: val acc {val['accuracy']:.4f}, test acc {test['accuracy']:.4f}, "
        f"compute kept {test['compute_kept_pct']:.1f} %, {seconds / 60:.1f} min")
    card = victim_card(spec, model, seed=seed, epochs=epochs, seconds=seconds, val=val, test=test,
                       gate=model.gate_type, training=training, **extra)
    if training == "hrl":
        card["init_from"] = args["init_from"]
    return model, card


def _gated_share(model) -> torch.Tensor:
    """Each gate's share of the gated FLOPs, in forward (trace) order."""
    costs = torch.stack([gate.unit_cost for _, gate in iter_gates(model)]).float()
    return costs / costs.sum()


def _stack(trace: Trace, attr: str) -> torch.Tensor:
    """(B, gates): one field of every event of a SkipNet trace (one unit per gate)."""
    return torch.stack([getattr(e, attr).reshape(-1) for e in trace.events], dim=1)


def _optimizer(model, args, steps: int):
    opt = torch.optim.SGD(model.parameters(), lr=args["lr"], momentum=0.9, nesterov=True,
                          weight_decay=args.get("weight_decay", 5e-4))
    if args.get("schedule", "onecycle") == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args["lr"], total_steps=steps, pct_start=0.15)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    return opt, sched


def _train_sp(model, spec, args, x, y, gen, epochs, share, device) -> dict:
    bs = args["batch_size"]
    steps = epochs * ((len(x) + bs - 1) // bs)
    per_epoch = steps / epochs
    warmup = int(args.get("warmup_epochs", 0.0) * per_epoch)
    anneal = max(1, int(args.get("anneal_epochs", 0.0) * per_epoch))
    alpha, final_target = args["alpha"], args.get("target_kept", 0.0)
    opt, sched = _optimizer(model, args, steps)
    step = 0
    with tqdm(total=steps, desc=f"train {spec.name} (SP)", unit="step") as bar:
        for epoch in range(epochs):
            model.train()
            for idx in torch.randperm(len(x), generator=gen).split(bs):
                xb, yb = augment(x[idx], gen).to(device), y[idx].to(device)
                warming = step < warmup
                with gate_mode(model, "train", force="on" if warming else None), Trace() as trace:
                    logits = model(xb)
                ce = F.cross_entropy(logits, yb)
                kept = (_stack(trace, "mask") * share).sum(1).mean()  # straight-through: has gradient
                # the budget tightens gradually after the warm-up, so blocks adapt to being skipped
                target = 1.0 - (1.0 - final_target) * min(1.0, max(0, step - warmup) / anneal)
                loss = ce if warming else ce + alpha * torch.clamp(kept - target, min=0.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update()
                bar.set_postfix(epoch=epoch + 1, ce=f"{ce.item():.3f}", kept=f"{kept.item():.2f}")
    return {"warmup_steps": warmup}


def _rate_band_loss(logit: torch.Tensor, lo: float, hi: float, margin: float = 0.1) -> torch.Tensor:
    """Keep every gate's execution rate over the batch inside ``[lo, hi]`` (ConvNet-AIG's
    per-gate target rate, as a band): a hinge on the batch quantiles of each gate's logits, so at
    least ``lo`` of the samples run it (q >= ``margin``) and at least ``1 - hi`` skip it. Logits,
    not probabilities: a gate whose sigmoid saturated (always off, as HRL tends to leave most
    gates) still gets a gradient. ``logit``: ``(B, gates)``; sum over gates."""
    runs = torch.quantile(logit, 1.0 - lo, dim=0)  # >= margin: at least lo of the batch on
    skips = torch.quantile(logit, 1.0 - hi, dim=0)  # <= -margin: at least 1 - hi of it off
    return (torch.relu(margin - runs) + torch.relu(skips + margin)).sum()


class BernoulliDecision:
    """HRL's train estimator: sample on ~ Bernoulli(sigmoid(sharpness * q)); no gradient through
    the sample. ``sharpness`` > 1 keeps the sampled network close to the hard one it is evaluated
    as: SP leaves many logits near 0, where sampling at sharpness 1 is a coin flip."""

    def __init__(self, sharpness: float = 1.0) -> None:
        self.sharpness = float(sharpness)

    def __call__(self, gate, logit: torch.Tensor) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(self.sharpness * logit.detach()))


def _train_hrl(model, spec, args, x, y, gen, epochs, share, device, val) -> dict:
    bs = args["batch_size"]
    steps = epochs * ((len(x) + bs - 1) // bs)
    beta, target = float(args["beta"]), args.get("target_kept")
    beta_lr, rl_weight, momentum = args.get("beta_lr", 0.05), args["rl_weight"], args.get("baseline_momentum", 0.9)
    sharpness = float(args.get("sharpness", 1.0))
    band, rate_weight = args.get("rate_band"), float(args.get("rate_weight", 1.0))
    gates = [gate for _, gate in iter_gates(model)]
    saved_estimators = [gate.train_estimator for gate in gates]
    for gate in gates:
        gate.train_estimator = BernoulliDecision(sharpness)
    opt, sched = _optimizer(model, args, steps)
    baseline, spread, history = None, None, []
    try:
        with gate_mode(model, "train"), tqdm(total=steps, desc=f"train {spec.name} (HRL)", unit="step") as bar:
            for epoch in range(epochs):
                model.train()
                for idx in torch.randperm(len(x), generator=gen).split(bs):
                    xb, yb = augment(x[idx], gen).to(device), y[idx].to(device)
                    with Trace() as trace:
                        logits = model.forward_conditional(xb)  # sampled blocks really skipped
                    ce = F.cross_entropy(logits, yb, reduction="none")
                    ran = _stack(trace, "decision").float()
                    q = sharpness * _stack(trace, "logit")
                    log_prob = torch.where(ran.bool(), F.logsigmoid(q), F.logsigmoid(-q))
                    # compute still spent from gate k on (reward-to-go); the accuracy reward is shared
                    to_go = (ran * share).flip(1).cumsum(1).flip(1)
                    reward = -ce.detach()[:, None] - beta * to_go
                    mean = reward.mean(0)
                    baseline = mean if baseline is None else momentum * baseline + (1 - momentum) * mean
                    advantage = reward - baseline
                    sd = advantage.std().clamp(min=1e-6)
                    spread = sd if spread is None else momentum * spread + (1 - momentum) * sd
                    policy_loss = -(advantage / spread * log_prob).sum(1).mean()
                    loss = ce.mean() + rl_weight * policy_loss
                    if band is not None:
                        loss = loss + rate_weight * _rate_band_loss(_stack(trace, "logit"), *band)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    kept = float((ran * share).sum(1).mean())
                    # what the hard network (evaluated as q >= 0) would have kept: the budget is on it
                    hard_kept = float(((q >= 0).float() * share).sum(1).mean())
                    if target is not None:  # dual ascent on the compute budget
                        beta = max(0.0, beta + beta_lr * (hard_kept - target))
                    bar.update()
                    bar.set_postfix(epoch=epoch + 1, ce=f"{ce.mean().item():.3f}", kept=f"{kept:.2f}",
                                    hard_kept=f"{hard_kept:.2f}", beta=f"{beta:.2f}")
                with gate_mode(model, "hard"):  # the card shows the policy never collapsed
                    res = evaluate(model, *val)
                history.append({"epoch": epoch + 1, "val_accuracy": res["accuracy"],
                                "val_compute_kept_pct": round(res["compute_kept_pct"], 2), "beta": round(beta, 4)})
    finally:  # back to the default estimator (straight-through)
        for gate, estimator in zip(gates, saved_estimators):
            gate.train_estimator = estimator
    return {"final_beta": round(beta, 4), "hrl_history": history}
