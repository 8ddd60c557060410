"""ViT building blocks: patch embedding, plain attention, MLP, layer scale, stochastic depth, block.

Token tensors are (B, n, C) with the CLS token first; `index` is the (B, n) position of each
token in the full sequence of N = 1 + Gh*Gw tokens (None when no token was dropped).

The attention classes (models/attention.py) and the MLP can run on a prefix of their width
(`active_heads`, `active_hidden`; Budgeted Training's growth, models/growth.py); the attention
classes take the `key_mask` / `stats` arguments of in-network token selection (models/token_pruning.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import PlainAttention, RelPosBlockAttention


class PatchEmbed(nn.Module):
    """(B, C_in, H, W) images -> (B, Gh*Gw, C) tokens, row-major over the patch grid."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size must be divisible by patch_size={patch_size}, got {img_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"images must have shape (B, C, {self.img_size}, {self.img_size}), "
                             f"got {tuple(images.shape)}")
        return self.proj(images).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2; with `active_hidden` < hidden units only the first ones run (fc1 rows and
    bias, fc2 columns: the compute shrinks with them)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)
        self.active_hidden = hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.active_hidden
        if hidden == self.fc1.out_features:
            return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
        x = self.drop(self.act(F.linear(x, self.fc1.weight[:hidden], self.fc1.bias[:hidden])))
        return self.drop(F.linear(x, self.fc2.weight[:, :hidden], self.fc2.bias))


class LayerScale(nn.Module):
    """x * gamma with a learnable per-channel gamma (CaiT / BEiT), initialised small."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch for a random subset of images, rescale the rest.

    out[b] = x[b] * m_b / (1 - p), m_b ~ Bernoulli(1 - p), during training only.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        return x * mask / keep_prob


class Block(nn.Module):
    """Pre-norm transformer block; attention is RelPosBlockAttention (own bias table) or PlainAttention."""

    def __init__(self, dim: int, num_heads: int, grid_size: Tuple[int, int], *, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, rpb: bool = True, layer_scale_init: Optional[float] = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, attn_impl: str = "pss",
                 backend: Optional[str] = None, deterministic: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if rpb:
            self.attn = RelPosBlockAttention(dim, num_heads, grid_size, num_prefix_tokens=1, qkv_bias=qkv_bias,
                                        attn_drop=attn_drop, proj_drop=drop, impl=attn_impl, backend=backend,
                                        deterministic=deterministic)
        else:
            self.attn = PlainAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), index)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward_tokens(self, x: torch.Tensor, index: Optional[torch.Tensor], key_mask: Optional[torch.Tensor],
                       selector=None):
        """The block with in-network token selection: (x, index, key_mask) -> the same three after it.

        key_mask (B, n, n) bool or None restricts each query's keys (attention level). `selector`
        (a models.token_pruning.TokenPruning, or None) reads this block's attention statistics
        (`selector.stats`) and is applied after the attention residual or after the MLP
        (`selector.after`): selector.select(x, index, key_mask, cls_attention, attention_map) ->
        (x, index, key_mask) with fewer tokens.
        """
        stats = None if selector is None else selector.stats
        out = self.attn(self.norm1(x), index, key_mask=key_mask, stats=stats)
        if stats is not None:
            out, cls_attn, attention_map = out
        x = x + self.drop_path1(self.ls1(out))
        if stats is not None and selector.after == "attention":
            x, index, key_mask = selector.select(x, index, key_mask, cls_attn, attention_map)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if stats is not None and selector.after == "mlp":
            x, index, key_mask = selector.select(x, index, key_mask, cls_attn, attention_map)
        return x, index, key_mask
