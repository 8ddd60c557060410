"""PatchSampler: the PSS patch sampling block as an nn.Module (lead's minimal version; issue 2 owner extends)."""
from __future__ import annotations

import torch
from torch import nn

from .op import sample_patches


class PatchSampler(nn.Module):
    def __init__(self, keep_rate: float = 1.0, scorer: str = "l1", num_prefix_tokens: int = 1,
                 order: str = "score", impl: str = "pss", backend=None):
        super().__init__()
        self.keep_rate, self.scorer, self.num_prefix_tokens = keep_rate, scorer, num_prefix_tokens
        self.order, self.impl, self.backend = order, impl, backend

    def forward(self, x: torch.Tensor, scores=None):
        if self.keep_rate == 1.0:
            return x, None
        return sample_patches(x, self.keep_rate, scorer=self.scorer, num_prefix_tokens=self.num_prefix_tokens,
                              order=self.order, scores=scores, backend=self.backend)
