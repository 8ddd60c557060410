"""Public `rpb_attention`: argument checks and backend dispatch.

(Skeleton: only the torch backend is wired yet; the fused Triton kernels and the
torch.library.custom_op registration land with issue #3.)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..._backends import resolve_backend
from .reference import rpb_attention_reference

GPU_DEFAULT_BACKEND = "torch"


def rpb_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_table: torch.Tensor,
                  index: Optional[torch.Tensor] = None, *, grid_size: Tuple[int, int],
                  num_prefix_tokens: int = 1, scale: Optional[float] = None,
                  backend: Optional[str] = None) -> torch.Tensor:
    """softmax(q k^T * scale + bias[index]) v with the bias gathered per image. See DESIGN §1."""
    chosen = resolve_backend("rpb_attention", backend, q.device, GPU_DEFAULT_BACKEND)
    if chosen != "torch":
        raise NotImplementedError(f"rpb_attention: backend {chosen!r} is not wired yet")
    return rpb_attention_reference(q, k, v, bias_table, index, grid_size=tuple(grid_size),
                                   num_prefix_tokens=num_prefix_tokens, scale=scale)
