"""Reference ViT with a patch sampling block and a per-layer relative position bias."""
from .configs import MODEL_CONFIGS, ViTConfig
from .factory import create_model, create_model_for
from .pretrained import LoadReport, load_pretrained
from .vit import VisionTransformer

__all__ = ["MODEL_CONFIGS", "LoadReport", "ViTConfig", "VisionTransformer", "create_model", "create_model_for",
           "load_pretrained"]
