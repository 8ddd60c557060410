"""The "sdpa" backend of rpb_attention_varlen: the packed images padded into one dense batch.

    L        = the longest image's length (read from the offsets: one host sync per step, since the
               layout below is built once for the offsets and positions every layer shares)
    q, k, v  (T, H, D) -> (B, H, L, D), image b's tokens in rows 0 .. n_b - 1, zeros after
    bias     = the dense sdpa backend's gather of the table at the padded positions, (B, H, L, L),
               with -inf at the padding keys: their table rows point at one row of -inf appended to
               the table, so the gather masks them (no mask pass, and the bias keeps the aligned
               storage gather_bias gives SDPA)
    out      = softmax(q k^T * scale + bias) v through rpb_attention's sdpa path (SDPA's
               memory-efficient kernel on CUDA), then the valid rows packed back, (T, H, D)

One call for all images instead of one per image: what PyTorch's own kernels can do without a
varlen bias kernel. It pays for the padding: B L^2 bias entries against sum n_b^2, so images of
very different lengths waste work and memory (the fused "triton" backend pays nothing for them).
Padding query rows attend the valid keys and their outputs are dropped, so no gradient comes back
from them; padding keys get probability 0, so neither do they. The table gradient is the dense
backend's deterministic scatter.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from ..._cache import TensorKeyedCache
from ..rpb_attention.reference import bias_table_rows
from ..rpb_attention.sdpa_attention import _GatheredBias, _attend, gather_bias, table_rows
from .reference import image_ids

# The padded layout of a step's offsets and positions, built by the first layer, reused by the others
# (and their backward): one host sync and one gather of table rows a step instead of one a layer. Two
# entries (a training step and an evaluation's, say) hold at most two (B, L, L) int64 row maps.
_LAYOUTS = TensorKeyedCache(kept=2)


def _padded_layout(cu_seqlens: torch.Tensor, positions: torch.Tensor, total: int, grid_size: Tuple[int, int],
                   num_prefix_tokens: int, pad: bool) -> Tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """(rows (T,) int64: each packed token's row in the flattened (B, L) padded batch, valid (B, L) bool,
    L, table_index: the table rows of the padded token pairs, sdpa_attention.table_rows)."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    longest = int(lengths.max())  # the one host sync
    image = image_ids(cu_seqlens, total)
    rows = image * longest + (torch.arange(total, device=cu_seqlens.device) - starts[image])
    valid = torch.arange(longest, device=cu_seqlens.device)[None, :] < lengths[:, None]
    batch = valid.shape[0]
    index = positions.long().new_zeros(batch * longest).index_copy(0, rows, positions.long()).view(batch, longest)
    table_index = table_rows(index, grid_size, num_prefix_tokens, longest, cu_seqlens.device, pad=pad)
    # Padding keys read the row of -inf that the caller appends past the table's R rows.
    table_index[:, :, :longest].masked_fill_(~valid[:, None, :], bias_table_rows(grid_size, num_prefix_tokens))
    return rows, valid, longest, table_index


def rpb_attention_varlen_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                              positions: torch.Tensor, cu_seqlens: torch.Tensor, grid_size: Sequence[int],
                              num_prefix_tokens: int, scale: float, return_cls_attention: bool):
    """out (T, H, D) in q's dtype (and (T,) float32 CLS attention); differentiable in q, k, v, bias_table."""
    total, heads, head_dim = q.shape
    grid_size, pad = tuple(grid_size), q.device.type == "cuda"
    rows, valid, longest, table_index = _LAYOUTS.get(
        (cu_seqlens, positions), (total, grid_size, num_prefix_tokens, pad),
        lambda: _padded_layout(cu_seqlens, positions, total, grid_size, num_prefix_tokens, pad))
    batch = valid.shape[0]

    def padded(t: torch.Tensor) -> torch.Tensor:  # (T, H, D) -> (B, H, L, D), differentiable
        return t.new_zeros(batch * longest, heads, head_dim).index_copy(0, rows, t) \
            .view(batch, longest, heads, head_dim).transpose(1, 2)

    qp, kp, vp = padded(q), padded(k), padded(v)
    table = torch.cat((bias_table, bias_table.new_full((1, heads), float("-inf"))))  # + the padding keys' row
    if bias_table.requires_grad and torch.is_grad_enabled():
        bias = _GatheredBias.apply(table, table_index, longest, q.dtype)
    else:
        bias = gather_bias(table, table_index, longest, q.dtype)
    out = _attend(qp, kp, vp, bias, scale)  # (B, H, L, D)
    out = out.transpose(1, 2).reshape(batch * longest, heads, head_dim).index_select(0, rows)
    if not return_cls_attention:
        return out
    return out, _cls_attention(qp, kp, bias, scale, rows)


def _cls_attention(qp: torch.Tensor, kp: torch.Tensor, bias: torch.Tensor, scale: float,
                   rows: torch.Tensor) -> torch.Tensor:
    """(T,) float32: the head-averaged attention of each image's CLS query (row 0) to its tokens."""
    with torch.no_grad():
        logits = torch.matmul(qp[:, :, :1].float() * scale, kp.float().transpose(-1, -2)) + bias[:, :, :1].float()
        probs = logits.softmax(-1)[:, :, 0].mean(1)  # (B, L)
    return probs.reshape(-1).index_select(0, rows)

