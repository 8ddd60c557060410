"""The command line of `pss-train`, generated from TrainConfig's fields.

FLAGS holds one row per TrainConfig field: its flag's help, type, choices, group, metavar and
action kind. Defaults are TrainConfig's (the single source), except for the settings that other
settings imply (IMPLIED: the parser leaves them None and resolve_implied fills them). Also here:
the argparse types the flags share with pss-evaluate, the help formatter, the migration of renamed
settings (checkpoints), and parse_config.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Dict, Optional, Sequence

import torch

from .._backends import OP_BACKENDS
from ..models import MODEL_CONFIGS
from ..models.growth import INITS as GROWTH_INITS
from ..models.token_pruning import PLACEMENTS, TRI_LEVEL_PRESETS
from ..models.vit import ATTN_IMPLS, POOLS, SAMPLER_IMPLS
from ..ops.varlen.allocation import ALLOCATIONS
from .config import TrainConfig
from .data import DATASETS
from .data.augment import RandAugmentSpec
from .data.decode import DECODERS
from .data.transforms import INTERPOLATIONS
from .optim import LR_SCALINGS, LR_SCHEDULES, OPTIMIZERS
from .recipes import RECIPES, recipe_settings, recipes_help

PRECISIONS = ("auto", "bf16", "fp32")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks; appends real defaults (not None / flags) to each option's help."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is argparse.SUPPRESS or isinstance(default, bool))
        if action.option_strings and shown and "(default" not in text:  # some helps state their own
            text += " (default: %(default)s)"
        return text


# ---- argparse types ----------------------------------------------------------------------------

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


# ---- the flag table ----------------------------------------------------------------------------

# Argument groups, in --help order; None: the parser's own "options".
MODEL, DATA, OPTIM = "model", "data", "optimisation"
AUGMENT = "augmentation (batched on the training device; needs kornia)"
TRI_LEVEL = "Tri-Level E-ViT (Kong et al. 2023): token, attention and example levels"
BUDGETED, RUN = "Budgeted Training (Xia et al. 2023)", "run"
GROUPS = (None, MODEL, DATA, AUGMENT, OPTIM, TRI_LEVEL, BUDGETED, RUN)

# Action kinds: "store" (a value), "store_true" / "store_false" (a switch; store_false fields take
# a --no-... flag), "optional_bool" (--x / --no-x, None when neither is given).
ACTIONS = ("store", "store_true", "store_false", "optional_bool")


@dataclass(frozen=True)
class Flag:
    group: Optional[str]
    help: str
    type: Optional[Callable[[str], object]] = None
    choices: Optional[Sequence[str]] = None
    metavar: Optional[str] = None
    action: str = "store"
    flag: Optional[str] = None   # the option string; None: --field-name


# Settings whose default depends on other settings: the parser leaves them None, resolve_implied
# fills them (their help states the resolved default).
IMPLIED = ("schedule", "scorer")

# Fields without a flag: filled by the trainer.
NO_FLAG = ("world_size",)

FLAGS: Dict[str, Flag] = {
    "recipe": Flag(None, "a paper's hyper-parameters as defaults (listed below); flags given override them",
                   choices=sorted(RECIPES)),
    # model
    "model": Flag(MODEL, "named ViT config", choices=sorted(MODEL_CONFIGS)),
    "img_size": Flag(MODEL, "image side (default: 32 for digits, else 224)", type=POSITIVE),
    "patch_size": Flag(MODEL, "override the named config's patch size", type=POSITIVE),
    "embed_dim": Flag(MODEL, "override the named config's width", type=POSITIVE),
    "depth": Flag(MODEL, "override the named config's depth", type=POSITIVE),
    "num_heads": Flag(MODEL, "override the named config's heads", type=POSITIVE),
    "rpb": Flag(MODEL, "plain ViT: SDPA attention without relative position bias (the baseline)",
                action="store_false", flag="--no-rpb"),
    "abs_pos_embed": Flag(MODEL, "absolute position embedding (default: the config's; on with --no-rpb)",
                          action="optional_bool"),
    "layer_scale_init": Flag(MODEL, "layer scale init value; 0 disables", type=NON_NEGATIVE_FLOAT),
    "drop_path": Flag(MODEL, "stochastic depth rate (default: the config's)", type=FRACTION),
    "scorer": Flag(MODEL, f"patch scoring of the input sampler: L1 magnitude (PSS), L2, random (PatchDropout), or "
                          f"center (the patches nearest the grid centre: Budgeted Training's token crop) (default: "
                          f"{TrainConfig.scorer}; random with --schedule patchdropout and with --data digits, where "
                          f"magnitude sampling fails)",
                   choices=("l1", "l2", "random", "center")),
    "attn_impl": Flag(MODEL, "pss: fused rpb_attention; published (the PSS authors' bias construction) / eager-index / "
                             "sdpa-bias / flex: the peers it is measured against", choices=ATTN_IMPLS),
    "sampler_impl": Flag(MODEL, "pss: fused sample_patches; eager: the published argsort + gather path",
                         choices=SAMPLER_IMPLS),
    "sampler_backend": Flag(MODEL, "sample_patches backend (default: the package's choice for the device)",
                            choices=OP_BACKENDS["sample_patches"]),
    "attn_backend": Flag(MODEL, "rpb_attention backend (default: the package's choice for the device)",
                         choices=OP_BACKENDS["rpb_attention"]),
    "pool": Flag(MODEL, "mean: mean of the patch tokens + fc_norm (PSS, BEiT, SimMIM; the model's default); "
                        "cls: final norm + CLS token (timm ViT / DeiT)", choices=POOLS),
    "allocation": Flag(MODEL, "who decides each image's kept tokens at rho < 1: fixed (every image round(rho N), "
                              "PSS); budget (one top-K over the batch's patch scores, the batch total fixed); mass "
                              "(each image the fewest patches holding a fraction of its score mass, the fraction set so "
                              "that the batch keeps round(rho B N) tokens); budget and mass run packed tokens "
                              "(models/packed.py)",
                       choices=ALLOCATIONS),
    "init_from": Flag(MODEL, "start a fresh run from these weights (a timm / DeiT / BEiT / SimMIM checkpoint or a "
                             "state dict; pss_kernels.models.load_pretrained, strict=False); its report is printed and "
                             "logged. Not read when resuming (the checkpoint holds the weights)", metavar="PATH"),
    # data
    "data": Flag(DATA, "digits: scikit-learn's digits (CPU demo); synthetic: random images; folder: --data-dir",
                 choices=DATASETS),
    "data_dir": Flag(DATA, "ImageFolder root with train/ and val/ (for --data folder)"),
    "num_classes": Flag(DATA, "classes of the synthetic data (default 1000)", type=POSITIVE),
    "synthetic_size": Flag(DATA, "synthetic training images (validation: a quarter)", type=POSITIVE),
    "workers": Flag(DATA, "data loader processes per rank", type=NON_NEGATIVE),
    "interpolation": Flag(DATA, "resampling of the random-resized crop, the eval resize and RandAugment's geometric "
                                "ops",
                          choices=INTERPOLATIONS),
    "decoder": Flag(DATA, "--data folder: decode only each image's crop at the smallest JPEG scale that covers it "
                          "(auto: simplejpeg if installed, else pillow's draft mode), or pillow-full: decode "
                          "every whole image (the slow reference; benchmarks/data.py compares them); on a CUDA device "
                          "nvimgcodec / nvjpeg decode the training crops on the GPU (train/data/gpu_decode.py; not yet "
                          "run on a GPU, so auto does not pick them)", choices=DECODERS),
    # augmentation
    "rand_augment": Flag(AUGMENT, "timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1 (m magnitude 0..10, n ops, mstd "
                                  "magnitude noise, inc increasing ops); none: off",
                         type=rand_augment_flag, metavar="SPEC"),
    "color_jitter": Flag(AUGMENT, "brightness / contrast / saturation strength; inactive with --rand-augment (timm)",
                         type=NON_NEGATIVE_FLOAT),
    "random_erasing": Flag(AUGMENT, "probability of erasing one box per image with per-pixel noise", type=probability),
    "mixup": Flag(AUGMENT, "Mixup Beta alpha; 0: off", type=NON_NEGATIVE_FLOAT),
    "cutmix": Flag(AUGMENT, "CutMix Beta alpha; 0: off", type=NON_NEGATIVE_FLOAT),
    "mixup_switch_prob": Flag(AUGMENT, "per batch, CutMix instead of Mixup when both are on", type=probability),
    "repeated_aug": Flag(AUGMENT, "repeated augmentation: each sampled image this many times per epoch, over the ranks "
                                  "(DeiT: 3; the epoch keeps its length); 1: off", type=POSITIVE),
    # optimisation
    "epochs": Flag(OPTIM, "length of the run", type=POSITIVE),
    "batch_size": Flag(OPTIM, "per process", type=POSITIVE),
    "optimizer": Flag(OPTIM, "AdamW or SGD", choices=OPTIMIZERS),
    "momentum": Flag(OPTIM, "SGD momentum", type=FRACTION),
    "lr": Flag(OPTIM, "peak learning rate (for --lr-base-batch images with --lr-scaling)", type=NON_NEGATIVE_FLOAT),
    "min_lr": Flag(OPTIM, "cosine floor", type=NON_NEGATIVE_FLOAT),
    "warmup_lr": Flag(OPTIM, "LR at the start of the linear warm-up", type=NON_NEGATIVE_FLOAT),
    "lr_scaling": Flag(OPTIM, "linear scaling by global batch / --lr-base-batch of: none; lr (the peak, DeiT); all "
                              "(peak, floor and warm-up start, SimMIM). The rule and the LRs it gives are logged",
                       choices=LR_SCALINGS),
    "lr_base_batch": Flag(OPTIM, "the global batch the LR flags are meant for", type=POSITIVE),
    "warmup_epochs": Flag(OPTIM, "linear LR warm-up", type=NON_NEGATIVE_FLOAT),
    "weight_decay": Flag(OPTIM, "weight decay (not on norms, biases, CLS, position embedding, RPB tables)",
                         type=NON_NEGATIVE_FLOAT),
    "layer_decay": Flag(OPTIM, "layer-wise LR decay (BEiT / SimMIM 0.65): block i of D gets lr x decay^(D-i), the "
                               "embeddings decay^(D+1), the head 1; 1: off", type=keep_fraction),
    "label_smoothing": Flag(OPTIM, "cross-entropy label smoothing", type=FRACTION),
    "clip_grad": Flag(OPTIM, "max grad norm; 0: off", type=NON_NEGATIVE_FLOAT),
    "ema_decay": Flag(OPTIM, "EMA of weights; 0: off", type=float),
    "schedule": Flag(OPTIM, f"patch sampling schedule spec (default: {TrainConfig.schedule}; none with a method flag "
                            f"below). PatchDropout: patchdropout (keep rate uniform in [0.5, 1] each step) or "
                            f"patchdropout:0.5,1.0,grid_step=0.5 (its {{0.5, 1}} variant); evaluation keeps every "
                            f"patch"),
    "lr_schedule": Flag(OPTIM, "LR after the warm-up: cosine to --min-lr; linear: lr (1 - t/T) (Linear-LR); rex: "
                               "lr (1 - t/T) / (1/2 + (1 - t/T)/2) (REX). Budgeted Training's baselines: compress "
                               "--epochs to the budget (e.g. half the epochs for 50 %%)", choices=LR_SCHEDULES),
    "precision": Flag(OPTIM, "auto: bf16 autocast on CUDA, fp32 on CPU", choices=PRECISIONS),
    "compile": Flag(OPTIM, "torch.compile the model", action="store_true"),
    "seed": Flag(OPTIM, "initial weights, data order, augmentation", type=int),
    "device": Flag(OPTIM, "auto, cpu or cuda", type=device_flag),
    "deterministic": Flag(OPTIM, "bit-identical runs and resumes on GPU and CPU alike: rpb_attention accumulates its "
                                 "bias gradient in a fixed order (slower backward) and torch uses deterministic "
                                 "algorithms (it warns about any op without one). Without it a GPU run is not "
                                 "bit-exact, nor a multi-threaded CPU run of a large model. Stored in the checkpoint: "
                                 "a resumed run must pass it again", action="store_true"),
    # Tri-Level E-ViT
    "token_pruning": Flag(TRI_LEVEL, f"token level: selectors keep the top R_T of the patch tokens by the CLS "
                                     f"attention (presets {', '.join(TRI_LEVEL_PRESETS)}; blocks 1-based, "
                                     f"default 4,7,10 scaled to the depth); R_T warms up from 1 by a cosine (hold "
                                     f"10/300 of the run, decay over 100/300)",
                          type=token_pruning_flag, metavar="PRESET|R_T[,BLOCK,...]"),
    "attention_keep": Flag(TRI_LEVEL, "attention level: each patch query attends its top R_A of the kept keys after a "
                                      "selector (paper 0.2-0.4; a mask on the dense torch path: it saves no FLOPs), "
                                      "warmed up as R_T", type=keep_fraction, metavar="R_A"),
    "pruning_placement": Flag(TRI_LEVEL, "after_attention (default; the released code): a selector inside its block "
                                         "after the attention; before_block: before the block, on the previous "
                                         "block's attention", choices=PLACEMENTS),
    "pruning_warmup": Flag(TRI_LEVEL, "R_T / R_A warm-up in epochs (e.g. 10,100)", metavar="HOLD,DECAY"),
    "example_keep": Flag(TRI_LEVEL, "example level: train on a subset of R_E of the examples (paper 0.7-0.9): m = 1 - "
                                    "R_E dropped at random at the start, then remove-and-restore by forgetting events",
                         type=open_fraction, metavar="R_E"),
    "filter_every": Flag(TRI_LEVEL, "epochs between remove-and-restore", type=POSITIVE),
    "filter_fraction": Flag(TRI_LEVEL, "share of the data removed (least forgotten) and restored (at random) each time",
                            type=open_fraction),
    "filter_iterations": Flag(TRI_LEVEL, "how many remove-and-restore rounds (default round(m / n) + 1: the paper's 3 "
                                         "for R_E 0.9, 5 for 0.8)", type=NON_NEGATIVE),
    # Budgeted Training
    "budget": Flag(BUDGETED, "train within this fraction of the FLOPs of --epochs at full size: 3 stages that grow "
                             "the model (--growth), lengths from the budget solver (alpha 2) with per-stage FLOPs of "
                             "the real model, weights copied into the new parts and their AdamW moments reset",
                   type=keep_fraction, metavar="FRACTION"),
    "growth": Flag(BUDGETED, "which of heads,mlp,tokens grow (the paper's Table 6 stages for deit_tiny/small/base "
                             "at 14x14 patches, else heads H/3, 2H/3, H, MLP ratio r/4, r/2, r, tokens 50/75/100 %%"
                             " by centre crop), or the stages as HEADS:MLP_RATIO:TOKENS/... ('all' tokens)",
                   metavar="DIMS|STAGES"),
    "growth_init": Flag(BUDGETED, "new parts: copy the active ones (the paper), copy-halved (function-preserving "
                                  "x0.5), random (the ablation)", choices=GROWTH_INITS),
    "budget_seeds": Flag(BUDGETED, "the s_k of the stage lengths T_k = c exp(2 s_k): the stage keep rates (where "
                                   "tokens grow; else 0.5, 0.75, 1), the paper's sorted U(0, 1) draws from --seed, or "
                                   "given", metavar="rates|sample|S1,S2,S3"),
    # run
    "out_dir": Flag(RUN, "checkpoint.pt, log.jsonl, summary.json go here"),
    "resume": Flag(RUN, "checkpoint to continue from, or 'auto' for OUT_DIR/checkpoint.pt if present"),
    "save_every": Flag(RUN, "steps between checkpoints (0: at epoch ends only)", type=NON_NEGATIVE),
    "stop_at_step": Flag(RUN, "stop after this many steps (LR and patch schedules keep the full run's length)",
                         type=POSITIVE),
    "eval_every": Flag(RUN, "epochs between evaluations (0: at the end only)", type=NON_NEGATIVE),
    "log_interval": Flag(RUN, "steps between progress lines when stderr is not a terminal", type=POSITIVE),
    "progress": Flag(RUN, "no progress bar", action="store_false", flag="--no-progress"),
    "log_all_ranks": Flag(RUN, "every rank writes log.rankR.jsonl (rank 0 always writes log.jsonl)",
                          action="store_true"),
}


def _check_table() -> None:
    """Every TrainConfig field has a row (or is in NO_FLAG), in a known group, with a known action."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    missing, extra = sorted(fields - set(FLAGS) - set(NO_FLAG)), sorted(set(FLAGS) - fields)
    if missing or extra:
        raise AssertionError(f"cli.FLAGS out of step with TrainConfig: no row for {missing}, no field for {extra}")
    for name, row in FLAGS.items():
        if row.group not in GROUPS or row.action not in ACTIONS:
            raise AssertionError(f"cli.FLAGS[{name!r}]: unknown group {row.group!r} or action {row.action!r}")


_check_table()


def option_string(name: str) -> str:
    """The flag of TrainConfig field `name`: --field-name unless its row names one."""
    return FLAGS[name].flag or "--" + name.replace("_", "-")


def _add_flag(target, name: str, row: Flag, default) -> None:
    kwargs = {"help": row.help}
    if row.action in ("store_true", "store_false"):
        target.add_argument(option_string(name), dest=name, action=row.action, default=default, **kwargs)
        return
    if row.action == "optional_bool":
        target.add_argument(option_string(name), dest=name, action=argparse.BooleanOptionalAction, default=default,
                            **kwargs)
        return
    for key in ("type", "choices", "metavar"):
        if getattr(row, key) is not None:
            kwargs[key] = getattr(row, key)
    target.add_argument(option_string(name), dest=name, default=default, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """pss-train's parser: one flag per FLAGS row, in TrainConfig's field order within each group."""
    parser = argparse.ArgumentParser(
        prog="pss-train", description="Train a ViT with a Patch Sampling Schedule (one process, or torchrun + DDP).",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
               "  pss-train --data digits --model deit_tiny --embed-dim 64 --depth 4 --num-heads 4 "
               "--patch-size 8 --epochs 10 --schedule cyclic:0.2,1.0\n"
               "  torchrun --nproc_per_node 8 -m pss_kernels.train --data folder --data-dir /imagenet "
               "--model deit_small --epochs 300 --batch-size 128 --lr 1e-3 --schedule cyclic:0.2,1.0\n"
               "schedules: see pss_kernels.schedules.build_schedule (none, fixed:R, linear:A,B, cyclic:A,B, "
               "cosine:A,B, patchdropout[:LOW,HIGH[,P_FULL]], warmup_cosine:T; Budgeted Training is --budget F)\n"
               + methods_epilog()
               + recipes_help())
    groups = {title: parser if title is None else parser.add_argument_group(title) for title in GROUPS}
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        if field.name in NO_FLAG:
            continue
        default = None if field.name in IMPLIED else getattr(defaults, field.name)
        _add_flag(groups[FLAGS[field.name].group], field.name, FLAGS[field.name], default)
    return parser


# The schedule-only methods; the hook methods' lines come from their registry (train/methods/).
SCHEDULE_METHODS_HELP = (
    "  PSS                 --schedule fixed:0.6 | linear:0.2,1.0 | cyclic:0.2,1.0 [--scorer l1|random]\n"
    "  PatchDropout        --schedule patchdropout  |  patchdropout:0.5,1.0,grid_step=0.5  (scorer random)\n"
    "  LR baselines        --schedule none --lr-schedule linear|rex --epochs <epochs x budget>\n")


def methods_epilog() -> str:
    from .methods import REGISTRY
    lines = ["methods (without --schedule, a method flag makes the input keep every token):",
             SCHEDULE_METHODS_HELP.rstrip("\n")]
    lines += [f"  {method.description}:\n      {method.flags}" for method in REGISTRY.values()]
    lines.append("  combined, e.g. Tri-Level, all three: --token-pruning tri-level/0.8 --attention-keep 0.3 "
                 "--example-keep 0.8")
    return "\n".join(lines) + "\n"


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
        from .methods import enabled_methods
        settings = SimpleNamespace(**{**dataclasses.asdict(TrainConfig()), **values})
        method = bool(enabled_methods(settings))
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


# ---- renamed settings (checkpoints written before a rename) ------------------------------------

# attn_impl names of older checkpoints: "eager" became "eager-index" when the published construction
# got a peer of its own (issue 9). The choice changes no weight, so such checkpoints still load.
RENAMED_ATTN_IMPLS = {"eager": "eager-index"}


def migrate_renamed(values: dict) -> dict:
    """A checkpoint's config dict with renamed setting values given their current names."""
    values = dict(values)
    if values.get("attn_impl") in RENAMED_ATTN_IMPLS:
        values["attn_impl"] = RENAMED_ATTN_IMPLS[values["attn_impl"]]
    return values
