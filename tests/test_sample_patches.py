"""sample_patches: reference vs float64 oracle, every backend vs reference, the custom op.
Inputs and the backend check live in sampling_cases.py; GPU-only checks in test_sample_patches_gpu.py."""
import json
import math

import numpy as np
import pytest
import torch
from torch.library import opcheck

from pss_kernels import PatchSampler, num_kept_tokens, sample_patches
from pss_kernels._backends import cuda_extension
from pss_kernels.ops.sample_patches.peers import eager_sample_patches, topk_gather_sample_patches
from pss_kernels.ops.sample_patches.reference import sample_patches_reference, select_indices
from sampling_cases import DTYPES, SPECIAL, check_backend, given_scores, quantized, scatter_grad
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
# Backends vs the reference (CPU: triton in the interpreter; GPU tests below reuse the helper)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_prefix_tokens", [0, 1, 4])
@pytest.mark.parametrize("order", ["score", "spatial"])
@pytest.mark.parametrize("scorer", ["l1", "l2", "given", "random"])
def test_triton_matches_reference(scorer, order, num_prefix_tokens, dtype):
    x = quantized((2, 13, 20), dtype)
    scores = given_scores(2, 13 - num_prefix_tokens) if scorer == "given" else None
    check_backend("triton", x, 0.5, scorer, num_prefix_tokens, order, scores, seed=5)


@pytest.mark.parametrize("scorer", ["l1", "l2", "given"])
@pytest.mark.parametrize("order", ["score", "spatial"])
def test_triton_unfused_path_matches_reference(scorer, order):
    """Past FUSED_MAX_PATCHES the Triton forward runs score -> select -> wide gather."""
    from pss_kernels.ops.sample_patches import triton_sample
    x = quantized((2, 11, 24))
    scores = given_scores(2, 10) if scorer == "given" else None
    x_kept, index, slot = triton_sample.sample_patches_forward(x, scores, 6, scorer, 1, order, fused=False)
    ref_kept, ref_index = sample_patches_reference(x, 6 / 11, scorer=scorer, order=order, scores=scores)
    assert torch.equal(index, ref_index) and torch.equal(x_kept, ref_kept)
    kept_rows = torch.arange(6, dtype=torch.int32).expand(2, 6)
    want_slot = torch.full((2, 11), -1, dtype=torch.int32).scatter(1, ref_index, kept_rows)
    assert torch.equal(slot, want_slot)


CODEGEN_SCRIPT = r"""
import inspect, json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pss_kernels.ops.sample_patches import triton_sample as ts
sys.path.insert(0, "tests")
from cubin_resources import resource_usage

def compile_for(kernel, pointer_types, constexprs, arch, num_warps):
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else pointer_types.get(n, "i32") for n in names}
    return resource_usage(triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                         target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}))

select_pointers = {"x_ptr": "*bf16", "scores_ptr": "*fp32", "x_kept_ptr": "*bf16", "index_ptr": "*i64",
                   "slot_ptr": "*i32"}
unfused_pointers = dict(select_pointers, x_ptr="*fp32", x_kept_ptr="*fp32")
report = []
for arch in (80, 90):
    # What the launcher runs for ViT-B at 224 (196 patches, C = 768): the fused kernel, both orders.
    block_p, block_c, num_warps = ts.select_config(196, 768)
    for spatial in (False, True):
        report.append(("fused select 196x768", arch, compile_for(ts._select_kernel, select_pointers,
            dict(SCORER=ts.SCORER_IDS["l1"], SPATIAL=spatial, GATHER=True, BLOCK_P=block_p, BLOCK_PREFIX=1,
                 BLOCK_C=block_c, stride_xc=1, stride_sp=1), arch, num_warps)))
    # The unfused path at the largest size (4096 patches: 1024x1024 images at patch 16).
    block_p, block_c, num_warps = ts.select_config(4096, 768)
    report.append(("unfused select 4096", arch, compile_for(ts._select_kernel, unfused_pointers,
        dict(SCORER=ts.SCORER_IDS["given"], SPATIAL=False, GATHER=False, BLOCK_P=block_p, BLOCK_PREFIX=1,
             BLOCK_C=block_c, stride_xc=1, stride_sp=1), arch, num_warps)))
    report.append(("score", arch, compile_for(ts._score_kernel, {"x_ptr": "*bf16", "scores_ptr": "*fp32"},
        dict(SCORER=ts.SCORER_IDS["l1"], BLOCK_R=32, BLOCK_C=128, stride_xc=1), arch, 4)))
    report.append(("copy rows", arch, compile_for(ts._copy_rows_kernel,
        {"src_ptr": "*fp16", "rows_ptr": "*i32", "dst_ptr": "*fp16"},
        dict(BLOCK_R=16, BLOCK_C=256, stride_sc=1, stride_ir=1), arch, 4)))
print(json.dumps(report))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU runs compile the kernels for real")
def test_triton_kernels_lower_to_sm80_and_sm90_code():
    """The interpreter skips codegen; this compiles every forward/backward kernel variant the launchers
    pick at ViT-B and at 4096 patches to cubins for A100 and H100 without a GPU (in a subprocess:
    this one has TRITON_INTERPRET=1), and checks with Triton's cuobjdump that none spills on sm_90."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", CODEGEN_SCRIPT], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report) == 10
    assert all(entry[2] for entry in report), "no resource usage read: Triton's bundled cuobjdump is missing"
    spilling = [entry for entry in report if entry[1] == 90 and entry[2] and entry[2]["stack_bytes"] > 0]
    assert not spilling, spilling


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_x_and_odd_shapes(backend):
    base = quantized((2, 9, 31))  # C odd, N not a power of two
    x = base.transpose(1, 2).contiguous().transpose(1, 2)  # same values, channel stride != 1
    assert not x.is_contiguous()
    check_backend(backend, x, 0.6)
    check_backend(backend, quantized((1, 6, 5))[:, :, ::2], 0.5, num_prefix_tokens=0)  # B = 1, strided channels


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("order", ["score", "spatial"])
def test_extreme_kept_counts(backend, order):
    x = quantized((2, 13, 8))
    check_backend(backend, x, 0.99, order=order)  # round(12.87) = 13: every token kept, none dropped
    check_backend(backend, x, 0.01, order=order, num_prefix_tokens=4)  # k = 5: a single patch


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stride_zero_gradient(backend):
    """x_kept.sum() hands backward an expanded (stride-0) gradient."""
    x = quantized((2, 10, 12)).requires_grad_()
    x_kept, index = sample_patches(x, 0.5, backend=backend)
    x_kept.sum().backward()
    want = torch.zeros(2, 10, 12).scatter(1, index[..., None].expand(-1, -1, 12), 1.0)
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("order", ["score", "spatial"])
def test_ties_and_special_scores(backend, order):
    scores = torch.tensor([SPECIAL, [2.0] * len(SPECIAL)])  # second image: all tied
    x = quantized((2, len(SPECIAL) + 1, 4))
    _, index = sample_patches(x, 0.5, scorer="given", scores=scores, order=order, backend=backend)
    assert torch.equal(index, sample_patches_reference(x, 0.5, scorer="given", scores=scores, order=order)[1])
    assert torch.equal(index[1], torch.arange(index.shape[1]))  # all tied: lowest positions, in order


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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_random_scorer_reproducible_with_generator(backend):
    x = quantized((3, 17, 4))

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return sample_patches(x, 0.4, scorer="random", generator=gen, backend=backend)[1]

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    assert torch.equal(draw(3), sample_patches_reference(x, 0.4, scorer="random",
                                                         generator=torch.Generator().manual_seed(3))[1])


# ---------------------------------------------------------------------------------------------
# Shortcut, errors, custom op, compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [None, "triton"])
def test_keep_rate_one_returns_x_itself(backend):
    x = quantized((2, 7, 3))
    x_kept, index = sample_patches(x, 1.0, backend=backend)
    assert x_kept is x
    assert torch.equal(index, torch.arange(7).expand(2, 7))


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


def test_kernel_backends_reject_too_many_patches():
    with pytest.raises(ValueError, match="at most 8192 patch tokens.*x of shape"):
        sample_patches(torch.zeros(1, 8194, 1), 0.5, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scorer", ["l1", "given"])
def test_opcheck(backend, scorer):
    x = quantized((2, 9, 8)).requires_grad_()
    scores = given_scores(2, 8) if scorer == "given" else None
    opcheck(torch.ops.pss_kernels.sample_patches.default, (x, scores, 5, scorer, 1, "spatial", backend))
    _, index, slot = torch.ops.pss_kernels.sample_patches(x, scores, 5, scorer, 1, "score", backend)
    grad_kept = quantized((2, 5, 8), seed=2).requires_grad_()
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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_dynamic_shapes(backend):
    """aot_eager (no C++ build): the op traces with symbolic B, N and the random scorer's draw."""
    compiled = torch.compile(lambda x: sample_patches(x, 0.5, scorer="random", backend=backend),
                             fullgraph=True, backend="aot_eager", dynamic=True)
    for shape in ((2, 9, 4), (3, 12, 4)):
        x_kept, index = compiled(quantized(shape))
        assert index.shape == (shape[0], num_kept_tokens(shape[1], 0.5))
        assert torch.all(index[:, 0] == 0) and torch.all(index[:, 1:] >= 1) and torch.all(index < shape[1])
        assert torch.all(index.sort(dim=1).values.diff(dim=1) > 0)  # distinct positions
        assert torch.equal(x_kept, quantized(shape).gather(1, index[..., None].expand(-1, -1, 4)))


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


