"""Backend discovery and dispatch rules (DESIGN §3), and the README/CI contract."""
import re
from pathlib import Path

import pytest
import torch

import pss_kernels
from pss_kernels._backends import ENV_VAR, resolve_backend

ROOT = Path(__file__).resolve().parents[1]


def test_available_backends_names_every_backend_with_a_reason():
    status = pss_kernels.available_backends("cpu")
    assert set(status) == {"torch", "triton", "cuda"}
    assert status["torch"].available
    assert not status["cuda"].available  # the cuda backend never takes CPU tensors
    for entry in status.values():
        assert isinstance(entry.reason, str) and entry.reason


def test_cpu_default_is_torch_and_env_var_overrides(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("op", None, cpu, gpu_default="triton") == "torch"
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(RuntimeError, match=f"{ENV_VAR}='cuda' is not available"):
        resolve_backend("op", None, cpu, gpu_default="triton")
    assert resolve_backend("op", "torch", cpu, gpu_default="triton") == "torch"  # explicit wins


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
