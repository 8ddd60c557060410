"""The packed ops' entry points: argument checks (each error naming the argument) and the backends.

rpb_attention_varlen's backends:
- "torch" and "triton" run behind one registered boundary per direction, as rpb_attention's:
  `pss_kernels::rpb_attention_varlen_fwd` returns (out, lse, cls_attention) and its autograd formula
  calls `pss_kernels::rpb_attention_varlen_bwd`; both have fake kernels (torch.compile(fullgraph=True),
  torch.library.opcheck). "torch" runs image by image through the float32 / float64 oracle's twin
  (rpb_attention/torch_attention.py); "triton" is one launch of rpb_attention's Triton kernels over
  every image (VARLEN: programs over (work entry, head), the work entries the images' blocks, longest
  image first; triton_common.program_sequence).
- "sdpa" pads the images into one dense batch for the dense rpb_attention's sdpa path, with the
  padding keys masked (sdpa_varlen.py: one call, PyTorch's own kernels, the padding paid for).

The value checks (offsets, positions) read them back (two host syncs): inside the registered op for
"torch" and "triton", so that they also run under torch.compile, and before the padding for "sdpa";
check_inputs=False skips them when the offsets and positions are known good (straight from
sample_patches_varlen), and the triton backend then needs no host sync.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..._backends import resolve_backend
from ..._cache import TensorKeyedCache
from ..._checks import (FLOAT_DTYPES, check_bool, check_choice, check_grid_size, check_int, check_same_device,
                        check_tensor)
from ..rpb_attention.op import CPU_DEFAULT_BACKEND, GPU_DEFAULT_BACKEND, TRITON_MAX_HEAD_DIM
from ..rpb_attention.reference import bias_table_rows
from ..sample_patches.op import SCORE_DTYPES
from ..sample_patches.reference import ORDERS, SCORERS
from .reference import image_bounds
from .torch_sample import sample_patches_varlen_torch

def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, *, min_length: int = 1,
                     max_length: Optional[int] = None) -> None:
    """(B + 1,) int32 offsets starting at 0, increasing by min_length .. max_length per image, ending
    at `total` (read on the host: one synchronisation)."""
    _check_offsets_tensor(cu_seqlens)
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    if offsets[-1] != total:
        raise ValueError(f"cu_seqlens must end at the number of tokens T = {total}, got {offsets[-1]}")
    lengths = [end - start for start, end in zip(offsets[:-1], offsets[1:])]
    short = [n for n in lengths if n < min_length]
    if short:
        raise ValueError(f"cu_seqlens must increase by at least {min_length} per image (its prefix tokens and "
                         f"one patch), got image lengths {lengths}")
    if max_length is not None and max(lengths) > max_length:
        raise ValueError(f"cu_seqlens gives an image of {max(lengths)} tokens, more than the N = {max_length} "
                         f"positions of the grid")


def _check_offsets_tensor(cu_seqlens: torch.Tensor) -> None:
    """What the offsets' shape and dtype must be (no values read)."""
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold B + 1 >= 2 offsets, got {cu_seqlens.numel()}")


def _check_packed_values(positions: torch.Tensor, cu_seqlens: torch.Tensor, num_positions: int,
                         num_prefix_tokens: int, require_distinct: bool) -> None:
    """The host checks of the offsets and positions (one sync for the offsets, one for the positions)."""
    check_cu_seqlens(cu_seqlens, positions.numel(), min_length=num_prefix_tokens + 1, max_length=num_positions)
    stats = [positions.min(), positions.max()]
    if num_prefix_tokens:
        stats.append((positions[cu_seqlens[:-1].long()] != 0).any())
    if require_distinct:
        image = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(positions.numel(), device=positions.device),
                                   right=True)
        keys = torch.sort(image * num_positions + positions.long()).values
        stats.append((keys[1:] == keys[:-1]).any())
    low, high, *flags = torch.stack([s.to(torch.int64) for s in stats]).tolist()
    if low < 0 or high >= num_positions:
        raise ValueError(f"positions must be in [0, {num_positions}) (num_prefix_tokens + Gh*Gw), got min {low}, "
                         f"max {high}")
    if num_prefix_tokens and flags.pop(0):
        raise ValueError("positions: each image must start with its prefix token (position 0) at cu_seqlens[b]")
    if require_distinct and flags.pop(0):
        raise ValueError("positions must not repeat within an image when deterministic=True on the triton backend "
                         "(the deterministic bias-gradient accumulation relies on distinct positions)")


_FLAT_POSITIONS = TensorKeyedCache(kept=4)


def flat_positions(cells: torch.Tensor, grid_size: Sequence[int], num_prefix_tokens: int = 1, *,
                   check: bool = True) -> torch.Tensor:
    """(T, 2) (row, column) cells -> (T,) positions in the (Gh, Gw) grid's N = num_prefix_tokens + Gh*Gw
    positions: a patch at (r, c) -> num_prefix_tokens + r * Gw + c, the prefix token (-1, -1) -> 0.

    Images of different grids (native resolution, NaViT-style) then share one batch and the table of
    the largest grid: the bias of two patches depends only on their offset (dr, dc), which that table
    holds for every smaller grid (rpb_attention.reference.sub_grid_table gives a smaller grid's view).
    check: refuse cells outside the grid (one host sync; not while torch.compile traces, where such a
    cell's position -1 is what the op's own check of the positions then refuses). A cell outside the grid
    gets position -1 whether or not it is checked, never another patch's position."""
    grid_h, grid_w = grid_size
    rows, cols = cells[:, 0].long(), cells[:, 1].long()
    prefix = (rows == -1) & (cols == -1) if num_prefix_tokens else torch.zeros_like(rows, dtype=torch.bool)
    outside = (rows < 0) | (rows >= grid_h) | (cols < 0) | (cols >= grid_w)
    bad = outside & ~prefix
    if check and not torch.compiler.is_compiling():
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise ValueError(f"positions: cell {first} is ({int(rows[first])}, {int(cols[first])}), outside the "
                             f"{grid_h} x {grid_w} grid (rows in [0, {grid_h}), columns in [0, {grid_w})"
                             + (", the prefix token (-1, -1))" if num_prefix_tokens else ")"))
    flat = torch.where(prefix, torch.zeros_like(rows), num_prefix_tokens + rows * grid_w + cols)
    return torch.where(bad, torch.full_like(rows, -1), flat)


def rpb_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                         positions: torch.Tensor, cu_seqlens: torch.Tensor, *, grid_size: Sequence[int],
                         num_prefix_tokens: int = 1, scale: Optional[float] = None, backend: Optional[str] = None,
                         deterministic: bool = False, return_cls_attention: bool = False, check_inputs: bool = True):
    """rpb_attention on packed images: q, k, v (T, H, D), the tokens of all images concatenated;
    `cu_seqlens` (B + 1,) int32 offsets; `positions` (T,) each token's position in the N =
    num_prefix_tokens + Gh*Gw positions of its image. Attention stays inside each image; the bias is
    gathered from the positions as rpb_attention gathers it from `index`; gradients to q, k, v and
    bias_table. Each image must start with its prefix token (position 0) when num_prefix_tokens = 1.

    Images of different grid sizes (native resolution): give `positions` as (T, 2) (row, column) cells
    (the prefix token (-1, -1)) and grid_size the largest grid, whose table they share (flat_positions).

    Returns out (T, H, D) in q's dtype, or (out, cls_attention (T,) float32) with return_cls_attention:
    the head-averaged attention of each image's CLS query to its tokens.

    backend: "torch" (image by image, float32 math; float64 too) | "sdpa" (the images padded into one
    batch for rpb_attention's sdpa path, the padding keys masked; it reads the longest image's length on
    the host: one sync a step, a graph break under torch.compile) | "triton" (one fused launch over all
    images; D <= 128) | None (rpb_attention's default for the device). deterministic: as
    rpb_attention's. check_inputs: check the offsets and positions on the host (two syncs) before a
    kernel reads them; pass False when they are known good (bad ones then give wrong values, never an
    access outside the tensors).
    """
    # backend=None: the dense op's defaults ("sdpa" on both devices). The triton backend has run only in
    # Triton's interpreter (no GPU yet), so it stays out of the default until its GPU tests pass and
    # benchmarks/varlen.py measures it.
    chosen = resolve_backend("rpb_attention_varlen", backend, q.device, GPU_DEFAULT_BACKEND, CPU_DEFAULT_BACKEND)
    dtypes = FLOAT_DTYPES + ((torch.float64,) if chosen != "triton" else ())
    check_tensor("q", q, ndim=3, dtypes=dtypes)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=dtypes)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)} (T, H, D), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    total, heads, head_dim = q.shape
    if q.numel() == 0:
        raise ValueError(f"q must have T, H, D >= 1, got shape {tuple(q.shape)}")
    if chosen == "triton" and head_dim > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"q must have head dim D <= {TRITON_MAX_HEAD_DIM} on the triton backend, got D={head_dim}")
    grid_size = check_grid_size(grid_size)
    check_int("num_prefix_tokens", num_prefix_tokens, minimum=0, maximum=1)
    num_positions = num_prefix_tokens + grid_size[0] * grid_size[1]
    check_tensor("bias_table", bias_table, ndim=2, dtypes=dtypes)
    expected = (bias_table_rows(tuple(grid_size), num_prefix_tokens), heads)
    if bias_table.shape[0] == expected[0] and bias_table.shape[1] != heads and q.shape[0] == bias_table.shape[1]:
        raise ValueError(f"q must be (T, H, D): its dim 1 gives H={heads}, but bias_table has "
                         f"{bias_table.shape[1]} heads, which is q's dim 0; an (H, T, D) q (and k, v) needs "
                         f".transpose(0, 1)")
    if tuple(bias_table.shape) != expected:
        raise ValueError(f"bias_table must have shape (R, H) = {expected}, got {tuple(bias_table.shape)}")
    check_tensor("positions", positions, dtypes=(torch.int64, torch.int32))
    if positions.ndim == 2 and positions.shape[1] == 2:  # (row, column) cells of images of different grids
        if positions.shape[0] != total:
            raise ValueError(f"positions must have one (row, column) per token, T = {total}, got {positions.shape[0]}")
        # Once per cells tensor (every layer of a step passes the same one), so that the backends' own
        # caches keyed on the positions (the sdpa layout, the Triton row lists) hit too.
        cells, grid = positions, tuple(grid_size)
        positions = _FLAT_POSITIONS.get((cells,), (grid, num_prefix_tokens, check_inputs),
                                        lambda: flat_positions(cells, grid, num_prefix_tokens, check=check_inputs))
    elif positions.ndim != 1:
        raise ValueError(f"positions must be (T,) positions or (T, 2) (row, column) cells, got shape "
                         f"{tuple(positions.shape)}")
    if positions.numel() != total:
        raise ValueError(f"positions must have one entry per token, T = {total}, got {positions.numel()}")
    _check_offsets_tensor(cu_seqlens)
    check_same_device(q=q, k=k, v=v, bias_table=bias_table, positions=positions, cu_seqlens=cu_seqlens)
    if scale is None:
        scale = head_dim ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    for name, flag in (("deterministic", deterministic), ("return_cls_attention", return_cls_attention),
                       ("check_inputs", check_inputs)):
        check_bool(name, flag)
    if return_cls_attention and num_prefix_tokens != 1:
        raise ValueError(f"return_cls_attention needs a prefix (CLS) token, got num_prefix_tokens={num_prefix_tokens}")

    if chosen != "sdpa":
        out, _, cls_attention = torch.ops.pss_kernels.rpb_attention_varlen_fwd(
            q, k, v, bias_table, positions, cu_seqlens, list(grid_size), num_prefix_tokens, float(scale), chosen,
            deterministic, return_cls_attention, check_inputs)
        return (out, cls_attention) if return_cls_attention else out
    if check_inputs:
        _check_packed_values(positions, cu_seqlens, num_positions, num_prefix_tokens, require_distinct=False)
    from .sdpa_varlen import rpb_attention_varlen_sdpa
    return rpb_attention_varlen_sdpa(q, k, v, bias_table, positions, cu_seqlens, grid_size, num_prefix_tokens,
                                     float(scale), return_cls_attention)


# ----------------------------------------------------------------------------- registration

def _packed_outputs(q: torch.Tensor, return_cls_attention: bool):
    """(out (T, H, D), lse (H, T), cls_attention (T,) or (0,)): the one place their layout is set."""
    total, heads, head_dim = q.shape
    out = q.new_empty(total, heads, head_dim)
    lse = q.new_empty(heads, total, dtype=torch.promote_types(q.dtype, torch.float32))
    cls_attention = q.new_empty((total,) if return_cls_attention else (0,), dtype=torch.float32)
    return out, lse, cls_attention


def _as_sequence(t: torch.Tensor) -> torch.Tensor:
    """(T, H, D) tokens as the (1, H, T, D) view the dense launchers read."""
    return t.transpose(0, 1)[None]


def _packed(cu_seqlens: torch.Tensor, num_positions: int):
    from ..rpb_attention.triton_common import PackedSequences
    # The kernels read offset b at cu_seqlens + b: a strided view must not reach them (a no-op, so the
    # same tensor and its cached work table, when contiguous).
    return PackedSequences(cu_seqlens.contiguous(), cu_seqlens.numel() - 1, num_positions)


@torch.library.custom_op("pss_kernels::rpb_attention_varlen_fwd", mutates_args=())
def _rpb_attention_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                              positions: torch.Tensor, cu_seqlens: torch.Tensor, grid_size: List[int],
                              num_prefix_tokens: int, scale: float, backend: str, deterministic: bool,
                              return_cls_attention: bool,
                              check_inputs: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_positions = num_prefix_tokens + grid_size[0] * grid_size[1]
    if check_inputs:
        _check_packed_values(positions, cu_seqlens, num_positions, num_prefix_tokens,
                             require_distinct=deterministic and backend == "triton")
    out, lse, cls_attention = _packed_outputs(q, return_cls_attention)
    cls_view = cls_attention[None] if return_cls_attention else None
    if backend == "triton":
        from ..rpb_attention.triton_forward import rpb_attention_forward
        with torch.cuda.device_of(q):
            rpb_attention_forward(_as_sequence(q), _as_sequence(k), _as_sequence(v), bias_table, positions[None],
                                  tuple(grid_size), num_prefix_tokens, scale, _as_sequence(out), lse[None], cls_view,
                                  packed=_packed(cu_seqlens, num_positions))
        return out, lse, cls_attention
    from ..rpb_attention.torch_attention import rpb_attention_forward
    for start, end in image_bounds(cu_seqlens):
        part = slice(start, end)
        rpb_attention_forward(_as_sequence(q[part]), _as_sequence(k[part]), _as_sequence(v[part]), bias_table,
                              positions[part][None], tuple(grid_size), num_prefix_tokens, scale,
                              _as_sequence(out[part]), lse[None, :, part],
                              cls_attention[None, part] if return_cls_attention else None)
    return out, lse, cls_attention


@_rpb_attention_varlen_fwd.register_fake
def _(q, k, v, bias_table, positions, cu_seqlens, grid_size, num_prefix_tokens, scale, backend, deterministic,
      return_cls_attention, check_inputs):
    return _packed_outputs(q, return_cls_attention)


@torch.library.custom_op("pss_kernels::rpb_attention_varlen_bwd", mutates_args=())
def _rpb_attention_varlen_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              bias_table: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, grid_size: List[int], num_prefix_tokens: int,
                              scale: float, backend: str, deterministic: bool,
                              bias_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v (T, H, D) and bias_table (zeros when bias_grad is False)."""
    num_positions = num_prefix_tokens + grid_size[0] * grid_size[1]
    if backend == "triton":
        from ..rpb_attention.triton_backward import rpb_attention_backward
        with torch.cuda.device_of(q):
            grads = rpb_attention_backward(_as_sequence(grad_out), _as_sequence(q), _as_sequence(k), _as_sequence(v),
                                           bias_table, positions[None], _as_sequence(out), lse[None],
                                           tuple(grid_size), num_prefix_tokens, scale, deterministic, bias_grad,
                                           packed=_packed(cu_seqlens, num_positions))
        dq, dk, dv, dtable = grads  # (1, H, T, D) views of contiguous (T, H, D): the kernels wrote them so
        return dq[0].transpose(0, 1), dk[0].transpose(0, 1), dv[0].transpose(0, 1), dtable.contiguous()
    from ..rpb_attention.torch_attention import rpb_attention_backward
    dq, dk, dv = (torch.empty_like(q, memory_format=torch.contiguous_format) for _ in range(3))
    dtable = torch.zeros(bias_table.shape, device=q.device, dtype=torch.promote_types(bias_table.dtype, torch.float32))
    for start, end in image_bounds(cu_seqlens):
        part = slice(start, end)
        grads = rpb_attention_backward(_as_sequence(grad_out[part]), _as_sequence(q[part]), _as_sequence(k[part]),
                                       _as_sequence(v[part]), bias_table, positions[part][None],
                                       _as_sequence(out[part]), lse[None, :, part], tuple(grid_size),
                                       num_prefix_tokens, scale, deterministic, bias_grad)
        for buffer, grad in zip((dq, dk, dv), grads[:3]):
            buffer[part] = grad[0].transpose(0, 1)
        dtable += grads[3]
    return dq, dk, dv, dtable.to(bias_table.dtype)


@_rpb_attention_varlen_bwd.register_fake
def _(grad_out, q, k, v, bias_table, positions, cu_seqlens, out, lse, grid_size, num_prefix_tokens, scale, backend,
      deterministic, bias_grad):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(bias_table, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, bias_table, positions, cu_seqlens, grid_size, num_prefix_tokens, scale, backend, deterministic, _, _ = \
        inputs
    out, lse, cls_attention = output
    ctx.mark_non_differentiable(lse, cls_attention)
    ctx.save_for_backward(q, k, v, bias_table, positions, cu_seqlens, out, lse)
    ctx.options = (grid_size, num_prefix_tokens, scale, backend, deterministic)


def _backward(ctx, grad_out, grad_lse, grad_cls_attention):
    q, k, v, bias_table, positions, cu_seqlens, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    bias_grad = ctx.needs_input_grad[3]
    dq, dk, dv, dtable = torch.ops.pss_kernels.rpb_attention_varlen_bwd(
        grad_out, q, k, v, bias_table, positions, cu_seqlens, out, lse, *ctx.options, bias_grad)
    return dq, dk, dv, dtable if bias_grad else None, *([None] * 9)


_rpb_attention_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- sample_patches_varlen

# backend=None's choice on every device until the fused kernels have run on a GPU.
SAMPLER_DEFAULT_BACKEND = "torch"

def _sampler_kernels(backend: str):
    # Imported on first use, as sample_patches' (triton.jit reads TRITON_INTERPRET at import).
    from ..sample_patches.op import _kernel_module
    return _kernel_module(backend)


@torch.library.custom_op(
    "pss_kernels::sample_patches_varlen", mutates_args=(),
    schema="(Tensor x, Tensor? scores, Tensor keep_counts, int total, str scorer, int num_prefix_tokens, str order, "
           "str backend) -> (Tensor, Tensor, Tensor, Tensor)")
def _sample_patches_varlen_op(x, scores, keep_counts, total, scorer, num_prefix_tokens, order, backend):
    """scorer "l1", "l2" or "given" (float32 scores); total = keep_counts.sum(). Returns (tokens (T, C),
    positions (T,) int64, cu_seqlens (B + 1,) int32, slot (B, N) int32)."""
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if backend in ("triton", "cuda"):
        with torch.cuda.device_of(x):
            return _sampler_kernels(backend).sample_patches_varlen_forward(x, scores, keep_counts.contiguous(), total,
                                                                           scorer, num_prefix_tokens, order)
    return sample_patches_varlen_torch(x, scores, keep_counts, total, scorer, num_prefix_tokens, order)


@_sample_patches_varlen_op.register_fake
def _(x, scores, keep_counts, total, scorer, num_prefix_tokens, order, backend):
    batch, num_tokens, channels = x.shape
    return (x.new_empty(total, channels), x.new_empty(total, dtype=torch.int64),
            x.new_empty(batch + 1, dtype=torch.int32), x.new_empty(batch, num_tokens, dtype=torch.int32))


@torch.library.custom_op("pss_kernels::sample_patches_varlen_backward", mutates_args=(),
                         schema="(Tensor grad_tokens, Tensor slot, str backend) -> Tensor")
def _sample_patches_varlen_backward_op(grad_tokens, slot, backend):
    """grad_x (B, N, C): grad_tokens' row slot[b, t] at token t of image b, exact zeros where slot < 0."""
    if backend in ("triton", "cuda"):
        with torch.cuda.device_of(grad_tokens):
            return _sampler_kernels(backend).sample_patches_varlen_backward(grad_tokens, slot)
    rows = grad_tokens[slot.clamp(min=0).long()]
    return torch.where((slot >= 0)[..., None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


@_sample_patches_varlen_backward_op.register_fake
def _(grad_tokens, slot, backend):
    return grad_tokens.new_empty(*slot.shape, grad_tokens.shape[1])


def _setup_sampling_context(ctx, inputs, output):
    ctx.save_for_backward(output[3])
    ctx.backend = inputs[-1]


def _sampling_backward(ctx, grad_tokens, grad_positions, grad_cu_seqlens, grad_slot):
    (slot,) = ctx.saved_tensors
    return _sample_patches_varlen_backward_op(grad_tokens, slot, ctx.backend), *([None] * 7)


_sample_patches_varlen_op.register_autograd(_sampling_backward, setup_context=_setup_sampling_context)


def _setup_sampling_backward_context(ctx, inputs, output):
    grad_tokens, slot, _ = inputs
    ctx.save_for_backward(slot)
    ctx.total = grad_tokens.shape[0]


def _sampling_double_backward(ctx, grad_grad_x):
    # The backward copies packed rows to their tokens; its adjoint gathers them back.
    (slot,) = ctx.saved_tensors
    rows = slot.flatten().long()
    kept = rows >= 0
    flat = grad_grad_x.reshape(rows.numel(), -1)
    # A packed row no token maps to (only where counts and T disagree, which the public function refuses)
    # gets zeros rather than an uninitialised index.
    grad = flat.new_zeros(ctx.total, flat.shape[1])
    grad[rows[kept]] = flat[kept]
    return grad, None, None


_sample_patches_varlen_backward_op.register_autograd(_sampling_double_backward,
                                                     setup_context=_setup_sampling_backward_context)


def _counts_readable_for_free(keep_counts: torch.Tensor) -> bool:
    """Whether total='s check of the counts can read them on the host (a ValueError naming keep_counts):
    on the CPU a read is no synchronisation with a device, but not while torch.compile traces (a read
    would break the graph). Elsewhere the check stays on the device (torch._assert_async)."""
    return keep_counts.device.type == "cpu" and not torch.compiler.is_compiling()


def sample_patches_varlen(x: torch.Tensor, keep_counts: torch.Tensor, *, scorer: str = "l1",
                          num_prefix_tokens: int = 1, order: str = "score", scores: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
                          total: Optional[int] = None):
    """sample_patches with a per-image number of kept tokens, packed: x (B, N, C), keep_counts (B,)
    integers in [num_prefix_tokens + 1, N] (prefix included, as sample_patches' k; see allocation.py
    for policies). Within each image the same tokens, order and ties as sample_patches; an image that
    keeps all N tokens keeps them in position order (sample_patches at keep_rate 1).

    Returns (tokens (T, C), positions (T,) int64, cu_seqlens (B + 1,) int32), T = keep_counts.sum();
    tokens carry x's gradient (exact zeros at dropped tokens). T sets the output shape, so by default
    one host sync reads the counts' range and sum and checks them (ValueError naming keep_counts).
    total: T when the caller knows it without reading the counts (the budget policy's round(rho B N), at
    least B (prefix + 1): allocation.static_total): no host sync, so a packed step stays on the device,
    whichever the backend (CUDA graphs, torch.compile(fullgraph=True) see one shape). The counts are
    then checked on the device (torch._assert_async: a device-side assert on a GPU, a RuntimeError under
    torch.compile on the CPU; eagerly on the CPU, where a read costs no sync, the host check's ValueError)
    and every backend clamps them, so a wrong count never reads or writes out of bounds.
    backend: "torch" (the whole batch in one stable sort, one scatter and one gather: torch_sample.py;
    the oracle, reference.py, goes image by image) | "triton" | "cuda" (one fused launch: scores, each
    image's top-k_b, the offsets' prefix sum and the copy, as sample_patches' kernels; not yet run on a
    GPU, so not the default) | None ("torch").
    """
    chosen = resolve_backend("sample_patches_varlen", backend, x.device, SAMPLER_DEFAULT_BACKEND,
                             SAMPLER_DEFAULT_BACKEND)
    dtypes = FLOAT_DTYPES + ((torch.float64,) if chosen == "torch" else ())
    check_tensor("x", x, ndim=3, dtypes=dtypes)
    batch, num_tokens, channels = x.shape
    if batch == 0 or channels == 0:
        raise ValueError(f"x must have B >= 1 images and C >= 1 channels, got shape {tuple(x.shape)}")
    check_int("num_prefix_tokens", num_prefix_tokens, minimum=0, maximum=1)
    check_choice("scorer", scorer, SCORERS)
    check_choice("order", order, ORDERS)
    check_tensor("keep_counts", keep_counts, ndim=1, dtypes=(torch.int64, torch.int32))
    if keep_counts.numel() != batch:
        raise ValueError(f"keep_counts must have one count per image, B = {batch}, got {keep_counts.numel()}")
    if scorer == "given":
        if scores is None:
            raise ValueError("scorer='given' needs scores (B, N - num_prefix_tokens)")
        check_tensor("scores", scores, ndim=2, dtypes=SCORE_DTYPES)
        if tuple(scores.shape) != (batch, num_tokens - num_prefix_tokens):
            raise ValueError(f"scores must have shape (B, N - num_prefix_tokens) = "
                             f"{(batch, num_tokens - num_prefix_tokens)}, got {tuple(scores.shape)}")
    elif scores is not None:
        raise ValueError(f"scores is only read with scorer='given', got scorer={scorer!r}")
    if generator is not None and scorer != "random":
        raise ValueError(f"generator is only used with scorer='random', got scorer={scorer!r}")
    check_same_device(x=x, keep_counts=keep_counts, scores=scores)
    bounds = f"[num_prefix_tokens + 1, N] = [{num_prefix_tokens + 1}, {num_tokens}]"

    def counts_read_on_host() -> int:
        low, high, counted = (int(v) for v in torch.stack([keep_counts.min(), keep_counts.max(),
                                                            keep_counts.long().sum()]).tolist())
        if low < num_prefix_tokens + 1 or high > num_tokens:
            raise ValueError(f"keep_counts must be in {bounds}, got min {low}, max {high}")
        return counted

    if total is None:
        total = counts_read_on_host()
    else:
        check_int("total", total, minimum=batch * (num_prefix_tokens + 1), maximum=batch * num_tokens)
        if _counts_readable_for_free(keep_counts):
            counted = counts_read_on_host()
            if counted != total:
                raise ValueError(f"keep_counts must sum to total = {total}, got {counted}")
        else:
            torch._assert_async(((keep_counts >= num_prefix_tokens + 1) & (keep_counts <= num_tokens)).all(),
                                f"keep_counts must be in {bounds}")
            torch._assert_async(keep_counts.long().sum() == total, f"keep_counts must sum to total = {total}")
    if scorer == "random":
        # The reference's draw (patch_scores): one uniform float32 per patch token of the batch.
        rng = {} if generator is None else {"generator": generator}
        scores = torch.rand((batch, num_tokens - num_prefix_tokens), device=x.device, dtype=torch.float32, **rng)
        scorer = "given"
    elif scorer == "given":
        scores = scores.float()
    tokens, positions, cu_seqlens, _ = _sample_patches_varlen_op(x, scores, keep_counts, total, scorer,
                                                                 num_prefix_tokens, order, chosen)
    return tokens, positions, cu_seqlens
