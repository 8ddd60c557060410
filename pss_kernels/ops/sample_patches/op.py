"""Public `sample_patches`: argument checks, the keep_rate == 1 shortcut, backend dispatch.

(Skeleton: only the torch backend is wired yet; the triton/cuda kernels and the
torch.library.custom_op registration land with issue #2.)
"""
from __future__ import annotations

from typing import Optional

import torch

from ..._backends import resolve_backend
from ..._checks import check_choice, check_int, check_keep_rate, check_same_device, check_tensor
from .reference import ORDERS, SCORERS, sample_patches_reference

# Kernels that never ran on a GPU stay out of backend=None's choice (see README).
GPU_DEFAULT_BACKEND = "torch"


def sample_patches(x: torch.Tensor, keep_rate: float, *, scorer: str = "l1", num_prefix_tokens: int = 1,
                   order: str = "score", scores: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None, backend: Optional[str] = None):
    """Keep the top-scoring patch tokens of each image (PSS Algorithm 2). See DESIGN §1."""
    check_tensor("x", x, ndim=3)
    keep_rate = check_keep_rate(keep_rate)
    batch, num_tokens, channels = x.shape
    check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
    if channels == 0:
        raise ValueError(f"x must have C > 0 channels, got shape {tuple(x.shape)}")
    if num_tokens <= num_prefix_tokens:
        raise ValueError(f"x must have more tokens than num_prefix_tokens={num_prefix_tokens}, "
                         f"got N={num_tokens}")
    check_choice("scorer", scorer, SCORERS)
    check_choice("order", order, ORDERS)
    if scorer == "given":
        check_tensor("scores", scores, ndim=2)
        check_same_device(x=x, scores=scores)
        expected = (batch, num_tokens - num_prefix_tokens)
        if tuple(scores.shape) != expected:
            raise ValueError(f"scores must have shape {expected} (B, N - num_prefix_tokens), "
                             f"got {tuple(scores.shape)}")
    elif scores is not None:
        raise ValueError(f"scores is only used with scorer='given', got scorer={scorer!r}")
    if keep_rate == 1.0:
        return x, torch.arange(num_tokens, device=x.device).expand(batch, num_tokens)
    chosen = resolve_backend("sample_patches", backend, x.device, GPU_DEFAULT_BACKEND)
    if chosen != "torch":
        raise NotImplementedError(f"sample_patches: backend {chosen!r} is not wired yet")
    return sample_patches_reference(x, keep_rate, scorer=scorer, num_prefix_tokens=num_prefix_tokens,
                                    order=order, scores=scores, generator=generator)
