"""AdamW with the usual ViT weight-decay exemptions, warm-up + cosine LR, and a weight EMA."""
from __future__ import annotations

import copy
import math
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no decay on 1-d parameters (biases, norms, layer scale) nor on the names the model
    lists in `no_weight_decay()` (CLS token, position embedding, relative position bias tables)."""
    exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.dim() <= 1 or name in exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int, min_factor: float) -> float:
    """LR multiplier at `step`: linear (step + 1) / warmup_steps during warm-up, then
    min_factor + (1 - min_factor) * (1 + cos(pi * t)) / 2 with t going 0 -> 1 over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_steps: int,
                       total_steps: int) -> LambdaLR:
    """Stepped once per iteration. The factor is a partial of a module function, so the
    scheduler's state_dict holds only counters (no pickled closures)."""
    factor = partial(warmup_cosine_factor, warmup_steps=warmup_steps, total_steps=total_steps,
                     min_factor=min_lr / lr if lr > 0 else 0.0)
    return LambdaLR(optimizer, factor)


class ModelEma:
    """Exponential moving average of a model's weights: ema = decay * ema + (1 - decay) * weights,
    updated after every optimizer step; integer buffers are copied."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_value, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_value.is_floating_point():
                ema_value.lerp_(value, 1.0 - self.decay)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
