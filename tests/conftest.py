"""Test set-up: GPU tests carry @pytest.mark.cuda and skip without CUDA; without CUDA the
Triton kernels run in the interpreter (TRITON_INTERPRET must be set before triton.jit runs)."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module of tiny-model tests: faster, and on a busy 2-core runner a
    second OpenMP thread spin-waits. Opt in with pytestmark = pytest.mark.usefixtures("single_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
