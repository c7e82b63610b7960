"""All-on anchors in GradAuto (``anchor_starts``): a sample that no descent from its clean input
brings all-on jumps to the closest all-on point towards an input found by the forced-on search,
then walks back along the all-on boundary.

ToyPlateau, solvable by hand: gate B's logit is flat (a dead ReLU) around every clean input, so
no gradient from the clean image says how to switch it on; its all-on inputs are those with some
pixel >= 0.85 (and the mean >= 0.35), so the least distorted one raises the brightest pixel to
0.85: L2 = 0.85 - max(x), computed from the pixels, not by the attack.
"""
import pytest
import torch
from torch import nn

from dynattack import cost
from dynattack.attacks import GradAuto
from dynattack.errors import DynattackError
from dynattack.gates import Gate


class ToyPlateau(nn.Module):
    """Input (1, 2, 2), pixels p0..p3.

    * ``gate_a``: q_a = 8 (mean(p) - 0.35), controls ``conv_a`` (1 -> 2 channels);
    * ``gate_b``: q_b = 20 relu(max(p) - 0.8) - 1 (on iff max(p) >= 0.85; zero gradient wherever
      max(p) < 0.8), controls ``conv_b`` (1 -> 8 channels).
    * ``exclusive=True``: q_a = 8 (0.5 - max(p)) instead: A and B are never on together.
    """

    input_shape = (1, 2, 2)

    def __init__(self, exclusive: bool = False) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv_a = nn.Conv2d(1, 2, 3, padding=1)
            self.conv_b = nn.Conv2d(1, 8, 3, padding=1)
            self.head = nn.Linear(10 * 4, 2)
        self.gate_a = Gate(controls=[self.conv_a])
        self.gate_b = Gate(controls=[self.conv_b])
        self.exclusive = exclusive

    def forward(self, x):
        b = x.shape[0]
        p = x.flatten(1)
        top = p.max(1).values
        q_a = 8 * (0.5 - top) if self.exclusive else 8 * (p.mean(1) - 0.35)
        q_b = 20 * torch.relu(top - 0.8) - 1
        h = torch.cat([self.gate_a(q_a).view(b, 1, 1, 1) * self.conv_a(x),
                       self.gate_b(q_b).view(b, 1, 1, 1) * self.conv_b(x)], 1)
        return self.head(h.flatten(1))


def plateau(exclusive=False):
    model = ToyPlateau(exclusive)
    cost.calibrate(model, model.input_shape)
    return model.eval()


def images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.3 + 0.02 * (torch.rand(n, *ToyPlateau.input_shape, generator=g) - 0.5)


def all_on(x):
    """Both decisions from the pixels (the docstring's formulas, not the model)."""
    p = x.flatten(1)
    return (p.mean(1) >= 0.35) & (p.max(1).values >= 0.85)


def test_anchors_reach_all_on_where_no_gradient_from_the_clean_input_does():
    model, x = plateau(), images()
    plain = GradAuto(model, steps=300, progress=False)(x)
    assert not bool(all_on(plain.adv).any())  # B's logit is flat around every iterate
    atk = GradAuto(model, steps=300, anchor_starts=8, progress=False)
    res = atk(x)
    anchors = atk.anchors(x)
    assert anchors.shape[0] >= 1 and bool(all_on(anchors).all())
    assert bool(all_on(res.adv).all()) and bool(res.success.all())
    assert res.recovery.tolist() == pytest.approx([100.0] * 4)
    # from the anchor's far side back to the boundary: within 5 % of the exact minimum
    least = 0.85 - x.flatten(1).max(1).values
    assert bool((res.l2 >= least - 1e-6).all())
    assert bool((res.l2 <= 1.05 * least).all()), (res.l2, least)
    assert res.params["anchor_starts"] == 8 and res.params["anchor_walk"] == 150


def test_samples_all_on_within_steps_are_left_as_they_were():
    model, x = plateau(), images()
    x[:2, 0, 0, 0] = 0.82  # B's logit has a slope here: the descent switches it on by itself
    plain = GradAuto(model, steps=300, progress=False)(x)
    assert all_on(plain.adv).tolist() == [True, True, False, False]
    res = GradAuto(model, steps=300, anchor_starts=8, progress=False)(x)
    assert bool(all_on(res.adv).all())
    assert torch.equal(res.adv[:2], plain.adv[:2]) and torch.equal(res.iterations[:2], plain.iterations[:2])
    assert res.success_iteration[2:].tolist() == [301, 301]  # the jump (at iteration 300) is evaluated next


def test_a_batch_all_on_within_steps_needs_no_anchor():
    model, x = plateau(), images(2)
    x[:, 0, 0, 0] = 0.82
    atk = GradAuto(model, steps=300, anchor_starts=8, progress=False)
    res = atk(x)
    assert bool(res.success.all()) and atk._anchors == {}  # nothing left to jump: no search ran


def test_no_anchor_when_all_on_is_impossible_and_then_nothing_changes():
    model, x = plateau(exclusive=True), images()
    atk = GradAuto(model, steps=60, anchor_starts=8, anchor_steps=400, progress=False)
    res = atk(x)
    assert atk.anchors(x).shape[0] == 0
    ref = GradAuto(model, steps=60, progress=False)(x)
    assert torch.equal(res.adv, ref.adv) and torch.equal(res.flops_adv, ref.flops_adv)
    assert torch.equal(res.l2, ref.l2)


def test_the_anchor_search_is_seeded_and_leaves_the_victim_without_gradients():
    model, x = plateau(), images(2)
    a = GradAuto(model, steps=1, anchor_starts=4, seed=3, progress=False).anchors(x)
    b = GradAuto(model, steps=1, anchor_starts=4, seed=3, progress=False).anchors(x)
    assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())


def test_anchor_parameters_are_checked():
    model = plateau()
    with pytest.raises(DynattackError, match="keep_optimising_distortion"):
        GradAuto(model, anchor_starts=4, keep_optimising_distortion=False)
    with pytest.raises(DynattackError, match="anchor_starts"):
        GradAuto(model, anchor_starts=-1)
    with pytest.raises(DynattackError, match="anchor_steps"):
        GradAuto(model, anchor_starts=2, anchor_steps=0)
