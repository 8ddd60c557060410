"""Test set-up: what runs where, and why a test is skipped.

- GPU tests carry @pytest.mark.cuda and skip without CUDA. Without CUDA the Triton kernels run in
  the interpreter (TRITON_INTERPRET must be set before triton.jit runs).
- A test parametrized over `backend` skips the backends that cannot run on this host's test device,
  with the backend's own reason (pss_kernels.available_backends), e.g. the Triton interpreter of
  triton < 3.7 with numpy >= 2.4, as on the GPU machines' package set rehearsed in CI.
- @pytest.mark.triton: runs Triton kernels on the `device` fixture's tensors (compiled on a GPU host,
  interpreted on CPU): skipped where the triton backend cannot run here.
- @pytest.mark.interpreter: runs the Triton interpreter itself (TRITON_INTERPRET=1 in a subprocess):
  skipped on a GPU host (its kernels are compiled and tested there) and where the interpreter cannot run.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pss_kernels import available_backends  # noqa: E402  (after TRITON_INTERPRET is set)

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BACKEND_STATUS = available_backends(DEVICE)


def _interpreter_status():
    from pss_kernels._backends import interpreter_unavailable_reason
    try:
        import numpy
        import triton
    except ImportError as err:
        return f"triton cannot be imported ({err})"
    return interpreter_unavailable_reason(triton.__version__, numpy.__version__)


def pytest_collection_modifyitems(config, items):
    interpreter_broken = None if HAS_CUDA else _interpreter_status()
    for item in items:
        reason = None
        backend = item.callspec.params.get("backend") if hasattr(item, "callspec") else None
        if item.get_closest_marker("cuda") and not HAS_CUDA:
            reason = "needs a CUDA device"
        elif isinstance(backend, str) and backend in BACKEND_STATUS and not BACKEND_STATUS[backend].available:
            reason = f"backend {backend!r} cannot run here: {BACKEND_STATUS[backend].reason}"
        elif item.get_closest_marker("triton") and not BACKEND_STATUS["triton"].available:
            reason = f"runs Triton kernels, which cannot run here: {BACKEND_STATUS['triton'].reason}"
        elif item.get_closest_marker("interpreter"):
            if HAS_CUDA:
                reason = "runs the Triton interpreter: a GPU host compiles and tests the kernels themselves"
            elif interpreter_broken:
                reason = interpreter_broken
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module of tiny-model tests: faster, and on a busy 2-core runner a
    second OpenMP thread spin-waits. Opt in with pytestmark = pytest.mark.usefixtures("single_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
