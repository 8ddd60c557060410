"""`RelPosAttention`: multi-head self-attention with a per-layer relative position bias table,
in the parameter layout of timm's `Beit` Attention so timm / BEiT / SimMIM checkpoints load.

    qkv = x W_qkv^T + [q_bias, 0, v_bias]       (BEiT: no key bias)
    out = proj(rpb_attention(q, k, v, relative_position_bias_table, index))

state_dict keys: qkv.weight, q_bias, v_bias, relative_position_bias_table (R, H), proj.weight,
proj.bias. `index` (B, n) from the sampling block says which of the N = num_prefix_tokens +
Gh*Gw positions each of the n tokens of x holds; None means all N in order. Attributes `impl`,
`backend`, `deterministic` and `check_index` (default False, see __init__) may be changed between
calls. `deterministic=True` makes the bias-table gradient bit-identical run to run (on the triton
backend a slower ordered accumulation instead of atomics; see rpb_attention); it applies to
impl="pss", the peers ignore it.

In-network token selection and growth (models/token_pruning.py, models/growth.py):
- `active_heads` (default num_heads): only the first m heads run, on the weight slices they own
  (qkv rows, q/v bias, table columns, proj columns), so the compute really shrinks.
- forward(..., stats="cls") also returns the head-averaged CLS attention (B, n): from the kernel
  on impl="pss", from `cls_attention` (q_cls and K, O(B H n D)) on the peers; stats="map" also
  returns the head-averaged attention map (B, n, n) and runs the dense torch path.
- forward(..., key_mask=(B, n, n) bool) runs `masked_attention` (Tri-Level's attention level):
  each query sees only the keys its mask row allows. No kernel takes a mask: this is the torch path.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..._checks import check_bool, check_choice, check_grid_size, check_int, check_tensor
from .op import OP_BACKENDS, rpb_attention
from .peers import (cls_attention, dense_bias, eager_index_rpb_attention, flex_rpb_attention, masked_attention,
                    published_rpb_attention, sdpa_bias_rpb_attention)
from .reference import bias_table_rows

# impl -> the peer it runs ("pss": the package's rpb_attention); see peers.py for what each one is.
IMPLS = {"pss": None, "published": published_rpb_attention, "eager-index": eager_index_rpb_attention,
         "sdpa-bias": sdpa_bias_rpb_attention, "flex": flex_rpb_attention}
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


class RelPosAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, grid_size: Sequence[int], num_prefix_tokens: int = 1,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, impl: str = "pss",
                 backend: Optional[str] = None, deterministic: bool = False):
        super().__init__()
        check_int("dim", dim, minimum=1)
        check_int("num_heads", num_heads, minimum=1)
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads={num_heads}, got {dim}")
        grid_size = check_grid_size(grid_size)
        check_int("num_prefix_tokens", num_prefix_tokens, minimum=0, maximum=1)
        check_choice("impl", impl, IMPLS)
        check_choice("backend", backend, (None,) + OP_BACKENDS)
        check_bool("deterministic", deterministic)
        if attn_drop != 0.0:
            # No fused kernel (nor the peers) drops attention probabilities; ViT/DeiT/BEiT recipes use 0.
            raise ValueError(f"attn_drop must be 0.0 (attention-probability dropout is not supported), got {attn_drop}")
        self.num_heads = num_heads
        self.active_heads = num_heads  # growth (models/growth.py) runs the first m heads only
        self.grid_size = grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.impl = impl
        self.backend = backend
        self.deterministic = deterministic
        # rpb_attention's host check of `index` costs a device sync per layer; the index comes from
        # the model's own sampler, and a bad one cannot make the kernels read out of bounds anyway
        # (they clamp positions; torch indexing is bounds-checked). Set True to debug a new caller.
        self.check_index = False
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(bias_table_rows(self.grid_size, num_prefix_tokens), num_heads))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._register_load_state_dict_pre_hook(self._drop_relative_position_index)

    @staticmethod
    def _drop_relative_position_index(state_dict, prefix, *args):
        # Original BEiT/SimMIM checkpoints also store the (N+1, N+1) `relative_position_index`
        # buffer; the kernels compute it from positions, so it is not part of this module.
        state_dict.pop(prefix + "relative_position_index", None)

    def forward(self, x: torch.Tensor, index: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None,
                stats: Optional[str] = None):
        """x: (B, n, dim) tokens at positions `index` (B, n) (None: all N in order) -> (B, n, dim).

        key_mask: (B, n, n) bool, query i attends key j only where True (the torch path).
        stats: None, "cls" or "map": then returns (out, cls_attention (B, n) float32,
        attention_map (B, n, n) float32 for "map", else None), both averaged over the active heads
        and without gradient.
        """
        check_tensor("x", x, ndim=3, dtypes=None)
        check_choice("stats", stats, STATS)
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
        options = dict(grid_size=self.grid_size, num_prefix_tokens=self.num_prefix_tokens)
        cls_attn = attention_map = None
        if key_mask is not None or stats == "map":
            out, probs = masked_attention(q, k, v, dense_bias(table, index, **options), key_mask)
            cls_attn, attention_map = head_stats(probs, stats)
        elif self.impl == "pss":
            out = rpb_attention(q, k, v, table, index, backend=self.backend, deterministic=self.deterministic,
                                check_index=self.check_index, return_cls_attention=stats == "cls", **options)
            if stats == "cls":
                out, cls_attn = out
        else:
            out = IMPLS[self.impl](q, k, v, table, index, **options)
            if stats == "cls":
                cls_attn = cls_attention(q, k, table, index, **options)
        out = out.transpose(1, 2).reshape(batch, num_tokens, width)
        if heads == self.num_heads:
            out = self.proj(out)
        else:
            out = F.linear(out, self.proj.weight[:, :width], self.proj.bias)
        out = self.proj_drop(out)
        return out if stats is None else (out, cls_attn, attention_map)

    def extra_repr(self) -> str:
        active = f", active_heads={self.active_heads}" if self.active_heads != self.num_heads else ""
        return (f"num_heads={self.num_heads}{active}, grid_size={self.grid_size}, "
                f"num_prefix_tokens={self.num_prefix_tokens}, impl={self.impl!r}"
                + (", deterministic=True" if self.deterministic else ""))
