"""The shipped zoo: every model card's figures are re-measured (image classifiers on the
Fashion-MNIST test set, point-cloud victims on their synthetic test rooms).

Cards are written at training time with 2 threads; CPU kernels reduce in a thread-dependent
order, so a gate logit within float noise of 0 may flip: the tolerance allows a few images.
"""
import pytest

from dynattack import create_model
from dynattack.data import load_fashion_mnist
from dynattack.models import list_models
from dynattack.train.common import evaluate

SHIPPED = [m for m in list_models() if m["shipped"] and m["dataset"] == "fashion-mnist"]
SHIPPED_POINTS = [m for m in list_models() if m["shipped"] and m["dataset"] == "synthetic-rooms"]
TARGET_ACCURACY = {"resnet": 0.90, "skipnet": 0.91, "dynconv": 0.90, "sact": 0.90, "manidp": 0.90}


@pytest.fixture(scope="module")
def test_set():
    try:
        return load_fashion_mnist("test")
    except Exception as exc:  # noqa: BLE001 - the dataset is installed by `make test`
        pytest.skip(f"Fashion-MNIST not installed: {exc}")


def test_resnet20_is_shipped():
    assert "resnet20-fmnist" in [m["name"] for m in SHIPPED]


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
