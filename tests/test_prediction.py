"""Multi-output forwards (issue 15, item 6): a network whose forward returns one logit tensor per
exit, or a dict, names its prediction with ``prediction_output``; attacks, the evaluation and the
runner's records read the same logits as from a network returning them alone."""
import sys
from pathlib import Path

import pytest
import torch

from dynattack import cost
from dynattack.attacks import FGSM, GradAuto
from dynattack.errors import DynattackError
from dynattack.prediction import prediction
from dynattack.train.common import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from early_exit import EarlyExitNet, images_for  # noqa: E402


class ExitsAndMix(EarlyExitNet):
    """The early-exit example returning ``{"exits": [o1, o2, o3], "logits": mixed}``."""

    def forward(self, x):
        _, o1, o2, o3 = self.exits(x)
        c1 = self.exit1(self.continue_logit(0, o1))[:, None]
        c2 = self.exit2(self.continue_logit(1, o2))[:, None]
        return {"exits": [o1, o2, o3], "logits": (1 - c1) * o1 + c1 * ((1 - c2) * o2 + c2 * o3)}


def pair(pick):
    plain, multi = EarlyExitNet().eval(), ExitsAndMix().eval()
    x = images_for(plain, 12)
    plain.fit_thresholds(x)
    multi.load_state_dict(plain.state_dict())
    multi.prediction_output = pick
    for m in (plain, multi):
        cost.calibrate(m, m.input_shape)
    return plain, multi, x


@pytest.mark.parametrize("pick", ["logits", lambda out: out["logits"]])
def test_attacks_and_evaluation_read_the_declared_prediction(pick):
    plain, multi, x = pair(pick)
    y = plain(x).argmax(1)
    for attack in (lambda m: GradAuto(m, steps=4, progress=False)(x),
                   lambda m: FGSM(m, eps=8 / 255, grad="lgm", progress=False)(x, y)):
        a, b = attack(plain), attack(multi)
        assert torch.equal(a.adv, b.adv)
        assert torch.equal(a.flops_adv, b.flops_adv)
        assert torch.equal(a.adv_pred, b.adv_pred)
    assert evaluate(plain, x, y) == evaluate(multi, x, y)


def test_an_index_or_a_function_picks_one_exit():
    _, multi, x = pair(None)
    out = multi(x)
    multi.prediction_output = lambda o: o["exits"][-1]
    assert torch.equal(prediction(multi, out), out["exits"][2])
    multi.prediction_output = -1
    assert torch.equal(prediction(multi, out["exits"]), out["exits"][2])


@pytest.mark.parametrize("pick, message", [
    (None, "forward returns a dict, not a logit tensor: say which part is the prediction"),
    ("scores", "prediction_output = 'scores' does not select a part of the dict"),
    ("exits", "prediction_output selects list: the prediction must be floating logits"),
])
def test_an_unnamed_or_wrong_prediction_is_one_clear_error(pick, message):
    _, multi, x = pair(pick)
    with pytest.raises(DynattackError, match=message.replace("(", r"\(")):
        GradAuto(multi, steps=2, progress=False)(x)
