"""Tests run tiny models: one torch thread avoids thread oversubscription on CI's 2 cores."""
import pytest
import torch

from dynattack.errors import DynattackError

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fashion_mnist_available():
    """Skip a test that trains on Fashion-MNIST where the dataset is not installed."""
    from dynattack.data import load_fashion_mnist

    try:
        load_fashion_mnist("test")
    except DynattackError as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
