"""Triton backward of rpb_attention (FlashAttention-2 scheme) with the bias-table gradient.

With P = softmax(S), S = q k^T * scale + bias (natural units), and dO the output gradient:

    delta_i = sum_d dO_id O_id                        (_delta_kernel, = sum_j P_ij dP_ij)
    dP = dO v^T,   dS = P * (dP - delta)              (recomputed per tile from q, k and the saved lse)
    dv = P^T dO,   dk = dS^T q * scale                (_dkdv_kernel: one program per (b, h, key block),
                                                       looping over query blocks; no atomics)
    dq = dS k * scale                                 (_dq_kernel: one program per (b, h, query block),
                                                       looping over key blocks; no atomics)
    dbias_table[r, h] = sum_{b, i, j : rel(b, i, j) = r} dS[b, h, i, j]

dbias_table is accumulated by one of the accumulators of triton_bias_grad.py (its docstring says
what each costs). _dkdv_kernel takes part in three of them (DBIAS):

- "slices": each (b, h, key block) program adds its tile with one vector `atomic_add` (relaxed)
  into the (R,) slice of its (b, h) in a float32 workspace (B*H, R); torch sums the slices over b
  (a fixed-order reduction). Only the ceil(n / BLOCK_N) programs of one (b, h) share a slice.
  With DETERMINISTIC, one program per (b, h) walks all its key blocks in order, and adds each tile
  column by column with a barrier between columns. Within one patch-key column j, distinct query
  positions give distinct table rows (and the single prefix query gives its own row R-3), so that
  column is a scatter without duplicate addresses. A prefix-key column is not: every patch query
  maps to row R-2, and same-address atomics from different warps land in an order the hardware
  picks (the interpreter, which runs them in sequence, hides this). So the R-2 entries of a tile
  are summed first with a fixed-order `tl.sum` and added as one scalar. Every slice entry then
  receives its additions in a fixed order, so dbias_table is bit-identical run to run. (The column
  updates are atomic adds rather than load + add + store only so that no compiler pass may move a
  load of column j + 1 above the barrier; their order is fixed all the same.) This needs distinct
  positions within each image (op.py checks it) and costs about BLOCK_N extra reductions per tile
  plus less parallelism: the fallback of deterministic mode when csr's workspace does not fit.
- "position-grid": each dS element is added at the cell (pos_i, pos_j) of one of C copies of the
  full-position grid (H, N, N), copy b % C (positions = index[b] or, at index=None, the token numbers).
- "csr": each dS element is stored (no atomics) into a (B, n, n, H) float32 workspace, which
  _sum_pairs_by_row_kernel then reduces by table row.
The fourth, "image-sum" (index=None), runs a kernel of its own, and _dkdv_kernel does no bias work.

All grids are flat, with the programs of one (b, h) next to each other (split_program_id); the
bias is gathered from a head-major copy of the table (head_major_table).

With a frozen table (bias_grad=False, e.g. bias_table.requires_grad is False) DBIAS="none" drops the
accumulation from the kernel: the backward then does exactly FlashAttention-2's work plus the bias
gather, which is also how benchmarks/ops.py measures what the bias gradient costs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_bias_grad import (choose_accumulator, image_sum_grid, index_row_lists, packed_row_lists, table_grad_from_grid,
                               table_grad_from_stored_ds)
from .triton_common import (LOG2E, PackedSequences, bias_tile_log2, biased_logits_log2, dot_precision,
                            head_major_table, head_strides, load_rows, packed_work_table, position_coordinates,
                            program_sequence, sequence_slice, tile_config, token_coordinates, token_positions)


@triton.jit
def _delta_kernel(OUT, DOUT, DELTA, WORK, CU_SEQLENS,
                  stride_ob, stride_oh, stride_on, stride_od,
                  stride_dob, stride_doh, stride_don, stride_dod,
                  num_heads, num_tokens, head_dim, num_work,
                  VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in float32."""
    batch, head, block_m, start, length, row_base = program_sequence(
        WORK, CU_SEQLENS, num_work, tl.cdiv(num_tokens, BLOCK_M), num_heads, num_tokens, VARLEN)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_m = offs_m < length
    mask_d = offs_d < head_dim
    out = load_rows(sequence_slice(OUT, batch, head, start, stride_ob, stride_oh, stride_on),
                    offs_m, mask_m, stride_on, offs_d, mask_d, stride_od)
    dout = load_rows(sequence_slice(DOUT, batch, head, start, stride_dob, stride_doh, stride_don),
                     offs_m, mask_m, stride_don, offs_d, mask_d, stride_dod)
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), axis=1)
    tl.store(DELTA + row_base + offs_m, delta, mask=mask_m)


@triton.jit
def _probs_and_logit_grads(q, k, v, dout, lse_log2, delta, coord_q, prefix_q, coord_k, prefix_k, key_valid,
                           table_h, stride_table_row, grid_h, grid_w, qk_scale_log2,
                           NUM_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(P, dS, rel) of a (BLOCK_M, BLOCK_N) tile, P recomputed from the saved lse (zero at padding keys)."""
    bias_log2, rel = bias_tile_log2(coord_q, prefix_q, coord_k, prefix_k, key_valid, table_h, stride_table_row,
                                    grid_h, grid_w, NUM_PREFIX)
    probs = tl.exp2(biased_logits_log2(q, k, bias_log2, key_valid, qk_scale_log2, DOT_PRECISION) - lse_log2[:, None])
    dprobs = tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION)
    return probs, probs * (dprobs - delta[:, None]), rel


@triton.jit
def _accumulate_bias_grad(SLICE, rel, logit_grads, valid, num_table_rows, BLOCK_N: tl.constexpr,
                          NUM_PREFIX: tl.constexpr, DETERMINISTIC: tl.constexpr):
    """SLICE[rel] += dS over a (BLOCK_M, BLOCK_N) tile (see the module docstring for both modes)."""
    if DETERMINISTIC:
        if NUM_PREFIX:
            # Patch query -> prefix key: the one row that repeats within a column.
            to_prefix_key = valid & (rel == num_table_rows - 2)
            prefix_key_grad = tl.sum(tl.sum(tl.where(to_prefix_key, logit_grads, 0.0), axis=1), axis=0)
            tl.atomic_add(SLICE + num_table_rows - 2, prefix_key_grad)  # a scalar: one thread adds it
            valid = valid & (rel != num_table_rows - 2)
        columns = tl.arange(0, BLOCK_N)[None, :]
        for j in range(BLOCK_N):
            in_column = columns == j
            column_grads = tl.sum(tl.where(in_column, logit_grads, 0.0), axis=1)
            column_rows = tl.sum(tl.where(in_column, rel, 0), axis=1)
            column_valid = tl.sum(tl.where(in_column & valid, 1, 0), axis=1) > 0
            tl.atomic_add(SLICE + column_rows, column_grads, mask=column_valid)
            tl.debug_barrier()  # column j lands before column j + 1 (they may share rows)
    else:
        tl.atomic_add(SLICE + rel, logit_grads, mask=valid, sem="relaxed")


@triton.jit
def _dkdv_kernel(
        Q, K, V, DOUT, LSE, DELTA, TABLE, INDEX, DK, DV, DBIAS_WORKSPACE, WORK, CU_SEQLENS,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_don, stride_dod,
        stride_table_row, stride_table_head, stride_index_b, stride_index_n,
        num_heads, num_tokens, head_dim, grid_h, grid_w, num_table_rows, qk_scale_log2, scale,
        num_grid_copies, programs_per_head, csr_width, num_work, grad_row_stride,
        HAS_INDEX: tl.constexpr, NUM_PREFIX: tl.constexpr, DBIAS: tl.constexpr, DETERMINISTIC: tl.constexpr,
        DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr):
    """Program (b*H + h) * G + g, G = programs_per_head, handles key blocks g, g + G, ... of (b, h)
    (G = 1 for the deterministic slices: one program walks all key blocks in order). Packed, the
    work entry names the first key block, and G = ceil(N / BLOCK_N) (one block) or 1 (one program per
    image: the deterministic slices).

    DBIAS_WORKSPACE by DBIAS: "slices" (B*H, R) table slices; "position-grid" the (num_grid_copies,
    H, N, N) full-position grid; "csr" the (B, w, w, H) dS store, w = csr_width (n; packed: N); "none"
    unused."""
    batch, head, first_block, start, length, row_base = program_sequence(
        WORK, CU_SEQLENS, num_work, programs_per_head, num_heads, num_tokens, VARLEN)
    num_positions = NUM_PREFIX + grid_h * grid_w
    q_base = sequence_slice(Q, batch, head, start, stride_qb, stride_qh, stride_qn)
    k_base = sequence_slice(K, batch, head, start, stride_kb, stride_kh, stride_kn)
    v_base = sequence_slice(V, batch, head, start, stride_vb, stride_vh, stride_vn)
    do_base = sequence_slice(DOUT, batch, head, start, stride_dob, stride_doh, stride_don)
    index_base = INDEX + start.to(tl.int64) * stride_index_n
    # DK and DV are contiguous (B, H, n, D), rows as lse's; packed, contiguous (T, H, D) as q, k, v come,
    # so that the op hands them back without a transposing copy: token rows grad_row_stride = H * D apart.
    if VARLEN:
        dk_base = DK + start.to(tl.int64) * grad_row_stride + head * head_dim
        dv_base = DV + start.to(tl.int64) * grad_row_stride + head * head_dim
        dkv_row_stride = grad_row_stride
    else:
        dk_base = DK + row_base * head_dim
        dv_base = DV + row_base * head_dim
        dkv_row_stride = head_dim
    table_h = TABLE + head * stride_table_head
    if DBIAS == "position-grid":
        grid_copy = (batch % num_grid_copies) * num_heads + head
        workspace = DBIAS_WORKSPACE + grid_copy.to(tl.int64) * num_positions * num_positions
    elif DBIAS == "csr":
        workspace = DBIAS_WORKSPACE + batch.to(tl.int64) * csr_width * csr_width * num_heads + head
    else:
        workspace = DBIAS_WORKSPACE + (batch * num_heads + head).to(tl.int64) * num_table_rows
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_d = offs_d < head_dim

    for start_n in range(first_block * BLOCK_N, length, programs_per_head * BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < length
        k = load_rows(k_base, offs_n, mask_n, stride_kn, offs_d, mask_d, stride_kd)
        v = load_rows(v_base, offs_n, mask_n, stride_vn, offs_d, mask_d, stride_vd)
        pos_k = token_positions(index_base, stride_index_b, stride_index_n, batch, offs_n, length, grid_h, grid_w,
                                HAS_INDEX, NUM_PREFIX)
        coord_k, prefix_k = position_coordinates(pos_k, grid_w, NUM_PREFIX)
        dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
        for start_m in range(0, length, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < length
            q = load_rows(q_base, offs_m, mask_m, stride_qn, offs_d, mask_d, stride_qd)
            dout = load_rows(do_base, offs_m, mask_m, stride_don, offs_d, mask_d, stride_dod)
            # Padding query rows load q = dO = delta = 0 and lse = +inf: P = 0, so dS = 0 and they add
            # nothing to dv (lse = 0 would give P = 2^(bias log2 e), inf * 0 = NaN for a huge bias).
            lse_log2 = tl.load(LSE + row_base + offs_m, mask=mask_m, other=float("inf")) * LOG2E
            delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
            pos_q = token_positions(index_base, stride_index_b, stride_index_n, batch, offs_m, length, grid_h, grid_w,
                                    HAS_INDEX, NUM_PREFIX)
            coord_q, prefix_q = position_coordinates(pos_q, grid_w, NUM_PREFIX)
            probs, logit_grads, rel = _probs_and_logit_grads(
                q, k, v, dout, lse_log2, delta, coord_q, prefix_q, coord_k, prefix_k, mask_n, table_h,
                stride_table_row, grid_h, grid_w, qk_scale_log2, NUM_PREFIX, DOT_PRECISION)
            dv += tl.dot(tl.trans(probs.to(dout.dtype)), dout, input_precision=DOT_PRECISION)
            dk += tl.dot(tl.trans(logit_grads.to(q.dtype)), q, input_precision=DOT_PRECISION)
            tile_mask = mask_m[:, None] & mask_n[None, :]
            if DBIAS == "position-grid":
                # Distinct positions within an image: the cells of one tile are distinct.
                tl.atomic_add(workspace + pos_q[:, None] * num_positions + pos_k[None, :], logit_grads,
                              mask=tile_mask, sem="relaxed")
            elif DBIAS == "csr":
                rows, cols = offs_m, offs_n
                if VARLEN:
                    # Packed (w = N), rows and columns clamped to the (w, w) slot: an image longer than its
                    # grid (offsets not checked, check_inputs=False) writes wrong values in its own slot,
                    # never past it (1-D clamps: a 2-D mask costs registers the tiles do not have).
                    rows = tl.minimum(offs_m, csr_width - 1)
                    cols = tl.minimum(offs_n, csr_width - 1)
                pairs = rows.to(tl.int64)[:, None] * csr_width + cols[None, :]
                tl.store(workspace + pairs * num_heads, logit_grads, mask=tile_mask)
            elif DBIAS == "slices":
                _accumulate_bias_grad(workspace, rel, logit_grads, tile_mask, num_table_rows, BLOCK_N, NUM_PREFIX,
                                      DETERMINISTIC)
        tile = offs_n.to(tl.int64)[:, None] * dkv_row_stride + offs_d[None, :]
        rows_mask = mask_n[:, None] & mask_d[None, :]
        tl.store(dk_base + tile, (dk * scale).to(DK.dtype.element_ty), mask=rows_mask)
        tl.store(dv_base + tile, dv.to(DV.dtype.element_ty), mask=rows_mask)


@triton.jit
def _dq_kernel(
        Q, K, V, DOUT, LSE, DELTA, TABLE, INDEX, DQ, WORK, CU_SEQLENS,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_don, stride_dod,
        stride_table_row, stride_table_head, stride_index_b, stride_index_n,
        num_heads, num_tokens, head_dim, grid_h, grid_w, qk_scale_log2, scale, num_work, grad_row_stride,
        HAS_INDEX: tl.constexpr, NUM_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """Program (b*H + h) * query_blocks + query block (packed: a work entry): dq = sum over key blocks of
    dS k * scale."""
    batch, head, block_m, start, length, row_base = program_sequence(
        WORK, CU_SEQLENS, num_work, tl.cdiv(num_tokens, BLOCK_M), num_heads, num_tokens, VARLEN)
    k_base = sequence_slice(K, batch, head, start, stride_kb, stride_kh, stride_kn)
    v_base = sequence_slice(V, batch, head, start, stride_vb, stride_vh, stride_vn)
    index_base = INDEX + start.to(tl.int64) * stride_index_n
    table_h = TABLE + head * stride_table_head
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_m = offs_m < length
    mask_d = offs_d < head_dim
    q = load_rows(sequence_slice(Q, batch, head, start, stride_qb, stride_qh, stride_qn),
                  offs_m, mask_m, stride_qn, offs_d, mask_d, stride_qd)
    dout = load_rows(sequence_slice(DOUT, batch, head, start, stride_dob, stride_doh, stride_don),
                     offs_m, mask_m, stride_don, offs_d, mask_d, stride_dod)
    lse_log2 = tl.load(LSE + row_base + offs_m, mask=mask_m, other=float("inf")) * LOG2E  # padding rows: P = 0
    delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
    coord_q, prefix_q = token_coordinates(index_base, stride_index_b, stride_index_n, batch, offs_m,
        length, grid_h, grid_w, HAS_INDEX, NUM_PREFIX)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for start_n in range(0, length, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < length
        k = load_rows(k_base, offs_n, mask_n, stride_kn, offs_d, mask_d, stride_kd)
        v = load_rows(v_base, offs_n, mask_n, stride_vn, offs_d, mask_d, stride_vd)
        coord_k, prefix_k = token_coordinates(index_base, stride_index_b, stride_index_n, batch, offs_n,
            length, grid_h, grid_w, HAS_INDEX, NUM_PREFIX)
        _, logit_grads, _ = _probs_and_logit_grads(
            q, k, v, dout, lse_log2, delta, coord_q, prefix_q, coord_k, prefix_k, mask_n, table_h,
            stride_table_row, grid_h, grid_w, qk_scale_log2, NUM_PREFIX, DOT_PRECISION)
        dq += tl.dot(logit_grads.to(k.dtype), k, input_precision=DOT_PRECISION)
    if VARLEN:  # contiguous (T, H, D), as _dkdv_kernel's DK
        dq_base = DQ + start.to(tl.int64) * grad_row_stride + head * head_dim
        dq_row_stride = grad_row_stride
    else:  # contiguous (B, H, n, D), rows as lse's
        dq_base = DQ + row_base * head_dim
        dq_row_stride = head_dim
    tl.store(dq_base + offs_m.to(tl.int64)[:, None] * dq_row_stride + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def rpb_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           bias_table: torch.Tensor, index: Optional[torch.Tensor], out: torch.Tensor,
                           lse: torch.Tensor, grid_size: Tuple[int, int], num_prefix_tokens: int, scale: float,
                           deterministic: bool, bias_grad: bool = True, packed: Optional[PackedSequences] = None):
    """(dq, dk, dv) contiguous (B, H, n, D) in q's dtype and dbias_table (R, H) contiguous in its dtype
    (zeros when bias_grad is False: the accumulation is skipped). Packed, dq, dk, dv are (1, H, T, D)
    views of contiguous (T, H, D) tensors (the varlen op's layout: no copy to hand them back).

    Every tensor is read through its strides; grad_out is made contiguous only when its last
    dimension is not (e.g. the stride-0 expanded view that `.sum()` hands back), for unit-stride loads.
    packed: as rpb_attention_forward's ((1, H, T, D) views, index (1, T)); the gradients are then
    (1, H, T, D), and the bias gradient's accumulator is chosen for B images of up to N tokens.
    """
    batch, heads, num_tokens, head_dim = q.shape
    num_table_rows = bias_table.shape[0]
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    if packed:  # (T, H, D) storage seen as (1, H, T, D): the packed op returns it as it is
        dq, dk, dv = (torch.empty(num_tokens, heads, head_dim, device=q.device, dtype=q.dtype).transpose(0, 1)[None]
                      for _ in range(3))
        grad_row_stride = heads * head_dim
    else:
        dq, dk, dv = (torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
        grad_row_stride = head_dim  # unused: the dense kernels index their contiguous rows by head_dim
    delta = torch.empty_like(lse)
    table = head_major_table(bias_table)
    deterministic = deterministic and bias_grad  # dq, dk, dv use no atomics: only dbias_table needs the mode
    geometry = dict(HAS_INDEX=index is not None, NUM_PREFIX=num_prefix_tokens, DOT_PRECISION=dot_precision(q.dtype),
                    VARLEN=packed is not None)
    qk_scale_log2 = scale * LOG2E.value
    num_positions = num_prefix_tokens + grid_size[0] * grid_size[1]
    # Packed: tiles for the mean image, accumulators for B images of up to N tokens.
    images, tile_tokens, image_tokens = ((packed.num_images, packed.mean_tokens(num_tokens), packed.max_tokens)
                                         if packed else (batch, num_tokens, num_tokens))
    dq_config = tile_config("dq", tile_tokens, head_dim, q.dtype)
    query_blocks = triton.cdiv(tile_tokens, dq_config.block_m)
    accumulator = None
    if bias_grad:
        dbias_config = tile_config("dbias", tile_tokens, head_dim, q.dtype)
        accumulator = choose_accumulator(images, heads, image_tokens, has_index=index is not None,
                                         deterministic=deterministic, num_positions=num_positions,
                                         query_blocks=query_blocks,
                                         key_blocks=triton.cdiv(tile_tokens, dbias_config.block_n))
    # What _dkdv_kernel itself does for the bias gradient (image-sum runs a kernel of its own).
    dkdv_bias = "none" if accumulator is None or accumulator.kind == "image-sum" else accumulator.kind
    dkdv_deterministic = deterministic and dkdv_bias == "slices"
    if dkdv_bias == "position-grid":
        workspace = torch.zeros(accumulator.count, heads, num_positions, num_positions, device=q.device,
                                dtype=torch.float32)
    elif dkdv_bias == "csr":  # every element an image's pairs reach is written: no zero fill
        workspace = torch.empty(images, image_tokens, image_tokens, heads, device=q.device, dtype=torch.float32)
    elif dkdv_bias == "slices":
        workspace = torch.zeros(images * heads, num_table_rows, device=q.device, dtype=torch.float32)
    else:
        workspace = lse  # stands in for an unused pointer
    index_arg = index if index is not None else lse  # never read: HAS_INDEX is False
    index_strides = (0 if packed else index.stride(0), index.stride(1)) if index is not None else (0, 0)
    strides = (*head_strides(q, bool(packed)), *head_strides(k, bool(packed)), *head_strides(v, bool(packed)),
               *head_strides(grad_out, bool(packed)), table.stride(1), table.stride(0), *index_strides)

    def launch(block):
        """(programs, work table, its entries, cu_seqlens) for kernels over blocks of `block` rows
        (packed: per work entry; block None: one entry per image)."""
        if packed:
            work = packed_work_table(packed, num_tokens, block)
            return work.shape[1] * heads, work, work.shape[1], packed.cu_seqlens
        return batch * heads * (triton.cdiv(num_tokens, block) if block else 1), lse, 0, lse  # lse: never read

    # Two (BLOCK_M, D) tiles: in float32 at D = 128 four warps keep 8 bytes on the stack (Triton 3.9).
    delta_warps = 8 if q.dtype == torch.float32 and dq_config.head_dim_pad >= 128 else 4
    query_launch = launch(dq_config.block_m)  # the delta and dq kernels: one program per query block
    programs, work, num_work, cu_seqlens = query_launch
    _delta_kernel[(programs,)](
        out, grad_out, delta, work, cu_seqlens, *head_strides(out, bool(packed)), *head_strides(grad_out, bool(packed)),
        heads, num_tokens, head_dim, num_work, VARLEN=packed is not None,
        BLOCK_M=dq_config.block_m, HEAD_DIM_PAD=dq_config.head_dim_pad, num_warps=delta_warps)
    # Deterministic slices: one program per (b, h) walks all its key blocks in order.
    dkdv_config = tile_config("dkdv_deterministic" if dkdv_deterministic else "dkdv", tile_tokens, head_dim,
                              q.dtype)
    if dkdv_deterministic:
        programs_per_head = 1
        programs, work, num_work, cu_seqlens = launch(None)
    else:
        # Dense: ceil(n / BLOCK_N) programs per (b, h), one key block each; packed: a work entry per key
        # block, and a stride of ceil(N / BLOCK_N) blocks ends its loop after one.
        programs_per_head = triton.cdiv(image_tokens, dkdv_config.block_n)
        programs, work, num_work, cu_seqlens = launch(dkdv_config.block_n)
    _dkdv_kernel[(programs,)](
        q, k, v, grad_out, lse, delta, table, index_arg, dk, dv, workspace, work, cu_seqlens, *strides,
        heads, num_tokens, head_dim, grid_size[0], grid_size[1], num_table_rows, qk_scale_log2, scale,
        accumulator.count if dkdv_bias == "position-grid" else 1, programs_per_head, image_tokens, num_work,
        grad_row_stride,
        DBIAS=dkdv_bias, DETERMINISTIC=dkdv_deterministic,
        BLOCK_M=dkdv_config.block_m, BLOCK_N=dkdv_config.block_n,
        HEAD_DIM_PAD=dkdv_config.head_dim_pad, num_warps=dkdv_config.num_warps,
        num_stages=dkdv_config.num_stages, **geometry)
    programs, work, num_work, cu_seqlens = query_launch
    _dq_kernel[(programs,)](
        q, k, v, grad_out, lse, delta, table, index_arg, dq, work, cu_seqlens, *strides,
        heads, num_tokens, head_dim, grid_size[0], grid_size[1], qk_scale_log2, scale, num_work, grad_row_stride,
        BLOCK_M=dq_config.block_m, BLOCK_N=dq_config.block_n, HEAD_DIM_PAD=dq_config.head_dim_pad,
        num_warps=dq_config.num_warps, num_stages=dq_config.num_stages, **geometry)
    if accumulator is None:
        return dq, dk, dv, torch.zeros_like(bias_table, memory_format=torch.contiguous_format)
    if accumulator.kind == "slices":
        dbias_table = workspace.view(images, heads, num_table_rows).sum(0).t()
    elif accumulator.kind == "csr":
        row_lists = (packed_row_lists(index[0], packed, grid_size, num_prefix_tokens) if packed else
                     index_row_lists(index, grid_size, num_prefix_tokens) if index is not None else None)
        dbias_table = table_grad_from_stored_ds(workspace, row_lists, grid_size, num_prefix_tokens, num_table_rows)
    else:
        grid = (workspace.sum(0) if accumulator.kind == "position-grid" else
                image_sum_grid(q, k, v, grad_out, lse, delta, table, grid_size, num_prefix_tokens, qk_scale_log2,
                               accumulator.count, geometry["DOT_PRECISION"]))
        dbias_table = table_grad_from_grid(grid, grid_size, num_prefix_tokens, num_table_rows)
    return dq, dk, dv, dbias_table.to(bias_table.dtype).contiguous()
