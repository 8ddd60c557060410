"""Packed (variable-length) sequences: each image keeps the tokens its content needs.

The tokens of all images are concatenated, (T, ...), with FlashAttention's varlen convention for the
image boundaries: `cu_seqlens` (B + 1,) int32 offsets, image b holding tokens cu_seqlens[b] ..
cu_seqlens[b + 1] - 1, and `positions` (T,) each token's position in the full sequence of its image
(the flattened `index` of the dense ops). Attention stays inside each image.

- rpb_attention_varlen: attention with the per-image relative position bias (reference.py: the
  oracle, per-image dense rpb_attention, which it must equal).
- sample_patches_varlen: a per-image number of kept tokens, packed.
- allocation.py: who decides each image's count (fixed, budget, mass), pure functions.
- flat_positions: images of different grid sizes in one batch, (row, column) cells in the largest
  grid, whose table they share.

Status: every op has a "torch" backend (rpb_attention_varlen image by image on the dense op;
sample_patches_varlen the whole batch at once, torch_sample.py) and a "triton" one
(one fused launch over all images: rpb_attention's kernels with VARLEN, sample_patches' select
kernel with VARLEN); sample_patches_varlen also has "cuda" (csrc/sampling, counts given), and
rpb_attention_varlen "sdpa" (the images padded into one batch, the default). The kernels have not run on a GPU (the
Triton ones only in Triton's interpreter), so they are not backend=None's choice.
"""
from .allocation import (ALLOCATIONS, budget_keep_counts, fixed_keep_counts, keep_counts, mass_keep_counts,
                         mass_keep_counts_at_rate, static_total)
from .op import check_cu_seqlens, flat_positions, rpb_attention_varlen, sample_patches_varlen

__all__ = ["ALLOCATIONS", "budget_keep_counts", "check_cu_seqlens", "fixed_keep_counts", "flat_positions",
           "keep_counts",
           "mass_keep_counts", "mass_keep_counts_at_rate", "rpb_attention_varlen", "sample_patches_varlen",
           "static_total"]
