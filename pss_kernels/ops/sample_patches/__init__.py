from .op import sample_patches
from .reference import num_kept_tokens

__all__ = ["sample_patches", "num_kept_tokens"]
