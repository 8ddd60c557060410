"""The torch backend of `sample_patches_varlen`: the whole batch at once, with no host read.

The oracle (reference.py) runs image by image: per image a sort, a slice and a gather, and a host
read of the counts to slice by. On a GPU at B = 256 that is over a thousand small launches and a
synchronisation a step, the default path until the fused kernels have run on a GPU. Here every image
is ranked by one batched stable sort (the oracle's sort, row by row, so the same order and ties)
and each token's packed row is computed in closed form:

    rank[b, p]   position of patch p in image b's descending stable sort     (ties: lower p first)
    kept[b, p]   rank[b, p] < k_b - P0
    row[b, p]    cu[b] + P0 + rank[b, p]                         order "score"
                 cu[b] + P0 + (number of kept patches before p)  order "spatial", or an image kept whole
    row[b, t]    cu[b] + t for the prefix tokens t < P0

slot (B, N) holds row, or -1 for a dropped token (the backward's map); inverting it (one scatter)
gives each packed row its source token, and one gather copies the rows. T is an argument (a shape),
so nothing is read back: with the budget policy's static total a packed step stays on the device.

Counts the public function refuses (outside [P0 + 1, N], or not summing to T) reach this only through
the raw registered op: they are clamped to [P0 + 1, N] as the kernels clamp them, rows at or past T
are dropped, and a row no token maps to copies token 0 of image 0 (its position 0). The sampler
reads and writes nothing out of bounds; its offsets are the clamped counts' prefix sum, as the
kernels', so they can pass T there, and a consumer that trusts them (rpb_attention_varlen with
check_inputs=False) must not be handed such counts, which the public function refuses.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..sample_patches.reference import patch_scores


def sample_patches_varlen_torch(x: torch.Tensor, scores: Optional[torch.Tensor], keep_counts: torch.Tensor,
                                total: int, scorer: str, num_prefix_tokens: int,
                                order: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (T, C), positions (T,) int64, cu_seqlens (B + 1,) int32, slot (B, N) int32); scorer
    "l1", "l2" or "given" (scores (B, N - P0)). Arguments are assumed checked by the caller."""
    batch, num_tokens, _ = x.shape
    prefix = num_prefix_tokens
    num_patches = num_tokens - prefix
    device = x.device
    counts = keep_counts.long().clamp(prefix + 1, num_tokens)
    offsets = torch.zeros(batch + 1, dtype=torch.int64, device=device)
    offsets[1:] = counts.cumsum(0)
    start = offsets[:-1, None]

    ranked = torch.sort(patch_scores(x, scorer, prefix, scores), dim=1, descending=True, stable=True).indices
    arange = torch.arange(num_patches, device=device)
    rank = torch.empty_like(ranked).scatter_(1, ranked, arange.expand(batch, num_patches))
    kept = rank < (counts - prefix)[:, None]
    if order == "spatial":
        within = kept.cumsum(1) - 1
    else:  # an image kept whole comes in position order (sample_patches at keep_rate 1)
        whole = (counts == num_tokens)[:, None]
        within = torch.where(whole, arange.expand(batch, num_patches), rank)
    patch_row = torch.where(kept, start + prefix + within, -1)
    prefix_row = start + torch.arange(prefix, device=device)
    row = torch.cat([prefix_row, patch_row], dim=1)
    row = torch.where(row < total, row, -1)  # only with counts that do not sum to T

    # source[r]: the flat token (b * N + t) of packed row r; every dropped token writes the spare row T.
    source = torch.zeros(total + 1, dtype=torch.int64, device=device)
    source[torch.where(row >= 0, row, total).flatten()] = torch.arange(batch * num_tokens, device=device)
    source = source[:total]
    image, positions = source // num_tokens, source % num_tokens
    return x[image, positions], positions, offsets.to(torch.int32), row.to(torch.int32)
