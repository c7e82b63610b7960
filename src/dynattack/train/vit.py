"""Training the ViT victims on Fashion-MNIST: the static ViT from scratch, then A-ViT fine-tuned
from it (A-ViT fine-tunes a trained DeiT the same way).

One recipe for both (``train_args``): AdamW (betas 0.9/0.999, weight decay on the weight
matrices only), linear warm-up over ``warmup_frac`` of the steps then cosine decay to 0, batch
``batch_size``, the shared light augmentation (shifts of up to 2 pixels, horizontal flips),
seeded: deterministic given the seed (nothing samples in the forward).

**A-ViT** (``init_from``: the static ViT's weights, loaded as they are: the architectures share
every parameter) adds A-ViT's two halting losses to the cross-entropy, on the masked batch path
with the gates in ``train`` mode:

- **ponder loss** ``ponder_weight x mean_k rho_k`` over the patch tokens, ``rho_k = N_k + R_k``:
  ``N_k`` the blocks token ``k`` ran, ``R_k = 1 - sum`` of its halting scores before it halted
  (the remainder). Its gradient raises the halting scores of the blocks a token ran: tokens halt
  earlier. With ``ponder_target`` set, the loss is ``ponder_weight x relu(mean rho - target)``
  (a departure from A-ViT's linear ponder loss): the compute kept is then set by the target
  (``rho`` ~ 1 + the gated blocks a token runs) rather than by tuning the weight against the
  cross-entropy;
- **distribution prior** ``distr_weight x KL(target || p)``: ``p`` the batch's mean halting score
  per block, normalised over the blocks (clamped to [0.01, 0.99] as A-ViT), ``target`` a
  Gaussian over the blocks centred at ``target_depth`` (std 1), normalised: the halting scores
  peak at that block rather than anywhere.

Departure from A-ViT: A-ViT's token masks are hard with no gradient (the halting scores learn
from the two losses and from the class token's halting-weighted output); here the class token
never halts, and the gate's straight-through estimator (hard forward, gradient of
``sigmoid(q)``) lets the cross-entropy reach the halting scores through the masks, so a token the
classifier needs is pushed to run longer.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import cost
from ..errors import DynattackError
from ..gates import gate_mode
from ..models import load_weights, weights_path
from .common import augment, evaluate, fashion_mnist_splits, seed_everything, victim_card, warmup_cosine


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; weight decay on the weight matrices only (not biases, norms, positions, class token)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n not in ("pos", "cls")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and n not in ("pos", "cls"))]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.999))


def target_distribution(blocks: int, depth: float, std: float = 1.0) -> torch.Tensor:
    """A-ViT's halting prior: a Gaussian over the ``blocks`` halting positions centred at ``depth``."""
    i = torch.arange(blocks, dtype=torch.float32)
    p = torch.exp(-0.5 * ((i - depth) / std) ** 2)
    return p / p.sum()


def halting_losses(scores: list, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ponder, distribution prior) from the masked path's ``(h, m)`` pairs (patch tokens only):
    ``rho = N + R`` per token, averaged; ``KL(target || p)`` of the per-block mean halting score."""
    h = torch.stack([s[0][:, 1:] for s in scores])  # (L - 1, B, T - 1)
    m = torch.stack([s[1][:, 1:] for s in scores]).detach()  # ran the next block: not reached yet
    n_run = 1 + m.sum(0)
    remainder = 1 - (h * m).sum(0)
    ponder = (n_run + remainder).mean()
    p = h.mean(dim=(1, 2))
    p = (p / p.sum()).clamp(0.01, 0.99)
    prior = F.kl_div(p.log(), target.to(p), reduction="sum")
    return ponder, prior


def _load_init(model, spec, source: Path | None) -> None:
    init_from = spec.train_args["init_from"]
    source = Path(source) if source else weights_path(init_from)
    if not source.exists():
        raise DynattackError(f"{spec.name} starts from static weights, none at {source}: train {init_from} first")
    load_weights(model, source)  # the same parameters: strict, shapes checked


def train_vit(spec, seed: int = 0, data_root=None, device: str = "cpu", epochs: int | None = None,
              limit: int | None = None, log=print, init_weights: str | Path | None = None,
              sp_weights: str | Path | None = None):
    """Train the ViT victim ``spec`` (``train_args``: epochs, lr, batch_size, weight_decay,
    warmup_frac; A-ViT also init_from, ponder_weight, ponder_target, distr_weight, target_depth). Returns
    (model, card)."""
    init_weights = init_weights or sp_weights
    args = spec.train_args
    epochs = epochs or args["epochs"]
    gen = seed_everything(seed)
    (x, y), (xv, yv), (xt, yt) = fashion_mnist_splits(data_root, limit)
    model = spec.build()
    halting = hasattr(model, "gates")
    if args.get("init_from"):
        _load_init(model, spec, init_weights)
    model.to(device)
    cost.calibrate(model, model.input_shape)
    bs = args["batch_size"]
    steps = epochs * ((len(x) + bs - 1) // bs)
    warmup = max(1, int(args.get("warmup_frac", 0.05) * steps))
    opt = make_optimizer(model, args["lr"], args.get("weight_decay", 0.05))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup))
    target = target_distribution(len(model.blocks) - 1, args["target_depth"]) if halting else None
    pw, dw = float(args.get("ponder_weight", 0.0)), float(args.get("distr_weight", 0.0))
    target_rho = args.get("ponder_target")
    t0 = time.time()
    with tqdm(total=steps, desc=f"train {spec.name}", unit="step") as bar, gate_mode(model, "train"):
        for epoch in range(1, epochs + 1):
            model.train()
            for idx in torch.randperm(len(x), generator=gen).split(bs):
                xb, yb = augment(x[idx], gen).to(device), y[idx].to(device)
                if halting:
                    scores = []
                    ce = F.cross_entropy(model.run(xb, scores), yb)
                    ponder, prior = halting_losses(scores, target)
                    pond = ponder if target_rho is None else F.relu(ponder - target_rho)
                    loss = ce + pw * pond + dw * prior
                    kept = float(torch.stack([s[1][:, 1:] for s in scores]).detach().mean())
                    bar.set_postfix(epoch=epoch, ce=f"{ce.item():.3f}", rho=f"{ponder.item():.2f}", run=f"{kept:.2f}")
                else:
                    loss = F.cross_entropy(model(xb), yb)
                    bar.set_postfix(epoch=epoch, ce=f"{loss.item():.3f}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
    seconds = time.time() - t0
    model.eval()
    val = evaluate(model, xv, yv)
    test = evaluate(model, xt, yt)
    log(f"{spec.name}: val acc {val['accuracy']:.4f}, test acc {test['accuracy']:.4f}, compute kept "
        f"{test['compute_kept_pct']:.1f} %, {seconds / 60:.1f} min")
    extra = {"patch": model.patch, "dim": model.dim, "depth": model.depth, "tokens": model.tokens_per_sample}
    if halting:
        prof = cost.profile(model)
        extra.update(
            halting=(f"A-ViT per-token halting: h = sigmoid({model.halt_scale:g} t_0 + ({model.halt_center:g})) "
                     f"after each block but the last, a token runs the next block while its cumulative h < "
                     f"1 - {model.eps:g}; the class token always runs"),
            real_path="drops halted tokens: forward_conditional runs each block on the active tokens only "
                      "(gathered per sample); the masked batch path (attacks, LGM) masks them as keys",
            halt_scale=model.halt_scale, halt_center=model.halt_center, eps=model.eps,
            flops_static=prof.static,
            init_from=args["init_from"],
            init_note="initialised from the static ViT's weights (as A-ViT fine-tunes a trained DeiT)",
            token_run_rate=_token_run_rates(model, xt),
        )
    card = victim_card(spec, model, seed=seed, epochs=epochs, seconds=seconds, val=val, test=test, **extra)
    return model, card


@torch.no_grad()
def _token_run_rates(model, x: torch.Tensor, batch_size: int = 500) -> list[float]:
    """Per gated block: the share of patch tokens that run it, over ``x`` (hard network)."""
    device = next(model.parameters()).device
    sums = torch.zeros(len(model.gates), dtype=torch.float64)
    for xb in x.split(batch_size):
        scores = []
        with gate_mode(model, "hard"):
            model.run(xb.to(device), scores)
        sums += torch.stack([s[1][:, 1:].double().sum() for s in scores]).cpu()
    return (sums / (len(x) * (model.tokens_per_sample - 1))).tolist()
