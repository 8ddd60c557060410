"""One full training iteration on synthetic data, as a closure for `_timing.time_iterations`.

    zero_grad -> forward under autocast -> cross-entropy -> backward -> AdamW step

The images and labels are made once on the device, so what is timed is the model and the
optimizer, never a data loader or a host-to-device copy.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


def make_training_step(model: nn.Module, *, batch_size: int, img_size: int, num_classes: int,
                       device: torch.device, amp_dtype: Optional[torch.dtype], fused_adamw: bool = False,
                       seed: int = 0) -> Callable[[], torch.Tensor]:
    """A closure running one training iteration of `model` (already on `device`); it returns the loss.

    `amp_dtype` None trains in float32; torch.bfloat16 runs the forward under autocast (the
    parameters and the optimizer stay float32, as in mixed-precision training).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                                  **({"fused": True} if fused_adamw else {}))

    def autocast():
        return torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    model.train()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step
