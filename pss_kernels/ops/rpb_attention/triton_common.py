"""Triton pieces shared by the forward and backward rpb_attention kernels.

Relative index without a table load (DESIGN §1, §4). Fold each patch position into one integer

    a(p) = row(p) * (2Gw - 1) + col(p),     row = t // Gw, col = t % Gw, t = p - NUM_PREFIX

so that for two patches the BEiT/timm table row is a difference plus a constant:

    rel(p, p') = ((row - row') + Gh - 1) * (2Gw - 1) + (col - col') + Gw - 1
               = a(p) - a(p') + (Gh - 1) * (2Gw - 1) + Gw - 1.

A kernel computes `a` once per loaded block of positions (BLOCK vectors, one integer
division each) and the (BLOCK_M, BLOCK_N) tile of rows with one subtraction per element.
The prefix (CLS) token uses the three last rows: R-3 as query, R-2 as key, R-1 for CLS-CLS.

Imported lazily by the launchers: `triton.jit` reads TRITON_INTERPRET when it decorates.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr object: the only kind of global a kernel may read


@triton.jit
def token_coordinates(INDEX, stride_index_b, stride_index_n, batch, offs, num_tokens, grid_h, grid_w,
                      HAS_INDEX: tl.constexpr, NUM_PREFIX: tl.constexpr):
    """(a(pos), is_prefix) of the tokens `offs` of image `batch`, pos = index[batch, offs] or, when
    index is None, offs itself (the keep-rate-1 path pays no load).

    Padding tokens (offs >= n) get position 0, and index values are clamped to [0, N): whatever
    `index` holds, every table row a kernel forms is in bounds (op.py's host check is what
    reports a bad index; with check_index=False a bad index gives wrong values, never a bad access).
    """
    if HAS_INDEX:
        pos = tl.load(INDEX + batch * stride_index_b + offs * stride_index_n,
                      mask=offs < num_tokens, other=0).to(tl.int32)
        pos = tl.minimum(tl.maximum(pos, 0), NUM_PREFIX + grid_h * grid_w - 1)
    else:
        pos = tl.where(offs < num_tokens, offs, 0)
    patch = pos - NUM_PREFIX
    is_prefix = patch < 0
    # The prefix token is mapped to patch 0 before dividing: integer division of negative numbers
    # rounds differently in the interpreter (numpy floors) and on the GPU (C truncates).
    patch = tl.maximum(patch, 0)
    row = patch // grid_w
    return row * (2 * grid_w - 1) + (patch - row * grid_w), is_prefix


@triton.jit
def relative_index(coord_q, prefix_q, coord_k, prefix_k, grid_h, grid_w, NUM_PREFIX: tl.constexpr):
    """Table row for each (query, key) pair; the arguments broadcast like coord_q - coord_k."""
    rel = coord_q - coord_k + (grid_h - 1) * (2 * grid_w - 1) + grid_w - 1
    if NUM_PREFIX:
        num_rows = (2 * grid_h - 1) * (2 * grid_w - 1) + 3
        rel = tl.where(prefix_q, tl.where(prefix_k, num_rows - 1, num_rows - 3),
                       tl.where(prefix_k, num_rows - 2, rel))
    return rel


@triton.jit
def head_slice(PTR, batch, head, stride_b, stride_h):
    """Pointer to the (n, D) slice of image `batch`, head `head` (int64 offsets: B*H*n*D may pass 2^31)."""
    return PTR + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h


@triton.jit
def load_rows(BASE, offs, mask_rows, stride_n, offs_d, mask_d, stride_d):
    """Rows `offs` of one (n, D) head slice as a (BLOCK, HEAD_DIM_PAD) tile, zero-padded."""
    return tl.load(BASE + offs[:, None] * stride_n + offs_d[None, :] * stride_d,
                   mask=mask_rows[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def biased_logits_log2(q, k, coord_q, prefix_q, coord_k, prefix_k, key_valid, TABLE_H, stride_table_row,
                       grid_h, grid_w, qk_scale_log2, NUM_PREFIX: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(logits, rel) of a (BLOCK_M, BLOCK_N) tile: logits = (q k^T * scale + bias_table[rel, h]) * log2(e),
    -inf at keys that are not `key_valid` (base 2 lets the softmax use exp2); rel = the table rows.

    q: (BLOCK_M, HEAD_DIM_PAD), k: (BLOCK_N, HEAD_DIM_PAD), coord_*/prefix_*: token_coordinates of
    their tokens, key_valid: (BLOCK_N,); TABLE_H points at column h of the table. Padding query rows
    carry position 0 (token_coordinates), so the bias load needs no row mask.
    """
    rel = relative_index(coord_q[:, None], prefix_q[:, None], coord_k[None, :], prefix_k[None, :],
                         grid_h, grid_w, NUM_PREFIX)
    bias = tl.load(TABLE_H + rel * stride_table_row, mask=key_valid[None, :], other=0.0).to(tl.float32)
    logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2 + bias * LOG2E
    return tl.where(key_valid[None, :], logits, float("-inf")), rel


class TileConfig(NamedTuple):
    block_m: int        # query rows per tile
    block_n: int        # key rows per tile
    head_dim_pad: int   # D padded to a power of two >= 16 (tl.dot's minimum), masked
    num_warps: int
    num_stages: int


# (kernel, D padded <= 64) -> (BLOCK_M, BLOCK_N, num_warps) for fp16/bf16. Picked so that every
# kernel compiles without register spills for sm_90 with Triton 3.6 and 3.9 (checked offline with
# cuobjdump, no GPU run; on sm_80 "dkdv" spills 16-300 bytes). Not timed yet: the place to tune.
_TILES = {
    ("forward", True): (64, 64, 8), ("forward", False): (64, 32, 8),
    ("dkdv", True): (32, 64, 8), ("dkdv", False): (32, 32, 8),
    ("dkdv_deterministic", True): (32, 16, 4), ("dkdv_deterministic", False): (32, 16, 4),
    ("dq", True): (64, 32, 4), ("dq", False): (32, 32, 4),
}
# float32 operands take twice the registers: the tiles above spill 3-10 KB a thread on sm_90 with
# Triton 3.6. These spill far less there (forward <= 0.3 KB, dq none, dkdv 0.2-4.8 KB: none of the
# float32 dkdv tiles tried is spill-free). Training runs bf16 under autocast; this is the fp32 path.
_TILES_FLOAT32 = {
    ("forward", True): (32, 32, 8), ("forward", False): (32, 16, 4),
    ("dkdv", True): (32, 32, 8), ("dkdv", False): (32, 32, 8),
    ("dq", True): (32, 32, 8), ("dq", False): (32, 32, 8),
}


def tile_table(kernel: str, head_dim: int, dtype: torch.dtype):
    """(table, key): the entry of _TILES or _TILES_FLOAT32 that holds this kernel's tiles (the tile
    sweep, benchmarks/tune_rpb_tiles.py, swaps it)."""
    key = (kernel, max(16, triton.next_power_of_2(head_dim)) <= 64)
    return (_TILES_FLOAT32 if dtype == torch.float32 and key in _TILES_FLOAT32 else _TILES), key


def tile_config(kernel: str, num_tokens: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    """Tiles for one kernel at n tokens of head dim D and operand dtype.

    Short sequences get tiles of at most half the padded sequence (>= 16), so no tile is mostly
    padding (n = 39 -> 32-wide tiles) and the interpreter tests (n ~ 10..21) cross tile borders.
    The deterministic dkdv kernel uses 16-wide key tiles: its column-by-column accumulation costs
    O(BLOCK_N) reductions per tile.
    """
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    table, key = tile_table(kernel, head_dim, dtype)
    block_m, block_n, num_warps = table[key]
    cap = max(16, triton.next_power_of_2(num_tokens) // 2)
    return TileConfig(min(block_m, cap), min(block_n, cap), head_dim_pad, num_warps, num_stages=2)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get IEEE products (the flash-attention rule compares against float32 torch,
    which does not use TF32 by default); fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def head_strides(t: torch.Tensor):
    """The 4 strides of a (B, H, n, D) tensor, in kernel argument order."""
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)
