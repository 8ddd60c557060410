"""TrainConfig: every setting of a training run, as data.

The command line that fills it is generated from these fields in train/cli.py (flags, help, the
settings that others imply, the migration of renamed settings); a field's default here is its
flag's default. Nothing here imports the modules that use the settings.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainConfig:
    recipe: Optional[str] = None             # the preset the other fields were resolved from (recipes.py)
    # model
    model: str = "deit_small"
    img_size: Optional[int] = None          # None: the dataset's default (digits 32, else 224)
    patch_size: Optional[int] = None        # None: the named config's value (16)
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    rpb: bool = True
    abs_pos_embed: Optional[bool] = None
    layer_scale_init: Optional[float] = None  # None: the named config's; 0 disables layer scale
    drop_path: Optional[float] = None
    scorer: str = "l1"
    attn_impl: str = "pss"
    sampler_impl: str = "pss"
    sampler_backend: Optional[str] = None
    attn_backend: Optional[str] = None
    pool: Optional[str] = None               # None: the model's default (mean); "cls" for timm ViT / DeiT weights
    allocation: str = "fixed"                # fixed (PSS: every image keeps round(rho N)) | budget | mass (packed)
    init_from: Optional[str] = None          # weights to start a fresh run from (models.load_pretrained)
    # data
    data: str = "digits"
    data_dir: Optional[str] = None
    num_classes: Optional[int] = None
    synthetic_size: int = 1280
    workers: int = 2
    interpolation: str = "bilinear"          # random-resized crop, eval resize, RandAugment's geometric ops
    decoder: str = "auto"                    # JPEG decoding of --data folder (train/data/decode.py)
    # augmentation (train/data/augment.py, on the device; kornia)
    rand_augment: Optional[str] = None       # timm spec, e.g. rand-m9-mstd0.5-inc1
    color_jitter: float = 0.0                # inactive while rand_augment is on (timm)
    random_erasing: float = 0.0              # probability per image
    mixup: float = 0.0                       # Beta alpha; 0 disables
    cutmix: float = 0.0                      # Beta alpha; 0 disables
    mixup_switch_prob: float = 0.5           # CutMix instead of Mixup, per batch, when both are on
    repeated_aug: int = 1                    # copies of each image per epoch across ranks (DeiT: 3)
    # optimisation
    epochs: int = 10
    batch_size: int = 64                     # per process
    optimizer: str = "adamw"
    momentum: float = 0.9                    # SGD only
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_lr: float = 0.0                   # LR at the start of the warm-up
    lr_scaling: str = "none"                 # none | lr | all: which LRs are x global batch / lr_base_batch
    lr_base_batch: int = 512
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    layer_decay: float = 1.0                 # block i of D: lr x layer_decay ** (D - i); 1 disables
    label_smoothing: float = 0.1
    clip_grad: float = 0.0                   # max gradient norm; 0 disables clipping
    ema_decay: float = 0.0                   # 0 disables EMA
    schedule: str = "cyclic:0.2,1.0"
    lr_schedule: str = "cosine"              # cosine | linear | rex (Budgeted Training's LR baselines)
    precision: str = "auto"                  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False              # bit-exact GPU runs and resumes (slower bias-gradient pass)
    # methods (train/methods/): no-ops when unset
    token_pruning: Optional[str] = None      # Tri-Level token level: a preset or R_T[,BLOCK,...]
    attention_keep: Optional[float] = None   # Tri-Level attention level: R_A
    pruning_placement: Optional[str] = None  # None: after_attention (the released code's)
    pruning_warmup: Optional[str] = None     # HOLD,DECAY epochs of the R_T / R_A warm-up; None: 10/300, 100/300
    example_keep: Optional[float] = None     # Tri-Level example level: r_e = 1 - m
    filter_every: int = 30                   # epochs between remove-and-restore
    filter_fraction: float = 0.05            # n: share of the data removed and restored each time
    filter_iterations: Optional[int] = None  # None: round(m / n) + 1 (the paper's 3 for 10 %, 5 for 20 %)
    budget: Optional[float] = None           # Budgeted Training: fraction of the full run's FLOPs
    growth: str = "heads,mlp,tokens"         # what grows, or the stages H:R:N/H:R:N/...
    growth_init: str = "copy"                # copy | copy-halved | random (the ablation)
    budget_seeds: str = "rates"              # s_k of T_k = c exp(alpha s_k): rates | sample | S1,S2,S3
    # run
    out_dir: str = "runs/pss"
    resume: Optional[str] = None
    save_every: int = 0                      # steps between checkpoints; 0: at epoch ends only
    stop_at_step: Optional[int] = None       # stop early; the LR and patch schedules keep their length
    eval_every: int = 1                      # epochs between evaluations; 0: only at the end
    log_interval: int = 10
    progress: bool = True
    log_all_ranks: bool = False
    world_size: int = 1                      # filled from torchrun, recorded for resume checks


# Settings a resumed run may change without breaking bit-for-bit continuation of the training state
# (where things are, how they are logged, how fast they run). Every other setting must match.
RESUMABLE_CHANGES = frozenset({
    "data_dir", "workers", "device", "out_dir", "resume", "save_every", "stop_at_step", "eval_every",
    "log_interval", "progress", "log_all_ranks", "compile", "attn_impl", "sampler_impl", "sampler_backend",
    "attn_backend",
})


def recipe_config(name: str, **overrides) -> TrainConfig:
    """TrainConfig of recipe `name` with `overrides` (the Python form of --recipe NAME --flag ...)."""
    from .cli import resolve_implied
    from .recipes import recipe_settings
    recipe = recipe_settings(name)
    return TrainConfig(**resolve_implied({**recipe, **overrides}, recipe))


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from a checkpoint's dict; unknown keys (a newer writer) are an error. Settings
    renamed since the checkpoint was written are migrated (cli.migrate_renamed)."""
    from .cli import migrate_renamed
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"config has unknown settings {unknown}")
    return TrainConfig(**migrate_renamed(values))
