"""TrainConfig: every setting of a training run, and the command line that fills it."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .._backends import OP_BACKENDS
from ..models import MODEL_CONFIGS
from ..models.vit import ATTN_IMPLS, POOLS, SAMPLER_IMPLS
from .augment import RandAugmentSpec
from .data import DATASETS
from .decode import DECODERS
from ..models.growth import INITS as GROWTH_INITS
from ..models.token_pruning import PLACEMENTS, TRI_LEVEL_PRESETS
from .optim import LR_SCALINGS, LR_SCHEDULES, OPTIMIZERS
from .recipes import RECIPES, recipe_settings, recipes_help
from .transforms import INTERPOLATIONS

PRECISIONS = ("auto", "bf16", "fp32")


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
    init_from: Optional[str] = None          # weights to start a fresh run from (models.load_pretrained)
    # data
    data: str = "digits"
    data_dir: Optional[str] = None
    num_classes: Optional[int] = None
    synthetic_size: int = 1280
    workers: int = 2
    interpolation: str = "bilinear"          # random-resized crop, eval resize, RandAugment's geometric ops
    decoder: str = "auto"                    # JPEG decoding of --data folder (train/decode.py)
    # augmentation (train/augment.py, on the device; kornia)
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
    # methods (train/methods.py, train/filtering.py): no-ops when unset
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; appends real defaults (not None / flags) to each option's help."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is argparse.SUPPRESS or isinstance(default, bool))
        if action.option_strings and shown and "(default" not in text:  # some helps state their own
            text += " (default: %(default)s)"
        return text


def _number(kind, minimum, *, below=None):
    """argparse type: `kind` in [minimum, below); argparse names the flag in its error."""
    def parse(text: str):
        value = kind(text)
        if value < minimum or (below is not None and value >= below):
            bound = f"in [{minimum}, {below})" if below is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value" wording for non-numbers
    return parse


def device_flag(text: str) -> str:
    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}") from None
    return text


POSITIVE, NON_NEGATIVE, NON_NEGATIVE_FLOAT = _number(int, 1), _number(int, 0), _number(float, 0.0)
FRACTION = _number(float, 0.0, below=1.0)


def _interval(low: float, high: float, *, open_low: bool, open_high: bool):
    """argparse type: a float in the interval from low to high (each end open or closed)."""
    shown = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def parse(text: str) -> float:
        value = float(text)
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"must be in {shown}, got {text}")
        return value
    parse.__name__ = "float"  # argparse's "invalid float value" wording for non-numbers
    return parse


probability = _interval(0.0, 1.0, open_low=False, open_high=False)
keep_fraction = _interval(0.0, 1.0, open_low=True, open_high=False)
open_fraction = _interval(0.0, 1.0, open_low=True, open_high=True)


def rand_augment_flag(text: str) -> Optional[str]:
    """A timm RandAugment spec (checked here), or none."""
    if text.lower() in ("none", "off", ""):
        return None
    try:
        RandAugmentSpec.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def token_pruning_flag(text: str) -> str:
    from .methods import parse_token_pruning
    try:
        parse_token_pruning(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="pss-train", description="Train a ViT with a Patch Sampling Schedule (one process, or torchrun + DDP).",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
               "  pss-train --data digits --model deit_tiny --embed-dim 64 --depth 4 --num-heads 4 "
               "--patch-size 8 --epochs 10 --schedule cyclic:0.2,1.0\n"
               "  torchrun --nproc_per_node 8 -m pss_kernels.train --data folder --data-dir /imagenet "
               "--model deit_small --epochs 300 --batch-size 128 --lr 1e-3 --schedule cyclic:0.2,1.0\n"
               "schedules: see pss_kernels.schedules.build_schedule (none, fixed:R, linear:A,B, cyclic:A,B, "
               "cosine:A,B, patchdropout[:LOW,HIGH[,P_FULL]], warmup_cosine:T, budget:F)\n" + METHODS_HELP
               + recipes_help())
    parser.add_argument("--recipe", choices=sorted(RECIPES),
                        help="a paper's hyper-parameters as defaults (listed below); flags given override them")
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=sorted(MODEL_CONFIGS), default=defaults.model, help="named ViT config")
    model.add_argument("--img-size", type=POSITIVE, help="image side (default: 32 for digits, else 224)")
    model.add_argument("--patch-size", type=POSITIVE, help="override the named config's patch size")
    model.add_argument("--embed-dim", type=POSITIVE, help="override the named config's width")
    model.add_argument("--depth", type=POSITIVE, help="override the named config's depth")
    model.add_argument("--num-heads", type=POSITIVE, help="override the named config's heads")
    model.add_argument("--no-rpb", dest="rpb", action="store_false",
                       help="plain ViT: SDPA attention without relative position bias (the baseline)")
    model.add_argument("--abs-pos-embed", action=argparse.BooleanOptionalAction, default=None,
                       help="absolute position embedding (default: the config's; on with --no-rpb)")
    model.add_argument("--layer-scale-init", type=NON_NEGATIVE_FLOAT, help="layer scale init value; 0 disables")
    model.add_argument("--drop-path", type=FRACTION, help="stochastic depth rate (default: the config's)")
    model.add_argument("--scorer", choices=("l1", "l2", "random", "center"), default=None,
                       help=f"patch scoring of the input sampler: L1 magnitude (PSS), L2, random (PatchDropout), or "
                            f"center (the patches nearest the grid centre: Budgeted Training's token crop) (default: "
                            f"{defaults.scorer}; random with --schedule patchdropout and with --data digits, where magnitude "
                            f"sampling fails)")
    model.add_argument("--attn-impl", choices=ATTN_IMPLS, default=defaults.attn_impl,
                       help="pss: fused rpb_attention; published (the PSS authors' bias construction) / eager-index / "
                            "sdpa-bias / flex: the peers it is measured against")
    model.add_argument("--sampler-impl", choices=SAMPLER_IMPLS, default=defaults.sampler_impl,
                       help="pss: fused sample_patches; eager: the published argsort + gather path")
    model.add_argument("--sampler-backend", choices=OP_BACKENDS["sample_patches"],
                       help="sample_patches backend (default: the package's choice for the device)")
    model.add_argument("--attn-backend", choices=OP_BACKENDS["rpb_attention"],
                       help="rpb_attention backend (default: the package's choice for the device)")
    model.add_argument("--pool", choices=POOLS,
                       help="mean: mean of the patch tokens + fc_norm (PSS, BEiT, SimMIM; the model's default); "
                            "cls: final norm + CLS token (timm ViT / DeiT)")
    model.add_argument("--init-from", metavar="PATH",
                       help="start a fresh run from these weights (a timm / DeiT / BEiT / SimMIM checkpoint or a "
                            "state dict; pss_kernels.models.load_pretrained, strict=False); its report is printed and "
                            "logged. Not read when resuming (the checkpoint holds the weights)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", choices=DATASETS, default=defaults.data,
                      help="digits: scikit-learn's digits (CPU demo); synthetic: random images; folder: --data-dir")
    data.add_argument("--data-dir", help="ImageFolder root with train/ and val/ (for --data folder)")
    data.add_argument("--num-classes", type=POSITIVE, help="classes of the synthetic data (default 1000)")
    data.add_argument("--synthetic-size", type=POSITIVE, default=defaults.synthetic_size,
                      help="synthetic training images (validation: a quarter)")
    data.add_argument("--workers", type=NON_NEGATIVE, default=defaults.workers, help="data loader processes per rank")
    data.add_argument("--interpolation", choices=INTERPOLATIONS, default=defaults.interpolation,
                      help="resampling of the random-resized crop, the eval resize and RandAugment's geometric ops")
    data.add_argument("--decoder", choices=DECODERS, default=defaults.decoder,
                      help="--data folder: decode only each image's crop at the smallest JPEG scale that covers it "
                           "(auto: simplejpeg if installed, else pillow's draft mode), or pillow-full: decode "
                           "every whole image (the slow reference; benchmarks/data.py compares them)")
    augment = parser.add_argument_group("augmentation (batched on the training device; needs kornia)")
    augment.add_argument("--rand-augment", type=rand_augment_flag, metavar="SPEC",
                         help="timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1 (m magnitude 0..10, n ops, mstd "
                              "magnitude noise, inc increasing ops); none: off")
    augment.add_argument("--color-jitter", type=NON_NEGATIVE_FLOAT, default=defaults.color_jitter,
                         help="brightness / contrast / saturation strength; inactive with --rand-augment (timm)")
    augment.add_argument("--random-erasing", type=probability, default=defaults.random_erasing,
                         help="probability of erasing one box per image with per-pixel noise")
    augment.add_argument("--mixup", type=NON_NEGATIVE_FLOAT, default=defaults.mixup, help="Mixup Beta alpha; 0: off")
    augment.add_argument("--cutmix", type=NON_NEGATIVE_FLOAT, default=defaults.cutmix, help="CutMix Beta alpha; 0: off")
    augment.add_argument("--mixup-switch-prob", type=probability, default=defaults.mixup_switch_prob,
                         help="per batch, CutMix instead of Mixup when both are on")
    augment.add_argument("--repeated-aug", type=POSITIVE, default=defaults.repeated_aug,
                         help="repeated augmentation: each sampled image this many times per epoch, over the ranks "
                              "(DeiT: 3; the epoch keeps its length); 1: off")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=POSITIVE, default=defaults.epochs, help="length of the run")
    optim.add_argument("--batch-size", type=POSITIVE, default=defaults.batch_size, help="per process")
    optim.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer, help="AdamW or SGD")
    optim.add_argument("--momentum", type=FRACTION, default=defaults.momentum, help="SGD momentum")
    optim.add_argument("--lr", type=NON_NEGATIVE_FLOAT, default=defaults.lr,
                       help="peak learning rate (for --lr-base-batch images with --lr-scaling)")
    optim.add_argument("--min-lr", type=NON_NEGATIVE_FLOAT, default=defaults.min_lr, help="cosine floor")
    optim.add_argument("--warmup-lr", type=NON_NEGATIVE_FLOAT, default=defaults.warmup_lr,
                       help="LR at the start of the linear warm-up")
    optim.add_argument("--lr-scaling", choices=LR_SCALINGS, default=defaults.lr_scaling,
                       help="linear scaling by global batch / --lr-base-batch of: none; lr (the peak, DeiT); all "
                            "(peak, floor and warm-up start, SimMIM). The rule and the LRs it gives are logged")
    optim.add_argument("--lr-base-batch", type=POSITIVE, default=defaults.lr_base_batch,
                       help="the global batch the LR flags are meant for")
    optim.add_argument("--warmup-epochs", type=NON_NEGATIVE_FLOAT, default=defaults.warmup_epochs, help="linear LR warm-up")
    optim.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=defaults.weight_decay,
                       help="weight decay (not on norms, biases, CLS, position embedding, RPB tables)")
    optim.add_argument("--layer-decay", type=keep_fraction, default=defaults.layer_decay,
                       help="layer-wise LR decay (BEiT / SimMIM 0.65): block i of D gets lr x decay^(D-i), the "
                            "embeddings decay^(D+1), the head 1; 1: off")
    optim.add_argument("--label-smoothing", type=FRACTION, default=defaults.label_smoothing,
                       help="cross-entropy label smoothing")
    optim.add_argument("--clip-grad", type=NON_NEGATIVE_FLOAT, default=defaults.clip_grad, help="max grad norm; 0: off")
    optim.add_argument("--ema-decay", type=float, default=defaults.ema_decay, help="EMA of weights; 0: off")
    optim.add_argument("--schedule", default=None,
                       help=f"patch sampling schedule spec (default: {defaults.schedule}; none with a method flag "
                            f"below). PatchDropout: patchdropout (keep rate uniform in [0.5, 1] each step) or "
                            f"patchdropout:0.5,1.0,grid_step=0.5 (its {{0.5, 1}} variant); evaluation keeps every patch")
    optim.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=defaults.lr_schedule,
                       help="LR after the warm-up: cosine to --min-lr; linear: lr (1 - t/T) (Linear-LR); rex: "
                            "lr (1 - t/T) / (1/2 + (1 - t/T)/2) (REX). Budgeted Training's baselines: compress "
                            "--epochs to the budget (e.g. half the epochs for 50 %%)")
    optim.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                       help="auto: bf16 autocast on CUDA, fp32 on CPU")
    optim.add_argument("--compile", action="store_true", help="torch.compile the model")
    optim.add_argument("--seed", type=int, default=defaults.seed, help="initial weights, data order, augmentation")
    optim.add_argument("--device", type=device_flag, default=defaults.device, help="auto, cpu or cuda")
    optim.add_argument("--deterministic", action="store_true",
                       help="bit-identical runs and resumes on GPU and CPU alike: rpb_attention accumulates its "
                            "bias gradient in a fixed order (slower backward) and torch uses deterministic "
                            "algorithms (it warns about any op without one). Without it a GPU run is not "
                            "bit-exact, nor a multi-threaded CPU run of a large model. Stored in the checkpoint: "
                            "a resumed run must pass it again")
    tri = parser.add_argument_group("Tri-Level E-ViT (Kong et al. 2023): token, attention and example levels")
    tri.add_argument("--token-pruning", type=token_pruning_flag, metavar="PRESET|R_T[,BLOCK,...]",
                     help=f"token level: selectors keep the top R_T of the patch tokens by the CLS attention "
                          f"(presets {', '.join(TRI_LEVEL_PRESETS)}; blocks 1-based, default 4,7,10 scaled to the "
                          f"depth); R_T warms up from 1 by a cosine (hold 10/300 of the run, decay over 100/300)")
    tri.add_argument("--attention-keep", type=keep_fraction, metavar="R_A",
                     help="attention level: each patch query attends its top R_A of the kept keys after a selector "
                          "(paper 0.2-0.4; a mask on the dense torch path: it saves no FLOPs), warmed up as R_T")
    tri.add_argument("--pruning-placement", choices=PLACEMENTS,
                     help="after_attention (default; the released code): a selector inside its block after the "
                          "attention; before_block: before the block, on the previous block's attention")
    tri.add_argument("--pruning-warmup", metavar="HOLD,DECAY", help="R_T / R_A warm-up in epochs (e.g. 10,100)")
    tri.add_argument("--example-keep", type=open_fraction, metavar="R_E",
                     help="example level: train on a subset of R_E of the examples (paper 0.7-0.9): m = 1 - R_E "
                          "dropped at random at the start, then remove-and-restore by forgetting events")
    tri.add_argument("--filter-every", type=POSITIVE, default=defaults.filter_every,
                     help="epochs between remove-and-restore")
    tri.add_argument("--filter-fraction", type=open_fraction, default=defaults.filter_fraction,
                     help="share of the data removed (least forgotten) and restored (at random) each time")
    tri.add_argument("--filter-iterations", type=NON_NEGATIVE,
                     help="how many remove-and-restore rounds (default round(m / n) + 1: the paper's 3 for "
                          "R_E 0.9, 5 for 0.8)")
    budgeted = parser.add_argument_group("Budgeted Training (Xia et al. 2023)")
    budgeted.add_argument("--budget", type=keep_fraction, metavar="FRACTION",
                          help="train within this fraction of the FLOPs of --epochs at full size: 3 stages that grow "
                               "the model (--growth), lengths from the budget solver (alpha 2) with per-stage FLOPs of "
                               "the real model, weights copied into the new parts and their AdamW moments reset")
    budgeted.add_argument("--growth", default=defaults.growth, metavar="DIMS|STAGES",
                          help="which of heads,mlp,tokens grow (the paper's Table 6 stages for deit_tiny/small/base "
                               "at 14x14 patches, else heads H/3, 2H/3, H, MLP ratio r/4, r/2, r, tokens 50/75/100 %%"
                               " by centre crop), or the stages as HEADS:MLP_RATIO:TOKENS/... ('all' tokens)")
    budgeted.add_argument("--growth-init", choices=GROWTH_INITS, default=defaults.growth_init,
                          help="new parts: copy the active ones (the paper), copy-halved (function-preserving "
                               "x0.5), random (the ablation)")
    budgeted.add_argument("--budget-seeds", default=defaults.budget_seeds, metavar="rates|sample|S1,S2,S3",
                          help="the s_k of the stage lengths T_k = c exp(2 s_k): the stage keep rates (where tokens "
                               "grow; else 0.5, 0.75, 1), the paper's sorted U(0, 1) draws from --seed, or given")
    run = parser.add_argument_group("run")
    run.add_argument("--out-dir", default=defaults.out_dir,
                     help="checkpoint.pt, log.jsonl, summary.json go here")
    run.add_argument("--resume", help="checkpoint to continue from, or 'auto' for OUT_DIR/checkpoint.pt if present")
    run.add_argument("--save-every", type=NON_NEGATIVE, default=defaults.save_every,
                     help="steps between checkpoints (0: at epoch ends only)")
    run.add_argument("--stop-at-step", type=POSITIVE,
                     help="stop after this many steps (LR and patch schedules keep the full run's length)")
    run.add_argument("--eval-every", type=NON_NEGATIVE, default=defaults.eval_every,
                     help="epochs between evaluations (0: at the end only)")
    run.add_argument("--log-interval", type=POSITIVE, default=defaults.log_interval,
                     help="steps between progress lines when stderr is not a terminal")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    run.add_argument("--log-all-ranks", action="store_true",
                     help="every rank writes log.rankR.jsonl (rank 0 always writes log.jsonl)")
    return parser


METHODS_HELP = (
    "methods (one flag each; without --schedule the input keeps every token):\n"
    "  PSS                 --schedule fixed:0.6 | linear:0.2,1.0 | cyclic:0.2,1.0 [--scorer l1|random]\n"
    "  PatchDropout        --schedule patchdropout  |  patchdropout:0.5,1.0,grid_step=0.5  (scorer random)\n"
    "  Tri-Level token     --token-pruning tri-level/0.7   (or 0.7,4,7,10)\n"
    "  Tri-Level attention --attention-keep 0.3\n"
    "  Tri-Level example   --example-keep 0.9 [--filter-every 30 --filter-fraction 0.05]\n"
    "  Tri-Level, all      --token-pruning tri-level/0.8 --attention-keep 0.3 --example-keep 0.8\n"
    "  Budgeted Training   --budget 0.5 [--growth heads,mlp,tokens --growth-init copy]\n"
    "  LR baselines        --schedule none --lr-schedule linear|rex --epochs <epochs x budget>\n")

METHOD_FIELDS = ("token_pruning", "attention_keep", "example_keep", "budget")
# Why --data digits defaults to --scorer random (measured with pss-compare; README, "Which schedule to pick").
MAGNITUDE_FAILS_ON_DIGITS = (
    "magnitude (l1) sampling fails on digits: a patch's L1 score is its brightness, so the kept patches are "
    "the brightest, near-identical stroke pixels, and the dark patches that the rho = 1 evaluation adds were "
    "never seen in training; --scorer random learns (README, 'Which schedule to pick')")


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The command line's config: a --recipe's values become the defaults, so the flags given win.
    Without --schedule: the recipe's or the default schedule, or "none" when a method flag
    (--token-pruning, --attention-keep, --example-keep, --budget) is given. Without --scorer:
    random for a patchdropout schedule and for --data digits (MAGNITUDE_FAILS_ON_DIGITS), else l1."""
    parser = build_parser()
    chosen, _ = _recipe_parser().parse_known_args(argv)
    recipe = recipe_settings(chosen.recipe) if chosen.recipe in RECIPES else {}
    if recipe:  # an unknown name is left to the full parser's error message
        parser.set_defaults(**recipe)
    values = vars(parser.parse_args(argv))
    return TrainConfig(**resolve_implied(values, recipe))


def resolve_implied(values: dict, recipe: dict) -> dict:
    """Fill the settings that other settings imply, where `values` leaves them None or out: the
    schedule ("none" when a method flag is given, else the recipe's or the default) and the scorer
    (random for a patchdropout schedule and for digits, else l1). The command line and
    recipe_config both resolve through here, so a flag set and its Python form agree."""
    values = dict(values)
    if values.get("schedule") is None:
        method = any(values.get(name) is not None for name in METHOD_FIELDS)
        values["schedule"] = recipe.get("schedule") or ("none" if method else TrainConfig.schedule)
    if values.get("scorer") is None:
        # PatchDropout samples at random: its schedule implies the scorer. On digits magnitude sampling
        # fails (MAGNITUDE_FAILS_ON_DIGITS), so its demo runs random sampling unless asked otherwise.
        patchdropout = values["schedule"].strip().lower().startswith("patchdropout")
        data = values.get("data", TrainConfig.data)
        values["scorer"] = recipe.get("scorer") or ("random" if patchdropout or data == "digits"
                                                    else TrainConfig.scorer)
    return values


def _recipe_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--recipe")
    return parser


def recipe_config(name: str, **overrides) -> TrainConfig:
    """TrainConfig of recipe `name` with `overrides` (the Python form of --recipe NAME --flag ...)."""
    recipe = recipe_settings(name)
    return TrainConfig(**resolve_implied({**recipe, **overrides}, recipe))


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


# attn_impl names of older checkpoints: "eager" became "eager-index" when the published construction
# got a peer of its own (issue 9). The choice changes no weight, so such checkpoints still load.
RENAMED_ATTN_IMPLS = {"eager": "eager-index"}


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from a checkpoint's dict; unknown keys (a newer writer) are an error."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"config has unknown settings {unknown}")
    values = dict(values)
    if values.get("attn_impl") in RENAMED_ATTN_IMPLS:
        values["attn_impl"] = RENAMED_ATTN_IMPLS[values["attn_impl"]]
    return TrainConfig(**values)

