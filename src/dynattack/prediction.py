"""Which output of a victim's forward is its prediction.

A zoo victim returns its logits, ``(B, classes)`` (``(B, classes, N)`` per point). A network
whose forward returns more (one logit tensor per exit, a dict with auxiliary losses, a tuple)
states which part is the prediction, once, with the attribute ``prediction_output``:

* an int: ``output[i]`` (``-1``: the last exit of a list of exits);
* a str: ``output[key]`` of a dict;
* a callable: ``prediction_output(output) -> logits`` (e.g. each sample's logits from the exit
  it took).

Every attack, the runner and the evaluation read a forward's logits through :func:`prediction`,
so a model that returns anything but a tensor without saying which part is meant gets one clear
error instead of an ``AttributeError`` deep inside.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import DynattackError


def prediction(model: nn.Module, output) -> torch.Tensor:
    """The logits in ``output``, the value ``model``'s forward returned (see the module docstring)."""
    pick = getattr(model, "prediction_output", None)
    what = type(model).__name__
    if pick is None:
        if isinstance(output, torch.Tensor):
            return output
        raise DynattackError(
            f"{what}'s forward returns a {type(output).__name__}, not a logit tensor: say which part is the "
            f"prediction, model.prediction_output = <index, dict key or function of the output>")
    try:
        logits = pick(output) if callable(pick) else output[pick]
    except (IndexError, KeyError, TypeError) as exc:
        raise DynattackError(f"{what}.prediction_output = {pick!r} does not select a part of the "
                             f"{type(output).__name__} its forward returns ({exc})") from None
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 2:
        got = f"{logits.dtype} of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else \
            type(logits).__name__
        raise DynattackError(f"{what}.prediction_output selects {got}: the prediction must be floating "
                             f"logits (B, classes, ...)")
    return logits
