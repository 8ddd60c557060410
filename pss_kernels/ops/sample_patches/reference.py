"""Pure-PyTorch patch sampling (PSS Algorithm 2): the oracle of every backend and the CPU path.

Shapes: x (B, N, C) with `num_prefix_tokens` prefix tokens (CLS, registers) first.
k = max(num_prefix_tokens + 1, round(keep_rate * N)) tokens are kept, prefix tokens included.
"""
from __future__ import annotations

from typing import Optional

import torch

SCORERS = ("l1", "l2", "random", "given")
ORDERS = ("score", "spatial")


def num_kept_tokens(num_tokens: int, keep_rate: float, num_prefix_tokens: int = 1) -> int:
    """Tokens kept out of `num_tokens`, prefix included; Python's round() as the paper's code.

    N=197: keep_rate 1.0 -> 197, 0.8 -> 158, 0.5 -> 98, 0.2 -> 39.
    """
    return max(num_prefix_tokens + 1, round(keep_rate * num_tokens))


def patch_scores(x: torch.Tensor, scorer: str, num_prefix_tokens: int,
                 scores: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, N - num_prefix_tokens) float32 importance of each non-prefix token."""
    patches = x[:, num_prefix_tokens:]
    if scorer == "l1":
        return patches.float().abs().sum(-1)
    if scorer == "l2":
        return patches.float().square().sum(-1)
    if scorer == "random":
        return torch.rand(patches.shape[:2], generator=generator, device=x.device, dtype=torch.float32)
    if scorer == "given":
        return scores.float()
    raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")


def select_indices(scores: torch.Tensor, k: int, num_prefix_tokens: int, order: str) -> torch.Tensor:
    """(B, k) int64 positions: the prefix, then the top k - prefix tokens of `scores`.

    Descending score, ties to the lower position (a stable sort keeps position order among
    equal scores), or ascending position for order="spatial".
    """
    batch = scores.shape[0]
    num_patches = k - num_prefix_tokens
    ranked = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :num_patches]
    if order == "spatial":
        ranked = ranked.sort(dim=1).values
    prefix = torch.arange(num_prefix_tokens, device=scores.device).expand(batch, num_prefix_tokens)
    return torch.cat([prefix, ranked + num_prefix_tokens], dim=1)


def sample_patches_reference(x: torch.Tensor, keep_rate: float, *, scorer: str = "l1",
                             num_prefix_tokens: int = 1, order: str = "score",
                             scores: Optional[torch.Tensor] = None,
                             generator: Optional[torch.Generator] = None):
    """(x_kept (B, k, C), index (B, k) int64). Arguments are assumed checked by the caller."""
    k = num_kept_tokens(x.shape[1], keep_rate, num_prefix_tokens)
    token_scores = patch_scores(x, scorer, num_prefix_tokens, scores, generator)
    index = select_indices(token_scores, k, num_prefix_tokens, order)
    x_kept = x.gather(1, index[..., None].expand(-1, -1, x.shape[2]))
    return x_kept, index
