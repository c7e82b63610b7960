"""The shipped zoo: every model card's figures are re-measured (image classifiers on the
Fashion-MNIST test set, point-cloud victims on their synthetic test rooms).

The full re-measurement on the 10000 test images takes minutes: it is marked ``slow``
(``pytest -m slow``). By default each image card is checked on the first ``FIRST_N`` test
images: FLOPs accounting exact against the real conditional execution, and accuracy and compute
kept within ``Z`` standard errors of the card's 10000-image figures.

Cards are written at training time with 2 threads; CPU kernels reduce in a thread-dependent
order, so a gate logit within float noise of 0 may flip: the full check allows a few images.
"""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dynattack import cost, create_model
from dynattack.data import load_fashion_mnist
from dynattack.gates import Trace
from dynattack.models import list_models
from dynattack.train.common import evaluate
from model_helpers import DECISION_MARGIN

SHIPPED = [m for m in list_models() if m["shipped"] and m["dataset"] == "fashion-mnist"]
SHIPPED_POINTS = [m for m in list_models() if m["shipped"] and m["dataset"] == "synthetic-rooms"]
TARGET_ACCURACY = {"resnet": 0.90, "skipnet": 0.91, "dynconv": 0.90, "sact": 0.90, "manidp": 0.90}
TEST_IMAGES = 10000
FIRST_N = 400
# The first n test images are a sample without replacement from the card's 10000: a mean over
# them has standard error sd / sqrt(n) * sqrt(1 - n / 10000). A correct model stays within 4 of
# them with probability > 0.9999; a wrong checkpoint or a broken forward (accuracy ~10 %, or
# a 10-point shift) is 10 or more standard errors away.
Z = 4.0


@pytest.fixture(scope="module")
def test_set():
    try:
        return load_fashion_mnist("test")
    except Exception as exc:  # noqa: BLE001 - the dataset is installed by `make test`
        pytest.skip(f"Fashion-MNIST not installed: {exc}")


def standard_error(sd: float, n: int) -> float:
    return sd / math.sqrt(n) * math.sqrt(1 - n / TEST_IMAGES)


def test_resnet20_is_shipped():
    assert "resnet20-fmnist" in [m["name"] for m in SHIPPED]


@pytest.mark.parametrize("entry", SHIPPED, ids=[m["name"] for m in SHIPPED])
def test_card_figures_on_the_first_test_images(entry, test_set):
    x, y = test_set[0][:FIRST_N], test_set[1][:FIRST_N]
    card, model = entry["card"], create_model(entry["name"]).eval()
    prof = cost.profile(model, tuple(x.shape[1:]))
    assert prof.full == card["flops_full"]
    with torch.no_grad(), Trace() as trace:
        logits = model(x)
    flops = cost.executed_flops(model, trace) if len(trace) else torch.full((len(x),), float(prof.full))
    # the FLOPs accounted are those the real conditional execution runs, on images whose gate
    # logits are all clear of the threshold (a trained gate sits within rounding of it on some)
    clear = trace.flat("logit").abs().min(1).values >= DECISION_MARGIN if len(trace) else torch.ones(len(x), dtype=torch.bool)
    images = clear.nonzero().flatten()[:3].tolist()
    assert len(images) == 3
    for i in images:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            getattr(model, "forward_conditional", model)(x[i:i + 1])
        assert counter.get_total_flops() == flops[i].item()
    a = card["accuracy"]
    accuracy = (logits.argmax(1) == y).double().mean().item()
    assert abs(accuracy - a) <= Z * standard_error(math.sqrt(a * (1 - a)), FIRST_N)
    kept = 100.0 * flops.double() / prof.full
    se = standard_error(kept.std().item(), FIRST_N)
    assert abs(kept.mean().item() - card["compute_kept_pct"]) <= Z * se + 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("entry", SHIPPED, ids=[m["name"] for m in SHIPPED])
def test_card_figures_match_measurement(entry, test_set):
    x, y = test_set
    card = entry["card"]
    measured = evaluate(create_model(entry["name"]), x, y)
    assert measured["accuracy"] == pytest.approx(card["accuracy"], abs=0.0005)
    assert measured["compute_kept_pct"] == pytest.approx(card["compute_kept_pct"], abs=0.1)
    assert measured["flops_full"] == card["flops_full"]
    assert measured["accuracy"] >= TARGET_ACCURACY.get(entry["family"], 0.9)


@pytest.mark.parametrize("entry", SHIPPED_POINTS, ids=[m["name"] for m in SHIPPED_POINTS])
def test_point_card_figures_match_measurement(entry):
    from dynattack.data.points import synthetic_scenes
    from dynattack.train.sparse_unet import DATA_SEED, evaluate_scenes

    card = entry["card"]
    rooms = synthetic_scenes("test", card["train_args"]["eval_scenes"], DATA_SEED, **card["train_args"].get("scene", {}))
    measured = evaluate_scenes(create_model(entry["name"]), rooms)
    assert measured["miou"] == pytest.approx(card["miou"], abs=0.002)
    assert measured["flops_mean"] == pytest.approx(card["flops_mean"], rel=1e-9)
    assert measured["miou"] >= 0.5
