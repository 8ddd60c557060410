"""Reference ViT with a patch sampling block and a per-layer relative position bias; the methods that
configure it: in-network token selection (token_pruning) and Budgeted Training's growth (growth);
the one FLOP counter (flops)."""
from .configs import MODEL_CONFIGS, ViTConfig
from .factory import create_model, create_model_for
from .flops import count_flops
from .growth import (BUDGETED_STAGES, GrowthStage, NewSlice, grow, new_parameter_slices,
                     reset_optimizer_moments, set_stage, stage_flops, stage_keep_rates, stage_of)
from .pretrained import LoadReport, load_pretrained
from .token_pruning import TRI_LEVEL_PRESETS, TokenPruning, TriLevelSetting
from .vit import VisionTransformer

__all__ = ["BUDGETED_STAGES", "GrowthStage", "MODEL_CONFIGS", "LoadReport", "NewSlice", "TRI_LEVEL_PRESETS",
           "TokenPruning", "TriLevelSetting", "ViTConfig", "VisionTransformer", "count_flops", "create_model",
           "create_model_for", "grow", "load_pretrained", "new_parameter_slices", "reset_optimizer_moments",
           "set_stage", "stage_flops", "stage_keep_rates", "stage_of"]
