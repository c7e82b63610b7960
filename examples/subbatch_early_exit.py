"""A real batched early exit: rows that exit leave the batch; later stages and gates run on the
rows still going, and each later gate is told which rows those are: ``gate(q, rows=idx)``.

Same network and declarations as ``early_exit.py`` (exit 1 ``controls`` stage 2 and its head,
exit 2 stage 3 and its head), but no ``within``: a row absent from exit 2's call ran none of
its units, which is the nesting. The forward itself is the real execution (no masked path):
``FlopCounterMode`` over ``model(x)`` of one sample is what it ran.

    python examples/subbatch_early_exit.py
"""
from __future__ import annotations

import torch
from torch import nn

from dynattack.gates import Gate

from _common import run_example
from early_exit import EarlyExitNet, images_for


class BatchedEarlyExitNet(EarlyExitNet):
    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.exit2 = Gate(controls=[self.stage3, self.head3])  # nested by its rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The exited rows' outputs are fixed; a continuing row's output is mixed with its mask
        # ``m * later + (1 - m) * earlier`` (exactly ``later`` in hard mode) so that LGM's
        # gradient reaches the exit decision.
        rows = torch.arange(x.shape[0], device=x.device)
        h = self.stage1(x)
        o = self.head1(h.mean((2, 3)))
        m = self.exit1(self.continue_logit(0, o))
        out = torch.zeros_like(o)
        for k, (stage, head) in enumerate(((self.stage2, self.head2), (self.stage3, self.head3))):
            go = m.detach() >= 0.5
            out = out.index_copy(0, rows[~go], o[~go])
            rows, h, o, m = rows[go], h[go], o[go], m[go]
            if not rows.numel():
                return out
            h = stage(h)
            later = head(h.mean((2, 3)))
            o = m[:, None] * later + (1 - m[:, None]) * o
            if k == 0:
                m = self.exit2(self.continue_logit(1, later), rows=rows)
            else:
                return out.index_copy(0, rows, o)


def main(n: int = 16, steps: int = 30, attacks: bool = True) -> dict:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model = BatchedEarlyExitNet().eval()
    images = images_for(model, n)
    model.fit_thresholds(images)
    return run_example("sub-batch early exit (exited rows leave the batch)", model, images, steps, attacks)


if __name__ == "__main__":
    main()
