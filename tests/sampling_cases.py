"""Inputs and checks shared by the sample_patches tests (tests/ is on sys.path under pytest).

Most inputs are quantized (multiples of 1/4 in [-2, 2]): every dtype holds them exactly and every
float32 summation order gives the same exact score, so indices can be compared exactly across
backends, and ties (frequent at these values) test the tie-break to the lower position.
"""
import torch

from pss_kernels import sample_patches
from pss_kernels._backends import cuda_extension
from pss_kernels.ops.sample_patches.reference import sample_patches_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The kernel backends a test runs on the `device` fixture's tensors: Triton (compiled on a GPU host,
# interpreted on CPU), and the CUDA C++ kernels on a GPU host where pss_kernels._C is built.
KERNEL_BACKENDS = ("triton", "cuda") if torch.cuda.is_available() and cuda_extension() is not None else ("triton",)
SPECIAL = [0.0, -0.0, 1.0, 1.0, float("nan"), float("inf"), -float("inf"), -1.0, 1e-40, -1e-40, 1.0, float("nan")]


def quantized(shape, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-8, 9, shape, generator=gen) * 0.25).to(device=device, dtype=dtype)


def given_scores(batch, num_patches, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (batch, num_patches), generator=gen).float().to(device)


def scatter_grad(index, grad_kept, num_tokens):
    batch, _, channels = grad_kept.shape
    out = torch.zeros(batch, num_tokens, channels, dtype=grad_kept.dtype, device=grad_kept.device)
    return out.scatter(1, index[..., None].expand(-1, -1, channels), grad_kept)


def check_backend(backend, x, keep_rate, scorer="l1", num_prefix_tokens=1, order="score", scores=None,
                  seed=None):
    """Forward values/indices and input gradient of `backend` equal the reference's exactly."""
    gen = (lambda: torch.Generator(device=x.device).manual_seed(seed)) if scorer == "random" else (lambda: None)
    x = x.detach().requires_grad_()
    x_kept, index = sample_patches(x, keep_rate, scorer=scorer, num_prefix_tokens=num_prefix_tokens, order=order,
                                   scores=scores, generator=gen(), backend=backend)
    ref_kept, ref_index = sample_patches_reference(x.detach(), keep_rate, scorer=scorer,
                                                   num_prefix_tokens=num_prefix_tokens, order=order,
                                                   scores=scores, generator=gen())
    assert index.dtype == torch.int64 and not index.requires_grad
    assert torch.equal(index, ref_index)
    assert torch.equal(x_kept, ref_kept)
    grad_kept = quantized(x_kept.shape, x.dtype, x.device, seed=7)
    (grad_x,) = torch.autograd.grad(x_kept, x, grad_kept)
    assert torch.equal(grad_x, scatter_grad(ref_index, grad_kept, x.shape[1]))
    dropped = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device).scatter(1, ref_index, False)
    assert torch.all(grad_x[dropped] == 0)


def quantized_on_device(shape, dtype=torch.float32, device="cuda", seed=0):
    """Values like quantized()'s, drawn in place on `device`: for tensors too large to draw on the host."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.empty(shape, dtype=dtype, device=device).random_(-8, 9, generator=gen).mul_(0.25)


def subnormal_rows(shape, dtype=torch.float32, device="cpu", seed=0):
    """quantized() values scaled to multiples of the dtype's smallest subnormal, odd token rows 2^10
    larger (float32: every value and l1 score subnormal; bfloat16: the even rows' values). Every
    float32 sum of them is exact, so l1 scores rank the same in any summation order, unless a kernel
    flushes subnormals to zero."""
    finfo = torch.finfo(dtype)
    smallest_subnormal = finfo.smallest_normal * finfo.eps
    row_scale = torch.where(torch.arange(shape[1]) % 2 == 1, 4.0 * 2 ** 10, 4.0) * smallest_subnormal
    values = quantized(shape, torch.float64, seed=seed) * row_scale.double()[None, :, None]
    return values.to(dtype).to(device)
