"""The oracles of the packed ops: each image on its own through the dense references."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..rpb_attention.reference import rpb_attention_logits
from ..sample_patches.reference import patch_scores, select_indices


def image_bounds(cu_seqlens: torch.Tensor) -> List[Tuple[int, int]]:
    """[(start, end)] of each image from the (B + 1,) offsets (read on the host)."""
    offsets = cu_seqlens.tolist()
    return list(zip(offsets[:-1], offsets[1:]))


def image_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) int64 each packed token's image from the (B + 1,) offsets; total = T, a shape, so no host
    sync."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths,
                                   output_size=total)


def rpb_attention_varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                                   positions: torch.Tensor, cu_seqlens: torch.Tensor, *, grid_size: Sequence[int],
                                   num_prefix_tokens: int = 1, scale: Optional[float] = None,
                                   return_cls_attention: bool = False):
    """(T, H, D) out in q's dtype (and (T,) float32 CLS attention): per image b, softmax(q k^T * scale +
    bias) v over its own tokens in float32, the bias gathered from their positions."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, cls = [], []
    for start, end in image_bounds(cu_seqlens):
        qb, kb, vb = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, n_b, D)
        logits = rpb_attention_logits(qb, kb, bias_table, positions[start:end][None].long(), tuple(grid_size),
                                      num_prefix_tokens, scale)
        probs = logits.softmax(-1)
        outs.append(torch.matmul(probs, vb.to(probs.dtype))[0].transpose(0, 1).to(q.dtype))
        cls.append(probs[0, :, 0].mean(0).detach().float())
    out = torch.cat(outs)
    return (out, torch.cat(cls)) if return_cls_attention else out


def sample_patches_varlen_reference(x: torch.Tensor, keep_counts: torch.Tensor, *, scorer: str = "l1",
                                    num_prefix_tokens: int = 1, order: str = "score",
                                    scores: Optional[torch.Tensor] = None,
                                    generator: Optional[torch.Generator] = None):
    """(tokens (T, C), positions (T,) int64, cu_seqlens (B + 1,) int32): image b keeps keep_counts[b]
    tokens (prefix included) chosen exactly as sample_patches chooses k of them."""
    patch_score = patch_scores(x, scorer, num_prefix_tokens, scores, generator)  # (B, P), one draw for all
    counts = keep_counts.tolist()
    tokens, positions = [], []
    num_tokens = x.shape[1]
    for b, count in enumerate(counts):
        if count == num_tokens:  # every token, in position order (sample_patches at keep_rate 1)
            index = torch.arange(num_tokens, device=x.device)
        else:
            index = select_indices(patch_score[b:b + 1], count, num_prefix_tokens, order)[0]
        tokens.append(x[b].index_select(0, index))
        positions.append(index)
    cu_seqlens = torch.zeros(len(counts) + 1, dtype=torch.int32, device=x.device)
    cu_seqlens[1:] = torch.tensor(counts, device=x.device).cumsum(0)
    return torch.cat(tokens), torch.cat(positions), cu_seqlens
