"""The universal energy perturbation (issue 16, item 3): one tensor, fitted on training images,
applied unchanged to every held-out input inside its exact Linf ball; the CLI run keeps it in
``perturbation.safetensors`` and reuses it on --resume."""
import json

import pytest
import torch
from safetensors.torch import load_file

from dynattack import cost, runner
from dynattack.attacks import UniversalEnergy
from dynattack.errors import DynattackError
from test_cli_runs import run_cli
from toy_models import ToyGated, toy_images

EPS = 0.1


def fitted(grad="fgm", steps=40):
    model = ToyGated().eval()
    cost.calibrate(model, model.input_shape)
    atk = UniversalEnergy(model, eps=EPS, steps=steps, alpha=0.01, train_n=64, fit_batch=16, grad=grad,
                          progress=False)
    atk.fit(toy_images(model, 64, seed=1))
    return model, atk


def test_one_perturbation_for_every_input_inside_the_ball():
    model, atk = fitted()
    x = toy_images(model, 32, seed=2)  # held out: another seed than the fit's
    res = atk(x)
    delta = atk.perturbation
    assert delta.shape == (1, *model.input_shape) and delta.abs().max() <= EPS
    assert (res.adv - x).abs().max() <= EPS  # exact: no tolerance
    assert res.adv.min() >= 0 and res.adv.max() <= 1
    inside = (x + delta > 0) & (x + delta < 1)  # where nothing clips, every input moved by the same tensor
    diff = res.adv - x
    assert torch.allclose(diff[inside], delta.expand_as(x)[inside], atol=1e-6)
    assert (res.iterations == 0).all()


@pytest.mark.parametrize("grad", ["fgm", "lgm"])
def test_the_fit_switches_on_held_out_units(grad):
    """ToyGated's mean gate runs where mean(x) > 0.5 (its corner gate where x[0,0,0] > 0.7).
    Images with a mean in [0.43, 0.47] are off; +eps (0.1) everywhere switches the mean gate on
    for every one of them, which the fit on other images of that kind has to find."""
    model = ToyGated().eval()
    cost.calibrate(model, model.input_shape)

    def images(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = 0.35 + 0.1 * torch.rand((n, *model.input_shape), generator=g)
        return x - x.mean((1, 2, 3), keepdim=True) + 0.43 + 0.04 * torch.rand((n, 1, 1, 1), generator=g)

    atk = UniversalEnergy(model, eps=EPS, steps=40, alpha=0.01, train_n=64, fit_batch=16, grad=grad, progress=False)
    atk.fit(images(64, seed=1))
    res = atk(images(32, seed=2))
    gain = ToyGated.COST["gate_mean"]
    assert torch.equal(res.flops_adv - res.flops_clean, torch.full((32,), float(gain), dtype=torch.float64))


def test_unfitted_or_mis_sized_use_is_one_clear_error():
    model = ToyGated().eval()
    cost.calibrate(model, model.input_shape)
    atk = UniversalEnergy(model, eps=EPS, steps=2, train_n=8, fit_batch=4, progress=False)
    x = toy_images(model, 4)
    with pytest.raises(DynattackError, match="fit\\(train_images\\) first"):
        atk(x)
    with pytest.raises(DynattackError, match="train_n is 8 but only 4 training images"):
        atk.fit(x)
    with pytest.raises(DynattackError, match="within eps"):
        atk.set_perturbation(torch.ones(1, *model.input_shape))


def test_cli_run_keeps_the_perturbation_and_resumes_with_it(tmp_path):
    out = tmp_path / "uni"
    args = ["attack", "--victim", "dynconv20-fmnist", "--attack", "universal-energy", "--n", "6", "--batch-size",
            "3", "--steps", "3", "--param", "train_n=12", "--param", "fit_batch=6", "--latency-n", "0",
            "--no-progress", "--out", str(out)]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == set(runner.SUMMARY_KEYS) and summary["attack"] == "universal-energy"
    delta = load_file(str(out / "perturbation.safetensors"))["perturbation"]
    adv = load_file(str(out / "adv" / "batch_00001.safetensors"))
    moved = adv["adv"] - adv["clean"]
    inside = (adv["clean"] + delta > 0) & (adv["clean"] + delta < 1)
    assert torch.allclose(moved[inside], delta.expand_as(moved)[inside], atol=1e-6)
    lines = [json.loads(line) for line in (out / "batches.jsonl").read_text().splitlines()]
    assert [b["batch"] for b in lines] == ["fit", 0, 1]
    assert summary["seconds"] == pytest.approx(sum(b["seconds"] for b in lines))
    # a resumed run reads the perturbation back instead of fitting again
    (out / "adv" / "batch_00001.safetensors").unlink()
    proc = run_cli(*args, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(load_file(str(out / "adv" / "batch_00001.safetensors"))["adv"], adv["adv"])
    assert [json.loads(line)["batch"] for line in (out / "batches.jsonl").read_text().splitlines()] == ["fit", 0, 1, 1]
