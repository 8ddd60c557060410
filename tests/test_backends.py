"""Backend discovery and dispatch rules (pss_kernels._backends), and the README/CI contract."""
import re
from pathlib import Path

import pytest
import torch

import pss_kernels
from pss_kernels._backends import ENV_VAR, BackendError, resolve_backend
from pss_kernels.models import create_model
from pss_kernels.ops.rpb_attention.reference import rpb_attention_reference

ROOT = Path(__file__).resolve().parents[1]


def test_available_backends_names_every_backend_with_a_reason():
    status = pss_kernels.available_backends("cpu")
    assert set(status) == {"torch", "sdpa", "triton", "cuda"}
    assert status["torch"].available and status["sdpa"].available
    assert not status["cuda"].available  # the cuda backend never takes CPU tensors
    for entry in status.values():
        assert isinstance(entry.reason, str) and entry.reason


def test_defaults_per_device_and_env_var_overrides(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("op", None, cpu, gpu_default="triton") == "torch"
    assert resolve_backend("op", None, cpu, gpu_default="triton", cpu_default="sdpa") == "sdpa"
    assert resolve_backend("op", None, torch.device("cuda"), gpu_default="triton", cpu_default="sdpa") == "triton"
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match=f"{ENV_VAR}='cuda' is not available"):
        resolve_backend("op", None, cpu, gpu_default="triton")
    assert resolve_backend("op", "torch", cpu, gpu_default="triton") == "torch"  # explicit wins


def test_global_override_applies_where_the_op_has_the_backend(monkeypatch):
    # PSS_KERNELS_BACKEND=cuda asks for the CUDA C++ kernels; rpb_attention has none, so it keeps its
    # default instead of failing every model forward.
    monkeypatch.setenv(ENV_VAR, "cuda")
    cpu = torch.device("cpu")
    assert resolve_backend("rpb_attention", None, cpu, gpu_default="sdpa", cpu_default="sdpa") == "sdpa"
    assert resolve_backend("rpb_attention", None, torch.device("cuda"), gpu_default="sdpa") == "sdpa"
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 10, 8, generator=generator) for _ in range(3))
    table = torch.randn((2 * 3 - 1) ** 2 + 3, 2, generator=generator)  # grid 3x3 with a CLS token
    out = pss_kernels.rpb_attention(q, k, v, table, grid_size=(3, 3))
    torch.testing.assert_close(out, rpb_attention_reference(q, k, v, table, grid_size=(3, 3)), rtol=1e-5, atol=1e-5)
    model = create_model("deit_tiny", img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                         num_classes=3)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)  # keep_rate 1: the sampler does not run
    # An op that has the backend still takes it, and says why it cannot run here.
    with pytest.raises(BackendError, match=f"sample_patches: {ENV_VAR}='cuda' is not available"):
        pss_kernels.sample_patches(torch.randn(2, 5, 4), 0.5)
    # An explicit backend the op lacks is still an error.
    with pytest.raises(ValueError, match=r"rpb_attention: backend must be one of \('torch', 'sdpa', 'triton'\) or "
                                         r"None, got 'cuda'"):
        pss_kernels.rpb_attention(q, k, v, table, grid_size=(3, 3), backend="cuda")
    # PSS_KERNELS_BACKEND=sdpa is rpb_attention's alone: sample_patches keeps its default.
    monkeypatch.setenv(ENV_VAR, "sdpa")
    assert resolve_backend("sample_patches", None, cpu, gpu_default="torch") == "torch"
    assert resolve_backend("rpb_attention", None, cpu, gpu_default="torch") == "sdpa"


def test_default_rpb_attention_backend_is_sdpa_and_takes_float64(monkeypatch):
    """backend=None on CPU resolves to the sdpa construction, which takes float64 like the torch oracle;
    a backend's own limits apply to the resolved backend (triton's head dim under the variable)."""
    from pss_kernels.ops.rpb_attention import op
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert (op.CPU_DEFAULT_BACKEND, op.GPU_DEFAULT_BACKEND) == ("sdpa", "sdpa")
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 10, 8, generator=generator, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    table = torch.randn(28, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    out = pss_kernels.rpb_attention(q, k, v, table, grid_size=(3, 3))
    expected = rpb_attention_reference(q, k, v, table, grid_size=(3, 3))
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v, table)),
                         torch.autograd.grad(expected.sum(), (q, k, v, table))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if pss_kernels.available_backends("cpu")["triton"].available:
        monkeypatch.setenv(ENV_VAR, "triton")
        wide = torch.zeros(2, 2, 10, 160)
        with pytest.raises(ValueError, match="head dim D <= 128"):
            pss_kernels.rpb_attention(wide, wide, wide, table.float(), grid_size=(3, 3))


def test_global_override_that_is_no_backend_is_named(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cudnn")
    with pytest.raises(ValueError, match=f"rpb_attention: {ENV_VAR} must be one of .* got 'cudnn'"):
        resolve_backend("rpb_attention", None, torch.device("cpu"), gpu_default="torch")


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend must be one of .* got 'cudnn'"):
        resolve_backend("op", "cudnn", torch.device("cpu"), gpu_default="torch")


def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(RuntimeError, match="cuda"):
        pss_kernels.sample_patches(torch.randn(2, 5, 4), 0.5, backend="cuda")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^\s*(pip install .*)$", readme, flags=re.M)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command.strip() in (ROOT / ".ci" / "run").read_text()
