"""create_model: a VisionTransformer from a named configuration plus overrides; create_model_for: the
model that computes what a timm ViT / DeiT / BEiT model computes, for load_pretrained."""
from __future__ import annotations

import dataclasses
import re

from .._checks import check_choice
from .configs import MODEL_CONFIGS
from .vit import VisionTransformer


def create_model(name: str, *, img_size: int = 224, num_classes: int = 1000, rpb: bool = True,
                 attn_impl: str = "pss", sampler_impl: str = "pss", **overrides) -> VisionTransformer:
    """Build `name` (deit_tiny, deit_small, deit_base, vit_base, vit_large).

    `overrides` replace configuration fields (embed_dim, depth, num_heads, patch_size, mlp_ratio,
    qkv_bias, abs_pos_embed, layer_scale_init, drop_path_rate) or pass VisionTransformer arguments
    (keep_rate, scorer, token_pruning, drop_rate, attn_drop_rate, in_chans, sampler_backend, attn_backend: the
    backends of sample_patches and rpb_attention, None = the package's choice per device;
    deterministic=True: bit-identical bias-table gradients, see VisionTransformer; pool="mean"
    (default, PSS / BEiT / SimMIM) or "cls" (timm ViT / DeiT)).
    The model samples in eval mode too while `keep_rate < 1` (see VisionTransformer).
    With `rpb=False` the absolute position embedding is switched on unless `abs_pos_embed` is
    given: a ViT with neither would have no position information at all.
    To match a timm model for load_pretrained, see create_model_for.
    """
    check_choice("name", name, tuple(MODEL_CONFIGS))
    field_names = {f.name for f in dataclasses.fields(MODEL_CONFIGS[name])}
    config = dataclasses.replace(MODEL_CONFIGS[name], **{k: v for k, v in overrides.items() if k in field_names})
    extra = {k: v for k, v in overrides.items() if k not in field_names}
    if not rpb and "abs_pos_embed" not in overrides:
        config = dataclasses.replace(config, abs_pos_embed=True)
    return VisionTransformer(img_size=img_size, num_classes=num_classes, rpb=rpb, attn_impl=attn_impl,
                             sampler_impl=sampler_impl, **dataclasses.asdict(config), **extra)


# timm architecture name -> (family, size, patch, image size); a pretrained tag after "." is ignored.
_TIMM_NAME = re.compile(r"(vit|deit|beit)_(tiny|small|base|large)_patch(\d+)_(\d+)")
_SIZE_CONFIG = {"tiny": "deit_tiny", "small": "deit_small", "base": "deit_base", "large": "vit_large"}
# What differs from the named configuration, per family. timm ViT / DeiT: absolute position
# embedding, no layer scale, final norm + CLS token. timm BEiT (and BEiT / SimMIM originals): no
# absolute embedding, layer scale, a relative position table per block, mean pooling + fc_norm.
# rpb stays on for ViT / DeiT: a zero table (the model's initialisation, and what load_pretrained
# leaves for a checkpoint without one) adds nothing, so the model computes timm's numbers and the
# table can be learnt while fine-tuning; pass rpb=False for plain SDPA attention.
_FAMILY_OVERRIDES = {
    "vit": dict(abs_pos_embed=True, layer_scale_init=None, pool="cls"),
    "deit": dict(abs_pos_embed=True, layer_scale_init=None, pool="cls"),
    "beit": dict(abs_pos_embed=False, pool="mean"),
}
_BEIT_LAYER_SCALE = {"base": 0.1, "large": 1e-5}


def create_model_for(timm_name: str, **overrides) -> VisionTransformer:
    """The VisionTransformer whose forward at keep_rate 1 is timm's `timm_name`, for load_pretrained.

    `timm_name` is `{vit,deit}_{tiny,small,base,large}_patch{P}_{S}` (timm VisionTransformer:
    vit_base_patch16_224, deit_small_patch16_224, ...) or `beit_{base,large}_patch16_{S}` (timm Beit),
    optionally with a pretrained tag (`vit_base_patch16_224.augreg_in21k_ft_in1k`). The image size,
    patch size and widths come from the name; `overrides` go to create_model (img_size to fine-tune
    at another resolution, num_classes, keep_rate, drop_path_rate, rpb, ...). Equivalent to:

        vit_* / deit_*:  create_model(<size config>, patch_size=P, img_size=S, abs_pos_embed=True,
                                      layer_scale_init=None, pool="cls")
        beit_*:          create_model("vit_base" | "vit_large", patch_size=P, img_size=S,
                                      abs_pos_embed=False, pool="mean")

    The original BEiT / SimMIM ViT-B checkpoints (the PSS paper's fine-tune) are beit-like:
    create_model("vit_base") as it is (mean pooling, layer scale, no absolute embedding).
    Variants with other pieces (distilled DeiT, DeiT III, CLIP, registers, ...) are refused.
    """
    arch = timm_name.split(".", 1)[0]
    match = _TIMM_NAME.fullmatch(arch)
    if "distilled" in arch:
        raise ValueError(f"{timm_name!r} is a distilled DeiT: its distillation token and second head have no "
                         f"counterpart in this model; use the non-distilled {arch.replace('_distilled', '')!r}")
    if match is None or (match.group(1) == "beit" and match.group(2) not in _BEIT_LAYER_SCALE):
        raise ValueError(f"timm_name must be vit|deit_tiny|small|base|large_patch<P>_<S> or "
                         f"beit_base|large_patch<P>_<S> (e.g. 'vit_base_patch16_224'), got {timm_name!r}")
    family, size, patch, image = match.group(1), match.group(2), int(match.group(3)), int(match.group(4))
    config = "vit_base" if (family, size) == ("beit", "base") else _SIZE_CONFIG[size]
    settings = dict(_FAMILY_OVERRIDES[family], patch_size=patch, img_size=image)
    if family == "beit":
        settings["layer_scale_init"] = _BEIT_LAYER_SCALE[size]
    return create_model(config, **{**settings, **overrides})
