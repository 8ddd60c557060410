"""Triton forward of rpb_attention: flash attention with the relative position bias gathered in-kernel.

For one (image b, head h) and a block of BLOCK_M queries, loop over key blocks of BLOCK_N
(online softmax, Dao et al. FlashAttention-2, in base 2):

    s_ij = (q_i . k_j * scale + bias_table[rel(pos_i, pos_j), h]) * log2(e)
    m_i  <- max(m_i, max_j s_ij);   l_i <- l_i * 2^(m_old - m_i) + sum_j 2^(s_ij - m_i)
    acc_i <- acc_i * 2^(m_old - m_i) + sum_j 2^(s_ij - m_i) v_j
    out_i = acc_i / l_i;            lse_i = (m_i + log2 l_i) / log2(e)   (natural log, saved for backward)

pos comes from `index` (HAS_INDEX) or is the token number itself (index=None, no load); the
bias is read from the (R, H) table through its strides, so no (B, H, n, n) tensor exists.

Optional (RETURN_CLS): the programs holding query 0 make a second pass over the keys once
its final lse is known and write softmax row 0, p_0j = 2^(s_0j - lse_0 log2 e), per head to
cls_probs (B, H, n); the launcher averages over heads (a fixed-order reduction, deterministic).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_common import (LOG2E, biased_logits_log2, dot_precision, head_slice, head_strides, load_rows,
                            tile_config, token_coordinates)


@triton.jit
def _rpb_attention_fwd_kernel(
        Q, K, V, TABLE, INDEX, OUT, LSE, CLS_PROBS,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_table_row, stride_table_head, stride_index_b, stride_index_n,
        num_heads, num_tokens, head_dim, grid_h, grid_w, qk_scale_log2,
        HAS_INDEX: tl.constexpr, NUM_PREFIX: tl.constexpr, RETURN_CLS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr):
    batch_head = tl.program_id(0)
    block_m = tl.program_id(1)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    q_base = head_slice(Q, batch, head, stride_qb, stride_qh)
    k_base = head_slice(K, batch, head, stride_kb, stride_kh)
    v_base = head_slice(V, batch, head, stride_vb, stride_vh)
    table_h = TABLE + head * stride_table_head

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_m = offs_m < num_tokens
    mask_d = offs_d < head_dim
    q = load_rows(q_base, offs_m, mask_m, stride_qn, offs_d, mask_d, stride_qd)
    coord_q, prefix_q = token_coordinates(INDEX, stride_index_b, stride_index_n, batch, offs_m,
        num_tokens, grid_h, grid_w, HAS_INDEX, NUM_PREFIX)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for start_n in range(0, num_tokens, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < num_tokens
        k = load_rows(k_base, offs_n, mask_n, stride_kn, offs_d, mask_d, stride_kd)
        v = load_rows(v_base, offs_n, mask_n, stride_vn, offs_d, mask_d, stride_vd)
        coord_k, prefix_k = token_coordinates(INDEX, stride_index_b, stride_index_n, batch, offs_n,
            num_tokens, grid_h, grid_w, HAS_INDEX, NUM_PREFIX)
        logits, _ = biased_logits_log2(q, k, coord_q, prefix_q, coord_k, prefix_k, mask_n, table_h,
                                       stride_table_row, grid_h, grid_w, qk_scale_log2, NUM_PREFIX, DOT_PRECISION)
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        probs = tl.exp2(logits - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    out = acc / row_sum[:, None]
    o_base = head_slice(OUT, batch, head, stride_ob, stride_oh)
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, out.to(OUT.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    lse_log2 = row_max + tl.log2(row_sum)
    tl.store(LSE + batch_head.to(tl.int64) * num_tokens + offs_m, lse_log2 / LOG2E, mask=mask_m)

    if RETURN_CLS:
        if block_m == 0:
            cls_base = CLS_PROBS + batch_head.to(tl.int64) * num_tokens
            for start_n in range(0, num_tokens, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                mask_n = offs_n < num_tokens
                k = load_rows(k_base, offs_n, mask_n, stride_kn, offs_d, mask_d, stride_kd)
                coord_k, prefix_k = token_coordinates(INDEX, stride_index_b, stride_index_n, batch, offs_n,
                    num_tokens, grid_h, grid_w, HAS_INDEX, NUM_PREFIX)
                logits, _ = biased_logits_log2(q, k, coord_q, prefix_q, coord_k, prefix_k, mask_n, table_h,
                                               stride_table_row, grid_h, grid_w, qk_scale_log2, NUM_PREFIX,
                                               DOT_PRECISION)
                probs = tl.exp2(logits - lse_log2[:, None])
                tl.store(cls_base + offs_n, tl.sum(tl.where(offs_m[:, None] == 0, probs, 0.0), axis=0),
                         mask=mask_n)


def rpb_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                          index: Optional[torch.Tensor], grid_size: Tuple[int, int], num_prefix_tokens: int,
                          scale: float, out: torch.Tensor, lse: torch.Tensor,
                          cls_attention: Optional[torch.Tensor]) -> None:
    """Fill out (B, H, n, D, any strides), lse (B, H, n) float32 and, if given, cls_attention (B, n) float32.

    q, k, v: (B, H, n, D) with any strides; bias_table: (R, H) any strides and float dtype;
    index: (B, n) int32/int64 any strides, or None.
    """
    batch, heads, num_tokens, head_dim = q.shape
    config = tile_config("forward", num_tokens, head_dim, q.dtype)
    cls_probs = (torch.empty(batch, heads, num_tokens, device=q.device, dtype=torch.float32)
                 if cls_attention is not None else lse)  # lse stands in for an unused pointer
    index_arg = index if index is not None else lse
    grid = (batch * heads, triton.cdiv(num_tokens, config.block_m))
    _rpb_attention_fwd_kernel[grid](
        q, k, v, bias_table, index_arg, out, lse, cls_probs,
        *head_strides(q), *head_strides(k), *head_strides(v), *head_strides(out),
        bias_table.stride(0), bias_table.stride(1),
        index.stride(0) if index is not None else 0, index.stride(1) if index is not None else 0,
        heads, num_tokens, head_dim, grid_size[0], grid_size[1], scale * LOG2E.value,
        HAS_INDEX=index is not None, NUM_PREFIX=num_prefix_tokens, RETURN_CLS=cls_attention is not None,
        DOT_PRECISION=dot_precision(q.dtype), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        HEAD_DIM_PAD=config.head_dim_pad, num_warps=config.num_warps, num_stages=config.num_stages)
    if cls_attention is not None:
        torch.mean(cls_probs, dim=1, out=cls_attention)
