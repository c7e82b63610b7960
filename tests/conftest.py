"""Tests run tiny models: one torch thread avoids thread oversubscription on CI's 2 cores.

Other CPUs' kernels can be emulated to check that no numeric test rides on float rounding:
``DYNATTACK_TEST_THREADS=2`` runs every test with 2 torch threads, ``DYNATTACK_TEST_MKLDNN=0``
turns oneDNN off; ``ATEN_CPU_CAPABILITY``, ``DNNL_MAX_CPU_ISA`` and ``MKL_ENABLE_INSTRUCTIONS``
pick other kernels (torch reads them itself)."""
import os

import pytest
import torch

from dynattack.errors import DynattackError

THREADS = int(os.environ.get("DYNATTACK_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)
if os.environ.get("DYNATTACK_TEST_MKLDNN") == "0":
    torch.backends.mkldnn.enabled = False


@pytest.fixture(autouse=True)
def torch_threads():
    """Every test starts with ``THREADS`` torch threads, whatever the test before it set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fashion_mnist_available():
    """Skip a test that trains on Fashion-MNIST where the dataset is not installed."""
    from dynattack.data import load_fashion_mnist

    try:
        load_fashion_mnist("test")
    except DynattackError as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
