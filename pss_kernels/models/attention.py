"""The ViT's attention layers with what the training methods need, on top of the op's module.

`ops/rpb_attention/module.RelPosAttention` is the op's thin module (timm / BEiT parameter layout,
`impl` and `backend`); it knows nothing of the methods. Here:
- `active_heads` (default num_heads): only the first m heads run, on the weight slices they own
  (qkv rows, q/v bias, table columns, proj columns), so the compute really shrinks (Budgeted
  Training's growth, models/growth.py).
- forward(..., stats="cls") also returns the head-averaged CLS attention (B, n): from the kernel
  on impl="pss", from `peers.cls_attention` (q_cls and K, O(B H n D)) on the peers; stats="map"
  also returns the head-averaged attention map (B, n, n) and runs the dense torch path
  (Tri-Level's token selectors, models/token_pruning.py).
- forward(..., key_mask=(B, n, n) bool) runs `masked_attention` (Tri-Level's attention level):
  each query sees only the keys its mask row allows. No kernel takes a mask: this is the torch path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_tensor
from ..ops.rpb_attention.module import RelPosAttention
from ..ops.rpb_attention.peers import cls_attention, dense_bias

# What forward(stats=...) returns besides the output: nothing, the CLS attention, or both it and the map.
STATS = (None, "cls", "map")


def active_qkv_weight(weight: torch.Tensor, num_heads: int, active_heads: int) -> torch.Tensor:
    """The rows of a fused (3 H D, dim) qkv weight (or a (3 H D,) bias) that the first `active_heads`
    heads read: [q of heads < m; k of heads < m; v of heads < m]. The full tensor when m == H."""
    if active_heads == num_heads:
        return weight
    return weight.view(3, num_heads, -1, *weight.shape[1:])[:, :active_heads].reshape(-1, *weight.shape[1:])


def head_stats(probs: torch.Tensor, stats: Optional[str]):
    """(CLS attention (B, n), attention map (B, n, n) or None) averaged over heads, detached."""
    probs = probs.detach()
    return probs[:, :, 0].mean(1), (probs.mean(1) if stats == "map" else None)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                     key_mask: Optional[torch.Tensor], scale: Optional[float] = None):
    """(out (B, H, n, D) in q's dtype, probs (B, H, n, n) float32) of eager attention in which query i
    sees key j only where key_mask[b, i, j] (bool (B, n, n); None: every key), with an optional dense
    bias (B | 1, H, n, n). Every row must allow one key at least (the CLS key, in the model).

    The logits are computed in full before the mask removes entries: a mask chosen per query saves
    no multiply of q k^T or of probs v in dense attention (models/token_pruning.py says what it costs).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    logits = torch.matmul(q.to(compute_dtype) * scale, k.to(compute_dtype).transpose(-1, -2))
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None], float("-inf"))
    probs = logits.softmax(-1)
    return torch.matmul(probs, v.to(compute_dtype)).to(q.dtype), probs


class RelPosBlockAttention(RelPosAttention):
    """RelPosAttention with `active_heads`, `key_mask` and `stats` (see the module docstring); the
    same parameters and state_dict keys, so checkpoints load alike."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active_heads = self.num_heads  # growth (models/growth.py) runs the first m heads only

    def forward(self, x: torch.Tensor, index: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None,
                stats: Optional[str] = None):
        """x: (B, n, dim) tokens at positions `index` (B, n) (None: all N in order) -> (B, n, dim).

        key_mask: (B, n, n) bool, query i attends key j only where True (the torch path).
        stats: None, "cls" or "map": then returns (out, cls_attention (B, n) float32,
        attention_map (B, n, n) float32 for "map", else None), both averaged over the active heads
        and without gradient.
        """
        check_choice("stats", stats, STATS)
        if key_mask is None and stats is None and self.active_heads == self.num_heads:
            return super().forward(x, index)  # the op's own path
        check_tensor("x", x, ndim=3, dtypes=None)
        batch, num_tokens, dim = x.shape
        if dim != self.qkv.in_features:
            raise ValueError(f"x must have dim={self.qkv.in_features} channels (B, n, dim), got shape {tuple(x.shape)}")
        heads = self.active_heads
        head_dim = dim // self.num_heads
        width = heads * head_dim
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias[:width], torch.zeros_like(self.q_bias[:width]), self.v_bias[:width]))
        qkv = F.linear(x, active_qkv_weight(self.qkv.weight, self.num_heads, heads), bias)
        q, k, v = qkv.reshape(batch, num_tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        table = self.relative_position_bias_table
        if heads != self.num_heads:
            table = table[:, :heads]
        cls_attn = attention_map = None
        if key_mask is not None or stats == "map":
            bias = dense_bias(table, index, grid_size=self.grid_size, num_prefix_tokens=self.num_prefix_tokens)
            out, probs = masked_attention(q, k, v, bias, key_mask)
            cls_attn, attention_map = head_stats(probs, stats)
        else:
            out = self.attend(q, k, v, table, index, return_cls_attention=stats == "cls")
            if stats == "cls":
                out, cls_attn = out
        out = out.transpose(1, 2).reshape(batch, num_tokens, width)
        if heads == self.num_heads:
            out = self.proj(out)
        else:
            out = F.linear(out, self.proj.weight[:, :width], self.proj.bias)
        out = self.proj_drop(out)
        return out if stats is None else (out, cls_attn, attention_map)

    def extra_repr(self) -> str:
        active = f", active_heads={self.active_heads}" if self.active_heads != self.num_heads else ""
        return super().extra_repr() + active


class PlainAttention(nn.Module):
    """Multi-head self-attention without position bias (the baseline), on SDPA.

    `index` is accepted for the same call signature as RelPosAttention and unused: without a
    relative bias, positions only enter through the absolute embedding the tokens carry.
    `active_heads`, `key_mask` and `stats` as RelPosBlockAttention's; stats="map" runs eager attention
    (without attention-probability dropout), stats="cls" SDPA plus `cls_attention` (O(B H n D)).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.active_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, index: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None,
                stats: Optional[str] = None):
        check_choice("stats", stats, STATS)
        batch, num_tokens, dim = x.shape
        heads, head_dim = self.active_heads, dim // self.num_heads
        width = heads * head_dim
        bias = None if self.qkv.bias is None else active_qkv_weight(self.qkv.bias, self.num_heads, heads)
        qkv = F.linear(x, active_qkv_weight(self.qkv.weight, self.num_heads, heads), bias)
        q, k, v = qkv.reshape(batch, num_tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        cls_attn = attention_map = None
        if stats == "map":
            out, probs = masked_attention(q, k, v, None, key_mask)
            cls_attn, attention_map = head_stats(probs, stats)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if key_mask is None else key_mask[:, None],
                                                 dropout_p=self.attn_drop if self.training else 0.0)
            if stats == "cls":
                cls_attn = cls_attention(q, k)
        out = out.transpose(1, 2).reshape(batch, num_tokens, width)
        out = self.proj(out) if heads == self.num_heads else F.linear(out, self.proj.weight[:, :width], self.proj.bias)
        out = self.proj_drop(out)
        return out if stats is None else (out, cls_attn, attention_map)
