"""Supervised training of a static classifier (the ResNet baseline)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .common import augment, evaluate, fashion_mnist_splits, seed_everything, victim_card


def train_classifier(spec, seed: int = 0, data_root=None, device: str = "cpu", epochs: int | None = None,
                     limit: int | None = None, log=print):
    """SGD + Nesterov momentum, one-cycle learning rate, light augmentation; returns (model, card)."""
    args = spec.train_args
    epochs = epochs or args["epochs"]
    gen = seed_everything(seed)
    (x, y), (xv, yv), (xt, yt) = fashion_mnist_splits(data_root, limit)
    model = spec.build().to(device)
    bs = args["batch_size"]
    steps = epochs * ((len(x) + bs - 1) // bs)
    opt = torch.optim.SGD(model.parameters(), lr=args["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args["lr"], total_steps=steps, pct_start=0.15)
    t0 = time.time()
    with tqdm(total=steps, desc=f"train {spec.name}", unit="step") as bar:
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(x), generator=gen)
            for idx in order.split(bs):
                xb = augment(x[idx], gen).to(device)
                loss = F.cross_entropy(model(xb), y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    seconds = time.time() - t0
    model.eval()
    val = evaluate(model, xv, yv)
    test = evaluate(model, xt, yt)
    log(f"{spec.name}: val acc {val['accuracy']:.4f}, test acc {test['accuracy']:.4f}, {seconds / 60:.1f} min")
    card = victim_card(spec, model, seed=seed, epochs=epochs, seconds=seconds, val=val, test=test)
    return model, card
