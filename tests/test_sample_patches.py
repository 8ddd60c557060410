"""sample_patches: reference vs float64 oracle, every backend vs reference, the custom op.
Inputs and the backend check live in sampling_cases.py; GPU-only checks in test_sample_patches_gpu.py."""
import math

import numpy as np
import pytest
import torch
from torch.library import opcheck

from pss_kernels import PatchSampler, num_kept_tokens, sample_patches
from pss_kernels._backends import cuda_extension
from pss_kernels.ops.sample_patches.peers import eager_sample_patches, topk_gather_sample_patches
from pss_kernels.ops.sample_patches.reference import sample_patches_reference, select_indices
from sampling_cases import DTYPES, KERNEL_BACKENDS, SPECIAL, check_backend, given_scores, quantized, scatter_grad
needs_cuda_extension = pytest.mark.skipif(cuda_extension() is None, reason="pss_kernels._C is not built")


# ---------------------------------------------------------------------------------------------
# Oracles independent of the package: float64 numpy scores, lexsort for the tie-break.
# ---------------------------------------------------------------------------------------------
def float64_oracle(x, keep_rate, scorer, num_prefix_tokens, order, scores=None):
    x64 = x.detach().cpu().double().numpy()
    batch, num_tokens, _ = x64.shape
    k = max(num_prefix_tokens + 1, round(keep_rate * num_tokens))
    patches = x64[:, num_prefix_tokens:]
    if scorer == "l1":
        s = np.abs(patches).sum(-1)
    elif scorer == "l2":
        s = (patches ** 2).sum(-1)
    else:
        s = scores.detach().cpu().double().numpy()
    positions = np.arange(s.shape[1])
    index = np.empty((batch, k), dtype=np.int64)
    index[:, :num_prefix_tokens] = np.arange(num_prefix_tokens)
    for b in range(batch):
        ranked = np.lexsort((positions, -s[b]))[:k - num_prefix_tokens]  # last key is primary
        if order == "spatial":
            ranked = np.sort(ranked)
        index[b, num_prefix_tokens:] = ranked + num_prefix_tokens
    x_kept = np.take_along_axis(x64, index[..., None], axis=1)
    return x_kept, index


def topk_key_model(scores: np.ndarray) -> np.ndarray:
    """Python model of the kernels' sort key (csrc/sampling/patch_topk.cuh, triton_sample.py)."""
    bits = scores.astype(np.float32).view(np.int32).astype(np.int64)
    bits = np.where(bits == -2 ** 31, 0, bits)  # -0.0 -> +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    ordered = np.where((bits & 0x7FFFFFFF) > 0x7F800000, 2 ** 31 - 1, ordered)  # NaN first
    positions = np.arange(scores.shape[-1], dtype=np.int64)
    return ordered * 2 ** 32 + (2 ** 32 - 1 - positions)  # exact in Python ints via int64 range


# ---------------------------------------------------------------------------------------------
# Reference and kept counts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scorer", ["l1", "l2", "given"])
@pytest.mark.parametrize("order", ["score", "spatial"])
@pytest.mark.parametrize("num_prefix_tokens", [0, 1, 4])
@pytest.mark.parametrize("data", ["quantized", "normal"])
def test_reference_matches_float64_oracle(scorer, order, num_prefix_tokens, data):
    shape = (3, 23, 40)
    x = quantized(shape) if data == "quantized" else torch.randn(shape, generator=torch.Generator().manual_seed(3))
    scores = given_scores(3, 23 - num_prefix_tokens) if scorer == "given" else None
    x_kept, index = sample_patches_reference(x, 0.6, scorer=scorer, num_prefix_tokens=num_prefix_tokens,
                                             order=order, scores=scores)
    want_kept, want_index = float64_oracle(x, 0.6, scorer, num_prefix_tokens, order, scores)
    assert index.dtype == torch.int64
    np.testing.assert_array_equal(index.numpy(), want_index)
    np.testing.assert_array_equal(x_kept.double().numpy(), want_kept)


def test_kept_count_table_n197():
    table = {1.0: 197, 0.9: 177, 0.8: 158, 0.7: 138, 0.6: 118, 0.5: 98, 0.4: 79, 0.3: 59, 0.2: 39}
    assert {rho: num_kept_tokens(197, rho) for rho in table} == table


def test_kept_count_table_n577():
    rates = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    assert [num_kept_tokens(577, r) for r in rates] == [max(2, round(r * 577)) for r in rates]
    # by hand: 0.5 * 577 = 288.5 rounds half to even -> 288; 0.2 * 577 = 115.4 -> 115; 0.9 -> 519.3 -> 519
    assert num_kept_tokens(577, 0.5) == 288
    assert num_kept_tokens(577, 0.2) == 115
    assert num_kept_tokens(577, 0.9) == 519
    assert num_kept_tokens(577, 0.7) == 404  # 403.9
    assert num_kept_tokens(197, 0.001) == 2 and num_kept_tokens(197, 0.001, num_prefix_tokens=4) == 5


def test_sample_patches_returns_k_rows():
    x = quantized((2, 197, 8))
    for rho, k in ((0.9, 177), (0.5, 98), (0.2, 39)):
        x_kept, index = sample_patches(x, rho)
        assert x_kept.shape == (2, k, 8) and index.shape == (2, k)
        assert torch.equal(index[:, 0], torch.zeros(2, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# Backends vs the reference. The device fixture: CUDA tensors on a GPU host (compiled kernels, and
# the cuda backend where _C is built), CPU tensors and the Triton interpreter elsewhere.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_prefix_tokens", [0, 1, 4])
@pytest.mark.parametrize("order", ["score", "spatial"])
@pytest.mark.parametrize("scorer", ["l1", "l2", "given", "random"])
def test_kernel_backend_matches_reference(backend, scorer, order, num_prefix_tokens, dtype, device):
    x = quantized((2, 13, 20), dtype, device)
    scores = given_scores(2, 13 - num_prefix_tokens, device) if scorer == "given" else None
    check_backend(backend, x, 0.5, scorer, num_prefix_tokens, order, scores, seed=5)


@pytest.mark.triton
@pytest.mark.parametrize("scorer", ["l1", "l2", "given"])
@pytest.mark.parametrize("order", ["score", "spatial"])
def test_triton_unfused_path_matches_reference(scorer, order, device):
    """Past FUSED_MAX_PATCHES the Triton forward runs score -> select -> wide gather."""
    from pss_kernels.ops.sample_patches import triton_sample
    x = quantized((2, 11, 24), device=device)
    scores = given_scores(2, 10, device) if scorer == "given" else None
    with torch.cuda.device_of(x):
        x_kept, index, slot = triton_sample.sample_patches_forward(x, scores, 6, scorer, 1, order, fused=False)
    ref_kept, ref_index = sample_patches_reference(x, 6 / 11, scorer=scorer, order=order, scores=scores)
    assert torch.equal(index, ref_index) and torch.equal(x_kept, ref_kept)
    kept_rows = torch.arange(6, dtype=torch.int32, device=device).expand(2, 6)
    want_slot = torch.full((2, 11), -1, dtype=torch.int32, device=device).scatter(1, ref_index, kept_rows)
    assert torch.equal(slot, want_slot)


@pytest.fixture(scope="module")
def codegen():
    """Every kernel the launchers make for ViT-B at 224 / 384 / 512 px, DeiT-S and 4096 patches,
    compiled for sm_90 and sm_80 as the JIT compiles them (tests/codegen_report.py)."""
    if torch.cuda.is_available():
        pytest.skip("the GPU tests run the kernels themselves")
    pytest.importorskip("triton.backends.nvidia")
    from jit_codegen import run_codegen_report
    return run_codegen_report("sample_patches")


def test_codegen_sm90_kernels_do_not_spill(codegen):
    assert {e["kernel"] for e in codegen} == {"_select_kernel", "_score_kernel", "_copy_rows_kernel",
                                              "_scatter_rows_kernel"}
    assert {e["arch"] for e in codegen} == {80, 90}
    spilling = [e for e in codegen if e["arch"] == 90 and e["stack_bytes"] > 0]
    assert not spilling, spilling


def test_codegen_fused_path_up_to_its_limit_reads_whole_sectors(codegen):
    """Up to FUSED_MAX_PATCHES one fused program per image (grid (B,)); its row tile reads at least
    32 bytes per row and step (one DRAM sector). Past it: score, select and copy kernels."""
    from pss_kernels.ops.sample_patches.triton_sample import FUSED_MAX_PATCHES
    forward = [e for e in codegen if e["variant"] == "forward" and e["op"] == "sample_patches"]
    for entry in forward:
        fused = entry["patches"] <= FUSED_MAX_PATCHES
        if entry["kernel"] == "_select_kernel":
            assert entry["meta"]["GATHER"] == fused and entry["grid"] == [entry["grid"][0]], entry
            if fused:
                assert entry["tiles"]["BLOCK_C"] * entry["itemsize"] >= 32, entry
        else:
            assert not fused, entry  # a fused forward launches nothing else
    assert {e["patches"] for e in forward if e["kernel"] == "_score_kernel"} == {4096}


def test_codegen_packed_sampler_is_one_launch_up_to_the_fused_limit(codegen):
    """sample_patches_varlen: one program per image selects, sums the offsets and copies its rows (grid
    (B,), GATHER and VARLEN); past FUSED_MAX_PATCHES a score kernel, the select kernel without the copy
    and a scatter of the kept rows. Its backward is the dense copy kernel reading the packed rows
    (batch stride 0)."""
    from pss_kernels.ops.sample_patches.triton_sample import FUSED_MAX_PATCHES
    packed = [e for e in codegen if e["op"] == "sample_patches_varlen"]
    assert {e["arch"] for e in packed} == {80, 90}
    for entry in packed:
        if entry["variant"] == "backward":
            assert entry["kernel"] == "_copy_rows_kernel", entry
        elif entry["kernel"] == "_select_kernel":
            fused = entry["patches"] <= FUSED_MAX_PATCHES
            assert entry["meta"]["GATHER"] == fused and entry["meta"]["VARLEN"] and len(entry["grid"]) == 1, entry
            if fused:
                assert entry["tiles"]["BLOCK_C"] * entry["itemsize"] >= 32, entry
        else:
            assert entry["kernel"] in ("_score_kernel", "_scatter_rows_kernel"), entry
            assert entry["patches"] > FUSED_MAX_PATCHES, entry
    unfused = {(e["kernel"], e["patches"]) for e in packed if e["patches"] > FUSED_MAX_PATCHES}
    assert unfused == {("_score_kernel", 4096), ("_select_kernel", 4096), ("_scatter_rows_kernel", 4096),
                       ("_copy_rows_kernel", 4096)}


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_non_contiguous_x_and_odd_shapes(backend, device):
    base = quantized((2, 9, 31), device=device)  # C odd, N not a power of two
    x = base.transpose(1, 2).contiguous().transpose(1, 2)  # same values, channel stride != 1
    assert not x.is_contiguous()
    check_backend(backend, x, 0.6)
    check_backend(backend, quantized((1, 6, 5), device=device)[:, :, ::2], 0.5, num_prefix_tokens=0)  # B = 1


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("order", ["score", "spatial"])
def test_extreme_kept_counts(backend, order, device):
    x = quantized((2, 13, 8), device=device)
    check_backend(backend, x, 0.99, order=order)  # round(12.87) = 13: every token kept, none dropped
    check_backend(backend, x, 0.01, order=order, num_prefix_tokens=4)  # k = 5: a single patch


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_stride_zero_gradient(backend, device):
    """x_kept.sum() hands backward an expanded (stride-0) gradient."""
    x = quantized((2, 10, 12), device=device).requires_grad_()
    x_kept, index = sample_patches(x, 0.5, backend=backend)
    x_kept.sum().backward()
    want = torch.zeros(2, 10, 12, device=device).scatter(1, index[..., None].expand(-1, -1, 12), 1.0)
    assert torch.equal(x.grad, want)


# ---------------------------------------------------------------------------------------------
# Ties and special values: the sort key
# ---------------------------------------------------------------------------------------------


def test_topk_key_model_orders_like_torch_sort():
    """The kernels' key (modelled in numpy) ranks as a stable descending torch.sort, NaN/-0 included."""
    gen = torch.Generator().manual_seed(0)
    cases = [torch.tensor(SPECIAL), torch.randint(0, 3, (40,), generator=gen).float(), torch.randn(64, generator=gen)]
    for scores in cases:
        order = np.argsort(-topk_key_model(scores.numpy()), kind="stable")
        want = torch.sort(scores, descending=True, stable=True).indices.numpy()
        np.testing.assert_array_equal(order, want)


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("order", ["score", "spatial"])
def test_ties_and_special_scores(backend, order, device):
    scores = torch.tensor([SPECIAL, [2.0] * len(SPECIAL)], device=device)  # second image: all tied
    x = quantized((2, len(SPECIAL) + 1, 4), device=device)
    _, index = sample_patches(x, 0.5, scorer="given", scores=scores, order=order, backend=backend)
    assert torch.equal(index, sample_patches_reference(x, 0.5, scorer="given", scores=scores, order=order)[1])
    assert torch.equal(index[1], torch.arange(index.shape[1], device=device))  # all tied: lowest positions, in order


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_negative_zero_ties_with_positive_zero_at_the_keep_boundary(backend, device):
    """-0.0 at position 1, +0.0 at position 2, one of them kept: they tie (torch.sort's order), so the
    lower position wins. A sort key that stopped folding -0.0 onto +0.0 would keep position 2."""
    scores = torch.tensor([[3.0, -0.0, 0.0, -1.0, -2.0]], device=device)
    x = quantized((1, 6, 4), device=device)
    _, index = sample_patches(x, 0.5, scorer="given", scores=scores, backend=backend)  # k = 3: CLS + 2 patches
    assert index.tolist() == [[0, 1, 2]]
    assert torch.equal(index, sample_patches_reference(x, 0.5, scorer="given", scores=scores)[1])


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_given_scores_as_a_strided_view(backend, device):
    """(B, P) scores with non-unit strides in both dimensions (a transposed, sliced view): read
    through their strides, not as if contiguous."""
    storage = torch.randn(10, 6, generator=torch.Generator().manual_seed(0)).to(device)  # (P, 2B)
    scores = storage.t()[::2]  # (3, 10), strides (2, 6)
    assert scores.stride() == (2, 6)
    x = quantized((3, 11, 4), device=device)
    for order in ("score", "spatial"):
        check_backend(backend, x, 0.5, "given", 1, order, scores)


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_l1_scores_accumulate_in_float32(backend, device):
    """fp16 rows whose float32 l1 sums are 2078.5 < 2079 < 2079.5 (positions 1, 2, 3), while every fp16
    value at that size is even: a score summed in fp16 (without the float32 cast) rounds row 2 to
    2078 or 2080 whatever the summation order, and the tie-break by position then reorders the rows."""
    x = torch.zeros(1, 4, 64)
    x[0, 1:, 0] = 2048.0
    x[0, 1, 1] = 30.5                 # 2078.5
    x[0, 2, 1:63] = 0.5               # 2048 + 62 * 0.5 = 2079
    x[0, 3, 1] = 31.5                 # 2079.5
    x = x.to(device=device, dtype=torch.float16)
    _, index = sample_patches(x, 0.99, backend=backend)  # k = round(3.96) = 4: every token, by score
    assert index.tolist() == [[0, 3, 2, 1]]


@needs_cuda_extension
@pytest.mark.parametrize("spatial", [False, True])
def test_cuda_selection_host_model_matches_reference(spatial):
    """The CUDA kernel's keys + bitonic network, run on the host by pss_kernels._C."""
    ext = cuda_extension()
    gen = torch.Generator().manual_seed(0)
    for num_patches in (1, 2, 7, 196, 576, 4097, 8192):
        scores = torch.randint(0, 4, (3, num_patches), generator=gen).float()
        scores[0, : len(SPECIAL)] = torch.tensor(SPECIAL)[: num_patches]
        for kept in {1, max(1, num_patches // 3), num_patches}:
            positions = torch.empty(3, kept, dtype=torch.int64)
            ext.select_patches_host(scores.data_ptr(), positions.data_ptr(), 3, num_patches, kept, spatial)
            want = select_indices(scores, kept, 0, "spatial" if spatial else "score")
            assert torch.equal(positions, want), (num_patches, kept)
    with pytest.raises(ValueError, match="8192"):
        ext.select_patches_host(0, 0, 1, 8193, 1, spatial)


# ---------------------------------------------------------------------------------------------
# Random scorer
# ---------------------------------------------------------------------------------------------
def test_random_scorer_distinct_prefix_and_uniform():
    batch, num_tokens, num_prefix = 4000, 21, 2
    x = torch.zeros(batch, num_tokens, 1)
    gen = torch.Generator().manual_seed(0)
    _, index = sample_patches(x, 0.5, scorer="random", num_prefix_tokens=num_prefix, generator=gen)
    k = num_kept_tokens(num_tokens, 0.5, num_prefix)
    assert torch.equal(index[:, :num_prefix], torch.arange(num_prefix).expand(batch, num_prefix))
    patches = index[:, num_prefix:]
    assert torch.all(patches >= num_prefix)
    assert torch.all(patches.sort(dim=1).values.diff(dim=1) > 0)  # distinct
    counts = torch.bincount(patches.flatten() - num_prefix, minlength=num_tokens - num_prefix).double()
    expected = batch * (k - num_prefix) / (num_tokens - num_prefix)
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    dof = num_tokens - num_prefix - 1
    assert chi_square < dof + 6 * math.sqrt(2 * dof)  # ~ 6 sigma above the mean of chi2(dof)


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_random_scorer_reproducible_with_generator(backend, device):
    x = quantized((3, 17, 4), device=device)

    def draw(seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        return sample_patches(x, 0.4, scorer="random", generator=gen, backend=backend)[1]

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    assert torch.equal(draw(3), sample_patches_reference(x, 0.4, scorer="random",
                                                         generator=torch.Generator(device=device).manual_seed(3))[1])


# ---------------------------------------------------------------------------------------------
# Shortcut, errors, custom op, compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [None, *KERNEL_BACKENDS])
def test_keep_rate_one_returns_x_itself(backend, device):
    x = quantized((2, 7, 3), device=device)
    x_kept, index = sample_patches(x, 1.0, backend=backend)
    assert x_kept is x
    assert torch.equal(index, torch.arange(7, device=device).expand(2, 7))


def test_keep_rate_one_index_lives_on_x_device():
    """The shortcut makes no kernel call, so nothing else puts its index on x's device (a CPU index
    for a CUDA x would pass every CPU test): a meta tensor tells the devices apart on any host."""
    x = torch.empty(2, 7, 3, device="meta")
    x_kept, index = sample_patches(x, 1.0)
    assert x_kept is x and index.device.type == "meta" and index.shape == (2, 7) and index.dtype == torch.int64


BAD_INPUTS = [
    (dict(x=torch.zeros(2, 5)), ValueError, "x must have 3 dimensions"),
    (dict(x=torch.zeros(2, 5, 3, dtype=torch.int32)), TypeError, "x must have dtype"),
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.zeros(2, 5, 0)), ValueError, "C > 0"),
    (dict(x=torch.zeros(2, 1, 3)), ValueError, "more tokens than num_prefix_tokens=1"),
    (dict(keep_rate=0.0), ValueError, "keep_rate must be in"),
    (dict(keep_rate=1.5), ValueError, "keep_rate must be in"),
    (dict(keep_rate="0.5"), TypeError, "keep_rate"),
    (dict(scorer="l3"), ValueError, "scorer must be one of"),
    (dict(order="random"), ValueError, "order must be one of"),
    (dict(num_prefix_tokens=-1), ValueError, "num_prefix_tokens must be >= 0"),
    (dict(num_prefix_tokens=1.0), TypeError, "num_prefix_tokens must be an int"),
    (dict(scorer="given"), TypeError, "scores must be a torch.Tensor"),
    (dict(scorer="given", scores=torch.zeros(2, 5)), ValueError, r"scores must have shape \(2, 4\)"),
    (dict(scorer="given", scores=torch.zeros(2, 4, dtype=torch.int64)), TypeError, "scores must have dtype"),
    (dict(scores=torch.zeros(2, 4)), ValueError, "scores is only used with scorer='given'"),
    (dict(generator=torch.Generator()), ValueError, "generator is only used with scorer='random'"),
    (dict(scorer="random", generator=3), TypeError, "generator must be a torch.Generator"),
    (dict(x=torch.zeros(2, 5, 3, device="meta"), scorer="random", generator=torch.Generator()), ValueError,
     r"generator must be on x's device type \(meta\)"),
    (dict(backend="cudnn"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), RuntimeError, "cuda"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_INPUTS)
def test_bad_input_names_the_argument(kwargs, error, message):
    args = dict(x=torch.zeros(2, 5, 3), keep_rate=0.5)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        sample_patches(args.pop("x"), args.pop("keep_rate"), **args)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends_reject_too_many_patches(backend, device):
    with pytest.raises(ValueError, match="at most 8192 patch tokens.*x of shape"):
        sample_patches(torch.zeros(1, 8194, 1, device=device), 0.5, backend=backend)


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
@pytest.mark.parametrize("scorer", ["l1", "given"])
def test_opcheck(backend, scorer, device):
    x = quantized((2, 9, 8), device=device).requires_grad_()
    scores = given_scores(2, 8, device) if scorer == "given" else None
    opcheck(torch.ops.pss_kernels.sample_patches.default, (x, scores, 5, scorer, 1, "spatial", backend))
    _, index, slot = torch.ops.pss_kernels.sample_patches(x, scores, 5, scorer, 1, "score", backend)
    grad_kept = quantized((2, 5, 8), device=device, seed=2).requires_grad_()
    opcheck(torch.ops.pss_kernels.sample_patches_backward.default, (grad_kept, index, slot, 9, backend))


def test_double_backward():
    x = quantized((2, 9, 4)).requires_grad_()
    x_kept, index = sample_patches(x, 0.5)
    (grad_x,) = torch.autograd.grad((x_kept * x_kept).sum(), x, create_graph=True)
    (grad_grad,) = torch.autograd.grad(grad_x.sum(), x)
    assert torch.equal(grad_x, scatter_grad(index, 2 * x_kept.detach(), 9))
    assert torch.equal(grad_grad, scatter_grad(index, torch.full_like(x_kept, 2.0), 9))


def test_torch_compile_fullgraph_inductor():
    def step(x, scores):
        x_kept, index = sample_patches(x, 0.5, scorer="given", scores=scores, order="spatial")
        return (x_kept * 3).sum(), index

    x = quantized((2, 11, 8)).requires_grad_()
    scores = given_scores(2, 10)
    loss, index = torch.compile(step, fullgraph=True)(x, scores)
    loss.backward()
    want_loss, want_index = step(x.detach(), scores)
    assert torch.equal(index, want_index) and loss.item() == want_loss.item()
    assert torch.equal(x.grad, scatter_grad(index, torch.full((2, 6, 8), 3.0), 11))


@pytest.mark.parametrize("backend", ["torch", *KERNEL_BACKENDS])
def test_torch_compile_fullgraph_dynamic_shapes(backend, device):
    """aot_eager (no C++ build): the op traces with symbolic B, N and the random scorer's draw."""
    compiled = torch.compile(lambda x: sample_patches(x, 0.5, scorer="random", backend=backend),
                             fullgraph=True, backend="aot_eager", dynamic=True)
    for shape in ((2, 9, 4), (3, 12, 4)):
        x = quantized(shape, device=device)
        x_kept, index = compiled(x)
        assert index.shape == (shape[0], num_kept_tokens(shape[1], 0.5))
        assert torch.all(index[:, 0] == 0) and torch.all(index[:, 1:] >= 1) and torch.all(index < shape[1])
        assert torch.all(index.sort(dim=1).values.diff(dim=1) > 0)  # distinct positions
        assert torch.equal(x_kept, x.gather(1, index[..., None].expand(-1, -1, 4)))


# ---------------------------------------------------------------------------------------------
# PatchSampler and peers
# ---------------------------------------------------------------------------------------------
def test_patch_sampler_follows_its_attributes():
    x = quantized((2, 11, 6))
    sampler = PatchSampler(keep_rate=1.0).eval()  # samples in eval mode too (dynamic inference)
    out, index = sampler(x)
    assert out is x and index is None
    sampler.keep_rate = 0.5
    x_kept, index = sampler(x)
    ref_kept, ref_index = sample_patches_reference(x, 0.5)
    assert torch.equal(index, ref_index) and torch.equal(x_kept, ref_kept)
    sampler.scorer = "l2"
    assert torch.equal(sampler(x)[1], sample_patches_reference(x, 0.5, scorer="l2")[1])
    sampler.keep_rate = 0.0
    with pytest.raises(ValueError, match="keep_rate"):
        sampler(x)
    assert "keep_rate=0.0" in repr(sampler)


def test_patch_sampler_given_scores_and_eager_impl():
    x = torch.randn(2, 11, 6, generator=torch.Generator().manual_seed(0))  # untied scores
    scores = torch.randn(2, 10, generator=torch.Generator().manual_seed(1))
    given = PatchSampler(0.5, scorer="given", order="spatial")
    assert torch.equal(given(x, scores)[1], sample_patches_reference(x, 0.5, scorer="given", scores=scores,
                                                                    order="spatial")[1])
    eager = PatchSampler(0.5, impl="eager")
    assert torch.equal(eager(x)[1], sample_patches_reference(x, 0.5)[1])
    eager.scorer = "l2"
    assert torch.equal(eager(x)[1], sample_patches_reference(x, 0.5, scorer="l2")[1])
    eager.scorer = "random"
    index = eager(x)[1]
    assert torch.equal(index[:, 0], torch.zeros(2, dtype=torch.int64))
    assert torch.all(index[:, 1:].sort(dim=1).values.diff(dim=1) > 0)
    eager.scorer = "given"
    with pytest.raises(ValueError, match="impl='eager' implements scorer"):
        eager(x)


@pytest.mark.parametrize("kwargs, message", [
    (dict(impl="fast"), "impl must be one of"),
    (dict(scorer="norm"), "scorer must be one of"),
    (dict(impl="eager", scorer="given"), r"impl='eager' implements scorer in \('l1', 'l2', 'random'\)"),
    (dict(impl="eager", order="spatial"), "impl='eager' implements order='score' only"),
    (dict(keep_rate=2.0), "keep_rate must be in"),
    (dict(backend="cudnn"), "backend must be one of .* got 'cudnn'"),
])
def test_patch_sampler_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PatchSampler(**kwargs)


@pytest.mark.parametrize("peer", [eager_sample_patches, topk_gather_sample_patches])
@pytest.mark.parametrize("num_prefix_tokens", [0, 1, 4])
def test_peers_match_reference_on_untied_scores(peer, num_prefix_tokens):
    x = torch.randn(3, 29, 16, generator=torch.Generator().manual_seed(0))
    x_kept, index = peer(x, 0.4, num_prefix_tokens)
    ref_kept, ref_index = sample_patches_reference(x, 0.4, num_prefix_tokens=num_prefix_tokens)
    assert torch.equal(index, ref_index) and torch.equal(x_kept, ref_kept)


