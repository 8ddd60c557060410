"""Triton forward of rpb_attention: flash attention with the relative position bias gathered in-kernel.

For one (image b, head h) and a block of BLOCK_M queries, loop over key blocks of BLOCK_N
(online softmax, Dao et al. FlashAttention-2, in base 2):

    s_ij = (q_i . k_j * scale + bias_table[rel(pos_i, pos_j), h]) * log2(e)
    m_i  <- max(m_i, max_j s_ij);   l_i <- l_i * 2^(m_old - m_i) + sum_j 2^(s_ij - m_i)
    acc_i <- acc_i * 2^(m_old - m_i) + sum_j 2^(s_ij - m_i) v_j
    out_i = acc_i / l_i;            lse_i = (m_i + log2 l_i) / log2(e)   (natural log, saved for backward)

pos comes from `index` (HAS_INDEX) or is the token number itself (index=None, no load); the
bias is gathered from a head-major (H, R) copy of the table, so no (B, H, n, n) tensor exists.
The grid is flat: the query blocks of one (b, h) are neighbouring programs (split_program_id).

Optional CLS attention: _cls_row_kernel, one program per (b, h), recomputes softmax row 0 from the
saved lse, p_0j = 2^(s_0j - lse_0 log2 e), into cls_probs (B, H, n); the launcher averages over
heads (a fixed-order reduction, deterministic). A kernel of its own rather than a second pass of
the forward's first query block: that pass kept q and the tiles of both loops alive, and the
forward with it spilled on sm_90 with Triton 3.6 (72 bytes at (128, 64, 8)).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_common import (LOG2E, PackedSequences, bias_tile_log2, biased_logits_log2, dot_precision,
                            head_major_table, head_strides, load_rows, packed_work_table, program_sequence,
                            sequence_slice, tile_config, token_coordinates)


@triton.jit
def _rpb_attention_fwd_kernel(
        Q, K, V, TABLE, INDEX, OUT, LSE, WORK, CU_SEQLENS,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        stride_table_row, stride_table_head, stride_index_b, stride_index_n,
        num_heads, num_tokens, head_dim, grid_h, grid_w, qk_scale_log2, num_work,
        HAS_INDEX: tl.constexpr, NUM_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    batch, head, block_m, start, length, row_base = program_sequence(
        WORK, CU_SEQLENS, num_work, tl.cdiv(num_tokens, BLOCK_M), num_heads, num_tokens, VARLEN)
    q_base = sequence_slice(Q, batch, head, start, stride_qb, stride_qh, stride_qn)
    k_base = sequence_slice(K, batch, head, start, stride_kb, stride_kh, stride_kn)
    v_base = sequence_slice(V, batch, head, start, stride_vb, stride_vh, stride_vn)
    index_base = INDEX + start.to(tl.int64) * stride_index_n
    table_h = TABLE + head * stride_table_head

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_m = offs_m < length
    mask_d = offs_d < head_dim
    q = load_rows(q_base, offs_m, mask_m, stride_qn, offs_d, mask_d, stride_qd)
    coord_q, prefix_q = token_coordinates(index_base, stride_index_b, stride_index_n, batch, offs_m,
        length, grid_h, grid_w, HAS_INDEX, NUM_PREFIX)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for start_n in range(0, length, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < length
        k = load_rows(k_base, offs_n, mask_n, stride_kn, offs_d, mask_d, stride_kd)
        v = load_rows(v_base, offs_n, mask_n, stride_vn, offs_d, mask_d, stride_vd)
        coord_k, prefix_k = token_coordinates(index_base, stride_index_b, stride_index_n, batch, offs_n,
            length, grid_h, grid_w, HAS_INDEX, NUM_PREFIX)
        bias_log2, _ = bias_tile_log2(coord_q, prefix_q, coord_k, prefix_k, mask_n, table_h, stride_table_row,
                                      grid_h, grid_w, NUM_PREFIX)
        logits = biased_logits_log2(q, k, bias_log2, mask_n, qk_scale_log2, DOT_PRECISION)
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        probs = tl.exp2(logits - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    out = acc / row_sum[:, None]
    o_base = sequence_slice(OUT, batch, head, start, stride_ob, stride_oh, stride_on)
    tl.store(o_base + offs_m.to(tl.int64)[:, None] * stride_on + offs_d[None, :] * stride_od,
             out.to(OUT.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    lse_log2 = row_max + tl.log2(row_sum)
    tl.store(LSE + row_base + offs_m, lse_log2 / LOG2E, mask=mask_m)


@triton.jit
def _cls_row_kernel(
        Q, K, TABLE, INDEX, LSE, CLS_PROBS, CU_SEQLENS,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_table_row, stride_table_head, stride_index_b, stride_index_n,
        num_heads, num_tokens, head_dim, grid_h, grid_w, qk_scale_log2,
        HAS_INDEX: tl.constexpr, NUM_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
        BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """CLS_PROBS[b, h, j] = softmax row 0 of (b, h) ((H, T) rows when packed: an image's row 0 is its
    first token); query rows 1..15 pad the tile to tl.dot's 16 rows."""
    batch_head = tl.program_id(0)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    if VARLEN:
        start = tl.load(CU_SEQLENS + batch)
        length = tl.load(CU_SEQLENS + batch + 1) - start
        row_base = head.to(tl.int64) * num_tokens + start
    else:
        start = tl.zeros([], tl.int32)
        length = num_tokens
        row_base = batch_head.to(tl.int64) * num_tokens
    k_base = sequence_slice(K, batch, head, start, stride_kb, stride_kh, stride_kn)
    index_base = INDEX + start.to(tl.int64) * stride_index_n
    table_h = TABLE + head * stride_table_head
    offs_m = tl.arange(0, 16)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_m = offs_m < 1
    mask_d = offs_d < head_dim
    q = load_rows(sequence_slice(Q, batch, head, start, stride_qb, stride_qh, stride_qn), offs_m, mask_m, stride_qn,
                  offs_d, mask_d, stride_qd)
    coord_q, prefix_q = token_coordinates(index_base, stride_index_b, stride_index_n, batch, offs_m, 1, grid_h,
                                          grid_w, HAS_INDEX, NUM_PREFIX)
    lse_log2 = tl.load(LSE + row_base + offs_m, mask=mask_m, other=float("inf")) * LOG2E
    cls_base = CLS_PROBS + row_base
    for start_n in range(0, length, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < length
        k = load_rows(k_base, offs_n, mask_n, stride_kn, offs_d, mask_d, stride_kd)
        coord_k, prefix_k = token_coordinates(index_base, stride_index_b, stride_index_n, batch, offs_n,
                                              length, grid_h, grid_w, HAS_INDEX, NUM_PREFIX)
        bias_log2, _ = bias_tile_log2(coord_q, prefix_q, coord_k, prefix_k, mask_n, table_h, stride_table_row,
                                      grid_h, grid_w, NUM_PREFIX)
        probs = tl.exp2(biased_logits_log2(q, k, bias_log2, mask_n, qk_scale_log2, DOT_PRECISION) - lse_log2[:, None])
        tl.store(cls_base + offs_n, tl.sum(probs, axis=0), mask=mask_n)  # rows 1..15 have P = 0


def rpb_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                          index: Optional[torch.Tensor], grid_size: Tuple[int, int], num_prefix_tokens: int,
                          scale: float, out: torch.Tensor, lse: torch.Tensor,
                          cls_attention: Optional[torch.Tensor], packed: Optional[PackedSequences] = None) -> None:
    """Fill out (B, H, n, D, any strides), lse (B, H, n) float32 and, if given, cls_attention (B, n) float32.

    q, k, v: (B, H, n, D) with any strides; bias_table: (R, H) any strides and float dtype;
    index: (B, n) int32/int64 any strides, or None.
    packed: the images of (1, H, T, D) views of packed (T, H, D) tokens (ops/varlen): index (1, T) holds
    the positions, lse is (1, H, T), cls_attention (1, T) (each image's CLS row over its own tokens).
    """
    batch, heads, num_tokens, head_dim = q.shape
    config = tile_config("forward", packed.mean_tokens(num_tokens) if packed else num_tokens, head_dim, q.dtype)
    table = head_major_table(bias_table)
    index_arg = index if index is not None else lse  # never read: HAS_INDEX is False
    index_strides = (0 if packed else index.stride(0), index.stride(1)) if index is not None else (0, 0)
    geometry = dict(HAS_INDEX=index is not None, NUM_PREFIX=num_prefix_tokens, DOT_PRECISION=dot_precision(q.dtype),
                    VARLEN=packed is not None, HEAD_DIM_PAD=config.head_dim_pad)
    qk_scale_log2 = scale * LOG2E.value
    if packed:
        work = packed_work_table(packed, num_tokens, config.block_m)
        programs, cu_seqlens = work.shape[1] * heads, packed.cu_seqlens
    else:  # work and cu_seqlens are never read
        work, programs, cu_seqlens = lse, batch * heads * triton.cdiv(num_tokens, config.block_m), lse
    strides = (*head_strides(q, bool(packed)), *head_strides(k, bool(packed)))
    _rpb_attention_fwd_kernel[(programs,)](
        q, k, v, table, index_arg, out, lse, work, cu_seqlens,
        *strides, *head_strides(v, bool(packed)), *head_strides(out, bool(packed)),
        table.stride(1), table.stride(0), *index_strides,
        heads, num_tokens, head_dim, grid_size[0], grid_size[1], qk_scale_log2, work.shape[-1] if packed else 0,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages,
        **geometry)
    if cls_attention is not None:
        cls_probs = torch.empty(batch, heads, num_tokens, device=q.device, dtype=torch.float32)
        images = packed.num_images if packed else batch
        row_tokens = min(num_tokens, packed.max_tokens) if packed else num_tokens
        _cls_row_kernel[(images * heads,)](
            q, k, table, index_arg, lse, cls_probs, cu_seqlens, *strides,
            table.stride(1), table.stride(0), *index_strides,
            heads, num_tokens, head_dim, grid_size[0], grid_size[1], qk_scale_log2,
            BLOCK_N=min(64, max(16, triton.next_power_of_2(row_tokens))), num_warps=4, num_stages=2, **geometry)
        torch.mean(cls_probs, dim=1, out=cls_attention)
