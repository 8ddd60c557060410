"""rpb_attention: the reference against an independent float64 loop oracle and gradcheck; every
backend (torch, sdpa, triton — in the interpreter on CPU) against the reference for out, dq, dk, dv,
dbias_table and the CLS attention; every bias-gradient accumulator of the Triton backward;
determinism; argument errors; opcheck; torch.compile; RelPosAttention; the peers; the benchmark
harness; the kernels' compilation for sm_80/sm_90. GPU-only checks (marker `cuda`) are in
test_rpb_attention_gpu.py."""
import sys
from pathlib import Path

import pytest
import torch

from pss_kernels import RelPosAttention, available_backends, rpb_attention, sample_patches
from pss_kernels.ops.rpb_attention import peers
from pss_kernels.ops.rpb_attention.reference import bias_table_rows, rpb_attention_reference
from attention_cases import (DEVICE, HAS_CUDA, TOLERANCES, grads_of, loop_attention_float64, make_inputs,
                             reference_cls_attention, timm_relative_position_index)

REPO = Path(__file__).resolve().parents[1]
# Every backend; conftest skips, with the reason, those that cannot run on this host's test device.
BACKENDS = ("torch", "sdpa", "triton")
# The backends behind the registered op pss_kernels::rpb_attention_fwd / _bwd ("sdpa" is built from
# PyTorch's own ops and autograd).
OP_KERNEL_BACKENDS = ("torch", "triton")


def skip_interpreted_bf16(backend, dtype):
    # Triton 3.9's interpreter runs tl.dot on bf16 bit patterns as integers (verified: a 16x16 bf16
    # product comes out ~1e10 off); bf16 kernels are checked by the GPU tests.
    if backend == "triton" and dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("the Triton interpreter cannot multiply bf16 (tl.dot); covered by the cuda tests")


# ----------------------------------------------------------------------------- oracle and inputs

# ----------------------------------------------------------------------------- reference

@pytest.mark.parametrize("grid_size", [(3, 3), (4, 5)])
@pytest.mark.parametrize("num_prefix_tokens", [0, 1])
@pytest.mark.parametrize("keep_rate", [None, 0.6])
def test_reference_matches_float64_loops(grid_size, num_prefix_tokens, keep_rate):
    q, k, v, table, index = make_inputs(grid_size, num_prefix_tokens, 8, keep_rate=keep_rate, dtype=torch.float64,
                                        device="cpu")
    out = rpb_attention_reference(q, k, v, table.double(), index, grid_size=grid_size,
                                  num_prefix_tokens=num_prefix_tokens)
    expected = loop_attention_float64(q, k, v, table, index, grid_size, num_prefix_tokens, 8 ** -0.5)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("keep_rate", [None, 0.7])
def test_reference_gradcheck_float64(keep_rate):
    q, k, v, table, index = make_inputs((2, 3), 1, 4, keep_rate=keep_rate, batch=1, dtype=torch.float64,
                                        device="cpu")
    table = table.detach().double().requires_grad_()

    def reference(q, k, v, table):
        return rpb_attention_reference(q, k, v, table, index, grid_size=(2, 3), num_prefix_tokens=1)

    assert torch.autograd.gradcheck(reference, (q, k, v, table))


def test_op_torch_backend_gradcheck_float64():
    """The registered autograd formula (analytic backward of the torch backend), not autograd of eager ops."""
    q, k, v, table, index = make_inputs((2, 3), 1, 4, keep_rate=0.7, batch=1, dtype=torch.float64, device="cpu")
    table = table.detach().double().requires_grad_()

    def op(q, k, v, table):
        return rpb_attention(q, k, v, table, index, grid_size=(2, 3), backend="torch")

    assert torch.autograd.gradcheck(op, (q, k, v, table))


# ----------------------------------------------------------------------------- backends vs reference


def check_against_reference(backend, device, grid_size, num_prefix_tokens, head_dim, keep_rate, dtype=torch.float32,
                            deterministic=False):
    q, k, v, table, index = make_inputs(grid_size, num_prefix_tokens, head_dim, keep_rate=keep_rate, dtype=dtype, device=device)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    options = dict(grid_size=grid_size, num_prefix_tokens=num_prefix_tokens)
    with_cls = num_prefix_tokens == 1
    result = rpb_attention(q, k, v, table, index, backend=backend, deterministic=deterministic,
                           return_cls_attention=with_cls, **options)
    out, cls_attention = result if with_cls else (result, None)
    expected = rpb_attention_reference(q, k, v, table, index, **options)
    tolerance = TOLERANCES[dtype]
    torch.testing.assert_close(out, expected, **tolerance)
    for name, got, want in zip(("dq", "dk", "dv", "dbias_table"), grads_of(out, grad_out, (q, k, v, table)),
                               grads_of(expected, grad_out, (q, k, v, table))):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, **tolerance, msg=lambda m: f"{name}: {m}")
    if with_cls:
        assert cls_attention.shape == (q.shape[0], q.shape[2]) and cls_attention.dtype == torch.float32
        want = reference_cls_attention(q, k, table, index, grid_size, num_prefix_tokens).float()
        torch.testing.assert_close(cls_attention, want, **TOLERANCES[torch.float32] if dtype == torch.float32
                                   else tolerance)
        torch.testing.assert_close(cls_attention.sum(-1), torch.ones_like(cls_attention[:, 0]), rtol=0, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid_size", [(3, 3), (4, 5)])
@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("keep_rate", [None, 0.8], ids=["index=None", "sampled"])
@pytest.mark.parametrize("num_prefix_tokens", [0, 1])
def test_backend_matches_reference(backend, grid_size, head_dim, keep_rate, num_prefix_tokens, device):
    check_against_reference(backend, device, grid_size, num_prefix_tokens, head_dim, keep_rate)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [24, 40])  # padded to 32 / 64 and masked
def test_backend_handles_head_dims_that_are_not_powers_of_two(backend, head_dim, device):
    check_against_reference(backend, device, (4, 5), 1, head_dim, 0.8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_backend_half_precision_matches_reference(backend, dtype, device):
    skip_interpreted_bf16(backend, dtype)
    check_against_reference(backend, device, (4, 5), 1, 16, 0.8, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_mode_is_bit_identical_and_correct(backend, device):
    check_against_reference(backend, device, (4, 5), 1, 16, 0.8, deterministic=True)
    q, k, v, table, index = make_inputs((4, 5), 1, 16, keep_rate=0.8, device=device)

    def bias_grad():
        out = rpb_attention(q, k, v, table, index, grid_size=(4, 5), backend=backend, deterministic=True)
        return torch.autograd.grad(out, table, torch.ones_like(out))[0]

    first, second = bias_grad(), bias_grad()
    assert torch.equal(first, second)


class GridRecorder:
    """Stands in for a Triton kernel object and records each launch grid (on every host)."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


@pytest.mark.triton
@pytest.mark.parametrize("keep_rate", [None, 0.8], ids=["index=None", "sampled"])
def test_deterministic_mode_accumulates_without_atomics(keep_rate, monkeypatch, device):
    """The interpreter runs every program in turn, so only the launches show what makes the order
    fixed: with an index, dkdv stores dS (csr) and one row-sum program per (table row, part) adds the
    pairs in order; at index=None one group of images for the image-sum kernel (plain stores)."""
    from pss_kernels.ops.rpb_attention import triton_backward, triton_bias_grad
    monkeypatch.delenv(triton_bias_grad.DBIAS_ENV_VAR, raising=False)
    dkdv = GridRecorder(triton_backward._dkdv_kernel)
    image_sum = GridRecorder(triton_bias_grad._image_sum_kernel)
    row_sum = GridRecorder(triton_bias_grad._sum_pairs_by_row_kernel)
    monkeypatch.setattr(triton_backward, "_dkdv_kernel", dkdv)
    monkeypatch.setattr(triton_bias_grad, "_image_sum_kernel", image_sum)
    monkeypatch.setattr(triton_bias_grad, "_sum_pairs_by_row_kernel", row_sum)
    q, k, v, table, index = make_inputs((4, 5), 1, 16, keep_rate=keep_rate, batch=3, device=device)
    out = rpb_attention(q, k, v, table, index, grid_size=(4, 5), backend="triton", deterministic=True)
    out.backward(torch.ones_like(out))
    batch, heads, num_tokens, _ = q.shape
    key_blocks = -(-num_tokens // triton_bias_grad.tile_config("dkdv", num_tokens, 16, q.dtype).block_n)
    if keep_rate is not None:
        assert dkdv.grids == [(batch * heads * key_blocks,)] and image_sum.grids == []
        assert row_sum.grids == [(table.shape[0] * triton_bias_grad.csr_splits(num_tokens),)]
    else:
        config = triton_bias_grad.tile_config("dbias", num_tokens, 16, q.dtype)
        tiles = heads * -(-num_tokens // config.block_m) * -(-num_tokens // config.block_n)
        assert image_sum.grids == [(tiles,)] and dkdv.grids == [(batch * heads * key_blocks,)] and row_sum.grids == []


@pytest.mark.triton
@pytest.mark.parametrize("keep_rate", [None, 0.8], ids=["index=None", "sampled"])
def test_deterministic_slices_launch_one_program_per_image_and_head(keep_rate, monkeypatch, device):
    """The fallback of deterministic mode (PSS_KERNELS_RPB_DBIAS=slices, or csr too large): one dkdv
    program per (b, h) walks its key blocks in order; bit-identical and right."""
    from pss_kernels.ops.rpb_attention import triton_backward, triton_bias_grad
    monkeypatch.setenv(triton_bias_grad.DBIAS_ENV_VAR, "slices")
    dkdv = GridRecorder(triton_backward._dkdv_kernel)
    monkeypatch.setattr(triton_backward, "_dkdv_kernel", dkdv)
    q, k, v, table, index = make_inputs((4, 5), 1, 16, keep_rate=keep_rate, batch=3, device=device)

    def bias_grad():
        out = rpb_attention(q, k, v, table, index, grid_size=(4, 5), backend="triton", deterministic=True)
        return torch.autograd.grad(out, table, torch.ones_like(out))[0]

    first = bias_grad()
    assert torch.equal(first, bias_grad())
    assert dkdv.grids == [(q.shape[0] * q.shape[1],)] * 2
    expected = rpb_attention_reference(q, k, v, table, index, grid_size=(4, 5))
    torch.testing.assert_close(first, torch.autograd.grad(expected, table, torch.ones_like(expected))[0],
                               **TOLERANCES[torch.float32])


@pytest.mark.triton
@pytest.mark.parametrize("keep_rate", [None, 0.8], ids=["index=None", "sampled"])
def test_padding_query_rows_stay_out_of_the_backward_with_a_large_bias(keep_rate, device):
    """n = 21 or 17 tokens fill a second query block with padding rows (q = dO = 0). A bias of ~90 gives
    logits of ~130 in base 2: unless the padding rows' lse is +inf, 2^130 overflows float32 and
    inf * 0 turns dk (and the bias gradient) into NaN."""
    q, k, v, table, index = make_inputs((4, 5), 1, 16, keep_rate=keep_rate, device=device)
    with torch.no_grad():
        table.mul_(3).add_(90)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(device)
    out = rpb_attention(q, k, v, table, index, grid_size=(4, 5), backend="triton")
    expected = rpb_attention_reference(q, k, v, table, index, grid_size=(4, 5))
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])
    for name, got, want in zip(("dq", "dk", "dv", "dbias_table"), grads_of(out, grad_out, (q, k, v, table)),
                               grads_of(expected, grad_out, (q, k, v, table))):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_mode_at_index_none_is_bit_identical(backend, device):
    q, k, v, table, _ = make_inputs((4, 5), 1, 16, batch=3, device=device)

    def bias_grad():
        out = rpb_attention(q, k, v, table, grid_size=(4, 5), backend=backend, deterministic=True)
        return torch.autograd.grad(out, table, torch.ones_like(out))[0]

    first = bias_grad()
    assert torch.equal(first, bias_grad())
    expected = rpb_attention_reference(q, k, v, table, grid_size=(4, 5))
    torch.testing.assert_close(first, torch.autograd.grad(expected, table, torch.ones_like(expected))[0],
                               **TOLERANCES[torch.float32])


@pytest.mark.triton
@pytest.mark.parametrize("accumulator", ["slices", "position-grid", "csr", "image-sum"])
@pytest.mark.parametrize("keep_rate", [None, 0.8], ids=["index=None", "sampled"])
@pytest.mark.parametrize("num_prefix_tokens", [0, 1])
def test_triton_bias_grad_accumulators(accumulator, keep_rate, num_prefix_tokens, monkeypatch, device):
    """Every dbias_table accumulator of the Triton backward (PSS_KERNELS_RPB_DBIAS) at index=None and
    with an index, with more images than position-grid copies and than images per image-sum program,
    so that copies and groups are shared and summed (atomics), and CSR rows cut into parts."""
    from pss_kernels.ops.rpb_attention import triton_backward, triton_bias_grad
    monkeypatch.setenv(triton_bias_grad.DBIAS_ENV_VAR, accumulator)
    monkeypatch.setattr(triton_bias_grad, "POSITION_GRID_MAX_COPIES", 2)
    monkeypatch.setattr(triton_bias_grad, "IMAGE_SUM_TARGET_PROGRAMS", 4)  # 2 tiles (heads) -> 2 groups
    monkeypatch.setattr(triton_bias_grad, "CSR_TARGET_PROGRAMS", 24)  # 2 or 3 parts per table row
    chosen = []
    real_choose = triton_backward.choose_accumulator
    monkeypatch.setattr(triton_backward, "choose_accumulator", lambda *a, **kw: chosen.append(real_choose(*a, **kw))
                        or chosen[-1])
    q, k, v, table, index = make_inputs((3, 3), num_prefix_tokens, 16, keep_rate=keep_rate, batch=3, device=device)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device)
    options = dict(grid_size=(3, 3), num_prefix_tokens=num_prefix_tokens)
    out = rpb_attention(q, k, v, table, index, backend="triton", **options)
    expected = rpb_attention_reference(q, k, v, table, index, **options)
    for name, got, want in zip(("dq", "dk", "dv", "dbias_table"), grads_of(out, grad_out, (q, k, v, table)),
                               grads_of(expected, grad_out, (q, k, v, table))):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32], msg=lambda m: f"{name}: {m}")
    kind = "position-grid" if accumulator == "image-sum" and keep_rate is not None else accumulator
    assert chosen == [{"slices": ("slices", 0), "position-grid": ("position-grid", 2), "csr": ("csr", 0),
                       "image-sum": ("image-sum", 2)}[kind]]


@pytest.mark.triton
@pytest.mark.parametrize("accumulator", ["csr", "position-grid"])
def test_triton_bias_grad_half_precision_with_an_index(accumulator, monkeypatch, device):
    """fp16 activations, float32 table: the full-position grid and the stored dS stay float32."""
    from pss_kernels.ops.rpb_attention import triton_bias_grad
    monkeypatch.setenv(triton_bias_grad.DBIAS_ENV_VAR, accumulator)
    q, k, v, table, index = make_inputs((4, 5), 1, 16, keep_rate=0.6, dtype=torch.float16, device=device)
    out = rpb_attention(q, k, v, table, index, grid_size=(4, 5), backend="triton")
    (dtable,) = torch.autograd.grad(out.float().sum(), table)
    expected = rpb_attention_reference(q, k, v, table, index, grid_size=(4, 5))
    (want,) = torch.autograd.grad(expected.float().sum(), table)
    torch.testing.assert_close(dtable, want, **TOLERANCES[torch.float16])


def test_csr_row_lists_list_every_pair_of_each_row_and_are_made_once_per_index(device):
    """index_row_lists against a Python loop over (b, i, j); one sort per index (the same index object
    or a view of it hits the cache), a new one after the index changes in place."""
    pytest.importorskip("triton")
    from pss_kernels.ops.rpb_attention import triton_bias_grad
    from pss_kernels.ops.rpb_attention.reference import relative_index
    _, _, _, table, index = make_inputs((3, 4), 1, 16, keep_rate=0.6, batch=3, device=device)
    pairs, row_starts = triton_bias_grad.index_row_lists(index, (3, 4), 1)
    batch, num_tokens = index.shape
    expected = {}
    for b in range(batch):
        for i in range(num_tokens):
            for j in range(num_tokens):
                row = int(relative_index(index[b, i], index[b, j], (3, 4), 1))
                expected.setdefault(row, []).append((b * num_tokens + i) * num_tokens + j)
    starts = row_starts.tolist()
    assert len(starts) == table.shape[0] + 1 and starts[0] == 0 and starts[-1] == batch * num_tokens ** 2
    for row in range(table.shape[0]):
        assert pairs[starts[row]:starts[row + 1]].tolist() == expected.get(row, []), row

    sorts = []
    real_sort = torch.sort
    try:
        torch.sort = lambda *a, **kw: sorts.append(1) or real_sort(*a, **kw)
        assert triton_bias_grad.index_row_lists(index, (3, 4), 1)[0] is pairs
        assert triton_bias_grad.index_row_lists(index[:], (3, 4), 1)[0] is pairs
        assert sorts == []
        index[0, 1], index[0, 2] = index[0, 2].item(), index[0, 1].item()  # in place: a new version
        fresh, _ = triton_bias_grad.index_row_lists(index, (3, 4), 1)
        assert sorts == [1] and not torch.equal(fresh, pairs)
    finally:
        torch.sort = real_sort


def test_bias_grad_accumulator_choice(monkeypatch):
    pytest.importorskip("triton")
    from pss_kernels.ops.rpb_attention import triton_bias_grad
    from pss_kernels.ops.rpb_attention.triton_bias_grad import DBIAS_ENV_VAR, choose_accumulator
    monkeypatch.delenv(DBIAS_ENV_VAR, raising=False)

    def choose(batch, heads, num_tokens, has_index=False, deterministic=False, blocks=4, num_positions=None):
        return tuple(choose_accumulator(batch, heads, num_tokens, has_index=has_index, deterministic=deterministic,
                                        num_positions=num_positions, query_blocks=blocks, key_blocks=blocks))

    # auto: image-sum at index=None; 528 programs / (12 heads x 16 tiles) -> 2 groups of 128 images
    assert choose(256, 12, 197) == ("image-sum", 128)
    assert choose(256, 12, 577, blocks=10) == ("image-sum", 256)      # 1200 tiles: one group
    assert choose(3, 12, 197, blocks=1) == ("image-sum", 1)           # never more groups than images
    # with an index: the full-position grid (N = 197: 1.8 MiB a copy), csr past 64 MiB, then slices
    assert choose(256, 12, 118, has_index=True, num_positions=197) == ("position-grid", 8)
    assert choose(256, 16, 300, has_index=True, num_positions=4097) == ("csr", 0)   # 1 GiB grid, 1.4 GiB csr
    assert choose(256, 16, 400, has_index=True, num_positions=4097) == ("slices", 0)  # 2.4 GiB csr
    assert choose(256, 16, 4097) == ("slices", 0)                     # a 1 GiB grid, 256 GiB of csr
    # deterministic: no atomics (image-sum with one group, csr), or the deterministic slices
    assert choose(256, 12, 197, deterministic=True) == ("image-sum", 256)
    assert choose(256, 12, 118, has_index=True, deterministic=True, num_positions=197) == ("csr", 0)
    assert choose(256, 16, 4097, deterministic=True) == ("slices", 0)
    monkeypatch.setenv(DBIAS_ENV_VAR, "position-grid")
    assert choose(256, 12, 197) == ("position-grid", 8)               # 1.8 MiB a copy
    assert choose(256, 12, 577) == ("position-grid", 4)               # 16 MiB a copy
    assert choose(3, 12, 197) == ("position-grid", 3)                 # never more copies than images
    assert choose(256, 16, 4097) == ("position-grid", 1)              # asked for: even at 1 GiB
    assert choose(256, 12, 197, deterministic=True) == ("image-sum", 256)
    monkeypatch.setenv(DBIAS_ENV_VAR, "image-sum")
    assert choose(256, 12, 118, has_index=True, num_positions=197) == ("position-grid", 8)  # needs index=None
    monkeypatch.setenv(DBIAS_ENV_VAR, "csr")
    assert choose(256, 12, 197) == ("csr", 0)
    monkeypatch.setenv(DBIAS_ENV_VAR, "slices")
    assert choose(256, 12, 197, deterministic=True) == ("slices", 0)
    assert choose(256, 12, 118, has_index=True, deterministic=True, num_positions=197) == ("slices", 0)
    # auto follows the GPU window's measurements where they cover the call
    monkeypatch.delenv(DBIAS_ENV_VAR)
    monkeypatch.setattr(triton_bias_grad, "MEASURED_AUTO", {True: ((80, "slices"), (200, "csr"))})
    assert choose(256, 12, 39, has_index=True, num_positions=197) == ("slices", 0)
    assert choose(256, 12, 118, has_index=True, num_positions=197) == ("csr", 0)
    assert choose(256, 12, 577, has_index=True, num_positions=577) == ("position-grid", 4)  # not covered
    assert choose(256, 12, 197) == ("image-sum", 128)
    monkeypatch.setenv(DBIAS_ENV_VAR, "atomics")
    with pytest.raises(ValueError, match="PSS_KERNELS_RPB_DBIAS must be one of"):
        choose(2, 2, 10)


@pytest.mark.parametrize("backend", OP_KERNEL_BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("keep_rate", [None, 0.8], ids=["index=None", "sampled"])
def test_frozen_bias_table_skips_its_gradient(backend, deterministic, keep_rate, monkeypatch, device):
    """A table without requires_grad: the backend is told (bias_grad=False), dq, dk, dv still match
    the reference, and no table gradient is produced."""
    from pss_kernels.ops.rpb_attention import torch_attention, triton_backward
    module = triton_backward if backend == "triton" else torch_attention
    bias_grad_flags = []
    real_backward = module.rpb_attention_backward
    monkeypatch.setattr(module, "rpb_attention_backward",
                        lambda *args: bias_grad_flags.append(args[-1]) or real_backward(*args))
    q, k, v, table, index = make_inputs((4, 5), 1, 16, keep_rate=keep_rate, device=device)
    table = table.detach()
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device)
    out = rpb_attention(q, k, v, table, index, grid_size=(4, 5), backend=backend, deterministic=deterministic)
    expected = rpb_attention_reference(q, k, v, table, index, grid_size=(4, 5))
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])
    out.backward(grad_out)
    for name, got, want in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad),
                               grads_of(expected, grad_out, (q, k, v))):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32], msg=lambda m: f"{name}: {m}")
    assert table.grad is None and bias_grad_flags == [False]


@pytest.mark.parametrize("keep_rate", [None, 0.8], ids=["index=None", "sampled"])
def test_sdpa_backend_with_a_frozen_table_gathers_without_autograd(keep_rate, device):
    """A table without requires_grad (or under no_grad): the bias is gathered outside autograd, so no
    scatter runs in backward; dq, dk, dv still match the reference."""
    from pss_kernels.ops.rpb_attention import sdpa_attention
    q, k, v, table, index = make_inputs((4, 5), 1, 16, keep_rate=keep_rate, device=device)
    table = table.detach()
    calls = []
    real_apply = sdpa_attention._GatheredBias.apply
    try:
        sdpa_attention._GatheredBias.apply = lambda *a: calls.append(1) or real_apply(*a)
        out = rpb_attention(q, k, v, table, index, grid_size=(4, 5), backend="sdpa")
    finally:
        sdpa_attention._GatheredBias.apply = real_apply
    expected = rpb_attention_reference(q, k, v, table, index, grid_size=(4, 5))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device)
    for name, got, want in zip(("dq", "dk", "dv"), grads_of(out, grad_out, (q, k, v)),
                               grads_of(expected, grad_out, (q, k, v))):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32], msg=lambda m: f"{name}: {m}")
    assert calls == [] and table.grad is None


@pytest.mark.parametrize("method", ["sorted", "bincount"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-image", "shared"])
def test_sdpa_table_scatter_sums_every_pair_by_row(method, shared, device):
    """The sdpa backend's table gradient: both scatters (PyTorch's sort-based index_put_, used on
    CUDA; one bincount per head, used on CPU) against a float64 loop, for rows per image and for one
    shared map with a per-image gradient (summed over the images)."""
    from pss_kernels.ops.rpb_attention.sdpa_attention import scatter_by_row
    generator = torch.Generator().manual_seed(5)
    rows = torch.randint(0, 7, (1 if shared else 3, 4, 4), generator=generator)
    grad_bias = torch.randn(3, 2, 4, 4, generator=generator)
    got = scatter_by_row(grad_bias.to(device), rows.to(device), 7, method=method)
    expected = torch.zeros(7, 2, dtype=torch.float64)
    for b in range(3):
        for i in range(4):
            for j in range(4):
                expected[rows[0 if shared else b, i, j]] += grad_bias[b, :, i, j].double()
    assert got.dtype == torch.float32 and got.shape == (7, 2)
    torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-6, atol=1e-6)


def test_sdpa_padded_rows_give_the_unpadded_bias(device):
    """On CUDA the sdpa backend gathers into rows padded to 16 columns (aligned for SDPA's kernel) and
    slices the padding off: the same bias, and the same attention, as unpadded rows."""
    from pss_kernels.ops.rpb_attention import sdpa_attention
    q, k, v, table, index = make_inputs((4, 5), 1, 16, keep_rate=0.8, device=device)
    num_tokens = q.shape[2]
    padded = sdpa_attention.table_rows(index, (4, 5), 1, num_tokens, q.device, pad=True)
    plain = sdpa_attention.table_rows(index, (4, 5), 1, num_tokens, q.device, pad=False)
    assert padded.shape[-1] == 32 and plain.shape[-1] == num_tokens == 17
    bias = sdpa_attention.gather_bias(table, padded, num_tokens, torch.float32)
    assert bias.stride(-1) == 1 and all(stride % 16 == 0 for stride in bias.stride()[:-1])
    torch.testing.assert_close(bias, sdpa_attention.gather_bias(table, plain, num_tokens, torch.float32), rtol=0,
                               atol=0)
    out = sdpa_attention.rpb_attention_sdpa(q, k, v, table, index, padded, (4, 5), 1, 0.25, False)
    expected = rpb_attention_reference(q, k, v, table, index, grid_size=(4, 5), scale=0.25)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device)
    for got, want in zip(grads_of(out, grad_out, (q, k, v, table)), grads_of(expected, grad_out, (q, k, v, table))):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", OP_KERNEL_BACKENDS)
@pytest.mark.parametrize("keep_rate", [None, 0.8], ids=["index=None", "sampled"])
def test_backward_op_without_bias_grad_returns_the_same_qkv_grads_and_zeros(backend, keep_rate, device):
    q, k, v, table, index = make_inputs((4, 5), 1, 16, keep_rate=keep_rate, device=device)
    q, k, v, table = (t.detach() for t in (q, k, v, table))
    out, lse, _ = torch.ops.pss_kernels.rpb_attention_fwd(q, k, v, table, index, [4, 5], 1, 0.25, backend, False,
                                                         False, True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(device)
    args = (grad_out, q, k, v, table, index, out, lse, [4, 5], 1, 0.25, backend, False)
    with_bias = torch.ops.pss_kernels.rpb_attention_bwd(*args, True)
    frozen = torch.ops.pss_kernels.rpb_attention_bwd(*args, False)
    for got, want in zip(frozen[:3], with_bias[:3]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert with_bias[3].abs().sum() > 0 and torch.equal(frozen[3], torch.zeros_like(table))


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_grad_out_int32_index_and_contiguous_inputs(backend, device):
    """out.sum() hands back a stride-0 gradient; index may be int32; q, k, v may be contiguous."""
    q, k, v, table, index = make_inputs((4, 5), 1, 16, keep_rate=0.8, qkv_view=False, device=device)
    out = rpb_attention(q, k, v, table, index.int(), grid_size=(4, 5), backend=backend)
    expected = rpb_attention_reference(q, k, v, table, index, grid_size=(4, 5))
    for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v, table)),
                         torch.autograd.grad(expected.sum(), (q, k, v, table))):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_table_with_half_activations(backend, dtype, device):
    """Autocast-style mixed inputs: half q, k, v and a float32 parameter table (gradient in float32)."""
    skip_interpreted_bf16(backend, dtype)
    q, k, v, table, index = make_inputs((3, 3), 1, 16, keep_rate=0.8, dtype=dtype, device=device)
    out = rpb_attention(q, k, v, table, index, grid_size=(3, 3), backend=backend)
    assert out.dtype == dtype
    (dtable,) = torch.autograd.grad(out.float().sum(), table)
    expected = rpb_attention_reference(q, k, v, table, index, grid_size=(3, 3))
    (want,) = torch.autograd.grad(expected.float().sum(), table)
    assert dtable.dtype == torch.float32
    torch.testing.assert_close(dtable, want, **TOLERANCES[dtype])  # entries up to ~3, errors ~1e-3 in fp16


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_backward_keeps_delta_in_float32(backend, device):
    """fp16, D = 128, grid (2, 2) with CLS (n = 5). Every row of v is (2048, 1, ..., 1) and dO = 1, so
    O is that row and dP_ij = dO_i . v_j = 2175 = delta_i = rowsum(dO * O): dS = P (dP - delta) = 0,
    and dq, dk and the table gradient are 0. 2175 is no fp16 number (it rounds to 2176): a delta
    summed or stored in half precision gives dS = -P and gradients of ~0.1. q and k fill disjoint
    halves of the head dim (q . k = 0 exactly) and the table is constant per head, so P is exactly
    uniform and O exact on every backend, while dq = dS k and dk = dS^T q still see dS."""
    batch, heads, head_dim, grid = 2, 2, 128, (2, 2)
    generator = torch.Generator().manual_seed(0)
    q = torch.zeros(batch, heads, 5, head_dim)
    k = torch.zeros(batch, heads, 5, head_dim)
    q[..., :64] = torch.randn(batch, heads, 5, 64, generator=generator)
    k[..., 64:] = torch.randn(batch, heads, 5, 64, generator=generator)
    v = torch.ones(batch, heads, 5, head_dim)
    v[..., 0] = 2048.0
    q, k, v = (t.to(device, torch.float16).requires_grad_() for t in (q, k, v))
    table = torch.tensor([[0.5, -0.25]]).repeat(bias_table_rows(grid), 1).to(device).requires_grad_()
    out = rpb_attention(q, k, v, table, grid_size=grid, backend=backend)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), v.detach().float(), rtol=1e-3, atol=0)  # exact where delta reads it
    dq, dk, dv, dtable = torch.autograd.grad(out, (q, k, v, table), torch.ones_like(out))
    for name, grad in (("dq", dq), ("dk", dk), ("dbias_table", dtable)):
        torch.testing.assert_close(grad.float(), torch.zeros_like(grad, dtype=torch.float32), rtol=0, atol=1e-3,
                                   msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(dv.float(), torch.ones_like(dv, dtype=torch.float32), rtol=0, atol=1e-3)  # P^T dO


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("keep_rate", [None, 0.8], ids=["index=None", "sampled"])
def test_triton_takes_head_dim_128(dtype, keep_rate, device):
    """D = 128 is the largest head dim of the triton backend (TRITON_MAX_HEAD_DIM, inclusive): its
    tiles run forward and backward and match the reference."""
    check_against_reference("triton", device, (2, 3), 1, 128, keep_rate, dtype=dtype)


def test_float64_with_backend_none_runs_on_the_resolved_backend(monkeypatch):
    """float64 is refused by the triton backend only: backend=None on CPU (the sdpa default) and the
    variable naming torch or sdpa take it, checked against the resolved backend, not the argument."""
    from pss_kernels._backends import ENV_VAR
    q, k, v, table, index = make_inputs((2, 3), 1, 8, keep_rate=0.7, dtype=torch.float64, device="cpu")
    table = table.detach().double().requires_grad_()
    expected = rpb_attention_reference(q, k, v, table, index, grid_size=(2, 3))
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v, table))
    for requested in (None, "torch", "sdpa"):
        if requested is None:
            monkeypatch.delenv(ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(ENV_VAR, requested)
        out = rpb_attention(q, k, v, table, index, grid_size=(2, 3))
        assert out.dtype == torch.float64, requested
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v, table)), expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.triton
def test_triton_limits_apply_when_the_variable_resolves_to_it(monkeypatch, device):
    """PSS_KERNELS_BACKEND=triton with backend=None: the triton backend's own limits hold (D <= 128,
    no float64), as with backend="triton"."""
    from pss_kernels._backends import ENV_VAR
    monkeypatch.setenv(ENV_VAR, "triton")
    table = torch.zeros(bias_table_rows((3, 3)), 2, device=device)
    wide = torch.zeros(2, 2, 10, 160, device=device)
    with pytest.raises(ValueError, match="head dim D <= 128 on the triton backend, got D=160"):
        rpb_attention(wide, wide, wide, table, grid_size=(3, 3))
    narrow = torch.zeros(2, 2, 10, 8, device=device, dtype=torch.float64)
    with pytest.raises(TypeError, match="q must have dtype in"):
        rpb_attention(narrow, narrow, narrow, table.double(), grid_size=(3, 3))
    with pytest.raises(TypeError, match="q must have dtype in"):
        rpb_attention(narrow, narrow, narrow, table.double(), grid_size=(3, 3), backend="triton")


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_repeated_positions_with_deterministic_are_refused_by_triton_only(backend, device):
    """Only the triton backend's deterministic accumulation needs distinct positions; the others take
    an index that repeats one (e.g. a caller's own duplicated token) and give the reference's values."""
    q, k, v, table, index = make_inputs((3, 3), 1, 16, keep_rate=0.6, device=device)
    repeated = index.clone()
    repeated[:, 2] = repeated[:, 1]
    out = rpb_attention(q, k, v, table, repeated, grid_size=(3, 3), backend=backend, deterministic=True)
    expected = rpb_attention_reference(q, k, v, table, repeated, grid_size=(3, 3))
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device)
    for got, want in zip(grads_of(out, grad_out, (q, k, v, table)), grads_of(expected, grad_out, (q, k, v, table))):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_output_layout_makes_the_head_merge_a_view(device):
    q, k, v, table, _ = make_inputs((3, 3), 1, 16, device=device)
    out = rpb_attention(q, k, v, table, grid_size=(3, 3), backend="torch")
    merged = out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None


# ----------------------------------------------------------------------------- errors

def _good_arguments(device="cpu"):
    q, k, v, table, index = make_inputs((3, 3), 1, 16, keep_rate=0.6, device=device)
    return dict(q=q.detach(), k=k.detach(), v=v.detach(), bias_table=table.detach(), index=index,
                grid_size=(3, 3), num_prefix_tokens=1, backend="torch")


def _call(**arguments):
    q, k, v, table, index = (arguments.pop(name) for name in ("q", "k", "v", "bias_table", "index"))
    return rpb_attention(q, k, v, table, index, **arguments)


BAD_ARGUMENTS = [
    ("q", lambda a: dict(q=a["q"].tolist()), TypeError, "q must be a torch.Tensor"),
    ("q", lambda a: dict(q=a["q"][0]), ValueError, "q must have 4 dimensions"),
    ("q", lambda a: dict(q=a["q"].long()), TypeError, "q must have dtype"),
    ("q", lambda a: dict(q=a["q"][:, :, :0], k=a["k"][:, :, :0], v=a["v"][:, :, :0], index=a["index"][:, :0]),
     ValueError, "q must have B, H, n, D >= 1"),
    ("q", lambda a: dict(q=a["q"].transpose(1, 2), k=a["k"].transpose(1, 2), v=a["v"].transpose(1, 2)), ValueError,
     r"q must be \(B, H, n, D\).* needs \.transpose\(1, 2\)"),  # (B, n, H, D): blamed on q, not the table
    ("k", lambda a: dict(k=a["k"][..., :8]), ValueError, "k must have q's shape"),
    ("v", lambda a: dict(v=a["v"].double()), TypeError, "v must have q's dtype"),
    ("bias_table", lambda a: dict(bias_table=a["bias_table"][:-1]), ValueError, r"bias_table must have shape \(R, H\)"),
    ("bias_table", lambda a: dict(bias_table=a["bias_table"][:, :1]), ValueError, r"bias_table must have shape"),
    ("bias_table", lambda a: dict(bias_table=a["bias_table"].to("meta")), ValueError, "one device"),
    ("index", lambda a: dict(index=a["index"].float()), TypeError, "index must have dtype"),
    ("index", lambda a: dict(index=a["index"].short()), TypeError, "index must have dtype"),
    ("index", lambda a: dict(index=a["index"][:1]), ValueError, r"index must have shape \(B, n\)"),
    ("index", lambda a: dict(index=None), ValueError, "index=None means all N"),
    ("index", lambda a: dict(index=a["index"].clone().fill_(10)), ValueError, r"index values must be in \[0, 10\)"),
    ("index", lambda a: dict(index=a["index"] - 1), ValueError, "index values must be in"),
    ("grid_size", lambda a: dict(grid_size=9), TypeError, "grid_size must be a pair of ints"),
    ("grid_size", lambda a: dict(grid_size=(3, 0)), ValueError, "grid_size must be positive"),
    ("num_prefix_tokens", lambda a: dict(num_prefix_tokens=2), ValueError, "num_prefix_tokens must be <= 1"),
    ("scale", lambda a: dict(scale="0.25"), TypeError, "scale must be a float"),
    ("scale", lambda a: dict(scale=True), TypeError, "scale must be a float"),  # a bool is no scale
    ("backend", lambda a: dict(backend="cuda"), ValueError, "backend must be one of"),
    ("backend", lambda a: dict(backend="fast"), ValueError, "backend must be one of"),
    ("deterministic", lambda a: dict(deterministic=1), TypeError, "deterministic must be a bool"),
    ("check_index", lambda a: dict(check_index=None), TypeError, "check_index must be a bool"),
    ("return_cls_attention", lambda a: dict(return_cls_attention=True, num_prefix_tokens=0,
                                            bias_table=a["bias_table"][:-3], index=a["index"] - 1),
     ValueError, "return_cls_attention needs a prefix"),
]


@pytest.mark.parametrize("name, change, error, message", BAD_ARGUMENTS,
                         ids=[f"{case[0]}-{i}" for i, case in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_raise_naming_the_argument(name, change, error, message):
    arguments = _good_arguments()
    arguments.update(change(arguments))
    with pytest.raises(error, match=message):
        _call(**arguments)


@pytest.mark.triton
def test_triton_specific_errors(device):
    arguments = dict(_good_arguments(device), backend="triton")
    q = arguments["q"]
    wide = q.new_zeros(*q.shape[:3], 160)
    with pytest.raises(ValueError, match="head dim D <= 128"):
        _call(**dict(arguments, q=wide, k=wide, v=wide))
    with pytest.raises(ValueError, match="index values must be in"):
        _call(**dict(arguments, index=arguments["index"] + 5))
    repeated = arguments["index"].clone()
    repeated[:, 2] = repeated[:, 1]
    with pytest.raises(ValueError, match="must not repeat a position"):
        _call(**dict(arguments, index=repeated, deterministic=True))


@pytest.mark.triton
def test_unchecked_bad_index_never_reads_out_of_bounds_on_triton(device):
    """check_index=False: the kernels clamp positions to [0, N) (triton_common.token_positions), so
    a bad index gives the reference's values at the clamped index, and every read/write is in bounds."""
    arguments = dict(_good_arguments(device), backend="triton", check_index=False)
    bad = arguments["index"] * 1000  # far above N = 10
    bad[:, 1] = -7  # and below 0
    leaves = [arguments[name].requires_grad_() for name in ("q", "k", "v", "bias_table")]
    out = _call(**dict(arguments, index=bad))
    expected = rpb_attention_reference(*leaves, bad.clamp(0, 9), grid_size=(3, 3))
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
    for got, want in zip(grads_of(out, grad_out, leaves), grads_of(expected, grad_out, leaves)):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


# ----------------------------------------------------------------------------- registration

def test_opcheck_table_rows(device):
    """The sdpa backend's one registered op: its rows and fake agree, with and without padding."""
    _, _, _, _, index = make_inputs((3, 3), 1, 16, keep_rate=0.6, device=device)
    for pad in (False, True):
        torch.library.opcheck(torch.ops.pss_kernels.rpb_table_rows.default, (index, [3, 3], 1, pad, True))


@pytest.mark.parametrize("backend", OP_KERNEL_BACKENDS)
@pytest.mark.parametrize("keep_rate, with_cls", [(None, False), (0.6, True)])
def test_opcheck(backend, keep_rate, with_cls, device):
    if backend == "triton" and keep_rate is None:
        pytest.skip("one interpreter case is enough (slow)")
    q, k, v, table, index = make_inputs((3, 3), 1, 16, keep_rate=keep_rate, device=device)
    forward_args = (q, k, v, table, index, [3, 3], 1, 0.25, backend, False, with_cls, True)
    torch.library.opcheck(torch.ops.pss_kernels.rpb_attention_fwd.default, forward_args)
    out, lse, _ = torch.ops.pss_kernels.rpb_attention_fwd(*forward_args)
    backward_args = (torch.randn_like(q), q.detach(), k.detach(), v.detach(), table.detach(), index, out.detach(),
                     lse, [3, 3], 1, 0.25, backend, False)
    for bias_grad in (True, False):
        torch.library.opcheck(torch.ops.pss_kernels.rpb_attention_bwd.default, (*backward_args, bias_grad))


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
@pytest.mark.parametrize("keep_rate", [None, 0.6])
def test_torch_compile_fullgraph(backend, keep_rate, device):
    q, k, v, table, index = make_inputs((3, 3), 1, 16, keep_rate=keep_rate, device=device)

    def attention(q, k, v, table, index):
        out, cls_attention = rpb_attention(q, k, v, table, index, grid_size=(3, 3), backend=backend,
                                           return_cls_attention=True)
        return out.square().sum() + cls_attention.sum()

    compiled = torch.compile(attention, fullgraph=True, backend="aot_eager")
    loss, eager_loss = compiled(q, k, v, table, index), attention(q, k, v, table, index)
    torch.testing.assert_close(loss, eager_loss)
    for got, want in zip(torch.autograd.grad(loss, (q, k, v, table)),
                         torch.autograd.grad(eager_loss, (q, k, v, table))):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- RelPosAttention

def _hand_built_attention(module, x, index):
    """The module's math spelled out: BEiT qkv bias, per-image float64 loop attention, projection."""
    batch, num_tokens, dim = x.shape
    heads = module.num_heads
    qkv_bias = torch.cat((module.q_bias, torch.zeros_like(module.q_bias), module.v_bias))
    qkv = (x @ module.qkv.weight.t() + qkv_bias).reshape(batch, num_tokens, 3, heads, dim // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    out = loop_attention_float64(q, k, v, module.relative_position_bias_table, index, module.grid_size,
                                 module.num_prefix_tokens, (dim // heads) ** -0.5).float().to(x.device)
    return out.transpose(1, 2).reshape(batch, num_tokens, dim) @ module.proj.weight.t() + module.proj.bias


def test_rel_pos_attention_has_timm_beit_layout_and_loads_beit_checkpoints():
    module = RelPosAttention(32, 4, (3, 3))
    assert set(module.state_dict()) == {"qkv.weight", "q_bias", "v_bias", "relative_position_bias_table",
                                        "proj.weight", "proj.bias"}
    assert module.relative_position_bias_table.shape == (bias_table_rows((3, 3), 1), 4) == (28, 4)
    assert torch.equal(module.relative_position_bias_table, torch.zeros(28, 4))
    checkpoint = {name: torch.randn_like(t) for name, t in module.state_dict().items()}
    checkpoint["relative_position_index"] = timm_relative_position_index((3, 3), 1)  # original BEiT keeps it
    module.load_state_dict(checkpoint, strict=True)
    assert torch.equal(module.relative_position_bias_table, checkpoint["relative_position_bias_table"])
    no_bias = RelPosAttention(32, 4, (3, 3), num_prefix_tokens=0, qkv_bias=False)
    assert set(no_bias.state_dict()) == {"qkv.weight", "relative_position_bias_table", "proj.weight", "proj.bias"}
    assert no_bias.relative_position_bias_table.shape == (25, 4)


@pytest.mark.parametrize("keep_rate", [None, 0.6])
@pytest.mark.parametrize("impl", ["pss", "published", "eager-index", "sdpa-bias"])
def test_rel_pos_attention_matches_hand_built_reference(keep_rate, impl, device):
    torch.manual_seed(0)
    module = RelPosAttention(32, 4, (3, 3), impl=impl, backend="torch").to(device)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_()
    num_positions = 10
    index = None
    if keep_rate is not None:
        _, index = sample_patches(torch.randn(2, num_positions, 4, device=device), keep_rate)
    x = torch.randn(2, index.shape[1] if index is not None else num_positions, 32, device=device)
    torch.testing.assert_close(module(x, index), _hand_built_attention(module, x, index), rtol=1e-4, atol=1e-4)


def test_rel_pos_attention_rejects_bad_configuration():
    with pytest.raises(ValueError, match="impl must be one of"):
        RelPosAttention(32, 4, (3, 3), impl="fused")
    with pytest.raises(ValueError, match="dim must be divisible by num_heads"):
        RelPosAttention(30, 4, (3, 3))
    with pytest.raises(ValueError, match="attn_drop must be 0.0"):
        RelPosAttention(32, 4, (3, 3), attn_drop=0.1)
    with pytest.raises(TypeError, match=r"grid_size must be a pair of ints \(Gh, Gw\), got \(3,\)"):
        RelPosAttention(32, 4, (3,))
    with pytest.raises(ValueError, match=r"grid_size must be positive, got \(0, 3\)"):
        RelPosAttention(32, 4, (0, 3))
    with pytest.raises(ValueError, match="backend must be one of .* got 'cuda'"):
        RelPosAttention(32, 4, (3, 3), backend="cuda")  # rpb_attention has no CUDA C++ kernel
    module = RelPosAttention(32, 4, (3, 3))
    with pytest.raises(ValueError, match=r"x must have dim=32 channels \(B, n, dim\), got shape \(2, 10, 31\)"):
        module(torch.zeros(2, 10, 31))
    with pytest.raises(ValueError, match=r"x must have 3 dimensions, got shape \(10, 32\)"):
        module(torch.zeros(10, 32))


# ----------------------------------------------------------------------------- peers

PEERS = {"published": peers.published_rpb_attention, "eager-index": peers.eager_index_rpb_attention,
         "sdpa-bias": peers.sdpa_bias_rpb_attention, "flex": peers.flex_rpb_attention}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("keep_rate", [None, 0.8])
def test_peer_matches_reference(peer, keep_rate, device):
    q, k, v, table, index = make_inputs((4, 5), 1, 16, keep_rate=keep_rate, device=device)
    expected = rpb_attention_reference(q, k, v, table, index, grid_size=(4, 5))
    try:
        out = PEERS[peer](q, k, v, table, index, grid_size=(4, 5))
    except RuntimeError as err:
        assert peer == "flex" and "flex_attention is unavailable" in str(err)
        # without gradients FlexAttention runs everywhere it exists
        out = PEERS[peer](*(t.detach() for t in (q, k, v, table)), index, grid_size=(4, 5))
        torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])
        pytest.skip(f"flex backward unavailable here: {err}")
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])
    grad_out = torch.randn_like(out)
    for got, want in zip(grads_of(out, grad_out, (q, k, v, table)), grads_of(expected, grad_out, (q, k, v, table))):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


# ----------------------------------------------------------------------------- benchmark harness

def test_benchmark_harness_runs_tiny_configs_on_cpu():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_rpb_attention

    rows = bench_rpb_attention.run("cpu", torch.float32, warmup=0, iters=1)
    configs = bench_rpb_attention.default_configs("cpu")
    assert len(rows) == 2 * sum(len(bench_rpb_attention.impls_for(c, bench_rpb_attention.IMPLS)) for c in configs)
    assert {r["keep_rate"] for r in rows if r["impl"] == "pss-dbias-image-sum"} == {1.0}  # index=None only
    assert {r["keep_rate"] for r in rows if r["impl"] == "pss-dbias-csr"} == {1.0, 0.5}
    by_key = {(r["keep_rate"], r["impl"], r["pass"]): r for r in rows}
    for keep_rate in (0.5, 1.0):
        for impl in ("pss", "pss-sdpa", "published", "eager-index"):
            for pass_name in ("forward", "forward+backward"):
                row = by_key[keep_rate, impl, pass_name]
                assert row["error"] is None and row["ms"] > 0, row
    for impl in bench_rpb_attention.DBIAS_IMPLS:  # every accumulator runs at keep rate 1
        assert by_key[1.0, impl, "forward+backward"]["error"] is None, impl
    assert by_key[0.5, "pss", "forward"]["num_tokens"] == 5 and by_key[1.0, "pss", "forward"]["num_tokens"] == 10
    assert all((r["ms"] is None) == (r["error"] is not None) for r in rows)
    assert by_key[0.5, "eager-index", "forward"]["speedup_vs_eager_index"] == 1.0
    assert by_key[0.5, "published", "forward"]["speedup_vs_published"] == 1.0


# ----------------------------------------------------------------------------- GPU code generation

@pytest.fixture(scope="module")
def codegen():
    """Every kernel variant the launchers make at ViT shapes (B = 256, H = 12, 14 x 14 grid; n = 39, 79,
    118, 197; D = 32, 64, 128; every bias-gradient accumulator), compiled for sm_90 and sm_80 as the
    JIT compiles them: registers, spills, layouts, grids (tests/codegen_report.py). The interpreter
    skips all of this."""
    if HAS_CUDA:
        pytest.skip("the GPU tests run the kernels themselves")
    pytest.importorskip("triton.backends.nvidia")
    from jit_codegen import run_codegen_report
    return run_codegen_report("rpb_attention")


def _training_path(report):
    """The fp16/bf16 entries for sm_90 (H100/H200): what mixed-precision training runs."""
    return [e for e in report if e["arch"] == 90 and e["dtype"] != "fp32" and "former" not in e["variant"]]


def test_codegen_covers_every_kernel_and_variant(codegen):
    variants = {e["variant"] for e in codegen}
    for variant in ("forward", "forward+cls", "backward", "backward frozen table", "backward deterministic",
                    "backward deterministic slices", "backward slices", "backward position-grid", "backward csr"):
        assert variant in variants, variant
    names = {e["kernel"] for e in codegen}
    assert names == {"_rpb_attention_fwd_kernel", "_cls_row_kernel", "_delta_kernel", "_dkdv_kernel", "_dq_kernel",
                     "_image_sum_kernel", "_sum_grid_by_row_kernel", "_sum_pairs_by_row_kernel"}
    assert {e["arch"] for e in codegen} == {80, 90} and {e["dtype"] for e in codegen} == {"bf16", "fp16", "fp32"}
    assert {e["head_dim"] for e in _training_path(codegen)} == {32, 64, 128}
    dense = [e for e in codegen if e["op"] == "rpb_attention"]
    dbias_modes = {(e["has_index"], e["meta"]["DBIAS"]) for e in dense if e["kernel"] == "_dkdv_kernel"}
    assert dbias_modes == {(has_index, mode) for has_index in (False, True)
                           for mode in ("none", "slices", "position-grid", "csr")}
    # The packed launches (ops/varlen): the same kernels with VARLEN, every accumulator.
    packed = [e for e in codegen if e["op"] == "rpb_attention_varlen"]
    assert all(e["meta"]["VARLEN"] for e in packed if "VARLEN" in e["meta"]) and packed
    assert not any(e["meta"].get("VARLEN") for e in dense)
    assert {e["variant"] for e in packed} == {"packed forward", "packed forward+cls", "packed backward",
                                              "packed backward frozen table", "packed backward deterministic",
                                              "packed backward deterministic slices", "packed backward slices"}
    assert {e["meta"]["DBIAS"] for e in packed if e["kernel"] == "_dkdv_kernel"} == {
        "none", "slices", "position-grid", "csr"}
    assert {e["head_dim"] for e in _training_path(packed)} == {32, 64, 128}


# Registers and spills are ptxas's choice, and its releases differ on these kernels. The tiles were chosen
# on ptxas 12.8 (Triton 3.6, the GPU machines') and hold on 13.4 (Triton 3.9). ptxas 12.9 (Triton 3.8's, with
# torch 2.14) assembles the very PTX that 13.4 fits in 88 registers with no stack (the fp32 dq tile) into
# 80 registers and 8 bytes of stack, and caps the short bf16 dkdv tiles at 168 registers with 16-32 bytes:
# a few spilled words, not the cliff these tests guard against (a tile too large spills hundreds of bytes),
# so under 12.9 the bound is 32 bytes. Any other release is held to the strict checks.
SPILL_BOUND_BY_PTXAS = {"12.9": 32}


def _spill_bound(entry) -> int:
    """Stack bytes an entry may keep whatever its kernel (0 but for the ptxas releases above)."""
    return SPILL_BOUND_BY_PTXAS.get(entry["ptxas"], 0)


def test_codegen_names_the_ptxas_that_chose_the_registers(codegen):
    """Every entry records the ptxas release that assembled it (the spill checks depend on it), one per arch."""
    assert all(e["ptxas"] != "unknown" for e in codegen)
    for arch in (80, 90):
        assert len({e["ptxas"] for e in codegen if e["arch"] == arch}) == 1


def test_sm90_training_kernels_do_not_spill(codegen):
    """No stack anywhere, but at D = 128 and n <= 64 in dkdv with the slices accumulator: no short tile
    compiles without stack with every accumulator there, and that one keeps 8 bytes (triton_common).
    Packed, the same tile keeps 32 bytes with the position grid on Triton 3.9, none on Triton 3.6 (the
    GPU machines'), where the (32, 16, 2) clean on 3.9 keeps 8-80: the tile stays."""
    short_dkdv_128 = [e for e in _training_path(codegen) if e["stack_bytes"] and e["head_dim"] == 128
                      and e["num_tokens"] <= 64 and e["kernel"] == "_dkdv_kernel"]
    allowed = [e for e in short_dkdv_128 if e["meta"]["DBIAS"] == "slices" and e["stack_bytes"] <= 8]
    allowed += [e for e in short_dkdv_128 if e["op"] == "rpb_attention_varlen" and e["stack_bytes"] <= 32
                and e["meta"]["DBIAS"] == "position-grid" and _triton_version() >= (3, 7)]
    spilling = [e for e in _training_path(codegen) if e["stack_bytes"] > _spill_bound(e) and e not in allowed]
    assert not spilling, spilling
    assert all(e["registers"] <= 255 for e in codegen)


def test_sm90_float32_kernels_do_not_spill(codegen):
    """The float32 tiles (FMA dots, dkdv unpipelined) keep nothing on the stack at D = 64 and 128, but
    dkdv at D = 128 with the position grid at index=None (not auto's choice there): <= 8 bytes on
    Triton 3.6 (triton_common._TILES_FLOAT32)."""
    float32 = [e for e in codegen if e["arch"] == 90 and e["dtype"] == "fp32"]
    assert {e["head_dim"] for e in float32} == {64, 128}
    allowed = [e for e in float32 if e["kernel"] == "_dkdv_kernel" and e["head_dim"] == 128 and not e["has_index"]
               and e["meta"]["DBIAS"] == "position-grid" and e["stack_bytes"] <= 8]
    spilling = [e for e in float32 if e["stack_bytes"] > _spill_bound(e) and e not in allowed]
    assert not spilling, spilling


def test_sm90_tensor_core_dots_do_not_repeat_work(codegen):
    """For every tile the launchers pick at D = 32, 64 and 128 (fp16/bf16, sm_90), no dot whose warps
    cover more rows or columns than it has. The former tiles show that the check sees the defect:
    the forward's (64, 64, 8) at D = 64 (warpsPerCTA = [8, 1] on 64 rows) and (32, 32, 4) at D = 32."""
    repeating = [e for e in _training_path(codegen) if e["replicated_dots"]]
    assert not repeating, repeating
    former = [e for e in codegen if "former" in e["variant"]]
    assert {e["head_dim"] for e in former} == {32, 64} and all(e["replicated_dots"] for e in former), former


def test_grids_are_flat_with_the_blocks_of_one_head_together(codegen):
    """1-D grids of B*H*blocks programs (split_program_id: program // blocks = b*H + h), deterministic
    dkdv one program per (b, h), image-sum one group of images when deterministic."""
    for e in codegen:
        assert len(e["grid"]) == 1, e
        bh = e["batch"] * e["heads"]
        if e["op"] == "rpb_attention_varlen":
            _check_packed_grid(e)
            continue
        if e["kernel"] == "_cls_row_kernel":
            assert e["grid"] == [bh], e
        elif e["kernel"] in ("_rpb_attention_fwd_kernel", "_dq_kernel", "_delta_kernel"):
            assert e["grid"] == [bh * -(-e["num_tokens"] // e["tiles"]["BLOCK_M"])], e
        elif e["kernel"] == "_dkdv_kernel":
            deterministic_slices = e["meta"]["DETERMINISTIC"]
            assert deterministic_slices == (e["variant"] == "backward deterministic slices")
            blocks = 1 if deterministic_slices else -(-e["num_tokens"] // e["tiles"]["BLOCK_N"])
            assert e["grid"] == [bh * blocks], e
            if e["variant"] == "backward deterministic":  # atomic-free: image-sum at index=None, else csr
                assert e["meta"]["DBIAS"] == ("csr" if e["has_index"] else "none"), e
        elif e["kernel"] == "_image_sum_kernel":
            blocks_m, blocks_n = (-(-e["num_tokens"] // e["tiles"][name]) for name in ("BLOCK_M", "BLOCK_N"))
            tiles = e["heads"] * blocks_m * blocks_n
            groups, remainder = divmod(e["grid"][0], tiles)
            assert remainder == 0 and e["meta"]["ATOMIC"] == (groups > 1), e
            if e["variant"] == "backward deterministic":
                assert groups == 1, e


def _check_packed_grid(e):
    """Packed: H programs per work entry, ceil(T / block) + B entries (packed_work_table), block BLOCK_M for
    the query kernels, BLOCK_N for dkdv, N (one entry per image) for the deterministic slices; the CLS
    rows one program per (image, head)."""
    heads, images, total = e["heads"], e["batch"], e["total_tokens"]
    if e["kernel"] == "_cls_row_kernel":
        assert e["grid"] == [images * heads], e
    elif e["kernel"] in ("_rpb_attention_fwd_kernel", "_dq_kernel", "_delta_kernel"):
        assert e["grid"] == [heads * (-(-total // e["tiles"]["BLOCK_M"]) + images)], e
    elif e["kernel"] == "_dkdv_kernel":
        block = 197 if e["meta"]["DETERMINISTIC"] else e["tiles"]["BLOCK_N"]
        assert e["meta"]["DETERMINISTIC"] == (e["variant"] == "packed backward deterministic slices"), e
        assert e["grid"] == [heads * (-(-total // block) + images)], e


def _triton_version():
    import triton
    return tuple(int(part) for part in triton.__version__.split(".")[:2])


def test_bias_is_gathered_from_a_head_major_table(codegen):
    """The table comes as an (H, R) copy: its row stride is 1, which the JIT folds into the code."""
    for e in codegen:
        if e["kernel"] in ("_rpb_attention_fwd_kernel", "_cls_row_kernel", "_dkdv_kernel", "_dq_kernel",
                           "_image_sum_kernel"):
            assert "stride_table_row" in e["folded_args"], e


def test_activation_row_offsets_are_int64(codegen):
    """Row index * row stride in 64 bits: a sequence-major (n, B, H, D) layout passes 2^31 elements."""
    narrow = [e for e in codegen if e["dtype"] != "fp32" and e["int32_row_offsets"]]
    assert not narrow, narrow


def test_cls_attention_drives_in_network_pruning():
    # EViT / Tri-Level E-ViT: keep the patches the CLS token attends to most. cls_attention
    # covers every kept token, the CLS token itself at column 0, so scores are columns 1:.
    torch.manual_seed(0)
    grid, heads, dim = (4, 5), 2, 16
    x = torch.randn(2, 1 + grid[0] * grid[1], heads * dim)
    tokens, index = sample_patches(x, 0.6)
    q, k, v = (torch.randn(2, heads, tokens.shape[1], dim) for _ in range(3))
    table = torch.randn(bias_table_rows(grid), heads)
    _, cls_attention = rpb_attention(q, k, v, table, index, grid_size=grid, backend="torch",
                                     return_cls_attention=True)
    kept, inner = sample_patches(tokens, 0.5, scorer="given", scores=cls_attention[:, 1:])
    positions = index.gather(1, inner)  # positions in the full sequence, for the next layers' bias

    logits = torch.matmul(q, k.transpose(-1, -2)) * dim ** -0.5
    rows = timm_relative_position_index(grid, 1)
    logits = logits + table[rows[index[:, :, None], index[:, None, :]]].permute(0, 3, 1, 2)
    expected_scores = logits.softmax(-1)[:, :, 0, 1:].mean(1)
    num_patches = inner.shape[1] - 1
    expected_inner = expected_scores.argsort(dim=1, descending=True, stable=True)[:, :num_patches] + 1
    assert torch.equal(inner[:, 1:], expected_inner)
    assert torch.equal(kept, tokens.gather(1, inner[..., None].expand(-1, -1, tokens.shape[2])))
    assert torch.equal(positions[:, 0], torch.zeros(2, dtype=torch.long))
    for kept_positions, earlier in zip(positions.tolist(), index.tolist()):
        assert len(set(kept_positions)) == len(kept_positions) and set(kept_positions) <= set(earlier)



def test_constant_index_caches_are_read_but_not_filled_during_graph_capture(monkeypatch):
    """The relative index and the table rows' pair lists depend only on the grid, prefix and device: a
    CUDA-graph capture reuses what eager calls built (its replays then time the kernels, not rebuilds)
    and adds nothing (a tensor made while capturing holds values only once the graph replays)."""
    from pss_kernels.ops.rpb_attention import reference, triton_bias_grad
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    index, lists = object(), (object(), object())
    monkeypatch.setitem(reference._FULL_RELATIVE_INDEX, ((3, 3), 1, cuda), index)
    monkeypatch.setitem(triton_bias_grad._FULL_ROW_LISTS, ((3, 3), 1, cuda), lists)
    assert reference.full_relative_index((3, 3), 1, cuda) is index
    assert triton_bias_grad.shared_row_lists((3, 3), 1, cuda) is lists
    # Off CUDA nothing is captured: the lists are built once and cached.
    cpu = torch.device("cpu")
    monkeypatch.delitem(triton_bias_grad._FULL_ROW_LISTS, ((2, 2), 0, cpu), raising=False)
    first = triton_bias_grad.shared_row_lists((2, 2), 0, cpu)
    assert triton_bias_grad.shared_row_lists((2, 2), 0, cpu) is first and first[1][-1].item() == 16
