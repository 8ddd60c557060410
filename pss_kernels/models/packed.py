"""The ViT on packed tokens: each image keeps the number of tokens its allocation gives it.

`VisionTransformer(allocation="budget" | "mass")` at a keep rate rho < 1 runs this path instead of
the dense one (allocation "fixed", the default, is the dense PSS path):

    x (B, N, C) embedded          scores (B, P) by the sampler's scorer (l1, l2, random, center)
    keep_counts (B,)              ops.varlen.keep_counts(allocation, scores, rho): the policy
    tokens (T, C), positions, cu  ops.varlen.sample_patches_varlen(x, keep_counts, scores=...) on the
                                  sampler's backend when it has a packed form (torch, triton, cuda)
    every block on (T, C)         LayerNorm, MLP and projections per token; attention through
                                  rpb_attention_varlen (inside each image, the bias from positions);
                                  stochastic depth per image, as the dense path's
    pooled (B, C)                 the mean of each image's patch tokens (pool="mean") or its CLS token

Tri-Level's token level (token_pruning, models/token_pruning.py) runs on the packed tokens too: a
selector reads its block's per-image CLS attention (rpb_attention_varlen's return_cls_attention) and
each image keeps kept_count(n_b - 1) of its own n_b - 1 patches (TokenPruning.select_packed), so the
images' lengths stay different. With the same counts in every image the result equals the dense
path's (tested). Not on this path: the attention level (R_A < 1), growth's active heads, plain
(no-RPB) attention and the peers' attention impls: those are refused with a ValueError that says so.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._backends import OP_BACKENDS
from ..ops.sample_patches.module import center_scores
from ..ops.sample_patches.reference import patch_scores
from ..ops.varlen import (ALLOCATIONS, keep_counts, rpb_attention_varlen, sample_patches_varlen,  # noqa: F401
                          static_total)
from ..ops.varlen.reference import image_ids
from .attention import RelPosBlockAttention

def packed_backend(op: str, backend: Optional[str]) -> Optional[str]:
    """The backend packed op `op` gets from a module's (dense) backend: the same one where it has a packed
    form, else None (the packed op's own default). Today every dense backend has one; the rule stays so
    that a dense-only backend added later falls back rather than failing mid-run."""
    return backend if backend in OP_BACKENDS[op] else None



def check_packable(model) -> None:
    """ValueError naming what the packed path does not run."""
    for number, block in enumerate(model.blocks):
        attn = block.attn
        if not isinstance(attn, RelPosBlockAttention):
            raise ValueError("allocation='budget' / 'mass' needs the relative position bias (rpb=True): packed "
                             "attention is rpb_attention_varlen")
        if attn.impl != "pss":
            raise ValueError(f"allocation='budget' / 'mass' runs attention through rpb_attention_varlen; "
                             f"attn_impl={attn.impl!r} is a dense peer")
        if attn.active_heads != attn.num_heads:
            raise ValueError(f"block {number}: packed tokens run every head (growth's active_heads is dense-only)")
    if model.allocation == "mass" and model.sampler.scorer == "center":
        raise ValueError("allocation='mass' spreads each image's score mass, which needs scores >= 0 (scorer "
                         "'l1', 'l2' or 'random'); scorer='center' ranks by negative distance to the centre")


def _scores(model, x: torch.Tensor) -> torch.Tensor:
    scorer = model.sampler.scorer
    if scorer == "center":
        return center_scores(model.grid_size, x.shape[0], x.device)
    return patch_scores(x, scorer, model.num_prefix_tokens)


def _drop_path(x: torch.Tensor, drop_prob: float, token_image: torch.Tensor, num_images: int,
               training: bool) -> torch.Tensor:
    """Stochastic depth per image on packed tokens: one Bernoulli draw per image, as DropPath's."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty(num_images).bernoulli_(keep_prob)
    return x * (mask[token_image] / keep_prob)[:, None]


def _attention(attn: RelPosBlockAttention, x: torch.Tensor, positions: torch.Tensor,
               cu_seqlens: torch.Tensor, return_cls_attention: bool = False):
    """(T, C) -> (T, C): the block's attention over each image's own tokens (and (T,) the CLS
    attention of each image, for a selector)."""
    total, dim = x.shape
    heads = attn.num_heads
    bias = None if attn.q_bias is None else torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
    q, k, v = F.linear(x, attn.qkv.weight, bias).reshape(total, 3, heads, dim // heads).unbind(1)
    out = rpb_attention_varlen(q, k, v, attn.relative_position_bias_table, positions, cu_seqlens,
                               grid_size=attn.grid_size, num_prefix_tokens=attn.num_prefix_tokens,
                               backend=packed_backend("rpb_attention_varlen", attn.backend),
                               deterministic=attn.deterministic, check_inputs=False,  # from sample_patches_varlen
                               return_cls_attention=return_cls_attention)
    if return_cls_attention:
        out, cls_attention = out
        return attn.proj_drop(attn.proj(out.reshape(total, dim))), cls_attention
    return attn.proj_drop(attn.proj(out.reshape(total, dim)))


def input_keep_counts(model, x: torch.Tensor, keep_rate: float, scores=None) -> torch.Tensor:
    """(B,) the tokens each image of embedded x (B, N, C) keeps at the input: the model's allocation
    policy on its sampler's scores."""
    scores = _scores(model, x) if scores is None else scores
    return keep_counts(model.allocation, scores.detach(), keep_rate, model.num_prefix_tokens)


def packed_features(model, x: torch.Tensor, keep_rate: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (T, C) after the last block, positions (T,), cu_seqlens (B + 1,)) of embedded x (B, N, C)."""
    check_packable(model)
    scores = _scores(model, x)
    counts = input_keep_counts(model, x, keep_rate, scores)
    # T known on the host (fixed, budget) spares the sampler's read of the counts: the step then runs
    # without a host sync on the fused backends (mass and the token level's selections still read it).
    total = static_total(model.allocation, x.shape[0], x.shape[1], keep_rate, model.num_prefix_tokens)
    tokens, positions, cu_seqlens = sample_patches_varlen(
        x, counts, scorer="given", scores=scores, num_prefix_tokens=model.num_prefix_tokens,
        backend=packed_backend("sample_patches_varlen", model.sampler.backend), total=total)
    # The mean tokens per image this call kept at the input (T is a shape: no sync), read by the trainer
    # to time and count the step by what it ran.
    model.packed_input_tokens = tokens.shape[0] / x.shape[0]
    token_image = image_ids(cu_seqlens, tokens.shape[0])
    pruning = model.token_pruning if model.token_pruning is not None and model.token_pruning.active else None
    reads = pruning.reading_blocks() if pruning is not None else frozenset()
    for number, block in enumerate(model.blocks, start=1):
        selector = pruning if number in reads else None
        out = _attention(block.attn, block.norm1(tokens), positions, cu_seqlens, selector is not None)
        branch, cls_attention = out if selector is not None else (out, None)
        tokens = tokens + _drop_path(block.ls1(branch), block.drop_path1.drop_prob, token_image, x.shape[0],
                                     block.training)
        if selector is not None and selector.after == "attention":
            tokens, positions, cu_seqlens = selector.select_packed(tokens, positions, cu_seqlens, cls_attention)
            token_image = image_ids(cu_seqlens, tokens.shape[0])
        branch = block.ls2(block.mlp(block.norm2(tokens)))
        tokens = tokens + _drop_path(branch, block.drop_path2.drop_prob, token_image, x.shape[0], block.training)
        if selector is not None and selector.after == "mlp":
            tokens, positions, cu_seqlens = selector.select_packed(tokens, positions, cu_seqlens, cls_attention)
            token_image = image_ids(cu_seqlens, tokens.shape[0])
    return tokens, positions, cu_seqlens


def packed_pool(model, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(B, C): each image's CLS token through `norm` (pool="cls") or the mean of its patch tokens
    through `fc_norm` (pool="mean"), as forward_head pools the dense tokens."""
    starts = cu_seqlens[:-1].long()
    if model.pool == "cls":
        return model.norm(tokens[starts])
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    num_images = lengths.numel()
    # The prefix (CLS) token leads each image; it is replaced by zeros rather than masked out (a boolean
    # mask's length would be a host sync) and not multiplied by 0 (inf * 0 would be NaN).
    is_patch = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    if model.num_prefix_tokens:
        is_patch[starts] = False
    sums = tokens.new_zeros(num_images, tokens.shape[1]).index_add(
        0, image_ids(cu_seqlens, tokens.shape[0]), torch.where(is_patch[:, None], tokens, 0.0))
    return model.fc_norm(sums / (lengths - model.num_prefix_tokens).to(tokens.dtype)[:, None])
