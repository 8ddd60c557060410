"""RelPosAttention (lead's minimal version; issue 3 owner extends)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .op import rpb_attention
from .reference import bias_table_rows


class RelPosAttention(nn.Module):
    def __init__(self, dim, num_heads, grid_size, num_prefix_tokens=1, qkv_bias=True, attn_drop=0.0,
                 proj_drop=0.0, impl="pss", backend=None):
        super().__init__()
        self.num_heads, self.grid_size, self.num_prefix_tokens = num_heads, tuple(grid_size), num_prefix_tokens
        self.impl, self.backend = impl, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(bias_table_rows(self.grid_size, num_prefix_tokens), num_heads))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, index=None):
        B, n, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = rpb_attention(qkv[0], qkv[1], qkv[2], self.relative_position_bias_table, index,
                            grid_size=self.grid_size, num_prefix_tokens=self.num_prefix_tokens, backend=self.backend)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, n, C)))
