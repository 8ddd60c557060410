"""The ways rpb_attention is done without this package's kernels: the anchors the benchmarks measure
it against, and alternative `RelPosAttention(impl=...)` paths. Same semantics as `rpb_attention`.

- published_rpb_attention: the bias as the PSS authors' published code builds it
  (simmim/models/pss_vision_transformer.py, the sampling block and the `Attention` class):
  the full (N, N, H) bias gathered from the table, copied per image, indexed twice (rows, then
  columns by the kept positions); eager softmax attention.
- eager_index_rpb_attention: the same numbers, the bias built more cheaply: the (N, N)
  relative-position index indexed with the kept positions first, the table looked up once into
  a dense (B, H, n, n) bias; eager softmax attention (backward scatters the dense bias gradient
  into the table).
- sdpa_bias_rpb_attention: the same dense bias passed as `attn_mask` to
  F.scaled_dot_product_attention (what timm's Beit does); the caller picks the SDPA backend
  (the benchmark uses EFFICIENT, the only fused one that takes a bias with a gradient).
- flex_rpb_attention: FlexAttention with a `score_mod` that gathers bias_table[rel(...), h];
  its table gradient is accumulated with one global atomic per score (the known ~30x cliff of a global atomic per score element).

One helper gives every path that is not the fused kernel what rpb_attention(return_cls_attention=True)
returns from its kernel:
- cls_attention: the head-averaged attention of the CLS query, from q_cls and K and the CLS row of
  the bias, in O(B H n D).
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .reference import full_relative_index, relative_index


def dense_bias(bias_table: torch.Tensor, index: Optional[torch.Tensor], grid_size: Sequence[int],
               num_prefix_tokens: int = 1) -> torch.Tensor:
    """(B or 1, H, n, n) bias, one table lookup: advanced indexing of the (N, N) index buffer with
    the kept positions, then of the table with the (B, n, n) rows that gives."""
    rel = full_relative_index(tuple(grid_size), num_prefix_tokens, bias_table.device)
    if index is not None:
        rel = rel[index[:, :, None], index[:, None, :]]  # (B, n, n)
    else:
        rel = rel[None]
    return bias_table[rel].permute(0, 3, 1, 2)


def published_dense_bias(bias_table: torch.Tensor, index: Optional[torch.Tensor], grid_size: Sequence[int],
                         num_prefix_tokens: int = 1) -> torch.Tensor:
    """(B or 1, H, n, n) bias built the way the PSS authors' published code builds it.

    Written from a description of simmim/models/pss_vision_transformer.py (its sampling block and
    `Attention` class), not copied from it: the table is looked up with the whole (N, N)
    relative_position_index into the full (N, N, H) bias, that bias is copied per image to
    (B, N, N, H), and the copy is indexed twice, rows by the kept positions (B, n, N, H), then
    columns (B, n, n, H). At index=None (rho = 1) the full bias is used as it is, as there.

    The values are those of `dense_bias`; the work is not: the gather of N^2 H entries and the
    (B, n, N, H) intermediate scale with N, not n. The table gradient sums the same terms in
    another order (over images first, then over position pairs), so in float32 it agrees with
    `dense_bias`'s to rounding, not bit for bit, when index is given.
    """
    rel = full_relative_index(tuple(grid_size), num_prefix_tokens, bias_table.device)
    num_positions = rel.shape[0]
    full = bias_table[rel.reshape(-1)].view(num_positions, num_positions, -1)  # (N, N, H)
    if index is None:
        return full.permute(2, 0, 1)[None]
    batch, num_tokens = index.shape
    images = torch.arange(batch, device=index.device)
    per_image = full[None].expand(batch, -1, -1, -1)  # (B, N, N, H)
    rows = per_image[images[:, None], index]  # (B, n, N, H)
    kept = rows[images[:, None, None], torch.arange(num_tokens, device=index.device)[None, :, None],
                index[:, None, :]]  # (B, n, n, H)
    return kept.permute(0, 3, 1, 2)


def cls_attention(q: torch.Tensor, k: torch.Tensor, bias_table: Optional[torch.Tensor] = None,
                  index: Optional[torch.Tensor] = None, *, grid_size: Optional[Sequence[int]] = None,
                  num_prefix_tokens: int = 1, scale: Optional[float] = None) -> torch.Tensor:
    """(B, n) float32, no gradient: mean over heads of softmax(q[:, :, 0] k^T * scale + bias[:, :, 0]).

    Row 0 of the attention matrix without building it: one (B, H, n) logit row from q_cls (B, H, D)
    and K (B, H, n, D), plus the CLS query's bias row (table row R-3 for patch keys, R-1 for the
    CLS key, gathered through `index`); bias_table=None for attention without a bias. O(B H n D).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.no_grad():
        compute_dtype = torch.promote_types(q.dtype, torch.float32)
        logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].to(compute_dtype), k.to(compute_dtype)) * scale
        if bias_table is not None:
            positions = index if index is not None else torch.arange(q.shape[2], device=q.device)[None]
            rows = relative_index(positions[:, :1], positions, tuple(grid_size), num_prefix_tokens)  # (B | 1, n)
            logits = logits + bias_table.detach().to(compute_dtype)[rows].transpose(1, 2)
        return logits.softmax(-1).mean(1).float()


def _eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     scale: Optional[float]) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v in eager PyTorch; logits and softmax in the bias's precision
    (float32 for a float32 table, as under autocast), the products in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q * scale, k.transpose(-1, -2)) + bias
    return torch.matmul(logits.softmax(-1).to(v.dtype), v)


def published_rpb_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                            index: Optional[torch.Tensor] = None, *, grid_size: Sequence[int],
                            num_prefix_tokens: int = 1, scale: Optional[float] = None) -> torch.Tensor:
    """Eager attention with the bias of `published_dense_bias`: the published PSS path."""
    return _eager_attention(q, k, v, published_dense_bias(bias_table, index, grid_size, num_prefix_tokens), scale)


def eager_index_rpb_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                              index: Optional[torch.Tensor] = None, *, grid_size: Sequence[int],
                              num_prefix_tokens: int = 1, scale: Optional[float] = None) -> torch.Tensor:
    """Eager attention, the dense bias looked up once through the indexed relative-position index
    (`dense_bias`): the published path's numbers at a lower cost."""
    return _eager_attention(q, k, v, dense_bias(bias_table, index, grid_size, num_prefix_tokens), scale)


def sdpa_bias_rpb_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                            index: Optional[torch.Tensor] = None, *, grid_size: Sequence[int],
                            num_prefix_tokens: int = 1, scale: Optional[float] = None) -> torch.Tensor:
    """F.scaled_dot_product_attention with the dense per-image bias (in q's dtype) as attn_mask."""
    bias = dense_bias(bias_table, index, grid_size, num_prefix_tokens).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


_compiled_flex_attention = None


def _flex_attention_for(device: torch.device):
    """torch.compile(flex_attention) on CUDA (its fused Triton kernels); the eager (unfused,
    reference) flex_attention elsewhere, where it is only a correctness peer."""
    global _compiled_flex_attention
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as err:
        raise RuntimeError(f"flex_attention is unavailable: torch {torch.__version__} has no "
                           f"torch.nn.attention.flex_attention ({err})") from err
    if device.type != "cuda":
        return flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


def flex_rpb_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                       index: Optional[torch.Tensor] = None, *, grid_size: Sequence[int],
                       num_prefix_tokens: int = 1, scale: Optional[float] = None,
                       kernel_options: Optional[dict] = None) -> torch.Tensor:
    """FlexAttention whose score_mod adds bias_table[rel(pos[b, q_idx], pos[b, kv_idx]), h].

    kernel_options go to flex_attention as they are (the benchmark asks for {"BACKEND": "TRITON"}
    where this torch knows the key). Raises RuntimeError("flex_attention is unavailable: ...")
    where this torch has no FlexAttention or cannot run it for these inputs (e.g. its backward on CPU).
    """
    flex_attention = _flex_attention_for(q.device)
    grid_size = tuple(grid_size)
    batch, _, num_tokens, _ = q.shape
    positions = index if index is not None else torch.arange(num_tokens, device=q.device).expand(batch, -1)

    def add_relative_position_bias(score, b, h, q_idx, kv_idx):
        rel = relative_index(positions[b, q_idx], positions[b, kv_idx], grid_size, num_prefix_tokens)
        return score + bias_table[rel, h].to(score.dtype)

    try:
        return flex_attention(q, k, v, score_mod=add_relative_position_bias, scale=scale,
                              kernel_options=kernel_options)
    except NotImplementedError as err:  # what flex_attention raises for unsupported devices / modes
        raise RuntimeError(f"flex_attention is unavailable: {err}") from err


def flex_training_unavailable(device: torch.device) -> Optional[str]:
    """Why `flex_rpb_attention` cannot train (forward + backward with a table gradient) on
    `device`, or None. Off CUDA it runs one tiny forward + backward to find out (this torch's
    FlexAttention has no CPU backward); on CUDA it only checks that FlexAttention exists, since a
    probe there would compile it (tens of seconds), and failures for a shape are the caller's."""
    device = torch.device(device)
    try:
        _flex_attention_for(device)
    except RuntimeError as err:
        return str(err)
    if device.type == "cuda":
        return None
    q, k, v = (torch.zeros(1, 1, 5, 16, device=device, requires_grad=True) for _ in range(3))
    table = torch.zeros(12, 1, device=device, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            flex_rpb_attention(q, k, v, table, grid_size=(2, 2)).sum().backward()
    except RuntimeError as err:
        return str(err)
    return None
