"""One full training iteration on synthetic data, as a callable for `_timing.time_iterations`.

    zero_grad -> forward under autocast -> cross-entropy -> backward -> AdamW step

The images and labels are made once on the device, so what is timed is the model and the
optimizer, never a data loader or a host-to-device copy.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class TrainingStep:
    """`step()` runs one training iteration of `model` (already on `device`) and returns the loss.

    `amp_dtype` None trains in float32; torch.bfloat16 runs the forward under autocast (the
    parameters and the optimizer stay float32, as in mixed-precision training). `compile` runs the
    forward through torch.compile(model); attributes such as keep_rate stay on `model` itself, which
    the compiled wrapper reads (a guard: one compile per value).
    """

    def __init__(self, model: nn.Module, *, batch_size: int, img_size: int, num_classes: int,
                 device: torch.device, amp_dtype: Optional[torch.dtype], fused_adamw: bool = False,
                 compile: bool = False, seed: int = 0):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.model = model
        self._forward = torch.compile(model) if compile else model
        self.images = torch.randn(batch_size, 3, img_size, img_size, generator=generator).to(device)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                                           **({"fused": True} if fused_adamw else {}))
        self.device_type, self.amp_dtype = torch.device(device).type, amp_dtype
        model.train()

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.amp_dtype)

    def __call__(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = F.cross_entropy(self._forward(self.images), self.labels)
        loss.backward()
        self.optimizer.step()
        return loss

    def held_bytes(self) -> int:
        """Bytes this step keeps between iterations: parameters, gradients, optimizer state and the
        synthetic batch (what is allocated for it before an iteration starts)."""
        tensors = [self.images, self.labels]
        for param in self.model.parameters():
            tensors += [param] + ([param.grad] if param.grad is not None else [])
        for state in self.optimizer.state.values():
            tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

