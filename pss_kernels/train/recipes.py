"""Named presets (`pss-train --recipe NAME`): every hyper-parameter of a paper's run, in one table.

A recipe sets TrainConfig fields; any flag given on the command line overrides its value
(`parse_config` makes the recipe's values the parser's defaults). Fields a recipe does not name
keep the trainer's defaults. The resolved config is logged and stored in the checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping

RAND_M9_MSTD05_INC1 = "rand-m9-mstd0.5-inc1"


@dataclass(frozen=True)
class Recipe:
    source: str
    settings: Mapping[str, object]


RECIPES: Dict[str, Recipe] = {
    # SimMIM's ViT-B fine-tuning config: the run behind the PSS paper's Table 1. Its main_finetune.py
    # scales all three LRs by global batch / 512.
    "simmim-finetune": Recipe("SimMIM ViT-B fine-tuning (Xie et al. 2022), the PSS paper's Table 1", {
        "epochs": 100, "warmup_epochs": 20.0, "lr": 1.25e-3, "min_lr": 2.5e-7, "warmup_lr": 2.5e-7,
        "lr_scaling": "all", "lr_base_batch": 512, "optimizer": "adamw", "weight_decay": 0.05, "layer_decay": 0.65,
        "clip_grad": 5.0, "label_smoothing": 0.1, "rand_augment": RAND_M9_MSTD05_INC1, "mixup": 0.8, "cutmix": 1.0,
        "mixup_switch_prob": 0.5, "random_erasing": 0.25, "drop_path": 0.1, "interpolation": "bicubic",
    }),
    # DeiT's main.py defaults (Touvron et al. 2021). Only the peak LR is scaled by batch / 512; the
    # warm-up starts at 1e-6. Its colour jitter 0.3 is inactive while RandAugment is on (timm).
    "deit": Recipe("DeiT from scratch (Touvron et al. 2021)", {
        "epochs": 300, "lr": 5e-4, "lr_scaling": "lr", "lr_base_batch": 512, "warmup_epochs": 5.0, "warmup_lr": 1e-6,
        "min_lr": 1e-5, "optimizer": "adamw", "weight_decay": 0.05, "drop_path": 0.1,
        "rand_augment": RAND_M9_MSTD05_INC1, "color_jitter": 0.3, "random_erasing": 0.25, "mixup": 0.8, "cutmix": 1.0,
        "mixup_switch_prob": 0.5, "label_smoothing": 0.1, "repeated_aug": 3, "ema_decay": 0.99996,
        "interpolation": "bicubic",
    }),
    # PatchDropout's fine-tuning (Liu et al. 2023).
    "patchdropout": Recipe("PatchDropout fine-tuning (Liu et al. 2023)", {
        "optimizer": "sgd", "momentum": 0.9, "lr": 3e-4, "lr_scaling": "none", "weight_decay": 1e-4,
        "warmup_epochs": 2.0, "label_smoothing": 0.1,
    }),
}


def recipe_settings(name: str) -> Dict[str, object]:
    """The TrainConfig fields `name` sets (with recipe=name)."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return {**RECIPES[name].settings, "recipe": name}


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def recipes_help() -> str:
    """The --help epilog's table: what each recipe sets, as flags."""
    lines = ["recipes (--recipe NAME sets these; any flag given on the command line wins):"]
    for name, recipe in RECIPES.items():
        lines.append(f"  {name}: {recipe.source}")
        flags = [f"{_flag(field)} {value:g}" if isinstance(value, float) else f"{_flag(field)} {value}"
                 for field, value in recipe.settings.items()]
        line = "     "
        for flag in flags:
            if len(line) + len(flag) > 100:
                lines.append(line.rstrip())
                line = "     "
            line += flag + "  "
        lines.append(line.rstrip())
    return "\n".join(lines)
