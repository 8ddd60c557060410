"""The packed ops' entry points: argument checks (host side, each error naming the argument) and the
backends. Both backends run image by image on the dense op ("torch": the float32 oracle; "sdpa": the
dense default's construction), with every gradient; the fused varlen Triton kernel is future work."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..._backends import resolve_backend
from ..._checks import (FLOAT_DTYPES, check_bool, check_choice, check_grid_size, check_int, check_same_device,
                        check_tensor)
from ..rpb_attention.op import CPU_DEFAULT_BACKEND, GPU_DEFAULT_BACKEND, rpb_attention
from ..rpb_attention.reference import bias_table_rows
from ..sample_patches.reference import ORDERS, SCORERS
from .reference import image_bounds, sample_patches_varlen_reference


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, *, min_length: int = 1,
                     max_length: Optional[int] = None) -> None:
    """(B + 1,) int32 offsets starting at 0, increasing by min_length .. max_length per image, ending
    at `total` (read on the host: one synchronisation)."""
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold B + 1 >= 2 offsets, got {cu_seqlens.numel()}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    if offsets[-1] != total:
        raise ValueError(f"cu_seqlens must end at the number of tokens T = {total}, got {offsets[-1]}")
    lengths = [end - start for start, end in zip(offsets[:-1], offsets[1:])]
    short = [n for n in lengths if n < min_length]
    if short:
        raise ValueError(f"cu_seqlens must increase by at least {min_length} per image (the prefix and one "
                         f"patch), got image lengths {lengths}")
    if max_length is not None and max(lengths) > max_length:
        raise ValueError(f"cu_seqlens gives an image of {max(lengths)} tokens, more than the N = {max_length} "
                         f"positions of the grid")


def rpb_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                         positions: torch.Tensor, cu_seqlens: torch.Tensor, *, grid_size: Sequence[int],
                         num_prefix_tokens: int = 1, scale: Optional[float] = None, backend: Optional[str] = None,
                         deterministic: bool = False, return_cls_attention: bool = False):
    """rpb_attention on packed images: q, k, v (T, H, D), the tokens of all images concatenated;
    `cu_seqlens` (B + 1,) int32 offsets; `positions` (T,) each token's position in the N =
    num_prefix_tokens + Gh*Gw positions of its image. Attention stays inside each image; the bias is
    gathered from the positions as rpb_attention gathers it from `index`; gradients to q, k, v and
    bias_table. Each image must start with its prefix token (position 0) when num_prefix_tokens = 1.

    Returns out (T, H, D) in q's dtype, or (out, cls_attention (T,) float32) with return_cls_attention:
    the head-averaged attention of each image's CLS query to its tokens.

    backend: "torch" | "sdpa" | None (rpb_attention's default for the device); both run each image
    through the dense rpb_attention. deterministic: as rpb_attention's.
    """
    chosen = resolve_backend("rpb_attention_varlen", backend, q.device, GPU_DEFAULT_BACKEND, CPU_DEFAULT_BACKEND)
    dtypes = FLOAT_DTYPES + (torch.float64,)
    check_tensor("q", q, ndim=3, dtypes=dtypes)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtypes=dtypes)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)} (T, H, D), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    total, heads, _ = q.shape
    grid_size = check_grid_size(grid_size)
    check_int("num_prefix_tokens", num_prefix_tokens, minimum=0, maximum=1)
    num_positions = num_prefix_tokens + grid_size[0] * grid_size[1]
    check_tensor("bias_table", bias_table, ndim=2, dtypes=dtypes)
    expected = (bias_table_rows(tuple(grid_size), num_prefix_tokens), heads)
    if tuple(bias_table.shape) != expected:
        raise ValueError(f"bias_table must have shape (R, H) = {expected}, got {tuple(bias_table.shape)}")
    check_tensor("positions", positions, ndim=1, dtypes=(torch.int64, torch.int32))
    if positions.numel() != total:
        raise ValueError(f"positions must have one entry per token, T = {total}, got {positions.numel()}")
    check_same_device(q=q, k=k, v=v, bias_table=bias_table, positions=positions, cu_seqlens=cu_seqlens)
    for name, flag in (("deterministic", deterministic), ("return_cls_attention", return_cls_attention)):
        check_bool(name, flag)
    if return_cls_attention and num_prefix_tokens != 1:
        raise ValueError(f"return_cls_attention needs a prefix (CLS) token, got num_prefix_tokens={num_prefix_tokens}")
    check_cu_seqlens(cu_seqlens, total, min_length=num_prefix_tokens + 1, max_length=num_positions)
    low, high = (int(v) for v in torch.stack([positions.min(), positions.max()]).tolist())
    if low < 0 or high >= num_positions:
        raise ValueError(f"positions must be in [0, {num_positions}) (num_prefix_tokens + Gh*Gw), got min {low}, "
                         f"max {high}")
    bounds = image_bounds(cu_seqlens)
    if num_prefix_tokens:
        starts = positions[cu_seqlens[:-1].long()]
        if bool((starts != 0).any()):
            raise ValueError("positions: each image must start with its prefix token (position 0) at "
                             "cu_seqlens[b]")
    outs, cls = [], []
    for start, end in bounds:
        qb, kb, vb = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        result = rpb_attention(qb, kb, vb, bias_table, positions[start:end][None], grid_size=grid_size,
                               num_prefix_tokens=num_prefix_tokens, scale=scale, backend=chosen,
                               deterministic=deterministic, return_cls_attention=return_cls_attention,
                               check_index=False)
        out = result[0] if return_cls_attention else result
        outs.append(out[0].transpose(0, 1))
        if return_cls_attention:
            cls.append(result[1][0])
    out = torch.cat(outs)
    return (out, torch.cat(cls)) if return_cls_attention else out


def sample_patches_varlen(x: torch.Tensor, keep_counts: torch.Tensor, *, scorer: str = "l1",
                          num_prefix_tokens: int = 1, order: str = "score", scores: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None, backend: Optional[str] = None):
    """sample_patches with a per-image number of kept tokens, packed: x (B, N, C), keep_counts (B,)
    integers in [num_prefix_tokens + 1, N] (prefix included, as sample_patches' k; see allocation.py
    for policies). Within each image the same tokens, order and ties as sample_patches.

    Returns (tokens (T, C), positions (T,) int64, cu_seqlens (B + 1,) int32), T = keep_counts.sum();
    tokens carry x's gradient. backend: "torch" | None (the only backend for now).
    """
    resolve_backend("sample_patches_varlen", backend, x.device, "torch", "torch")
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,))
    batch, num_tokens, _ = x.shape
    check_int("num_prefix_tokens", num_prefix_tokens, minimum=0, maximum=1)
    check_choice("scorer", scorer, SCORERS)
    check_choice("order", order, ORDERS)
    check_tensor("keep_counts", keep_counts, ndim=1, dtypes=(torch.int64, torch.int32))
    if keep_counts.numel() != batch:
        raise ValueError(f"keep_counts must have one count per image, B = {batch}, got {keep_counts.numel()}")
    low, high = (int(v) for v in torch.stack([keep_counts.min(), keep_counts.max()]).tolist())
    if low < num_prefix_tokens + 1 or high > num_tokens:
        raise ValueError(f"keep_counts must be in [num_prefix_tokens + 1, N] = [{num_prefix_tokens + 1}, "
                         f"{num_tokens}], got min {low}, max {high}")
    if scorer == "given":
        if scores is None:
            raise ValueError("scorer='given' needs scores (B, N - num_prefix_tokens)")
        check_tensor("scores", scores, ndim=2, dtypes=None)
        if tuple(scores.shape) != (batch, num_tokens - num_prefix_tokens):
            raise ValueError(f"scores must have shape (B, N - num_prefix_tokens) = "
                             f"{(batch, num_tokens - num_prefix_tokens)}, got {tuple(scores.shape)}")
    elif scores is not None:
        raise ValueError(f"scores is only read with scorer='given', got scorer={scorer!r}")
    check_same_device(x=x, keep_counts=keep_counts, scores=scores)
    return sample_patches_varlen_reference(x, keep_counts, scorer=scorer, num_prefix_tokens=num_prefix_tokens,
                                           order=order, scores=scores, generator=generator)
