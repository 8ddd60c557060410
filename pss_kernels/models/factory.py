"""create_model: a VisionTransformer from a named configuration plus overrides."""
from __future__ import annotations

import dataclasses

from .._checks import check_choice
from .configs import MODEL_CONFIGS
from .vit import VisionTransformer


def create_model(name: str, *, img_size: int = 224, num_classes: int = 1000, rpb: bool = True,
                 attn_impl: str = "pss", sampler_impl: str = "pss", **overrides) -> VisionTransformer:
    """Build `name` (deit_tiny, deit_small, deit_base, vit_base, vit_large).

    `overrides` replace configuration fields (embed_dim, depth, num_heads, patch_size, mlp_ratio,
    qkv_bias, abs_pos_embed, layer_scale_init, drop_path_rate) or pass VisionTransformer arguments
    (keep_rate, scorer, drop_rate, attn_drop_rate, in_chans, sampler_backend, attn_backend: the
    backends of sample_patches and rpb_attention, None = the package's choice per device;
    deterministic=True: bit-identical bias-table gradients, see VisionTransformer).
    The model samples in eval mode too while `keep_rate < 1` (see VisionTransformer).
    With `rpb=False` the absolute position embedding is switched on unless `abs_pos_embed` is
    given: a ViT with neither would have no position information at all.
    """
    check_choice("name", name, tuple(MODEL_CONFIGS))
    field_names = {f.name for f in dataclasses.fields(MODEL_CONFIGS[name])}
    config = dataclasses.replace(MODEL_CONFIGS[name], **{k: v for k, v in overrides.items() if k in field_names})
    extra = {k: v for k, v in overrides.items() if k not in field_names}
    if not rpb and "abs_pos_embed" not in overrides:
        config = dataclasses.replace(config, abs_pos_embed=True)
    return VisionTransformer(img_size=img_size, num_classes=num_classes, rpb=rpb, attn_impl=attn_impl,
                             sampler_impl=sampler_impl, **dataclasses.asdict(config), **extra)
