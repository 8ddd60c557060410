"""Reference ViT with a patch sampling block and a per-layer relative position bias."""
from .configs import MODEL_CONFIGS, ViTConfig
from .factory import create_model
from .vit import VisionTransformer

__all__ = ["MODEL_CONFIGS", "ViTConfig", "VisionTransformer", "create_model"]
