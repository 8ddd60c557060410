"""Triton kernels of `sample_patches` (score, top-k and gather fused per image) and their launchers.

Notation: x (B, N, C); P0 = num_prefix_tokens; P = N - P0 patches; k kept tokens, K' = k - P0
kept patches; slot (B, N) int32 maps every token to its row of x_kept, or -1 when dropped.

Forward, one program per image b (`_select_kernel`):

    s[p]   = sum_c |x[b, P0 + p, c]|   (l1)   or   sum_c x[b, P0 + p, c]^2   (l2)   or   scores[b, p],
             accumulated in float32 over the whole row,                       p in [0, P)
    key[p] = ordered(s[p]) * 2^32 + (2^32 - 1 - p)                              int64
    keys sorted descending (bitonic `tl.sort` in registers): rank r holds the r-th patch by
    descending score, ties to the lower position. order="spatial" re-keys the K' kept patches
    with equal scores and sorts again, which leaves them in ascending position.
    index[b, P0 + r] = P0 + pos(r),  slot[b, P0 + pos(r)] = P0 + r  for r < K',  slot = -1 beyond
    x_kept[b, j, :] = x[b, index[b, j], :]                                      (GATHER)

`ordered` is the order-preserving float -> int32 map (flip the magnitude bits of negatives),
with -0.0 folded onto +0.0 and every NaN ranked first, as `torch.sort` does; the low word
breaks ties by position. The CUDA backend uses the same key (csrc/sampling/patch_topk.cuh).

The fused program holds a (BLOCK_P, BLOCK_C) tile of rows in registers for the score and the
gather; past FUSED_MAX_PATCHES patches the tile would be too thin to read whole 32-byte sectors,
so larger images run three kernels instead: `_score_kernel` over (image, row block), the
select kernel on the float32 scores (no gather), and the wide `_copy_rows_kernel`.

Backward (`_copy_rows_kernel`, one program per (image, row block, channel block)):

    grad_x[b, t, :] = grad_kept[b, slot[b, t], :]  if slot[b, t] >= 0  else 0

which writes every row of grad_x once: no zero fill followed by a scatter.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

SCORER_IDS = {"l1": 0, "l2": 1, "given": 2}
# One fused program per image up to this many patches; beyond, score / select / gather run as three
# kernels. Compiled as the JIT compiles them for sm_90 (tests/codegen_report.py), the fused kernel
# never spills: 48 registers at 196 patches x 768 channels (8 warps), 58-64 at 576 and 1024 (16 warps),
# ~90 at 4096. What limits it is the row tile: BLOCK_C = 1024 * num_warps / BLOCK_P channels per row
# and step, 16 at 1024 patches (32 bytes of bf16, one DRAM sector), 8 at 2048 (half-sector reads).
FUSED_MAX_PATCHES = 1024
# tl.sort holds all keys of an image in registers: 8192 int64 over 16 warps is 32 registers a thread.
MAX_PATCHES = 8192


@triton.jit
def _row_scores(rows_ptr, rows, row_mask, num_channels, stride_row, stride_channel,
                SCORER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_R,) float32 sum_c |row[c]| (SCORER 0) or sum_c row[c]^2 (SCORER 1) of rows `rows`."""
    row_offsets = rows.to(tl.int64)[:, None] * stride_row
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, num_channels, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols < num_channels)[None, :]
        tile = tl.load(rows_ptr + row_offsets + cols[None, :].to(tl.int64) * stride_channel,
                       mask=mask, other=0.0).to(tl.float32)
        if SCORER == 0:
            acc += tl.sum(tl.abs(tile), axis=1)
        else:
            acc += tl.sum(tile * tile, axis=1)
    return acc


@triton.jit
def _topk_keys(scores, positions, valid):
    """int64 sort keys: descending key = descending score, ties to the lower position.

    Invalid (padding) lanes get ordered score INT32_MIN, below every real score (-inf maps
    to -2139095041), so they sort last.
    """
    bits = scores.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)  # -0.0 ties with +0.0, as in torch.sort
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    ordered = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FFFFFFF, ordered)  # NaN ranks first
    ordered = tl.where(valid, ordered, -2147483648)
    return (ordered.to(tl.int64) << 32) | (4294967295 - positions.to(tl.int64))


@triton.jit
def _key_positions(keys):
    return 4294967295 - (keys & 4294967295)


@triton.jit
def _copy_row_tile(src_ptr, dst_ptr, src_rows, dst_rows, row_mask, cols, col_mask,
                   stride_src_row, stride_src_channel, stride_dst_row):
    """dst[dst_rows, cols] = src[src_rows, cols] (dst rows contiguous in channels)."""
    mask = row_mask[:, None] & col_mask[None, :]
    cols64 = cols.to(tl.int64)[None, :]
    tile = tl.load(src_ptr + src_rows.to(tl.int64)[:, None] * stride_src_row + cols64 * stride_src_channel,
                   mask=mask)
    tl.store(dst_ptr + dst_rows.to(tl.int64)[:, None] * stride_dst_row + cols64, tile, mask=mask)


@triton.jit
def _packed_rows_before(counts_ptr, image, lowest, highest, BLOCK_B: tl.constexpr):
    """sum(counts[:image]) as int64, each count clamped to [lowest, highest] as the programs clamp their
    own: the first packed row of `image` (the prefix sum, per program)."""
    total = tl.zeros([BLOCK_B], dtype=tl.int64)
    for b0 in range(0, image, BLOCK_B):
        images = b0 + tl.arange(0, BLOCK_B)
        counts = tl.load(counts_ptr + images, mask=images < image, other=0).to(tl.int64)
        total += tl.where(images < image, tl.minimum(tl.maximum(counts, lowest), highest), 0)
    return tl.sum(total, axis=0)


@triton.jit
def _select_kernel(x_ptr, scores_ptr, x_kept_ptr, index_ptr, slot_ptr, counts_ptr, cu_seqlens_ptr,
                   num_tokens, num_channels, num_prefix, num_kept, num_rows,
                   stride_xb, stride_xn, stride_xc, stride_sb, stride_sp,
                   SCORER: tl.constexpr, SPATIAL: tl.constexpr, GATHER: tl.constexpr, VARLEN: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_PREFIX: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_B: tl.constexpr):
    """One image: scores -> sorted keys -> index (B, k) int64, slot (B, N) int32 [-> x_kept (B, k, C)].

    VARLEN (sample_patches_varlen): image b keeps counts[b] tokens, packed: its rows start at
    row0 = sum(counts[:b]) of index (T,) = positions and x_kept (T, C) = tokens, slot holds packed
    rows (row0 + j), and the program writes cu_seqlens[b + 1] = row0 + counts[b] (and cu_seqlens[0]).
    An image that keeps all its tokens keeps them in position order, as sample_patches at keep_rate 1.
    The host checks the counts; should one be out of [num_prefix + 1, N] anyway, the programs clamp it
    and write no packed row at or past num_rows (= T, what the host allocated): wrong values, never
    an access out of bounds.
    """
    image = tl.program_id(0).to(tl.int64)
    num_patches = num_tokens - num_prefix
    if VARLEN:
        num_kept = tl.minimum(tl.maximum(tl.load(counts_ptr + image).to(tl.int64), num_prefix + 1), num_tokens)
        first_row = _packed_rows_before(counts_ptr, image, num_prefix + 1, num_tokens, BLOCK_B)
        tl.store(cu_seqlens_ptr + image + 1, (first_row + num_kept).to(tl.int32))
        if image == 0:
            tl.store(cu_seqlens_ptr, 0)
        slot_base = first_row  # slot holds packed rows
    else:
        first_row = image * num_kept
        slot_base = 0  # slot holds the image's own rows
    kept_patches = num_kept - num_prefix
    x_image = x_ptr + image * stride_xb
    patch = tl.arange(0, BLOCK_P)
    is_patch = patch < num_patches

    if SCORER == 2:
        scores = tl.load(scores_ptr + image * stride_sb + patch.to(tl.int64) * stride_sp,
                         mask=is_patch, other=0.0).to(tl.float32)
    else:
        scores = _row_scores(x_image + num_prefix * stride_xn, patch, is_patch, num_channels,
                             stride_xn, stride_xc, SCORER, BLOCK_P, BLOCK_C)
    if VARLEN:  # all kept: ranked by position alone
        scores = tl.where(kept_patches >= num_patches, 0.0, scores)
    keys = tl.sort(_topk_keys(scores, patch, is_patch), descending=True)

    rank = patch  # after the sort, lane r holds the patch of rank r
    is_kept = rank < kept_patches
    slot_image = slot_ptr + image * num_tokens
    tl.store(slot_image + num_prefix + _key_positions(keys), tl.full([BLOCK_P], -1, tl.int32),
             mask=(rank >= kept_patches) & is_patch)
    if SPATIAL:
        zero_scores = tl.zeros([BLOCK_P], dtype=tl.float32)
        keys = tl.sort(_topk_keys(zero_scores, _key_positions(keys), is_kept), descending=True)
    kept_rows = num_prefix + _key_positions(keys)  # token positions, in x_kept row order
    out_rows = num_prefix + rank
    prefix = tl.arange(0, BLOCK_PREFIX)
    is_prefix = prefix < num_prefix
    written, prefix_written = is_kept, is_prefix
    if VARLEN:  # rows past what the host allocated (bad counts only) are not written; their slot is -1
        written = is_kept & (first_row + out_rows < num_rows)
        prefix_written = is_prefix & (first_row + prefix < num_rows)
    index_image = index_ptr + first_row
    tl.store(index_image + out_rows, kept_rows, mask=written)
    tl.store(slot_image + kept_rows, tl.where(written, slot_base + out_rows, -1).to(tl.int32), mask=is_kept)

    tl.store(index_image + prefix, prefix.to(tl.int64), mask=prefix_written)
    tl.store(slot_image + prefix, tl.where(prefix_written, slot_base + prefix, -1).to(tl.int32), mask=is_prefix)

    if GATHER:
        x_kept_image = x_kept_ptr + first_row * num_channels
        for c0 in range(0, num_channels, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_mask = cols < num_channels
            _copy_row_tile(x_image, x_kept_image, kept_rows, out_rows, written, cols, col_mask,
                           stride_xn, stride_xc, num_channels)
            _copy_row_tile(x_image, x_kept_image, prefix, prefix, prefix_written, cols, col_mask,
                           stride_xn, stride_xc, num_channels)


@triton.jit
def _score_kernel(x_ptr, scores_ptr, num_patches, num_channels, num_prefix,
                  stride_xb, stride_xn, stride_xc,
                  SCORER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """scores (B, P) float32 for one (image, block of BLOCK_R patches)."""
    image = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_patches
    scores = _row_scores(x_ptr + image * stride_xb + num_prefix * stride_xn, rows, row_mask,
                         num_channels, stride_xn, stride_xc, SCORER, BLOCK_R, BLOCK_C)
    tl.store(scores_ptr + image * num_patches + rows, scores, mask=row_mask)


@triton.jit
def _copy_rows_kernel(src_ptr, rows_ptr, dst_ptr, num_dst_rows, num_channels,
                      stride_sb, stride_sr, stride_sc, stride_ib, stride_ir,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dst[b, r, :] = src[b, rows[b, r], :], or 0 where rows[b, r] < 0; dst (B, R, C) contiguous."""
    image = tl.program_id(0).to(tl.int64)
    dst_rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_range = dst_rows < num_dst_rows
    col_mask = cols < num_channels
    src_rows = tl.load(rows_ptr + image * stride_ib + dst_rows.to(tl.int64) * stride_ir, mask=in_range, other=-1)
    cols64 = cols.to(tl.int64)[None, :]
    tile = tl.load(src_ptr + image * stride_sb + src_rows.to(tl.int64)[:, None] * stride_sr + cols64 * stride_sc,
                   mask=(src_rows >= 0)[:, None] & col_mask[None, :], other=0.0)
    dst = dst_ptr + image * num_dst_rows * num_channels + dst_rows.to(tl.int64)[:, None] * num_channels + cols64
    tl.store(dst, tile, mask=in_range[:, None] & col_mask[None, :])


@triton.jit
def _scatter_rows_kernel(src_ptr, rows_ptr, dst_ptr, num_src_rows, num_channels,
                         stride_sb, stride_sr, stride_sc,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dst[rows[b, r], :] = src[b, r, :] where rows[b, r] >= 0; rows (B, R) int32 packed rows, dst (T, C)
    contiguous. The packed sampler's unfused copy (slot as the row map): dropped rows are not read."""
    image = tl.program_id(0).to(tl.int64)
    src_rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    dst_rows = tl.load(rows_ptr + image * num_src_rows + src_rows, mask=src_rows < num_src_rows, other=-1)
    mask = (dst_rows >= 0)[:, None] & (cols < num_channels)[None, :]
    cols64 = cols.to(tl.int64)[None, :]
    tile = tl.load(src_ptr + image * stride_sb + src_rows.to(tl.int64)[:, None] * stride_sr + cols64 * stride_sc,
                   mask=mask)
    tl.store(dst_ptr + dst_rows.to(tl.int64)[:, None] * num_channels + cols64, tile, mask=mask)


def select_config(num_patches: int, channels: int) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, num_warps) of `_select_kernel`: a row tile of 32 elements a thread."""
    block_p = triton.next_power_of_2(num_patches)
    num_warps = 8 if block_p <= 512 else 16
    block_c = min(triton.next_power_of_2(channels), max(1, 32 * 32 * num_warps // block_p))
    return block_p, block_c, num_warps


def _copy_rows(src: torch.Tensor, rows: torch.Tensor, num_dst_rows: int) -> torch.Tensor:
    batch, _, channels = src.shape
    dst = src.new_empty(batch, num_dst_rows, channels)
    block_r, block_c = 16, min(triton.next_power_of_2(channels), 256)
    grid = (batch, triton.cdiv(num_dst_rows, block_r), triton.cdiv(channels, block_c))
    _copy_rows_kernel[grid](src, rows, dst, num_dst_rows, channels, *src.stride(), *rows.stride(),
                            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return dst


def sample_patches_forward(x: torch.Tensor, scores: Optional[torch.Tensor], num_kept: int, scorer: str,
                           num_prefix_tokens: int, order: str,
                           fused: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_kept (B, k, C), index (B, k) int64, slot (B, N) int32); x may have any strides.

    `scorer` is "l1", "l2" or "given" (float32 `scores` (B, P)); `fused=None` picks the single
    fused kernel when P <= FUSED_MAX_PATCHES.
    """
    batch, num_tokens, channels = x.shape
    num_patches = num_tokens - num_prefix_tokens
    if num_patches > MAX_PATCHES:
        raise ValueError(f"the triton backend of sample_patches handles at most {MAX_PATCHES} patch tokens "
                         f"a row, got x of shape {tuple(x.shape)} with num_prefix_tokens={num_prefix_tokens}")
    if fused is None:
        fused = num_patches <= FUSED_MAX_PATCHES
    block_p, block_c, num_warps = select_config(num_patches, channels)
    index = torch.empty(batch, num_kept, dtype=torch.int64, device=x.device)
    slot = torch.empty(batch, num_tokens, dtype=torch.int32, device=x.device)
    if scorer != "given" and not fused:
        scores = torch.empty(batch, num_patches, dtype=torch.float32, device=x.device)
        score_block_r = 32
        _score_kernel[(batch, triton.cdiv(num_patches, score_block_r))](
            x, scores, num_patches, channels, num_prefix_tokens, *x.stride(), SCORER=SCORER_IDS[scorer],
            BLOCK_R=score_block_r, BLOCK_C=min(triton.next_power_of_2(channels), 128), num_warps=4)
        scorer = "given"
    # Unused pointers point at a tensor at hand: scores for l1/l2 at x; x and x_kept without
    # GATHER at the float32 scores, so that the unfused variant compiles once for every dtype.
    if fused:
        x_rows, x_kept = x, x.new_empty(batch, num_kept, channels)
        scores = x if scores is None else scores
    else:
        x_rows = x_kept = scores
    _select_kernel[(batch,)](
        x_rows, scores, x_kept, index, slot, index, index,
        num_tokens, channels, num_prefix_tokens, num_kept, batch * num_kept, *x.stride(), *scores.stride()[:2],
        SCORER=SCORER_IDS[scorer], SPATIAL=order == "spatial", GATHER=fused, VARLEN=False,
        BLOCK_P=block_p, BLOCK_PREFIX=triton.next_power_of_2(max(1, num_prefix_tokens)), BLOCK_C=block_c,
        BLOCK_B=1, num_warps=num_warps)
    if not fused:
        x_kept = _copy_rows(x, index, num_kept)
    return x_kept, index, slot


def sample_patches_backward(grad_kept: torch.Tensor, slot: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """grad_x (B, N, C): the rows of grad_kept (any strides, e.g. stride-0 views) at their tokens, 0 elsewhere."""
    return _copy_rows(grad_kept, slot, num_tokens)


def sample_patches_varlen_forward(x: torch.Tensor, scores: Optional[torch.Tensor], keep_counts: torch.Tensor,
                                  total: int, scorer: str, num_prefix_tokens: int, order: str,
                                  fused: Optional[bool] = None
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (T, C), positions (T,) int64, cu_seqlens (B + 1,) int32, slot (B, N) int32 packed rows).

    One launch of `_select_kernel` with VARLEN: scores, each image's top keep_counts[b], its packed
    offset (the prefix sum of the counts, in the program) and the copy of its rows. Past
    FUSED_MAX_PATCHES patches, as in the dense forward, three kernels with whole-sector reads:
    `_score_kernel`, the select kernel without the copy, `_scatter_rows_kernel` with slot as the
    row map (fused=False forces that path, for tests). `total` = keep_counts.sum(), known to the caller.
    """
    batch, num_tokens, channels = x.shape
    num_patches = num_tokens - num_prefix_tokens
    if num_patches > MAX_PATCHES:
        raise ValueError(f"the triton backend of sample_patches_varlen handles at most {MAX_PATCHES} patch tokens "
                         f"a row, got x of shape {tuple(x.shape)} with num_prefix_tokens={num_prefix_tokens}")
    if fused is None:
        fused = num_patches <= FUSED_MAX_PATCHES
    if scorer != "given" and not fused:
        scores = torch.empty(batch, num_patches, dtype=torch.float32, device=x.device)
        score_block_r = 32
        _score_kernel[(batch, triton.cdiv(num_patches, score_block_r))](
            x, scores, num_patches, channels, num_prefix_tokens, *x.stride(), SCORER=SCORER_IDS[scorer],
            BLOCK_R=score_block_r, BLOCK_C=min(triton.next_power_of_2(channels), 128), num_warps=4)
        scorer = "given"
    block_p, block_c, num_warps = select_config(num_patches, channels)
    tokens = x.new_empty(total, channels)
    # Zeros: a row no count reaches (counts not summing to T, only through the raw op) holds position 0,
    # an index in bounds for the attention that reads it.
    positions = torch.zeros(total, dtype=torch.int64, device=x.device)
    cu_seqlens = torch.empty(batch + 1, dtype=torch.int32, device=x.device)
    slot = torch.empty(batch, num_tokens, dtype=torch.int32, device=x.device)
    # Unused pointers point at a tensor at hand, as in sample_patches_forward.
    if fused:
        x_rows, kept = x, tokens
        scores = x if scores is None else scores
    else:
        x_rows = kept = scores
    _select_kernel[(batch,)](
        x_rows, scores, kept, positions, slot, keep_counts, cu_seqlens,
        num_tokens, channels, num_prefix_tokens, 0, total, *x.stride(), *scores.stride()[:2],
        SCORER=SCORER_IDS[scorer], SPATIAL=order == "spatial", GATHER=fused, VARLEN=True,
        BLOCK_P=block_p, BLOCK_PREFIX=triton.next_power_of_2(max(1, num_prefix_tokens)), BLOCK_C=block_c,
        BLOCK_B=min(triton.next_power_of_2(batch), 1024), num_warps=num_warps)
    if not fused:
        block_r, block_c = 16, min(triton.next_power_of_2(channels), 256)
        _scatter_rows_kernel[(batch, triton.cdiv(num_tokens, block_r), triton.cdiv(channels, block_c))](
            x, slot, tokens, num_tokens, channels, *x.stride(), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return tokens, positions, cu_seqlens, slot


def sample_patches_varlen_backward(grad_tokens: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """grad_x (B, N, C): grad_x[b, t] = grad_tokens[slot[b, t]] (packed rows), zeros where slot < 0."""
    batch, num_tokens = slot.shape
    # Every image reads the one packed tensor: a batch stride of 0.
    return _copy_rows(grad_tokens[None].expand(batch, -1, -1), slot, num_tokens)
