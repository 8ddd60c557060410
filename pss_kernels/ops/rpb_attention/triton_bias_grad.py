"""How the Triton backward of rpb_attention accumulates the bias-table gradient

    dbias_table[r, h] = sum_{b, i, j : rel(pos[b, i], pos[b, j]) = r} dS[b, h, i, j]

without a global atomic per score element on the shared (R, H) table (the ~30x cliff of
FlexAttention's bias gradient). Every image has its own map of table rows when an `index` is given
(every step at keep rate rho < 1), one shared map at index=None. The accumulators
(PSS_KERNELS_RPB_DBIAS selects one; "auto" follows `choose_accumulator`):

- "slices" (any index): _dkdv_kernel adds each dS tile into a private (R,) slice of its (b, h) with
  one atomic per element, and torch sums the (B, H, R) slices over b. Same-row elements of one tile
  (a diagonal of the tile maps to one row) collide within a warp instruction.
- "position-grid" (any index): _dkdv_kernel adds each dS element at the cell (pos[b, i], pos[b, j])
  of a shared full-position grid G (H, N, N) float32 (one of C <= 8 copies, by image b % C). Within
  one image the cells of a tile are distinct (distinct positions), so atomics only meet across
  images; then dbias_table = the fixed-order row sum of G (_sum_grid_by_row_kernel).
- "csr" (any index; deterministic, no atomics): _dkdv_kernel stores dS with plain stores into a
  (B, n, n, H) float32 workspace, and _sum_pairs_by_row_kernel reduces it by table row along CSR
  lists of the pairs (b, i, j) of each row, built once per `index` (one sort, index_row_lists) and
  shared by every head and layer of a step. Costs 4 B*n*n*H bytes of workspace, written and read once.
- "image-sum" (index=None only): _image_sum_kernel, one program per (head, query block, key block,
  group of images), recomputes P and dS of its tile for each image of its group and sums them in
  registers, then writes G's tile once (a plain store when one group holds every image, else one
  atomic per element per group); _dkdv_kernel then does no bias-gradient work.

With a frozen table (bias_grad=False) none runs: benchmarks/ops.py's `pss-frozen-table` row is the
backward without any bias-gradient work, so pss minus it is what the accumulator costs.
"""
from __future__ import annotations

import os
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..._cache import TensorKeyedCache, cached_constant
from .reference import bias_table_rows, full_relative_index
from .triton_common import (LOG2E, bias_tile_log2, biased_logits_log2, head_slice, load_rows, tile_config,
                            token_coordinates)

DBIAS_ENV_VAR = "PSS_KERNELS_RPB_DBIAS"
DBIAS_ACCUMULATORS = ("auto", "image-sum", "position-grid", "csr", "slices")
POSITION_GRID_MAX_COPIES = 8
POSITION_GRID_MAX_BYTES = 64 * 2**20
CSR_MAX_BYTES = 2 * 2**30  # the (B, n, n, H) float32 dS workspace
# Image-sum programs aimed at: enough to fill an H100/H200 (132 SMs) a few times over; more groups
# mean more atomic adds per grid element, fewer mean less parallelism.
IMAGE_SUM_TARGET_PROGRAMS = 4 * 132
# CSR row-sum programs aimed at: each table row is cut into `splits` equal parts so that the longest
# rows (the diagonal and the prefix rows hold about B*n pairs, the mean row B*n*n/R) do not leave the
# other SMs idle at the end.
CSR_TARGET_PROGRAMS = 4 * 132
CSR_MAX_SPLITS = 64

# auto's choice as the GPU window measured it (benchmarks/ops.py, the pss-dbias-* rows against
# pss-frozen-table): has_index -> ((largest n, accumulator), ...) in ascending n; the first entry whose n
# covers the call decides. Empty: not measured on a GPU yet, and `choose_accumulator`'s rule applies.
MEASURED_AUTO: Dict[bool, Tuple[Tuple[int, str], ...]] = {}


class Accumulator(NamedTuple):
    """How one backward accumulates dbias_table: kind "slices" | "position-grid" | "csr" | "image-sum";
    copies of the position grid (position-grid), images per program (image-sum), else 0."""
    kind: str
    count: int


def choose_accumulator(batch: int, heads: int, num_tokens: int, *, has_index: bool, deterministic: bool,
                       num_positions: Optional[int] = None, query_blocks: int = 1,
                       key_blocks: int = 1) -> Accumulator:
    """The accumulator of a backward with bias gradient (PSS_KERNELS_RPB_DBIAS read at each call).

    "auto" (default): MEASURED_AUTO where it covers the call, else image-sum at index=None and the
    position grid with an index, each when one (H, N, N) grid fits in 64 MiB; else csr when its
    workspace fits in 2 GiB; else slices. deterministic=True takes an accumulator without atomics:
    image-sum with one group of images at index=None, csr with an index (whatever was asked for
    except slices, which has a deterministic mode of its own: one program per (b, h) adding tile
    columns in order), falling back to the deterministic slices when neither fits.
    num_positions: N (default n, as at index=None).
    """
    choice = os.environ.get(DBIAS_ENV_VAR, "auto") or "auto"
    if choice not in DBIAS_ACCUMULATORS:
        raise ValueError(f"{DBIAS_ENV_VAR} must be one of {DBIAS_ACCUMULATORS}, got {choice!r}")
    num_positions = num_positions or num_tokens
    one_grid = heads * num_positions * num_positions * 4
    grid_fits = one_grid <= POSITION_GRID_MAX_BYTES
    csr_fits = batch * heads * num_tokens * num_tokens * 4 <= CSR_MAX_BYTES
    if choice == "auto" and not deterministic:
        choice = _measured_choice(has_index, num_tokens) or (
            ("position-grid" if has_index else "image-sum") if grid_fits else "csr" if csr_fits else "slices")
    if has_index and choice == "image-sum":
        choice = "position-grid"  # image-sum needs the shared row map of index=None
    if deterministic:
        if choice == "slices":
            return Accumulator("slices", 0)
        if not has_index and grid_fits:
            return Accumulator("image-sum", batch)  # one group: plain stores
        return Accumulator("csr", 0) if csr_fits else Accumulator("slices", 0)
    if choice == "position-grid":
        return Accumulator("position-grid", max(1, min(batch, POSITION_GRID_MAX_COPIES,
                                                       POSITION_GRID_MAX_BYTES // one_grid)))
    if choice == "image-sum":
        tiles = heads * query_blocks * key_blocks
        groups = max(1, min(batch, IMAGE_SUM_TARGET_PROGRAMS // max(1, tiles)))
        return Accumulator("image-sum", triton.cdiv(batch, groups))
    return Accumulator(choice, 0)


def _measured_choice(has_index: bool, num_tokens: int) -> Optional[str]:
    for largest, kind in MEASURED_AUTO.get(has_index, ()):
        if num_tokens <= largest:
            return kind
    return None


@triton.jit
def _image_sum_kernel(
        Q, K, V, DOUT, LSE, DELTA, TABLE, GRID_OUT,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_dob, stride_doh, stride_don, stride_dod,
        stride_table_row, stride_table_head,
        num_images, num_heads, num_tokens, head_dim, grid_h, grid_w, qk_scale_log2, images_per_program,
        NUM_PREFIX: tl.constexpr, ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """GRID_OUT[h, i, j] (+)= sum over this program's images b of dS[b, h, i, j], for one tile.

    Program id = ((group * H + h) * query_blocks + query block) * key_blocks + key block: the
    programs of one group run together and read the same images in the same order, so each
    image's q, k, v, dO come from DRAM about once and from L2 for the other tiles."""
    query_blocks = tl.cdiv(num_tokens, BLOCK_M)
    key_blocks = tl.cdiv(num_tokens, BLOCK_N)
    pid = tl.program_id(0)
    block_n = pid % key_blocks
    block_m = (pid // key_blocks) % query_blocks
    head = (pid // (key_blocks * query_blocks)) % num_heads
    group = pid // (key_blocks * query_blocks * num_heads)

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_m = offs_m < num_tokens
    mask_n = offs_n < num_tokens
    mask_d = offs_d < head_dim
    # index=None: positions are the token numbers, the same for every image, so is the bias tile.
    coord_q, prefix_q = token_coordinates(LSE, 0, 0, 0, offs_m, num_tokens, grid_h, grid_w, False, NUM_PREFIX)
    coord_k, prefix_k = token_coordinates(LSE, 0, 0, 0, offs_n, num_tokens, grid_h, grid_w, False, NUM_PREFIX)
    bias_log2, _ = bias_tile_log2(coord_q, prefix_q, coord_k, prefix_k, mask_n, TABLE + head * stride_table_head,
                                  stride_table_row, grid_h, grid_w, NUM_PREFIX)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first = group * images_per_program
    for batch in range(first, tl.minimum(first + images_per_program, num_images)):
        q = load_rows(head_slice(Q, batch, head, stride_qb, stride_qh), offs_m, mask_m, stride_qn, offs_d, mask_d,
                      stride_qd)
        dout = load_rows(head_slice(DOUT, batch, head, stride_dob, stride_doh), offs_m, mask_m, stride_don, offs_d,
                         mask_d, stride_dod)
        k = load_rows(head_slice(K, batch, head, stride_kb, stride_kh), offs_n, mask_n, stride_kn, offs_d, mask_d,
                      stride_kd)
        v = load_rows(head_slice(V, batch, head, stride_vb, stride_vh), offs_n, mask_n, stride_vn, offs_d, mask_d,
                      stride_vd)
        row_base = (batch * num_heads + head).to(tl.int64) * num_tokens
        # Padding query rows: lse = +inf makes P = 0 there (see _dkdv_kernel).
        lse_log2 = tl.load(LSE + row_base + offs_m, mask=mask_m, other=float("inf")) * LOG2E
        delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
        probs = tl.exp2(biased_logits_log2(q, k, bias_log2, mask_n, qk_scale_log2, DOT_PRECISION) - lse_log2[:, None])
        dprobs = tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION)
        acc += probs * (dprobs - delta[:, None])

    out = GRID_OUT + head.to(tl.int64) * num_tokens * num_tokens + offs_m[:, None] * num_tokens + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out, acc, mask=mask)


@triton.jit
def _sum_grid_by_row_kernel(GRID, PAIRS, ROW_STARTS, OUT, num_pairs, num_heads,
                            BLOCK: tl.constexpr, HEADS_PAD: tl.constexpr):
    """OUT[r, h] = sum of GRID[h, p] over the pairs p of table row r, PAIRS[ROW_STARTS[r]:ROW_STARTS[r + 1]],
    in that order (one program per row): a scatter with a fixed summation order."""
    row = tl.program_id(0)
    start = tl.load(ROW_STARTS + row)
    end = tl.load(ROW_STARTS + row + 1)
    heads = tl.arange(0, HEADS_PAD)
    acc = tl.zeros([HEADS_PAD], tl.float32)
    for offset in range(start, end, BLOCK):
        lanes = offset + tl.arange(0, BLOCK)
        pairs = tl.load(PAIRS + lanes, mask=lanes < end, other=0)
        values = tl.load(GRID + heads[:, None].to(tl.int64) * num_pairs + pairs[None, :],
                         mask=(heads[:, None] < num_heads) & (lanes < end)[None, :], other=0.0)
        acc += tl.sum(values, axis=1)
    tl.store(OUT + row * num_heads + heads, acc, mask=heads < num_heads)


def image_sum_grid(q, k, v, grad_out, lse, delta, table, grid_size: Tuple[int, int], num_prefix_tokens: int,
                   qk_scale_log2: float, images_per_program: int, dot_precision: str) -> torch.Tensor:
    """G (H, n, n) float32 = sum over images of dS, by _image_sum_kernel; `table` is head-major (H, R)."""
    batch, heads, num_tokens, head_dim = q.shape
    config = tile_config("dbias", num_tokens, head_dim, q.dtype)
    groups = triton.cdiv(batch, images_per_program)
    atomic = groups > 1
    grid = (torch.zeros if atomic else torch.empty)(heads, num_tokens, num_tokens, device=q.device,
                                                    dtype=torch.float32)
    programs = groups * heads * triton.cdiv(num_tokens, config.block_m) * triton.cdiv(num_tokens, config.block_n)
    _image_sum_kernel[(programs,)](
        q, k, v, grad_out, lse, delta, table, grid,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), table.stride(1), table.stride(0),
        batch, heads, num_tokens, head_dim, grid_size[0], grid_size[1], qk_scale_log2, images_per_program,
        NUM_PREFIX=num_prefix_tokens, ATOMIC=atomic, DOT_PRECISION=dot_precision, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, HEAD_DIM_PAD=config.head_dim_pad, num_warps=config.num_warps,
        num_stages=config.num_stages)
    return grid


def table_grad_from_grid(grid: torch.Tensor, grid_size: Tuple[int, int], num_prefix_tokens: int,
                         num_table_rows: int) -> torch.Tensor:
    """dbias_table (R, H) float32 from a full-position grid (H, N, N) float32 (contiguous)."""
    heads, num_positions, _ = grid.shape
    pairs, row_starts = shared_row_lists(grid_size, num_prefix_tokens, grid.device)
    out = torch.empty(num_table_rows, heads, device=grid.device, dtype=torch.float32)
    _sum_grid_by_row_kernel[(num_table_rows,)](grid, pairs, row_starts, out, num_positions * num_positions, heads,
                                               BLOCK=64, HEADS_PAD=triton.next_power_of_2(heads), num_warps=2)
    return out


def shared_row_lists(grid_size: Tuple[int, int], num_prefix_tokens: int, device: torch.device):
    """(pairs, row_starts) int32: the flat position pairs p * N + p' of each table row r, in ascending
    order, at pairs[row_starts[r]:row_starts[r + 1]] (the full-position row map as CSR lists).

    Cached per grid, prefix and device (see cached_constant: also under CUDA graph capture)."""
    device = torch.device(device)
    key = (tuple(grid_size), num_prefix_tokens, device)
    return cached_constant(_FULL_ROW_LISTS, key, device, lambda: _row_lists(*key))


def _row_lists(grid_size: Tuple[int, int], num_prefix_tokens: int, device: torch.device):
    rows = full_relative_index(grid_size, num_prefix_tokens, device).reshape(-1)
    ordered = torch.sort(rows, stable=True)
    # searchsorted rather than bincount: no device sync, so this also runs under CUDA-graph capture.
    row_starts = torch.searchsorted(ordered.values, torch.arange(bias_table_rows(grid_size, num_prefix_tokens) + 1,
                                                                 device=device))
    return ordered.indices.to(torch.int32), row_starts.to(torch.int32)


_FULL_ROW_LISTS: dict = {}


# ----------------------------------------------------------------------------- csr

@triton.jit
def _sum_pairs_by_row_kernel(DS, PAIRS, ROW_STARTS, PARTIAL, num_heads, splits,
                             BLOCK: tl.constexpr, HEADS_PAD: tl.constexpr):
    """PARTIAL[r, s, h] = sum of DS[p, h] over the pairs p of part s of table row r: the pairs
    PAIRS[ROW_STARTS[r]:ROW_STARTS[r + 1]] cut into `splits` equal parts, summed in order. DS is the
    (B*n*n, H) float32 dS workspace; program id = r * splits + s."""
    row = tl.program_id(0) // splits
    part = tl.program_id(0) % splits
    start = tl.load(ROW_STARTS + row)
    length = tl.load(ROW_STARTS + row + 1) - start
    low = start + length * part // splits
    high = start + length * (part + 1) // splits
    heads = tl.arange(0, HEADS_PAD)
    acc = tl.zeros([HEADS_PAD], tl.float32)
    for offset in range(low, high, BLOCK):
        lanes = offset + tl.arange(0, BLOCK)
        pairs = tl.load(PAIRS + lanes, mask=lanes < high, other=0)
        values = tl.load(DS + pairs[:, None] * num_heads + heads[None, :],
                         mask=(lanes < high)[:, None] & (heads < num_heads)[None, :], other=0.0)
        acc += tl.sum(values, axis=0)
    tl.store(PARTIAL + tl.program_id(0).to(tl.int64) * num_heads + heads, acc, mask=heads < num_heads)


def csr_splits(num_tokens: int) -> int:
    """Parts per table row: the longest rows hold about B*n pairs, the whole workspace B*n*n, so
    CSR_TARGET_PROGRAMS / n parts bound a row's part by the mean work of a program."""
    return max(1, min(CSR_MAX_SPLITS, triton.cdiv(CSR_TARGET_PROGRAMS, num_tokens)))


def table_grad_from_stored_ds(ds: torch.Tensor, row_lists: Optional[Tuple[torch.Tensor, torch.Tensor]],
                              grid_size: Tuple[int, int], num_prefix_tokens: int,
                              num_table_rows: int) -> torch.Tensor:
    """dbias_table (R, H) float32 from the stored dS (B, w, w, H) float32: a fixed-order sum of each
    table row's pairs (row_lists: index_row_lists or packed_row_lists), then of its parts. row_lists
    None (index=None): every image shares one row map, so the images are summed first."""
    heads, width = ds.shape[-1], ds.shape[1]
    if row_lists is None:
        ds = ds.sum(0, keepdim=True)
        row_lists = index_row_lists(torch.arange(width, device=ds.device)[None], grid_size, num_prefix_tokens)
    pairs, row_starts = row_lists
    splits = csr_splits(width)
    partial = torch.empty(num_table_rows, splits, heads, device=ds.device, dtype=torch.float32)
    _sum_pairs_by_row_kernel[(num_table_rows * splits,)](ds, pairs, row_starts, partial, heads, splits, BLOCK=64,
                                                        HEADS_PAD=triton.next_power_of_2(heads), num_warps=4)
    return partial.sum(1)


def packed_row_lists(positions: torch.Tensor, packed, grid_size: Tuple[int, int], num_prefix_tokens: int):
    """(pairs, row_starts) int64 of packed images: the flat pairs (b * N + i) * N + j (i, j < n_b, the
    image's tokens) of each table row, ascending, as index_row_lists lays out a (B, N, N) store. Built on
    the device without a host sync (each image's positions padded to N, the pairs that reach padding
    given the row R, which sorts after every real row and no row_starts entry counts), once per step
    (index_row_lists' cache)."""
    return _ROW_LISTS.get((positions, packed.cu_seqlens), (tuple(grid_size), num_prefix_tokens, packed.max_tokens),
                          lambda: _packed_row_lists(positions, packed, grid_size, num_prefix_tokens))


def _packed_row_lists(positions: torch.Tensor, packed, grid_size: Tuple[int, int], num_prefix_tokens: int):
    cu_seqlens, images, width = packed.cu_seqlens.long(), packed.num_images, packed.max_tokens
    token = torch.arange(positions.numel(), device=positions.device)
    image = torch.searchsorted(cu_seqlens[1:], token, right=True).clamp(max=images - 1)
    # Offsets or positions the host check was told to skip (check_inputs=False) give wrong values, never an
    # index error: a token outside its image's N slots goes to a spare column, dropped, and positions are
    # clamped into the grid as the kernels clamp them (token_positions).
    local = token - cu_seqlens[image]
    local = torch.where((local >= 0) & (local < width), local, width)
    padded = torch.full((images, width + 1), -1, dtype=torch.int64, device=positions.device)
    num_positions = num_prefix_tokens + grid_size[0] * grid_size[1]
    padded[image, local] = positions.long().clamp(0, num_positions - 1)
    padded = padded[:, :width]
    valid = padded >= 0
    padded = padded.clamp(min=0)
    full = full_relative_index(tuple(grid_size), num_prefix_tokens, positions.device)
    num_rows = bias_table_rows(tuple(grid_size), num_prefix_tokens)
    rows = torch.where(valid[:, :, None] & valid[:, None, :], full[padded[:, :, None], padded[:, None, :]], num_rows)
    ordered = torch.sort(rows.reshape(-1), stable=True)
    row_starts = torch.searchsorted(ordered.values, torch.arange(num_rows + 1, device=positions.device))
    return ordered.indices, row_starts


def index_row_lists(index: torch.Tensor, grid_size: Tuple[int, int], num_prefix_tokens: int):
    """(pairs, row_starts) int64: the flat pairs (b * n + i) * n + j with rel(index[b, i], index[b, j]) = r,
    ascending, at pairs[row_starts[r]:row_starts[r + 1]]: the per-image row maps of one step as CSR lists.

    One sort of B*n*n keys, made once per `index` and reused by every head and layer of the step (the
    last few kept: TensorKeyedCache)."""
    return _ROW_LISTS.get((index,), (tuple(grid_size), num_prefix_tokens),
                          lambda: _index_row_lists(index, grid_size, num_prefix_tokens))


_ROW_LISTS = TensorKeyedCache(kept=4)


def _index_row_lists(index: torch.Tensor, grid_size: Tuple[int, int], num_prefix_tokens: int):
    full = full_relative_index(tuple(grid_size), num_prefix_tokens, index.device)
    rows = full[index[:, :, None], index[:, None, :]].reshape(-1)
    ordered = torch.sort(rows, stable=True)
    row_starts = torch.searchsorted(ordered.values, torch.arange(bias_table_rows(grid_size, num_prefix_tokens) + 1,
                                                                 device=index.device))
    return ordered.indices, row_starts
