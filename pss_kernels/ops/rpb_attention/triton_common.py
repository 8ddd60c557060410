"""Triton pieces shared by the forward and backward rpb_attention kernels.

Relative index without an (N, N) index-table load. Fold each patch position into one integer

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

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..._cache import TensorKeyedCache

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr object: the only kind of global a kernel may read


@triton.jit
def token_positions(INDEX, stride_index_b, stride_index_n, batch, offs, num_tokens, grid_h, grid_w,
                    HAS_INDEX: tl.constexpr, NUM_PREFIX: tl.constexpr):
    """Full-sequence positions of the tokens `offs` of image `batch`: index[batch, offs] or, when
    index is None, offs itself (the keep-rate-1 path pays no load).

    Padding tokens (offs >= n) get position 0, and index values are clamped to [0, N): whatever
    `index` holds, every table row or grid cell a kernel forms is in bounds (op.py's host check is
    what reports a bad index; with check_index=False a bad index gives wrong values, never a bad
    access).
    """
    if HAS_INDEX:
        pos = tl.load(INDEX + batch * stride_index_b + offs * stride_index_n,
                      mask=offs < num_tokens, other=0).to(tl.int32)
        pos = tl.minimum(tl.maximum(pos, 0), NUM_PREFIX + grid_h * grid_w - 1)
    else:
        pos = tl.where(offs < num_tokens, offs, 0)
    return pos


@triton.jit
def position_coordinates(pos, grid_w, NUM_PREFIX: tl.constexpr):
    """(a(pos), is_prefix) of full-sequence positions (see the module docstring)."""
    patch = pos - NUM_PREFIX
    is_prefix = patch < 0
    # The prefix token is mapped to patch 0 before dividing: integer division of negative numbers
    # rounds differently in the interpreter (numpy floors) and on the GPU (C truncates).
    patch = tl.maximum(patch, 0)
    row = patch // grid_w
    return row * (2 * grid_w - 1) + (patch - row * grid_w), is_prefix


@triton.jit
def token_coordinates(INDEX, stride_index_b, stride_index_n, batch, offs, num_tokens, grid_h, grid_w,
                      HAS_INDEX: tl.constexpr, NUM_PREFIX: tl.constexpr):
    """(a(pos), is_prefix) of the tokens `offs` of image `batch` (token_positions, position_coordinates)."""
    pos = token_positions(INDEX, stride_index_b, stride_index_n, batch, offs, num_tokens, grid_h, grid_w,
                          HAS_INDEX, NUM_PREFIX)
    return position_coordinates(pos, grid_w, NUM_PREFIX)


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
    return PTR + tl.cast(batch, tl.int64) * stride_b + tl.cast(head, tl.int64) * stride_h


@triton.jit
def load_rows(BASE, offs, mask_rows, stride_n, offs_d, mask_d, stride_d):
    """Rows `offs` of one (n, D) head slice as a (BLOCK, HEAD_DIM_PAD) tile, zero-padded. The row
    offset is int64: a sequence-major layout (n, B, H, D) has stride_n = B*H*D, and n * stride_n
    passes 2^31 at large batches."""
    return tl.load(BASE + offs.to(tl.int64)[:, None] * stride_n + offs_d[None, :] * stride_d,
                   mask=mask_rows[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def bias_tile_log2(coord_q, prefix_q, coord_k, prefix_k, key_valid, TABLE_H, stride_table_row, grid_h, grid_w,
                   NUM_PREFIX: tl.constexpr):
    """(bias * log2(e), rel) of a (BLOCK_M, BLOCK_N) tile: rel = the table rows of the token pairs,
    bias = bias_table[rel, h] (0 at keys that are not `key_valid`).

    coord_*/prefix_*: token_coordinates of the query and key tokens, key_valid: (BLOCK_N,). TABLE_H
    points at head h's row of the head-major (H, R) table copy, so stride_table_row is 1 and the 32
    queries a warp gathers for one key lie within a few cache lines (rel varies by about Gw per
    query row). Padding query rows carry position 0 (token_coordinates): the load needs no row mask.
    """
    rel = relative_index(coord_q[:, None], prefix_q[:, None], coord_k[None, :], prefix_k[None, :],
                         grid_h, grid_w, NUM_PREFIX)
    bias = tl.load(TABLE_H + rel * stride_table_row, mask=key_valid[None, :], other=0.0).to(tl.float32)
    return bias * LOG2E, rel


@triton.jit
def biased_logits_log2(q, k, bias_log2, key_valid, qk_scale_log2, DOT_PRECISION: tl.constexpr):
    """(q k^T * scale + bias) * log2(e) of a (BLOCK_M, BLOCK_N) tile, -inf at keys that are not
    `key_valid` (base 2 lets the softmax use exp2). q: (BLOCK_M, HEAD_DIM_PAD), k: (BLOCK_N, HEAD_DIM_PAD),
    bias_log2 from bias_tile_log2."""
    logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2 + bias_log2
    return tl.where(key_valid[None, :], logits, float("-inf"))


@triton.jit
def program_sequence(WORK, CU_SEQLENS, num_work, blocks_per_head, num_heads, num_tokens, VARLEN: tl.constexpr):
    """(batch, head, block, start, length, row_base) of this program's sequence: image `batch`, head
    `head`, its `block`-th block of rows, the image's first token `start` and token count `length`, and
    `row_base`, the row of its token 0 in the (rows, ...) arrays the launchers allocate (lse, delta,
    the contiguous gradients).

    Dense (VARLEN False): every image has num_tokens tokens from 0, the flat id splits as
    split_program_id(blocks_per_head), row_base = (b*H + h) * n of (B, H, n) arrays.
    Packed (VARLEN, ops/varlen): num_tokens is T, the tokens of all images; program id = w * H + h,
    and work entry w of the (2, num_work) int32 table WORK (packed_work_table) names its image and
    block; an image's tokens are CU_SEQLENS[b] .. CU_SEQLENS[b + 1] - 1 and row_base = h * T + start
    of (H, T) arrays. A spare entry (image -1) gets length 0: it loads and stores nothing. Offsets are
    clamped into [0, T] (see below).
    """
    if VARLEN:
        pid = tl.program_id(0)
        entry = pid // num_heads
        head = pid % num_heads
        image = tl.load(WORK + entry)
        # Clamped so that offsets the host check was told to skip (check_inputs=False) can give wrong
        # values but never an access outside the T rows: 0 <= start <= end <= T, and no negative block
        # (the work table of non-increasing offsets).
        block = tl.maximum(tl.load(WORK + num_work + entry), 0)
        batch = tl.maximum(image, 0)
        start = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + batch), 0), num_tokens)
        end = tl.minimum(tl.maximum(tl.load(CU_SEQLENS + batch + 1), start), num_tokens)
        length = tl.where(image >= 0, end - start, 0)
        row_base = head.to(tl.int64) * num_tokens + start
    else:
        batch_head, block = split_program_id(blocks_per_head)
        batch = batch_head // num_heads
        head = batch_head % num_heads
        start = tl.zeros([], tl.int32)  # a constant: the offsets it scales fold away
        length = num_tokens
        row_base = batch_head.to(tl.int64) * num_tokens
    return batch, head, block, start, length, row_base


@triton.jit
def sequence_slice(PTR, batch, head, start, stride_b, stride_h, stride_n):
    """Pointer to token `start` of image `batch`, head `head` (head_slice, then `start` rows on: a packed
    tensor (T, H, D) passes stride_b = 0 and the image's first token)."""
    return head_slice(PTR, batch, head, stride_b, stride_h) + start.to(tl.int64) * stride_n


@triton.jit
def split_program_id(programs_per_head):
    """(b*H + h, j) of the flat program id: the `programs_per_head` programs of one (image, head) are
    neighbours in launch order, so the tiles they share (K and V for the query blocks, Q and dO for
    the key blocks) are read from DRAM once and then hit L2 while they run together. (A 2-D grid
    (B*H, blocks) puts them B*H programs apart: at ViT-B, B = 256, K/V of all heads exceed the L2.)"""
    pid = tl.program_id(0)
    return pid // programs_per_head, pid % programs_per_head


class TileConfig(NamedTuple):
    block_m: int        # query rows per tile
    block_n: int        # key rows per tile
    head_dim_pad: int   # D padded to a power of two >= 16 (tl.dot's minimum), masked
    num_warps: int
    num_stages: int


# (kernel, largest padded head dim D it covers) -> (BLOCK_M, BLOCK_N, num_warps[, num_stages]), for
# fp16/bf16, read off the sm_90 code Triton 3.6 and 3.9 emit with the JIT's own argument
# specialisation (tests/jit_codegen.py): every tile the launchers pick compiles without register
# spills at D = 32, 64 and 128 (but dq / dkdv at D = 32 or 128 and n <= 64: <= 8 bytes, see
# tests/test_rpb_attention.py), and the warps of every dot tile its rows exactly. The forward was
# (64, 64, 8): a dot that feeds a dot gets its warps along M ([8, 1]), 8 warps x 16 rows cover 128
# rows, so the second warpgroup repeated the first's QK^T and softmax on a 64-row tile.
# Not timed yet: benchmarks/tune_rpb_tiles.py sweeps its candidates on a GPU and prints the best.
_TILES = {
    ("forward", 64): (128, 64, 8), ("forward", 128): (128, 32, 8),
    ("dkdv", 128): (32, 64, 8),
    ("dkdv_deterministic", 128): (32, 16, 2),
    ("dq", 128): (64, 32, 4),
    ("dbias", 128): (64, 64, 8),
}
# float32 operands take twice the registers and run as FMA dots (no tensor-core layout). None of these
# spills on sm_90 at D = 64 or 128 with Triton 3.6 or 3.9 (the tiles before kept 216-232 bytes of stack
# in the forward at D = 128, up to 4.8 KB in dkdv), but dkdv at D = 128 with the position grid at
# index=None (not auto's choice there) keeps 8 bytes with Triton 3.6. dkdv holds two (BLOCK_N, D)
# float32 accumulators and spills with every tile tried at num_stages = 2, so it runs unpipelined
# (num_stages = 1) on small tiles; at D = 128 no tile is clean on both Triton versions with every
# accumulator (16 warps: 200 bytes on 3.9). Training runs bf16 under autocast; this is the float32 path.
_TILES_FLOAT32 = {
    ("forward", 128): (32, 32, 8),
    ("dkdv", 64): (16, 16, 16, 1), ("dkdv", 128): (16, 16, 8, 1),
    ("dkdv_deterministic", 128): (16, 16, 8),
    ("dq", 128): (32, 16, 4),
    ("dbias", 128): (32, 32, 4),
}
# Short sequences (n <= 64: rho = 0.2 at 224 px keeps 39 tokens) where the capped tile of _TILES does not
# compile cleanly: dkdv's (32, 32, 4) keeps 8 bytes of stack at D = 64 and repeats rows at D = 32, where
# (32, 16, 2) keeps 8 bytes with csr; dq's (32, 32, 2) keeps 8 bytes at D = 32. At D = 128 no short
# dkdv tile is clean with every accumulator: the capped (32, 32, 4) keeps 8 bytes with slices only.
_SHORT_TILES = {("dkdv", 32): (16, 16, 1), ("dkdv", 64): (32, 16, 2), ("dq", 32): (32, 16, 2)}
SHORT_SEQUENCE = 64
# Kernels whose first dot, S = Q K^T over (BLOCK_M, BLOCK_N), feeds another dot along the query rows
# (P V, dS K): Triton may put every warp of such a dot along the rows, 16 rows a warp (wgmma: a
# warpgroup of 4 warps per 64 rows), and then more than BLOCK_M / 16 warps repeat rows. It does so for
# 64 rows or more, and at 32 rows when the second dot is narrow (D <= 32: (32, 32, 4) laid 4 warps over
# 64 rows of a 32-row tile; at D >= 64 it splits them 2 x 2). dkdv's chained dots (P^T dO, dS^T Q)
# run along the keys instead, and the dbias kernel chains no dots. The codegen tests check every tile
# the launchers can pick at D = 32, 64 and 128 for repeated rows (tests/codegen_report.py).
_CHAINED_S = {"forward": True, "dq": True, "dkdv": False, "dkdv_deterministic": False, "dbias": False}
NARROW_HEAD_DIM = 32


def tile_table(kernel: str, head_dim: int, dtype: torch.dtype, num_tokens: int = 1 << 30):
    """(table, key): the entry that holds this kernel's tiles at head dim D, dtype and n tokens (the
    tile sweep, benchmarks/tune_rpb_tiles.py, swaps it): of _TILES_FLOAT32 for float32, else of
    _SHORT_TILES for n <= 64 where it has one, else of _TILES; in each, the entry of the smallest head
    dim that covers D (padded)."""
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    if dtype == torch.float32:
        tables = (_TILES_FLOAT32,)
    elif triton.next_power_of_2(num_tokens) <= SHORT_SEQUENCE:
        tables = (_SHORT_TILES, _TILES)
    else:
        tables = (_TILES,)
    for table in tables:
        covering = sorted(dim for name, dim in table if name == kernel and dim >= head_dim_pad)
        if covering:
            return table, (kernel, covering[0])
    raise ValueError(f"no tile for kernel {kernel!r} at head dim {head_dim} (the Triton kernels take D <= 128)")


def fit_warps(kernel: str, block_m: int, block_n: int, num_warps: int, head_dim_pad: int = 64) -> int:
    """num_warps capped so that the warps tile each tensor-core dot of the kernel without repeating work:
    at most BLOCK_M / 16 warps for a chained S of 64 rows or more, or of any rows at a narrow head dim
    (see _CHAINED_S), and at most one per 256 elements of the tile (a warp's smallest tensor-core tile
    is 16 x 8: two of them keep it busy)."""
    if _CHAINED_S[kernel] and (block_m >= 64 or head_dim_pad <= NARROW_HEAD_DIM):
        num_warps = min(num_warps, max(1, block_m // 16))
    return max(1, min(num_warps, block_m * block_n // 256))


def tile_config(kernel: str, num_tokens: int, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    """Tiles for one kernel at n tokens of head dim D and operand dtype.

    Short sequences get tiles of at most half the padded sequence (>= 16), so no tile is mostly
    padding (n = 39 -> 32-wide tiles) and the interpreter tests (n ~ 10..21) cross tile borders; for
    fp16/bf16 the warps shrink with the tile (fit_warps). The deterministic dkdv kernel uses 16-wide key tiles: its
    column-by-column accumulation costs O(BLOCK_N) reductions per tile.
    """
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    table, key = tile_table(kernel, head_dim, dtype, num_tokens)
    block_m, block_n, num_warps, *stages = table[key]
    cap = max(16, triton.next_power_of_2(num_tokens) // 2)
    block_m, block_n = min(block_m, cap), min(block_n, cap)
    if dtype != torch.float32:  # float32 dots are FMA loops (IEEE), laid out without warp tiles
        num_warps = fit_warps(kernel, block_m, block_n, num_warps, head_dim_pad)
    return TileConfig(block_m, block_n, head_dim_pad, num_warps, num_stages=stages[0] if stages else 2)


def head_major_table(bias_table: torch.Tensor) -> torch.Tensor:
    """The (H, R) contiguous copy of a (R, H) table that the kernels gather from (bias_tile_log2):
    one head's R entries are contiguous (~3 KB at 14 x 14), where a row-major (R, H) table puts a
    warp's 32 gathered entries 4*H bytes apart over about 12 cache lines."""
    return bias_table.t().contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get IEEE products (the flash-attention rule compares against float32 torch,
    which does not use TF32 by default); fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def head_strides(t: torch.Tensor, packed: bool = False):
    """The 4 strides of a (B, H, n, D) tensor, in kernel argument order; a packed (1, H, T, D) view of
    (T, H, D) tokens gets batch stride 0 (its images are found by their offsets, program_sequence)."""
    return 0 if packed else t.stride(0), t.stride(1), t.stride(2), t.stride(3)


class PackedSequences(NamedTuple):
    """Packed images for the launchers (ops/varlen): their tensors are (1, H, T, D) views of the (T, H, D)
    tokens, `index` (1, T) the positions, and image b holds tokens cu_seqlens[b] .. cu_seqlens[b + 1] - 1."""
    cu_seqlens: torch.Tensor  # (B + 1,) int32, on the tensors' device
    num_images: int           # B
    max_tokens: int           # N: no image holds more tokens (the grid's positions)

    def mean_tokens(self, total: int) -> int:
        """Tokens per image on average, at least 1: the length the tiles are chosen for."""
        return max(1, -(-total // self.num_images))


def packed_work_table(packed: PackedSequences, total: int, block: Optional[int]) -> torch.Tensor:
    """packed_work_table_uncached, once per offsets and block (the forward and backward of every layer of a
    step share their images' offsets: TensorKeyedCache)."""
    return _WORK_TABLES.get((packed.cu_seqlens,), (total, block, packed.max_tokens, packed.num_images),
                            lambda: packed_work_table_uncached(packed, total, block))


_WORK_TABLES = TensorKeyedCache(kept=8)


def packed_work_table_uncached(packed: PackedSequences, total: int, block: Optional[int]) -> torch.Tensor:
    """(2, E) int32 work entries (image, block) of the packed images cut into blocks of `block` rows
    (block=None: one entry per image, block 0), longest images first so that the longest programs start
    first and the last wave holds the short ones (LPT scheduling); E = ceil(T / block) + B bounds the
    entries without reading the offsets back (sum_b ceil(n_b / block) <= T / block + B), so the spare
    entries are (-1, 0) and their programs do nothing. Built on the device, without a host sync."""
    device = packed.cu_seqlens.device
    lengths = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).long()
    if block is None:
        block = max(1, packed.max_tokens)
    blocks = (lengths + block - 1) // block
    order = torch.sort(lengths, descending=True, stable=True).indices
    ends = blocks[order].cumsum(0)
    num_entries = triton.cdiv(total, block) + packed.num_images
    entry = torch.arange(num_entries, device=device)
    slot = torch.searchsorted(ends, entry, right=True)
    used = slot < packed.num_images
    slot = slot.clamp(max=packed.num_images - 1)
    first = ends[slot] - blocks[order][slot]
    image = torch.where(used, order[slot], -1)
    return torch.stack([image, torch.where(used, entry - first, 0)]).to(torch.int32).contiguous()
