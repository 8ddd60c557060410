"""sample_patches on a GPU (marker `cuda`, skipped without CUDA): the cuda and triton backends at
real shapes against the reference."""
import pytest
import torch

from pss_kernels import sample_patches
from pss_kernels._backends import cuda_extension
from sampling_cases import DTYPES, check_backend, given_scores, quantized

GPU_SHAPES = [(256, 197, 384), (256, 197, 768), (64, 577, 768), (4, 4097, 64)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_backend_matches_reference(backend, dtype, shape):
    if backend == "cuda" and cuda_extension() is None:
        pytest.skip("pss_kernels._C is not built")
    x = quantized(shape, dtype, "cuda")
    num_patches = shape[1] - 1
    for scorer, order, keep_rate in (("l1", "score", 0.5), ("l2", "spatial", 0.2), ("random", "score", 0.8),
                                     ("given", "spatial", 0.5)):
        scores = given_scores(shape[0], num_patches, "cuda") if scorer == "given" else None
        check_backend(backend, x, keep_rate, scorer, 1, order, scores, seed=11)
    check_backend(backend, x, 0.3, "l1", 0, "score")
    check_backend(backend, x, 0.3, "l2", 4, "spatial")
    check_backend(backend, x, 0.999, "l1", 1, "score")  # k = N for N < 500: nothing dropped


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_backend_untied_normal_data(backend, dtype):
    """randn rows: the kept scores equal the reference's top scores up to float32 summation order."""
    if backend == "cuda" and cuda_extension() is None:
        pytest.skip("pss_kernels._C is not built")
    x = torch.randn(256, 197, 768, device="cuda").to(dtype)
    x_kept, index = sample_patches(x, 0.5, backend=backend)
    assert torch.equal(x_kept, x.gather(1, index[..., None].expand(-1, -1, 768)))
    scores = x[:, 1:].float().abs().sum(-1)
    kept_scores = scores.gather(1, index[:, 1:] - 1)
    want = scores.sort(dim=1, descending=True).values[:, : index.shape[1] - 1]
    torch.testing.assert_close(kept_scores, want, rtol=1e-5, atol=0)
    assert torch.all(kept_scores.diff(dim=1) <= 1e-5 * kept_scores[:, 1:])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_misaligned_and_strided_inputs(backend):
    if backend == "cuda" and cuda_extension() is None:
        pytest.skip("pss_kernels._C is not built")
    check_backend(backend, quantized((8, 197, 37), torch.bfloat16, "cuda"), 0.5)  # rows not 16-byte multiples
    storage = quantized((8 * 197 * 64 + 1,), torch.float16, "cuda")
    check_backend(backend, storage[1:].view(8, 197, 64), 0.5)  # data pointer 2 bytes past alignment
    check_backend(backend, quantized((8, 64, 197), torch.float32, "cuda").transpose(1, 2), 0.5)
