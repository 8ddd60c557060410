"""Public `rpb_attention`: argument checks, backend dispatch and the torch.library registration.

The kernel backends ("torch", "triton") run behind one registered boundary per direction:
`pss_kernels::rpb_attention_fwd` returns (out, lse, cls_attention) and its autograd formula calls
`pss_kernels::rpb_attention_bwd`, which returns the gradients of q, k, v and bias_table. Both have
fake kernels, so the op traces under torch.compile(fullgraph=True) and passes
torch.library.opcheck. The backend is chosen before the op is called and travels as a string
argument; the backends fill buffers whose layout `_forward_outputs` fixes, so real and fake
outputs always agree.

The "sdpa" backend is built from PyTorch's own ops, which autograd and torch.compile already
know (sdpa_attention.py); only its table rows come from a registered op,
`pss_kernels::rpb_table_rows`, which holds the host check of `index` (a device sync that must stay
out of a compiled graph).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..._backends import OP_BACKENDS as _OP_BACKENDS, resolve_backend
from ..._checks import FLOAT_DTYPES, check_bool, check_grid_size, check_int, check_same_device, check_tensor
from .reference import bias_table_rows
from .sdpa_attention import padded_width, rpb_attention_sdpa, table_rows

# backend=None runs the fastest path validated on the device. No rpb_attention Triton kernel has
# run on a GPU yet (only under TRITON_INTERPRET=1), so on CUDA that is the construction from
# PyTorch's own kernels ("sdpa": the gathered bias given to SDPA's memory-efficient kernel) until the
# kernel passes its GPU tests and beats it in benchmarks/ops.py and iter_time.py. On CPU "sdpa" is
# the fastest construction there (benchmarks/results/cpu/); the float32 "torch" backend is the oracle.
GPU_DEFAULT_BACKEND = "sdpa"
CPU_DEFAULT_BACKEND = "sdpa"

OP_BACKENDS = _OP_BACKENDS["rpb_attention"]  # no "cuda": this op has no CUDA C++ kernel
TRITON_MAX_HEAD_DIM = 128  # the head dim is padded to a power of two; larger tiles would spill
INDEX_DTYPES = (torch.int64, torch.int32)


def rpb_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                  index: Optional[torch.Tensor] = None, *, grid_size: Sequence[int], num_prefix_tokens: int = 1,
                  scale: Optional[float] = None, backend: Optional[str] = None, deterministic: bool = False,
                  return_cls_attention: bool = False, check_index: bool = True):
    """Attention with a relative position bias gathered per image:

        out[b, h] = softmax(q[b, h] k[b, h]^T * scale + bias[b, h]) v[b, h],
        bias[b, h, i, j] = bias_table[rel(index[b, i], index[b, j]), h]

    with rel the BEiT/SimMIM/timm-`Beit` table row of two full-sequence positions of a
    `grid_size = (Gh, Gw)` patch grid (prefix token first). Differentiable in q, k, v and
    bias_table; `index` carries no gradient.

    Args:
        q, k, v: (B, H, n, D), one float dtype (float32, float16, bfloat16; float64 on the torch
            backend), any strides. The triton backend takes D <= 128.
        bias_table: (R, H), R = (2Gh-1)(2Gw-1) + 3 with a prefix token, (2Gh-1)(2Gw-1) without;
            any float dtype (e.g. a float32 parameter with bf16 activations); its gradient comes
            back in its dtype.
        index: (B, n) int64/int32 positions into the N = num_prefix_tokens + Gh*Gw tokens (the
            `index` of `sample_patches`), or None for all N tokens in order (n == N), the keep-rate-1
            path, which costs no index loads.
        grid_size: (Gh, Gw). num_prefix_tokens: 0 or 1. scale: default D ** -0.5.
        backend: "torch" (the float32 oracle) | "sdpa" (PyTorch's SDPA with the gathered bias) |
            "triton" | None (None: PSS_KERNELS_BACKEND when it names one of these, else the device's
            default, `CPU_DEFAULT_BACKEND` / `GPU_DEFAULT_BACKEND`); "cuda" raises ValueError.
        deterministic: make dbias_table bit-identical run to run (triton: an accumulator without
            atomics, see triton_bias_grad.py; needs distinct positions within each image; sdpa:
            always so).
        return_cls_attention: also return the head-averaged attention of query 0 (the prefix/CLS
            token; needs num_prefix_tokens == 1) to every token, (B, n) float32, without gradient:
            an importance signal for sample_patches(scorer="given").
        check_index: check on the host that every index value is in [0, N) (and distinct when
            deterministic) before a kernel reads it, so a bad index raises instead of reading out
            of bounds. It costs one device synchronisation (a min/max reduction read back) per
            call; pass False when the index is known good (e.g. straight from sample_patches) to
            keep the GPU queue full. The check runs inside the op, so it also runs under
            torch.compile.

    Returns:
        out (B, H, n, D) in q's dtype (stored as (B, n, H, D) memory, so
        `out.transpose(1, 2).reshape(B, n, H * D)` is a free view), or (out, cls_attention).
    """
    check_tensor("q", q, ndim=4, dtypes=None)
    # An explicit backend="cuda" raises ValueError (no CUDA C++ kernel); PSS_KERNELS_BACKEND=cuda
    # leaves this op on its default (pss_kernels._backends).
    chosen = resolve_backend("rpb_attention", backend, q.device, GPU_DEFAULT_BACKEND, CPU_DEFAULT_BACKEND)
    grid_size, scale = _check_arguments(q, k, v, bias_table, index, grid_size, num_prefix_tokens, scale, chosen,
                                        deterministic, return_cls_attention, check_index)
    if chosen == "sdpa":
        rows = (None if index is None else
                torch.ops.pss_kernels.rpb_table_rows(index, grid_size, num_prefix_tokens, q.device.type == "cuda",
                                                     check_index))
        return rpb_attention_sdpa(q, k, v, bias_table, index, rows, tuple(grid_size), num_prefix_tokens, scale,
                                  return_cls_attention)
    out, _, cls_attention = torch.ops.pss_kernels.rpb_attention_fwd(
        q, k, v, bias_table, index, grid_size, num_prefix_tokens, scale, chosen, deterministic,
        return_cls_attention, check_index)
    return (out, cls_attention) if return_cls_attention else out


def _check_arguments(q, k, v, bias_table, index, grid_size, num_prefix_tokens, scale, backend, deterministic,
                     return_cls_attention, check_index) -> Tuple[List[int], float]:
    """Every check that needs no tensor values; returns (grid_size as a list, scale as a float)."""
    dtypes = FLOAT_DTYPES + ((torch.float64,) if backend in ("torch", "sdpa") else ())
    check_tensor("q", q, ndim=4, dtypes=dtypes)
    batch, heads, num_tokens, head_dim = q.shape
    if q.numel() == 0:
        raise ValueError(f"q must have B, H, n, D >= 1, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=dtypes)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)} (B, H, n, D), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if backend == "triton" and head_dim > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"q must have head dim D <= {TRITON_MAX_HEAD_DIM} on the triton backend, got D={head_dim}")

    check_grid_size(grid_size)
    check_int("num_prefix_tokens", num_prefix_tokens, minimum=0, maximum=1)
    num_positions = num_prefix_tokens + grid_size[0] * grid_size[1]

    check_tensor("bias_table", bias_table, ndim=2, dtypes=dtypes)
    expected = (bias_table_rows(tuple(grid_size), num_prefix_tokens), heads)
    if bias_table.shape[0] == expected[0] and bias_table.shape[1] != heads and q.shape[2] == bias_table.shape[1]:
        raise ValueError(f"q must be (B, H, n, D): its dim 1 gives H={heads}, but bias_table has "
                         f"{bias_table.shape[1]} heads, which is q's dim 2; a (B, n, H, D) q (and k, v) needs "
                         f".transpose(1, 2)")
    if tuple(bias_table.shape) != expected:
        raise ValueError(f"bias_table must have shape (R, H) = {expected} for grid_size={tuple(grid_size)}, "
                         f"num_prefix_tokens={num_prefix_tokens} and H={heads}, got {tuple(bias_table.shape)}")
    if index is None:
        if num_tokens != num_positions:
            raise ValueError(f"index=None means all N = num_prefix_tokens + Gh*Gw = {num_positions} tokens, "
                             f"but q has n={num_tokens}")
    else:
        check_tensor("index", index, ndim=2, dtypes=INDEX_DTYPES)
        if tuple(index.shape) != (batch, num_tokens):
            raise ValueError(f"index must have shape (B, n) = {(batch, num_tokens)}, got {tuple(index.shape)}")
    check_same_device(q=q, k=k, v=v, bias_table=bias_table, index=index)

    if scale is None:
        scale = head_dim ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    for name, flag in (("deterministic", deterministic), ("return_cls_attention", return_cls_attention),
                       ("check_index", check_index)):
        check_bool(name, flag)
    if return_cls_attention and num_prefix_tokens != 1:
        raise ValueError(f"return_cls_attention needs a prefix (CLS) token, got num_prefix_tokens={num_prefix_tokens}")
    return list(grid_size), float(scale)


def _check_index_values(index: torch.Tensor, num_positions: int, require_distinct: bool) -> None:
    """Host check of index values: one device sync (a few reductions read back together)."""
    stats = [index.min(), index.max()]
    if require_distinct:
        ordered = index.sort(dim=1).values
        stats.append((ordered[:, 1:] == ordered[:, :-1]).any())
    low, high, *repeats = torch.stack([s.to(torch.int64) for s in stats]).tolist()
    if low < 0 or high >= num_positions:
        raise ValueError(f"index values must be in [0, {num_positions}) (num_prefix_tokens + Gh*Gw), "
                         f"got min {low}, max {high}")
    if repeats and repeats[0]:
        raise ValueError("index must not repeat a position within an image when deterministic=True "
                         "(the deterministic bias-gradient accumulation relies on distinct positions)")


@torch.library.custom_op("pss_kernels::rpb_table_rows", mutates_args=())
def _rpb_table_rows(index: torch.Tensor, grid_size: List[int], num_prefix_tokens: int, pad: bool,
                    check_index: bool) -> torch.Tensor:
    """(B, n, n_pad) int64 table rows of the sdpa backend (sdpa_attention.table_rows), after the host
    check of `index` when asked."""
    if check_index:
        _check_index_values(index, num_prefix_tokens + grid_size[0] * grid_size[1], require_distinct=False)
    return table_rows(index, tuple(grid_size), num_prefix_tokens, index.shape[1], index.device, pad)


@_rpb_table_rows.register_fake
def _(index, grid_size, num_prefix_tokens, pad, check_index):
    return index.new_empty((index.shape[0], index.shape[1], padded_width(index.shape[1], pad)), dtype=torch.int64)


def _forward_outputs(q: torch.Tensor, return_cls_attention: bool):
    """(out, lse, cls_attention) buffers; the one place their shapes, dtypes and strides are set."""
    batch, heads, num_tokens, head_dim = q.shape
    out = q.new_empty(batch, num_tokens, heads, head_dim).permute(0, 2, 1, 3)
    lse = q.new_empty(batch, heads, num_tokens, dtype=torch.promote_types(q.dtype, torch.float32))
    cls_attention = q.new_empty((batch, num_tokens) if return_cls_attention else (0,), dtype=torch.float32)
    return out, lse, cls_attention


def _backend_module(backend: str, direction: str):
    """The module holding `rpb_attention_<direction>` for a backend; Triton is imported lazily
    because triton.jit reads TRITON_INTERPRET when a kernel module is imported."""
    if backend == "triton":
        if direction == "forward":
            from . import triton_forward as module
        else:
            from . import triton_backward as module
    else:
        from . import torch_attention as module
    return getattr(module, f"rpb_attention_{direction}")


@torch.library.custom_op("pss_kernels::rpb_attention_fwd", mutates_args=())
def _rpb_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                       index: Optional[torch.Tensor], grid_size: List[int], num_prefix_tokens: int, scale: float,
                       backend: str, deterministic: bool, return_cls_attention: bool,
                       check_index: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if index is not None and check_index:
        num_positions = num_prefix_tokens + grid_size[0] * grid_size[1]
        _check_index_values(index, num_positions, require_distinct=deterministic and backend == "triton")
    out, lse, cls_attention = _forward_outputs(q, return_cls_attention)
    # Triton launches on the current device, not q's: guard it (a no-op for CPU tensors).
    with torch.cuda.device_of(q):
        _backend_module(backend, "forward")(q, k, v, bias_table, index, tuple(grid_size), num_prefix_tokens, scale,
                                            out, lse, cls_attention if return_cls_attention else None)
    return out, lse, cls_attention


@_rpb_attention_fwd.register_fake
def _(q, k, v, bias_table, index, grid_size, num_prefix_tokens, scale, backend, deterministic,
      return_cls_attention, check_index):
    return _forward_outputs(q, return_cls_attention)


@torch.library.custom_op("pss_kernels::rpb_attention_bwd", mutates_args=())
def _rpb_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias_table: torch.Tensor, index: Optional[torch.Tensor], out: torch.Tensor,
                       lse: torch.Tensor, grid_size: List[int], num_prefix_tokens: int, scale: float, backend: str,
                       deterministic: bool, bias_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
    """Gradients of q, k, v and bias_table; with bias_grad=False (a frozen table) the backends skip
    the bias-gradient accumulation and the last output is zeros (autograd then passes None)."""
    with torch.cuda.device_of(q):
        grads = _backend_module(backend, "backward")(grad_out, q, k, v, bias_table, index, out, lse,
                                                     tuple(grid_size), num_prefix_tokens, scale, deterministic,
                                                     bias_grad)
    return tuple(g.contiguous() for g in grads)


@_rpb_attention_bwd.register_fake
def _(grad_out, q, k, v, bias_table, index, out, lse, grid_size, num_prefix_tokens, scale, backend, deterministic,
      bias_grad):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(bias_table, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, bias_table, index, grid_size, num_prefix_tokens, scale, backend, deterministic, _, _ = inputs
    out, lse, cls_attention = output
    ctx.mark_non_differentiable(lse, cls_attention)
    ctx.save_for_backward(q, k, v, bias_table, index, out, lse)
    ctx.options = (grid_size, num_prefix_tokens, scale, backend, deterministic)


def _backward(ctx, grad_out, grad_lse, grad_cls_attention):
    q, k, v, bias_table, index, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    bias_grad = ctx.needs_input_grad[3]
    dq, dk, dv, dbias_table = torch.ops.pss_kernels.rpb_attention_bwd(grad_out, q, k, v, bias_table, index, out,
                                                                       lse, *ctx.options, bias_grad)
    return dq, dk, dv, dbias_table if bias_grad else None, None, None, None, None, None, None, None, None


_rpb_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
