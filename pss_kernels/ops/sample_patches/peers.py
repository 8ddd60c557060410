"""Peers of `sample_patches` for benchmarks and the `impl="eager"` model path.

Both return (x_kept (B, k, C), index (B, k) int64) in score order, k as in `num_kept_tokens`.
They score in x's dtype, as the published code does; ties may fall either way (argsort and topk
are not stable).
"""
import torch

from .reference import num_kept_tokens

EAGER_SCORERS = ("l1", "l2", "random")


def _eager_scores(patches: torch.Tensor, scorer: str) -> torch.Tensor:
    if scorer == "l1":
        return patches.abs().sum(dim=-1)
    if scorer == "l2":
        return patches.square().sum(dim=-1)
    if scorer == "random":  # PatchDropout: a uniform random ranking
        return torch.rand(patches.shape[:2], device=patches.device)
    raise ValueError(f"scorer must be one of {EAGER_SCORERS}, got {scorer!r}")


def _prefix_then(patch_order: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    batch = patch_order.shape[0]
    prefix = torch.arange(num_prefix_tokens, device=patch_order.device).expand(batch, num_prefix_tokens)
    return torch.cat([prefix, patch_order + num_prefix_tokens], dim=1)


def eager_sample_patches(x: torch.Tensor, keep_rate: float, num_prefix_tokens: int = 1, scorer: str = "l1"):
    """The published PSS path (Algorithm 2): x.abs().sum(-1) -> argsort -> advanced indexing.

    scorer "l2" ranks by x.square().sum(-1), "random" by uniform noise (PatchDropout).
    """
    batch, num_tokens, _ = x.shape
    num_kept = num_kept_tokens(num_tokens, keep_rate, num_prefix_tokens)
    scores = _eager_scores(x[:, num_prefix_tokens:], scorer)
    ranked = scores.argsort(dim=1, descending=True)[:, :num_kept - num_prefix_tokens]
    index = _prefix_then(ranked, num_prefix_tokens)
    x_kept = x[torch.arange(batch, device=x.device)[:, None], index]
    return x_kept, index


def topk_gather_sample_patches(x: torch.Tensor, keep_rate: float, num_prefix_tokens: int = 1):
    """The usual PyTorch rewrite: x.abs().sum(-1) -> topk -> gather."""
    _, num_tokens, channels = x.shape
    num_kept = num_kept_tokens(num_tokens, keep_rate, num_prefix_tokens)
    magnitude = x[:, num_prefix_tokens:].abs().sum(dim=-1)
    ranked = magnitude.topk(num_kept - num_prefix_tokens, dim=1, sorted=True).indices
    index = _prefix_then(ranked, num_prefix_tokens)
    return x.gather(1, index[..., None].expand(-1, -1, channels)), index
