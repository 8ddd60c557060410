"""`PatchSampler`: the patch sampling block of a ViT as an nn.Module (PSS Algorithm 2).

Placed after the patch embedding (and position embedding), it returns (x_kept, index) like
timm's PatchDropoutWithIndices; `index` is what `rpb_attention` needs to gather each image's
relative position bias. A schedule sets `keep_rate` (and may set `scorer`) before each step.
Unlike timm's PatchDropout it also samples in eval mode: a PSS-trained model trades accuracy
for throughput at inference by lowering keep_rate.
"""
from typing import Optional

import torch
from torch import nn

from ..._backends import BACKENDS
from ..._checks import check_choice, check_int, check_keep_rate
from .op import sample_patches
from .peers import EAGER_SCORERS, eager_sample_patches
from .reference import ORDERS, SCORERS

IMPLS = ("pss", "eager")


class PatchSampler(nn.Module):
    """Keep the top `keep_rate` fraction of patch tokens (prefix tokens always kept).

    forward(x (B, N, C), scores=None) -> (x_kept (B, k, C), index (B, k) int64), or (x, None)
    at keep_rate == 1 (identity: attention then takes its index=None fast path).
    impl="pss" runs `sample_patches` on `backend`; impl="eager" runs the published PyTorch path
    (`eager_sample_patches`: scorers l1/l2/random, score order), the baseline of the benchmarks.
    """

    def __init__(self, keep_rate: float = 1.0, scorer: str = "l1", num_prefix_tokens: int = 1,
                 order: str = "score", impl: str = "pss", backend: Optional[str] = None):
        super().__init__()
        check_choice("impl", impl, IMPLS)
        check_choice("scorer", scorer, SCORERS)
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

    def forward(self, x: torch.Tensor, scores: Optional[torch.Tensor] = None):
        keep_rate = check_keep_rate(self.keep_rate)  # set by a schedule each step: re-checked
        if keep_rate == 1.0:
            return x, None
        if self.impl == "eager":
            self._check_eager()
            return eager_sample_patches(x, keep_rate, self.num_prefix_tokens, self.scorer)
        return sample_patches(x, keep_rate, scorer=self.scorer, num_prefix_tokens=self.num_prefix_tokens,
                              order=self.order, scores=scores, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"keep_rate={self.keep_rate}, scorer={self.scorer!r}, num_prefix_tokens={self.num_prefix_tokens}, "
                f"order={self.order!r}, impl={self.impl!r}, backend={self.backend!r}")
