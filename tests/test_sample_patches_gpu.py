"""sample_patches on a GPU (marker `cuda`, skipped without CUDA): the cuda and triton backends at
real shapes against the reference; offsets past 2^31 elements, 8192 patches, special and subnormal
scores, a non-default stream, CUDA-graph capture.

The cuda backend runs "fused" (one block per image) when B >= the number of SMs and "split"
(score, select, gather kernels over rows) below; tests parametrized by `plan` run both."""
import gc

import pytest
import torch

from pss_kernels import num_kept_tokens, sample_patches
from pss_kernels._backends import cuda_extension
from pss_kernels.ops.sample_patches.reference import patch_scores, sample_patches_reference, select_indices
from sampling_cases import (DTYPES, SPECIAL, check_backend, given_scores, quantized, quantized_on_device,
                            scatter_grad, subnormal_rows)

GPU_SHAPES = [(256, 197, 384), (256, 197, 768), (64, 577, 768), (4, 4097, 64)]
# > 2^31 elements (4.3 GB in bf16): the last images' rows lie past 2^31 elements and 2^32 bytes. The
# cuda backend runs the first fused and the second split (B = 16 < number of SMs).
LARGE_SHAPES = [(1024, 1025, 2048), (16, 4097, 32768)]
SLEEP_CYCLES = 100_000_000  # ~50 ms of GPU time at 2 GHz


@pytest.fixture(params=["cuda", "triton"])
def gpu_backend(request):
    if request.param == "cuda" and cuda_extension() is None:
        pytest.skip("pss_kernels._C is not built")
    return request.param


def num_sms():
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def plan_batch(plan):
    """A batch size that makes the cuda backend run `plan`."""
    return 2 if plan == "split" else num_sms()


@pytest.fixture
def release_cuda_memory():
    """Hand the cached blocks of a test's large tensors back, for the tests running beside it."""
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_backend_matches_reference(gpu_backend, dtype, shape):
    x = quantized(shape, dtype, "cuda")
    num_patches = shape[1] - 1
    for scorer, order, keep_rate in (("l1", "score", 0.5), ("l2", "spatial", 0.2), ("random", "score", 0.8),
                                     ("given", "spatial", 0.5)):
        scores = given_scores(shape[0], num_patches, "cuda") if scorer == "given" else None
        check_backend(gpu_backend, x, keep_rate, scorer, 1, order, scores, seed=11)
    check_backend(gpu_backend, x, 0.3, "l1", 0, "score")
    check_backend(gpu_backend, x, 0.3, "l2", 4, "spatial")
    check_backend(gpu_backend, x, 0.999, "l1", 1, "score")  # k = N for N < 500: nothing dropped


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_backend_untied_normal_data(gpu_backend, dtype):
    """randn rows: the kept scores equal the reference's top scores up to float32 summation order."""
    x = torch.randn(256, 197, 768, device="cuda").to(dtype)
    x_kept, index = sample_patches(x, 0.5, backend=gpu_backend)
    assert torch.equal(x_kept, x.gather(1, index[..., None].expand(-1, -1, 768)))
    scores = x[:, 1:].float().abs().sum(-1)
    kept_scores = scores.gather(1, index[:, 1:] - 1)
    want = scores.sort(dim=1, descending=True).values[:, : index.shape[1] - 1]
    torch.testing.assert_close(kept_scores, want, rtol=1e-5, atol=0)
    assert torch.all(kept_scores.diff(dim=1) <= 1e-5 * kept_scores[:, 1:])


@pytest.mark.cuda
@pytest.mark.parametrize("plan", ["split", "fused"])
def test_gpu_misaligned_and_strided_inputs(gpu_backend, plan):
    """Rows of 74, 200 and 116 bytes and a data pointer 2 bytes past alignment: every copy unit."""
    batch = plan_batch(plan)
    check_backend(gpu_backend, quantized((batch, 197, 37), torch.bfloat16, "cuda"), 0.5)  # 2-byte units
    check_backend(gpu_backend, quantized((batch, 197, 100), torch.float16, "cuda"), 0.5)  # 8-byte units
    check_backend(gpu_backend, quantized((batch, 197, 29), torch.float32, "cuda"), 0.5)  # 4-byte units
    storage = quantized((batch * 197 * 64 + 1,), torch.float16, "cuda")
    check_backend(gpu_backend, storage[1:].view(batch, 197, 64), 0.5)
    check_backend(gpu_backend, quantized((batch, 64, 197), torch.float32, "cuda").transpose(1, 2), 0.5)


@pytest.mark.cuda
@pytest.mark.xdist_group("large_memory")  # one worker runs every multi-GB test, one at a time
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_offsets_past_2_31_elements(gpu_backend, shape, release_cuda_memory):
    """The last images against the reference on those images alone; every image's index against
    select_indices of torch's scores (exact: quantized values) and x_kept / grad_x against gathers."""
    batch, num_tokens, channels = shape
    assert batch * num_tokens * channels > 2 ** 31
    x = quantized_on_device(shape, torch.bfloat16, "cuda").requires_grad_()
    x_kept, index = sample_patches(x, 0.5, backend=gpu_backend)
    grad_kept = quantized_on_device(x_kept.shape, torch.bfloat16, x.device, seed=7)
    (grad_x,) = torch.autograd.grad(x_kept, x, grad_kept)
    x = x.detach()

    last = slice(batch - 4, batch)
    ref_kept, ref_index = sample_patches_reference(x[last], 0.5)
    assert torch.equal(index[last], ref_index) and torch.equal(x_kept[last], ref_kept)
    assert torch.equal(grad_x[last], scatter_grad(ref_index, grad_kept[last], num_tokens))

    images_per_chunk = max(1, 2 ** 28 // (num_tokens * channels))  # float32 copies of 1 GB at most
    scores = torch.cat([patch_scores(chunk, "l1", 1) for chunk in x.split(images_per_chunk)])
    assert torch.equal(index, select_indices(scores, num_kept_tokens(num_tokens, 0.5), 1, "score"))
    rows = index[..., None].expand(-1, -1, channels)
    assert torch.equal(x_kept, x.gather(1, rows))
    assert torch.equal(grad_x.gather(1, rows), grad_kept)
    assert torch.count_nonzero(grad_x.scatter_(1, rows, 0)) == 0  # dropped rows are exact zeros


@pytest.mark.cuda
@pytest.mark.parametrize("plan", ["split", "fused"])
def test_gpu_8192_patches(gpu_backend, plan):
    """P = 8192, the most either backend takes: the cuda select sorts 8192 int64 keys in 64 KiB of
    shared memory, past the 48 KiB default (the opt-in path), in both plans."""
    batch = plan_batch(plan)
    if gpu_backend == "cuda":  # the plan the test means is the one the extension runs
        workspace = cuda_extension().sample_patches_forward_workspace_bytes(batch, 8193, 1, 0)
        assert (workspace > 0) == (plan == "split")
    x = quantized((batch, 8193, 32), device="cuda")
    check_backend(gpu_backend, x, 0.5)
    check_backend(gpu_backend, x, 0.2, "l2", 1, "spatial")
    check_backend(gpu_backend, x, 0.7, "given", 1, "score", given_scores(batch, 8192, "cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("plan", ["split", "fused"])
def test_gpu_special_given_scores_every_kept_count(gpu_backend, plan):
    """NaN, +-0, +-inf and +-subnormal given scores (shuffled per image), every kept count from one
    patch to all but one: the -0/+0 tie and the NaN/inf ranks each land on the keep boundary."""
    batch = 1 if plan == "split" else num_sms()
    gen = torch.Generator().manual_seed(0)
    special = torch.tensor(SPECIAL)
    shuffled = [special[torch.randperm(len(SPECIAL), generator=gen)] for _ in range(batch - 1)]
    scores = torch.stack([special, *shuffled]).cuda()
    num_tokens = len(SPECIAL) + 1
    x = quantized((batch, num_tokens, 24), device="cuda")
    for kept in range(2, num_tokens):
        assert num_kept_tokens(num_tokens, kept / num_tokens) == kept
        for order in ("score", "spatial"):
            check_backend(gpu_backend, x, kept / num_tokens, "given", 1, order, scores)


@pytest.mark.cuda
@pytest.mark.parametrize("plan", ["split", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_subnormal_l1_scores_rank_as_reference(gpu_backend, plan, dtype):
    """l1 scores of rows of subnormal values: a build that flushes subnormals to zero (--use_fast_math)
    scores those rows 0, ties them, and keeps the lowest positions instead (in bfloat16 the odd rows
    are normal and fill the top half: keep 0.8 reaches the subnormal rows)."""
    batch = 1 if plan == "split" else num_sms()
    x = subnormal_rows((batch, 197, 64), dtype, "cuda")
    even_rows = x[:, ::2].float().abs()
    assert torch.all(even_rows < torch.finfo(torch.float32).smallest_normal) and torch.any(even_rows > 0)
    for keep_rate in (0.01, 0.5, 0.8):  # 0.01: one kept patch
        check_backend(gpu_backend, x, keep_rate)


@pytest.mark.cuda
def test_gpu_non_default_stream(gpu_backend):
    """Both launchers queue on the current stream: the inputs are written on a side stream behind
    ~50 ms of sleep, and the op is called there without synchronising. A launch on another stream
    would read the zeros that were there before."""
    shape = (8, 197, 64)
    x_data = quantized(shape, device="cuda")
    ref_kept, ref_index = sample_patches_reference(x_data, 0.5)
    grad_data = quantized(ref_kept.shape, device="cuda", seed=7)
    x = torch.zeros(shape, device="cuda", requires_grad=True)
    grad_kept = torch.zeros_like(ref_kept)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the zeros and the data are ready
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        with torch.no_grad():
            x.copy_(x_data)
        x_kept, index = sample_patches(x, 0.5, backend=gpu_backend)
        torch.cuda._sleep(SLEEP_CYCLES)
        grad_kept.copy_(grad_data)
        (grad_x,) = torch.autograd.grad(x_kept, x, grad_kept)
    side.synchronize()
    assert torch.equal(index, ref_index) and torch.equal(x_kept, ref_kept)
    assert torch.equal(grad_x, scatter_grad(ref_index, grad_data, shape[1]))


@pytest.mark.cuda
@pytest.mark.parametrize("plan", ["split", "fused"])
def test_gpu_cuda_graph_capture_and_replay(gpu_backend, plan):
    """Forward and backward captured once on static buffers, replayed on new data copied in."""
    shape = (plan_batch(plan), 197, 64)
    num_kept = num_kept_tokens(shape[1], 0.5)
    x = quantized(shape, device="cuda").requires_grad_()
    scores = given_scores(shape[0], shape[1] - 1, "cuda")
    grad_kept = quantized((shape[0], num_kept, shape[2]), device="cuda", seed=7)

    def step():
        kept_l1, index_l1 = sample_patches(x, 0.5, backend=gpu_backend)
        kept_given, index_given = sample_patches(x, 0.5, scorer="given", scores=scores, order="spatial",
                                                 backend=gpu_backend)
        grad_x = torch.autograd.grad((kept_l1, kept_given), x, (grad_kept, grad_kept))[0]
        return index_l1, kept_l1, index_given, kept_given, grad_x

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles, first launches
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()

    for seed in (2, 3):
        with torch.no_grad():
            x.copy_(quantized(shape, device="cuda", seed=seed))
        scores.copy_(given_scores(shape[0], shape[1] - 1, "cuda", seed=seed))
        grad_kept.copy_(quantized(grad_kept.shape, device="cuda", seed=seed + 10))
        graph.replay()
        torch.cuda.synchronize()
        index_l1, kept_l1, index_given, kept_given, grad_x = outputs
        want_l1, want_index_l1 = sample_patches_reference(x.detach(), 0.5)
        want_given, want_index_given = sample_patches_reference(x.detach(), 0.5, scorer="given", scores=scores,
                                                                order="spatial")
        assert torch.equal(index_l1, want_index_l1) and torch.equal(kept_l1, want_l1)
        assert torch.equal(index_given, want_index_given) and torch.equal(kept_given, want_given)
        want_grad = (scatter_grad(want_index_l1, grad_kept, shape[1])
                     + scatter_grad(want_index_given, grad_kept, shape[1]))
        assert torch.equal(grad_x, want_grad)


@pytest.mark.cuda
@pytest.mark.parametrize("plan", ["split", "fused"])
@pytest.mark.parametrize("num_prefix_tokens", [0, 1])
def test_gpu_plans_on_the_cls_row_and_4_byte_rows(gpu_backend, plan, num_prefix_tokens):
    """The CLS row (always kept, first) through both plans, with rows of 4-byte copy units only
    (float16 x 50 channels = 100 bytes, bfloat16 x 2 = 4 bytes) and with CLS scores that would rank
    first or last if the prefix were scored."""
    batch = plan_batch(plan)
    for shape, dtype in (((batch, 197, 50), torch.float16), ((batch, 197, 2), torch.bfloat16),
                         ((batch, 50, 98), torch.float32)):
        x = quantized(shape, dtype, "cuda")
        x[:, 0] = 1000 if num_prefix_tokens else x[:, 0]  # a huge CLS: must not change which patches win
        for keep_rate in (0.2, 0.5, 0.99):
            check_backend(gpu_backend, x, keep_rate, num_prefix_tokens=num_prefix_tokens)
