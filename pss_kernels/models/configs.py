"""Named ViT configurations (patch 16; any image size divisible by the patch size).

The DeiT family follows DeiT (absolute position embedding, no layer scale); `vit_base` and
`vit_large` follow the SimMIM / BEiT fine-tuning recipe that the PSS paper's ViT-B uses: the
per-layer relative position bias replaces the absolute table, and layer scale is on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    abs_pos_embed: bool = True
    layer_scale_init: Optional[float] = None
    drop_path_rate: float = 0.1


MODEL_CONFIGS: Dict[str, ViTConfig] = {
    "deit_tiny": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "deit_small": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "deit_base": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vit_base": ViTConfig(embed_dim=768, depth=12, num_heads=12, abs_pos_embed=False, layer_scale_init=0.1),
    "vit_large": ViTConfig(embed_dim=1024, depth=24, num_heads=16, abs_pos_embed=False, layer_scale_init=1e-5,
                           drop_path_rate=0.2),
}
