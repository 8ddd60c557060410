"""Reference ViT for Patch Sampling Schedule training (PSS paper, Fig. 2).

    images (B, 3, H, W)
      -> patch embedding (Conv2d, stride = patch)         (B, P, C),   P = (H/p)(W/p)
      -> [CLS] + patches (+ absolute position embedding)  (B, N, C),   N = 1 + P
      -> PatchSampler: keep the top-k tokens by L1 norm   (B, k, C),   k = max(2, round(rho N))
         (scored after the position embedding, as the paper's DeiT variant; skipped at rho = 1)
      -> depth x Block(x, index): attention with a relative position bias gathered per
         image from `index` (B, k), one bias table per layer
      -> pool="mean" (PSS, BEiT, SimMIM): mean over the kept patch tokens (CLS excluded)
         -> LayerNorm `fc_norm` -> Linear head
         pool="cls" (timm ViT / DeiT): LayerNorm `norm` -> the CLS token -> Linear head

With `rpb=False` every block uses plain SDPA attention without bias (the baseline ViT).

Methods are configurations of this one model: `token_pruning` (models/token_pruning.py: Tri-Level
E-ViT's CLS-attention selectors inside the network and its attention level) and the active widths
that Budgeted Training grows (models/growth.py: `active_heads`, `active_hidden`, centre-cropped
tokens through the input sampler's scorer="center").
"""
from __future__ import annotations

import math
from typing import Optional, Set, Tuple

import torch
from torch import nn

from .._backends import OP_BACKENDS
from .._checks import check_choice, check_keep_rate
from ..ops.rpb_attention.module import IMPLS as RELPOS_IMPLS
from ..ops.sample_patches.module import IMPLS as SAMPLER_IMPLS, PatchSampler
from .layers import Block, PatchEmbed
from ..ops.varlen.allocation import ALLOCATIONS
from .token_pruning import TokenPruning

# "pss" = the package's kernels; the others are the peers they are measured against (peers.py).
ATTN_IMPLS = tuple(RELPOS_IMPLS)
POOLS = ("mean", "cls")


def init_linear(module: nn.Linear) -> None:
    """ViT / DeiT: truncated normal(0.02) weight, zero bias."""
    nn.init.trunc_normal_(module.weight, std=0.02)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """ViT-style classifier whose patch sampling block keeps a fraction `keep_rate` of its tokens.

    `model.keep_rate` (rho, a fraction of all N tokens, CLS included) applies in *both* training
    and eval mode: `model.eval()` switches off dropout and stochastic depth, not sampling, so a
    PSS-trained model can trade accuracy for throughput at inference by lowering it (dynamic
    inference). For the full-token accuracy set `model.keep_rate = 1.0` or call
    `model(images, keep_rate=1.0)` (a per-call rate leaves the attribute as it was). pss-train
    evaluates at rho = 1 whatever its schedule did, and leaves `keep_rate` at 1.0 between steps.

    Args (besides the ViT shape: img_size, patch_size, in_chans, num_classes, embed_dim, depth,
    num_heads, mlp_ratio, qkv_bias, layer_scale_init, drop_rate, attn_drop_rate, drop_path_rate):
        rpb: a relative position bias table per block (RelPosAttention); False: plain SDPA attention.
        abs_pos_embed: an absolute position embedding added before sampling.
        keep_rate: initial rho in (0, 1]; 1.0 skips the sampler (attention takes index=None).
        scorer: "l1" | "l2" | "random" | "center": how the sampler ranks patches (see sample_patches;
            "center": nearest the grid centre, Budgeted Training's token crop). "given" is refused:
            the input sampler runs before any attention, so there are no scores to give (selection
            by CLS attention is `token_pruning`).
        allocation: "fixed" (every image keeps round(rho N) tokens: PSS) | "budget" | "mass" (each image
            keeps what ops.varlen's policy gives it, on packed tokens: models/packed.py).
        token_pruning: a TokenPruning plan (selectors inside the network; Tri-Level E-ViT), or None.
            `model.token_keep_rate` / `model.attention_keep_rate` set its R_T / R_A.
        attn_impl / sampler_impl: "pss" (the package's ops) or a peer they are measured against.
        sampler_backend / attn_backend: the backend= of sample_patches / rpb_attention (None: the
            package's choice per device, or PSS_KERNELS_BACKEND).
        deterministic: bit-identical bias-table gradients run to run (rpb_attention's
            deterministic=True in every block; the rest of a GPU step also needs
            torch.use_deterministic_algorithms, which `pss-train --deterministic` turns on).
        pool: "mean" (default; PSS, BEiT, SimMIM): the mean of the kept patch tokens, then the
            LayerNorm `fc_norm`. "cls" (timm ViT / DeiT): the final LayerNorm `norm`, then the CLS
            token (always kept by the sampler, so this works at any keep rate). The norm's name
            follows timm's for each, so pool="mean" state dicts are as before and a timm checkpoint
            loads one to one (see load_pretrained).
    """

    num_prefix_tokens = 1  # the CLS token

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, rpb: bool = True, abs_pos_embed: bool = True,
                 layer_scale_init: Optional[float] = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, keep_rate: float = 1.0, scorer: str = "l1",
                 attn_impl: str = "pss", sampler_impl: str = "pss", sampler_backend: Optional[str] = None,
                 attn_backend: Optional[str] = None, deterministic: bool = False, pool: str = "mean",
                 token_pruning: Optional[TokenPruning] = None, allocation: str = "fixed"):
        super().__init__()
        check_choice("attn_impl", attn_impl, ATTN_IMPLS)
        check_choice("allocation", allocation, ALLOCATIONS)
        check_choice("sampler_impl", sampler_impl, SAMPLER_IMPLS)
        check_choice("pool", pool, POOLS)
        # Here, not at the first forward at rho < 1 (or never, for a backend the packed path replaces).
        check_choice("sampler_backend", sampler_backend, (None, *OP_BACKENDS["sample_patches"]))
        check_choice("attn_backend", attn_backend, (None, *OP_BACKENDS["rpb_attention"]))
        if scorer == "given":
            raise ValueError("scorer='given' needs scores from the caller, and the input sampler runs before any "
                             "block, so the model has none to give it; rank the input by 'l1', 'l2', 'random' or "
                             "'center', and select by CLS attention inside the network with "
                             "token_pruning=TokenPruning(...) (models/token_pruning.py)")
        if token_pruning is not None and not isinstance(token_pruning, TokenPruning):
            raise TypeError(f"token_pruning must be a TokenPruning or None, got {type(token_pruning).__name__}")
        self.num_classes, self.embed_dim, self.rpb, self.pool = num_classes, embed_dim, rpb, pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size = self.patch_embed.grid_size
        num_tokens = self.num_prefix_tokens + self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim)) if abs_pos_embed else None
        self.pos_drop = nn.Dropout(drop_rate)
        self.sampler = PatchSampler(check_keep_rate(keep_rate), scorer=scorer,
                                    num_prefix_tokens=self.num_prefix_tokens, impl=sampler_impl, backend=sampler_backend,
                                    grid_size=self.grid_size)
        # Stochastic depth grows linearly with depth (DeiT / BEiT).
        drop_path_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, self.grid_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, rpb=rpb,
                  layer_scale_init=layer_scale_init, drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path=rate, attn_impl=attn_impl, backend=attn_backend, deterministic=deterministic)
            for rate in drop_path_rates])
        if token_pruning is not None:
            token_pruning.check_depth(depth)
            if token_pruning.backend is None:
                token_pruning.backend = sampler_backend
        self.token_pruning = token_pruning
        self.allocation = allocation  # who decides each image's kept tokens (models/packed.py)
        if allocation != "fixed":
            from .packed import check_packable
            check_packable(self)
        # timm's layout: one of the two is a LayerNorm, the other has no parameters.
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if pool == "cls" else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if pool == "mean" else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # ViT / DeiT: truncated normal(0.02) for embeddings and linear layers, patch projection as a linear map.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        proj = self.patch_embed.proj
        nn.init.trunc_normal_(proj.weight, std=math.sqrt(1.0 / proj.weight[0].numel()))
        nn.init.zeros_(proj.bias)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_linear(module)

    @property
    def keep_rate(self) -> float:
        """Fraction rho of tokens (CLS included) the sampler keeps, in train and eval mode alike;
        1.0 skips sampling."""
        return self.sampler.keep_rate

    @keep_rate.setter
    def keep_rate(self, value: float) -> None:
        self.sampler.keep_rate = check_keep_rate(value)

    @property
    def token_keep_rate(self) -> float:
        """R_T of `token_pruning` (1.0 without it): the fraction of the current patch tokens each
        in-network selector keeps; a schedule sets it each step (schedules.WarmupCosine)."""
        return 1.0 if self.token_pruning is None else self.token_pruning.token_keep_rate

    @token_keep_rate.setter
    def token_keep_rate(self, value: float) -> None:
        if self._has_pruning("token_keep_rate", value):
            self.token_pruning.token_keep_rate = value

    @property
    def attention_keep_rate(self) -> float:
        """R_A of `token_pruning` (1.0 without it): the fraction of the kept patch keys each patch
        query attends after a selector."""
        return 1.0 if self.token_pruning is None else self.token_pruning.attention_keep_rate

    @attention_keep_rate.setter
    def attention_keep_rate(self, value: float) -> None:
        if self._has_pruning("attention_keep_rate", value):
            self.token_pruning.attention_keep_rate = value

    def _has_pruning(self, name: str, value: float) -> bool:
        """True with token_pruning; without it 1.0 is accepted (a trainer hook's no-op), else refused."""
        if self.token_pruning is not None:
            return True
        if value != 1.0:
            raise ValueError(f"{name}={value!r} needs a model built with token_pruning=TokenPruning(...)")
        return False

    def no_weight_decay(self) -> Set[str]:
        """Parameter names exempt from weight decay besides 1-d ones (norms, biases, layer scale)."""
        return {name for name, _ in self.named_parameters()
                if name in ("cls_token", "pos_embed") or name.endswith("relative_position_bias_table")}

    def _sample(self, x: torch.Tensor, keep_rate: Optional[float]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        # Checked once, by the sampler (a bad rate is never 1.0 and reaches it).
        keep_rate = self.sampler.keep_rate if keep_rate is None else keep_rate
        if keep_rate == 1.0:  # the baseline path: no scoring, no gather, attention with index=None
            return x, None
        return self.sampler(x, keep_rate=keep_rate)  # a per-call rate leaves model.keep_rate as it is

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens entering the sampler: the CLS token, then the patch embeddings, plus the
        position embedding where the model has one."""
        patches = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        return x if self.pos_embed is None else x + self.pos_embed

    def forward_features(self, images: torch.Tensor,
                         keep_rate: Optional[float] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(tokens (B, k, C) after the last block, index (B, k) int64 positions in the full sequence
        of N = 1 + P tokens, or None when every token was kept). Patch t sits at position t + 1.
        With token_pruning, k and index are those after the last selector (input sampling and
        in-network selection composed)."""
        x, index = self._sample(self.pos_drop(self.embed(images)), keep_rate)
        pruning = self.token_pruning
        if pruning is None or not pruning.active:
            for block in self.blocks:
                x = block(x, index)
            return x, index
        reads, key_mask = pruning.reading_blocks(), None
        for number, block in enumerate(self.blocks, start=1):
            x, index, key_mask = block.forward_tokens(x, index, key_mask, pruning if number in reads else None)
        return x, index

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, k, C) tokens from forward_features -> (B, num_classes) logits."""
        if self.pool == "cls":
            # timm normalises every token and then takes the CLS one; LayerNorm acts per token, so
            # normalising the CLS token alone is the same number.
            pooled = self.norm(tokens[:, 0])
        else:
            pooled = self.fc_norm(tokens[:, self.num_prefix_tokens:].mean(dim=1))
        return self.head(self.head_drop(pooled))

    def forward(self, images: torch.Tensor, keep_rate: Optional[float] = None) -> torch.Tensor:
        """(B, num_classes) logits; `keep_rate` overrides `model.keep_rate` for this call only. With
        allocation "budget" / "mass" and a rate below 1 the images keep different numbers of tokens
        (packed, models/packed.py)."""
        rate = self.sampler.keep_rate if keep_rate is None else keep_rate
        if self.allocation != "fixed" and rate != 1.0:
            from .packed import packed_features, packed_pool
            tokens, _, cu_seqlens = packed_features(self, self.pos_drop(self.embed(images)), check_keep_rate(rate))
            return self.head(self.head_drop(packed_pool(self, tokens, cu_seqlens)))
        tokens, _ = self.forward_features(images, keep_rate)
        return self.forward_head(tokens)
