"""The "cuda" backend of `sample_patches`: a thin wrapper over pss_kernels._C (csrc/sampling/).

The kernels take contiguous device pointers, so inputs are made contiguous here (a stride-0
gradient from `.sum()` becomes a real tensor); shapes are checked before a pointer crosses.
"""
from typing import Optional, Tuple

import torch

from ..._backends import cuda_extension

DTYPE_IDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SCORER_IDS = {"l1": 0, "l2": 1, "given": 2}


def _extension():
    ext = cuda_extension()
    if ext is None:  # resolve_backend has already said why; this guards direct calls
        raise RuntimeError("sample_patches: the cuda backend needs the compiled pss_kernels._C extension")
    return ext


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def sample_patches_forward(x: torch.Tensor, scores: Optional[torch.Tensor], num_kept: int, scorer: str,
                           num_prefix_tokens: int, order: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_kept (B, k, C), index (B, k) int64, slot (B, N) int32) for CUDA tensors x (B, N, C)."""
    ext = _extension()
    batch, num_tokens, channels = x.shape
    if num_tokens - num_prefix_tokens > ext.SAMPLE_PATCHES_MAX_PATCHES:
        raise ValueError(f"the cuda backend of sample_patches handles at most {ext.SAMPLE_PATCHES_MAX_PATCHES} "
                         f"patch tokens a row, got x of shape {tuple(x.shape)} with "
                         f"num_prefix_tokens={num_prefix_tokens}")
    x = x.contiguous()
    x_kept = x.new_empty(batch, num_kept, channels)
    index = torch.empty(batch, num_kept, dtype=torch.int64, device=x.device)
    slot = torch.empty(batch, num_tokens, dtype=torch.int32, device=x.device)
    scores_ptr = 0
    if scorer == "given":
        scores = scores.to(device=x.device, dtype=torch.float32).contiguous()
        scores_ptr = scores.data_ptr()
    with torch.cuda.device(x.device):
        # Small batches run split (score, select, gather kernels): the scores then need device memory.
        workspace = torch.empty(ext.sample_patches_forward_workspace_bytes(batch, num_tokens, num_prefix_tokens,
                                                                           SCORER_IDS[scorer]),
                                dtype=torch.uint8, device=x.device)
        ext.sample_patches_forward(x.data_ptr(), scores_ptr, x_kept.data_ptr(), index.data_ptr(), slot.data_ptr(),
                                   workspace.data_ptr(), batch, num_tokens, channels, num_prefix_tokens, num_kept,
                                   DTYPE_IDS[x.dtype], SCORER_IDS[scorer], order == "spatial", _stream(x.device))
    return x_kept, index, slot


def sample_patches_backward(grad_kept: torch.Tensor, slot: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """grad_x (B, N, C): grad_kept's rows at their tokens (slot >= 0), zeros elsewhere."""
    ext = _extension()
    grad_kept = grad_kept.contiguous()
    slot = slot.contiguous()
    batch, num_kept, channels = grad_kept.shape
    grad_x = grad_kept.new_empty(batch, num_tokens, channels)
    with torch.cuda.device(grad_kept.device):
        ext.sample_patches_backward(grad_kept.data_ptr(), slot.data_ptr(), grad_x.data_ptr(), batch, num_tokens,
                                    num_kept, channels * grad_kept.element_size(), _stream(grad_kept.device))
    return grad_x


def sample_patches_varlen_forward(x: torch.Tensor, scores: Optional[torch.Tensor], keep_counts: torch.Tensor,
                                  total: int, scorer: str, num_prefix_tokens: int,
                                  order: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens (T, C), positions (T,) int64, cu_seqlens (B + 1,) int32, slot (B, N) int32 packed rows)
    for CUDA tensors x (B, N, C) and keep_counts (B,); total = keep_counts.sum()."""
    ext = _extension()
    batch, num_tokens, channels = x.shape
    if num_tokens - num_prefix_tokens > ext.SAMPLE_PATCHES_MAX_PATCHES:
        raise ValueError(f"the cuda backend of sample_patches_varlen handles at most "
                         f"{ext.SAMPLE_PATCHES_MAX_PATCHES} patch tokens a row, got x of shape {tuple(x.shape)} "
                         f"with num_prefix_tokens={num_prefix_tokens}")
    x = x.contiguous()
    counts = keep_counts.to(dtype=torch.int64).contiguous()
    tokens = x.new_empty(total, channels)
    # Zeros: a row no count reaches (counts not summing to T, only through the raw op) holds position 0,
    # an index in bounds for the attention that reads it.
    positions = torch.zeros(total, dtype=torch.int64, device=x.device)
    cu_seqlens = torch.empty(batch + 1, dtype=torch.int32, device=x.device)
    slot = torch.empty(batch, num_tokens, dtype=torch.int32, device=x.device)
    scores_ptr = 0
    if scorer == "given":
        scores = scores.to(device=x.device, dtype=torch.float32).contiguous()
        scores_ptr = scores.data_ptr()
    with torch.cuda.device(x.device):
        workspace = torch.empty(ext.sample_patches_forward_workspace_bytes(batch, num_tokens, num_prefix_tokens,
                                                                           SCORER_IDS[scorer]),
                                dtype=torch.uint8, device=x.device)
        ext.sample_patches_varlen_forward(x.data_ptr(), scores_ptr, counts.data_ptr(), tokens.data_ptr(),
                                          positions.data_ptr(), cu_seqlens.data_ptr(), slot.data_ptr(),
                                          workspace.data_ptr(), batch, num_tokens, channels, num_prefix_tokens, total,
                                          DTYPE_IDS[x.dtype], SCORER_IDS[scorer], order == "spatial",
                                          _stream(x.device))
    return tokens, positions, cu_seqlens, slot


def sample_patches_varlen_backward(grad_tokens: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """grad_x (B, N, C): grad_tokens' packed rows at their tokens (slot >= 0), zeros elsewhere."""
    ext = _extension()
    grad_tokens = grad_tokens.contiguous()
    slot = slot.contiguous()
    batch, num_tokens = slot.shape
    channels = grad_tokens.shape[1]
    grad_x = grad_tokens.new_empty(batch, num_tokens, channels)
    with torch.cuda.device(grad_tokens.device):
        ext.sample_patches_varlen_backward(grad_tokens.data_ptr(), slot.data_ptr(), grad_x.data_ptr(), batch,
                                           num_tokens, channels * grad_tokens.element_size(),
                                           _stream(grad_tokens.device))
    return grad_x
