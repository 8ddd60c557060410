"""Reference ViT with a patch sampling block and a per-layer relative position bias; the methods that
configure it: in-network token selection (token_pruning) and Budgeted Training's growth (growth)."""
from .configs import MODEL_CONFIGS, ViTConfig
from .factory import create_model, create_model_for
from .pretrained import LoadReport, load_pretrained
from .token_pruning import TRI_LEVEL_PRESETS, TokenPruning, TriLevelSetting
from .vit import VisionTransformer

__all__ = ["MODEL_CONFIGS", "LoadReport", "TRI_LEVEL_PRESETS", "TokenPruning", "TriLevelSetting", "ViTConfig",
           "VisionTransformer", "create_model", "create_model_for", "load_pretrained"]
