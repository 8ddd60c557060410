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

The model layer (models/attention.py) subclasses it with what the training methods need (active
heads for growth, key masks and attention statistics for token pruning); this module knows nothing
of the methods.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..._checks import check_bool, check_choice, check_grid_size, check_int, check_tensor
from .op import OP_BACKENDS, rpb_attention
from .peers import (eager_index_rpb_attention, flex_rpb_attention, published_rpb_attention,
                    sdpa_bias_rpb_attention)
from .reference import bias_table_rows

# impl -> the peer it runs ("pss": the package's rpb_attention); see peers.py for what each one is.
IMPLS = {"pss": None, "published": published_rpb_attention, "eager-index": eager_index_rpb_attention,
         "sdpa-bias": sdpa_bias_rpb_attention, "flex": flex_rpb_attention}
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

    def forward(self, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, n, dim) tokens at positions `index` (B, n) (None: all N in order) -> (B, n, dim)."""
        check_tensor("x", x, ndim=3, dtypes=None)
        if x.shape[-1] != self.qkv.in_features:
            raise ValueError(f"x must have dim={self.qkv.in_features} channels (B, n, dim), got shape {tuple(x.shape)}")
        batch, num_tokens, dim = x.shape
        bias = None if self.q_bias is None else torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(batch, num_tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = self.attend(q, k, v, self.relative_position_bias_table, index)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, num_tokens, dim)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
               index: Optional[torch.Tensor], return_cls_attention: bool = False):
        """(B, H, n, D) q, k, v and an (R, H) table -> the attention output (B, H, n, D) of `impl`
        (and the head-averaged CLS attention (B, n) with return_cls_attention: from the kernel on
        impl="pss", from peers.cls_attention on the others)."""
        options = dict(grid_size=self.grid_size, num_prefix_tokens=self.num_prefix_tokens)
        if self.impl == "pss":
            return rpb_attention(q, k, v, table, index, backend=self.backend, deterministic=self.deterministic,
                                 check_index=self.check_index, return_cls_attention=return_cls_attention, **options)
        out = IMPLS[self.impl](q, k, v, table, index, **options)
        if return_cls_attention:
            from .peers import cls_attention
            return out, cls_attention(q, k, table, index, **options)
        return out

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, grid_size={self.grid_size}, "
                f"num_prefix_tokens={self.num_prefix_tokens}, impl={self.impl!r}"
                + (", deterministic=True" if self.deterministic else ""))
