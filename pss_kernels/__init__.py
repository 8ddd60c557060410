"""pss_kernels: fused kernels for training Vision Transformers with a Patch Sampling Schedule."""
from . import schedules
from ._backends import BackendStatus, available_backends
from .ops.rpb_attention import rpb_attention
from .ops.rpb_attention.module import RelPosAttention
from .ops.sample_patches import num_kept_tokens, sample_patches
from .ops.sample_patches.module import PatchSampler

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "PatchSampler",
    "RelPosAttention",
    "available_backends",
    "num_kept_tokens",
    "rpb_attention",
    "sample_patches",
]
