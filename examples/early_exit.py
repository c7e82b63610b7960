"""Early exit with nested gates: a 3-stage CNN with a confidence exit after stages 1 and 2.

Each exit is a gate whose unit is "continue past this exit"; its ``controls`` are what runs only
then (the next stages and exit heads). Stage 3 runs only when *both* continue-decisions are on:
exit 2's gate is declared inside exit 1's (``within=self.exit1``), so its units count only where
exit 1 continued. Nothing else is written for the cost: ``dynattack.cost.calibrate`` measures it.

``forward`` is the masked batch path (every stage computed, outputs mixed by the masks);
``forward_conditional`` really exits, sample by sample.

    python examples/early_exit.py
"""
from __future__ import annotations

import torch
from torch import nn

from dynattack.gates import Gate, force_gates

from _common import run_example, threshold_at_gap

CONFIDENCE_SCALE = 50.0  # continue logit = scale x (threshold - max softmax)


def conv_stage(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU())


class EarlyExitNet(nn.Module):
    input_shape = (3, 16, 16)
    num_classes = 10

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stage1, self.head1 = conv_stage(3, 8, 1), nn.Linear(8, 10)
            self.stage2, self.head2 = conv_stage(8, 16, 2), nn.Linear(16, 10)
            self.stage3, self.head3 = conv_stage(16, 32, 2), nn.Linear(32, 10)
        self.register_buffer("thresholds", torch.full((2,), 0.5))
        self.exit1 = Gate(controls=[self.stage2, self.head2])  # continue past exit 1
        self.exit2 = Gate(controls=[self.stage3, self.head3], within=self.exit1)  # ... and past exit 2

    def continue_logit(self, k: int, logits: torch.Tensor) -> torch.Tensor:
        """Go on while exit ``k`` is not confident enough (max softmax below its threshold)."""
        return CONFIDENCE_SCALE * (self.thresholds[k] - logits.softmax(1).amax(1))

    def exits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(stage-2 features, exit logits 1, 2 and 3), every stage run."""
        h1 = self.stage1(x)
        h2 = self.stage2(h1)
        o3 = self.head3(self.stage3(h2).mean((2, 3)))
        return h2, self.head1(h1.mean((2, 3))), self.head2(h2.mean((2, 3))), o3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, o1, o2, o3 = self.exits(x)
        c1 = self.exit1(self.continue_logit(0, o1))[:, None]
        c2 = self.exit2(self.continue_logit(1, o2))[:, None]
        return (1 - c1) * o1 + c1 * ((1 - c2) * o2 + c2 * o3)

    def forward_conditional(self, x: torch.Tensor) -> torch.Tensor:
        """Really exits: each sample runs the stages up to the exit that stops it."""
        out = []
        for xi in x.split(1):
            h = self.stage1(xi)
            o = self.head1(h.mean((2, 3)))
            if self.exit1(self.continue_logit(0, o)).item() >= 0.5:
                h = self.stage2(h)
                o = self.head2(h.mean((2, 3)))
                if self.exit2(self.continue_logit(1, o)).item() >= 0.5:
                    o = self.head3(self.stage3(h).mean((2, 3)))
            out.append(o)
        return torch.cat(out)

    @torch.no_grad()
    def fit_thresholds(self, images: torch.Tensor) -> None:
        """Thresholds that let about half the images past each exit (at a gap of confidences)."""
        with force_gates(self, "on"):
            _, o1, o2, _ = self.exits(images)
        self.thresholds = torch.tensor([threshold_at_gap(o.softmax(1).amax(1)) for o in (o1, o2)])


def images_for(model: nn.Module, n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, *model.input_shape), generator=torch.Generator().manual_seed(seed))


def main(n: int = 16, steps: int = 30, attacks: bool = True) -> dict:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model = EarlyExitNet().eval()
    images = images_for(model, n)
    model.fit_thresholds(images)
    return run_example("early exit, nested gates", model, images, steps, attacks)


if __name__ == "__main__":
    main()
