"""What packed attention is measured against (benchmarks/varlen.py): the ways to attend within packed
images without this package's kernel. Same layout as rpb_attention_varlen: (T, H, D) tokens,
`cu_seqlens` (B + 1,) int32 offsets, `positions` (T,).

- varlen_flash_attention: PyTorch's FlashAttention varlen kernel (torch.nn.attention.varlen.varlen_attn,
  torch >= 2.10, CUDA), or flash-attn's flash_attn_varlen_func where that package is installed. No bias:
  the lower bound, the cost of attention alone on the same packed tokens.
- flex_varlen_rpb_attention: FlexAttention over one (1, H, T, D) sequence with a block mask that keeps
  each image's queries on its own keys (the document mask) and a score_mod that gathers
  bias_table[rel(positions[q], positions[kv]), h]: the only public way to train packed attention with a
  trainable relative position bias; its table gradient is one global atomic per score.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..rpb_attention.peers import _flex_attention_for
from ..rpb_attention.reference import relative_index


def varlen_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           max_tokens: int, *, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v within each image, no bias: (T, H, D). max_tokens: the longest image.
    Raises RuntimeError("varlen flash attention is unavailable: ...") where neither PyTorch's
    varlen_attn nor flash-attn can run these inputs (CPU tensors, float32, an older torch)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    if varlen_attn is not None:
        try:
            # scale only when given: a torch whose varlen_attn predates the argument still runs the default
            options = {} if scale is None else {"scale": scale}
            return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_tokens, max_tokens, **options)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            failure = err
    else:
        failure = ImportError(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        raise RuntimeError(f"varlen flash attention is unavailable: {failure}; flash-attn is not installed") \
            from failure
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_tokens, max_tokens, softmax_scale=scale)


def document_block_mask(cu_seqlens: torch.Tensor, total: int):
    """FlexAttention's BlockMask keeping each image's queries on its own keys (the document mask) of T
    packed tokens: built once per offsets (every layer of a step shares it), as a model would.
    Raises RuntimeError("flex_attention is unavailable: ...") where this torch has no FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as err:
        raise RuntimeError(f"flex_attention is unavailable: {err}") from err
    image = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(total, device=cu_seqlens.device), right=True)

    def same_image(b, h, q_idx, kv_idx):
        return image[q_idx] == image[kv_idx]

    try:
        return create_block_mask(same_image, None, None, total, total, device=cu_seqlens.device)
    except NotImplementedError as err:
        raise RuntimeError(f"flex_attention is unavailable: {err}") from err


def flex_varlen_rpb_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                              positions: torch.Tensor, cu_seqlens: torch.Tensor, *, grid_size: Sequence[int],
                              num_prefix_tokens: int = 1, scale: Optional[float] = None,
                              kernel_options: Optional[dict] = None, block_mask=None) -> torch.Tensor:
    """FlexAttention on the packed tokens as one sequence: a document block mask (query and key of the
    same image; block_mask: document_block_mask's, built here when None) and the relative position bias
    gathered in its score_mod. (T, H, D) out.
    Raises RuntimeError("flex_attention is unavailable: ...") where this torch cannot run it."""
    flex_attention = _flex_attention_for(q.device)
    total = q.shape[0]
    grid_size = tuple(grid_size)
    if block_mask is None:
        block_mask = document_block_mask(cu_seqlens, total)

    def add_relative_position_bias(score, b, h, q_idx, kv_idx):
        rel = relative_index(positions[q_idx], positions[kv_idx], grid_size, num_prefix_tokens)
        return score + bias_table[rel, h].to(score.dtype)

    try:
        out = flex_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), score_mod=add_relative_position_bias,
                             block_mask=block_mask, scale=scale, kernel_options=kernel_options)
    except NotImplementedError as err:
        raise RuntimeError(f"flex_attention is unavailable: {err}") from err
    return out[0].transpose(0, 1)
