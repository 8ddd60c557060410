"""Every kernel launcher of both ops once, on small shapes, for `compute-sanitizer` to watch:

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_kernels.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_kernels.py

sample_patches (triton fused and unfused, cuda when built; forward and backward) and rpb_attention
(triton forward with the CLS row, backward with every bias-gradient accumulator, deterministic
(csr / image-sum, and the deterministic slices), frozen table; with and without an index; and the
sdpa backend's gather and scatter), and the packed ops (sample_patches_varlen's triton and cuda
kernels, both CUDA plans; rpb_attention_varlen's triton kernel, default and deterministic). Each result is also checked against the torch reference,
so a run that the sanitizer passes is a correct run too. Exit status 1 on a wrong result.

Without a GPU it runs the same calls on CPU tensors in the Triton interpreter (a rehearsal of the
script, not a memory check). Set PYTORCH_NO_CUDA_MEMORY_CACHING=1 under memcheck, so an access past
a tensor is not hidden inside a block of the caching allocator.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The interpreter computes the masked lanes of the packed kernels' spare programs (0 / 0, log2 0),
    # as a GPU does silently.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")

from pss_kernels import rpb_attention, rpb_attention_varlen, sample_patches, sample_patches_varlen  # noqa: E402
from pss_kernels._backends import cuda_extension  # noqa: E402
from pss_kernels.ops.rpb_attention.reference import bias_table_rows, rpb_attention_reference  # noqa: E402
from pss_kernels.ops.rpb_attention.triton_bias_grad import DBIAS_ENV_VAR  # noqa: E402
from pss_kernels.ops.sample_patches.reference import sample_patches_reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FAILURES = []


def check(name, got, want, atol):
    ok = got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=atol, atol=atol)
    print(f"{'ok   ' if ok else 'WRONG'} {name}", flush=True)
    if not ok:
        FAILURES.append(name)


def sampling_cases():
    backends = ["triton"] + (["cuda"] if DEVICE.type == "cuda" and cuda_extension() is not None else [])
    generator = torch.Generator().manual_seed(0)
    for backend in backends:
        for shape in ((4, 50, 64), (3, 37, 40)):  # 40 channels: rows that are not 16-byte multiples
            # Multiples of 1/4: exact in bf16, and every summation order gives the same float32 score.
            x = (torch.randint(-8, 9, shape, generator=generator) * 0.25).to(
                DEVICE, torch.bfloat16 if DEVICE.type == "cuda" else torch.float32).requires_grad_()
            for order in ("score", "spatial"):
                x_kept, index = sample_patches(x, 0.4, order=order, backend=backend)
                ref_kept, ref_index = sample_patches_reference(x.detach(), 0.4, order=order)
                check(f"sample_patches {backend} {tuple(shape)} {order} index", index, ref_index, 0)
                check(f"sample_patches {backend} {tuple(shape)} {order} x_kept", x_kept, ref_kept, 0)
                (grad,) = torch.autograd.grad(x_kept, x, torch.ones_like(x_kept))
                want = torch.zeros_like(x).scatter(1, ref_index[..., None].expand(-1, -1, shape[2]), 1.0)
                check(f"sample_patches {backend} {tuple(shape)} {order} grad", grad, want, 0)
    from pss_kernels.ops.sample_patches import triton_sample
    x = (torch.randint(-8, 9, (2, 30, 24), generator=generator) * 0.25).to(DEVICE)
    with torch.cuda.device_of(x):
        x_kept, index, _ = triton_sample.sample_patches_forward(x, None, 10, "l1", 1, "score", fused=False)
    ref_kept, ref_index = sample_patches_reference(x, 10 / 30)
    check("sample_patches triton unfused index", index, ref_index, 0)
    check("sample_patches triton unfused x_kept", x_kept, ref_kept, 0)


def attention_cases():
    grid, heads, head_dim = (4, 5), 2, 32
    generator = torch.Generator().manual_seed(1)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
    for keep_rate in (None, 0.6):
        index = None
        if keep_rate is not None:
            _, index = sample_patches(torch.randn(3, 21, 4, generator=generator), keep_rate)
            index = index.to(DEVICE)
        num_tokens = 21 if index is None else index.shape[1]
        variants = [("auto", False, True), ("slices", False, True), ("position-grid", False, True),
                    ("csr", False, True), ("auto", True, True), ("slices", True, True), ("auto", False, False)]
        if index is None:
            variants.append(("image-sum", False, True))
        for accumulator, deterministic, table_grad in variants:
            q, k, v = (torch.randn(3, heads, num_tokens, head_dim, generator=generator).to(DEVICE, dtype)
                       .requires_grad_() for _ in range(3))
            table = torch.randn(bias_table_rows(grid), heads, generator=generator).to(DEVICE).requires_grad_(table_grad)
            os.environ[DBIAS_ENV_VAR] = accumulator
            out, cls_attention = rpb_attention(q, k, v, table, index, grid_size=grid, backend="triton",
                                               deterministic=deterministic, return_cls_attention=True)
            leaves = (q, k, v, table) if table_grad else (q, k, v)
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
            expected = rpb_attention_reference(q, k, v, table, index, grid_size=grid)
            want_grads = torch.autograd.grad(expected, leaves, torch.ones_like(expected))
            name = (f"rpb_attention index={'None' if index is None else 'sampled'} {accumulator}"
                    f"{' deterministic' if deterministic else ''}{'' if table_grad else ' frozen table'}")
            check(f"{name} out", out, expected, tolerance)
            for grad_name, got, want in zip(("dq", "dk", "dv", "dbias_table"), grads, want_grads):
                check(f"{name} {grad_name}", got, want, tolerance)
            probs = torch.softmax(rpb_logits(q, k, table, index, grid), -1)[:, :, 0].mean(1)
            check(f"{name} cls_attention", cls_attention, probs, tolerance)
    os.environ.pop(DBIAS_ENV_VAR, None)
    for keep_rate in (None, 0.6):  # the sdpa backend: this package's gather, SDPA, its scatter
        index = None
        if keep_rate is not None:
            _, index = sample_patches(torch.randn(3, 21, 4, generator=generator), keep_rate)
            index = index.to(DEVICE)
        num_tokens = 21 if index is None else index.shape[1]
        q, k, v = (torch.randn(3, heads, num_tokens, head_dim, generator=generator).to(DEVICE, dtype).requires_grad_()
                   for _ in range(3))
        table = torch.randn(bias_table_rows(grid), heads, generator=generator).to(DEVICE).requires_grad_()
        out = rpb_attention(q, k, v, table, index, grid_size=grid, backend="sdpa")
        grads = torch.autograd.grad(out, (q, k, v, table), torch.ones_like(out))
        expected = rpb_attention_reference(q, k, v, table, index, grid_size=grid)
        want_grads = torch.autograd.grad(expected, (q, k, v, table), torch.ones_like(expected))
        name = f"rpb_attention sdpa index={'None' if index is None else 'sampled'}"
        check(f"{name} out", out, expected, tolerance)
        for grad_name, got, want in zip(("dq", "dk", "dv", "dbias_table"), grads, want_grads):
            check(f"{name} {grad_name}", got, want, tolerance)


def packed_cases():
    """The packed sampler (the CUDA kernel's split plan at B = 3, its fused plan at B = 160 > the SMs)
    and the packed attention, against their torch backends."""
    from pss_kernels.ops.sample_patches import triton_sample
    generator = torch.Generator().manual_seed(2)
    backends = ["triton"] + (["cuda"] if DEVICE.type == "cuda" and cuda_extension() is not None else [])
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    for backend in backends:
        for batch in ((3, 160) if backend == "cuda" else (3,)):
            x = (torch.randint(-8, 9, (batch, 21, 40), generator=generator) * 0.25).to(DEVICE, dtype).requires_grad_()
            counts = torch.randint(2, 22, (batch,), generator=generator).to(DEVICE)
            counts[0] = 21  # an image kept whole
            tokens, positions, cu = sample_patches_varlen(x, counts, backend=backend)
            want_tokens, want_positions, want_cu = sample_patches_varlen(x.detach(), counts, backend="torch")
            name = f"sample_patches_varlen {backend} B={batch}"
            check(f"{name} positions", positions, want_positions, 0)
            check(f"{name} cu_seqlens", cu, want_cu, 0)
            check(f"{name} tokens", tokens, want_tokens, 0)
            (grad,) = torch.autograd.grad(tokens, x, torch.ones_like(tokens))
            image = torch.repeat_interleave(torch.arange(batch, device=DEVICE), counts)
            want = torch.zeros(batch, 21, device=DEVICE, dtype=dtype).index_put((image, want_positions),
                                                                               torch.ones((), device=DEVICE, dtype=dtype))
            check(f"{name} grad", grad, want[..., None].expand_as(x), 0)
    x = (torch.randint(-8, 9, (3, 21, 24), generator=generator) * 0.25).to(DEVICE)
    counts = torch.tensor([5, 21, 2], device=DEVICE)
    with torch.cuda.device_of(x):
        tokens, positions, _, _ = triton_sample.sample_patches_varlen_forward(x, None, counts, 28, "l1", 1, "score",
                                                                              fused=False)
    want_tokens, want_positions, _ = sample_patches_varlen(x, counts, backend="torch")
    check("sample_patches_varlen triton unfused positions", positions, want_positions, 0)
    check("sample_patches_varlen triton unfused tokens", tokens, want_tokens, 0)

    grid, heads, head_dim = (4, 5), 2, 32
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-4
    scores = torch.rand(4, 20, generator=generator)
    counts = torch.tensor([21, 3, 12, 7])
    _, positions, cu = sample_patches_varlen(torch.zeros(4, 21, 1), counts, scorer="given", scores=scores)
    positions, cu = positions.to(DEVICE), cu.to(DEVICE)
    for deterministic in (False, True):
        q, k, v = (torch.randn(int(counts.sum()), heads, head_dim, generator=generator).to(DEVICE, dtype)
                   .requires_grad_() for _ in range(3))
        table = torch.randn(bias_table_rows(grid), heads, generator=generator).to(DEVICE).requires_grad_()
        results = {}
        for backend in ("triton", "torch"):
            out = rpb_attention_varlen(q, k, v, table, positions, cu, grid_size=grid, backend=backend,
                                       deterministic=deterministic)
            results[backend] = (out, *torch.autograd.grad(out, (q, k, v, table), torch.ones_like(out)))
        name = f"rpb_attention_varlen triton{' deterministic' if deterministic else ''}"
        for part, got, want in zip(("out", "dq", "dk", "dv", "dbias_table"), results["triton"], results["torch"]):
            check(f"{name} {part}", got, want, tolerance)
        # Offsets the host check is told to skip (past T, going back, an image longer than the grid) and
        # positions outside it: wrong values are allowed, an access outside the tensors is what memcheck
        # would report. Image 0's offsets are good each time: its rows must still be right.
        total = int(counts.sum())
        bad_positions = positions.clone()
        bad_positions[-1], bad_positions[-2] = 10_000, -5
        for offsets, pos in (([0, 21, 24, 36, total + 9], positions), ([0, 21, 40, 24, 3], positions),
                             ([0, 21, total], positions), ([0, 21, 24, 36, total], bad_positions)):
            cu_bad = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
            out = rpb_attention_varlen(q, k, v, table, pos, cu_bad, grid_size=grid, backend="triton",
                                       deterministic=deterministic, check_inputs=False)
            torch.autograd.grad(out, (q, k, v, table), torch.ones_like(out))
            check(f"{name} unchecked offsets {offsets} image 0", out[:21], results["torch"][0][:21], tolerance)


def rpb_logits(q, k, table, index, grid):
    from pss_kernels.ops.rpb_attention.reference import rpb_attention_logits
    return rpb_attention_logits(q.detach(), k.detach(), table.detach(), index, grid, 1, q.shape[-1] ** -0.5)


def main() -> int:
    print(f"sanitize_kernels on {DEVICE} ({'compiled' if DEVICE.type == 'cuda' else 'Triton interpreter'})",
          flush=True)
    sampling_cases()
    attention_cases()
    packed_cases()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    print(f"{len(FAILURES)} wrong results" + (f": {FAILURES}" if FAILURES else ""), flush=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
