"""`PatchSampler`: the patch sampling block of a ViT as an nn.Module (PSS Algorithm 2).

Placed after the patch embedding (and position embedding), it returns (x_kept, index) like
timm's PatchDropoutWithIndices; `index` is what `rpb_attention` needs to gather each image's
relative position bias. A schedule sets `keep_rate` (and may set `scorer`) before each step.
Unlike timm's PatchDropout it also samples in eval mode: a PSS-trained model trades accuracy
for throughput at inference by lowering keep_rate.

scorer="center" keeps the patches nearest the grid centre (Budgeted Training's centre crop of the
token grid): the same ranking for every image, run as sample_patches(scorer="given").
"""
from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..._backends import BACKENDS
from ..._checks import check_choice, check_grid_size, check_int, check_keep_rate
from .op import sample_patches
from .peers import EAGER_SCORERS, eager_sample_patches
from .reference import ORDERS, SCORERS

IMPLS = ("pss", "eager")
MODULE_SCORERS = SCORERS + ("center",)


@lru_cache(maxsize=16)
def _centrality(grid_size: Tuple[int, int], device: torch.device) -> torch.Tensor:
    grid_h, grid_w = grid_size
    rows = (torch.arange(grid_h, dtype=torch.float32, device=device) - (grid_h - 1) / 2).abs()[:, None]
    cols = (torch.arange(grid_w, dtype=torch.float32, device=device) - (grid_w - 1) / 2).abs()[None, :]
    # Square rings first (the top k = s*s of an s x s-centred grid is the centre s x s crop: ring
    # distances step by 1), the Euclidean distance (< 0.5 after scaling) orders within a ring.
    ring = torch.maximum(rows, cols)
    within = (rows ** 2 + cols ** 2) / (2.0 * (grid_h ** 2 + grid_w ** 2))
    return -(ring + within).flatten()


def center_scores(grid_size: Sequence[int], batch: int, device: torch.device) -> torch.Tensor:
    """(batch, Gh*Gw) float32 scores that rank patches by closeness to the grid centre: square
    rings (Chebyshev distance) outwards, by Euclidean distance within a ring, then row-major. The
    top s*s of a grid with the parity of s are its centre s x s crop (14 x 14: 100 -> 10 x 10,
    144 -> 12 x 12)."""
    return _centrality(check_grid_size(grid_size), torch.device(device)).expand(batch, -1)


class PatchSampler(nn.Module):
    """Keep the top `keep_rate` fraction of patch tokens (prefix tokens always kept).

    forward(x (B, N, C), scores=None) -> (x_kept (B, k, C), index (B, k) int64), or (x, None)
    at keep_rate == 1 (identity: attention then takes its index=None fast path).
    impl="pss" runs `sample_patches` on `backend`; impl="eager" runs the published PyTorch path
    (`eager_sample_patches`: scorers l1/l2/random, score order), the baseline of the benchmarks.
    scorer: as sample_patches ("given" needs forward's `scores`), or "center" (`center_scores` of
    `grid_size`, default the square grid of N - num_prefix_tokens patches).
    """

    def __init__(self, keep_rate: float = 1.0, scorer: str = "l1", num_prefix_tokens: int = 1,
                 order: str = "score", impl: str = "pss", backend: Optional[str] = None,
                 grid_size: Optional[Sequence[int]] = None):
        super().__init__()
        check_choice("impl", impl, IMPLS)
        check_choice("scorer", scorer, MODULE_SCORERS)
        self.grid_size = None if grid_size is None else check_grid_size(grid_size)
        check_choice("order", order, ORDERS)
        check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
        check_choice("backend", backend, (None,) + BACKENDS)
        self.keep_rate = check_keep_rate(keep_rate)
        self.scorer = scorer
        self.num_prefix_tokens = num_prefix_tokens
        self.order = order
        self.impl = impl
        self.backend = backend
        self._check_eager()

    def _check_eager(self) -> None:
        if self.impl != "eager":
            return
        if self.scorer not in EAGER_SCORERS:
            raise ValueError(f"impl='eager' implements scorer in {EAGER_SCORERS}, got scorer={self.scorer!r}")
        if self.order != "score":
            raise ValueError(f"impl='eager' implements order='score' only, got order={self.order!r}")

    def forward(self, x: torch.Tensor, scores: Optional[torch.Tensor] = None, keep_rate: Optional[float] = None):
        """(kept tokens, index) at `keep_rate` (this call only; None: the module's `keep_rate`)."""
        keep_rate = check_keep_rate(self.keep_rate if keep_rate is None else keep_rate)
        if keep_rate == 1.0:
            return x, None
        if self.impl == "eager":
            self._check_eager()
            return eager_sample_patches(x, keep_rate, self.num_prefix_tokens, self.scorer)
        check_choice("scorer", self.scorer, MODULE_SCORERS)
        scorer = self.scorer
        if scorer == "center":
            scorer, scores = "given", center_scores(self._grid_size(x.shape[1]), x.shape[0], x.device)
        elif scorer == "given" and scores is None:
            raise ValueError("PatchSampler(scorer='given') needs forward(x, scores=...) of shape (B, N - "
                             "num_prefix_tokens); a ViT's input sampler has none (nothing has attended yet): use "
                             "l1 / l2 / random / center there, and models.token_pruning for CLS-attention selection")
        return sample_patches(x, keep_rate, scorer=scorer, num_prefix_tokens=self.num_prefix_tokens,
                              order=self.order, scores=scores, backend=self.backend)

    def _grid_size(self, num_tokens: int) -> Tuple[int, int]:
        num_patches = num_tokens - self.num_prefix_tokens
        if self.grid_size is not None:
            if self.grid_size[0] * self.grid_size[1] != num_patches:
                raise ValueError(f"scorer='center' with grid_size={self.grid_size} needs "
                                 f"{self.grid_size[0] * self.grid_size[1]} patches, x has {num_patches}")
            return self.grid_size
        side = round(num_patches ** 0.5)
        if side * side != num_patches:
            raise ValueError(f"scorer='center' needs grid_size for a non-square grid of {num_patches} patches")
        return side, side

    def extra_repr(self) -> str:
        return (f"keep_rate={self.keep_rate}, scorer={self.scorer!r}, num_prefix_tokens={self.num_prefix_tokens}, "
                f"order={self.order!r}, impl={self.impl!r}, backend={self.backend!r}")
