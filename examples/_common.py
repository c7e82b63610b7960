"""What every example does once its network is declared: check the FLOPs dynattack counts from a
trace against ``FlopCounterMode`` on the real, skipping execution of each sample, and run the
energy attacks (GradAuto, ILFO) and FGSM with the FGM and LGM gradients."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynattack import cost
from dynattack.attacks import FGSM, ILFO, GradAuto
from dynattack.gates import Trace
from dynattack.prediction import prediction


def flops_of(fn, x: torch.Tensor) -> int:
    """FLOPs ``FlopCounterMode`` counts while ``fn(x)`` runs."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(x)
    return counter.get_total_flops()


def threshold_at_gap(values: torch.Tensor, lo: float = 0.35, hi: float = 0.65) -> float:
    """A threshold splitting ``values`` near their median, at the midpoint of the widest gap between
    neighbours in the quantiles ``[lo, hi]``: decisions then sit as far from it as they can, so
    that a sample alone and in its batch decide alike (float rounding differs between the two)."""
    v = values.flatten().double().sort().values
    i, j = int(lo * (v.numel() - 1)), max(int(hi * (v.numel() - 1)), int(lo * (v.numel() - 1)) + 1)
    k = i + int((v[i + 1:j + 1] - v[i:j]).argmax())
    return float(v[k] + v[k + 1]) / 2


def check_flops(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(counted, measured, max relative error): ``cost.executed_flops`` of the traced forward of
    the batch, and ``FlopCounterMode`` over the real execution (``forward_conditional``, else the
    forward itself when it really skips) of each sample alone, float64."""
    real = getattr(model, "forward_conditional", model)
    with torch.no_grad(), Trace() as trace:
        model(images)
    counted = cost.executed_flops(model, trace)
    measured = torch.tensor([flops_of(real, images[i:i + 1]) for i in range(len(images))], dtype=torch.float64)
    return counted, measured, float(((counted - measured).abs() / measured).max())


def attack_figures(model: nn.Module, images: torch.Tensor, steps: int) -> dict[str, dict[str, float]]:
    """GradAuto and ILFO (``steps`` iterations) and FGSM fgm / lgm (eps 8/255, labels: the clean
    predictions, so success = a changed prediction): their headline figures."""
    with torch.no_grad():
        labels = prediction(model, model(images)).argmax(1)
    out = {}
    for name, attack in (("GradAuto", GradAuto(model, steps=steps, progress=False)),
                         ("ILFO", ILFO(model, steps=steps, progress=False))):
        res = attack(images)
        out[name] = {"flops_clean": float(res.flops_clean.mean()), "flops_adv": float(res.flops_adv.mean()),
                     "recovery_pct": res.recovery_pct, "all_on_pct": 100.0 * float(res.success.float().mean())}
    for grad in ("fgm", "lgm"):
        res = FGSM(model, eps=8 / 255, grad=grad, progress=False)(images, labels)
        out[f"FGSM-{grad}"] = {"changed_pred_pct": 100.0 * float((res.adv_pred != labels).float().mean()),
                               "flops_adv": float(res.flops_adv.mean())}
    return out


def report(title: str, max_rel_error: float, figures: dict[str, dict[str, float]]) -> None:
    print(f"{title}: max relative FLOPs error vs FlopCounterMode (real execution, per sample): {max_rel_error:.3g}")
    for name, figs in figures.items():
        print(f"  {name:10s} " + "  ".join(f"{k} {v:.4g}" for k, v in figs.items()))


def run_example(title: str, model: nn.Module, images: torch.Tensor, steps: int, attacks: bool) -> dict:
    """What every example does once its gates are declared: calibrate, check the FLOPs against
    FlopCounterMode on real execution, run the attacks, print the figures."""
    cost.calibrate(model, model.input_shape)
    counted, measured, err = check_flops(model, images)
    figures = attack_figures(model, images, steps) if attacks else {}
    report(title, err, figures)
    return {"model": model, "images": images, "counted": counted, "measured": measured, "max_rel_error": err,
            "figures": figures}
