"""pss_kernels: fused kernels for training Vision Transformers with a Patch Sampling Schedule."""
from . import schedules
from ._backends import BackendStatus, available_backends
from .ops.rpb_attention import rpb_attention
from .ops.rpb_attention.module import RelPosAttention
from .ops.sample_patches import num_kept_tokens, sample_patches
from .ops.sample_patches.module import PatchSampler
from .ops.varlen import rpb_attention_varlen, sample_patches_varlen

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "PatchSampler",
    "RelPosAttention",
    "available_backends",
    "num_kept_tokens",
    "rpb_attention",
    "rpb_attention_varlen",
    "sample_patches",
    "sample_patches_varlen",
]
