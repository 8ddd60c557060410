"""rpb_attention on a GPU (marker `cuda`, skipped without CUDA): the Triton kernels and the sdpa
backend at ViT shapes against a float64 reference by the flash-attention error rule (error <= 2x
the error of eager PyTorch in the same dtype), the CLS-attention output, determinism, every
bias-gradient accumulator at index=None and with an index, offsets past 2^31 elements, a
non-default stream and CUDA-graph capture."""
import pytest
import torch

from pss_kernels import rpb_attention, sample_patches
from pss_kernels.ops.rpb_attention.reference import bias_table_rows, rpb_attention_reference
from attention_cases import TOLERANCES, grads_of, make_inputs, reference_cls_attention

pytestmark = pytest.mark.cuda


def _low_precision_torch_attention(q, k, v, table, index, grid_size, num_prefix_tokens):
    """Eager attention entirely in the inputs' dtype: the 'same-dtype PyTorch' of the flash rule."""
    from pss_kernels.ops.rpb_attention.reference import gather_bias
    bias = gather_bias(table.to(q.dtype), index, grid_size, num_prefix_tokens)
    logits = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias
    return torch.matmul(logits.softmax(-1), v)


def _flash_rule_case(device, batch, heads, head_dim, grid_size, keep_rate, dtype, seed=0, backend="triton"):
    q, k, v, table, index = make_inputs(grid_size, 1, head_dim, keep_rate=keep_rate, batch=batch, heads=heads,
                                        dtype=dtype, seed=seed, device=device)
    leaves = (q, k, v, table)
    grad_out = torch.randn(q.shape, device=device, dtype=dtype)
    options = dict(grid_size=grid_size, num_prefix_tokens=1)
    exact_leaves = tuple(t.detach().double().requires_grad_() for t in leaves)
    exact = rpb_attention_reference(*exact_leaves, index, **options)
    exact_grads = grads_of(exact, grad_out.double(), exact_leaves)
    baseline = _low_precision_torch_attention(q, k, v, table, index, grid_size, 1)
    baseline_grads = grads_of(baseline, grad_out, leaves)
    out = rpb_attention(q, k, v, table, index, backend=backend, **options)
    kernel_grads = grads_of(out, grad_out, leaves)
    for name, got, base, want in zip(("out", "dq", "dk", "dv", "dbias_table"), (out, *kernel_grads),
                                     (baseline, *baseline_grads), (exact, *exact_grads)):
        kernel_error = (got.double() - want).abs().max().item()
        torch_error = (base.double() - want).abs().max().item()
        assert kernel_error <= 2 * torch_error + 1e-5, (name, kernel_error, torch_error)


@pytest.mark.parametrize("heads, head_dim", [(12, 64), (6, 64)], ids=["vit_base", "deit_small"])
@pytest.mark.parametrize("keep_rate", [None, 0.6, 0.2], ids=["n197", "n118", "n39"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_flash_rule_vit_shapes(heads, head_dim, keep_rate, dtype, device):
    _flash_rule_case(device, 8, heads, head_dim, (14, 14), keep_rate, dtype)


@pytest.mark.parametrize("keep_rate", [None, 0.6, 0.2], ids=["n197", "n118", "n39"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_sdpa_backend_flash_rule(keep_rate, dtype, device):
    """The sdpa backend (backend=None's choice on CUDA): bias gathered in the activation dtype into
    rows padded to 16, SDPA's memory-efficient kernel, the sort-based table scatter."""
    _flash_rule_case(device, 8, 12, 64, (14, 14), keep_rate, dtype, backend="sdpa")


@pytest.mark.parametrize("keep_rate", [None, 0.6], ids=["index=None", "sampled"])
def test_gpu_sdpa_backend_bias_grad_is_bit_identical(keep_rate, device):
    q, k, v, table, index = make_inputs((14, 14), 1, 64, keep_rate=keep_rate, batch=16, heads=6,
                                        dtype=torch.bfloat16, device=device)
    grads = []
    for _ in range(3):
        out = rpb_attention(q, k, v, table, index, grid_size=(14, 14), backend="sdpa", deterministic=True)
        grads.append(torch.autograd.grad(out, table, torch.ones_like(out))[0])
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("head_dim, dtype", [(d, t) for d in (32, 48, 80, 96, 128)
                                             for t in (torch.float16, torch.bfloat16)] + [(128, torch.float32)])
def test_gpu_flash_rule_head_dims(head_dim, dtype, device):
    _flash_rule_case(device, 4, 4, head_dim, (14, 14), 0.5, dtype)


@pytest.mark.parametrize("grid_size, keep_rate", [((24, 24), 0.3), ((6, 7), None), ((64, 64), None)],
                         ids=["n173", "n43", "n4097"])
def test_gpu_odd_lengths(grid_size, keep_rate, device):
    _flash_rule_case(device, 2 if grid_size[0] < 64 else 1, 2, 64, grid_size, keep_rate, torch.bfloat16)


@pytest.mark.parametrize("keep_rate", [None, 0.6, 0.2], ids=["n197", "n118", "n39"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_cls_attention_matches_reference(keep_rate, dtype, device):
    """The optional CLS-attention output (_cls_row_kernel) at DeiT-S shapes, against the float64
    softmax of the same inputs; `out` of that call against the float64 reference."""
    q, k, v, table, index = make_inputs((14, 14), 1, 64, keep_rate=keep_rate, batch=8, heads=6, dtype=dtype,
                                        device=device)
    out, cls_attention = rpb_attention(q, k, v, table, index, grid_size=(14, 14), backend="triton",
                                       return_cls_attention=True)
    assert cls_attention.shape == (8, q.shape[2]) and cls_attention.dtype == torch.float32
    want = reference_cls_attention(q, k, table, index, (14, 14), 1).float()
    torch.testing.assert_close(cls_attention, want, rtol=1e-2, atol=1e-4)  # entries ~ 1/n
    torch.testing.assert_close(cls_attention.sum(-1), torch.ones(8, device=device), rtol=0, atol=1e-3)
    expected = rpb_attention_reference(*(t.double() for t in (q, k, v, table)), index, grid_size=(14, 14))
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("keep_rate", [None, 0.6], ids=["index=None", "sampled"])
def test_gpu_deterministic_bias_grad_is_bit_identical(keep_rate, device):
    """With an index: csr (stored dS, ordered row sums); at index=None: image-sum in one group (stores)."""
    q, k, v, table, index = make_inputs((14, 14), 1, 64, keep_rate=keep_rate, batch=16, heads=6,
                                        dtype=torch.bfloat16, device=device)
    grads = []
    for _ in range(3):
        out = rpb_attention(q, k, v, table, index, grid_size=(14, 14), backend="triton", deterministic=True)
        grads.append(torch.autograd.grad(out, table, torch.ones_like(out))[0])
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    out = rpb_attention(q, k, v, table, index, grid_size=(14, 14), backend="triton")
    torch.testing.assert_close(torch.autograd.grad(out, table, torch.ones_like(out))[0], grads[0],
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("accumulator", ["slices", "position-grid", "image-sum"])
def test_gpu_bias_grad_accumulators_at_index_none(accumulator, monkeypatch, device):
    """Every index=None accumulator at DeiT-S sizes, with more images (20) than position-grid copies
    (8) and than images per image-sum program, so copies and groups are shared: the flash rule."""
    from pss_kernels.ops.rpb_attention import triton_bias_grad
    monkeypatch.setenv(triton_bias_grad.DBIAS_ENV_VAR, accumulator)
    monkeypatch.setattr(triton_bias_grad, "IMAGE_SUM_TARGET_PROGRAMS", 4 * 6 * 16)  # 4 groups of 5 images
    kind, _ = triton_bias_grad.choose_accumulator(20, 6, 197, has_index=False, deterministic=False,
                                                  query_blocks=4, key_blocks=4)
    assert kind == accumulator
    _flash_rule_case(device, 20, 6, 64, (14, 14), None, torch.bfloat16)


@pytest.mark.parametrize("accumulator", ["slices", "position-grid", "csr"])
@pytest.mark.parametrize("keep_rate", [0.6, 0.2], ids=["n118", "n39"])
def test_gpu_bias_grad_accumulators_with_an_index(accumulator, keep_rate, monkeypatch, device):
    """Every accumulator with an index at DeiT-S sizes, 20 images (more than the position grid's 8
    copies): the flash rule; the deterministic slices too, bit-identical."""
    from pss_kernels.ops.rpb_attention import triton_bias_grad
    monkeypatch.setenv(triton_bias_grad.DBIAS_ENV_VAR, accumulator)
    _flash_rule_case(device, 20, 6, 64, (14, 14), keep_rate, torch.bfloat16)
    if accumulator == "slices":
        q, k, v, table, index = make_inputs((14, 14), 1, 64, keep_rate=keep_rate, batch=8, heads=6,
                                            dtype=torch.bfloat16, device=device)
        grads = [torch.autograd.grad(out, table, torch.ones_like(out))[0] for out in (
            rpb_attention(q, k, v, table, index, grid_size=(14, 14), backend="triton", deterministic=True)
            for _ in range(2))]
        assert torch.equal(grads[0], grads[1])


def test_gpu_index_none_equals_arange_index(device):
    q, k, v, table, _ = make_inputs((14, 14), 1, 64, batch=4, heads=6, dtype=torch.bfloat16, device=device)
    arange = torch.arange(197, device=device).expand(4, -1)
    options = dict(grid_size=(14, 14), backend="triton")
    torch.testing.assert_close(rpb_attention(q, k, v, table, None, **options),
                               rpb_attention(q, k, v, table, arange, **options), rtol=0, atol=0)


@pytest.mark.xdist_group("large_memory")  # ~35 GB: one worker runs every multi-GB test, one at a time
@pytest.mark.parametrize("keep_rate", [None, 0.6], ids=["index=None", "sampled"])
def test_gpu_offsets_past_2_31_elements(keep_rate, device):
    """q, k, v of B*H*n*D > 2^31 elements, as views of a sequence-major (n, B, 3, H, D) tensor (row stride
    B*3*H*D: row offsets pass 2^31 too). The output gradient is zero but for the last two images, so
    the last images' out, dq, dk, dv and the whole bias-table gradient are checked against the
    reference on those two images alone, and every other image's gradients must be exactly zero."""
    heads, head_dim, grid_size = 12, 64, (14, 14)
    num_positions = 197
    num_tokens = num_positions if keep_rate is None else round(keep_rate * num_positions)
    batch = 2 ** 31 // (heads * num_tokens * head_dim) + 8
    generator = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(num_tokens, batch, 3, heads, head_dim, device=device, dtype=torch.bfloat16, generator=generator)
    q, k, v = (t.requires_grad_() for t in qkv.permute(2, 1, 3, 0, 4))  # (B, H, n, D), stride_n = B*3*H*D
    assert q.numel() > 2 ** 31 and q.stride(2) * (num_tokens - 1) > 2 ** 31
    table = torch.randn(bias_table_rows(grid_size), heads, device=device, generator=generator).requires_grad_()
    index = None
    if keep_rate is not None:
        scores = torch.rand(batch, num_positions - 1, device=device, generator=generator)
        _, index = sample_patches(torch.empty(batch, num_positions, 1, device=device), keep_rate,
                                  scorer="given", scores=scores)
    out = rpb_attention(q, k, v, table, index, grid_size=grid_size, backend="triton", check_index=False)
    grad_out = torch.zeros_like(out)
    grad_out[-2:] = torch.randn(2, heads, num_tokens, head_dim, device=device, generator=generator).to(out.dtype)
    dq, dk, dv, dtable = torch.autograd.grad(out, (q, k, v, table), grad_out)
    last = [t.detach()[-2:].requires_grad_() for t in (q, k, v)]
    last_table = table.detach().requires_grad_()
    last_index = index[-2:] if index is not None else None
    expected = rpb_attention_reference(*last, last_table, last_index, grid_size=grid_size)
    torch.testing.assert_close(out[-2:], expected, **TOLERANCES[torch.bfloat16])
    for name, got, want in zip(("dq", "dk", "dv", "dbias_table"), (dq[-2:], dk[-2:], dv[-2:], dtable),
                               grads_of(expected, grad_out[-2:], (*last, last_table))):
        torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[torch.bfloat16], msg=lambda m: f"{name}: {m}")
    for name, grad in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.count_nonzero(grad[:-2]) == 0, name
    del qkv, q, k, v, out, grad_out, dq, dk, dv
    torch.cuda.empty_cache()


@pytest.mark.parametrize("keep_rate", [None, 0.6], ids=["index=None", "sampled"])
def test_gpu_non_default_stream(keep_rate, device):
    """Inputs written on a side stream behind a long sleep, then forward (with the CLS row) and
    backward called on that stream without a synchronisation: every launcher must queue on the
    current stream (index=None runs the image-sum and row-sum kernels, an index the slices)."""
    q0, k0, v0, table0, index = make_inputs((14, 14), 1, 64, keep_rate=keep_rate, batch=8, heads=6,
                                            dtype=torch.bfloat16, device=device)
    grad_out0 = torch.randn(q0.shape, device=device, dtype=torch.bfloat16)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU cycles ahead of the copies
        q, k, v, table, grad_out = (t.detach().clone() for t in (q0, k0, v0, table0, grad_out0))
        for t in (q, k, v, table):
            t.requires_grad_()
        out, cls_attention = rpb_attention(q, k, v, table, index, grid_size=(14, 14), backend="triton",
                                           check_index=False, return_cls_attention=True)
        grads = torch.autograd.grad(out, (q, k, v, table), grad_out)
    torch.cuda.synchronize(device)
    expected = rpb_attention_reference(q0, k0, v0, table0, index, grid_size=(14, 14))
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(cls_attention, reference_cls_attention(q0, k0, table0, index, (14, 14), 1).float(),
                               rtol=2e-2, atol=1e-3)
    for got, want in zip(grads, grads_of(expected, grad_out0, (q0, k0, v0, table0))):
        torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("backend, accumulator", [("triton", "auto"), ("triton", "csr"), ("sdpa", "auto")])
@pytest.mark.parametrize("keep_rate", [None, 0.6], ids=["index=None", "sampled"])
def test_gpu_cuda_graph_capture_and_replay(backend, accumulator, keep_rate, monkeypatch, device):
    """Forward and backward captured once into a CUDA graph, replayed on new data copied into the
    static inputs (the shared row lists, the csr lists of an index and the sdpa backend's relative
    index are made inside the graph, not cached)."""
    from pss_kernels.ops.rpb_attention import triton_bias_grad
    monkeypatch.setenv(triton_bias_grad.DBIAS_ENV_VAR, accumulator)
    q, k, v, table, index = make_inputs((14, 14), 1, 64, keep_rate=keep_rate, batch=8, heads=6,
                                        dtype=torch.bfloat16, device=device)
    static = [t.detach().clone().requires_grad_() for t in (q, k, v, table)]
    static_grad_out = torch.randn(q.shape, device=device, dtype=torch.bfloat16)

    def step():
        out = rpb_attention(*static[:3], static[3], index, grid_size=(14, 14), backend=backend, check_index=False)
        return (out, *torch.autograd.grad(out, static, static_grad_out))

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results = step()
    for seed in (1, 2):
        fresh = make_inputs((14, 14), 1, 64, keep_rate=None, batch=8, heads=6, dtype=torch.bfloat16, seed=seed,
                            device=device)[:4]
        fresh = [t[:, :, :q.shape[2]] if t.dim() == 4 else t for t in fresh]
        with torch.no_grad():
            for target, source in zip(static, fresh):
                target.copy_(source)
            static_grad_out.normal_()
        graph.replay()
        torch.cuda.synchronize(device)
        leaves = [t.detach().clone().requires_grad_() for t in static]
        expected = rpb_attention_reference(*leaves[:3], leaves[3], index, grid_size=(14, 14))
        torch.testing.assert_close(results[0], expected, **TOLERANCES[torch.bfloat16])
        for got, want in zip(results[1:], grads_of(expected, static_grad_out, leaves)):
            torch.testing.assert_close(got.float(), want.float(), **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("keep_rate", [None, 0.6], ids=["index=None", "sampled"])
def test_gpu_deterministic_cls_rows_are_bit_identical_with_many_images(keep_rate, device):
    """The three CLS rows of the table (CLS->token, token->CLS, CLS->CLS) take a contribution from every
    query or key of every image: 64 images x 197 (or 118) tokens land on the same three addresses,
    where atomics would make the order, and the sum's rounding, vary. Deterministic mode: bit-identical
    over runs, and within the flash rule of the float64 reference."""
    q, k, v, table, index = make_inputs((14, 14), 1, 64, keep_rate=keep_rate, batch=64, heads=6,
                                        dtype=torch.bfloat16, device=device)
    grad_out = torch.randn(q.shape, device=device, dtype=q.dtype)
    grads = []
    for _ in range(4):
        out = rpb_attention(q, k, v, table, index, grid_size=(14, 14), backend="triton", deterministic=True)
        grads.append(torch.autograd.grad(out, table, grad_out)[0])
    cls_rows = slice(table.shape[0] - 3, table.shape[0])
    assert all(torch.equal(grads[0][cls_rows], g[cls_rows]) for g in grads[1:])
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    exact_table = table.detach().double().requires_grad_()
    exact = rpb_attention_reference(*(t.detach().double() for t in (q, k, v)), exact_table, index,
                                    grid_size=(14, 14))
    (want,) = torch.autograd.grad(exact, exact_table, grad_out.double())
    scale = want[cls_rows].abs().max().item()
    assert (grads[0][cls_rows].double() - want[cls_rows]).abs().max().item() <= 2e-2 * scale + 1e-3


def test_gpu_csr_row_sums_over_rows_longer_than_one_chunk(device):
    """table_grad_from_stored_ds on the GPU against an index_add in float64: at 32 images x 118 tokens
    the relative-offset (0, 0) row holds 32 * 117 pairs and the CLS rows 32 * 117 each, many chunks of
    64 pairs per program and several parts per row (csr_splits); short rows hold a handful."""
    from pss_kernels.ops.rpb_attention import triton_bias_grad
    from pss_kernels.ops.rpb_attention.reference import relative_index
    grid, batch, heads = (14, 14), 32, 6
    _, _, _, _, index = make_inputs(grid, 1, 64, keep_rate=0.6, batch=batch, heads=heads, device=device)
    n = index.shape[1]
    ds = torch.randn(batch, n, n, heads, device=device, dtype=torch.float32)
    rows = bias_table_rows(grid, 1)
    got = triton_bias_grad.table_grad_from_stored_ds(ds, triton_bias_grad.index_row_lists(index, grid, 1), grid, 1,
                                                     rows)
    rel = relative_index(index[:, :, None], index[:, None, :], grid, 1).reshape(-1)
    want = torch.zeros(rows, heads, device=device, dtype=torch.float64).index_add_(
        0, rel, ds.reshape(-1, heads).double())
    assert triton_bias_grad.csr_splits(n) >= 1
    longest = torch.bincount(rel, minlength=rows).max().item()
    assert longest > 64 * triton_bias_grad.csr_splits(n)  # more than one chunk per part
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    again = triton_bias_grad.table_grad_from_stored_ds(ds, triton_bias_grad.index_row_lists(index, grid, 1), grid, 1,
                                                     rows)
    assert torch.equal(got, again)  # a fixed order: bit-identical
