"""I-FGSM (Kurakin et al., 2017), the Linf sign-gradient attack FGSM, PGD and MI-FGSM build on.

Per iteration and per sample, on the rows still running::

    g   = grad_x L(f(x_t), y)            L = cross-entropy (targeted: minus the CE of the target)
    g   = g * M                           M: valid-pixel mask (all ones by default)
    d   = g                               (MI-FGSM: momentum of L1-normalised g)
    x_t+1 = clip_[0,1]( x + clip_[-eps,eps]( x_t + alpha sign(d) - x ) ), pixels outside M stay x

The gradient forward runs in the gate mode ``grad`` selects (``fgm``: the hard network, gates held
constant; ``lgm``: gates replaced by ``sigmoid(lam q)`` in forward and backward; ``lgm_st``: hard
forward, sigmoid backward). Every evaluation, stop test, best-keeping and reported figure uses the
hard network (the base does this).

Decisions (shared by the four attacks):

* **Budget**: ``eps`` is the Linf radius in the units of the images, [0, 1]; 8/255 is eight
  intensity levels. ``eps <= 0`` or ``eps > 1`` is an error (``eps = 8`` almost surely meant 8/255).
* **Targeted**: ``targeted=True`` reads the ``labels`` given to ``atk(images, labels)`` as the
  TARGET classes: the attack descends the cross-entropy of the target and succeeds when the hard
  network predicts it. Untargeted (default): ``labels`` are the true classes, success is any
  other prediction.
* **Valid pixels**: ``valid_pixels = p`` in (0, 1] lets only ``round(p * H * W)`` (at least one)
  pixel positions change, the same positions in every channel (the paper's "Valid Pxl." is a
  percentage of the image's pixels). The positions are drawn once per call from the seeded
  ``self.generator`` and shared by every image of the batch, so a sample's result does not depend
  on the other samples (a mask drawn per batch row would). Pixels outside the mask are exactly
  the clean ones, random start included. Inputs ``(B, D)`` without spatial dims: each element
  is a pixel.
* **What is returned** (``keep``): ``"final"`` returns each sample's last iterate (I-FGSM's default:
  the paper reports the accuracy of the final adversarial images; FGSM always); ``"best"``
  (PGD and MI-FGSM default) returns the least distorted (L2) iterate the hard network misclassifies
  (targeted: classifies as the target), and for a sample never fooled the iterate with the lowest
  margin, ``logit_y - max_other`` (targeted: ``max_other - logit_t``). No early stop by default
  (``early_stop=True`` stops a sample at its first success and returns that input).
* **Iterations** (I-FGSM): ``steps=None`` gives Kurakin's ``min(e + 4, 1.25 e)`` with ``e = 255 eps``,
  rounded down (as ``int()``, the torchattacks BIM convention), at least 1: 10 at 8/255.
  The step ``alpha`` defaults to ``eps / steps`` so the last iterate can just reach the budget
  (Kurakin used one intensity level, ``alpha = 1/255``: pass it explicitly to reproduce).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import DynattackError
from .base import AccuracyAttack, Forward, check_positive, per_sample_view, vjp

KEEP = ("final", "best")


def kurakin_steps(eps: float) -> int:
    """I-FGSM iterations ``min(e + 4, 1.25 e)`` for ``e = 255 eps``, rounded down, at least 1."""
    e = 255.0 * float(eps)
    return max(1, int(math.floor(min(e + 4.0, 1.25 * e) + 1e-9)))


def check_eps(owner: str, eps) -> float:
    eps = check_positive(owner, "eps", eps)
    if eps > 1:
        raise DynattackError(f"{owner}: eps is an Linf radius for images in [0, 1] and must be in (0, 1] "
                             f"(write 8/255 for eight intensity levels), got {eps!r}")
    return eps


def check_fraction(owner: str, name: str, value) -> float:
    value = check_positive(owner, name, value)
    if value > 1:
        raise DynattackError(f"{owner}: {name} must be a fraction in (0, 1], got {value!r}")
    return value


def margin(logits: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    """``(n,)`` distance to success in logits: ``logit_y - max_other`` (targeted:
    ``max_other - logit_t``); <= 0 roughly when the attack has succeeded."""
    z = logits.double()
    own = z.gather(1, labels.view(-1, 1)).squeeze(1)
    other = z.scatter(1, labels.view(-1, 1), -math.inf).amax(1)
    return other - own if targeted else own - other


class IFGSM(AccuracyAttack):
    """Iterative FGSM (Kurakin et al.; the LGM paper's I-FGSM), untargeted or targeted, Linf.

    Args:
        model: the victim, images in [0, 1] -> logits.
        eps: Linf budget in [0, 1] units (8/255 = eight intensity levels).
        steps: iterations; None: ``min(255 eps + 4, 1.25 * 255 eps)`` rounded down, at least 1.
        alpha: step size; None: ``eps / steps``.
        grad: gradient mode ``fgm`` | ``lgm`` | ``lgm_st``; ``lam``: LGM sigmoid slope.
        targeted: ``labels`` are target classes (see the module docstring).
        valid_pixels: fraction of pixel positions allowed to change (seeded, shared by the batch).
        keep: ``"final"`` (default, as the paper) or ``"best"`` (least distorted success).
        early_stop: stop a sample at its first success (default False, as the paper).
        seed, history, progress: see :class:`~dynattack.attacks.base.Attack`.
    """

    name = "ifgsm"
    random_start = False
    mu: float | None = None  # momentum (MI-FGSM)

    @property
    def starts_at_clean(self) -> bool:
        return not self.random_start

    def __init__(
        self,
        model,
        eps: float = 8 / 255,
        steps: int | None = None,
        alpha: float | None = None,
        grad: str = "fgm",
        lam: float = 1.0,
        targeted: bool = False,
        valid_pixels: float = 1.0,
        keep: str = "final",
        early_stop: bool = False,
        seed: int = 0,
        history: bool = False,
        progress: bool = True,
    ) -> None:
        owner = type(self).__name__
        eps = check_eps(owner, eps)
        if steps is None:
            steps = kurakin_steps(eps)
        super().__init__(model, steps=steps, grad=grad, lam=lam, targeted=targeted, seed=seed,
                         early_stop=early_stop, history=history, progress=progress)
        self.eps = eps
        self.alpha = self.eps / max(self.steps, 1) if alpha is None else check_positive(owner, "alpha", alpha)
        self.valid_pixels = check_fraction(owner, "valid_pixels", valid_pixels)
        if keep not in KEEP:
            raise DynattackError(f"{owner}: keep must be 'final' or 'best', got {keep!r}")
        self.keep = keep
        self.keep_best = keep == "best"

    def params(self) -> dict:
        p = {**super().params(), "eps": self.eps, "alpha": self.alpha, "valid_pixels": self.valid_pixels,
             "keep": self.keep}
        if self.random_start:
            p["random_start"] = True
        if self.mu is not None:
            p["mu"] = self.mu
        return p

    # ---- pieces ------------------------------------------------------------------------------
    def pixel_mask(self, images: torch.Tensor) -> torch.Tensor | None:
        """``(1, 1, *spatial)`` (``(1, D)`` for flat inputs) 0/1 mask of the pixel positions that
        may change, drawn from ``self.generator``; None when every pixel may."""
        if self.valid_pixels >= 1:
            return None
        spatial = tuple(images.shape[2:]) if images.dim() >= 3 else tuple(images.shape[1:])
        lead = (1, 1) if images.dim() >= 3 else (1,)
        count = math.prod(spatial)
        k = min(count, max(1, round(self.valid_pixels * count)))
        chosen = torch.randperm(count, generator=self.generator, device=images.device)[:k]
        mask = torch.zeros(count, dtype=images.dtype, device=images.device)
        mask[chosen] = 1
        return mask.view(*lead, *spatial)

    def ball(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``: the least and the greatest value of ``x``'s dtype in [0, 1] within ``eps`` of
        ``x``, elementwise, exactly: the nearest value to ``x +- eps`` (computed in float64, clipped to
        [0, 1]), moved one representable value towards ``x`` where that rounding left the ball."""
        x64 = x.double()
        hi = (x64 + self.eps).clamp(0, 1).to(x.dtype)
        hi = torch.where(hi.double() - x64 > self.eps, torch.nextafter(hi, x), hi)
        lo = (x64 - self.eps).clamp(0, 1).to(x.dtype)
        lo = torch.where(x64 - lo.double() > self.eps, torch.nextafter(lo, x), lo)
        return lo, hi

    def project(self, x_new: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None,
                ball: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Into the eps ball around ``x``, into [0, 1], and back to ``x`` outside the mask, so
        ``|x_adv - x| <= eps`` holds with no tolerance: ``x_new`` clipped to :meth:`ball` (pass it
        when projecting around the same ``x`` again). The same values as clipping ``x_new - x`` in
        float64 and rounding back (no float64 per step): an ``x_new`` within the ball is one of its
        values and stays, one beyond it goes to the ball's value nearest ``x +- eps``, ``lo`` or
        ``hi``. (They differ only where float64 cannot hold ``x_new - x``, ``x_new`` under 2^-29 of
        ``x``: clipping keeps that ``x_new``, the float64 sum rounded it.)"""
        lo, hi = self.ball(x) if ball is None else ball
        out = x_new.clamp(lo, hi)
        return out if mask is None else torch.where(mask.bool(), out, x)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(n,)`` the loss each sample ascends: CE of the true class, or minus CE of the target."""
        ce = F.cross_entropy(logits, labels, reduction="none")
        return -ce if self.targeted else ce

    def gradient(self, fwd: Forward, leaf: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, d loss / d x)`` of the gradient forward (in the mode ``grad`` selected)."""
        loss = self.loss(fwd.logits, labels)
        return loss, vjp(loss, leaf)

    def direction(self, g: torch.Tensor, state: dict, rows: torch.Tensor) -> torch.Tensor:
        """The direction whose sign is stepped along (MI-FGSM: the momentum)."""
        if self.mu is None:
            return g
        l1 = g.flatten(1).abs().sum(1)
        g = g / per_sample_view(torch.where(l1 > 0, l1, torch.ones_like(l1)), g)
        state["momentum"][rows] = self.mu * state["momentum"][rows] + g
        return state["momentum"][rows]

    # ---- hooks -------------------------------------------------------------------------------
    def init_state(self, images, labels, clean):
        mask = self.pixel_mask(images)
        ball = self.ball(images)  # once: every iterate is projected around the same images
        adv = images.clone()
        if self.random_start:  # uniform in the eps ball (inside the mask), then into [0, 1]
            u = torch.rand(images.shape, generator=self.generator, device=images.device, dtype=images.dtype)
            adv = self.project(images + (2 * u - 1) * self.eps, images, mask, ball)
        state = {"x": images, "labels": labels, "adv": adv, "mask": mask, "lo": ball[0], "hi": ball[1]}
        if self.mu is not None:
            state["momentum"] = torch.zeros_like(images)
        return state

    def step(self, state, idx, leaf, fwd, keep, it):
        loss, g = self.gradient(fwd, leaf, state["labels"][idx])
        mask = state["mask"]
        if mask is not None:
            g = g * mask
        rows = idx[keep]
        d = self.direction(g[keep], state, rows)
        x_new = leaf.detach()[keep] + self.alpha * d.sign()
        state["adv"][rows] = self.project(x_new, state["x"][rows], mask, (state["lo"][rows], state["hi"][rows]))
        return {"loss": loss.detach(), "grad_norm": g.detach().flatten(1).norm(dim=1)}

    def score(self, ev, labels):
        """Success first (ties: lower L2); a sample not fooled keeps its lowest-margin input."""
        m = margin(ev.logits, labels, self.targeted).clamp_min(0)
        return torch.where(self.goal(ev, labels), torch.ones_like(m), -m / (1 + m))
