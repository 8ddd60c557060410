"""The package's one FLOP counter: PyTorch's own (torch.utils.flop_counter.FlopCounterMode) on meta
tensors, used for Budgeted Training's stage costs, the trainer's FLOPs per iteration and pss-compare's
training FLOPs."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .._checks import check_int
from ..ops.rpb_attention.module import RelPosAttention


@contextmanager
def _counted_attention(model: nn.Module):
    """The fused rpb_attention custom op is opaque to FlopCounterMode; eager-index runs the same
    matmuls as aten ops."""
    fused = [m for m in model.modules() if isinstance(m, RelPosAttention) and m.impl == "pss"]
    for module in fused:
        module.impl = "eager-index"
    try:
        yield
    finally:
        for module in fused:
            module.impl = "pss"


def count_flops(model: nn.Module, *, batch_size: int = 1, keep_rate: Optional[float] = None,
                backward: bool = False) -> int:
    """FLOPs of one forward (and backward with backward=True) of `batch_size` images through the
    model as it is now (its stage, token pruning) at input keep rate `keep_rate` (None: the model's),
    from PyTorch's own counter (torch.utils.flop_counter.FlopCounterMode): matmuls and convolutions at
    2 FLOPs per multiply-add (the paper's "FLOPs" are multiply-adds: divide by 2 to compare). The count runs on
    meta tensors (no memory, no time, the model's weights, gradients and RNG untouched), in eval mode
    (dropout and stochastic depth do not change the count)."""
    check_int("batch_size", batch_size, minimum=1)
    params = {n: torch.empty_like(p, device="meta").requires_grad_(backward and p.requires_grad)
              for n, p in model.named_parameters()}
    buffers = {n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()}
    size = model.patch_embed.img_size
    images = torch.empty(batch_size, model.patch_embed.proj.in_channels, size, size, device="meta")
    training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), _counted_attention(model), FlopCounterMode(display=False) as counter:
            out = torch.func.functional_call(model, {**params, **buffers}, (images,), {"keep_rate": keep_rate})
            if backward:
                out.float().sum().backward()
    finally:
        model.train(training)
    return int(counter.get_total_flops())


