"""Optimisers with the usual ViT weight-decay exemptions and layer-wise LR decay, the LR rule
(linear scaling by the global batch), warm-up + cosine / linear / REX LR, and a weight EMA.

LR shapes after the linear warm-up (`--lr-schedule`), with p = t / T the progress over the T
steps after the warm-up:
    cosine   eta = eta_min + (eta_0 - eta_min) (1 + cos(pi p)) / 2          (DeiT; eta_min = --min-lr)
    linear   eta = eta_0 (1 - p)                                            (Linear-LR, Li et al. 2020)
    rex      eta = eta_0 (1 - p) / (1/2 + (1 - p) / 2)                      (REX, Chen et al. 2022)
linear and rex are Budgeted Training's baselines (Xia et al. 2023, Eq. 9) as the paper writes them:
they decay to 0, not to --min-lr; the budget is met by compressing --epochs."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("adamw", "sgd")
LR_SCALINGS = ("none", "lr", "all")
LR_SCHEDULES = ("cosine", "linear", "rex")


@dataclass(frozen=True)
class LearningRates:
    """The run's peak, floor and warm-up-start LRs after the batch-size rule, and the rule in words."""
    lr: float
    min_lr: float
    warmup_lr: float
    rule: str


def resolve_learning_rates(*, lr: float, min_lr: float, warmup_lr: float, scaling: str, base_batch: int,
                           global_batch: int) -> LearningRates:
    """Linear scaling (Goyal et al.): the flags are LRs for `base_batch` images per step, multiplied by
    global_batch / base_batch. "lr" scales the peak only (DeiT's main.py), "all" the peak, the floor
    and the warm-up start (SimMIM's fine-tuning), "none" takes the flags as they are."""
    if scaling not in LR_SCALINGS:
        raise ValueError(f"lr_scaling must be one of {LR_SCALINGS}, got {scaling!r}")
    if scaling == "none":
        return LearningRates(lr, min_lr, warmup_lr, f"lr {lr:g} as given (no batch scaling)")
    factor = global_batch / base_batch
    scaled = LearningRates(lr * factor, min_lr * factor if scaling == "all" else min_lr,
                           warmup_lr * factor if scaling == "all" else warmup_lr, "")
    which = "lr, min-lr and warmup-lr" if scaling == "all" else "lr (min-lr, warmup-lr as given)"
    rule = (f"{which} x global batch {global_batch} / {base_batch}: lr {lr:g} -> {scaled.lr:g}, "
            f"min-lr {scaled.min_lr:g}, warmup-lr {scaled.warmup_lr:g}")
    return LearningRates(scaled.lr, scaled.min_lr, scaled.warmup_lr, rule)


def layer_id(name: str, depth: int) -> int:
    """BEiT's layer index of a parameter: 0 for the patch embedding, CLS token and position
    embedding, i + 1 for block i, depth + 1 for everything after the blocks (norm, head)."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed.")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_scales(depth: int, decay: float) -> List[float]:
    """LR factor per layer id: decay ** (depth + 1 - id), so block i gets decay ** (depth - i), the
    embeddings decay ** (depth + 1) and the head 1 (BEiT / SimMIM fine-tuning)."""
    return [decay ** (depth + 1 - layer) for layer in range(depth + 2)]


def parameter_groups(model: nn.Module, *, lr: float, weight_decay: float, layer_decay: float = 1.0) -> List[dict]:
    """Parameter groups: no decay on 1-d parameters (biases, norms, layer scale) nor on the names the
    model lists in `no_weight_decay()` (CLS token, position embedding, relative position bias tables);
    with layer_decay < 1 one pair of groups per layer, each with lr = lr * its `lr_scale`."""
    exempt = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    depth = len(model.blocks) if hasattr(model, "blocks") else 0
    scales = layer_decay_scales(depth, layer_decay) if layer_decay != 1.0 else None
    groups: Dict[Tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.dim() <= 1 or name in exempt)
        layer = layer_id(name, depth) if scales is not None else 0
        scale = scales[layer] if scales is not None else 1.0
        group = groups.setdefault((layer, decays), {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                                   "lr": lr * scale, "lr_scale": scale, "layer": layer})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda key: (key[0], not key[1]))]


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, optimizer: str = "adamw",
                    momentum: float = 0.9, layer_decay: float = 1.0) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.999) or SGD with momentum over `parameter_groups`."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    groups = parameter_groups(model, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    return torch.optim.AdamW(groups, lr=lr)


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int, min_factor: float,
                         warmup_factor: float = 0.0) -> float:
    """LR multiplier at `step`: warmup_factor + (1 - warmup_factor) * (step + 1) / warmup_steps during
    warm-up (linear from the warm-up LR to the peak), then
    min_factor + (1 - min_factor) * (1 + cos(pi * t)) / 2 with t going 0 -> 1 over the remaining steps."""
    if step < warmup_steps:
        return warmup_factor + (1.0 - warmup_factor) * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _decay_progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """p in [0, 1]: how far `step` is through the steps after the warm-up."""
    return min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))


def warmup_linear_factor(step: int, *, warmup_steps: int, total_steps: int, warmup_factor: float = 0.0,
                         min_factor: float = 0.0) -> float:
    """Linear-LR (Li et al. 2020; Budgeted Training's Eq. 9): 1 - p after the warm-up, down to 0.
    `min_factor` is accepted for a common signature and unused (the paper's formula has no floor)."""
    if step < warmup_steps:
        return warmup_factor + (1.0 - warmup_factor) * (step + 1) / warmup_steps
    return 1.0 - _decay_progress(step, warmup_steps, total_steps)


def warmup_rex_factor(step: int, *, warmup_steps: int, total_steps: int, warmup_factor: float = 0.0,
                      min_factor: float = 0.0) -> float:
    """REX (Chen et al. 2022; Budgeted Training's Eq. 9): (1 - p) / (1/2 + (1 - p) / 2) after the
    warm-up, down to 0. `min_factor` unused, as warmup_linear_factor's."""
    if step < warmup_steps:
        return warmup_factor + (1.0 - warmup_factor) * (step + 1) / warmup_steps
    remaining = 1.0 - _decay_progress(step, warmup_steps, total_steps)
    return remaining / (0.5 + 0.5 * remaining)


LR_FACTORS = {"cosine": warmup_cosine_factor, "linear": warmup_linear_factor, "rex": warmup_rex_factor}


def build_lr_scheduler(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_steps: int,
                       total_steps: int, warmup_lr: float = 0.0, shape: str = "cosine") -> LambdaLR:
    """Stepped once per iteration; one factor for every group, so a group's LR is its own peak
    (lr x lr_scale) times the factor, its floor min_lr x lr_scale (as BEiT's scheduler; cosine only).
    `shape`: cosine, linear or rex (LR_SCHEDULES; see the module docstring). The factor is a partial
    of a module function: the scheduler's state_dict holds only counters."""
    if shape not in LR_FACTORS:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {shape!r}")
    factor = partial(LR_FACTORS[shape], warmup_steps=warmup_steps, total_steps=total_steps,
                     min_factor=min_lr / lr if lr > 0 else 0.0, warmup_factor=warmup_lr / lr if lr > 0 else 0.0)
    return LambdaLR(optimizer, factor)


def base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The current LR before layer decay (what the log reports)."""
    group = optimizer.param_groups[-1]  # the head's group: lr_scale 1 with layer decay
    return group["lr"] / group.get("lr_scale", 1.0)


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
