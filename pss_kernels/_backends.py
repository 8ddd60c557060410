"""Which backends can run here, and which one an op call uses.

Backends: "torch" (pure-PyTorch reference, any device), "sdpa" (rpb_attention only: the gathered
bias given to PyTorch's scaled_dot_product_attention, any device), "triton" (CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1), "cuda" (the compiled pss_kernels._C, CUDA tensors).
Not every op has every backend: `OP_BACKENDS` lists each op's (rpb_attention has no "cuda",
sample_patches no "sdpa").

How an op call picks its backend:
- `backend=` given: that backend. One the op does not have raises ValueError; one that cannot
  run on the tensors' device raises BackendError (a RuntimeError) with the reason.
- `backend=None` and `PSS_KERNELS_BACKEND` set: that backend *for every op that has it*; an op
  without it (rpb_attention under PSS_KERNELS_BACKEND=cuda) keeps its own default, so one
  variable can ask for the CUDA C++ kernels without breaking the ops that have none. Where an
  op has the backend but it cannot run on the device, the call raises BackendError naming the
  variable (e.g. PSS_KERNELS_BACKEND=cuda with CPU tensors). A value that is no backend at all
  raises ValueError.
- otherwise the op's default for the device: the fastest path validated there. On CUDA tensors
  its `GPU_DEFAULT_BACKEND`: a kernel once its GPU tests and benchmarks passed and it beat the
  construction from PyTorch's own kernels, that construction until then; on CPU tensors its
  `CPU_DEFAULT_BACKEND`.
"""
from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import NamedTuple, Optional

import torch

BACKENDS = ("torch", "sdpa", "triton", "cuda")
ENV_VAR = "PSS_KERNELS_BACKEND"
# The backends each public op has; an op not listed here (a caller's own) has all of BACKENDS.
OP_BACKENDS = {"sample_patches": ("torch", "triton", "cuda"), "rpb_attention": ("torch", "sdpa", "triton"),
               # The packed ops (ops/varlen/): "triton" is one fused launch over the images.
               "rpb_attention_varlen": ("torch", "sdpa", "triton"), "sample_patches_varlen": ("torch", "triton", "cuda")}
# Triton's interpreter before 3.7 converts 1-element arrays to Python scalars, which numpy 2.4
# refuses ("only 0-dimensional arrays can be converted to Python scalars"): kernels that loop over
# loaded bounds fail there. (The GPU machines run triton 3.6 with numpy 2.5.)
INTERPRETER_MIN_TRITON_WITH_NUMPY_2_4 = (3, 7)


class BackendError(RuntimeError):
    """A backend that exists but cannot run here (not built, not installed, wrong device)."""


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def _once(probe):
    """Memoise a no-argument probe. (Not functools.lru_cache: torch.compile traces through these
    calls inside the ops and warns about the cache wrapper; a closure it reads cleanly.)"""
    result = []

    def memoised():
        if not result:
            result.append(probe())
        return result[0]

    memoised.__doc__ = probe.__doc__
    return memoised


def triton_interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _version_tuple(version: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def interpreter_unavailable_reason(triton_version: str, numpy_version: str) -> Optional[str]:
    """Why this triton's interpreter cannot run with this numpy, or None (see
    INTERPRETER_MIN_TRITON_WITH_NUMPY_2_4)."""
    if (_version_tuple(numpy_version) >= (2, 4)
            and _version_tuple(triton_version) < INTERPRETER_MIN_TRITON_WITH_NUMPY_2_4):
        return (f"the Triton interpreter of triton {triton_version} cannot run with numpy {numpy_version} "
                "(it needs numpy < 2.4 before triton 3.7)")
    return None


@_once
def _triton_installed() -> BackendStatus:
    try:
        import triton  # noqa: F401
    except Exception as err:  # ImportError, or a broken install
        return BackendStatus(False, f"triton cannot be imported ({err})")
    return BackendStatus(True, f"triton {triton.__version__}")


def _read_build_info() -> dict:
    path = Path(__file__).with_name("_build_info.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@_once
def cuda_extension():
    """The compiled `pss_kernels._C` module, or None; see `_cuda_status` for why not."""
    try:
        return importlib.import_module("pss_kernels._C")
    except ImportError:
        return None


@_once
def _cuda_extension_status() -> BackendStatus:
    if cuda_extension() is not None:
        return BackendStatus(True, "pss_kernels._C is built")
    info = _read_build_info()
    if info.get("cuda_built") is False:
        return BackendStatus(False, f"the _C extension was not built: {info.get('reason', 'unknown reason')}")
    try:
        importlib.import_module("pss_kernels._C")
    except ImportError as err:
        return BackendStatus(False, f"the _C extension cannot be imported ({err}); reinstall with nvcc on PATH")
    return BackendStatus(False, "the _C extension is missing")  # pragma: no cover


def backend_status(name: str, device: torch.device) -> BackendStatus:
    """Whether backend `name` can run an op on tensors living on `device`, and why not."""
    if name == "torch":
        return BackendStatus(True, "pure PyTorch reference")
    if name == "sdpa":
        return BackendStatus(True, "PyTorch's scaled_dot_product_attention with the gathered bias")
    if name == "triton":
        installed = _triton_installed()
        if not installed.available:
            return installed
        if device.type == "cuda":
            return installed
        if device.type == "cpu" and triton_interpret_mode():
            import numpy
            import triton
            broken = interpreter_unavailable_reason(triton.__version__, numpy.__version__)
            if broken:
                return BackendStatus(False, broken)
            return BackendStatus(True, f"{installed.reason} in the interpreter (TRITON_INTERPRET=1; slow, for tests)")
        return BackendStatus(False, f"triton needs CUDA tensors (got {device.type}); "
                                    "on CPU set TRITON_INTERPRET=1 to run its kernels in the interpreter")
    if name == "cuda":
        ext = _cuda_extension_status()
        if not ext.available:
            return ext
        if device.type != "cuda":
            return BackendStatus(False, f"the cuda backend needs CUDA tensors (got {device.type})")
        return ext
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")


def available_backends(device: Optional[torch.device | str] = None) -> dict[str, BackendStatus]:
    """Each backend -> BackendStatus(available, reason) for `device` (default: cuda if present).

    >>> pss_kernels.available_backends()["cuda"]
    BackendStatus(available=False, reason='the _C extension was not built: nvcc was not found at install ...')
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {name: backend_status(name, device) for name in BACKENDS}


def resolve_backend(op: str, backend: Optional[str], device: torch.device, gpu_default: str,
                    cpu_default: str = "torch") -> str:
    """The backend an op call runs on (the rules are in this module's docstring).

    `gpu_default` / `cpu_default` are the op's choices for CUDA / CPU tensors when nothing is asked
    for: the fastest path validated on that device (see each op's `op.py`). The op's backends are
    `OP_BACKENDS[op]`.
    """
    op_backends = OP_BACKENDS.get(op, BACKENDS)
    source = "backend"
    if backend is None and os.environ.get(ENV_VAR):
        requested = os.environ[ENV_VAR]
        if requested not in BACKENDS:
            raise ValueError(f"{op}: {ENV_VAR} must be one of {BACKENDS} or unset, got {requested!r}")
        if requested in op_backends:  # else: this op keeps its default
            backend, source = requested, ENV_VAR
    if backend is None:
        return gpu_default if device.type == "cuda" else cpu_default
    if backend not in op_backends:
        raise ValueError(f"{op}: {source} must be one of {op_backends} or None, got {backend!r}")
    status = backend_status(backend, device)
    if not status.available:
        raise BackendError(f"{op}: {source}={backend!r} is not available: {status.reason}")
    return backend
