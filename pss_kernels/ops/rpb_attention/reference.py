"""Pure-PyTorch attention with a per-image relative position bias: oracle and CPU path.

Table layout (BEiT / SimMIM / timm `Beit`) for a (Gh, Gw) patch grid:
  R = (2Gh-1)(2Gw-1) (+3 with a CLS token). Two patches at (r, c), (r', c'):
  rel = ((r - r') + Gh - 1) * (2Gw - 1) + (c - c') + Gw - 1; CLS as query -> R-3,
  CLS as key -> R-2, CLS-CLS -> R-1. Full-sequence position p is CLS (p < num_prefix_tokens)
  or patch t = p - num_prefix_tokens at row t // Gw, column t % Gw.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._cache import cached_constant


def bias_table_rows(grid_size: Tuple[int, int], num_prefix_tokens: int = 1) -> int:
    grid_h, grid_w = grid_size
    return (2 * grid_h - 1) * (2 * grid_w - 1) + (3 if num_prefix_tokens else 0)


def sub_grid_table(bias_table: torch.Tensor, grid_size: Tuple[int, int], sub_grid_size: Tuple[int, int],
                   num_prefix_tokens: int = 1) -> torch.Tensor:
    """The rows of a (Gh, Gw) grid's table that a smaller (gh, gw) grid uses, in the (gh, gw) table's
    layout: each relative offset (dr, dc) with |dr| < gh, |dc| < gw, then the CLS rows. Differentiable
    (a gather): images of different grids sharing the largest grid's table see these biases."""
    grid_h, grid_w = grid_size
    sub_h, sub_w = sub_grid_size
    if not (1 <= sub_h <= grid_h and 1 <= sub_w <= grid_w):
        raise ValueError(f"sub_grid_size must fit in grid_size {tuple(grid_size)}, got {tuple(sub_grid_size)}")
    rows = torch.arange(-(sub_h - 1), sub_h, device=bias_table.device)
    cols = torch.arange(-(sub_w - 1), sub_w, device=bias_table.device)
    index = ((rows[:, None] + grid_h - 1) * (2 * grid_w - 1) + cols[None, :] + grid_w - 1).flatten()
    if num_prefix_tokens:
        total = bias_table_rows(grid_size, num_prefix_tokens)
        index = torch.cat([index, torch.arange(total - 3, total, device=bias_table.device)])
    return bias_table[index]


def relative_index(pos_q: torch.Tensor, pos_k: torch.Tensor, grid_size: Tuple[int, int],
                   num_prefix_tokens: int = 1) -> torch.Tensor:
    """Table row of each (query position, key position) pair; broadcasts like `pos_q - pos_k`."""
    grid_h, grid_w = grid_size
    tq, tk = pos_q - num_prefix_tokens, pos_k - num_prefix_tokens
    rel = ((tq // grid_w - tk // grid_w) + grid_h - 1) * (2 * grid_w - 1) + (tq % grid_w - tk % grid_w) + grid_w - 1
    if num_prefix_tokens:
        num_rows = bias_table_rows(grid_size, num_prefix_tokens)
        q_cls, k_cls = tq < 0, tk < 0
        rel = torch.where(q_cls & k_cls, num_rows - 1,
                          torch.where(q_cls, num_rows - 3, torch.where(k_cls, num_rows - 2, rel)))
    return rel


def full_relative_index(grid_size: Tuple[int, int], num_prefix_tokens: int, device: torch.device) -> torch.Tensor:
    """The (N, N) table rows of all pairs of the N = num_prefix_tokens + Gh*Gw positions: the
    `relative_position_index` buffer BEiT / timm keep per layer.

    Cached per grid, prefix and device (see cached_constant: also under CUDA graph capture)."""
    device = torch.device(device)
    key = (tuple(grid_size), num_prefix_tokens, device)
    return cached_constant(_FULL_RELATIVE_INDEX, key, device, lambda: _full_relative_index(*key))


_FULL_RELATIVE_INDEX: dict = {}


def _full_relative_index(grid_size: Tuple[int, int], num_prefix_tokens: int, device: torch.device) -> torch.Tensor:
    positions = torch.arange(num_prefix_tokens + grid_size[0] * grid_size[1], device=device)
    return relative_index(positions[:, None], positions[None, :], grid_size, num_prefix_tokens)


def gather_bias(bias_table: torch.Tensor, index: Optional[torch.Tensor], grid_size: Tuple[int, int],
                num_prefix_tokens: int = 1) -> torch.Tensor:
    """The dense per-image bias (B or 1, H, n, n) — what the published code materialises."""
    if index is None:
        num_tokens = num_prefix_tokens + grid_size[0] * grid_size[1]
        index = torch.arange(num_tokens, device=bias_table.device)[None]
    rel = relative_index(index[:, :, None], index[:, None, :], grid_size, num_prefix_tokens)
    return bias_table[rel].permute(0, 3, 1, 2)  # (B, n, n, H) -> (B, H, n, n)


def rpb_attention_logits(q: torch.Tensor, k: torch.Tensor, bias_table: torch.Tensor,
                         index: Optional[torch.Tensor], grid_size: Tuple[int, int], num_prefix_tokens: int,
                         scale: float) -> torch.Tensor:
    """q k^T * scale + bias, (B, H, n, n), in float32 (float64 for float64 inputs, so gradcheck works)."""
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    bias = gather_bias(bias_table.to(compute_dtype), index, grid_size, num_prefix_tokens)
    return torch.matmul(q.to(compute_dtype), k.to(compute_dtype).transpose(-1, -2)) * scale + bias


def rpb_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                            index: Optional[torch.Tensor] = None, *, grid_size: Tuple[int, int],
                            num_prefix_tokens: int = 1, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v in float32 (float64 for float64 inputs), returned in q's dtype.
    q, k, v: (B, H, n, D)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = rpb_attention_logits(q, k, bias_table, index, grid_size, num_prefix_tokens, scale)
    return torch.matmul(logits.softmax(-1), v.to(logits.dtype)).to(q.dtype)
