"""How the Triton backward of rpb_attention accumulates dbias_table at keep rate 1 (index=None).

    dbias_table[r, h] = sum_{b, i, j : rel(i, j) = r} dS[b, h, i, j]

With an `index` every image has its own map of table rows, and _dkdv_kernel adds each tile of dS
into a private (R,) slice per (b, h) (triton_backward.py). At index=None all images share one
(n, n) map, so the sum over images can come first and the table scatter once, independent of B:

    G[h, i, j] = sum_b dS[b, h, i, j]                 a "position grid" (H, n, n) float32
    dbias_table[r, h] = sum_{(i, j) : rel(i, j) = r} G[h, i, j]        (_sum_grid_by_row_kernel)

Two ways to form G (PSS_KERNELS_RPB_DBIAS selects; the benchmarks time them side by side with the
slices and with a frozen table, `pss-frozen-table`, which does no bias-gradient work at all):

- "image-sum" (auto's choice): _image_sum_kernel, one program per (head, query block, key block,
  group of images), recomputes P and dS of its tile for each image of its group (two dots: q k^T
  and dO v^T; the bias tile is gathered once) and sums them in registers, then writes the tile once:
  a plain store when one group holds every image (deterministic), else one atomic add per element
  per group (ceil(B / group) instead of B). _dkdv_kernel then runs without bias-gradient work.
- "position-grid": _dkdv_kernel adds every dS element into one of C copies of G (C <= 8, chosen by
  image b % C) with a coalesced atomic: one atomic per score element (~1.2e8 a layer at ViT-B,
  B = 256), spread over C copies.

The final scatter, _sum_grid_by_row_kernel, walks the pairs of each table row in a fixed order
(a CSR list of the shared row map), so it is deterministic, unlike index_add_ on CUDA.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from .reference import relative_index
from .triton_common import (LOG2E, bias_tile_log2, biased_logits_log2, head_slice, load_rows, tile_config,
                            token_coordinates)

DBIAS_ENV_VAR = "PSS_KERNELS_RPB_DBIAS"
DBIAS_ACCUMULATORS = ("auto", "image-sum", "position-grid", "slices")
POSITION_GRID_MAX_COPIES = 8
POSITION_GRID_MAX_BYTES = 64 * 2**20
# Image-sum programs aimed at: enough to fill an H100/H200 (132 SMs) a few times over; more groups
# mean more atomic adds per grid element, fewer mean less parallelism.
IMAGE_SUM_TARGET_PROGRAMS = 4 * 132


class Accumulator(NamedTuple):
    """How one backward accumulates dbias_table: kind "slices" | "position-grid" | "image-sum";
    copies of the position grid (position-grid) or images per program (image-sum), else 0."""
    kind: str
    count: int


def choose_accumulator(batch: int, heads: int, num_tokens: int, *, has_index: bool, deterministic: bool,
                       query_blocks: int = 1, key_blocks: int = 1) -> Accumulator:
    """The accumulator of a backward with bias gradient (read and checked at each call).

    PSS_KERNELS_RPB_DBIAS: "auto" (default) = image-sum whenever one (H, n, n) grid fits in 64 MiB,
    "image-sum", "position-grid" (even above 64 MiB), "slices". With an index only slices apply.
    deterministic=True takes image-sum with a single group of images (plain stores), or the
    deterministic slices when the grid is too large or "slices" is asked for.
    """
    choice = os.environ.get(DBIAS_ENV_VAR, "auto") or "auto"
    if choice not in DBIAS_ACCUMULATORS:
        raise ValueError(f"{DBIAS_ENV_VAR} must be one of {DBIAS_ACCUMULATORS}, got {choice!r}")
    one_grid = heads * num_tokens * num_tokens * 4
    fits = one_grid <= POSITION_GRID_MAX_BYTES
    if has_index or choice == "slices" or (choice == "auto" and not fits):
        return Accumulator("slices", 0)
    if deterministic:
        return Accumulator("image-sum", batch) if fits else Accumulator("slices", 0)
    if choice == "position-grid":
        return Accumulator("position-grid", max(1, min(batch, POSITION_GRID_MAX_COPIES,
                                                       POSITION_GRID_MAX_BYTES // one_grid)))
    tiles = heads * query_blocks * key_blocks
    groups = max(1, min(batch, IMAGE_SUM_TARGET_PROGRAMS // max(1, tiles)))
    return Accumulator("image-sum", triton.cdiv(batch, groups))


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
    """dbias_table (R, H) float32 from a position grid (H, n, n) float32 (contiguous)."""
    heads, num_tokens, _ = grid.shape
    pairs, row_starts = shared_row_lists(grid_size, num_prefix_tokens, grid.device)
    out = torch.empty(num_table_rows, heads, device=grid.device, dtype=torch.float32)
    _sum_grid_by_row_kernel[(num_table_rows,)](grid, pairs, row_starts, out, num_tokens * num_tokens, heads,
                                               BLOCK=64, HEADS_PAD=triton.next_power_of_2(heads), num_warps=2)
    return out


def shared_row_lists(grid_size: Tuple[int, int], num_prefix_tokens: int, device: torch.device):
    """(pairs, row_starts) int32: the flat token pairs i * n + j of each table row r, in ascending
    order, at pairs[row_starts[r]:row_starts[r + 1]] (the shared row map at index=None as CSR lists).

    Cached per device, except while a CUDA graph is being captured: a tensor made then holds its
    values only once the graph replays, so caching it would hand garbage to later eager calls."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _row_lists(grid_size, num_prefix_tokens, device)
    return _cached_row_lists(grid_size, num_prefix_tokens, device)


def _row_lists(grid_size: Tuple[int, int], num_prefix_tokens: int, device: torch.device):
    positions = torch.arange(num_prefix_tokens + grid_size[0] * grid_size[1], device=device)
    rows = relative_index(positions[:, None], positions[None, :], grid_size, num_prefix_tokens).reshape(-1)
    num_rows = (2 * grid_size[0] - 1) * (2 * grid_size[1] - 1) + (3 if num_prefix_tokens else 0)
    ordered = torch.sort(rows, stable=True)
    # searchsorted rather than bincount: no device sync, so this also runs under CUDA-graph capture.
    row_starts = torch.searchsorted(ordered.values, torch.arange(num_rows + 1, device=device))
    return ordered.indices.to(torch.int32), row_starts.to(torch.int32)


_cached_row_lists = functools.lru_cache(maxsize=32)(_row_lists)
