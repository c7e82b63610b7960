"""Training the sparse U-Net (:mod:`dynattack.models.sparse_unet`) on the SYNTHETIC rooms.

- Data: ``scenes`` rooms of the synthetic train split, data seed 0 (the same rooms whatever the
  training seed), generated once. The fixed validation and test rooms (``eval_scenes`` each, the
  val split the attacks run on) are never trained on. Procedural rooms, not scans: the model
  card says so.
- Each step is one room, augmented from the seeded generator: a quarter turn about the vertical
  axis (k x 90 degrees: the rooms stay axis-aligned, as every evaluation room is), a mirror of x,
  and a shift of up to 1 m on each axis, so the voxel grid falls differently every time.
- Loss: cross-entropy per point (unlabelled points ignored) on the hard network, i.e. standard
  voxelisation, the network as it is deployed and attacked. BatchNorm statistics over the voxels.
- AdamW with a one-cycle learning rate; seeded, hence deterministic given the seed on one machine.

The card reports the mIoU over the test rooms (points pooled), per-class IoU, point accuracy,
validation mIoU and the mean executed FLOPs per room (standard voxelisation).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import metrics
from ..data.point_batch import SYNTHETIC_EVAL_SPLIT, pack_clouds
from ..data.points import IGNORE_LABEL, PointCloud, synthetic_scenes
from ..gates import Trace
from .common import machine, seed_everything

DATA_SEED = 0


def augment(cloud: PointCloud, gen: torch.Generator) -> PointCloud:
    """A quarter turn about z (k x 90 degrees), a mirror of x, and a shift of up to 1 m per axis."""
    xyz = cloud.coords.clone()
    for _ in range(int(torch.randint(4, (1,), generator=gen))):
        xyz[:, :2] = torch.stack([-xyz[:, 1], xyz[:, 0]], 1)
    if bool(torch.rand(1, generator=gen) < 0.5):
        xyz[:, 0] = -xyz[:, 0]
    xyz += torch.rand(3, generator=gen)
    return cloud._replace(coords=xyz)


@torch.no_grad()
def evaluate_scenes(model, clouds: list[PointCloud]) -> dict:
    """mIoU (points of all rooms pooled), per-class IoU, point accuracy and mean executed FLOPs of
    the hard network, one room at a time."""
    model.eval()
    device = next(model.parameters()).device
    preds, labels, flops = [], [], []
    for cloud in clouds:
        batch = pack_clouds([cloud])
        with Trace() as trace:
            logits = model(batch.points.to(device))
        preds.append(logits.argmax(1)[0].cpu())
        labels.append(batch.labels[0])
        flops.append(float(model.executed_flops(trace)[0]))
    miou, per_class = metrics.miou(preds, labels, model.num_classes, ignore_index=IGNORE_LABEL)
    pred, label = torch.cat(preds), torch.cat(labels)
    labelled = label != IGNORE_LABEL
    return {
        "miou": miou,
        "per_class_iou": {name: None if math.isnan(v) else v for name, v in zip(model.class_names, per_class.tolist())},
        "point_accuracy": float((pred[labelled] == label[labelled]).double().mean()),
        "flops_mean": sum(flops) / len(flops),
    }


def train_sparse_unet(spec, seed: int = 0, data_root=None, device: str = "cpu", epochs: int | None = None,
                      limit: int | None = None, log=print):
    """Train ``spec`` (train_args: scenes, eval_scenes, epochs, lr, weight_decay, and ``scene``:
    keyword arguments of the room generator). ``limit``: train on that many rooms only (smoke
    runs; also caps the evaluation rooms). ``data_root`` is unused: the rooms are generated.
    Returns (model, card)."""
    args = spec.train_args
    epochs = epochs or args["epochs"]
    n_train = min(args["scenes"], limit or args["scenes"])
    n_eval = min(args["eval_scenes"], limit or args["eval_scenes"])
    gen = seed_everything(seed)
    scene_kw = args.get("scene", {})
    train = synthetic_scenes("train", n_train, DATA_SEED, **scene_kw)
    model = spec.build().to(device)
    steps = epochs * n_train
    opt = torch.optim.AdamW(model.parameters(), lr=args["lr"], weight_decay=args.get("weight_decay", 1e-4))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args["lr"], total_steps=steps, pct_start=0.1)
    t0 = time.time()
    model.train()
    with tqdm(total=steps, desc=f"train {spec.name}", unit="room") as bar:
        for epoch in range(epochs):
            for i in torch.randperm(n_train, generator=gen).tolist():
                batch = pack_clouds([augment(train[i], gen)])
                logits = model(batch.points.to(device))
                loss = F.cross_entropy(logits, batch.labels.to(device), ignore_index=IGNORE_LABEL)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(epoch=epoch + 1, ce=f"{loss.item():.3f}")
    seconds = time.time() - t0
    val = evaluate_scenes(model, synthetic_scenes(SYNTHETIC_EVAL_SPLIT, n_eval, DATA_SEED, **scene_kw))
    test = evaluate_scenes(model, synthetic_scenes("test", n_eval, DATA_SEED, **scene_kw))
    log(f"{spec.name}: val mIoU {val['miou']:.4f}, test mIoU {test['miou']:.4f}, "
        f"test point accuracy {test['point_accuracy']:.4f}, {seconds / 60:.1f} min")
    card = {
        "name": spec.name,
        "family": spec.family,
        "architecture": spec.description,
        "dataset": (f"SYNTHETIC procedural rooms (dynattack.data.points; boxes and slabs, not scans): train "
                    f"{n_train} rooms of the train split, val / test {n_eval} rooms each, data seed {DATA_SEED}"),
        "input_format": "points (B, N, 3 + 3 + 1): xyz in metres, RGB in [0, 1], real-point flag; "
                        "logits (B, classes, N)",
        "classes": list(model.class_names),
        "voxel_size": model.voxel_size,
        "miou": test["miou"],
        "per_class_iou": test["per_class_iou"],
        "accuracy": test["point_accuracy"],
        "val_miou": val["miou"],
        "flops_mean": test["flops_mean"],
        "train_command": f"dynattack train {spec.name} --seed {seed}",
        "train_args": dict(args),
        "seed": seed,
        "epochs": epochs,
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "machine": machine(),
    }
    return model, card
