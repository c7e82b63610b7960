"""Training ManiDP victims on Fashion-MNIST (Tang et al., CVPR 2021; the official recipe,
compressed to a few epochs).

- Loss = cross-entropy + ``lambda_lasso`` * lasso + ``lambda_graph`` * manifold term:

  * **lasso** on the saliencies (averaged over the mask blocks: summed over 18 of them at
    weight 0.1 it drove the saliencies to 0, 13 % of the FLOPs kept), weighted per sample by its **instance complexity** (official):
    a sample whose cross-entropy is below ``thre_cls`` times the running mean loss gets weight
    ``((thre_cls * L - ce) / (thre_cls * L)) ** gamma``, harder samples 0, so easy inputs are
    pushed towards fewer channels and hard ones keep theirs. ``L`` is an exponential moving
    average of the batch loss (the official code uses the previous epoch's mean, which a run of a
    few epochs cannot afford to wait for);
  * **manifold term** (official ``cal_similarity_loss``): per mask block, the squared Frobenius
    distance between the batch's cosine-similarity matrix of saliencies and that of the features
    the mask acts on, over ``B^2``: similar inputs should get similar sub-networks. Two
    ``(B, C) x (C, B)`` products per mask: cheap. Unlike the official code, the feature side is
    detached (the saliencies align to the feature manifold, not the other way round): starting
    from a trained backbone, the term's gradient into the features (weight 10, 18 masks)
    outweighed the cross-entropy's ~80 to 1 and wrecked the backbone within two steps (measured:
    cross-entropy 0.22 -> 2.3 -> diverged). Detached at weight 10 it still drove the saliencies
    (which scale the channels) far enough to bring the cross-entropy to chance within 150 steps
    of a full-data run; our weight is 1 (one epoch on 25 600 images: test accuracy 89.9 % at
    weight 1, 90.1 % without the term, both 53 % of the FLOPs kept).

- Keep ratio: each mask block's threshold is set so that a fraction ``keep`` of the (sample,
  channel) saliencies of the batches since the last update reach it (the official rule ranks the
  channels' average saliencies instead, which kept far fewer pairs here: see :func:`threshold`), with ``keep`` cosine-annealed from 1 to
  ``target_keep`` over the first ``anneal_frac`` of the steps (the official anneals over all
  epochs and updates after an epoch; here ``thre_updates`` updates spread over the run), then
  held; the thresholds are frozen for the last ``1 - freeze_frac`` of the steps so the network
  finishes training on its final sub-networks. A threshold is never below the smallest positive
  float: a channel of saliency 0 is multiplied by 0, running it would be pure waste.
- Gates in ``train`` mode use the hard keep rule without gradient (official); the saliency
  factor carries the gradient to the mask blocks.
- ``init_from`` names a static ResNet of the zoo (same depth) whose weights start the backbone;
  the mask blocks start with ``fc2`` weights at zero (bias 1), so every saliency is 1 and the
  network at step 0 is exactly the static one.
- SGD with Nesterov momentum, cosine learning rate (official), no weight decay on the mask
  blocks (official ``decay_branch`` 0), the shared light augmentation, seeded: deterministic
  given the seed.

The card reports ``compute_kept_pct`` / ``compute_saved_pct`` against the full network (static
part included, as every victim's card) and the final thresholds.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import cost
from ..gates import Trace, gate_mode
from .common import augment, evaluate, fine_tune_setup, load_static_backbone, victim_card


def keep_ratio(progress: float, target: float, anneal_frac: float) -> float:
    """Channel keep ratio at training ``progress`` in [0, 1]: cosine from 1 to ``target`` over
    the first ``anneal_frac``, then ``target``."""
    p = min(max(progress / anneal_frac, 0.0), 1.0) if anneal_frac > 0 else 1.0
    return target + (1.0 - target) * (1.0 + math.cos(math.pi * p)) / 2.0


def threshold(saliencies: torch.Tensor, keep: float) -> float:
    """The saliency that ``keep`` of the (sample, channel) pairs of ``saliencies`` ``(n, C)``
    reach (the k-th largest, ``k = ceil(keep * n * C)``), at least the smallest positive float.

    The official rule takes the k-th largest of the channels' *average* saliencies
    (``torch.topk(mean, ceil(keep * C))[0][-1]``); per sample, saliencies spread around their
    averages, so that rule keeps far fewer pairs than ``keep`` says (measured here: 39 % of the
    FLOPs at keep 1.0 after one update, then a diverging loss). Counting pairs makes ``keep`` the
    fraction of channels the batch actually runs, still per input."""
    flat = saliencies.flatten()
    k = min(max(math.ceil(keep * flat.numel()), 1), flat.numel())
    kth = float(torch.topk(flat, k).values[-1])
    return max(kth, torch.finfo(torch.float32).tiny)


def complexity_weights(ce: torch.Tensor, loss_ref: float, thre_cls: float, gamma: float) -> torch.Tensor:
    """Per-sample lasso weights from instance complexity: 0 for samples at least ``thre_cls *
    loss_ref`` hard, rising to 1 for a sample of zero loss."""
    c = thre_cls * loss_ref
    return ((c - ce.detach()) / c).clamp(min=0.0) ** gamma


def manifold_loss(saliency: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius distance of the batch's cosine-similarity matrices of features and
    saliencies, over ``B^2`` (the official ``cal_similarity_loss``, features as a fixed target)."""
    b = saliency.shape[0]
    s, f = F.normalize(saliency.flatten(1)), F.normalize(feature.detach().flatten(1))
    return ((f @ f.t() - s @ s.t()) ** 2).sum() / (b * b)


OWN = (".mb1.", ".mb2.")  # the mask blocks: fresh, not in the static ResNet


def _all_on_saliencies(model) -> None:
    with torch.no_grad():
        for mb in model.mask_blocks:
            mb.fc2.weight.zero_()  # every saliency 1: the all-on network is the static one


def _load_static(model, source: Path, name: str, init_from: str) -> None:
    load_static_backbone(model, source, name, init_from, own=OWN)
    _all_on_saliencies(model)


def train_manidp(spec, seed: int = 0, data_root=None, device: str = "cpu", epochs: int | None = None,
                 limit: int | None = None, log=print, init_weights: str | Path | None = None,
                 sp_weights: str | Path | None = None):
    """Train the ManiDP victim ``spec`` (its ``train_args``: epochs, lr, batch_size, target_keep,
    lambda_lasso, lambda_graph, thre_cls, gamma, anneal_frac, freeze_frac, thre_updates,
    weight_decay, init_from).

    ``init_weights``: the static ResNet weights an ``init_from`` run starts from (default: the
    zoo's ``<init_from>.safetensors``); ``sp_weights`` is the same, under the name
    :func:`dynattack.train.train_model` passes a first stage's weights with. Returns (model, card).
    """
    init_weights = init_weights or sp_weights
    args = spec.train_args
    epochs = epochs or args["epochs"]
    target = float(args.get("target_keep", 0.65))
    lambda_lasso = float(args.get("lambda_lasso", 0.1))
    lambda_graph = float(args.get("lambda_graph", 1.0))
    thre_cls, gamma = float(args.get("thre_cls", 0.5)), float(args.get("gamma", 1.0))
    anneal_frac = float(args.get("anneal_frac", 0.6))
    gen, ((x, y), (xv, yv), (xt, yt)), model, prof = fine_tune_setup(spec, seed, data_root, device, limit,
                                                                     init_weights, own=OWN)
    if args.get("init_from"):
        _all_on_saliencies(model)
    masks = model.mask_blocks

    bs = args["batch_size"]
    steps = epochs * ((len(x) + bs - 1) // bs)
    every = max(1, round(steps / args.get("thre_updates", 40)))
    freeze_step = int(args.get("freeze_frac", 0.85) * steps)
    branch = [p for n, p in model.named_parameters() if ".mb1." in n or ".mb2." in n]
    main = [p for n, p in model.named_parameters() if ".mb1." not in n and ".mb2." not in n]
    opt = torch.optim.SGD([{"params": main, "weight_decay": args.get("weight_decay", 5e-4)},
                           {"params": branch, "weight_decay": 0.0}], lr=args["lr"], momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    window: list[list[torch.Tensor]] = [[] for _ in masks]  # saliencies since the last threshold update
    loss_ref, keep, step = None, 1.0, 0
    t0 = time.time()
    with gate_mode(model, "train"), tqdm(total=steps, desc=f"train {spec.name}", unit="step") as bar:
        for epoch in range(epochs):
            model.train()
            for idx in torch.randperm(len(x), generator=gen).split(bs):
                xb, yb = augment(x[idx], gen).to(device), y[idx].to(device)
                record = []
                with Trace() as trace:
                    logits = model(xb, record)
                ce = F.cross_entropy(logits, yb, reduction="none")
                loss_ref = ce.mean().item() if loss_ref is None else loss_ref
                w = complexity_weights(ce, loss_ref, thre_cls, gamma)
                lasso = sum((s.mean(1) * w).mean() for s, _ in record) / len(record)
                graph = sum(manifold_loss(s, f) for s, f in record)
                loss = ce.mean() + lambda_lasso * lasso + lambda_graph * graph
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # saliencies multiply channel outputs block after block: without a clip one large
                # step feeds back and the loss explodes (seen at lr 0.05 in the first epoch)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.get("clip_grad", 2.0))
                opt.step()
                sched.step()
                loss_ref = 0.98 * loss_ref + 0.02 * ce.mean().item()
                for kept_s, (s, _) in zip(window, record):
                    kept_s.append(s.detach())
                step += 1
                if step % every == 0 and step <= freeze_step:
                    keep = keep_ratio(step / steps, target, anneal_frac)
                    for mb, kept_s in zip(masks, window):
                        mb.thre.fill_(threshold(torch.cat(kept_s), keep))
                        kept_s.clear()
                with torch.no_grad():
                    kept = float(cost.executed_flops(model, trace).mean()) / prof.full
                bar.update()
                bar.set_postfix(epoch=epoch + 1, ce=f"{ce.mean().item():.3f}", keep=f"{keep:.2f}", flops=f"{kept:.2f}")
    seconds = time.time() - t0
    model.eval()
    val = evaluate(model, xv, yv)
    test = evaluate(model, xt, yt)
    log(f"{spec.name}: val acc {val['accuracy']:.4f}, test acc {test['accuracy']:.4f}, "
        f"compute kept {test['compute_kept_pct']:.1f} % (channel keep ratio {keep:.2f}), {seconds / 60:.1f} min")
    card = victim_card(spec, model, seed=seed, epochs=epochs, seconds=seconds, val=val, test=test,
                       depth=model.depth, flops_static=prof.static, target_keep=target,
                       thresholds=[float(mb.thre) for mb in masks],
                       **({"init_from": args["init_from"]} if args.get("init_from") else {}))
    return model, card
